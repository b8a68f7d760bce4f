"""Initial sync (seeding) and digest resync of one policy.

Theory of operation
-------------------
A *sync* makes the target's replica equal to the filter's image without a
full copy: the filter asks the target (through its source proxy, which
relays to the target proxy and the target: `GetDigests`) for the digest of
every region (1 MiB by default) of every disk, computes the same digests of
its image (cdp_common/digest.py: holes are not read), and marks the blocks of
every region that differs in the policy's dirty-block bitmap. When every disk
was compared the existing resync path (cdp_filter/resync.py) ships the marked
blocks as RESYNC records and ends the sync's gap with a GAP_END marker.

Phases (`SyncCore.phase`, persisted in `<data_dir>/dirty/<policy>/sync.json`):

    ""         no sync running;
    "compare"  comparing digests; the cursor (disk, offset) says where;
    "send"     compare done, the resync scan ships the marked blocks; the sync
               is done once the GAP_END marker is durable at the target.

Triggers: *seeding* — the first stream ever welcomed by a target that holds
nothing (`resume_from_seq == 0`) while the images held data when the filter
started (data the journal does not explain); *operator* — a
`sync_request_id` in the assignment larger than any adopted before (`cdpctl
sync POLICY` → `Coordinator.RequestSync`). A new request during a sync
restarts the comparison at the first region (marks already made stay).

Why it is correct while the application writes (invariant B1 of dirty.py is
kept): writes go on being journaled (or tracked on an overflow) and reach
the target in seq order after anything they overwrite. A region equal on
both sides stays equal once the journaled writes are applied; a region that
differs is marked durably (bitmap fsync) before the cursor that passed it is
persisted, and is read back by the resync scan later than any write that
came before, so later writes still win. The scan is held at its end while a
comparison runs (`Tracker.hold`), so the GAP_END marker is never written
before every disk was compared. An interrupted sync resumes: the bitmap and
the cursor are on disk, and the comparison goes on where it stopped.

Restore points taken during a sync are not consistent: the sync opens a gap
(reason "initial" or "operator") after the seq the target held when it began;
the GAP_END marker closes it (docs/FORMAT.md "Gaps").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc

from cdp_common import digest, rpc, statefile
from cdp_common.clock import wall_ns
from cdp_common.config import TlsConfig
from cdp_common.errors import CdpError, FormatError, ProtocolError, StorageError
from cdp_common.fileio import OS_IO, FileIO
from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
from cdp_common.pb.cdp.v1 import replication_pb2 as rpb
from cdp_common.pb.cdp.v1 import replication_pb2_grpc as rgrpc
from cdp_filter.overflow import Mode
from cdp_filter.policy import PolicyRuntime
from cdp_filter.resync import Tracker

log = logging.getLogger("filter.sync")

SYNC_FILE = "sync.json"
SYNC_KIND = "sync"
SYNC_VERSION = 1
NAP_S = 0.2
RETRY_S = 1.0
CALL_TIMEOUT_S = 3600.0


# ---------------------------------------------------------------- pure core

@dataclass
class SyncCore:
    """What a sync has done so far; all of it is persisted (see module docstring)."""

    phase: str = ""           # "" | "compare" | "send"
    id: int = 0               # the running sync (operator: its request id; initial: time ns)
    reason: str = ""          # "initial" | "operator"
    disk: int = 0             # compare cursor: disk index ...
    offset: int = 0           # ... and the next region's offset in it
    done_id: int = 0          # the last sync that completed
    seen_request: int = 0     # highest operator request id adopted
    seeded: bool = False      # the first welcome was seen (initial sync decided)
    compared_bytes: int = 0   # of the running sync
    differing_bytes: int = 0
    hole_bytes: int = 0       # regions that were holes or all zero at the filter
    total_bytes: int = 0
    started_ns: int = 0
    # not persisted: rate of this process's comparison
    _t0: float = field(default=0.0, repr=False)
    _b0: int = field(default=0, repr=False)

    def start(self, sync_id: int, reason: str, total_bytes: int, now_ns: int) -> None:
        self.phase, self.id, self.reason = "compare", sync_id, reason
        self.disk = self.offset = 0
        self.compared_bytes = self.differing_bytes = self.hole_bytes = 0
        self.total_bytes = total_bytes
        self.started_ns = now_ns
        self._t0, self._b0 = 0.0, 0

    def comparing(self) -> bool:
        return self.phase == "compare"

    def want_operator(self, request_id: int) -> bool:
        """Is this assignment's request new? (Adopts it.)"""
        if request_id <= self.seen_request:
            return False
        self.seen_request = request_id
        return True

    def compared(self, nbytes: int, differing: int, holes: int, now: float) -> None:
        if not self._t0:
            self._t0, self._b0 = now, self.compared_bytes
        self.compared_bytes += nbytes
        self.differing_bytes += differing
        self.hole_bytes += holes

    def rate(self, now: float) -> float:
        dt = now - self._t0
        return (self.compared_bytes - self._b0) / dt if self._t0 and dt > 0 else 0.0

    def finish(self) -> None:
        self.done_id = self.id
        self.phase, self.id = "", 0

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SyncCore:
        names = {f for f in cls.__dataclass_fields__ if not f.startswith("_")}
        core = cls(**{k: v for k, v in data.items() if k in names})
        if core.phase not in ("", "compare", "send"):
            raise ValueError(f"unknown phase {core.phase!r}")
        for name in names - {"phase", "reason", "seeded"}:
            if type(getattr(core, name)) is not int:
                raise ValueError(f"{name} is not an integer")
        return core


