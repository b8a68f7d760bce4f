"""Journal: append/read/trim, recovery of torn and corrupt tails, seq
monotonicity across restarts, cap accounting."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdp_common import records
from cdp_common.errors import FormatError, StorageError
from cdp_common.fileio import OsFileIO
from cdp_filter.journal import Journal, JournalGapError, segment_name

pytestmark = pytest.mark.timeout(60)
H = records.HEADER_SIZE


def payload(seq: int, n: int = 100) -> bytes:
    return bytes((seq + i) % 251 for i in range(n))


def fill(j: Journal, count: int, n: int = 100, disk: int = 0) -> list[int]:
    return [j.append(1000 + k, disk, 4096 * k, payload(j.last_seq + 1, n))
            for k in range(count)]


def decoded(data: bytes) -> list[records.Record]:
    return list(records.decode_all(data))


def open_j(path: Path, seg: int = 1 << 20, cap: int = 1 << 30) -> Journal:
    return Journal.open(str(path), seg, cap, policy="p")


def test_append_read_roundtrip(tmp_path: Path) -> None:
    j = open_j(tmp_path)
    assert j.last_seq == 0 and j.size_bytes == 0 and j.read_from(0, 1 << 20) == b""
    seqs = fill(j, 10)
    assert seqs == list(range(1, 11))
    recs = decoded(j.read_from(0, 1 << 20))
    assert [r.seq for r in recs] == seqs
    assert recs[3].data == payload(4) and recs[3].offset == 3 * 4096 and recs[3].time_ns == 1003
    assert [r.seq for r in decoded(j.read_from(7, 1 << 20))] == [8, 9, 10]
    assert j.read_from(10, 1 << 20) == b""
    assert j.size_bytes == 10 * (H + 100)
    assert j.last_time_ns == 1009
    j.close()


def test_read_batch_respects_max_bytes_but_returns_one(tmp_path: Path) -> None:
    j = open_j(tmp_path, seg=3 * (H + 100))  # 3 records per segment
    fill(j, 10)
    assert j.segment_count == 4
    data, last = j.read_batch(0, 2 * (H + 100))
    assert last == 2 and [r.seq for r in decoded(data)] == [1, 2]
    data, last = j.read_batch(0, 10)  # smaller than one record: still one
    assert last == 1 and len(data) == H + 100
    data, last = j.read_batch(2, 5 * (H + 100) + 7)  # across segments
    assert last == 7 and [r.seq for r in decoded(data)] == [3, 4, 5, 6, 7]
    data, last = j.read_batch(0, 1 << 20)
    assert last == 10 and len(decoded(data)) == 10
    j.close()


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=40),
       seg_bytes=st.integers(1, 8000), max_bytes=st.integers(1, 9000),
       after=st.integers(0, 45))
def test_read_batch_matches_model(sizes: list[int], seg_bytes: int, max_bytes: int,
                                  after: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        j = Journal.open(d, seg_bytes, 1 << 30)
        for s in sizes:
            j.append(7, 1, 0, payload(j.last_seq + 1, s))
        data, last = j.read_batch(after, max_bytes)
        recs = decoded(data)
        if after >= len(sizes):
            assert data == b"" and last == after
        else:
            assert [r.seq for r in recs] == list(range(after + 1, last + 1))
            assert len(recs) >= 1
            assert len(recs) == 1 or len(data) <= max_bytes
            # greedy: the next record would not have fit
            if last < len(sizes):
                assert len(data) + H + sizes[last] > max_bytes
            for r in recs:
                assert r.data == payload(r.seq, sizes[r.seq - 1])
        j.close()


def test_restart_recovers_index_and_seq(tmp_path: Path) -> None:
    j = open_j(tmp_path, seg=4 * (H + 100))
    fill(j, 9)
    j.sync()
    j.close()
    j = open_j(tmp_path, seg=4 * (H + 100))
    assert j.last_seq == 9 and j.segment_count == 3 and j.last_time_ns == 1008
    assert [r.seq for r in j.records_after(0)] == list(range(1, 10))
    assert j.append(5, 0, 0, b"x") == 10
    j.close()


def last_segment(path: Path) -> Path:
    return sorted(path.glob("*.seg"))[-1]


def closed_segment(path: Path, count: int, n: int) -> tuple[Path, bytes]:
    """A closed journal at `path` holding `count` records of `n`-byte payloads:
    its last segment and that segment's bytes."""
    j = open_j(path)
    fill(j, count, n=n)
    j.close()
    seg = last_segment(path)
    return seg, seg.read_bytes()


@contextlib.contextmanager
def reopened_with(path: Path, seg: Path, damaged: bytes, full: bytes) -> Iterator[Journal]:
    """The journal at `path` opened with `seg` holding `damaged`; afterwards the
    journal is closed and `seg` gets its `full` bytes back for the next case."""
    seg.write_bytes(damaged)
    j = open_j(path)
    try:
        yield j
    finally:
        j.close()
        seg.write_bytes(full)


