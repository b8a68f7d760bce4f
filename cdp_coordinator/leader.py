"""The etcd shell of the leader election (cdp_coordinator.election is the core).

Theory of operation
-------------------
`EtcdElection.run()` is one loop, a round every `poll_s` (a quarter of a
second by default):

1. `Election.tick(now)`: a leader whose lease went unconfirmed too long steps
   down before anything else (the core decides; see its invariant).
2. The coordinator's own etcd lease: granted when it has none (TTL
   `coordinator.election_ttl_s`; etcd may choose a longer one, which is then
   used), else renewed over one LeaseKeepAlive stream every third of the TTL.
   A renewal answered with TTL <= 0 means the lease expired: LEASE_LOST.
   The time taken as "confirmed" is the one *before* the request was sent,
   so the leader's deadline is never later than the lease's expiry at etcd.
3. The election key (`<prefix>leader`) is read. Gone: the leader steps down
   (VACANT) and everyone campaigns with one transaction, "create it with my
   lease if it does not exist, else read it" (WON or LOST). Held with our
   lease: WON (we lead, or still do). Held by another: LOST, naming the
   holder's address (a leader that sees this steps down).

Every request's deadline ends at the leader's step-down deadline at the
latest, so a hung etcd cannot keep a coordinator leading past it. A request
that fails (etcd down, a member lost) moves to the next endpoint, and the
round is tried again there at once (each endpoint once a round), so a lost
member costs the leader one request timeout, not a poll interval more; the
loop itself never ends on an etcd error, it only logs it once per outage.

The actions go to `on_change(step, fence_revision)`: LEAD carries the
create_revision of the key we hold (the store's write fence), FOLLOW the
new leader's address (only when it changed), STEP_DOWN whatever we now know.
`resign()` (on shutdown) steps down and revokes the lease, so the key goes at
once and a standby takes over within one round instead of one TTL.

The key's value is JSON `{"id": <node id>, "address": <host:port>}` (the
coordinator's `node.advertise`, else its listen address); standbys send
clients to `address`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from cdp_common.pb.etcd.etcdserverpb import rpc_pb2 as pb
from cdp_common.pb.etcd.etcdserverpb import rpc_pb2_grpc as pbg
from cdp_coordinator.election import Action, Election, Event, Role, Step
from cdp_coordinator.etcdstore import ELECTION_KEY

log = logging.getLogger("coord.election")

POLL_S = 0.25
MIN_REQUEST_S = 0.05

OnChange = Callable[[Step, int], Awaitable[None] | None]


def holder_address(value: bytes) -> str:
    """The address in an election key's value ("" when it does not decode)."""
    try:
        doc = json.loads(value)
        return str(doc.get("address", "")) if isinstance(doc, dict) else ""
    except (ValueError, UnicodeDecodeError):
        return ""


