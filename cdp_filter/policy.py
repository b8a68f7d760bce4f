"""Runtime state of one policy (consistency group) on the filter.

Theory of operation: the FUSE handlers and the shipper of a policy share one
`PolicyRuntime`: its journal, its disks' image fds, and two events. `appended`
is set after every captured write (wakes the shipper); `space` is set after
every trim (wakes writers held back because the journal was over its cap).
Both run on the event loop thread, so no locks are needed; the only blocking
work done elsewhere is fsync/fdatasync, in worker threads on dup'ed or
long-lived fds.

Consistency-group checkpoints (docs/ARCHITECTURE.md "Consistency groups"):
`hold(id)` makes new writes wait before they take a seq; since a write takes
its seq and is journaled with no await in between, every write that has a seq
is in the journal the moment `hold` returns. `mark(id)` appends the CHECKPOINT
marker and lets the writers go. A hold that no mark ends within its timeout
releases by itself and abandons its id: a late mark of it writes nothing, so
a marker in the journal always means "held from the moment the source proxy
was told so until the marker".
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Protocol

from cdp_common.clock import wall_ns
from cdp_common.errors import CdpError, StorageError, UnavailableError
from cdp_common.fileio import OS_IO, FileIO
from cdp_common.forecast import Trend
from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
from cdp_common.pb.cdp.v1 import replication_pb2 as rpb
from cdp_common.records import FLAG_CHECKPOINT
from cdp_filter import metrics
from cdp_filter.intent import CHECKPOINT_S, IntentLog
from cdp_filter.journal import Journal
from cdp_filter.overflow import Mode, OverflowMachine

log = logging.getLogger("filter.policy")

NOTICE_S = 60.0  # how long a notice (set_notice) is reported


class WritesFrozenError(CdpError, grpc_status="FAILED_PRECONDITION"):
    """The policy is frozen for a planned failover: its disks take no writes (EROFS)."""


@dataclass(eq=False)
class Disk:
    name: str
    policy: str
    disk_id: int        # index among the policy's disks, config order
    size: int
    image: str
    fd: int = -1
    inode: int = 0

    def info(self) -> rpb.DiskInfo:
        return rpb.DiskInfo(disk_id=self.disk_id, name=self.name, size_bytes=self.size)


class DirtyTracker(Protocol):
    """What the FUSE handler, the shipper and this runtime need of the dirty-block
    tracker (cdp_filter.resync.Tracker, which imports this module)."""

    m: OverflowMachine

    def capture(self, d: Disk, off: int, buf: bytes) -> None: ...
    def overflow(self, why: str) -> None: ...
    def grow(self, disk_id: int, size: int) -> None: ...
    def sync_bitmaps(self) -> None: ...
    def on_durable(self, seq: int) -> None: ...
    def gap_fields(self) -> tuple[int, int]: ...
    def gap_reason(self) -> str: ...
    def fill(self, report: cpb.PolicyReport) -> None: ...
    def close(self) -> None: ...
    async def run(self) -> None: ...


class SyncWorker(Protocol):
    """What the daemon, the shipper and this runtime need of the digest sync
    (cdp_filter.sync.Syncer)."""

    def on_welcome(self, resume_from_seq: int) -> None: ...
    def on_assignment(self, a: cpb.Assignment | None) -> None: ...
    def fill(self, report: cpb.PolicyReport) -> None: ...
    async def run(self) -> None: ...


class PolicyRuntime:
    def __init__(self, name: str, journal: Journal, disks: list[Disk],
                 fsync_journal: bool = True, io: FileIO = OS_IO,
                 intent: IntentLog | None = None) -> None:
        self.name = name
        self.journal = journal
        self.disks = disks
        self.fsync_journal = fsync_journal
        self.io = io
        self.intent = intent
        """Write-intent regions (power-loss protection); None when it is off."""
        self.appended = asyncio.Event()
        self.space = asyncio.Event()
        self.error = ""
        # An event the operator must see for a while (e.g. journal corruption
        # repaired from the images), reported as the error when there is none.
        self.notice = ""
        self.notice_until = 0.0
        self.tail_cut_covered = False
        """The journal's recovery cut a corrupt tail and marked it for a dirty-block
        resync: a target ahead of the journal is then expected (shipper)."""
        self.closing = False
        self.durable_seq = journal.trimmed_through
        # Dirty-block tracking and digest sync, when dirty tracking is enabled.
        self.tracker: DirtyTracker | None = None
        self.syncer: SyncWorker | None = None
        self.m_writes = metrics.WRITES.labels(name)
        self.m_write_bytes = metrics.WRITE_BYTES.labels(name)
        self.m_shipped = metrics.SHIPPED_BYTES.labels(name)
        self.m_durable = metrics.DURABLE_SEQ.labels(name)
        metrics.JOURNAL_BYTES.labels(name).set_function(lambda: self.journal.size_bytes)
        metrics.CAPTURED_SEQ.labels(name).set_function(lambda: self.journal.last_seq)
        metrics.JOURNAL_CAP.labels(name).set(journal.cap_bytes)
        if intent is not None:
            metrics.INTENT_REGIONS.labels(name).set_function(lambda: intent.marked)
        self.m_durable.set(self.durable_seq)
        # Journal size, sampled at each report: its steady growth says when it
        # overflows. A trim frees whole segments: a drop of one is still "rising".
        self.journal_trend = Trend(window_s=60.0, min_span_s=10.0,
                                   tolerance=float(journal.segment_bytes))
        metrics.JOURNAL_FULL_IN.labels(name).set(float("inf"))
        self.held_id = 0
        """The checkpoint writers are held for (0: none)."""
        self._unheld = asyncio.Event()
        self._unheld.set()
        self._hold_timer: asyncio.TimerHandle | None = None
        self._held_since = 0.0
        self.last_checkpoint_id = 0
        """The id of the newest CHECKPOINT marker appended."""
        self.frozen = False
        """A planned failover froze the policy: new writes are refused (set_frozen)."""

    def set_frozen(self, on: bool) -> None:
        """Refuse (or accept again) writes to the policy's disks (Assignment.frozen)."""
        if on == self.frozen:
            return
        self.frozen = on
        if on:
            log.warning("frozen for a planned failover: writes to %s are refused (EROFS) "
                        "from seq %d on; the journal drains to the DR site",
                        ", ".join(d.name for d in self.disks), self.journal.last_seq + 1,
                        extra={"policy": self.name, "seq": self.journal.last_seq})
        else:
            log.warning("unfrozen: writes are accepted again", extra={"policy": self.name})

    # ------------------------------------------------------------ checkpoints

    def hold(self, checkpoint_id: int, timeout_s: float) -> str:
        """Hold new writes for checkpoint `checkpoint_id`; "" when held, else why not.

        Refused while a gap is open (overflow, resync or sync): no point there is
        consistent, so none may be a group point. A newer hold replaces an older one."""
        if self.closing:
            return "the filter is shutting down"
        if self.tracker is not None:
            begin_ns, _after = self.tracker.gap_fields()
            if begin_ns or self.tracker.m.mode is not Mode.JOURNALING:
                return (f"capture is {self.tracker.m.mode.value} with a gap open: no point "
                        "is consistent until the resync ends")
        if not 0 < checkpoint_id < 1 << 64:
            return f"checkpoint id {checkpoint_id} is out of range"
        self._release()
        self.held_id = checkpoint_id
        self._held_since = time.monotonic()
        self._unheld.clear()
        self._hold_timer = asyncio.get_running_loop().call_later(
            timeout_s, self._expire, checkpoint_id)
        return ""

    def mark(self, checkpoint_id: int) -> int:
        """Append the CHECKPOINT marker of the held checkpoint and release the writers;
        returns its seq, 0 when `checkpoint_id` is not the one held (abandoned)."""
        if checkpoint_id == 0 or checkpoint_id != self.held_id:
            return 0
        try:
            seq = self.journal.append(wall_ns(), 0, checkpoint_id, b"", FLAG_CHECKPOINT)
        except StorageError as exc:
            log.warning("checkpoint %d not marked: %s", checkpoint_id, exc,
                        extra={"policy": self.name})
            seq = 0
        else:
            self.last_checkpoint_id = checkpoint_id
            metrics.CHECKPOINT_MARKERS.labels(self.name).inc()
            self.appended.set()
        self._release()
        return seq

    def release(self, checkpoint_id: int) -> None:
        """Abandon the held checkpoint `checkpoint_id` (no marker)."""
        if checkpoint_id and checkpoint_id == self.held_id:
            self._release()

    def _expire(self, checkpoint_id: int) -> None:
        if checkpoint_id == self.held_id:
            log.info("checkpoint %d abandoned: no mark within the hold timeout",
                     checkpoint_id, extra={"policy": self.name})
            self._release()

    def _release(self) -> None:
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        if self.held_id:
            metrics.CHECKPOINT_HOLD.labels(self.name).observe(time.monotonic() - self._held_since)
        self.held_id = 0
        self._unheld.set()

    async def wait_space(self) -> None:
        """Back-pressure: return once the journal is below its cap."""
        while self.journal.over_cap:
            if self.closing:
                raise UnavailableError(f"policy {self.name}: shutting down")
            self.space.clear()
            await self.space.wait()

    def fdatasync_images(self) -> None:
        for d in self.disks:
            self.io.fdatasync(d.fd)

    # ------------------------------------------------------------ the capture point

    async def write(self, d: Disk, off: int, buf: bytes) -> None:
        """Capture one application write of `buf` at `off` (inside the disk): journal it
        (or mark its blocks while tracking), then write the image.

        A frozen policy refuses the write (WritesFrozenError; re-checked after every
        await). Every await comes before the seq is taken: a checkpoint hold, back-pressure
        while the journal is over its cap, then the durable write-intent bits of its regions (W1 of
        cdp_filter.intent); from the last check to the image write nothing yields,
        so journal order == image order (fs.py).
        """
        n = len(buf)
        while True:
            if self.frozen:
                raise WritesFrozenError(f"policy {self.name} is frozen for a planned failover")
            if self.held_id:
                await self._unheld.wait()   # a checkpoint is being taken (ms)
            elif self.tracker is None and self.journal.over_cap:
                await self.wait_space()
            elif self.intent is not None and not self.intent.ready(d.disk_id, off, n):
                await self.intent.admit(d.disk_id, off, n)
            else:
                break
        if self.tracker is not None:
            # Journals, or tracks dirty blocks when the journal is full (no await).
            self.tracker.capture(d, off, buf)
        else:
            self.journal.append(wall_ns(), d.disk_id, off, buf)
            self.io.pwrite(d.fd, buf, off)
        self.appended.set()
        self.m_writes.inc()
        self.m_write_bytes.inc(n)

    async def make_durable(self) -> None:
        """Journal and dirty bitmaps fsynced: every captured write is remembered durably."""
        if self.tracker is not None:
            await asyncio.to_thread(self.tracker.sync_bitmaps)
        await self.journal.sync_async()

    async def run_checkpoints(self, interval_s: float = CHECKPOINT_S) -> None:
        """Clear the write-intent bits of regions gone cold (W2), every `interval_s`."""
        assert self.intent is not None
        while not self.closing:
            await asyncio.sleep(interval_s)
            try:
                await self.intent.checkpoint(self.make_durable)
            except StorageError as exc:
                # The journal's sync failure is already this policy's error; the bits
                # just stay set (a resync of their regions after a power cut).
                log.warning("write-intent checkpoint failed: %s", exc,
                            extra={"policy": self.name})

    async def sync_images(self) -> None:
        await asyncio.to_thread(self.fdatasync_images)

    async def flush(self, disk: Disk) -> None:
        """What an application fsync/flush promises: journal and image durable."""
        if self.tracker is not None:
            await asyncio.to_thread(self.tracker.sync_bitmaps)
        if self.fsync_journal:
            await asyncio.gather(self.journal.sync_async(),
                                 asyncio.to_thread(self.io.fdatasync, disk.fd))
        else:
            await asyncio.to_thread(self.io.fdatasync, disk.fd)

    async def trim_through(self, seq: int) -> None:
        """The target acked `seq` durable: trim (images synced first) and wake writers."""
        if seq > self.durable_seq:
            self.durable_seq = seq
            self.m_durable.set(seq)
        if self.tracker is not None:
            self.tracker.on_durable(seq)
        if self.journal.would_delete(seq):
            await self.sync_images()
        if self.journal.trim_through(seq):
            self.space.set()

    def set_notice(self, text: str, seconds: float = NOTICE_S) -> None:
        if text:
            self.notice, self.notice_until = text, time.monotonic() + seconds

    def report(self) -> cpb.PolicyReport:
        # a failed fsync outranks the rest
        error = (self.journal.sync_failure
                 or (str(self.intent.failure) if self.intent and self.intent.failure else "")
                 or self.error)
        if not error and self.notice and time.monotonic() < self.notice_until:
            error = self.notice
        if not error and self.journal.over_cap and self.tracker is None:
            error = (f"journal full ({self.journal.size_bytes} bytes): writes are held back "
                     "until the target acks")
        report = cpb.PolicyReport(policy=self.name, captured_seq=self.journal.last_seq,
                                  captured_time_ns=self.journal.last_time_ns,
                                  journal_bytes=self.journal.size_bytes, error=error,
                                  journal_full_in_s=self.journal_full_in(),
                                  frozen=self.frozen)
        if self.tracker is not None:
            self.tracker.fill(report)
        if self.syncer is not None:
            self.syncer.fill(report)
        return report

    def journal_full_in(self, now: float | None = None) -> float:
        """Seconds until the journal reaches its cap at its steady growth; 0: not filling."""
        j = self.journal
        self.journal_trend.add(time.monotonic() if now is None else now, j.size_bytes)
        tracking = self.tracker is not None and self.tracker.m.mode is Mode.TRACKING
        eta = None if tracking else self.journal_trend.eta(j.cap_bytes)
        metrics.JOURNAL_FULL_IN.labels(self.name).set(float("inf") if eta is None else eta)
        return eta or 0.0

    def close(self) -> None:
        self.closing = True
        self._release()
        self.space.set()
        self.appended.set()