def test_torn_tail_cut_at_every_byte(tmp_path: Path) -> None:
    seg, full = closed_segment(tmp_path, 3, n=20)
    rec_len = H + 20
    keep = 2 * rec_len
    for cut in range(keep, len(full)):
        with reopened_with(tmp_path, seg, full[:cut], full) as j:
            assert j.last_seq == 2, cut
            assert [r.seq for r in decoded(j.read_from(0, 1 << 20))] == [1, 2]
            assert seg.stat().st_size == keep  # the torn tail was truncated
            assert j.append(9, 0, 0, b"new") == 3


def test_flipped_byte_cuts_tail_from_that_record(tmp_path: Path) -> None:
    seg, full = closed_segment(tmp_path, 5, n=50)
    rec_len = H + 50
    for pos in range(0, len(full), 7):
        bad = bytearray(full)
        bad[pos] ^= 0x40
        with reopened_with(tmp_path, seg, bytes(bad), full) as j:
            valid = pos // rec_len
            assert j.last_seq == valid, pos
            assert len(decoded(j.read_from(0, 1 << 20))) == valid
            assert seg.exists() == (valid > 0)


def test_corrupt_middle_segment_drops_later_segments(tmp_path: Path) -> None:
    j = open_j(tmp_path, seg=2 * (H + 10))
    fill(j, 6, n=10)
    j.close()
    segs = sorted(tmp_path.glob("*.seg"))
    assert len(segs) == 3
    data = bytearray(segs[1].read_bytes())
    data[H + 12] ^= 1  # data byte of seq 4
    segs[1].write_bytes(data)
    j = open_j(tmp_path, seg=2 * (H + 10))
    assert j.last_seq == 3 and not segs[2].exists()
    assert [r.seq for r in j.records_after(0)] == [1, 2, 3]
    assert j.append(0, 0, 0, b"z") == 4
    j.close()


def test_trim_deletes_whole_segments_and_persists(tmp_path: Path) -> None:
    calls: list[int] = []
    j = Journal.open(str(tmp_path), 3 * (H + 100), 1 << 30,
                     before_delete=lambda: calls.append(1))
    fill(j, 10)
    assert not j.would_delete(2)
    assert j.trim_through(2) == 0 and calls == [] and j.segment_count == 4
    assert j.would_delete(3)
    assert j.trim_through(4) == 1 and calls == [1]
    assert j.oldest_seq == 4 and j.segment_count == 3
    assert j.size_bytes == 7 * (H + 100)
    with pytest.raises(JournalGapError):
        j.read_from(2, 1 << 20)
    assert [r.seq for r in decoded(j.read_from(3, 1 << 20))] == list(range(4, 11))
    assert json.loads((tmp_path / "state").read_text())["trimmed_through"] == 4
    assert not (tmp_path / segment_name(1)).exists()
    j.close()


def test_seq_monotonic_after_full_trim_and_restart(tmp_path: Path) -> None:
    j = open_j(tmp_path, seg=2 * (H + 100))
    fill(j, 5)
    assert j.trim_through(99) == 3  # clamps to last_seq, deletes everything
    assert j.segment_count == 0 and j.size_bytes == 0 and j.trimmed_through == 5
    j.close()
    j = open_j(tmp_path, seg=2 * (H + 100))
    assert j.last_seq == 5 and j.oldest_seq == 6 and list(j.records_after(0)) == []
    assert j.append(1, 0, 0, b"a") == 6
    assert (tmp_path / segment_name(6)).exists()
    j.close()


def test_segment_left_after_crash_between_state_and_unlink(tmp_path: Path) -> None:
    j = open_j(tmp_path, seg=2 * (H + 100))
    fill(j, 4)
    j.close()
    (tmp_path / "state").write_text(json.dumps({"version": 1, "trimmed_through": 2}))
    j = open_j(tmp_path, seg=2 * (H + 100))
    assert j.oldest_seq == 3 and j.last_seq == 4
    assert not (tmp_path / segment_name(1)).exists()
    j.close()


def test_advance_to_skips_seqs_the_target_has(tmp_path: Path) -> None:
    j = open_j(tmp_path)
    fill(j, 3)
    j.advance_to(50)
    assert j.last_seq == 50 and j.segment_count == 0
    assert j.append(0, 0, 0, b"q") == 51
    j.close()
    j = open_j(tmp_path)
    assert j.last_seq == 51
    j.close()


def test_cap_accounting(tmp_path: Path) -> None:
    rec = H + 1000
    j = Journal.open(str(tmp_path), 2 * rec, 5 * rec)
    for _ in range(4):
        j.append(0, 0, 0, payload(0, 1000))
    assert not j.over_cap and j.size_bytes == 4 * rec
    j.append(0, 0, 0, payload(0, 1000))
    assert j.over_cap
    j.trim_through(2)
    assert not j.over_cap and j.size_bytes == 3 * rec
    j.close()
    j = Journal.open(str(tmp_path), 2 * rec, 5 * rec)
    assert j.size_bytes == 3 * rec
    j.close()


async def test_sync_async_and_sync(tmp_path: Path) -> None:
    j = open_j(tmp_path, seg=2 * (H + 100))
    fill(j, 5)
    await j.sync_async()
    await j.sync_async()  # nothing new: returns at once
    fill(j, 1)
    j.sync()
    j.close()


