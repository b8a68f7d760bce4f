"""Journal corruption repair (cdp_filter.salvage): what a cut tail held is marked for
resync before it is cut; a merely torn tail is not corruption."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdp_common import records
from cdp_filter.dirty import DirtyBitmap
from cdp_filter.journal import Journal
from cdp_filter.salvage import CutRepair, salvage
from cdp_filter.sync import load_core

SIZES = [1 << 20, 1 << 20]
BLOCK = 64 * 1024


def recs(first: int, n: int, disk: int = 0, length: int = 4096) -> list[bytes]:
    return [records.encode(first + i, 1, disk, i * BLOCK, bytes([i + 1]) * length)
            for i in range(n)]


def flip(b: bytes, pos: int) -> bytes:
    return b[:pos] + bytes([b[pos] ^ 0x40]) + b[pos + 1:]


def test_torn_last_append_is_not_corruption() -> None:
    r = recs(5, 2)
    s = salvage(r[0][:100], 5, SIZES)                 # data cut short
    assert not s.corrupt and not s.extents
    s = salvage(r[0][:20], 5, SIZES)                  # header cut short
    assert not s.corrupt and not s.unknown


def test_bad_data_keeps_every_extent() -> None:
    r = recs(5, 3)
    r[0] = flip(r[0], records.HEADER_SIZE + 7)
    s = salvage(b"".join(r), 5, SIZES)
    assert s.corrupt and not s.unknown
    assert s.extents == [(0, 0, 4096), (0, BLOCK, 4096), (0, 2 * BLOCK, 4096)]
    assert s.bad_records == 1 and s.records == 3


def test_unreadable_header_makes_the_rest_unknown() -> None:
    r = recs(5, 3)
    r[1] = flip(r[1], 0)                                # magic
    s = salvage(b"".join(r), 5, SIZES)
    assert s.corrupt and s.unknown
    assert s.extents == [(0, 0, 4096)]


def test_flipped_seq_is_unknown_and_out_of_bounds_too() -> None:
    r = recs(5, 2)
    s = salvage(flip(r[0], 8) + r[1], 5, SIZES)         # seq field: header suspect
    assert s.corrupt and s.unknown and not s.extents
    big = records.encode(5, 1, 1, (1 << 20) - 10, b"x" * 4096)   # past the disk end
    s = salvage(flip(big, records.HEADER_SIZE), 5, SIZES)
    assert s.unknown and not s.extents
    s = salvage(flip(records.encode(5, 1, 7, 0, b"x"), records.HEADER_SIZE), 5, SIZES)
    assert s.unknown                                    # no disk 7


def test_out_of_sequence_valid_record_is_corruption_with_its_extent() -> None:
    r = recs(9, 1)                                       # valid CRC, seq 9 where 5 expected
    s = salvage(r[0], 5, SIZES)
    assert s.corrupt and not s.unknown and s.extents == [(0, 0, 4096)]


def test_whole_segment_is_corruption_and_markers_are_skipped() -> None:
    marker = records.encode(6, 1, 0, 0, records.GAP_END_PAYLOAD.pack(1, 2),
                            records.FLAG_GAP_END)
    s = salvage(recs(5, 1)[0] + marker, 5, SIZES, whole_segment=True)
    assert s.corrupt and s.extents == [(0, 0, 4096)] and s.records == 2


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 3))
def test_garbage_never_raises(junk: bytes, n: int) -> None:
    s = salvage(b"".join(recs(1, n)) + junk, 1, SIZES)
    assert all(d < 2 and o + ln <= SIZES[d] for d, o, ln in s.extents)


def _journal_with(tmp_path: Path, n: int) -> tuple[Path, list[int]]:
    jdir = tmp_path / "journal"
    j = Journal.open(str(jdir), 1 << 20, 1 << 30)
    starts = []
    for i in range(n):
        starts.append(j._segments[0].size if j._segments else 0)
        j.append(1, i % 2, i * BLOCK, bytes([i + 1]) * 4096)
    j.sync()
    j.close()
    return jdir, starts


def test_journal_open_marks_the_cut_records_before_cutting(tmp_path: Path) -> None:
    jdir, starts = _journal_with(tmp_path, 6)
    seg = next(jdir.glob("*.seg"))
    raw = bytearray(seg.read_bytes())
    raw[starts[3] + records.HEADER_SIZE + 5] ^= 0x40        # record seq 4
    seg.write_bytes(bytes(raw))
    ddir = tmp_path / "dirty"
    repair = CutRepair("p", str(ddir), BLOCK, [("a", 1 << 20), ("b", 1 << 20)])
    j = Journal.open(str(jdir), 1 << 20, 1 << 30, on_cut=repair)
    assert j.last_seq == 3
    j.close()
    a = DirtyBitmap.open(str(ddir / "a.bitmap"), BLOCK, 1 << 20)
    b = DirtyBitmap.open(str(ddir / "b.bitmap"), BLOCK, 1 << 20)
    # seqs 4..6 wrote disk (i % 2) at block i (i = seq - 1)
    assert [x for x in range(16) if a.is_set(x)] == [4]
    assert [x for x in range(16) if b.is_set(x)] == [3, 5]
    state = json.loads((ddir / "state.json").read_text())
    assert state["mode"] == "tracking" and state["settle_seq"] == 0
    assert state["gap"]["reason"] == "corrupt"
    assert "journal corruption at seq 4" in repair.summary()


def test_journal_open_plans_a_digest_sync_when_an_extent_is_unknown(tmp_path: Path) -> None:
    jdir, starts = _journal_with(tmp_path, 4)
    seg = next(jdir.glob("*.seg"))
    raw = bytearray(seg.read_bytes())
    raw[starts[2]] ^= 0x40                                  # magic of seq 3
    seg.write_bytes(bytes(raw))
    ddir = tmp_path / "dirty"
    repair = CutRepair("p", str(ddir), BLOCK, [("a", 1 << 20), ("b", 1 << 20)])
    Journal.open(str(jdir), 1 << 20, 1 << 30, on_cut=repair).close()
    core = load_core(str(ddir))
    assert core.phase == "compare" and core.reason == "corrupt"
    assert "digest resync" in repair.summary()


def test_torn_tail_marks_nothing(tmp_path: Path) -> None:
    jdir, _ = _journal_with(tmp_path, 3)
    seg = next(jdir.glob("*.seg"))
    os.truncate(seg, seg.stat().st_size - 100)
    ddir = tmp_path / "dirty"
    repair = CutRepair("p", str(ddir), BLOCK, [("a", 1 << 20), ("b", 1 << 20)])
    j = Journal.open(str(jdir), 1 << 20, 1 << 30, on_cut=repair)
    assert j.last_seq == 2 and not repair.events and not ddir.exists()
    j.close()


def test_a_failing_hook_cuts_nothing(tmp_path: Path) -> None:
    jdir, starts = _journal_with(tmp_path, 3)
    seg = next(jdir.glob("*.seg"))
    raw = bytearray(seg.read_bytes())
    raw[starts[1] + records.HEADER_SIZE] ^= 1
    seg.write_bytes(bytes(raw))
    size = seg.stat().st_size

    def boom(*_a: object) -> None:
        raise OSError(28, "No space left on device")
    with pytest.raises(Exception, match="No space"):
        Journal.open(str(jdir), 1 << 20, 1 << 30, on_cut=boom)
    assert seg.stat().st_size == size
