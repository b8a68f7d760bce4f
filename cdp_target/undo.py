"""Undo math of restore points: capture, oldest-wins merge and replay (pure).

Theory of operation
-------------------
The replica holds the newest applied state. Before delta k (seqs
``(lo, hi]``) is applied, the bytes it is about to overwrite are saved as the
*undo segment* ``(lo, hi]``: one extent per delta extent, holding what the
replica held there (zero extents where it held zeros). Then:

- state(lo) = state(hi) with the undo segment ``(lo, hi]`` written over it;
- state at restore point j = the replica with every undo segment whose
  ``lo >= j`` written over it, *newest first* (so for each byte the undo of
  the earliest delta after j that touched it wins, DESIGN §3);
- two adjacent segments ``(a, p]`` and ``(p, b]`` merge into ``(a, b]`` by
  *oldest wins*: every byte of ``(a, p]`` is kept, ``(p, b]`` only adds the
  bytes ``(a, p]`` does not cover. Replaying the merge equals replaying both,
  newest first, so points a and b stay exact while p is dropped.

Invariants: extents of one segment never overlap (delta extents do not, and
the merge only adds uncovered pieces); a merge keeps no data twice, so a
merged run never holds more than one copy of each byte it covers.

Restore resolves before it writes (`resolve`): given the segments above a
point *oldest first*, each byte of the image at that point comes from the
earliest segment that holds it, else from the replica. `resolve` turns the
segments' extents, taken by reference (`Ref`: where the data lies in the
segment's file, not the data), into one sorted, disjoint map of `Piece`s per
disk with a sort and one sweep (a heap of the extents open at each
boundary; the smallest segment index wins, and inside one segment the later
extent, as a replay would). The restore then writes every byte once: the
replica only where no piece lies (`gaps`), each piece from its segment.
Replaying the pieces over the replica equals replaying the segments newest
first (`apply_resolved`, checked against the prefix oracle in the tests).

Everything here works on `cdp_common.delta.Extent` iterables and an
injected reader; `cdp_target.undostore` is the file I/O around it. Memory
stays bounded: `merge_oldest_wins` streams extents and keeps only the
covered offsets (a `Coverage`), never the data of older segments; `resolve`
holds one small tuple per extent, never data.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple

from cdp_common.delta import Extent

CAPTURE_PIECE = 1 << 20
_ZEROS = bytes(CAPTURE_PIECE)

ReadFn = Callable[[int, int, int], bytes]
"""read(disk_id, offset, length) -> exactly `length` bytes of the replica."""


class Coverage:
    """Per-disk set of covered byte ranges [start, end), kept sorted and disjoint."""

    def __init__(self) -> None:
        self._starts: dict[int, list[int]] = {}
        self._ends: dict[int, list[int]] = {}

    def uncovered(self, disk: int, start: int, end: int) -> list[tuple[int, int]]:
        """The pieces of [start, end) not covered yet, in order."""
        starts = self._starts.get(disk, [])
        ends = self._ends.get(disk, [])
        out: list[tuple[int, int]] = []
        i = bisect.bisect_right(ends, start)  # first interval ending after start
        pos = start
        while pos < end and i < len(starts):
            s, e = starts[i], ends[i]
            if s >= end:
                break
            if s > pos:
                out.append((pos, s))
            pos = max(pos, e)
            i += 1
        if pos < end:
            out.append((pos, end))
        return out

    def add(self, disk: int, start: int, end: int) -> None:
        starts = self._starts.setdefault(disk, [])
        ends = self._ends.setdefault(disk, [])
        i = bisect.bisect_left(ends, start)      # first interval that may touch
        j = bisect.bisect_right(starts, end)     # first interval entirely after
        if i < j:
            start = min(start, starts[i])
            end = max(end, ends[j - 1])
        starts[i:j] = [start]
        ends[i:j] = [end]

    def total(self) -> int:
        return sum(e - s for d in self._starts
                   for s, e in zip(self._starts[d], self._ends[d], strict=True))


def clip(ext: Extent, start: int, end: int) -> Extent:
    """The part [start, end) of `ext` (which must contain it)."""
    if ext.data is None:
        return Extent(ext.disk_id, start, end - start, None)
    return Extent(ext.disk_id, start, end - start,
                  ext.data[start - ext.offset:end - ext.offset])


def merge_oldest_wins(segments: Iterable[Iterable[Extent]]) -> Iterator[Extent]:
    """Merge undo segments given OLDEST FIRST into one: the oldest data for each byte."""
    cov = Coverage()
    for seg in segments:
        pending: list[tuple[int, int, int]] = []
        for ext in seg:
            for a, b in cov.uncovered(ext.disk_id, ext.offset, ext.offset + ext.length):
                yield ext if (a, b) == (ext.offset, ext.offset + ext.length) else clip(ext, a, b)
            pending.append((ext.disk_id, ext.offset, ext.offset + ext.length))
        # Extents of one segment do not overlap, so they are added after the
        # whole segment: within a segment nothing shadows anything.
        for disk, a, b in pending:
            cov.add(disk, a, b)


def capture(delta: Iterable[Extent], read: ReadFn) -> Iterator[Extent]:
    """Undo extents for `delta`: the current bytes under each of its extents.

    Large extents are read in pieces of at most CAPTURE_PIECE bytes; a piece
    that reads as all zeros becomes a zero extent (no data stored).
    """
    for ext in delta:
        pos, end = ext.offset, ext.offset + ext.length
        while pos < end:
            n = min(CAPTURE_PIECE, end - pos)
            data = read(ext.disk_id, pos, n)
            if len(data) != n:
                raise ValueError(f"short read of disk {ext.disk_id} at {pos}: "
                                 f"{len(data)} of {n} bytes")
            if data == _ZEROS[:n]:
                yield Extent(ext.disk_id, pos, n, None)
            else:
                yield Extent(ext.disk_id, pos, n, bytes(data))
            pos += n


def apply_to(images: dict[int, bytearray], extents: Iterable[Extent]) -> None:
    """Write extents over in-memory images (the reference semantics; tests and oracle)."""
    for ext in extents:
        img = images[ext.disk_id]
        img[ext.offset:ext.offset + ext.length] = (
            bytes(ext.length) if ext.data is None else ext.data)


def restore_in_memory(current: dict[int, bytearray],
                      segments_newest_first: Iterable[Iterable[Extent]]) -> dict[int, bytearray]:
    """The images at a point: `current` with the segments above it replayed newest first."""
    out = {d: bytearray(img) for d, img in current.items()}
    for seg in segments_newest_first:
        apply_to(out, seg)
    return out


def segment_bytes(extents: Iterable[Extent]) -> int:
    """Bytes of data a segment stores (zero extents cost only their header)."""
    return sum(e.length for e in extents if e.data is not None)


# ---------------------------------------------------------------- resolution


class Ref(NamedTuple):
    """One extent of an undo segment, by reference to its data."""

    disk_id: int
    offset: int
    length: int
    src: int
    """Where its data lies (the byte offset in the segment's file); -1: a zero extent."""


class Piece(NamedTuple):
    """A byte range of the image at a point and where its bytes come from."""

    offset: int
    length: int
    seg: int
    """Index of the segment (in the oldest-first order given to `resolve`); -1 for zeros."""
    src: int
    """Byte offset of this piece's data in that segment's file; -1: zeros."""

    @property
    def end(self) -> int:
        return self.offset + self.length


def resolve(segments_oldest_first: Sequence[Iterable[Ref]]) -> dict[int, list[Piece]]:
    """One final map per disk: sorted, disjoint pieces; the earliest segment wins.

    Segment i's extents shadow those of every later segment; inside one
    segment (whose extents should not overlap) the later extent wins, as a
    replay in file order would. Adjacent pieces that continue each other
    (same segment and contiguous data, or both zeros) are joined.
    """
    per_disk: dict[int, list[tuple[int, int, int, int, int]]] = {}
    for seg, refs in enumerate(segments_oldest_first):
        for pos, r in enumerate(refs):
            if r.length > 0:
                per_disk.setdefault(r.disk_id, []).append(
                    (r.offset, r.offset + r.length, seg, -pos, r.src))
    return {disk: _sweep(entries) for disk, entries in sorted(per_disk.items())}


def _sweep(entries: list[tuple[int, int, int, int, int]]) -> list[Piece]:
    entries.sort()
    bounds = sorted({e[0] for e in entries} | {e[1] for e in entries})
    heap: list[tuple[int, int, int, int, int]] = []   # (seg, -pos, end, start, src)
    out: list[list[int]] = []                         # [offset, end, seg, src]
    i, n = 0, len(entries)
    for b0, b1 in itertools.pairwise(bounds):
        while i < n and entries[i][0] <= b0:
            s, e, seg, negpos, src = entries[i]
            heapq.heappush(heap, (seg, negpos, e, s, src))
            i += 1
        while heap and heap[0][2] <= b0:
            heapq.heappop(heap)   # ended; entries shadowed by the top are popped lazily
        if not heap:
            continue
        seg, _, _, s, src = heap[0]
        if src < 0:
            seg, psrc = -1, -1
        else:
            psrc = src + (b0 - s)
        if out:
            last = out[-1]
            if last[1] == b0 and last[2] == seg and (
                    psrc < 0 or last[3] + (last[1] - last[0]) == psrc):
                last[1] = b1
                continue
        out.append([b0, b1, seg, psrc])
    make = Piece._make   # tuple.__new__: no Python-level __new__ per piece
    return [make((a, b - a, seg, src)) for a, b, seg, src in out]


def gaps(pieces: Iterable[Piece], size: int) -> list[tuple[int, int]]:
    """(offset, length) of the ranges of [0, size) no piece covers (sorted pieces)."""
    out = []
    pos = 0
    for p in pieces:
        if p.offset > pos:
            out.append((pos, p.offset - pos))
        pos = max(pos, p.end)
    if pos < size:
        out.append((pos, size - pos))
    return out


def intersect(a: Sequence[tuple[int, int]],
              b: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Intersection of two sorted lists of disjoint (offset, length) ranges."""
    out = []
    i = j = 0
    while i < len(a) and j < len(b):
        s = max(a[i][0], b[j][0])
        ea, eb = a[i][0] + a[i][1], b[j][0] + b[j][1]
        e = min(ea, eb)
        if s < e:
            out.append((s, e - s))
        if ea <= eb:
            i += 1
        else:
            j += 1
    return out


SrcFn = Callable[[int, int, int], bytes]
"""data(seg, src, length) -> the `length` bytes at `src` in segment `seg`'s file."""


def apply_resolved(current: dict[int, bytearray], pieces: dict[int, list[Piece]],
                   data: SrcFn) -> dict[int, bytearray]:
    """The images at a point from `current` and its resolved map (reference semantics)."""
    out = {d: bytearray(img) for d, img in current.items()}
    for disk, ps in pieces.items():
        img = out[disk]
        for p in ps:
            img[p.offset:p.end] = (bytes(p.length) if p.src < 0
                                   else data(p.seg, p.src, p.length))
    return out
