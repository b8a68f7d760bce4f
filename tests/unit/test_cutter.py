"""Interval cutter + coalescer against a brute-force oracle."""

from __future__ import annotations

import itertools
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdp_common.delta import Extent
from cdp_common.errors import FormatError, ProtocolError
from cdp_common.records import Record
from cdp_proxy.cutter import BLOCK, Delta, ExtentMap, IntervalCutter, split_zero_blocks

DISK = 64 * 1024


def apply_extents(disks: dict[int, bytearray], extents: list[Extent]) -> None:
    for e in extents:
        disks[e.disk_id][e.offset:e.offset + e.length] = (
            bytes(e.length) if e.data is None else e.data)


def check_shape(delta: Delta) -> None:
    """Sorted, non-overlapping, zero extents aligned, no aligned zero block left as data."""
    prev: tuple[int, int] | None = None
    for e in delta.extents:
        assert e.length > 0
        if prev is not None and prev[0] == e.disk_id:
            assert e.offset >= prev[1]
        else:
            assert prev is None or e.disk_id > prev[0]
        prev = (e.disk_id, e.offset + e.length)
        if e.data is None:
            assert e.offset % BLOCK == 0 and e.length % BLOCK == 0
        else:
            assert len(e.data) == e.length
            first = e.offset + (-e.offset) % BLOCK
            for b in range(first, e.offset + e.length - BLOCK + 1, BLOCK):
                rel = b - e.offset
                assert bytes(e.data[rel:rel + BLOCK]) != bytes(BLOCK), "zero block sent as data"


data_st = st.one_of(
    st.binary(min_size=1, max_size=3 * BLOCK),
    st.builds(lambda n, b: bytes([b]) * n, st.integers(1, 3 * BLOCK), st.sampled_from([0, 0, 7])),
)
write_st = st.tuples(st.integers(0, 1), st.integers(0, DISK // 512 - 1).map(lambda x: x * 512)
                     | st.integers(0, DISK - 1), data_st)
# (disk, offset, data, seconds elapsed before this record)
step_st = st.tuples(write_st, st.sampled_from([0.0, 0.0, 0.0, 0.3, 1.5]))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(step_st, max_size=60), max_bytes=st.integers(1, 40000),
       ticks=st.booleans(), start=st.integers(0, 5))
def test_matches_oracle(steps: list, max_bytes: int, ticks: bool, start: int) -> None:
    base = {0: bytearray(os.urandom(DISK)), 1: bytearray(DISK)}
    oracle = {d: bytearray(b) for d, b in base.items()}
    replica = {d: bytearray(b) for d, b in base.items()}
    cutter = IntervalCutter(1.0, max_bytes, start_after_seq=start,
                            disk_sizes={0: DISK, 1: DISK})
    now = 0.0
    seq = start
    expected_first = start + 1
    # oracle state after each seq, to check that every delta ends on a prefix
    deltas: list[Delta] = []

    def take(delta: Delta | None) -> None:
        nonlocal expected_first
        if delta is None:
            return
        assert delta.first_seq == expected_first
        assert delta.last_seq >= delta.first_seq
        assert delta.last_seq == seq  # a cut always happens right after the last fed record
        expected_first = delta.last_seq + 1
        check_shape(delta)
        apply_extents(replica, delta.extents)
        assert replica == oracle
        deltas.append(delta)

    for (disk, offset, data), dt in steps:
        now += dt
        if ticks:
            take(cutter.tick(now))
        data = data[:DISK - offset]
        seq += 1
        oracle[disk][offset:offset + len(data)] = data
        take(cutter.feed(Record(seq, 1000 + seq, disk, offset, data), now))
    take(cutter.cut())
    assert cutter.cut() is None
    assert replica == oracle
    assert sum(d.record_count for d in deltas) == len(steps)


def test_seq_boundaries_and_newest_time() -> None:
    c = IntervalCutter(2.0, 1 << 30, start_after_seq=10)
    assert c.feed(Record(11, 500, 0, 0, b"a"), 0.0) is None
    assert c.feed(Record(12, 700, 0, 1, b"b"), 0.5) is None
    assert c.feed(Record(13, 600, 0, 2, b"c"), 1.0) is None
    d = c.feed(Record(14, 650, 0, 3, b"d"), 2.0)
    assert d is not None
    assert (d.first_seq, d.last_seq, d.newest_time_ns, d.record_count) == (11, 14, 700, 4)
    assert d.extents == [Extent(0, 0, 4, b"abcd")]
    assert c.feed(Record(15, 800, 0, 0, b"x"), 2.1) is None
    d2 = c.cut()
    assert d2 is not None and (d2.first_seq, d2.last_seq) == (15, 15)


def test_gap_raises() -> None:
    c = IntervalCutter(2.0, 1 << 20, start_after_seq=5)
    with pytest.raises(ProtocolError):
        c.feed(Record(7, 0, 0, 0, b"x"), 0.0)
    c.feed(Record(6, 0, 0, 0, b"x"), 0.0)
    with pytest.raises(ProtocolError):
        c.feed(Record(6, 0, 0, 0, b"x"), 0.0)


