"""Dirty-block tracking and resync of one policy: the I/O shell around overflow.py.

Theory of operation
-------------------
`Tracker.capture` replaces "journal append + image pwrite" in the FUSE write
path (no await inside, so image order == seq order still holds). In
JOURNALING/RESYNCING it journals; when the journal is at its cap, or an
append fails with ENOSPC/EDQUOT, it *overflows* (never fails the write):

1. mark in the bitmaps every block the journal's unacked records touched
   (headers only), fsync the bitmaps (preallocated: no free space needed);
2. open the gap (time, lost_after = seq acked so far, lost_through = last
   seq) and persist `state.json` (tmp + fsync + rename + dir fsync);
3. fdatasync the images (J3); drop every journal segment (`Journal.drop_all`,
   which frees space before it writes its state); on a full volume, where
   step 2 could not write, persist `state.json` now; wake writers.

A crash between any two steps is safe: before 2 the journal still holds
the records (replayed and shipped as usual, the marks only cost a resync);
after 2, a restart finds bits set and tracks again, allowing the stream to
jump over the seqs missing from the journal (their blocks are marked).

`run()` is the resync worker. In TRACKING it waits for a shipper stream
welcomed after the overflow (`link_up`: the target answered again) and a
journal below half its cap, then scans the bitmaps in
order: each dirty block is read from the image and appended as a RESYNC
record in one event-loop step; the scan pauses while the journal is above
half its cap (application writes keep their room). When the scan passed
every disk it appends the GAP_END marker and returns to JOURNALING. Bits are
cleared as resync records are acked (overflow.OverflowMachine.acked); the
ones still set when the GAP_END seq is acked are all covered (`settle_seq`)
and cleared at once, also after a restart.

On-disk (docs/FORMAT.md "Dirty-block bitmap"):
    <data_dir>/dirty/<policy>/<disk>.bitmap
    <data_dir>/dirty/<policy>/state.json  {"version": 1, "mode", "gap", "loss",
                                           "settle_seq"}
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time
from collections.abc import Callable

from cdp_common import statefile
from cdp_common.clock import wall_ns
from cdp_common.errors import FormatError, StorageError
from cdp_common.fileio import OS_IO, FileIO
from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
from cdp_common.records import FLAG_GAP_END, FLAG_RESYNC, GAP_END_PAYLOAD, MARKER_FLAGS
from cdp_filter.dirty import DirtyBitmap
from cdp_filter.overflow import Event, Gap, Mode, OverflowMachine
from cdp_filter.policy import Disk, PolicyRuntime

log = logging.getLogger("filter.resync")

STATE_FILE = "state.json"
STATE_KIND = "resync"
STATE_VERSION = 1
STEP_BLOCKS = 32         # blocks read per event-loop step
NAP_S = 0.2


def save_state(directory: str, data: dict[str, object], io: FileIO = OS_IO) -> None:
    """Durably replace the resync `state.json` in `directory` (docs/FORMAT.md §1a)."""
    path = os.path.join(directory, STATE_FILE)
    try:
        statefile.save(path, STATE_KIND, STATE_VERSION, data, io)
    except OSError as exc:
        raise StorageError(f"{path}: cannot save resync state ({exc.strerror})") from None


def journal_full(exc: BaseException) -> bool:
    """Is this append failure 'no space' (ENOSPC/EDQUOT) rather than a broken disk?"""
    cause = exc.__cause__ if isinstance(exc, StorageError) else exc
    return isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT)


class Tracker:
    """Overflow/resync of one policy; attach with `rt.tracker = Tracker(...)`."""

    def __init__(self, rt: PolicyRuntime, directory: str, block_bytes: int,
                 link: Callable[[], int] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 hold: Callable[[], bool] | None = None) -> None:
        self.rt = rt
        # True while a digest sync compares (cdp_filter/sync.py): its marks are
        # bits with a reason, and a scan must not end (GAP_END) before it is done.
        self.hold = hold or (lambda: False)
        self.gap_end_seq = 0  # seq of the last GAP_END marker appended (0: none yet)
        self.directory = directory
        self.block_bytes = block_bytes
        self.link = link or (lambda: 0)
        self._link_at_overflow = 0
        self._full_at = 0  # journal bytes when its volume last ran full (0: never)
        self.clock = clock
        self.m = OverflowMachine()
        self.settle_seq = 0
        self.target_ahead_ok = False
        self.wake = asyncio.Event()
        os.makedirs(directory, exist_ok=True)
        self.io = rt.io
        self.bitmaps = [DirtyBitmap.open(os.path.join(directory, f"{d.name}.bitmap"),
                                         block_bytes, d.size, rt.io) for d in rt.disks]
        self._load()

    def _extra(self, **kw: object) -> dict[str, object]:
        return {"policy": self.rt.name, **kw}

    # ------------------------------------------------------------ state file

    def _load(self) -> None:
        path = os.path.join(self.directory, STATE_FILE)
        data: dict[str, object] = statefile.load(path, STATE_KIND, STATE_VERSION) or {}
        try:
            mode = Mode(data.get("mode", Mode.JOURNALING.value))
            g = data.get("gap")
            self.m.gap = Gap(**g) if isinstance(g, dict) else None
            loss = data.get("loss")
            self.m.loss = (int(loss[0]), int(loss[1])) if isinstance(loss, list) else None
            self.settle_seq = int(data.get("settle_seq", 0))  # type: ignore[call-overload]
            # A power loss or a cut journal tail lost seqs the target may hold; their
            # regions are marked, so the stream may skip ahead (until the gap ends).
            self.target_ahead_ok = bool(data.get("target_ahead_ok", False))
        except (TypeError, ValueError, IndexError) as exc:
            raise FormatError(f"{path}: corrupt resync state ({exc})") from None
        if self.target_ahead_ok and self.m.gap is not None:
            self.rt.tail_cut_covered = True
        dirty = self.dirty_blocks
        if mode is Mode.JOURNALING and dirty and not self.settle_seq and not self.hold():
            mode = Mode.TRACKING  # bits without a reason: resync them to be safe
        if mode is not Mode.JOURNALING:
            # A restart resumes tracking; the scan starts again once the link is up.
            # Any seq missing from the journal was dropped after its blocks were
            # marked (overflow step 1), so the stream may jump over it.
            self.m.mode = Mode.TRACKING
            self.m.open_gap(wall_ns(), self.rt.durable_seq, self.rt.journal.last_seq,
                            "restart")
            log.warning("resuming dirty-block tracking: %d dirty blocks to resync", dirty,
                        extra=self._extra())
            self._persist()

    def _persist(self) -> None:
        g = self.m.gap
        save_state(self.directory, {
            "mode": self.m.mode.value,
            "gap": None if g is None else {"begin_time_ns": g.begin_time_ns,
                                           "lost_after_seq": g.lost_after_seq,
                                           "lost_through_seq": g.lost_through_seq,
                                           "reason": g.reason},
            "loss": list(self.m.loss) if self.m.loss is not None else None,
            "settle_seq": self.settle_seq,
            "target_ahead_ok": self.target_ahead_ok and g is not None}, self.io)

    # ------------------------------------------------------------ properties

    @property
    def mode(self) -> Mode:
        return self.m.mode

    @property
    def dirty_blocks(self) -> int:
        return sum(b.count for b in self.bitmaps)

    @property
    def low_water(self) -> int:
        """Journal size the resync keeps below: half the cap, or half of what fit on
        the journal volume when it last ran full (else resync would refill it)."""
        low = self.rt.journal.cap_bytes // 2
        if self._full_at:
            low = min(low, max(self._full_at // 2, 2 * self.block_bytes))
        return low

    # ------------------------------------------------------------ write path

    def capture(self, d: Disk, off: int, buf: bytes) -> None:
        """Journal (or track) one application write, then write the image. No await."""
        m = self.m
        if m.mode is not Mode.TRACKING:
            j = self.rt.journal
            if j.over_cap:
                self.overflow(f"journal reached its cap of {j.cap_bytes} bytes")
            else:
                try:
                    j.append(wall_ns(), d.disk_id, off, buf)
                except StorageError as exc:
                    if not journal_full(exc):
                        raise
                    self._full_at = self.rt.journal.size_bytes
                    self.overflow(f"journal volume full: {exc}")
        if m.mode is Mode.TRACKING:
            bm = self.bitmaps[d.disk_id]
            bm.mark(off, len(buf))
            m.written(d.disk_id, bm.block_range(off, len(buf)))
        self.io.pwrite(d.fd, buf, off)

    def overflow(self, why: str) -> None:
        """Switch to dirty tracking (see the module docstring for the order of steps)."""
        m, rt, j = self.m, self.rt, self.rt.journal
        if m.mode is Mode.TRACKING:
            return
        lost_after = rt.durable_seq
        marked = 0
        for disk_id, off, length, flags in j.extents_after(lost_after):
            if flags & MARKER_FLAGS or disk_id >= len(self.bitmaps):
                continue
            marked += self.bitmaps[disk_id].mark(off, length)
        for b in self.bitmaps:
            b.sync()
        m.open_gap(wall_ns(), lost_after, j.last_seq)
        m.handle(Event.OVERFLOW)
        self.settle_seq = 0
        # The state first: a restart after the drop must know which seqs the stream
        # may jump (the journal's own state then says they were all acked). On a
        # full volume it cannot be written yet; the drop frees space for it.
        persisted = self._try_persist()
        rt.fdatasync_images()
        last = j.drop_all()
        if not persisted:
            self._try_persist()
        log.warning("%s: tracking dirty blocks; dropped journal seqs %d..%d (%d blocks marked, "
                    "%d dirty)", why, lost_after + 1, last, marked, self.dirty_blocks,
                    extra=self._extra(seq=last))
        # The stream that was open saw the journal vanish and ends; resync only on
        # a stream welcomed after now (a stalled target never welcomes one).
        self._link_at_overflow = self.link()
        rt.space.set()
        self.wake.set()

    def _try_persist(self) -> bool:
        try:
            self._persist()
        except StorageError as exc:
            # The bits are durable; a restart finds them and tracks again (_load).
            log.error("%s", exc, extra=self._extra())
            return False
        return True

    def link_up(self) -> bool:
        gen = self.link()
        if gen == 0:
            return False
        # A new stream was welcomed, or the stream that saw the overflow had sent
        # everything and the target has acked all of it (it answers again).
        g = self.m.gap
        return gen != self._link_at_overflow or (
            g is not None and self.rt.durable_seq >= g.lost_through_seq)

    def grow(self, disk_id: int, size: int) -> None:
        """The disk grew to `size` bytes (its new blocks start clean)."""
        self.bitmaps[disk_id].grow(size)

    def sync_bitmaps(self) -> None:
        for b in self.bitmaps:
            b.sync()

    # ------------------------------------------------------------ acks

    def on_durable(self, seq: int) -> None:
        for disk, block in self.m.acked(seq):
            self.bitmaps[disk].clear(block)
        if self.settle_seq and seq >= self.settle_seq and self.m.mode is Mode.JOURNALING:
            for b in self.bitmaps:
                b.clear_all()
            self.sync_bitmaps()
            self.settle_seq = 0
            self._persist()
            log.info("resync settled: the target holds every resynced block durably",
                     extra=self._extra(seq=seq))

    # ------------------------------------------------------------ worker

    async def _nap(self) -> None:
        self.wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), NAP_S)

    async def run(self) -> None:
        rt, m = self.rt, self.m
        while not rt.closing:
            if m.mode is Mode.TRACKING and self.link_up() \
                    and rt.journal.size_bytes < self.low_water:
                m.handle(Event.LINK_READY)
                self._persist()
                m.start_scan(self.dirty_blocks, self.clock())
                log.info("link is up: resyncing %d dirty blocks of %d bytes",
                         self.dirty_blocks, self.block_bytes, extra=self._extra())
            if m.mode is Mode.RESYNCING:
                await self._scan()
                continue
            await self._nap()

    async def _scan(self) -> None:
        rt, m, j = self.rt, self.m, self.rt.journal
        while m.mode is Mode.RESYNCING and not rt.closing:
            if j.size_bytes >= self.low_water or not self.link_up():
                await self._nap()
                continue
            for _ in range(STEP_BLOCKS):
                if not self._step():
                    if m.mode is Mode.RESYNCING:
                        await self._nap()  # held at the end while a digest sync compares
                    return
                if j.size_bytes >= self.low_water:
                    break
            rt.appended.set()
            await asyncio.sleep(0)

    def _step(self) -> bool:
        """Resync one dirty block (or finish); False when the scan is over."""
        m, j = self.m, self.rt.journal
        di, blk = m.cursor
        while di < len(self.bitmaps):
            bm = self.bitmaps[di]
            b = bm.next_set(blk)
            while b >= 0 and m.is_pending(di, b):
                b = bm.next_set(b + 1)
            if b >= 0:
                break
            di, blk = di + 1, 0
        if di >= len(self.bitmaps):
            if self.hold():
                m.cursor = (0, 0)  # a comparison may still mark blocks anywhere: go round
                return False
            m.cursor = (di, 0)
            self._finish()
            return False
        d = self.rt.disks[di]
        off = b * self.block_bytes
        n = min(self.block_bytes, d.size - off)
        data = os.pread(d.fd, n, off)
        try:
            seq = j.append(wall_ns(), di, off, data, FLAG_RESYNC)
        except StorageError as exc:
            if not journal_full(exc):
                raise
            self._full_at = self.rt.journal.size_bytes
            self.overflow(f"journal volume full during resync: {exc}")
            return False
        m.sent(di, b, seq, n)
        m.cursor = (di, b + 1)
        return True

    def _finish(self) -> None:
        m, j = self.m, self.rt.journal
        g = m.gap
        payload = GAP_END_PAYLOAD.pack(g.begin_time_ns if g else wall_ns(),
                                       g.lost_after_seq if g else self.rt.durable_seq)
        try:
            seq = j.append(wall_ns(), 0, 0, payload, FLAG_GAP_END)
        except StorageError as exc:
            if not journal_full(exc):
                raise
            self._full_at = self.rt.journal.size_bytes
            self.overflow(f"journal volume full at the end of a resync: {exc}")
            return
        m.handle(Event.SCAN_DONE)
        self.gap_end_seq = seq
        self.settle_seq = seq if self.dirty_blocks else 0
        self._persist()
        self.rt.appended.set()
        p = m.progress
        log.info("resync done: %d blocks, %d bytes; the gap ends at seq %d", p.sent_blocks,
                 p.sent_bytes, seq, extra=self._extra(seq=seq))

    # ------------------------------------------------------------ digest sync hooks

    def open_sync_gap(self, reason: str) -> None:
        """A digest sync begins: restore points after the target's durable seq are not
        consistent until the sync's GAP_END (an open overflow gap is kept as it is)."""
        self.m.open_gap(wall_ns(), self.rt.durable_seq, 0, reason)
        self._persist()
        self.rt.appended.set()

    def start_sync_scan(self) -> None:
        """A digest sync compared every disk: ship the marked blocks, then GAP_END.
        In TRACKING or RESYNCING the running overflow resync does it."""
        if self.m.mode is Mode.JOURNALING:
            self.m.handle(Event.SYNC_REQUEST)
            self.m.start_scan(self.dirty_blocks, self.clock())
            self._persist()
            log.info("sync: resending %d dirty blocks of %d bytes", self.dirty_blocks,
                     self.block_bytes, extra=self._extra())
        self.wake.set()

    # ------------------------------------------------------------ reporting

    def gap_fields(self) -> tuple[int, int]:
        """(gap_begin_time_ns, gap_after_seq) for record batches, (0, 0) when no gap."""
        g = self.m.gap
        return (g.begin_time_ns, g.lost_after_seq) if g is not None else (0, 0)

    def gap_reason(self) -> str:
        """Why the open gap opened ("overflow", "initial", "operator", "corrupt"; "": none)."""
        return self.m.gap.reason if self.m.gap is not None else ""

    def fill(self, report: cpb.PolicyReport) -> None:
        """Capture mode, dirty bytes, the open gap and resync progress, into a heartbeat."""
        p = self.m.progress
        now = self.clock()
        resyncing = self.m.mode is Mode.RESYNCING
        report.capture_mode = self.m.mode.value
        report.dirty_bytes = self.dirty_blocks * self.block_bytes
        report.gap_begin_time_ns = self.gap_fields()[0]
        report.sync_done_bytes = p.sent_bytes
        report.sync_total_bytes = p.planned_blocks * self.block_bytes
        report.sync_rate_bps = p.rate(now) if resyncing else 0.0
        report.sync_eta_s = p.eta_s(now, self.block_bytes) if resyncing else 0.0

    def close(self) -> None:
        for b in self.bitmaps:
            with contextlib.suppress(StorageError):
                b.sync()
            b.close()
