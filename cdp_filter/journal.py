"""Per-policy append-only write journal (docs/FORMAT.md §1).

Theory of operation
-------------------
Every application write of a policy becomes one record (cdp_common.records)
with the policy's next seq. Records are appended back to back to segment files
`<dir>/<first_seq:020d>.seg`; a new segment starts when the current one reached
`segment_bytes`. Seqs are consecutive inside a segment and across segments, so
the position of any seq is `offsets[seq - first_seq]` of its segment: the
in-memory index costs 8 bytes per record and nothing is ever rescanned.

Invariants:
- J1 a seq is never reused: `last_seq` survives restarts, even when every
  segment was trimmed, because `state` (cdp_common.statefile, written
  atomically: tmp + fsync + rename + fsync dir) records `trimmed_through`
  before any segment is deleted. A `state` that does not decode raises
  FormatError at open: guessing a lower value could reuse seqs the target has.
- J2 only a valid prefix is ever returned: on open every segment is scanned
  with `records.scan_valid_prefix`; the first torn, corrupt or out-of-sequence
  record and everything after it (the rest of its segment and any later
  segment) is cut and logged. `read_from` therefore only hands out records
  that passed their CRC at open or were written by this process. Before any
  cut byte is truncated or unlinked, `on_cut(bytes, expected_seq,
  whole_segment)` (if set) is called with them, so the writes they held can
  be marked for a resync from the images (cdp_filter.salvage); if it raises,
  the open fails and nothing is cut.
- J3 a segment is deleted only when the last seq it holds has been trimmed
  (acked durable by the target) and, through `before_delete` or the caller,
  the disk images have been fdatasync'ed, so the records are certainly in the
  images (the journal is also the redo log for them, see `records_after`).
- J4 `sync()` makes every appended record durable: it fsyncs every segment
  written since the last sync (not only the current one), oldest first, and
  the directory when segments were created. Oldest first: a power cut in the
  middle of a sync then leaves a durable prefix, never a durable later
  segment after a shortened earlier one (which recovery would have to drop
  as out of sequence and report as corruption).

Every write, fsync, truncate, unlink and read of a segment or of `state`
goes through the injected `FileIO` (cdp_common/fileio.py), so the
power-loss test (tests/unit/test_journal_powerloss.py) can stop the journal
at any step and drop what was not fsynced. Only listing the directory and
fstat stay outside the seam: they change nothing.

All methods are synchronous and meant for one thread (the event loop); the
blocking parts of a durable sync can run in a worker thread via `sync_async`.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import os
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from cdp_common import records, statefile
from cdp_common.errors import CdpError, FormatError, StorageError
from cdp_common.fileio import OS_IO, FileIO
from cdp_common.fsutil import pread_upto

log = logging.getLogger("filter.journal")

SEGMENT_SUFFIX = ".seg"
STATE_FILE = "state"
STATE_KIND = "journal"
STATE_VERSION = 1
_SCAN_CHUNK = 8 * 1024 * 1024  # batch size used when replaying


class JournalGapError(CdpError):
    """Records that were asked for are no longer in the journal (trimmed)."""


@dataclass(eq=False)
class _Segment:
    first_seq: int
    path: str
    fd: int
    size: int = 0
    offsets: array[int] = field(default_factory=lambda: array("Q"))

    @property
    def count(self) -> int:
        return len(self.offsets)

    @property
    def last_seq(self) -> int:
        return self.first_seq + len(self.offsets) - 1

    def end_of(self, index: int) -> int:
        return self.offsets[index + 1] if index + 1 < len(self.offsets) else self.size


def segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}{SEGMENT_SUFFIX}"


def _fsync_fds(io: FileIO, fds: list[int], dir_path: str | None) -> None:
    """Worker-thread half of sync_async: fsync private fds (in order) and close them."""
    try:
        for fd in fds:
            io.fsync(fd)
        if dir_path is not None:
            io.fsync_dir(dir_path)
    finally:
        for fd in fds:
            io.close(fd)


class Journal:
    """One policy's journal; see the module docstring for the invariants."""

    def __init__(self, directory: str, segment_bytes: int, cap_bytes: int,
                 policy: str = "", before_delete: Callable[[], None] | None = None,
                 on_cut: Callable[[memoryview, int, bool], None] | None = None,
                 io: FileIO = OS_IO) -> None:
        # Use Journal.open(); the constructor only sets fields.
        self.io = io
        self.on_cut = on_cut
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.cap_bytes = cap_bytes
        self.policy = policy
        self.before_delete = before_delete
        self._segments: list[_Segment] = []
        self._first_seqs: list[int] = []  # parallel to _segments, for bisect
        self._size = 0
        self._last_seq = 0
        self._last_time_ns = 0
        self._trimmed_through = 0      # in memory: highest seq acked durable
        self._persisted_trim = 0       # what `state` says
        self._dirty: set[_Segment] = set()
        self._dir_dirty = False
        self._write_gen = 0
        self._synced_gen = 0
        # The first fsync failure, kept: after a failed fsync Linux may drop the
        # dirty pages and report the next fsync as a success, so no later sync
        # may claim durability for what was appended before (until a reopen
        # re-reads and checks what really is on disk).
        self._sync_failure: StorageError | None = None
        self._sync_lock: asyncio.Lock | None = None
        self._closed = False

    # ------------------------------------------------------------ open / recovery

    @classmethod
    def open(cls, directory: str, segment_bytes: int, cap_bytes: int, *, policy: str = "",
             before_delete: Callable[[], None] | None = None,
             on_cut: Callable[[memoryview, int, bool], None] | None = None,
             io: FileIO = OS_IO) -> Journal:
        """Open (creating if needed) and recover the journal in `directory`."""
        j = cls(directory, segment_bytes, cap_bytes, policy, before_delete, on_cut, io)
        try:
            io.makedirs(directory, 0o700)
            j._recover()
        except OSError as exc:
            j.close()
            raise StorageError(f"journal {directory}: cannot open ({exc.strerror or exc})") from exc
        except BaseException:
            j.close()
            raise
        return j

    def _extra(self, **kw: object) -> dict[str, object]:
        return {"policy": self.policy, **kw}

    def _read_state(self) -> int:
        """trimmed_through from `state` (docs/FORMAT.md §1d); 0 when there is none."""
        path = os.path.join(self.directory, STATE_FILE)
        data = statefile.load(path, STATE_KIND, STATE_VERSION, self.io)
        if data is None:
            return 0
        value = data.get("trimmed_through")
        if type(value) is not int or value < 0:
            raise FormatError(f"{path}: journal state file has no valid trimmed_through")
        return value

    def _write_state(self, trimmed_through: int) -> None:
        statefile.save(os.path.join(self.directory, STATE_FILE), STATE_KIND, STATE_VERSION,
                       {"trimmed_through": trimmed_through}, self.io)
        self._persisted_trim = trimmed_through

    def _recover(self) -> None:
        self._trimmed_through = self._persisted_trim = self._read_state()
        names = []
        for name in os.listdir(self.directory):
            if not name.endswith(SEGMENT_SUFFIX):
                continue
            stem = name[: -len(SEGMENT_SUFFIX)]
            if not stem.isdigit():
                log.warning("ignoring stray file %s in journal", name, extra=self._extra())
                continue
            names.append((int(stem), name))
        names.sort()
        expected_next: int | None = None
        cut = False
        changed_dir = False
        for first_seq, name in names:
            path = os.path.join(self.directory, name)
            if cut or (expected_next is not None and first_seq != expected_next):
                if not cut:
                    log.error("journal segment %s does not start at seq %s; dropping it and "
                              "every later segment", name, expected_next,
                              extra=self._extra(seq=first_seq))
                cut = True
                self._cut_whole(first_seq, path)
                self.io.unlink(path)
                changed_dir = True
                continue
            seg, torn = self._load_segment(first_seq, path)
            if seg is None:
                changed_dir = True
                if torn:
                    cut = True
                continue
            if seg.last_seq <= self._trimmed_through:
                # Trimmed but not yet deleted when we stopped (J3 already holds),
                # or whose unlink a power cut undid. It says nothing about where
                # the next segment starts: after advance_to that is past a jump.
                self.io.close(seg.fd)
                self.io.unlink(path)
                changed_dir = True
                continue
            self._add_segment(seg)
            expected_next = seg.last_seq + 1
            if torn:
                cut = True
        if changed_dir:
            self.io.fsync_dir(self.directory)
        if self._segments:
            first = self._segments[0].first_seq
            if first > self._trimmed_through + 1:
                log.error("journal starts at seq %d but only seqs through %d were trimmed; "
                          "seqs in between are missing", first, self._trimmed_through,
                          extra=self._extra(seq=first))
            last = self._segments[-1]
            self._last_seq = last.last_seq
            head = self.io.pread(last.fd, records.HEADER_SIZE, last.offsets[-1])
            self._last_time_ns = records.HEADER.unpack(head)[5]
        self._last_seq = max(self._last_seq, self._trimmed_through)
        if self._segments:
            log.info("journal open: seqs %d..%d, %d bytes in %d segments", self.oldest_seq,
                     self._last_seq, self._size, len(self._segments), extra=self._extra())
        else:
            log.info("journal open: empty, next seq %d", self._last_seq + 1,
                     extra=self._extra())

    def _load_segment(self, first_seq: int, path: str) -> tuple[_Segment | None, bool]:
        """Scan one segment; cut its torn tail. Returns (segment or None if empty, torn)."""
        io = self.io
        fd = io.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            view = memoryview(self._read_all(fd, size))
            got = len(view)
            spans, valid_end = records.scan_valid_prefix(view)
            # Records must carry consecutive seqs starting at the name's seq.
            offsets = array("Q")
            for i, (seq, start, _end) in enumerate(spans):
                if seq != first_seq + i:
                    log.error("journal segment %s: record at byte %d has seq %d, expected %d",
                              os.path.basename(path), start, seq, first_seq + i,
                              extra=self._extra(seq=seq))
                    valid_end = start
                    break
                offsets.append(start)
            if valid_end < got and self.on_cut is not None:
                self.on_cut(view[valid_end:got], first_seq + len(offsets), False)
            del view
            torn = valid_end < size
            if torn:
                log.warning("journal segment %s: cutting %d bytes of torn or corrupt tail at "
                            "byte %d", os.path.basename(path), size - valid_end, valid_end,
                            extra=self._extra(seq=first_seq + len(offsets)))
                io.ftruncate(fd, valid_end)
                io.fsync(fd)
            if not offsets:
                io.close(fd)
                io.unlink(path)
                return None, torn
            return _Segment(first_seq, path, fd, valid_end, offsets), torn
        except BaseException:
            with contextlib.suppress(OSError):
                io.close(fd)
            raise

    def _read_all(self, fd: int, size: int) -> bytes:
        """The first `size` bytes of a file (fewer if it is shorter)."""
        return pread_upto(fd, size, self.io, _SCAN_CHUNK)

    def _cut_whole(self, first_seq: int, path: str) -> None:
        """A whole segment is about to be dropped: show its bytes to on_cut first."""
        if self.on_cut is None:
            return
        fd = self.io.open(path, os.O_RDONLY)
        try:
            data = self._read_all(fd, os.fstat(fd).st_size)
        finally:
            self.io.close(fd)
        self.on_cut(memoryview(data), first_seq, True)

    def _add_segment(self, seg: _Segment) -> None:
        self._segments.append(seg)
        self._first_seqs.append(seg.first_seq)
        self._size += seg.size

    # ------------------------------------------------------------ properties

    @property
    def last_seq(self) -> int:
        """Highest seq ever assigned (0 when none)."""
        return self._last_seq

    @property
    def last_time_ns(self) -> int:
        """Capture time of the record with the highest seq still known (0 if none)."""
        return self._last_time_ns

    @property
    def trimmed_through(self) -> int:
        """Highest seq the target acked as durable (as far as this journal knows)."""
        return self._trimmed_through

    @property
    def oldest_seq(self) -> int:
        """Lowest seq still readable; last_seq + 1 when the journal is empty."""
        return self._segments[0].first_seq if self._segments else self._last_seq + 1

    @property
    def size_bytes(self) -> int:
        return self._size

    @property
    def over_cap(self) -> bool:
        return self._size >= self.cap_bytes

    @property
    def segment_count(self) -> int:
        return len(self._segments)

    # ------------------------------------------------------------ append / sync

    def append(self, time_ns: int, disk_id: int, offset: int,
               data: bytes | memoryview, flags: int = 0) -> int:
        """Append one record with the next seq; returns that seq.

        One pwritev of header and data, no fsync. On failure (a short write
        is ENOSPC, by the FileIO contract) the segment is cut back to its
        previous end and StorageError is raised (with the OSError's errno as
        `__cause__`): no seq is used.
        """
        seq = self._last_seq + 1
        seg = self._segments[-1] if self._segments else None
        if seg is None or seg.size >= self.segment_bytes or seg.last_seq != seq - 1:
            seg = self._new_segment(seq)
        head = records.encode_header(seq, time_ns, disk_id, offset, data, flags)
        want = records.HEADER_SIZE + len(data)
        try:
            self.io.pwritev(seg.fd, (head, data), seg.size)
        except OSError as exc:
            with contextlib.suppress(OSError):
                self.io.ftruncate(seg.fd, seg.size)
            raise StorageError(f"journal {self.directory}: append failed "
                               f"({exc.strerror or exc})") from exc
        seg.offsets.append(seg.size)
        seg.size += want
        self._size += want
        self._last_seq = seq
        self._last_time_ns = time_ns
        self._dirty.add(seg)
        self._write_gen += 1
        return seq

    def _new_segment(self, first_seq: int) -> _Segment:
        path = os.path.join(self.directory, segment_name(first_seq))
        try:
            fd = self.io.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise StorageError(f"journal {self.directory}: cannot create segment "
                               f"{segment_name(first_seq)} ({exc.strerror})") from exc
        seg = _Segment(first_seq, path, fd)
        self._add_segment(seg)
        self._dir_dirty = True
        return seg

    def _take_dirty(self) -> tuple[list[_Segment], bool]:
        """The segments to fsync, oldest first (J4), and whether the directory is due."""
        dirty = sorted((s for s in self._dirty if s.fd >= 0), key=lambda s: s.first_seq)
        self._dirty = set()
        dir_dirty, self._dir_dirty = self._dir_dirty, False
        return dirty, dir_dirty

    def _sync_failed(self, exc: OSError) -> StorageError:
        """Remember the first fsync failure (see _sync_failure) and return it."""
        if self._sync_failure is None:
            self._sync_failure = StorageError(
                f"journal {self.directory}: fsync failed ({exc.strerror}); records since "
                "the last good sync may not be durable: restart the filter to recover")
        return self._sync_failure

    def _check_sync(self) -> None:
        if self._sync_failure is not None:
            raise self._sync_failure

    @property
    def sync_failure(self) -> str:
        """Why the journal refuses every sync until the filter restarts ('' = it does not).
        Reported as the policy's error (cdp_filter.policy), so health is not OK."""
        return str(self._sync_failure) if self._sync_failure is not None else ""

    def sync(self) -> None:
        """fsync every segment written since the last sync (J4)."""
        self._check_sync()
        gen = self._write_gen
        dirty, dir_dirty = self._take_dirty()
        try:
            for seg in dirty:
                self.io.fsync(seg.fd)
            if dir_dirty:
                self.io.fsync_dir(self.directory)
        except OSError as exc:
            raise self._sync_failed(exc) from exc
        self._synced_gen = max(self._synced_gen, gen)

    def sync_all(self) -> None:
        """fsync every segment kept, written since the open or not: after a kill -9
        what the dead process appended may still be only in the page cache."""
        self._dirty.update(s for s in self._segments if s.fd >= 0)
        self._dir_dirty = True
        self.sync()

    async def sync_async(self) -> None:
        """Like sync(), with the fsyncs in a worker thread (the loop keeps serving).

        Returns only when every record appended before the call is durable,
        also when another sync_async is already running.
        """
        self._check_sync()
        target = self._write_gen
        if self._synced_gen >= target and not self._dir_dirty:
            return
        if self._sync_lock is None:
            self._sync_lock = asyncio.Lock()
        async with self._sync_lock:
            self._check_sync()
            if self._synced_gen >= target and not self._dir_dirty:
                return
            gen = self._write_gen
            dirty, dir_dirty = self._take_dirty()
            # Private read-only fds: a trim may close a segment's own fd (and
            # its number be reused) while the worker thread fsyncs.
            fds: list[int] = []
            try:
                try:
                    for seg in dirty:
                        fds.append(self.io.open(seg.path, os.O_RDONLY))
                except OSError:
                    for fd in fds:
                        self.io.close(fd)
                    raise
                await asyncio.to_thread(_fsync_fds, self.io, fds,
                                        self.directory if dir_dirty else None)
            except OSError as exc:
                raise self._sync_failed(exc) from exc
            self._synced_gen = max(self._synced_gen, gen)

    # ------------------------------------------------------------ reading

    def _segment_index(self, seq: int) -> int:
        if seq < self.oldest_seq:
            raise JournalGapError(f"journal {self.directory}: seq {seq} was trimmed "
                                  f"(oldest kept is {self.oldest_seq})")
        return bisect.bisect_right(self._first_seqs, seq) - 1

    def read_batch(self, after_seq: int, max_bytes: int) -> tuple[bytes, int]:
        """Encoded records with seq > after_seq, at most max_bytes (but at least one
        record when there is one). Returns (bytes, last seq included or after_seq)."""
        if after_seq >= self._last_seq or not self._segments:
            return b"", after_seq
        seq = after_seq + 1
        si = self._segment_index(seq)
        parts: list[bytes] = []
        room = max_bytes
        last = after_seq
        while si < len(self._segments):
            seg = self._segments[si]
            i = seq - seg.first_seq
            start = seg.offsets[i]
            if seg.size - start <= room:
                end, j = seg.size, seg.count - 1
            else:
                # last record index k with end(k) - start <= room
                k = bisect.bisect_right(seg.offsets, start + room, i + 1) - 1
                if k > i:
                    end, j = seg.offsets[k], k - 1
                elif not parts:
                    end, j = seg.end_of(i), i  # one record even if larger than room
                else:
                    break
            parts.append(self.io.pread(seg.fd, end - start, start))
            room -= end - start
            last = seg.first_seq + j
            seq = last + 1
            if j != seg.count - 1 or room <= 0 or seq > self._last_seq:
                break
            si += 1
        return b"".join(parts), last

    def read_from(self, seq: int, max_bytes: int) -> bytes:
        """Concatenated encoded records with seq > `seq` (at most about max_bytes)."""
        return self.read_batch(seq, max_bytes)[0]

    def records_after(self, seq: int) -> Iterator[records.Record]:
        """Every record with seq > `seq` still in the journal, in seq order.

        Used at startup to redo untrimmed writes onto the images. Starts at
        the oldest kept record when `seq` is older than that.
        """
        after = max(seq, self.oldest_seq - 1)
        while after < self._last_seq:
            data, last = self.read_batch(after, _SCAN_CHUNK)
            if not data:
                return
            yield from records.decode_all(data)
            after = last

    def extents_after(self, seq: int) -> Iterator[tuple[int, int, int, int]]:
        """(disk_id, offset, length, flags) of every kept record with seq > `seq`.

        Reads only the 40-byte headers (through the in-memory index), so the
        dirty-block tracker can mark what a dropped journal covered cheaply.
        """
        for seg in self._segments:
            if seg.last_seq <= seq:
                continue
            start = max(0, seq + 1 - seg.first_seq)
            for i in range(start, seg.count):
                head = self.io.pread(seg.fd, records.HEADER_SIZE, seg.offsets[i])
                if len(head) < records.HEADER_SIZE:
                    raise StorageError(f"journal {self.directory}: short header read")
                _m, _v, flags, disk_id, _s, _t, offset, length, _c = records.HEADER.unpack(head)
                yield disk_id, offset, length, flags

    def drop_all(self) -> int:
        """Forget every record (journal overflow: the dirty-block bitmap covers them).

        Like trim_through(last_seq), J1 holds: the seq counter goes on after
        last_seq. The caller's duty is J3's (images fdatasync'ed first) and to
        have recorded what the records covered. Returns the last seq dropped.
        """
        last = self._last_seq
        if not self._segments:
            self._trimmed_through = max(self._trimmed_through, last)
            return last
        if self.before_delete is not None:
            self.before_delete()
        # On a full volume the state file cannot be written before space is
        # freed: delete every segment but the last first (the last one keeps
        # last_seq known, J1), then persist trimmed_through, then the last.
        try:
            self._delete(self._segments[:-1])
            self._trimmed_through = last
            self._write_state(last)
            self._delete(self._segments)
        except OSError as exc:
            raise StorageError(f"journal {self.directory}: dropping the journal failed "
                               f"({exc.strerror})") from exc
        return last

    def _delete(self, segments: list[_Segment]) -> None:
        """Close and unlink `segments` (oldest ones; the caller ordered `state`
        around this, J1/J3) and forget them, also those done before a failure."""
        try:
            for seg in segments:
                self._dirty.discard(seg)
                self.io.close(seg.fd)
                seg.fd = -1
                self._size -= seg.size
                self.io.unlink(seg.path)
        finally:
            self._segments = [s for s in self._segments if s.fd >= 0]
            self._first_seqs = [s.first_seq for s in self._segments]

    # ------------------------------------------------------------ trimming

    def would_delete(self, seq: int) -> bool:
        """True when trim_through(seq) would delete at least one segment."""
        return bool(self._segments) and self._segments[0].last_seq <= min(seq, self._last_seq)

    def trim_through(self, seq: int) -> int:
        """The target has every seq <= `seq` durably: delete whole segments whose
        last seq is <= seq. Returns the number of segments deleted.

        Caller's duty (J3): the images hold every record being deleted, i.e.
        they were fdatasync'ed after those writes; `before_delete` (if set) is
        called first for that purpose.
        """
        seq = min(seq, self._last_seq)
        if seq <= self._trimmed_through:
            return 0
        n = 0
        while n < len(self._segments) and self._segments[n].last_seq <= seq:
            n += 1
        if not n:
            self._trimmed_through = seq
            return 0
        if self.before_delete is not None:
            self.before_delete()
        self._trimmed_through = seq
        try:
            self._write_state(seq)
            self._delete(self._segments[:n])
        except OSError as exc:
            raise StorageError(f"journal {self.directory}: trim failed ({exc.strerror})") from exc
        return n

    def advance_to(self, seq: int) -> None:
        """The target holds seqs up to `seq`, beyond anything this journal has
        (our journal tail was lost). Make `seq` acked and the next seq seq + 1,
        so no seq the target already has is ever reused (J1)."""
        if seq <= self._last_seq:
            return
        log.error("target is durable through seq %d but the journal only reached %d; "
                  "continuing after %d", seq, self._last_seq, seq, extra=self._extra(seq=seq))
        self._last_seq = seq
        self.trim_through(seq)
        if self._persisted_trim < seq:
            self._write_state(seq)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for seg in self._segments:
            if seg.fd >= 0:
                with contextlib.suppress(OSError):
                    self.io.close(seg.fd)
                seg.fd = -1
