"""Client side of the coordinator protocol, shared by every node.

Registers, heartbeats with per-policy reports, and watches assignments,
reconnecting with backoff (cdp_common.backoff): a transient failure (the
coordinator is down or restarting) is retried from 0.2 s up to 2 s; a
permanent answer (the coordinator refused the registration) is logged as an
error, kept in `last_error` and retried only every HOLD_S. The data plane
never waits on it: when the coordinator is down, nodes keep the last
assignment they saw.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Sequence

import grpc

from cdp_common import clock, rpc
from cdp_common.aio import cancel_and_wait
from cdp_common.backoff import Backoff
from cdp_common.config import NodeConfig, TlsConfig
from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
from cdp_common.pb.cdp.v1 import coordinator_pb2_grpc as cgrpc

log = logging.getLogger("common.coordclient")

ReportFn = Callable[[], Sequence[cpb.PolicyReport]]
AssignFn = Callable[[cpb.AssignmentSet], Awaitable[None] | None]
LoadFn = Callable[[], float]
UNREACHABLE_TIMEOUT_S = 5.0
HOLD_S = 10.0


class CoordinatorClient:
    def __init__(self, node: NodeConfig, tls: TlsConfig, role: int, address: str,
                 metrics_address: str, reports: ReportFn, on_assignments: AssignFn | None = None,
                 load: LoadFn | None = None) -> None:
        self._info = cpb.NodeInfo(id=node.id, role=role, site=node.site, address=address,  # type: ignore[arg-type]
                                  capacity=node.capacity, metrics_address=metrics_address,
                                  pid=os.getpid(),
                                  capacity_bytes_per_s=node.capacity_bytes_per_s)
        self._channel = rpc.channel(node.coordinator, tls, node.max_message_bytes)
        self._stub = cgrpc.CoordinatorStub(self._channel)
        self._reports = reports
        self._on_assignments = on_assignments
        self._load = load
        self._heartbeat_s = 1.0
        self._registered = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.connected = False
        self.last_error = ""

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._heartbeat_loop(), name="coord-heartbeat"))
        if self._on_assignments is not None:
            self._tasks.append(asyncio.create_task(self._watch_loop(), name="coord-watch"))

    async def stop(self) -> None:
        await cancel_and_wait(*self._tasks)
        await self._channel.close(grace=None)

    async def _register(self) -> None:
        reply = await self._stub.Register(cpb.RegisterRequest(node=self._info), timeout=5)
        self._heartbeat_s = max(0.05, reply.heartbeat_ms / 1000)
        self._registered.set()
        if not self.connected:
            log.info("registered with coordinator", extra={"node": self._info.id})
        self.connected = True

    async def _heartbeat_loop(self) -> None:
        backoff = Backoff(hold_s=HOLD_S)
        while True:
            try:
                if not self._registered.is_set():
                    await self._register()
                reply = await self._stub.Heartbeat(
                    cpb.HeartbeatRequest(node_id=self._info.id, policies=list(self._reports()),
                                         bytes_per_s=self._load() if self._load else 0.0,
                                         sent_time_ns=clock.wall_ns()),
                    timeout=max(2.0, 2 * self._heartbeat_s))
                if not reply.known:
                    self._registered.clear()
                    continue
                backoff.reset()
                self.last_error = ""
                await asyncio.sleep(self._heartbeat_s)
            except grpc.aio.AioRpcError as exc:
                remote = rpc.remote_error(exc, "coordinator")
                if not remote.transient:
                    if str(remote) != self.last_error:
                        log.error("coordinator refused this node: %s (retrying every %.0f s)",
                                  remote.details, HOLD_S, extra={"node": self._info.id})
                elif self.connected:
                    log.warning("coordinator unreachable: %s", remote.details)
                self.last_error = str(remote)
                self.connected = False
                self._registered.clear()
                await backoff.wait(remote.transient)

    async def report_unreachable(self, node_id: str, address: str, policy: str,
                                 detail: str) -> cpb.ReportUnreachableReply | None:
        """Tell the coordinator a peer cannot be reached; None if the coordinator is down."""
        try:
            reply: cpb.ReportUnreachableReply = await self._stub.ReportUnreachable(
                cpb.ReportUnreachableRequest(reporter=self._info.id, node_id=node_id,
                                             address=address, policy=policy, detail=detail),
                timeout=UNREACHABLE_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            log.debug("cannot report %s unreachable: %s", node_id or address, exc.details())
            return None
        log.info("reported %s unreachable: %s", node_id or address, reply.detail,
                 extra={"policy": policy})
        return reply

    async def _watch_loop(self) -> None:
        assert self._on_assignments is not None
        backoff = Backoff(hold_s=HOLD_S)
        while True:
            transient = True
            try:
                await self._registered.wait()
                call = self._stub.WatchAssignments(cpb.WatchRequest(node_id=self._info.id))
                async for update in call:
                    backoff.reset()
                    result = self._on_assignments(update)
                    if asyncio.iscoroutine(result):
                        await result
            except grpc.aio.AioRpcError as exc:
                remote = rpc.remote_error(exc, "coordinator")
                transient = remote.transient
                log.debug("assignment watch ended: %s", remote)
            await backoff.wait(transient)
