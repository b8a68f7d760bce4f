"""Dirty-block bitmap persistence, the overflow state machine, the cutter's gap
handling and the target's gap book (pure cores, no daemons)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdp_common.errors import ProtocolError
from cdp_common.fileio_sim import SimIO, SimulatedCrash
from cdp_common.records import FLAG_GAP_END, GAP_END_PAYLOAD, Record
from cdp_filter.dirty import DirtyBitmap
from cdp_filter.overflow import Action, Event, Mode, OverflowMachine
from cdp_proxy.cutter import IntervalCutter
from cdp_target.gaps import GapBook

KB = 1024


def test_bitmap_marks_persist_without_sync_and_convert_on_block_change(tmp_path: Path) -> None:
    path = str(tmp_path / "d.bitmap")
    bm = DirtyBitmap.open(path, 64 * KB, 10 * 64 * KB + 4096)
    assert bm.blocks == 11
    assert bm.mark(64 * KB - 1, 2) == 2  # straddles blocks 0 and 1
    assert bm.mark(10 * 64 * KB, 4096) == 1
    assert bm.mark(0, 1) == 0
    bm.close()  # no sync: a kill -9 keeps what pwrite wrote
    again = DirtyBitmap.open(path, 64 * KB, 10 * 64 * KB + 4096)
    assert again.count == 3 and [again.next_set(0), again.next_set(2)] == [0, 10]
    assert again.clear(0) and not again.clear(0) and again.next_set(0) == 1
    again.close()
    finer = DirtyBitmap.open(path, 32 * KB, 10 * 64 * KB + 4096)
    assert finer.count == 3  # block 1 -> 2 and 3; block 10 (4 KiB long) -> 20
    assert finer.next_set(0) == 2 and finer.next_set(4) == 20
    finer.clear_all()
    assert finer.count == 0 and finer.next_set(0) == -1
    finer.close()


def test_bitmap_refuses_a_corrupt_header(tmp_path: Path) -> None:
    path = tmp_path / "d.bitmap"
    DirtyBitmap.open(str(path), 64 * KB, 1 << 20).close()
    raw = bytearray(path.read_bytes())
    raw[0] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(Exception, match="bad header"):
        DirtyBitmap.open(str(path), 64 * KB, 1 << 20)


def test_bitmap_power_loss_keeps_synced_marks_and_creation_is_atomic(tmp_path: Path) -> None:
    """Through the FileIO seam: a power cut keeps every mark made before sync(); a cut
    at any step of the creation leaves either no bitmap or an empty one, never a torn
    file that refuses to open."""
    path = str(tmp_path / "d.bitmap")
    io = SimIO([tmp_path])
    bm = DirtyBitmap.open(path, 64 * KB, 1 << 20, io=io)
    bm.mark(0, 4096)
    bm.mark(5 * 64 * KB, 1)
    bm.sync()
    bm.mark(9 * 64 * KB, 1)            # not synced: may be lost, nothing else may
    bm.close()
    io.power_cut()
    again = DirtyBitmap.open(path, 64 * KB, 1 << 20)
    assert again.is_set(0) and again.is_set(5)
    again.close()
    clean = SimIO([tmp_path / "dry"])
    DirtyBitmap.open(str(tmp_path / "dry" / "d.bitmap"), 64 * KB, 1 << 20, io=clean).close()
    assert [s.split()[0] for s in clean.steps][:3] == ["open", "allocate", "pwrite"]
    for n in range(len(clean.steps)):
        run = tmp_path / f"cut{n}"
        io = SimIO([run], crash_at=n)
        with pytest.raises(SimulatedCrash):
            DirtyBitmap.open(str(run / "d.bitmap"), 64 * KB, 1 << 20, io=io).close()
        io.close_all()
        io.power_cut()
        reopened = DirtyBitmap.open(str(run / "d.bitmap"), 64 * KB, 1 << 20)
        assert reopened.count == 0 and reopened.blocks == 16
        reopened.close()


def test_bitmap_grows_in_place_and_a_power_cut_never_unmarks(tmp_path: Path) -> None:
    """grow(): bits for the new blocks, the old marks kept; a power cut at each of its
    steps leaves a bitmap that opens at either size with every synced mark."""
    def prepare(root: Path) -> tuple[SimIO, DirtyBitmap]:
        io = SimIO([root])
        bm = DirtyBitmap.open(str(root / "d.bitmap"), 64 * KB, 1 << 20, io=io)
        bm.mark(0, 1)
        bm.mark(15 * 64 * KB, 1)
        bm.sync()
        return io, bm

    io, bm = prepare(tmp_path / "dry")
    start = len(io.steps)
    bm.grow(3 << 20)
    steps = len(io.steps) - start
    assert steps == 3, io.steps[start:]
    assert bm.blocks == 48 and bm.is_set(0) and bm.is_set(15) and not bm.is_set(40)
    bm.mark(40 * 64 * KB, 1)
    assert bm.is_set(40) and bm.count == 3
    bm.close()
    again = DirtyBitmap.open(str(tmp_path / "dry" / "d.bitmap"), 64 * KB, 3 << 20)
    assert again.blocks == 48 and again.is_set(15) and again.is_set(40)
    again.close()
    for n in range(steps):
        root = tmp_path / f"cut{n}"
        io, bm = prepare(root)
        io.crash_at = len(io.steps) + n
        with pytest.raises(SimulatedCrash):
            bm.grow(3 << 20)
        io.power_cut()
        for size in (1 << 20, 3 << 20):   # the start after the cut opens it at either
            reopened = DirtyBitmap.open(str(root / "d.bitmap"), 64 * KB, size)
            assert reopened.is_set(0) and reopened.is_set(15) and reopened.count == 2
            reopened.close()


def test_machine_transitions_and_ack_clearing() -> None:
    m = OverflowMachine()
    assert m.handle(Event.LINK_READY) is Action.NONE and m.mode is Mode.JOURNALING
    m.open_gap(100, lost_after_seq=10, lost_through_seq=20)
    assert m.handle(Event.OVERFLOW) is Action.DROP and m.mode is Mode.TRACKING
    assert m.handle(Event.OVERFLOW) is Action.NONE
    assert m.hole_ok(10, 21) and m.hole_ok(15, 21) and not m.hole_ok(9, 21)
    assert not m.hole_ok(10, 30)  # a hole past what was dropped is real loss
    assert m.handle(Event.LINK_READY) is Action.SCAN and m.mode is Mode.RESYNCING
    m.sent(0, 5, 22, 65536)
    m.sent(0, 6, 23, 65536)
    m.sent(0, 7, 24, 65536)
    m.written(0, range(6, 7))  # untracked write after the record: block 6 stays dirty
    assert m.acked(23) == [(0, 5)]
    assert m.acked(24) == [(0, 7)]
    assert m.handle(Event.SCAN_DONE) is Action.GAP_END and m.gap is None
    assert m.mode is Mode.JOURNALING
    assert m.hole_ok(12, 21)  # the target may see the hole after the gap closed here


def rec(seq: int, data: bytes = b"x", offset: int = 0, flags: int = 0) -> Record:
    return Record(seq, 1000 + seq, 0, offset, data, flags)


def test_cutter_accepts_an_announced_jump_and_carries_gap_bounds() -> None:
    c = IntervalCutter(2.0, 1 << 20, start_after_seq=10, disk_sizes={0: 1 << 20})
    with pytest.raises(ProtocolError):
        c.feed(rec(15), 0.0)
    c.note_gap(555, 10)
    assert c.feed(rec(15, b"a"), 0.0, skip_ok=True) is None
    c.feed(rec(16, b"b", 1), 0.0)
    d = c.feed(rec(17, GAP_END_PAYLOAD.pack(555, 10), flags=FLAG_GAP_END), 0.0)
    assert d is not None and c.cut() is None  # a GAP_END marker closes its interval
    assert (d.first_seq, d.last_seq) == (11, 17)
    assert (d.gap_begin_time_ns, d.gap_after_seq, d.gap_end_seq) == (555, 10, 17)
    assert [(e.offset, bytes(e.data or b"")) for e in d.extents] == [(0, b"ab")]


def test_gap_book_opens_closes_and_is_idempotent(tmp_path: Path) -> None:
    book = GapBook(tmp_path)
    assert book.note(11, 20, 555, 10, 0, 0)
    assert book.open_gap is not None and book.inconsistent(15) and not book.inconsistent(10)
    assert book.note(21, 30, 555, 10, 25, 999)
    assert not book.note(21, 30, 555, 10, 25, 999)  # a resent delta changes nothing
    assert not book.inconsistent(25) and book.inconsistent(24)
    book.save()
    again = GapBook.load(tmp_path)
    assert [(g.begin_seq, g.end_seq, g.begin_time_ns, g.end_time_ns) for g in again.gaps] == [
        (11, 25, 555, 999)]


def test_gap_book_keeps_the_reason_the_filter_gave(tmp_path: Path) -> None:
    book = GapBook(tmp_path)
    assert book.note(11, 20, 555, 10, 0, 0, "operator")
    assert book.note(21, 30, 555, 10, 25, 999, "operator")
    assert book.note(31, 40, 777, 30, 0, 0)   # an older filter says nothing: an overflow
    book.save()
    assert [g.reason for g in GapBook.load(tmp_path).gaps] == ["operator", "overflow"]