def differing(local: list[digest.Region], remote: bytes) -> list[digest.Region]:
    """The regions whose digests differ (`remote`: 16 bytes per region, same order)."""
    n = digest.DIGEST_BYTES
    return [r for i, r in enumerate(local) if remote[i * n:(i + 1) * n] != r.digest]


# ---------------------------------------------------------------- shell

def _local_digests(fd: int, size: int, offset: int, end: int, region: int,
                   ) -> list[digest.Region]:
    return list(digest.digests(fd, size, offset, end, region, is_zero=True))


def load_core(directory: str, io: FileIO = OS_IO) -> SyncCore:
    """The sync state in `directory` (a fresh one when there is none).

    A file that does not decode raises FormatError: guessing could skip a
    comparison that was planned (a corrupt journal's repair, an operator sync).
    """
    path = os.path.join(directory, SYNC_FILE)
    data = statefile.load(path, SYNC_KIND, SYNC_VERSION, io)
    if data is None:
        return SyncCore()
    try:
        return SyncCore.from_json(data)
    except (ValueError, TypeError) as exc:
        raise FormatError(f"{path}: corrupt sync state ({exc})") from None


def save_core(directory: str, core: SyncCore, io: FileIO = OS_IO) -> None:
    path = os.path.join(directory, SYNC_FILE)
    try:
        io.makedirs(directory, 0o700)
        statefile.save(path, SYNC_KIND, SYNC_VERSION, core.to_json(), io)
    except OSError as exc:
        raise StorageError(f"{path}: cannot save sync state ({exc.strerror})") from None


