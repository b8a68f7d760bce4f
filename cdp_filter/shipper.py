"""Ships one policy's journal to its source proxy and trims it on acks.

Theory of operation
-------------------
The shipper follows the policy's current assignment (from the coordinator's
watch, or the last one remembered on disk when the coordinator is down). For
an assignment with a source proxy it opens a session on its `RecordSink`
(cdp_filter/sink.py: the contract; in production `SourceProxy.Ship` over
gRPC) with a `ShipHello`, and gets the welcome's `resume_from_seq` = the
target's durable seq. It then streams the journal from resume_from_seq + 1 in
batches of about `batch_bytes`, without gaps, sleeping on the policy's
`appended` event when it has caught up. The sink bounds what is in flight
(`send` blocks while the proxy does not read: gRPC flow control). Acks
(durable seqs) trim the journal (images fdatasync'ed first) and release
back-pressured writers.

Resume rules (`plan_resume`, pure):
- resume_from_seq within the journal           -> resend after it;
- resume_from_seq > last captured seq           -> the target is ahead: our
  journal tail was lost (power loss before a flush, a lost data dir) or the
  target holds another history. Skip our seq counter past it (so no seq the
  target holds is reused) only when the images get resynced too: the
  journal's recovery marked the cut tail dirty, or an operator asked for a
  digest sync after seeing the error. Otherwise the policy is in error
  (TargetAheadError) and nothing is shipped: never a silent skip;
- resume_from_seq + 1 < oldest seq still kept   -> the records the target needs
  were trimmed (the target lost acked data, or the policy moved to a new
  target): they cannot be resent. Jump over them (`skips_lost_seqs`) only
  once an operator asked for a digest sync after seeing the error (as
  `cdpctl node drain` does), else the policy is in error (JournalGapError)
  and nothing is shipped.

Any stream failure is logged once per distinct error and reported as the
policy's `error` in heartbeats. A transient one (cdp_common.rpc.TRANSIENT_CODES:
the proxy or a hop behind it is down, a seq gap to resend) is retried with
backoff 0.2 s -> 2 s; a permanent answer (fenced epoch, wrong key, a failover
holding the policy) is retried only every HOLD_S, or at once when the
assignment changes. The welcome of the new stream tells where to resume. A
different assignment (epoch, endpoints or parameters) restarts the stream at
once.

A stream that fails before the welcome with UNAVAILABLE from gRPC itself (no
connection: the proxy is dead or cut off, not a proxy that refused us: no
`cdp-answered` trailer, cdp_common.rpc) is
reported to the coordinator (`on_unreachable`, at most once per
REPORT_INTERVAL_S), which probes the proxy and rebinds the policy at once if
the probe fails too, instead of waiting for the proxy's lease to run out.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

import grpc
from google.protobuf import json_format

from cdp_common import rpc, statefile
from cdp_common.backoff import Backoff
from cdp_common.backoff import is_transient as backoff_transient
from cdp_common.config import TlsConfig
from cdp_common.errors import CdpError, ProtocolError, RemoteError, UnavailableError
from cdp_common.fileio import OS_IO, FileIO
from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
from cdp_common.pb.cdp.v1 import replication_pb2 as rpb
from cdp_filter.journal import JournalGapError
from cdp_filter.policy import PolicyRuntime
from cdp_filter.sink import Checkpoint, GrpcRecordSink, RecordSession, RecordSink

log = logging.getLogger("filter.ship")

BACKOFF_MIN_S = 0.2
BACKOFF_MAX_S = 2.0
HOLD_S = 5.0
WELCOME_TIMEOUT_S = 30.0
REPORT_INTERVAL_S = 2.0
MAX_HOLD_S = 2.0  # a checkpoint never holds writers longer, whatever the proxy asks
CACHE_KIND = "assignment"
CACHE_VERSION = 2
SETTLE_S = 5.0  # a welcomed stream this old (or one that got an ack) is healthy

UnreachableFn = Callable[[str, str, str, str], Awaitable[object]]
"""on_unreachable(node_id, address, policy, detail)."""


class Resume(enum.Enum):
    OK = "ok"
    ADVANCE = "advance"
    GAP = "gap"


class TargetAheadError(CdpError, grpc_status="FAILED_PRECONDITION"):
    """A welcome's durable seq is above what this filter ever captured."""


