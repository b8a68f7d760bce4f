"""Undo math (pure) against an oracle of prefix images, with Hypothesis.

The oracle keeps the images after every delta; capture + replay (newest
first) of the undo segments above point j must give exactly the images
after delta j, also after any oldest-wins merge of adjacent segments.
"""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdp_common.delta import Extent
from cdp_target import undo
from cdp_target.undo import Coverage

pytestmark = pytest.mark.timeout(120)

SIZES = {0: 8192, 1: 4096}

extent_st = st.builds(
    lambda disk, off, length, zero, seed: _ext(disk, off, length, zero, seed),
    st.sampled_from([0, 1]), st.integers(0, 8191), st.integers(1, 3000), st.booleans(),
    st.integers(0, 1 << 30))


def _ext(disk: int, off: int, length: int, zero: bool, seed: int) -> Extent:
    off = off % SIZES[disk]
    length = min(length, SIZES[disk] - off)
    if zero:
        return Extent(disk, off, length, None)
    return Extent(disk, off, length, random.Random(seed).randbytes(length))


def coalesce(extents: list[Extent]) -> list[Extent]:
    """Make a delta like the source proxy does: non-overlapping, later writes win."""
    images = {d: bytearray(n) for d, n in SIZES.items()}
    written = {d: bytearray(n) for d, n in SIZES.items()}   # 1 = data, 2 = zero
    for e in extents:
        undo.apply_to(images, [e])
        written[e.disk_id][e.offset:e.offset + e.length] = bytes(
            [2 if e.data is None else 1]) * e.length
    out = []
    for d in SIZES:
        pos = 0
        w = written[d]
        while pos < len(w):
            if not w[pos]:
                pos += 1
                continue
            kind, end = w[pos], pos
            while end < len(w) and w[end] == kind:
                end += 1
            out.append(Extent(d, pos, end - pos, None if kind == 2 else bytes(images[d][pos:end])))
            pos = end
    return out


def reader(images: dict[int, bytearray]) -> undo.ReadFn:
    return lambda d, off, n: bytes(images[d][off:off + n])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(extent_st, min_size=0, max_size=5), min_size=1, max_size=8),
       st.data())
def test_replay_and_merge_match_the_prefix_oracle(deltas: list[list[Extent]],
                                                  data: st.DataObject) -> None:
    images = {d: bytearray(n) for d, n in SIZES.items()}
    prefixes = [{d: bytes(i) for d, i in images.items()}]
    segments: list[list[Extent]] = []
    for raw in deltas:
        delta = coalesce(raw)
        segments.append(list(undo.capture(delta, reader(images))))
        undo.apply_to(images, delta)
        prefixes.append({d: bytes(i) for d, i in images.items()})
    n = len(segments)
    # every point j: replica + segments j+1..n newest first
    for j in range(n + 1):
        got = undo.restore_in_memory(images, reversed(segments[j:]))
        assert {d: bytes(i) for d, i in got.items()} == prefixes[j], j
    # merge a random run [a, b) of segments, oldest wins: points a and b stay exact
    a = data.draw(st.integers(0, n - 1))
    b = data.draw(st.integers(a + 1, n))
    merged = list(undo.merge_oldest_wins(segments[a:b]))
    chain = [*segments[:a], merged, *segments[b:]]
    for j, k in ((a, a), (b, a + 1)):
        got = undo.restore_in_memory(images, reversed(chain[k:]))
        assert {d: bytes(i) for d, i in got.items()} == prefixes[j]
    # a merge stores each byte at most once
    cov = Coverage()
    for e in merged:
        assert cov.uncovered(e.disk_id, e.offset, e.offset + e.length) == [
            (e.offset, e.offset + e.length)]
        cov.add(e.disk_id, e.offset, e.offset + e.length)


def test_merge_keeps_the_oldest_bytes() -> None:
    old = [Extent(0, 0, 4, b"AAAA")]
    new = [Extent(0, 2, 4, b"BBBB"), Extent(0, 10, 2, None)]
    assert list(undo.merge_oldest_wins([old, new])) == [
        Extent(0, 0, 4, b"AAAA"), Extent(0, 4, 2, b"BB"), Extent(0, 10, 2, None)]


@given(st.lists(st.tuples(st.integers(0, 200), st.integers(1, 50)), max_size=30),
       st.integers(0, 250), st.integers(1, 60))
def test_coverage_against_a_bitmap(adds: list[tuple[int, int]], q: int, qn: int) -> None:
    cov, bits = Coverage(), bytearray(400)
    for s, n in adds:
        cov.add(0, s, s + n)
        bits[s:s + n] = b"\x01" * n
    pieces = cov.uncovered(0, q, q + qn)
    expect = [i for i in range(q, q + qn) if not bits[i]]
    assert [i for a, b in pieces for i in range(a, b)] == expect
    assert cov.total() == sum(bits)


