"""Client side of the coordinator protocol, shared by every node.

Registers, heartbeats with per-policy reports, and watches assignments,
reconnecting with backoff (cdp_common.backoff): a transient failure (the
coordinator is down or restarting) is retried from 0.2 s up to 2 s; a
permanent answer (the coordinator refused the registration) is logged as an
error, kept in `last_error` and retried only every HOLD_S. The data plane
never waits on it: when the coordinator is down, nodes keep the last
assignment they saw.

Several coordinators (`node.coordinator` a list: one leader, standbys): the
client talks to one address at a time (`LeaderFollower`). A standby answers
with UNAVAILABLE and the leader's address in the `cdp-leader` trailer; the
client moves there, unless that address failed within FOLLOW_HOLD_S (a
standby still naming a dead leader), and otherwise to the next address of
its list. Any failure that says nothing about the leader (refused
connection, deadline) moves to the next address too. The heartbeat and the
watch loop share the follower; a move is made once per failed address
(`generation`), so the two loops never skip an address between them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import grpc

from cdp_common import clock, rpc
from cdp_common.aio import cancel_and_wait
from cdp_common.backoff import Backoff
from cdp_common.config import NodeConfig, TlsConfig, coordinator_addresses
from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
from cdp_common.pb.cdp.v1 import coordinator_pb2_grpc as cgrpc

log = logging.getLogger("common.coordclient")

ReportFn = Callable[[], Sequence[cpb.PolicyReport]]
AssignFn = Callable[[cpb.AssignmentSet], Awaitable[None] | None]
LoadFn = Callable[[], float]
UNREACHABLE_TIMEOUT_S = 5.0
HOLD_S = 10.0
FOLLOW_HOLD_S = 2.0
"""A leader address that failed this recently is not followed again at once."""
MAX_ADDRESSES = 16
"""Most addresses a client learns from leader trailers beyond its list."""

LEADER_KEY = "cdp-leader"
"""Trailer of a standby coordinator's answers: the leader's address (may be absent)."""
STANDBY_KEY = "cdp-standby"
"""Trailer of a standby coordinator's successful (read-only) answers."""
FOLLOW_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
"""Failures after which a client tries the leader named, or the next coordinator."""


def leader_trailer(leader: str) -> tuple[tuple[str, str], ...]:
    return ((LEADER_KEY, leader),) if leader else ()


def standby_trailer(leader: str) -> tuple[tuple[str, str], ...]:
    return ((STANDBY_KEY, "1"), *leader_trailer(leader))


def metadata_value(metadata: Iterable[Any] | None, key: str) -> str:
    """The value of `key` in gRPC metadata ("" if absent)."""
    for item in metadata or ():
        k, v = (item[0], item[1]) if isinstance(item, tuple) else (
            getattr(item, "key", ""), getattr(item, "value", ""))
        if k == key:
            return v.decode() if isinstance(v, bytes) else str(v)
    return ""


def leader_of(exc: grpc.RpcError) -> str:
    """The leader a standby named in a failed call's trailer ("" if none)."""
    try:
        return metadata_value(exc.trailing_metadata(), LEADER_KEY)
    except Exception:  # a locally built RpcError may have none
        return ""


class LeaderFollower:
    """Which coordinator address to talk to, and its channel (module docstring).
    `now` is injected (monotonic seconds) for the tests."""

    def __init__(self, addresses: Sequence[str],
                 connect: Callable[[str], grpc.aio.Channel],
                 now: Callable[[], float] = time.monotonic) -> None:
        if not addresses:
            raise ValueError("no coordinator address")
        self.addresses = list(addresses)
        self._connect = connect
        self._now = now
        self.index = 0
        self.generation = 0
        self.channel = connect(self.addresses[0])
        self.stub = cgrpc.CoordinatorStub(self.channel)
        self._failed_at: dict[str, float] = {}
        self._old: list[grpc.aio.Channel] = []

    @property
    def address(self) -> str:
        return self.addresses[self.index]

    def failed(self, generation: int, exc: grpc.RpcError) -> bool:
        """A call made at `generation` failed with `exc`: move to the leader it names,
        else the next address, when the failure is one of FOLLOW_CODES. Returns whether
        the address changed (False also when another loop already moved)."""
        if generation != self.generation or exc.code() not in FOLLOW_CODES:
            return False
        now = self._now()
        here = self.address
        leader = leader_of(exc)
        if leader and leader != here and now - self._failed_at.get(leader, -1e9) >= FOLLOW_HOLD_S:
            if leader not in self.addresses and len(self.addresses) < MAX_ADDRESSES:
                self.addresses.append(leader)
            if leader in self.addresses:
                return self._move(self.addresses.index(leader), here)
        if not leader:
            self._failed_at[here] = now
        if len(self.addresses) == 1:
            return False
        return self._move((self.index + 1) % len(self.addresses), here)

    def _move(self, index: int, here: str) -> bool:
        if index == self.index:
            return False
        self.index = index
        self.generation += 1
        self._old.append(self.channel)
        self.channel = self._connect(self.address)
        self.stub = cgrpc.CoordinatorStub(self.channel)
        log.info("coordinator %s: trying %s", here, self.address)
        return True

    async def close_old(self) -> None:
        """Close the channels moved away from (their calls end with CANCELLED)."""
        old, self._old = self._old, []
        for ch in old:
            await ch.close(grace=None)

    async def close(self) -> None:
        await self.close_old()
        await self.channel.close(grace=None)