class EtcdElection:
    """Campaign for, hold and give up the election key (see the module docstring)."""

    def __init__(self, endpoints: Sequence[str], prefix: str, node_id: str, address: str,
                 ttl_s: int, on_change: OnChange, *, timeout_s: float = 5.0,
                 poll_s: float = POLL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.endpoints = list(endpoints)
        self.key = (prefix + ELECTION_KEY).encode()
        self.address = address
        self.value = json.dumps({"id": node_id, "address": address}, sort_keys=True).encode()
        self.election = Election(float(ttl_s))
        self.requested_ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.clock = clock
        self.on_change = on_change
        self.lease_id = 0
        self.fence_revision = 0
        self._current = 0
        self._channels: dict[int, grpc.aio.Channel] = {}
        self._keepalive: Any = None
        self._renewed_at = -1e9
        self._failing = False
        self.became_leader_at: float | None = None

    # ------------------------------------------------------------ plumbing

    def _channel(self) -> grpc.aio.Channel:
        i = self._current
        if i not in self._channels:
            self._channels[i] = grpc.aio.insecure_channel(self.endpoints[i])
        return self._channels[i]

    def _timeout(self) -> float:
        deadline = self.election.deadline() if self.election.leading else None
        t = min(self.timeout_s, max(self.election.ttl_s / 4, MIN_REQUEST_S))
        if deadline is not None:
            t = min(t, deadline - self.clock())
        return max(t, MIN_REQUEST_S)

    def _rotate(self) -> None:
        self._drop_keepalive()
        self._current = (self._current + 1) % len(self.endpoints)

    def _drop_keepalive(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None

    async def _apply(self, step: Step | None) -> None:
        if step is None or step.action is Action.NONE:
            return
        if step.action is Action.LEAD:
            self.became_leader_at = self.clock()
            log.warning("elected leader (term %d, fence revision %d)", self.election.terms,
                        self.fence_revision, extra={"peer": self.address})
        elif step.action is Action.STEP_DOWN:
            self.fence_revision = 0
            self.became_leader_at = None
            log.warning("no longer the leader%s",
                        f" (the leader is {step.leader})" if step.leader else "",
                        extra={"peer": self.address})
        elif step.action is Action.FOLLOW:
            log.info("standby; the leader is %s", step.leader or "unknown")
        elif step.action is Action.CAMPAIGN:
            return
        result = self.on_change(step, self.fence_revision)
        if asyncio.iscoroutine(result):
            await result

    async def _handle(self, event: Event, leader: str = "") -> None:
        before = self.election.leader
        step = self.election.handle(event, self.clock(), leader)
        if step.action is Action.FOLLOW and step.before is Role.STANDBY and \
                step.leader == before:
            return   # the same leader as last round: nothing to tell
        await self._apply(step)

    # ------------------------------------------------------------ the lease

    async def _lease(self) -> None:
        stub = pbg.LeaseStub(self._channel())
        now = self.clock()
        if not self.lease_id:
            resp = await stub.LeaseGrant(pb.LeaseGrantRequest(TTL=self.requested_ttl_s),
                                         timeout=self._timeout())
            if resp.error or resp.TTL <= 0:
                raise RuntimeError(f"lease grant refused: {resp.error or 'TTL 0'}")
            self.lease_id = resp.ID
            self.election.ttl_s = float(resp.TTL)
            self.election.renewed(now)
            self._renewed_at = now
            return
        if now - self._renewed_at < self.election.ttl_s / 3:
            return
        if self._keepalive is None:
            self._keepalive = stub.LeaseKeepAlive()
        call = self._keepalive
        await asyncio.wait_for(call.write(pb.LeaseKeepAliveRequest(ID=self.lease_id)),
                               self._timeout())
        resp = await asyncio.wait_for(call.read(), self._timeout())
        if resp is grpc.aio.EOF:
            self._drop_keepalive()
            raise RuntimeError("the keep-alive stream ended")
        if resp.TTL <= 0:
            log.warning("election lease %x expired", self.lease_id)
            self.lease_id = 0
            self._drop_keepalive()
            await self._handle(Event.LEASE_LOST)
            return
        self.election.renewed(now)
        self._renewed_at = now

    # ------------------------------------------------------------ the key

    async def _campaign(self) -> None:
        kv = pbg.KVStub(self._channel())
        req = pb.TxnRequest(
            compare=[pb.Compare(key=self.key, target=pb.Compare.CREATE,
                                result=pb.Compare.EQUAL, create_revision=0)],
            success=[pb.RequestOp(request_put=pb.PutRequest(key=self.key, value=self.value,
                                                            lease=self.lease_id))],
            failure=[pb.RequestOp(request_range=pb.RangeRequest(key=self.key))])
        resp = await kv.Txn(req, timeout=self._timeout())
        if resp.succeeded:
            self.fence_revision = resp.header.revision   # the put's revision: create_revision
            await self._handle(Event.WON, self.address)
            return
        kvs = resp.responses[0].response_range.kvs if resp.responses else []
        if kvs:
            await self._observe(kvs[0])

    async def _observe(self, kv: Any) -> None:
        if self.lease_id and kv.lease == self.lease_id:
            if not self.election.leading:
                self.fence_revision = kv.create_revision
            elif kv.create_revision != self.fence_revision:
                await self._handle(Event.VACANT)   # recreated: not the term we fenced with
                return
            await self._handle(Event.WON, self.address)
        else:
            await self._handle(Event.LOST, holder_address(kv.value))

    async def _round(self) -> None:
        await self._apply(self.election.tick(self.clock()))
        await self._lease()
        if not self.lease_id:
            return
        resp = await pbg.KVStub(self._channel()).Range(pb.RangeRequest(key=self.key),
                                                      timeout=self._timeout())
        if resp.kvs:
            await self._observe(resp.kvs[0])
            return
        await self._handle(Event.VACANT)   # a leader steps down; a standby campaigns
        await self._campaign()

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Take part in the election until cancelled (etcd errors are retried)."""
        try:
            while True:
                # a failed round is retried at once on the next endpoint (each once a
                # round): a lost etcd member must not cost the leader a poll interval
                for _ in range(len(self.endpoints)):
                    if await self._attempt():
                        break
                await asyncio.sleep(self.poll_s)
        finally:
            await self.close()

    async def _attempt(self) -> bool:
        """One round on the current endpoint; False (and the next endpoint) if it failed."""
        try:
            await self._round()
        except (grpc.aio.AioRpcError, TimeoutError, RuntimeError) as exc:
            if not self._failing:
                what = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) \
                    else str(exc) or type(exc).__name__
                log.warning("election: etcd at %s: %s", self.endpoints[self._current], what)
            self._failing = True
            self._rotate()
            return False
        if self._failing:
            log.info("etcd answers the election again at %s", self.endpoints[self._current])
        self._failing = False
        return True

    async def resign(self) -> None:
        """Step down and revoke the lease (the key goes with it), best effort."""
        await self._apply(self.election.handle(Event.STOP, self.clock()))
        lease, self.lease_id = self.lease_id, 0
        if lease:
            with contextlib.suppress(grpc.aio.AioRpcError, TimeoutError):
                await pbg.LeaseStub(self._channel()).LeaseRevoke(
                    pb.LeaseRevokeRequest(ID=lease), timeout=min(self.timeout_s, 1.0))
        await self.close()

    async def close(self) -> None:
        self._drop_keepalive()
        for channel in self._channels.values():
            await channel.close(grace=None)
        self._channels.clear()