def test_capture_splits_and_marks_zeros() -> None:
    images = {0: bytearray(3 << 20)}
    images[0][(1 << 20) + 5] = 7
    got = list(undo.capture([Extent(0, 0, 3 << 20, b"x" * (3 << 20))], reader(images)))
    assert [(e.offset, e.length, e.data is None) for e in got] == [
        (0, 1 << 20, True), (1 << 20, 1 << 20, False), (2 << 20, 1 << 20, True)]


def _refs(segments: list[list[Extent]]) -> tuple[list[list[undo.Ref]], list[bytes]]:
    """Segments by reference: each segment's data laid out in one buffer ("file")."""
    refs, files = [], []
    for seg in segments:
        buf = bytearray(b"header")   # data never starts at 0 in a real file either
        out = []
        for e in seg:
            if e.data is None:
                out.append(undo.Ref(e.disk_id, e.offset, e.length, -1))
            else:
                out.append(undo.Ref(e.disk_id, e.offset, e.length, len(buf)))
                buf += e.data
        refs.append(out)
        files.append(bytes(buf))
    return refs, files


def _check_map(pieces: dict[int, list[undo.Piece]]) -> None:
    for ps in pieces.values():
        for a, b in itertools.pairwise(ps):
            assert a.end <= b.offset, (a, b)
        assert all(p.length > 0 and (p.seg < 0) == (p.src < 0) for p in ps)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(extent_st, min_size=0, max_size=6), min_size=1, max_size=8),
       st.booleans())
def test_resolved_map_matches_the_prefix_oracle(deltas: list[list[Extent]],
                                                coalesced: bool) -> None:
    """resolve + apply_resolved == replay newest first == the oracle, for every point.

    Uncoalesced deltas (overlapping extents inside one segment) check that the
    resolution keeps a replay's order inside a segment too.
    """
    images = {d: bytearray(n) for d, n in SIZES.items()}
    prefixes = [{d: bytes(i) for d, i in images.items()}]
    segments: list[list[Extent]] = []
    for raw in deltas:
        delta = coalesce(raw) if coalesced else raw
        segments.append(list(undo.capture(delta, reader(images))))
        undo.apply_to(images, delta)
        if coalesced:
            prefixes.append({d: bytes(i) for d, i in images.items()})
    refs, files = _refs(segments)
    n = len(segments)
    for j in range(n + 1):
        pieces = undo.resolve(refs[j:])
        _check_map(pieces)
        got = undo.apply_resolved(images, pieces,
                                  lambda seg, src, ln, j=j: files[j + seg][src:src + ln])
        want = undo.restore_in_memory(images, reversed(segments[j:]))
        assert got == want, j
        if coalesced:
            assert {d: bytes(i) for d, i in got.items()} == prefixes[j], j
        # the pieces and the gaps between them tile each disk exactly
        for d, size in SIZES.items():
            ps = pieces.get(d, [])
            covered = sum(p.length for p in ps)
            assert covered + sum(ln for _, ln in undo.gaps(ps, size)) == size


def test_resolve_earliest_segment_wins_and_joins_pieces() -> None:
    older = [undo.Ref(0, 10, 10, 100)]                               # [10, 20) from file 0 @100
    newer = [undo.Ref(0, 0, 15, 200), undo.Ref(0, 30, 5, -1), undo.Ref(0, 35, 5, -1)]
    assert undo.resolve([older, newer]) == {0: [
        undo.Piece(0, 10, 1, 200), undo.Piece(10, 10, 0, 100), undo.Piece(30, 10, -1, -1)]}
    assert undo.gaps(undo.resolve([older, newer])[0], 50) == [(20, 10), (40, 10)]
    # inside one segment the later extent wins, as a replay in file order would
    assert undo.resolve([[undo.Ref(1, 0, 8, 0), undo.Ref(1, 4, 8, 50)]]) == {1: [
        undo.Piece(0, 4, 0, 0), undo.Piece(4, 8, 0, 50)]}


@given(st.lists(st.tuples(st.integers(0, 100), st.integers(1, 20)), max_size=12),
       st.lists(st.tuples(st.integers(0, 100), st.integers(1, 20)), max_size=12))
def test_intersect_against_sets(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> None:
    def ranges(bits: set[int]) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for i in sorted(bits):
            if out and out[-1][0] + out[-1][1] == i:
                out[-1] = (out[-1][0], out[-1][1] + 1)
            else:
                out.append((i, 1))
        return out
    sa = {i for s, n in a for i in range(s, s + n)}
    sb = {i for s, n in b for i in range(s, s + n)}
    assert undo.intersect(ranges(sa), ranges(sb)) == ranges(sa & sb)
