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

Everything here works on `cdp_common.delta.Extent` iterables and an
injected reader; `cdp_target.undostore` is the file I/O around it. Memory
stays bounded: `merge_oldest_wins` streams extents and keeps only the
covered offsets (a `Coverage`), never the data of older segments.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator

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
