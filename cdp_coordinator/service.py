"""gRPC shell around the coordinator state machine.

`CoordinatorService` owns a `CoordinatorState`, persists what changes to a
`StateStore`, and serves `cdp.v1.Coordinator`. Every RPC and the background
ticker end in `flush()`: tick the state, persist the changed assignments,
and offer each watcher its new `AssignmentSet` when it differs from the last
one offered. A watcher's queue holds one set ("latest wins"): a slow watcher
skips intermediate sets but always ends on the current one, and memory per
watcher is bounded.

Time: leases use `clock` (monotonic seconds); RPO lag uses `wall` (epoch
seconds), because capture times come from the nodes' wall clocks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import grpc

from cdp_common.config import CoordinatorConfig, PolicyConfig
from cdp_common.errors import CdpError
from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
from cdp_common.pb.cdp.v1 import coordinator_pb2_grpc as cgrpc
from cdp_coordinator.state import (
    Assignment,
    CoordinatorState,
    Endpoint,
    NodeInfo,
    Report,
    Role,
    Status,
)
from cdp_coordinator.store import StateStore

log = logging.getLogger("coord.service")

TICK_S = 0.2


def _endpoint(e: Endpoint) -> cpb.Endpoint:
    return cpb.Endpoint(node_id=e.node_id, address=e.address)


def assignment_pb(a: Assignment, p: PolicyConfig) -> cpb.Assignment:
    return cpb.Assignment(
        policy=a.policy, epoch=a.epoch, filter=_endpoint(a.filter),
        source_proxy=_endpoint(a.source_proxy), target_proxy=_endpoint(a.target_proxy),
        target=_endpoint(a.target),
        disks=[cpb.PolicyDisk(disk_id=i, filter=d.filter, name=d.name, size_bytes=d.size_bytes)
               for i, d in enumerate(p.disks)],
        rpo_interval_s=p.rpo_interval_s, compression_level=p.compression_level,
        encryption=p.encryption, reason=a.reason)


def node_info_pb(n: NodeInfo) -> cpb.NodeInfo:
    return cpb.NodeInfo(id=n.id, role=n.role, site=n.site, address=n.address,  # type: ignore[arg-type]
                        capacity=n.capacity, metrics_address=n.metrics_address, pid=n.pid)


def status_pb(status: Status, now_ns: int) -> cpb.StatusReply:
    return cpb.StatusReply(
        nodes=[cpb.NodeStatus(info=node_info_pb(n.info), state=n.state,
                              last_seen_age_s=n.last_seen_age_s) for n in status.nodes],
        policies=[cpb.PolicyStatus(
            name=p.name, source_proxy=p.source_proxy, target_proxy=p.target_proxy,
            target=p.target, filter=p.filter, epoch=p.epoch, captured_seq=p.captured_seq,
            durable_seq=p.durable_seq, applied_seq=p.applied_seq, rpo_lag_s=p.rpo_lag_s,
            bytes_replicated=p.bytes_replicated, journal_bytes=p.journal_bytes, state=p.state,
            reason=p.reason, rpo_interval_s=p.rpo_interval_s, rpo_warning_s=p.rpo_warning_s,
            rpo_error_s=p.rpo_error_s) for p in status.policies],
        now_ns=now_ns)


def report_from_pb(r: cpb.PolicyReport) -> Report:
    return Report(policy=r.policy, captured_seq=r.captured_seq,
                  captured_time_ns=r.captured_time_ns, durable_seq=r.durable_seq,
                  newest_time_ns=r.newest_time_ns, bytes_replicated=r.bytes_replicated,
                  journal_bytes=r.journal_bytes, error=r.error, applied_seq=r.applied_seq)


class _Watcher:
    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.queue: asyncio.Queue[cpb.AssignmentSet | None] = asyncio.Queue(maxsize=1)
        self.last: cpb.AssignmentSet | None = None

    def offer(self, item: cpb.AssignmentSet | None) -> None:
        """Replace whatever is still queued: the newest set wins."""
        while True:
            try:
                self.queue.put_nowait(item)
                return
            except asyncio.QueueFull:
                self.queue.get_nowait()


class CoordinatorService(cgrpc.CoordinatorServicer):
    def __init__(self, config: CoordinatorConfig, store: StateStore,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.wall = wall
        self.heartbeat_ms = config.coordinator.heartbeat_ms
        self.lease_ms = config.coordinator.lease_ms
        self.state = CoordinatorState(lease_s=self.lease_ms / 1000)
        self._watchers: set[_Watcher] = set()
        self._unsaved: set[str] = set()
        self._closed = False
        snap = store.load()
        now = clock()
        self.state.restore(snap.nodes, snap.policies, snap.assignments, now)
        self.state.set_policies(config.policies, now)
        store.save_policies(list(config.policies))
        self.flush()
        log.info("coordinator state loaded: %d nodes, %d policies",
                 len(self.state.nodes), len(self.state.policies))

    # ------------------------------------------------------------ plumbing

    def flush(self) -> list[str]:
        """Tick the state; persist and push what changed. Raises StorageError."""
        changed = self.state.tick(self.clock())
        self._unsaved.update(changed)
        if self._unsaved:
            rows = [self.state.assignments[n] for n in sorted(self._unsaved)
                    if n in self.state.assignments]
            self.store.save_assignments(rows)
            self._unsaved.clear()
        if changed:
            self._notify()
        return changed

    def register(self, info: NodeInfo) -> None:
        """Register (or re-register) a node, persist it, push changes. Raises StorageError."""
        self.state.register(info, self.clock())
        self.store.save_node(info)
        self.flush()

    def _notify(self) -> None:
        for w in list(self._watchers):
            current = self.assignment_set(w.node_id)
            if current != w.last:
                w.last = current
                w.offer(current)

    def assignment_set(self, node_id: str) -> cpb.AssignmentSet:
        return cpb.AssignmentSet(assignments=[
            assignment_pb(a, self.state.policies[a.policy])
            for a in self.state.assignments_for(node_id)])

    async def ticker(self, period_s: float = TICK_S) -> None:
        """Expire leases and push changes until cancelled."""
        while True:
            await asyncio.sleep(period_s)
            try:
                self.flush()
            except CdpError as exc:
                log.error("%s", exc)

    def close(self) -> None:
        """End every watch stream (used on shutdown)."""
        self._closed = True
        for w in list(self._watchers):
            w.offer(None)

    async def _flush_or_abort(self, context: grpc.aio.ServicerContext) -> None:
        try:
            self.flush()
        except CdpError as exc:
            log.error("%s", exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    # ------------------------------------------------------------ RPCs

    async def Register(self, request: cpb.RegisterRequest,
                       context: grpc.aio.ServicerContext) -> cpb.RegisterReply:
        n = request.node
        if not n.id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "node.id is empty")
        if n.role not in {int(r) for r in Role} or n.role == Role.UNSPECIFIED:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"node {n.id}: role {n.role} is not a valid role")
        info = NodeInfo(id=n.id, role=int(n.role), site=n.site or "default", address=n.address,
                        capacity=n.capacity, metrics_address=n.metrics_address, pid=n.pid)
        try:
            self.register(info)
        except CdpError as exc:
            log.error("%s", exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        return cpb.RegisterReply(heartbeat_ms=self.heartbeat_ms, lease_ms=self.lease_ms)

    async def Heartbeat(self, request: cpb.HeartbeatRequest,
                        context: grpc.aio.ServicerContext) -> cpb.HeartbeatReply:
        known = self.state.heartbeat(request.node_id,
                                     [report_from_pb(r) for r in request.policies], self.clock())
        if known:
            await self._flush_or_abort(context)
        return cpb.HeartbeatReply(known=known)

    async def WatchAssignments(self, request: cpb.WatchRequest,
                               context: grpc.aio.ServicerContext,
                               ) -> AsyncIterator[cpb.AssignmentSet]:
        if self._closed:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "coordinator is shutting down")
        w = _Watcher(request.node_id)
        w.last = self.assignment_set(request.node_id)
        self._watchers.add(w)
        try:
            yield w.last
            while True:
                item = await w.queue.get()
                if item is None:
                    return
                yield item
        finally:
            self._watchers.discard(w)

    async def GetStatus(self, request: cpb.StatusRequest,
                        context: grpc.aio.ServicerContext) -> cpb.StatusReply:
        wall = self.wall()
        return status_pb(self.state.status(self.clock(), wall), int(wall * 1e9))
