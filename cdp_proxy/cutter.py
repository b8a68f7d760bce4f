"""Interval cutter and coalescer of the source proxy (pure: no I/O, injected `now`).

Theory of operation
-------------------
The filter ships journal records in seq order. The cutter groups them into
*intervals*: exact, gap-free seq ranges ``(prev_last, last]``. Each closed
interval becomes one `Delta` = the coalesced effect of its writes, so every
restore point at the target is the base image plus a *prefix* of the write
stream (design invariant I2).

An interval opens with its first record (its start time is the `now` passed
with that record) and closes when

* ``now - start >= rpo_interval_s`` — checked on every `feed` and by `tick`,
  which the shell calls on a timer so an idle stream still cuts on time; or
* the payload bytes of its records reach `interval_max_bytes` (memory bound,
  I4) — checked after each record, so the cap is exceeded by at most one
  record; or
* the next record was *captured* ``rpo_interval_s`` or more after the
  interval's first record — so a backlog shipped after an outage (or a
  proxy rebind) still yields restore points ``rpo_interval_s`` apart in
  capture time, instead of one point per arrival interval. The interval is
  closed before that record is added (unless the record alone would reach
  the size cap, which closes it right after).

An interval with no records emits nothing. Records must arrive with
consecutive seqs starting right after `start_after_seq`; anything else is a
`ProtocolError` -- except a jump the filter announced (`skip_ok`: seqs it
dropped at a journal overflow, covered by its dirty-block resync); the delta
then still starts right after the previous one, covering the lost seqs.

Consistency-group checkpoints (docs/ARCHITECTURE.md "Consistency groups"): a
CHECKPOINT marker record closes the interval at once, at its seq, and the
delta carries its `checkpoint_id`: the point ending there is this member's part
of a group point. A group member's cutter is made with `checkpoints=True`:
its time rules then use three RPO intervals instead of one, so its deltas end
at the markers the source proxy asks for every interval, and the time rules
only bound what an open interval holds while checkpoints fail (a member down).

Gap bookkeeping (journal overflow, docs/FORMAT.md "Gaps"): `note_gap` marks
the open interval as lying inside a gap that began at `begin_time_ns` after
seq `after_seq`; a GAP_END marker record ends the gap at its seq and closes the
interval at once (the point ending there is consistent again). Markers
never touch the extents.

Coalescing keeps, per disk, a sorted list of non-overlapping extents
(``starts`` / ``ends`` / ``bufs``), found by bisection. A write replaces the
bytes it covers: the extent it starts in is cut (or overwritten in place when
the write lies inside it), extents it covers are dropped, and the one it ends
inside is trimmed at its front. A write that starts at or inside an extent's
end extends that extent (``bytearray +=`` is amortised O(1)), so sequential
writes become one extent. Extents are only merged in that cheap direction;
adjacent extents may therefore stay separate, which the delta format allows.

At emit time runs of *aligned* 4 KiB blocks that are all zero become zero
extents (``data is None``). Candidates are found with ``bytearray.find`` of a
4 KiB zero needle (a skip search that is nearly free on non-zero data) and
confirmed with ``startswith`` against zero constants (an in-place memcmp
that stops at the first non-zero byte; 256 KiB steps, then 4 KiB steps).
Emitted data is ``bytearray`` (it is never touched again after the cut).

Invariant: applying the emitted extents of deltas 1..k to a disk gives the
same bytes as applying records ``start_after_seq+1 .. last_seq(k)`` one by
one in seq order.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import cast

from cdp_common.delta import EXTENT_HEADER_SIZE, Extent
from cdp_common.errors import FormatError, ProtocolError
from cdp_common.records import FLAG_CHECKPOINT, FLAG_GAP_END, GAP_END_PAYLOAD, Record

BLOCK = 4096
CHECKPOINT_SLACK = 3.0  # a group member's time cuts wait this many RPO intervals
_ZERO_BLOCK = bytes(BLOCK)
_BIG = 64 * BLOCK
_ZERO_BIG = bytes(_BIG)


@dataclass(frozen=True, slots=True)
class Delta:
    """One closed interval: writes with seq in [first_seq, last_seq], coalesced."""

    first_seq: int
    last_seq: int
    newest_time_ns: int
    extents: list[Extent]
    record_count: int = 0
    record_bytes: int = 0
    encoded_bytes: int = field(default=0)
    """Size of the extents in the delta wire format (headers + data)."""
    gap_begin_time_ns: int = 0
    """Nonzero: the delta lies in a gap (overflow or sync) that began at this time."""
    gap_after_seq: int = 0
    """With gap_begin_time_ns: restore points after this seq are inconsistent."""
    gap_end_seq: int = 0
    """Nonzero: the gap ends at this seq (points at or after it are consistent)."""
    gap_end_time_ns: int = 0
    checkpoint_id: int = 0
    """Nonzero: the delta ends at the CHECKPOINT marker of this id (its last_seq)."""
    gap_reason: str = ""
    """With gap_begin_time_ns: why the gap opened, as the filter said ("" unknown)."""


class ExtentMap:
    """Sorted non-overlapping extents of one disk; later writes win."""

    __slots__ = ("bufs", "ends", "starts")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.bufs: list[bytearray] = []

    def write(self, offset: int, data: bytes | memoryview) -> None:
        n = len(data)
        if n == 0:
            return
        end = offset + n
        starts, ends, bufs = self.starts, self.ends, self.bufs
        i = bisect_right(starts, offset) - 1
        if i >= 0 and ends[i] >= offset:
            # The write starts inside (or right at the end of) extent i.
            s = starts[i]
            buf = bufs[i]
            if ends[i] >= end:
                buf[offset - s:end - s] = data
                return
            del buf[offset - s:]
            buf += data
            ends[i] = end
            j = i + 1
        else:
            i += 1
            starts.insert(i, offset)
            ends.insert(i, end)
            bufs.insert(i, bytearray(data))
            j = i + 1
        # Extents j.. that start before `end` are covered entirely or in part.
        k = j
        count = len(starts)
        while k < count and ends[k] <= end:
            k += 1
        if k < count and starts[k] < end:
            # Extent k sticks out past the write: trim its front (CPython
            # deletes from a bytearray's front without moving the rest).
            del bufs[k][:end - starts[k]]
            starts[k] = end
        if k > j:
            del starts[j:k]
            del ends[j:k]
            del bufs[j:k]

    def __len__(self) -> int:
        return len(self.starts)


def _as_bytes(buf: bytearray) -> bytes:
    # Extent.data is typed `bytes`; a bytearray behaves the same for every
    # consumer (slicing, concatenation, buffer protocol) and saves a copy of
    # up to interval_max_bytes. The cutter never touches it after the cut.
    return cast(bytes, buf)


def split_zero_blocks(disk_id: int, start: int, buf: bytearray) -> list[Extent]:
    """Cut one extent into data and zero extents along aligned all-zero 4 KiB blocks."""
    n = len(buf)
    out: list[Extent] = []
    done = 0  # bytes of buf already emitted
    search = 0
    find = buf.find
    zero_at = buf.startswith  # memcmp in place, no copy; stops at the first non-zero byte
    while True:
        p = find(_ZERO_BLOCK, search)
        if p < 0:
            break
        a = p + (-(start + p)) % BLOCK  # first block boundary at or after p
        b = a
        while True:
            if zero_at(_ZERO_BIG, b):
                b += _BIG
            elif zero_at(_ZERO_BLOCK, b):
                b += BLOCK
            else:
                break
        if b == a:
            # The zero run found is not block aligned; any aligned zero block
            # further on is a match of `find` starting after a.
            search = a + 1
            continue
        if a > done:
            out.append(Extent(disk_id, start + done, a - done, _as_bytes(buf[done:a])))
        out.append(Extent(disk_id, start + a, b - a, None))
        done = search = b
    if done == 0:
        out.append(Extent(disk_id, start, n, _as_bytes(buf)))
    elif done < n:
        out.append(Extent(disk_id, start + done, n - done, _as_bytes(buf[done:])))
    return out


class IntervalCutter:
    """Feeds records in seq order, emits coalesced `Delta`s at interval boundaries."""

    def __init__(self, rpo_interval_s: float, interval_max_bytes: int,
                 start_after_seq: int = 0, disk_sizes: Mapping[int, int] | None = None,
                 checkpoints: bool = False) -> None:
        if rpo_interval_s <= 0:
            raise ValueError("rpo_interval_s must be > 0")
        if interval_max_bytes <= 0:
            raise ValueError("interval_max_bytes must be > 0")
        self.checkpoints = checkpoints
        if checkpoints:
            rpo_interval_s *= CHECKPOINT_SLACK
        self.rpo_interval_s = rpo_interval_s
        self._rpo_ns = int(rpo_interval_s * 1e9)
        self.interval_max_bytes = interval_max_bytes
        self.disk_sizes = dict(disk_sizes) if disk_sizes is not None else None
        self.reset(start_after_seq)

    def reset(self, start_after_seq: int) -> None:
        """Drop any open interval; the next record must have seq start_after_seq + 1."""
        self.last_seq = start_after_seq  # last seq fed
        self._first_seq = start_after_seq + 1
        self._maps: dict[int, ExtentMap] = {}
        self._start: float | None = None
        self._bytes = 0
        self._count = 0
        self._newest_ns = 0
        self._first_time_ns = 0
        self._gap_begin_ns = 0
        self._gap_after = 0
        self._gap_end_seq = 0
        self._gap_end_ns = 0
        self._checkpoint_id = 0
        self._gap_reason = ""

    def note_gap(self, begin_time_ns: int, after_seq: int, reason: str = "") -> None:
        """The records fed next lie in a gap that began at begin_time_ns after after_seq
        (for `reason`, as the filter says)."""
        if begin_time_ns and (not self._gap_begin_ns or begin_time_ns < self._gap_begin_ns):
            self._gap_begin_ns = begin_time_ns
            self._gap_after = after_seq
            self._gap_reason = reason

    @property
    def pending_bytes(self) -> int:
        """Payload bytes of the records in the open interval."""
        return self._bytes

    @property
    def pending_records(self) -> int:
        return self._count

    def feed(self, record: Record, now: float, skip_ok: bool = False) -> Delta | None:
        """Add one record; returns a delta if this record closed the interval.

        `skip_ok`: the filter announced that seqs before this record were lost
        (journal overflow); a jump forward is accepted once."""
        expected = self.last_seq + 1
        if record.seq != expected and not (skip_ok and record.seq > expected):
            raise ProtocolError(f"record seq {record.seq} out of order, expected {expected}")
        if record.flags & FLAG_GAP_END:
            return self._marker(record, now)
        if record.flags & FLAG_CHECKPOINT:
            return self._checkpoint(record, now)
        if self.disk_sizes is not None:
            size = self.disk_sizes.get(record.disk_id)
            if size is None:
                raise FormatError(f"record seq {record.seq}: unknown disk id {record.disk_id}")
            if record.offset + record.length > size:
                raise FormatError(f"record seq {record.seq}: write [{record.offset}, "
                                  f"{record.offset + record.length}) is outside disk "
                                  f"{record.disk_id} of {size} bytes")
        early: Delta | None = None
        if (self._count and record.time_ns - self._first_time_ns >= self._rpo_ns
                and record.length < self.interval_max_bytes):
            early = self.cut()  # capture-time boundary: this record opens the next interval
        if self._start is None:
            self._start = now
            self._first_time_ns = record.time_ns
        m = self._maps.get(record.disk_id)
        if m is None:
            m = self._maps[record.disk_id] = ExtentMap()
        m.write(record.offset, record.data)
        self.last_seq = record.seq
        self._count += 1
        self._bytes += record.length
        if record.time_ns > self._newest_ns:
            self._newest_ns = record.time_ns
        if early is not None:
            return early  # a one-record interval: below the cap, and its clock just started
        if self._bytes >= self.interval_max_bytes or now - self._start >= self.rpo_interval_s:
            return self.cut()
        return None

    def _marker(self, record: Record, now: float) -> Delta | None:
        if len(record.data) != GAP_END_PAYLOAD.size:
            raise FormatError(f"record seq {record.seq}: GAP_END marker of {len(record.data)} "
                              f"bytes, expected {GAP_END_PAYLOAD.size}")
        begin_ns, after = GAP_END_PAYLOAD.unpack(record.data)
        self.note_gap(begin_ns, after)
        if self._start is None:
            self._start = now
            self._first_time_ns = record.time_ns
        self._gap_end_seq = record.seq
        self._gap_end_ns = record.time_ns
        self.last_seq = record.seq
        self._count += 1
        # Cut at once: the point ending at the marker is the first consistent one
        # again, and a sync is done only once it is durable (no RPO-interval wait).
        return self.cut()

    def _checkpoint(self, record: Record, now: float) -> Delta | None:
        if record.length or record.disk_id or not record.offset:
            raise FormatError(f"record seq {record.seq}: malformed CHECKPOINT marker (disk "
                              f"{record.disk_id}, id {record.offset}, {record.length} bytes)")
        if self._start is None:
            self._start = now
            self._first_time_ns = record.time_ns
        self.last_seq = record.seq
        self._count += 1
        self._checkpoint_id = record.offset
        # The point holds every write captured before the marker: it is as of the
        # marker's time (also when the interval held no write at all).
        self._newest_ns = max(self._newest_ns, record.time_ns)
        return self.cut()

    def feed_all(self, records: Iterable[Record], now: float) -> list[Delta]:
        out = []
        for record in records:
            delta = self.feed(record, now)
            if delta is not None:
                out.append(delta)
        return out

    def tick(self, now: float) -> Delta | None:
        """Close the open interval if its time is up."""
        if self._start is not None and now - self._start >= self.rpo_interval_s:
            return self.cut()
        return None

    def cut(self) -> Delta | None:
        """Close the open interval now (None if it holds no records)."""
        if self._count == 0:
            return None
        extents: list[Extent] = []
        for disk_id in sorted(self._maps):
            m = self._maps[disk_id]
            for start, buf in zip(m.starts, m.bufs, strict=True):
                extents.extend(split_zero_blocks(disk_id, start, buf))
        encoded = sum(EXTENT_HEADER_SIZE + (0 if e.data is None else e.length) for e in extents)
        delta = Delta(self._first_seq, self.last_seq, self._newest_ns, extents,
                      self._count, self._bytes, encoded, self._gap_begin_ns, self._gap_after,
                      self._gap_end_seq, self._gap_end_ns, self._checkpoint_id,
                      self._gap_reason if self._gap_begin_ns else "")
        self.reset(self.last_seq)
        return delta
