"""gRPC shell of the target: the `Target` service over per-policy `ReplicaStore`s.

Theory of operation: one `Apply` stream per policy. The stream's first message
is `open` (policy, epoch, disks); the target fences older epochs, answers
`opened{durable_seq}` and then receives deltas as runs of chunks (index 0..n,
the last with `final`). Each chunk is checked and appended by the store; on
the final chunk the delta is committed (fsync) in a worker thread and only
then acked with `ack{durable_seq}`. Applying deltas to the replica images is a
separate per-policy task that runs `apply_pending` in a thread, kicked after
each commit, so apply never delays an ack.

A second stream for the same policy with an epoch ≥ the current one replaces
the first: the old stream ends with FAILED_PRECONDITION after any store call
it is in has finished, and its partial delta is discarded, before the new one
touches the store. Blocking store calls run through `in_thread`, which lets a
cancelled caller go only once its thread is done, so two threads never work
on one policy's receive path at once.

Bounds (issue 10): the open's disks must be positive multiples of 4096 no
larger than `max_disk_bytes`, checked before anything is created; a new
policy's store is created only for a policy assigned to this target (see
`set_assigned`), and a refused creation leaves nothing behind
(cdp_target.store.LocalStores.open). A delta whose chunk payload would pass
`max_delta_bytes` ends the stream before that chunk is written (the partial
delta is discarded, as for a broken stream). The first message must come
within the node's first-message deadline (cdp_common.limits).

Quarantine: a store that fails to open at start-up does not stop the
daemon; it is kept aside (`quarantined`, with the reason), reported in error
in every heartbeat, and Apply for it is refused (FAILED_PRECONDITION) until
an operator repairs its directory and restarts the target.

Status codes: INVALID_ARGUMENT for malformed streams or chunks (the partial
delta is discarded), FAILED_PRECONDITION for a fenced epoch, a replaced
stream, disks that contradict the replicas, a quarantined store or a policy
not assigned here, ABORTED for a seq gap, UNAVAILABLE for storage failures,
shutdown and a new policy before any assignment was seen (transient: the
sender reconnects and resends from durable_seq), DEADLINE_EXCEEDED for a
stream without a first message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import grpc

from cdp_common import assignsig, limits, rpc
from cdp_common.aio import in_thread
from cdp_common.backoff import Backoff
from cdp_common.config import MAX_DISK_BYTES, TargetSection
from cdp_common.delta import Extent
from cdp_common.errors import (
    CdpError,
    FencedError,
    InvalidRequestError,
    ProtocolError,
    StorageError,
    UnavailableError,
)
from cdp_common.groups import split_member
from cdp_common.pb.cdp.v1 import replication_pb2 as rpb
from cdp_common.pb.cdp.v1 import replication_pb2_grpc as rgrpc
from cdp_target import digests, metrics
from cdp_target.applier import OnCorrupt
from cdp_target.gaps import GapBook
from cdp_target.repair import Repairer
from cdp_target.store import POLICY_NAME, LocalStores, PolicyStore
from cdp_target.storestate import DiskSpec, StoreState, check_disk_bounds
from cdp_target.undostore import RetentionOverride

__all__ = ["PolicyRuntime", "ReplicaStore", "ReplicaStores", "TargetService"]

log = logging.getLogger("target.service")

APPLY_RETRY_MAX_S = 30.0
MAX_DELTA_BYTES: int = TargetSection.__dataclass_fields__["max_delta_bytes"].default  # type: ignore[assignment]


class ReplicaStore(Protocol):
    """What the Target service needs from one policy's store.

    Implementations: `cdp_target.store.PolicyStore` (files: the real one) and
    `cdp_target.memstore.MemoryStore` (in memory, for tests of the service
    logic). tests/unit/test_replicastore_conformance.py runs one suite over
    both. All methods block (the service calls them through `in_thread`); a
    receive (begin/add_chunk/commit/abort) may run concurrently with
    `apply_pending`, never with another receive call.

    Contract:
    - `open_session(epoch)`: an epoch older than the newest seen raises
      FencedError and changes nothing; a newer one is made durable before it
      returns. Returns durable_seq: where the sender resumes.
    - `begin(first, last, checkpoint_id)`: a delta with last <= durable_seq is a duplicate:
      returns False, its chunks are checked but nothing is written, and
      `commit` acks durable_seq. A delta not starting at durable_seq + 1 (a
      gap or an overlap) or with a bad range raises ProtocolError. Any delta
      still being received is discarded first. True for a new delta. A
      nonzero `checkpoint_id` is recorded durably with the delta by `commit`
      (the delta ends at that consistency-group checkpoint; its point carries
      it, where the store keeps points).
    - `add_chunk(extents)`: checks the chunk against the policy's disks;
      FormatError discards the partial delta; ProtocolError outside a delta.
    - `commit(newest_time_ns)`: on return the delta is durable and
      durable_seq = its last seq; returns durable_seq (the ack).
      ProtocolError outside a delta.
    - `abort()`: discard the partial delta, if any (idempotent). A partial
      delta is never applied, by abort, a broken stream or a crash.
    - `apply_pending(stop, on_applied)`: redo committed deltas beyond
      applied_seq in seq order; idempotent (a redo after a crash gives the
      same replica); returns applied_seq.
    - Restart: after `close()` or a crash (no close), reopening the same
      storage recovers every committed delta (durable_seq >= every ack) and
      the newest epoch; nothing partial survives.
    - `set_disks(disks)`: DiskMismatchError when they contradict the
      recorded disks; new disk ids are added.
    """

    on_corrupt: OnCorrupt | None
    """Repair hook for committed deltas that fail their check (cdp_target.applier)."""

    @property
    def name(self) -> str:
        """The policy name."""

    @property
    def dir(self) -> Path:
        """Where the policy's side files live (gaps.json, repair.json)."""

    @property
    def durable_seq(self) -> int:
        ...

    @property
    def epoch(self) -> int:
        ...

    def snapshot(self) -> StoreState:
        """A copy of the store's counters and disks."""

    def set_disks(self, disks: Mapping[int, DiskSpec]) -> None:
        ...

    def open_session(self, epoch: int) -> int:
        ...

    def note_captured(self, captured_seq: int) -> None:
        """Remember the source's captured seq (persisted with the next state write)."""

    def begin(self, first_seq: int, last_seq: int, checkpoint_id: int = 0) -> bool:
        ...

    def add_chunk(self, extents: bytes) -> list[Extent]:
        ...

    def commit(self, newest_time_ns: int) -> int:
        ...

    def abort(self) -> None:
        ...

    def apply_pending(self, stop: Callable[[], bool] | None = None,
                      on_applied: Callable[[int, float], None] | None = None) -> int:
        ...

    def close(self) -> None:
        ...