def test_append_failure_leaves_no_trace(tmp_path: Path) -> None:
    j = open_j(tmp_path)
    fill(j, 2)
    seg = j._segments[-1]
    real = seg.fd
    seg.fd = os.open(os.devnull, os.O_RDONLY)  # writes fail with EBADF
    with pytest.raises(Exception, match="append failed"):
        j.append(0, 0, 0, b"boom")
    os.close(seg.fd)
    seg.fd = real
    assert j.last_seq == 2
    assert j.append(0, 0, 0, b"ok") == 3
    assert [r.data for r in j.records_after(2)] == [b"ok"]
    j.close()


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"version": 1}',
                                  '{"version": 1, "trimmed_through": -3}',
                                  '{"version": 1, "trimmed_through": "7"}',
                                  '{"kind": "journal", "version": 99, "trimmed_through": 1}',
                                  '{"kind": "resync", "version": 1, "trimmed_through": 1}'])
def test_corrupt_state_file_raises_format_error(tmp_path: Path, text: str) -> None:
    j = open_j(tmp_path)
    fill(j, 2)
    j.close()
    (tmp_path / "state").write_text(text)
    with pytest.raises(FormatError, match="state"):
        open_j(tmp_path)


def test_state_file_is_versioned_json(tmp_path: Path) -> None:
    j = open_j(tmp_path, seg=2 * (H + 100))
    fill(j, 4)
    j.trim_through(2)
    j.close()
    doc = json.loads((tmp_path / "state").read_text())
    assert doc == {"kind": "journal", "version": 1, "trimmed_through": 2}


def test_leftover_trimmed_segments_before_an_advance_are_not_corruption(tmp_path: Path) -> None:
    """A power cut can undo the unlink of trimmed segments (no directory fsync
    after it); with the seq counter advanced past a jump, the segment after
    them starts at trimmed_through + 1, not after their last seq."""
    j = open_j(tmp_path, seg=2 * (H + 100))
    fill(j, 3)
    j.sync()
    left = {p.name: p.read_bytes() for p in tmp_path.glob("*.seg")}
    j.advance_to(10)
    assert j.append(5, 0, 0, b"after") == 11
    j.sync()
    j.close()
    for name, data in left.items():  # the unlinks did not survive
        (tmp_path / name).write_bytes(data)
    cuts: list[int] = []
    j = Journal.open(str(tmp_path), 2 * (H + 100), 1 << 30,
                     on_cut=lambda _d, seq, _w: cuts.append(seq))
    assert cuts == [] and [r.data for r in j.records_after(0)] == [b"after"]
    assert j.last_seq == 11 and sorted(p.name for p in tmp_path.glob("*.seg")) == \
        [segment_name(11)]
    j.close()


class FsyncFailsOnce(OsFileIO):
    """The real file calls, except that the first fsync of a segment fails with EIO."""

    def __init__(self) -> None:
        self.failed = False

    def fsync(self, fd: int) -> None:
        if not self.failed:
            self.failed = True
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        super().fsync(fd)


async def test_an_fsync_failure_is_not_forgotten(tmp_path: Path) -> None:
    """After a failed fsync the kernel may drop the dirty pages and call the next fsync a
    success: no later sync may report the records durable, until a reopen checks them."""
    io = FsyncFailsOnce()
    j = Journal.open(str(tmp_path / "j"), 1 << 20, 1 << 30, policy="p", io=io)
    fill(j, 3)
    with pytest.raises(StorageError, match="fsync failed"):
        j.sync()
    assert io.failed
    fill(j, 1)
    with pytest.raises(StorageError, match="fsync failed"):
        j.sync()                       # fsync would succeed now: still refused
    with pytest.raises(StorageError, match="fsync failed"):
        await j.sync_async()
    j.close()
    again = open_j(tmp_path / "j")     # a reopen checks what is on disk and goes on
    assert again.last_seq == 4
    again.sync()
    again.close()


def test_a_failed_fsync_is_the_policys_reported_error(tmp_path: Path) -> None:
    """The sticky fsync failure is visible: the filter's heartbeat PolicyReport.error
    says the journal failed its fsync and needs a restart (so `cdpctl health` is not
    OK), and stays so while later syncs would succeed."""
    from cdp_filter.policy import PolicyRuntime

    io = FsyncFailsOnce()
    j = Journal.open(str(tmp_path / "j"), 1 << 20, 1 << 30, policy="p", io=io)
    rt = PolicyRuntime("p", j, [])
    fill(j, 2)
    assert j.sync_failure == "" and rt.report().error == ""
    with pytest.raises(StorageError, match="fsync failed"):
        j.sync()
    fill(j, 1)
    with contextlib.suppress(StorageError):
        j.sync()
    report = rt.report()
    assert "fsync failed" in report.error and "restart the filter" in report.error
    assert report.error == j.sync_failure
    rt.error = "some later, lesser error"
    assert "fsync failed" in rt.report().error
    j.close()
    again = open_j(tmp_path / "j")          # the restart clears it
    assert again.sync_failure == "" and PolicyRuntime("p", again, []).report().error == ""
    again.close()