def test_out_of_bounds_record() -> None:
    c = IntervalCutter(2.0, 1 << 20, disk_sizes={0: 8192})
    with pytest.raises(FormatError):
        c.feed(Record(1, 0, 0, 8000, b"x" * 200), 0.0)
    with pytest.raises(FormatError):
        c.feed(Record(1, 0, 3, 0, b"x"), 0.0)


def test_size_cap() -> None:
    c = IntervalCutter(100.0, 10000)
    out = []
    for i in range(1, 11):
        d = c.feed(Record(i, i, 0, i * 4096, b"\1" * 3000), 0.0)
        if d:
            out.append(d)
    # 3000 * 4 = 12000 >= 10000: cut after every 4th record
    assert [(d.first_seq, d.last_seq) for d in out] == [(1, 4), (5, 8)]
    assert all(d.record_bytes == 12000 for d in out)
    assert c.pending_bytes == 6000 and c.pending_records == 2


def test_tick_cuts_idle_interval() -> None:
    c = IntervalCutter(2.0, 1 << 20)
    assert c.tick(100.0) is None  # nothing fed: nothing to emit
    c.feed(Record(1, 1, 0, 0, b"x"), 10.0)
    assert c.tick(11.9) is None
    d = c.tick(12.0)
    assert d is not None and (d.first_seq, d.last_seq) == (1, 1)
    assert c.tick(20.0) is None
    # the next interval starts at its first record, not at the previous cut
    c.feed(Record(2, 1, 0, 0, b"y"), 30.0)
    assert c.tick(31.0) is None
    assert c.tick(32.0) is not None


def test_sequential_writes_coalesce_into_one_extent() -> None:
    m = ExtentMap()
    for i in range(100):
        m.write(i * 512, b"\1" * 512)
    assert m.starts == [0] and m.ends == [51200]
    m.write(100, b"\2" * 10)  # inside: overwritten in place
    assert len(m) == 1 and m.bufs[0][100:110] == b"\2" * 10
    # reverse-order writes stay separate but never overlap
    for i in range(10, 0, -1):
        m.write(100000 + i * 100, b"\3" * 150)
    for a, b in zip(m.ends, m.starts[1:], strict=False):
        assert a <= b


def test_zero_blocks() -> None:
    buf = bytearray(b"\1" * 100 + bytes(3 * BLOCK) + b"\2" * 10)
    # extent starts at disk offset BLOCK - 100: zeros cover [BLOCK, 4 BLOCK) exactly
    out = split_zero_blocks(0, BLOCK - 100, buf)
    assert [(e.offset, e.length, e.data is None) for e in out] == [
        (BLOCK - 100, 100, False), (BLOCK, 3 * BLOCK, True), (4 * BLOCK, 10, False)]
    # unaligned zero run: stays data
    out = split_zero_blocks(0, 1, bytearray(2 * BLOCK + 10))
    assert [(e.offset, e.length, e.data is None) for e in out] == [
        (1, BLOCK - 1, False), (BLOCK, BLOCK, True), (2 * BLOCK, 11, False)]
    out = split_zero_blocks(0, 1, bytearray(BLOCK))
    assert [e.data is None for e in out] == [False]
    # a big zero run (256 KiB steps) + trailing block
    out = split_zero_blocks(1, 0, bytearray(70 * BLOCK) + b"\1")
    assert [(e.offset, e.length, e.data is None) for e in out] == [
        (0, 70 * BLOCK, True), (70 * BLOCK, 1, False)]


def test_all_zero_write_becomes_zero_extent() -> None:
    c = IntervalCutter(1.0, 1 << 20)
    c.feed(Record(1, 1, 0, 0, os.urandom(2 * BLOCK)), 0.0)
    c.feed(Record(2, 2, 0, 0, bytes(2 * BLOCK)), 0.0)
    d = c.cut()
    assert d is not None
    assert d.extents == [Extent(0, 0, 2 * BLOCK, None)]
    assert d.encoded_bytes == 16


def test_backlog_is_cut_by_capture_time() -> None:
    """Records captured over 10 s but arriving at once (a backlog after an outage)
    still give restore points rpo_interval_s apart in capture time."""
    cutter = IntervalCutter(2.0, 1 << 30)
    deltas = []
    for i in range(1, 41):  # one write every 0.25 s of capture time
        r = Record(seq=i, time_ns=i * 250_000_000, disk_id=0, offset=i * 4096, data=b"x" * 4096)
        d = cutter.feed(r, now=100.0)
        if d is not None:
            deltas.append(d)
    last = cutter.cut()
    assert last is not None
    deltas.append(last)
    # exact, gap-free seq ranges
    assert deltas[0].first_seq == 1 and deltas[-1].last_seq == 40
    assert all(a.last_seq + 1 == b.first_seq for a, b in itertools.pairwise(deltas))
    # each closed interval spans less than 2 s of capture time: 8 writes of 0.25 s
    assert [d.last_seq - d.first_seq + 1 for d in deltas] == [8, 8, 8, 8, 8]