class ReplicaStores(Protocol):
    """Where the service gets its policies' stores (blocking calls).

    `cdp_target.store.LocalStores` (a data dir) and
    `cdp_target.memstore.MemoryStores` implement it.
    """

    def existing(self) -> list[str]:
        """The policies that have a store already, sorted (opened at start)."""

    def open(self, policy: str, disks: Mapping[int, DiskSpec] | None) -> ReplicaStore:
        """Open (or create, when `disks` is given) a policy's store, recovered, not applied."""

    def remove(self, policy: str) -> bool:
        """Delete a (closed) policy's store and everything in it; False if it had none."""


class RefusedError(CdpError, grpc_status="FAILED_PRECONDITION"):
    """The policy refuses Apply streams (a failover holds it)."""


class QuarantinedError(RefusedError):
    """The policy's store failed to open at start-up; it is kept aside until repaired."""


class NotAssignedError(RefusedError):
    """The coordinator has not assigned the policy to this target: no store is created."""


class DeltaTooLargeError(ProtocolError):
    """A delta larger than the target's max_delta_bytes; it is discarded."""


@dataclass(eq=False)
class _Stream:
    epoch: int
    peer: str
    replaced: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    replaced_by: int = 0


@dataclass(eq=False)
class PolicyRuntime:
    """One policy's store plus its current stream and apply worker."""

    name: str
    store: ReplicaStore
    stream: _Stream | None = None
    takeover: asyncio.Lock = field(default_factory=asyncio.Lock)
    kick: asyncio.Event = field(default_factory=asyncio.Event)
    stop: threading.Event = field(default_factory=threading.Event)
    worker: asyncio.Task[None] | None = None
    error: str = ""
    refusal: str = ""
    """Why Apply streams are refused (a failover; cdp_target.restore_service)."""
    gap_book: GapBook | None = None
    gap_lock: threading.Lock = field(default_factory=threading.Lock)
    repair: Repairer | None = None
    """Corrupt committed deltas and their resync from the source (cdp_target.repair)."""

    @property
    def local(self) -> PolicyStore:
        """The store as the local file store: restore points and digests need its files."""
        if not isinstance(self.store, PolicyStore):
            raise StorageError(f"policy {self.name}: restore points need the local file store")
        return self.store

    @property
    def gaps(self) -> GapBook:
        if self.gap_book is None:
            self.gap_book = GapBook.load(self.store.dir)
        return self.gap_book

    def note_gap(self, c: rpb.DeltaChunk) -> None:
        with self.gap_lock:
            changed = self.gaps.note(c.first_seq, c.last_seq, c.gap_begin_time_ns,
                                     c.gap_after_seq, c.gap_end_seq, c.gap_end_time_ns,
                                     c.gap_reason)
            if self.repair is not None and c.gap_end_seq \
                    and c.first_seq <= c.gap_end_seq <= c.last_seq:
                changed = self.repair.gap_end(c.gap_begin_time_ns, c.gap_after_seq,
                                              c.gap_end_seq) or changed
            if changed:
                self.gaps.save()

    def gap_messages(self) -> list[rpb.Gap]:
        return [rpb.Gap(begin_seq=g.begin_seq, end_seq=g.end_seq, begin_time_ns=g.begin_time_ns,
                        end_time_ns=g.end_time_ns, reason=g.reason) for g in self.gaps.gaps]

    def state(self) -> rpb.PolicyState:
        s = self.store.snapshot()
        return rpb.PolicyState(
            policy=self.name, durable_seq=s.durable_seq, applied_seq=s.applied_seq,
            newest_time_ns=s.newest_time_ns, bytes_replicated=s.bytes_replicated,
            epoch=s.epoch, captured_seq=s.captured_seq,
            disks=[rpb.DiskInfo(disk_id=i, name=d.name, size_bytes=d.size_bytes)
                   for i, d in sorted(s.disks.items())],
            gaps=self.gap_messages())