class CoordinatorClient:
    def __init__(self, node: NodeConfig, tls: TlsConfig, role: int, address: str,
                 metrics_address: str, reports: ReportFn, on_assignments: AssignFn | None = None,
                 load: LoadFn | None = None) -> None:
        self._info = cpb.NodeInfo(id=node.id, role=role, site=node.site, address=address,  # type: ignore[arg-type]
                                  capacity=node.capacity, metrics_address=metrics_address,
                                  pid=os.getpid(),
                                  capacity_bytes_per_s=node.capacity_bytes_per_s)
        addresses = coordinator_addresses(node.coordinator) or [node.coordinator]
        self.follower = LeaderFollower(
            addresses, lambda a: rpc.channel(a, tls, node.max_message_bytes))
        self._reports = reports
        self._on_assignments = on_assignments
        self._load = load
        self._heartbeat_s = 1.0
        self._registered = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing: set[asyncio.Future[None]] = set()
        self.connected = False
        self.last_error = ""

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._heartbeat_loop(), name="coord-heartbeat"))
        if self._on_assignments is not None:
            self._tasks.append(asyncio.create_task(self._watch_loop(), name="coord-watch"))

    async def stop(self) -> None:
        await cancel_and_wait(*self._tasks)
        await self.follower.close()

    @property
    def address(self) -> str:
        """The coordinator address in use."""
        return self.follower.address

    def _failed(self, generation: int, exc: grpc.RpcError) -> None:
        """Follow the leader (or the next address) after a failed call; a moved-from
        channel is closed soon after, so a call still on it ends."""
        if self.follower.failed(generation, exc):
            self._registered.clear()   # register with the new leader (it knows us already)
            task = asyncio.ensure_future(self.follower.close_old())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _register(self, stub: cgrpc.CoordinatorStub) -> None:
        reply = await stub.Register(cpb.RegisterRequest(node=self._info), timeout=5)
        self._heartbeat_s = max(0.05, reply.heartbeat_ms / 1000)
        self._registered.set()
        if not self.connected:
            log.info("registered with coordinator %s", self.follower.address,
                     extra={"node": self._info.id})
        self.connected = True

    async def _heartbeat_loop(self) -> None:
        backoff = Backoff(hold_s=HOLD_S)
        while True:
            generation, stub = self.follower.generation, self.follower.stub
            try:
                if not self._registered.is_set():
                    await self._register(stub)
                reply = await stub.Heartbeat(
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
                    log.warning("coordinator %s unreachable: %s", self.follower.address,
                                remote.details)
                self.last_error = str(remote)
                self.connected = False
                self._registered.clear()
                self._failed(generation, exc)
                await backoff.wait(remote.transient)

    async def report_unreachable(self, node_id: str, address: str, policy: str,
                                 detail: str) -> cpb.ReportUnreachableReply | None:
        """Tell the coordinator a peer cannot be reached; None if the coordinator is down."""
        generation, stub = self.follower.generation, self.follower.stub
        try:
            reply: cpb.ReportUnreachableReply = await stub.ReportUnreachable(
                cpb.ReportUnreachableRequest(reporter=self._info.id, node_id=node_id,
                                             address=address, policy=policy, detail=detail),
                timeout=UNREACHABLE_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            log.debug("cannot report %s unreachable: %s", node_id or address, exc.details())
            self._failed(generation, exc)
            return None
        log.info("reported %s unreachable: %s", node_id or address, reply.detail,
                 extra={"policy": policy})
        return reply

    async def _watch_loop(self) -> None:
        assert self._on_assignments is not None
        backoff = Backoff(hold_s=HOLD_S)
        while True:
            transient = True
            await self._registered.wait()
            generation, stub = self.follower.generation, self.follower.stub
            try:
                call = stub.WatchAssignments(cpb.WatchRequest(node_id=self._info.id))
                async for update in call:
                    backoff.reset()
                    result = self._on_assignments(update)
                    if asyncio.iscoroutine(result):
                        await result
            except grpc.aio.AioRpcError as exc:
                remote = rpc.remote_error(exc, "coordinator")
                transient = remote.transient
                log.debug("assignment watch ended: %s", remote)
                self._failed(generation, exc)
            await backoff.wait(transient)