def plan_resume(resume_from_seq: int, oldest_seq: int, last_seq: int) -> Resume:
    if resume_from_seq > last_seq:
        return Resume.ADVANCE
    if resume_from_seq + 1 < oldest_seq:
        return Resume.GAP
    return Resume.OK


def assignment_key(a: cpb.Assignment) -> tuple[object, ...]:
    """What, when it changes, requires a new stream."""
    return (a.epoch, a.source_proxy.node_id, a.source_proxy.address, a.target_proxy.address,
            a.target.address, a.rpo_interval_s, a.compression_level, a.encryption,
            a.bandwidth_limit_mbps,
            tuple(sorted((d.disk_id, d.size_bytes) for d in a.disks)))  # a grown disk


def usable(a: cpb.Assignment | None) -> bool:
    return a is not None and bool(a.source_proxy.address) and bool(a.target_proxy.address) \
        and bool(a.target.address)


def as_error(exc: BaseException) -> BaseException:
    """A gRPC failure as the RemoteError it is (cdp_common.rpc); anything else unchanged."""
    return rpc.remote_error(exc, "") if isinstance(exc, grpc.RpcError) else exc


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TimeoutError) or backoff_transient(as_error(exc))


def describe(exc: BaseException) -> str:
    exc = as_error(exc)
    if isinstance(exc, RemoteError):
        return f"{exc.code}: {exc.details}"
    if isinstance(exc, TimeoutError):
        return "timed out waiting for the source proxy's welcome"
    if isinstance(exc, CdpError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class SyncHold:
    """A refusal that only a digest sync asked for *after* it was first seen may
    lift (a sync from before compared against another replica, or another history)."""

    def __init__(self) -> None:
        self.floor: int | None = None
        """The assignment's sync_request_id when the refusal was first seen."""

    def lifted(self, sync_request_id: int, ready: bool = True) -> bool:
        """True, ending the hold, for a newer request once `ready`; else hold on."""
        if self.floor is not None and sync_request_id > self.floor and ready:
            self.floor = None
            return True
        if self.floor is None:
            self.floor = sync_request_id
        return False


class Shipper:
    def __init__(self, rt: PolicyRuntime, filter_id: str, disks: Sequence[rpb.DiskInfo],
                 tls: TlsConfig, max_message_bytes: int, batch_bytes: int,
                 state_path: str, sink: RecordSink | None = None,
                 io: FileIO = OS_IO) -> None:
        self.rt = rt
        self.filter_id = filter_id
        self.disks = list(disks)
        # The downstream; the source proxy over gRPC unless a test injects one.
        self.sink: RecordSink = sink or GrpcRecordSink(tls, max_message_bytes)
        self.batch_bytes = batch_bytes
        self.state_path = state_path
        self.io = io
        self.connected = False
        self.welcomes = 0  # streams welcomed so far (a new link for the resync worker)
        cached = self._load()
        if cached is not None:
            rt.set_frozen(cached.frozen)   # before the coordinator answers, placed or not
        self._assignment: cpb.Assignment | None = cached if usable(cached) else None
        self._changed = asyncio.Event()
        self._welcomed = False
        self._last_logged = ""
        self.on_unreachable: UnreachableFn | None = None
        # Called with resume_from_seq at every welcome, before trimming (digest sync).
        self.on_welcome: Callable[[int], None] | None = None
        self._last_report = -REPORT_INTERVAL_S
        self._sent_seq = 0
        """Highest seq sent on the current stream (or its welcome's): acks above are lies."""
        # While the target is ahead of / behind the journal (`_accept_target_ahead`,
        # `_accept_target_behind`): an operator sync asked for since lifts the hold.
        self._ahead = SyncHold()
        self._behind = SyncHold()
        self._report_task: asyncio.Task[object] | None = None
        if self._assignment is not None:
            log.info("resuming with remembered assignment epoch %d (source proxy %s)",
                     self._assignment.epoch, self._assignment.source_proxy.address,
                     extra=self._extra(epoch=self._assignment.epoch))

    def _extra(self, **kw: object) -> dict[str, object]:
        return {"policy": self.rt.name, **kw}

    # ------------------------------------------------------------ assignment

    @property
    def assignment(self) -> cpb.Assignment | None:
        return self._assignment

    def current_assignment(self) -> cpb.Assignment | None:
        return self._assignment

    def is_connected(self) -> bool:
        return self.connected

    def _load(self) -> cpb.Assignment | None:
        """The remembered assignment (docs/FORMAT.md §1e). Only a cache: a file that
        does not decode is ignored with a warning (the coordinator's watch wins)."""
        try:
            data = statefile.load(self.state_path, CACHE_KIND, CACHE_VERSION, self.io)
            if data is None:
                return None
            # Version 1 (before statefile) is the bare message; 2 nests it.
            fields = data.get("assignment") if data["version"] >= 2 else \
                {k: v for k, v in data.items() if k != "version"}
            if not isinstance(fields, dict):
                raise json_format.ParseError("no assignment object")
            a = json_format.ParseDict(fields, cpb.Assignment())
        except (CdpError, json_format.ParseError, TypeError, ValueError) as exc:
            log.warning("ignoring unreadable %s: %s", self.state_path, exc, extra=self._extra())
            return None
        return a

    def _save(self, a: cpb.Assignment) -> None:
        try:
            statefile.save(self.state_path, CACHE_KIND, CACHE_VERSION,
                           {"assignment": json_format.MessageToDict(a)}, self.io)
        except OSError as exc:
            log.warning("cannot remember assignment in %s: %s", self.state_path, exc.strerror,
                        extra=self._extra())

    def set_assignment(self, a: cpb.Assignment | None) -> None:
        """Adopt the coordinator's current assignment for this policy (None = none)."""
        old = self._assignment
        if a is not None:
            self.rt.set_frozen(a.frozen)   # also while unplaced: production stays stopped
            if not usable(a) and a.frozen:
                self._save(a)   # remembered for a restart without the coordinator
        if a is not None and not usable(a):
            self.rt.error = f"unassigned: {a.reason}" if a.reason else ""
            a = None
        if a is None:
            if old is not None:
                log.info("policy unassigned; journaling only", extra=self._extra())
                self._assignment = None
                self._changed.set()
            return
        if old is not None and assignment_key(old) == assignment_key(a):
            if a.frozen != old.frozen:
                self._assignment = a
                self._save(a)   # a restart without the coordinator must stay frozen
            if a.sync_request_id != old.sync_request_id:
                self._assignment = a   # an operator sync: may release a target-ahead hold
                if self._ahead.floor is not None or self._behind.floor is not None:
                    self._changed.set()
            return
        log.info("new assignment epoch %d: source proxy %s, target proxy %s, target %s",
                 a.epoch, a.source_proxy.address, a.target_proxy.address, a.target.address,
                 extra=self._extra(epoch=a.epoch))
        self._assignment = a
        self._save(a)
        self._changed.set()

    # ------------------------------------------------------------ main loop

    async def run(self) -> None:
        backoff = Backoff(BACKOFF_MIN_S, BACKOFF_MAX_S, HOLD_S)
        while True:
            self._changed.clear()
            a = self._assignment
            if a is None:
                self.connected = False
                await self._changed.wait()
                continue
            self._welcomed = False
            stream = asyncio.create_task(self._stream(a), name=f"ship-{self.rt.name}")
            changed = asyncio.create_task(self._changed.wait())
            try:
                await asyncio.wait({stream, changed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                changed.cancel()
                if not stream.done():
                    stream.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.gather(stream, return_exceptions=True)
            self.connected = False
            if self._changed.is_set():
                backoff.reset()
                continue
            exc = stream.exception() if not stream.cancelled() else None
            failure = exc or UnavailableError("source proxy ended the stream")
            self._record_error(failure)
            if not self._welcomed and exc is not None:
                self._maybe_report(a, exc)
            if self._welcomed:
                backoff.reset()
            await backoff.wait(is_transient(failure), wake=self._changed)

    def _maybe_report(self, a: cpb.Assignment, exc: BaseException) -> None:
        """Report the source proxy unreachable when gRPC could not reach it at all."""
        remote = as_error(exc)
        if self.on_unreachable is None or not isinstance(remote, RemoteError):
            return
        if remote.code != "UNAVAILABLE" or remote.answered:
            return  # the proxy answered (it ended the call itself)
        now = time.monotonic()
        if now - self._last_report < REPORT_INTERVAL_S or (
                self._report_task is not None and not self._report_task.done()):
            return
        self._last_report = now
        self._report_task = asyncio.ensure_future(self.on_unreachable(
            a.source_proxy.node_id, a.source_proxy.address, self.rt.name, describe(exc)))

    def _record_error(self, exc: BaseException) -> None:
        text = describe(exc)
        self.rt.error = text
        if text != self._last_logged:
            self._last_logged = text
            log.warning("shipping stream failed: %s", text, extra=self._extra())

    def _hello(self, a: cpb.Assignment) -> rpb.ShipHello:
        return rpb.ShipHello(
            policy=self.rt.name, filter_id=self.filter_id, epoch=a.epoch, disks=self.disks,
            target_proxy_address=a.target_proxy.address, target_address=a.target.address,
            rpo_interval_s=a.rpo_interval_s, compression_level=a.compression_level,
            encryption=a.encryption, captured_seq=self.rt.journal.last_seq,
            bandwidth_limit_mbps=a.bandwidth_limit_mbps, target_proxy_id=a.target_proxy.node_id,
            assignment=a.signed)

    async def _stream(self, a: cpb.Assignment) -> None:
        rt, journal = self.rt, self.rt.journal
        session = await asyncio.wait_for(self.sink.open(a, self._hello(a)), WELCOME_TIMEOUT_S)
        acks: asyncio.Task[None] | None = None
        settle: asyncio.TimerHandle | None = None
        try:
            resume = session.resume_from_seq
            plan = plan_resume(resume, journal.oldest_seq, journal.last_seq)
            skip = False
            if plan is Resume.GAP and rt.tracker is not None \
                    and rt.tracker.m.hole_ok(resume, journal.oldest_seq):
                # Seqs dropped at a journal overflow: the dirty-block resync covers them.
                skip = True
                log.info("resuming after a journal overflow: seqs %d..%d were dropped",
                         resume + 1, journal.oldest_seq - 1, extra=self._extra(seq=resume))
            elif plan is Resume.GAP:
                self._accept_target_behind(a, resume)
                skip = True
            if plan is Resume.ADVANCE:
                self._accept_target_ahead(a, resume)
                journal.advance_to(resume)
            if self.on_welcome is not None:
                self.on_welcome(resume)
            await rt.trim_through(resume)
            self._welcomed = True
            self.welcomes += 1
            self.connected = True
            if rt.error:
                log.info("shipping to %s resumed after seq %d", a.source_proxy.address, resume,
                         extra=self._extra(seq=resume, epoch=a.epoch))
            else:
                log.info("shipping to %s from seq %d", a.source_proxy.address, resume + 1,
                         extra=self._extra(seq=resume, epoch=a.epoch))
            # The error clears once the stream proves healthy (an ack, or SETTLE_S
            # up), not at the welcome: a stream that dies on its first delta
            # (wrong key downstream) must not make the error flap.
            settle = asyncio.get_running_loop().call_later(SETTLE_S, self._clear_error)
            self._last_logged = ""
            self._sent_seq = resume
            acks = asyncio.create_task(self._read_acks(session))
            await self._send_loop(session, journal.oldest_seq - 1 if skip else resume, acks,
                                  skip)
        finally:
            if settle is not None:
                settle.cancel()
            if acks is not None:
                acks.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await acks
            await session.close()

    def _accept_target_ahead(self, a: cpb.Assignment, resume: int) -> None:
        """The target is durable beyond the last seq captured here: the journal lost
        records it had shipped (power loss, a lost data dir) or the target's state is
        not ours. Skipping the seq counter forward is safe only when the images are
        resynced too: when the journal's own recovery marked the cut tail for a
        dirty-block resync, or once an operator asked for a digest sync (`cdpctl sync`)
        after seeing this error. Otherwise nothing is shipped (TargetAheadError)."""
        rt = self.rt
        if rt.tail_cut_covered:
            rt.tail_cut_covered = False   # this cut only: a later lead is a new question
            return
        if self._ahead.lifted(a.sync_request_id):
            log.warning("target durable through seq %d, ahead of this journal (seq %d): "
                        "operator sync %d accepted; skipping ahead and resyncing by digests",
                        resume, rt.journal.last_seq, a.sync_request_id,
                        extra=self._extra(seq=resume))
            return
        raise TargetAheadError(
            f"target {a.target.node_id} is durable through seq {resume} but this filter "
            f"captured only through seq {rt.journal.last_seq} (its journal lost records, or "
            f"the target holds another history): nothing is shipped until an operator runs "
            f"`cdpctl sync {rt.name}` (a digest resync makes the replica equal the disks)")

    def _accept_target_behind(self, a: cpb.Assignment, resume: int) -> None:
        """The target needs seqs this journal trimmed after an earlier target acked
        them: the policy now names another target, or the target lost its store.
        They cannot be resent, so the stream may jump over them only once a digest
        sync makes the replica equal the disks: one an operator (or `cdpctl node
        drain`) asked for after this was seen, so it compares every region
        against this target. Otherwise nothing is shipped (JournalGapError)."""
        rt = self.rt
        synced = rt.tracker is not None and rt.tracker.m.gap is not None
        if self._behind.lifted(a.sync_request_id, ready=synced):
            # (the sync's gap is open: every point from here on is marked inconsistent
            # until its GAP_END, so none shows the replica without the trimmed seqs)
            log.warning("target durable through seq %d, behind this journal (from seq %d): "
                        "operator sync %d accepted; skipping the trimmed seqs and "
                        "resyncing by digests", resume, rt.journal.oldest_seq,
                        a.sync_request_id, extra=self._extra(seq=resume))
            return
        raise JournalGapError(
            f"target {a.target.node_id} is durable through seq {resume} but the journal "
            f"only keeps seqs from {rt.journal.oldest_seq} (the target lost acked data, or "
            f"the policy moved to a new target): nothing is shipped until an operator runs "
            f"`cdpctl sync {rt.name}` (a digest resync makes the replica equal the disks)")

    async def _send_loop(self, session: RecordSession, sent: int,
                         acks: asyncio.Task[None], skip: bool = False) -> None:
        rt, journal = self.rt, self.rt.journal
        while True:
            data, last = journal.read_batch(sent, self.batch_bytes)
            if data:
                gap_ns, gap_after = (rt.tracker.gap_fields() if rt.tracker is not None
                                     else (0, 0))
                await session.send(rpb.RecordBatch(
                    records=data, captured_seq=journal.last_seq, skips_lost_seqs=skip,
                    gap_begin_time_ns=gap_ns, gap_after_seq=gap_after,
                    gap_reason=rt.tracker.gap_reason() if gap_ns and rt.tracker else ""))
                skip = False
                sent = self._sent_seq = last
                rt.m_shipped.inc(len(data))
                if acks.done():
                    self._ack_reader_ended(acks)
                continue
            rt.appended.clear()
            if sent + 1 < journal.oldest_seq:
                # The journal was dropped under this stream (overflow to dirty
                # tracking): start a new stream, which may jump the hole.
                raise JournalGapError(f"journal dropped after seq {sent} (overflow)")
            if journal.last_seq > sent:
                continue
            if rt.closing:
                raise UnavailableError("filter shutting down")
            waiter = asyncio.create_task(rt.appended.wait())
            try:
                await asyncio.wait({waiter, acks}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
            if acks.done():
                self._ack_reader_ended(acks)

    @staticmethod
    def _ack_reader_ended(acks: asyncio.Task[None]) -> None:
        acks.result()  # raises the stream's error, if any
        raise UnavailableError("source proxy ended the stream")

    def _clear_error(self) -> None:
        self.rt.error = ""

    async def _checkpoint(self, session: RecordSession, cp: Checkpoint) -> None:
        """A consistency-group checkpoint command of the source proxy (policy.py)."""
        rt = self.rt
        if cp.action == "hold":
            why = rt.hold(cp.checkpoint_id, max(0.0, min(cp.timeout_s, MAX_HOLD_S)))
            if why:
                log.debug("checkpoint %d refused: %s", cp.checkpoint_id, why,
                          extra=self._extra())
            await session.send_held(rpb.CheckpointHeld(
                checkpoint_id=cp.checkpoint_id, refused=bool(why), reason=why))
        elif cp.action == "mark":
            rt.mark(cp.checkpoint_id)
        else:
            rt.release(cp.checkpoint_id)

    async def _read_acks(self, session: RecordSession) -> None:
        async for durable_seq in session.acks():
            if isinstance(durable_seq, Checkpoint):
                await self._checkpoint(session, durable_seq)
                continue
            if durable_seq > self._sent_seq:
                # trimming on it would drop records the target never got
                raise ProtocolError(f"source proxy acked seq {durable_seq}, above the last "
                                    f"seq shipped ({self._sent_seq})")
            self._clear_error()
            await self.rt.trim_through(durable_seq)
