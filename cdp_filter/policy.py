"""Runtime state of one policy (consistency group) on the filter.

Theory of operation: the FUSE handlers and the shipper of a policy share one
`PolicyRuntime`: its journal, its disks' image fds, and two events. `appended`
is set after every captured write (wakes the shipper); `space` is set after
every trim (wakes writers held back because the journal was over its cap).
Both run on the event loop thread, so no locks are needed; the only blocking
work done elsewhere is fsync/fdatasync, in worker threads on dup'ed or
long-lived fds.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import Protocol

from cdp_common.errors import UnavailableError
from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
from cdp_common.pb.cdp.v1 import replication_pb2 as rpb
from cdp_filter import metrics
from cdp_filter.journal import Journal
from cdp_filter.overflow import OverflowMachine

NOTICE_S = 60.0  # how long a notice (set_notice) is reported


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
    def sync_bitmaps(self) -> None: ...
    def on_durable(self, seq: int) -> None: ...
    def gap_fields(self) -> tuple[int, int]: ...
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
                 fsync_journal: bool = True) -> None:
        self.name = name
        self.journal = journal
        self.disks = disks
        self.fsync_journal = fsync_journal
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
        self.m_durable.set(self.durable_seq)

    async def wait_space(self) -> None:
        """Back-pressure: return once the journal is below its cap."""
        while self.journal.over_cap:
            if self.closing:
                raise UnavailableError(f"policy {self.name}: shutting down")
            self.space.clear()
            await self.space.wait()

    def fdatasync_images(self) -> None:
        for d in self.disks:
            os.fdatasync(d.fd)

    async def sync_images(self) -> None:
        await asyncio.to_thread(self.fdatasync_images)

    async def flush(self, disk: Disk) -> None:
        """What an application fsync/flush promises: journal and image durable."""
        if self.tracker is not None:
            await asyncio.to_thread(self.tracker.sync_bitmaps)
        if self.fsync_journal:
            await asyncio.gather(self.journal.sync_async(), asyncio.to_thread(os.fdatasync,
                                                                               disk.fd))
        else:
            await asyncio.to_thread(os.fdatasync, disk.fd)

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
        error = self.journal.sync_failure or self.error   # a failed fsync outranks the rest
        if not error and self.notice and time.monotonic() < self.notice_until:
            error = self.notice
        if not error and self.journal.over_cap and self.tracker is None:
            error = (f"journal full ({self.journal.size_bytes} bytes): writes are held back "
                     "until the target acks")
        report = cpb.PolicyReport(policy=self.name, captured_seq=self.journal.last_seq,
                                  captured_time_ns=self.journal.last_time_ns,
                                  journal_bytes=self.journal.size_bytes, error=error)
        if self.tracker is not None:
            self.tracker.fill(report)
        if self.syncer is not None:
            self.syncer.fill(report)
        return report

    def close(self) -> None:
        self.closing = True
        self.space.set()
        self.appended.set()