@dataclass(eq=False)
class Syncer:
    """Digest sync of one policy; needs the policy's `Tracker` (dirty tracking on)."""

    rt: PolicyRuntime
    tracker: Tracker
    core: SyncCore
    directory: str
    tls: TlsConfig
    max_message_bytes: int
    assignment: Callable[[], cpb.Assignment | None]
    connected: Callable[[], bool]
    region_bytes: int = digest.DEFAULT_REGION_BYTES
    clock: Callable[[], float] = time.monotonic
    io: FileIO = OS_IO
    wake: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    _last_error: str = field(init=False, default="")

    def __post_init__(self) -> None:
        core, rt, tracker = self.core, self.rt, self.tracker
        # Data the journal does not explain: present before this start, never seeded.
        self._data_at_start = not core.seeded and any(
            digest.has_data(d.fd, d.size) for d in rt.disks)
        if core.phase == "compare" and tracker.m.gap is None:
            self._open_gap()  # a crash between saving the sync and opening its gap
        if core.phase:
            log.info("resuming sync %d (%s) in phase %s at disk %d offset %d", core.id,
                     core.reason, core.phase, core.disk, core.offset, extra=self._extra())

    def _extra(self, **kw: object) -> dict[str, object]:
        return {"policy": self.rt.name, **kw}

    def _save(self) -> None:
        save_core(self.directory, self.core, self.io)

    @property
    def comparing(self) -> bool:
        return self.core.phase == "compare"

    # ------------------------------------------------------------ triggers

    def on_welcome(self, resume_from_seq: int) -> None:
        """Shipper hook, at every welcome, before anything is trimmed."""
        core = self.core
        if core.seeded:
            return
        core.seeded = True
        if resume_from_seq == 0 and self._data_at_start and not core.phase:
            self.request(wall_ns(), "initial")
            log.info("the target holds nothing of this policy but the image holds data: "
                     "initial sync by digests", extra=self._extra())
        else:
            self._save()

    def on_assignment(self, a: cpb.Assignment | None) -> None:
        if a is None or not a.sync_request_id or not self.core.want_operator(a.sync_request_id):
            return
        log.info("sync %d requested by the operator", a.sync_request_id, extra=self._extra())
        self.request(a.sync_request_id, "operator")

    def request(self, sync_id: int, reason: str) -> None:
        self.core.start(sync_id, reason, sum(d.size for d in self.rt.disks), wall_ns())
        self._save()
        self._open_gap()
        self.wake.set()

    def _open_gap(self) -> None:
        self.tracker.open_sync_gap(self.core.reason or "operator")

    # ------------------------------------------------------------ worker

    async def _nap(self, seconds: float = NAP_S) -> None:
        self.wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), seconds)

    async def run(self) -> None:
        while not self.rt.closing:
            core = self.core
            if core.phase == "compare":
                a = self.assignment()
                if a is None or not self.connected():
                    await self._nap()
                    continue
                try:
                    await self._compare(a)
                except (grpc.aio.AioRpcError, CdpError, OSError) as exc:
                    text = (f"{exc.code().name}: {exc.details()}"
                            if isinstance(exc, grpc.aio.AioRpcError) else str(exc))
                    if text != self._last_error:
                        self._last_error = text
                        log.warning("digest comparison interrupted (resumes at disk %d offset "
                                    "%d): %s", core.disk, core.offset, text, extra=self._extra())
                    await self._nap(RETRY_S)
                continue
            if core.phase == "send":
                self._check_done()
            await self._nap()

    async def _compare(self, a: cpb.Assignment) -> None:
        core, rt = self.core, self.rt
        channel = rpc.channel(a.source_proxy.address, self.tls, self.max_message_bytes)
        try:
            stub = rgrpc.SourceProxyStub(channel)
            while core.phase == "compare" and core.disk < len(rt.disks):
                sync_id = core.id
                d = rt.disks[core.disk]
                bm = self.tracker.bitmaps[core.disk]
                region = self.region_bytes
                call = stub.GetDigests(rpb.DigestRequest(
                    policy=rt.name, disk_id=d.disk_id, offset=core.offset, length=0,
                    region_bytes=region, algorithm=digest.ALGORITHM,
                    target_proxy_address=a.target_proxy.address,
                    target_address=a.target.address, assignment=a.signed),
                    timeout=CALL_TIMEOUT_S)
                try:
                    async for reply in call:
                        if core.id != sync_id or core.phase != "compare":
                            break  # a new request restarted the comparison
                        self._check_reply(reply, d.size)
                        end = min(d.size, reply.offset + reply.count * region)
                        local = await asyncio.to_thread(_local_digests, d.fd, d.size,
                                                        reply.offset, end, region)
                        diff = differing(local, reply.digests)
                        for r in diff:
                            bm.mark(r.offset, r.length)
                        if diff:
                            await asyncio.to_thread(bm.sync)
                        if core.id != sync_id:
                            break
                        core.compared(end - reply.offset, sum(r.length for r in diff),
                                      sum(r.length for r in local if r.hole), self.clock())
                        core.offset = end
                        await asyncio.to_thread(self._save)
                finally:
                    call.cancel()
                if core.id != sync_id or core.phase != "compare":
                    continue
                if core.offset < d.size:
                    raise ProtocolError(f"digest stream of disk {d.name} ended at offset "
                                        f"{core.offset} of {d.size}")
                core.disk, core.offset = core.disk + 1, 0
                self._save()
        finally:
            await channel.close(grace=None)
        if core.phase != "compare":
            return
        core.phase = "send"
        self._save()
        self._last_error = ""
        self.tracker.start_sync_scan()
        log.info("digest comparison done: %d of %d bytes differ (%d bytes of holes or zeros "
                 "skipped); sending the differing regions", core.differing_bytes,
                 core.compared_bytes, core.hole_bytes, extra=self._extra())

    def _check_reply(self, reply: rpb.DigestReply, size: int) -> None:
        core = self.core
        n = reply.count
        if reply.offset != core.offset or reply.region_bytes != self.region_bytes or n <= 0 \
                or len(reply.digests) != n * digest.DIGEST_BYTES \
                or reply.offset + (n - 1) * self.region_bytes >= size:
            raise ProtocolError(f"bad digest reply (offset {reply.offset}, region "
                                f"{reply.region_bytes}, count {n}, {len(reply.digests)} "
                                f"digest bytes) where offset {core.offset} was expected")

    def _check_done(self) -> None:
        t = self.tracker
        if t.mode is not Mode.JOURNALING or t.m.gap is not None or self.comparing:
            return
        if t.gap_end_seq and self.rt.durable_seq < t.gap_end_seq:
            return  # the GAP_END marker is not durable yet
        core = self.core
        log.info("sync %d (%s) done: %d bytes compared, %d differed and were resent",
                 core.id, core.reason, core.compared_bytes, core.differing_bytes,
                 extra=self._extra())
        core.finish()
        self._save()

    # ------------------------------------------------------------ reporting

    def fill(self, report: cpb.PolicyReport) -> None:
        core = self.core
        report.sync_phase = core.phase
        report.sync_id = core.id
        report.sync_done_id = core.done_id
        report.sync_reason = core.reason if core.phase else ""
        if core.phase == "compare":
            now = self.clock()
            rate = core.rate(now)
            left = max(0, core.total_bytes - core.compared_bytes)
            report.sync_done_bytes = core.compared_bytes
            report.sync_total_bytes = core.total_bytes
            report.sync_rate_bps = rate
            report.sync_eta_s = left / rate if rate > 0 else 0.0