class TargetService(rgrpc.TargetServicer):
    """The Target servicer. `await open_existing()` before serving; `await close()` after."""

    def __init__(self, data_dir: str | Path,
                 retention_override: RetentionOverride | None = None,
                 stores: ReplicaStores | None = None, *,
                 max_disk_bytes: int = MAX_DISK_BYTES,
                 max_delta_bytes: int = MAX_DELTA_BYTES,
                 require_assignment: bool = False,
                 verifier: assignsig.Verifier | None = None, node_id: str = "") -> None:
        """`retention_override`: the target-wide retention ([target] config) for every
        policy (UndoStore); `stores`: where the stores come from (default: the
        files under `data_dir`); `max_disk_bytes`, `max_delta_bytes`: the bounds
        of the [target] config; `require_assignment`: create stores only for
        policies the coordinator assigned here (`set_assigned`; the daemon sets
        it; False lets any policy in, for tests of the service alone)."""
        self.data_dir = Path(data_dir)
        self.stores: ReplicaStores = stores if stores is not None else LocalStores(
            self.data_dir, retention_override=retention_override)
        self.max_disk_bytes = max_disk_bytes
        self.max_delta_bytes = max_delta_bytes
        self.require_assignment = require_assignment
        self.verifier, self.node_id = verifier, node_id
        """Apply opens must carry a signed assignment naming `node_id` (None: insecure)."""
        self.assigned: set[str] | None = None
        """The policies assigned here; None until the first assignment set."""
        self.policies: dict[str, PolicyRuntime] = {}
        self.groups: dict[str, tuple[str, ...]] = {}
        """Consistency groups assigned here -> their member policies (sorted), from the
        assignments (Assignment.group / group_members); see `group_members`."""
        self.quarantined: dict[str, str] = {}
        """Policies whose store failed to open at start-up -> why."""
        self._create_lock = asyncio.Lock()
        self._closed = False

    # ------------------------------------------------------------ lifecycle

    async def open_existing(self) -> None:
        """Open every policy store and start applying its pending deltas; a store that
        fails to open is quarantined (the others keep running)."""
        for name in await in_thread(self.stores.existing):
            try:
                store = await in_thread(self.stores.open, name, None)
            except (CdpError, OSError) as exc:
                self.quarantined[name] = str(exc)
                log.error("policy store quarantined: %s", exc, extra={"policy": name})
                continue
            self._add(name, store)
            log.info("opened policy store", extra={"policy": name, "seq": store.durable_seq})

    def set_assigned(self, policies: set[str]) -> None:
        """The policies the coordinator assigns to this target (each assignment set).

        Until the first call no new store is created (UNAVAILABLE: the sender
        retries), while existing stores keep working: a coordinator that is
        down does not stop replication, and a target that has not heard from
        it cannot tell a rightful new policy from a forged one. A store of a
        policy that is no longer assigned is kept (its restore points stay
        restorable); only new stores need the assignment."""
        self.assigned = set(policies)

    def set_groups(self, groups: Mapping[str, Iterable[str]]) -> None:
        """The consistency groups of the assignments held (each assignment set)."""
        self.groups = {g: tuple(sorted(m)) for g, m in groups.items()}

    def group_members(self, group: str) -> list[str]:
        """The member policies of `group` at this target, sorted: those its assignments
        name, and every store here named ``<group>..<x>`` (cdp_common.groups), so the
        group's points stay restorable while no coordinator is heard. [] when
        `group` is no group known here."""
        names = set(self.groups.get(group, ()))
        for n in (*self.policies, *self.quarantined):
            sm = split_member(n)
            if sm is not None and sm[0] == group:
                names.add(n)
        return sorted(names)

    async def purge(self, policy: str) -> bool:
        """Delete a policy's store: replica, deltas, restore points (the coordinator
        purged the deleted policy). Never one assigned here; returns whether a store
        was deleted."""
        if policy in (self.assigned or ()) or not POLICY_NAME.match(policy):
            return False
        async with self._create_lock:
            rt = self.policies.pop(policy, None)
            if rt is not None:
                rt.stop.set()
                if rt.stream is not None:
                    rt.stream.replaced.set()
                if rt.worker is not None:
                    rt.worker.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await rt.worker
                if rt.stream is not None:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(rt.stream.done.wait(), 5)
                await in_thread(rt.store.close)
            quarantined = self.quarantined.pop(policy, None) is not None
            removed = await in_thread(self.stores.remove, policy)
            metrics.forget(policy)
        if removed or rt is not None or quarantined:
            log.warning("policy store purged: replica, deltas and restore points deleted",
                        extra={"policy": policy})
            return True
        return False

    def quarantine_reason(self, policy: str) -> str:
        return self.quarantined.get(policy, "")

    async def close(self) -> None:
        """Stop streams and apply workers (an apply in progress finishes its delta)."""
        self._closed = True
        for rt in self.policies.values():
            rt.stop.set()
            if rt.stream is not None:
                rt.stream.replaced.set()
        for rt in self.policies.values():
            if rt.worker is not None:
                rt.worker.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await rt.worker
        for rt in self.policies.values():
            if rt.stream is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(rt.stream.done.wait(), 5)
            await in_thread(rt.store.close)

    def _add(self, name: str, store: ReplicaStore) -> PolicyRuntime:
        rt = PolicyRuntime(name, store)
        rt.repair = Repairer(store.dir, lambda: rt.gaps, rt.gap_lock,
                             lambda: store.durable_seq)
        store.on_corrupt = rt.repair.corrupt
        self.policies[name] = rt
        s = store.snapshot()
        metrics.DURABLE_SEQ.labels(name).set(s.durable_seq)
        metrics.APPLIED_SEQ.labels(name).set(s.applied_seq)
        undo = getattr(store, "undo", None)   # the file store's restore points
        if undo is not None:
            metrics.RESTORE_POINTS.labels(name).set_function(lambda: len(undo.catalog.points))
            metrics.UNDO_BYTES.labels(name).set_function(
                lambda: sum(seg.size_bytes for seg in undo.catalog.segments))
        metrics.OPEN_GAPS.labels(name).set_function(
            lambda: sum(1 for g in rt.gaps.gaps if not g.end_seq))
        rt.worker = asyncio.create_task(self._apply_loop(rt), name=f"apply-{name}")
        rt.kick.set()
        return rt

    async def _runtime(self, policy: str, disks: dict[int, DiskSpec]) -> PolicyRuntime:
        async with self._create_lock:
            rt = self.policies.get(policy)
            if rt is None:
                if not disks:
                    raise InvalidRequestError(f"policy {policy}: open names no disks")
                if self.require_assignment and self.assigned is None:
                    raise UnavailableError(f"policy {policy}: no assignment received from the "
                                           f"coordinator yet; a new policy store waits for it")
                if self.require_assignment and policy not in (self.assigned or ()):
                    raise NotAssignedError(f"policy {policy} is not assigned to this target; "
                                           f"no store is created")
                store = await in_thread(self.stores.open, policy, disks)
                log.info("created policy store", extra={"policy": policy})
                return self._add(policy, store)
        if disks:
            await in_thread(rt.store.set_disks, disks)
        return rt

    # ------------------------------------------------------------ apply worker

    async def _apply_loop(self, rt: PolicyRuntime) -> None:
        # a full or failing disk: retry 1 s -> 30 s; a permanent error: every 30 s
        backoff = Backoff(1.0, APPLY_RETRY_MAX_S, hold_s=APPLY_RETRY_MAX_S, jitter=0.0)
        extra = {"policy": rt.name}

        def on_applied(seq: int, seconds: float) -> None:
            metrics.APPLY_SECONDS.observe(seconds)
            metrics.APPLIED_SEQ.labels(rt.name).set(seq)
            if rt.repair is not None:
                rt.repair.applied(seq)

        while not rt.stop.is_set():
            await rt.kick.wait()
            rt.kick.clear()
            try:
                applied = await in_thread(rt.store.apply_pending, rt.stop.is_set, on_applied)
            except CdpError as exc:
                if str(exc) != rt.error:
                    log.error("apply failed: %s", exc, extra=extra)
                rt.error = str(exc)
                await backoff.wait(exc.transient)
                rt.kick.set()
                continue
            if rt.error:
                log.info("apply recovered", extra=extra)
            rt.error = ""
            backoff.reset()
            log.debug("applied", extra={"policy": rt.name, "seq": applied})

    # ------------------------------------------------------------ Apply

    async def Apply(self, request_iterator: AsyncIterator[rpb.ApplyRequest],
                    context: grpc.aio.ServicerContext) -> AsyncIterator[rpb.ApplyResponse]:
        rt: PolicyRuntime | None = None
        me: _Stream | None = None
        try:
            first = await limits.first_message(aiter(request_iterator), "Apply stream")
            if first is None or first.WhichOneof("body") != "open":
                raise ProtocolError("the first message of an Apply stream must be open")
            o = first.open
            assignsig.check_apply(self.verifier, self.node_id, o.policy, o.epoch, o.assignment,
                                  ((d.disk_id, d.size_bytes) for d in o.disks), context)
            rt, me = await self._open(o, context.peer())
            yield rpb.ApplyResponse(opened=rpb.ApplyOpened(
                durable_seq=rt.store.durable_seq))
            async for resp in self._receive(rt, me, request_iterator):
                yield resp
        except CdpError as exc:
            self._log_end(rt, str(exc))
            await rpc.abort(context, exc)
        finally:
            if rt is not None and me is not None:
                try:
                    await in_thread(rt.store.abort)
                finally:
                    if rt.stream is me:
                        rt.stream = None
                    me.done.set()

    def _log_end(self, rt: PolicyRuntime | None, why: str) -> None:
        log.warning("apply stream ended: %s", why,
                    extra={"policy": rt.name} if rt is not None else {})

    async def _open(self, req: rpb.ApplyOpen, peer: str) -> tuple[PolicyRuntime, _Stream]:
        if self._closed:
            raise UnavailableError("target is shutting down")
        if not POLICY_NAME.match(req.policy):
            raise InvalidRequestError(f"{req.policy!r} is not a valid policy name")
        disks: dict[int, DiskSpec] = {}
        for d in req.disks:
            if d.disk_id in disks:
                raise InvalidRequestError(
                    f"policy {req.policy}: disk id {d.disk_id} listed twice")
            disks[d.disk_id] = DiskSpec(d.name, d.size_bytes)
        check_disk_bounds(req.policy, disks, self.max_disk_bytes)
        if req.policy in self.quarantined:
            raise QuarantinedError(f"policy {req.policy}: store quarantined at start-up "
                                   f"({self.quarantined[req.policy]}); repair it and restart "
                                   f"the target")
        rt = await self._runtime(req.policy, disks)
        if rt.refusal:
            raise RefusedError(rt.refusal)
        async with rt.takeover:
            if req.epoch < rt.store.epoch:
                raise FencedError(f"policy {req.policy}: epoch {req.epoch} is older than "
                                  f"epoch {rt.store.epoch} already seen")
            old = rt.stream
            if old is not None:
                old.replaced_by = req.epoch
                old.replaced.set()
                await old.done.wait()
            await in_thread(rt.store.open_session, req.epoch)
            rt.store.note_captured(req.captured_seq)
            me = _Stream(epoch=req.epoch, peer=peer)
            rt.stream = me
        log.info("apply stream opened", extra={"policy": req.policy, "epoch": req.epoch,
                                               "peer": peer,
                                               "seq": rt.store.durable_seq})
        return rt, me

    async def _receive(self, rt: PolicyRuntime, me: _Stream,
                       request_iterator: AsyncIterator[rpb.ApplyRequest],
                       ) -> AsyncIterator[rpb.ApplyResponse]:
        it = aiter(request_iterator)
        replaced = asyncio.ensure_future(me.replaced.wait())
        current: tuple[int, int] | None = None  # (first_seq, last_seq) being received
        checkpoint = 0                           # its checkpoint id (the same on every chunk)
        next_index = 0
        payload = 0
        try:
            while True:
                nxt = asyncio.ensure_future(anext(it, None))
                await asyncio.wait({nxt, replaced}, return_when=asyncio.FIRST_COMPLETED)
                if replaced.done():
                    nxt.cancel()
                    if rt.refusal:
                        raise RefusedError(rt.refusal)
                    if self._closed:
                        raise UnavailableError(f"policy {rt.name}: target is shutting down")
                    raise FencedError(f"policy {rt.name}: replaced by a newer stream "
                                      f"(epoch {me.replaced_by})")
                req = nxt.result()
                if req is None:
                    return
                if req.WhichOneof("body") != "chunk":
                    raise ProtocolError(f"policy {rt.name}: expected a delta chunk, got "
                                        f"{req.WhichOneof('body')}")
                c = req.chunk
                if current is None:
                    if c.index != 0:
                        raise ProtocolError(f"policy {rt.name}: delta [{c.first_seq}, "
                                            f"{c.last_seq}] starts at chunk {c.index}, not 0")
                    await in_thread(rt.store.begin, c.first_seq, c.last_seq, c.checkpoint_id)
                    current, next_index, payload = (c.first_seq, c.last_seq), 0, 0
                    checkpoint = c.checkpoint_id
                elif (c.first_seq, c.last_seq) != current or c.index != next_index:
                    raise ProtocolError(f"policy {rt.name}: chunk {c.index} of delta "
                                        f"[{c.first_seq}, {c.last_seq}] does not continue "
                                        f"chunk {next_index - 1} of delta {list(current)}")
                elif c.checkpoint_id != checkpoint:
                    raise ProtocolError(f"policy {rt.name}: chunk {c.index} of delta "
                                        f"[{c.first_seq}, {c.last_seq}] names checkpoint "
                                        f"{c.checkpoint_id}, its chunk 0 {checkpoint}")
                if payload + len(c.extents) > self.max_delta_bytes:
                    raise DeltaTooLargeError(
                        f"policy {rt.name}: delta [{c.first_seq}, {c.last_seq}] passes "
                        f"max_delta_bytes ({self.max_delta_bytes}) at chunk {c.index}; "
                        f"discarded")
                await in_thread(rt.store.add_chunk, c.extents)
                next_index += 1
                payload += len(c.extents)
                if c.captured_seq:
                    rt.store.note_captured(c.captured_seq)
                if not c.final:
                    continue
                before = rt.store.durable_seq
                if (c.gap_begin_time_ns or c.gap_end_seq) and c.last_seq > before:
                    await in_thread(rt.note_gap, c)  # durable before the ack (gaps.py)
                durable = await in_thread(rt.store.commit, c.newest_time_ns)
                if durable > before:
                    metrics.DELTAS.inc()
                    metrics.BYTES.inc(payload)
                    metrics.DURABLE_SEQ.labels(rt.name).set(durable)
                    rt.kick.set()
                current = None
                yield rpb.ApplyResponse(ack=rpb.ShipAck(durable_seq=durable))
        finally:
            replaced.cancel()

    # ------------------------------------------------------------ GetPolicyState

    async def GetPolicyState(self, request: rpb.PolicyStateRequest,
                             context: grpc.aio.ServicerContext) -> rpb.PolicyStateReply:
        if request.policy:
            rt = self.policies.get(request.policy)
            return rpb.PolicyStateReply(policies=[rt.state()] if rt is not None else [])
        return rpb.PolicyStateReply(
            policies=[self.policies[name].state() for name in sorted(self.policies)])

    # ------------------------------------------------------------ GetDigests

    async def GetDigests(self, request: rpb.DigestRequest,
                         context: grpc.aio.ServicerContext) -> AsyncIterator[rpb.DigestReply]:
        """Region digests of a replica (cdp_target/digests.py)."""
        async for reply in digests.serve(self._local_store, request, context):
            yield reply

    def _local_store(self, policy: str) -> PolicyStore | None:
        rt = self.policies.get(policy)
        return rt.local if rt is not None else None
