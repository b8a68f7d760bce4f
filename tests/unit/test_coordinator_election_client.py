"""Clients follow the leader: `LeaderFollower` alone, then the nodes'
`CoordinatorClient` and cdpctl's `coordcall` against two real coordinator
services (one leader, one standby, on one in-memory store) over loopback gRPC."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from coordfixtures import TLS, Clock, config, pol

from cdp_common import rpc
from cdp_common.config import NodeConfig, coordinator_addresses, load_config
from cdp_common.coordclient import LEADER_KEY, CoordinatorClient, LeaderFollower
from cdp_common.errors import ConfigError, CoordinatorUnreachable
from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
from cdp_common.pb.cdp.v1 import coordinator_pb2_grpc as cgrpc
from cdp_common.states import NodeState
from cdp_coordinator.memstore import MemoryBacking, MemoryStore
from cdp_coordinator.model import Role
from cdp_coordinator.service import CoordinatorService
from cdpctl import coordcall
from cdpctl.resolve import Coordinator

# ------------------------------------------------------------------ LeaderFollower


class FakeChannel:
    def __init__(self, address: str) -> None:
        self.address = address
        self.closed = False

    async def close(self, grace: float | None = None) -> None:
        self.closed = True

    def __getattr__(self, name: str) -> Any:   # unary_unary, unary_stream, ...
        return lambda *args, **kw: None


def _error(code: grpc.StatusCode, leader: str = "") -> grpc.aio.AioRpcError:
    trailers = grpc.aio.Metadata(*([(LEADER_KEY, leader)] if leader else []))
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailers, "x")


def _follower(addresses: list[str], clock: Clock) -> tuple[LeaderFollower, list[FakeChannel]]:
    made: list[FakeChannel] = []

    def connect(a: str) -> Any:
        made.append(FakeChannel(a))
        return made[-1]
    return LeaderFollower(addresses, connect, now=clock), made


def test_follows_the_leader_a_standby_names() -> None:
    clock = Clock(0.0)
    f, made = _follower(["a:1", "b:2", "c:3"], clock)
    assert f.address == "a:1"
    assert f.failed(0, _error(grpc.StatusCode.UNAVAILABLE, leader="c:3"))
    assert f.address == "c:3" and f.generation == 1 and made[-1].address == "c:3"
    # the other loop failed on the old channel too: no second move
    assert not f.failed(0, _error(grpc.StatusCode.UNAVAILABLE))
    assert f.address == "c:3"


def test_moves_on_when_the_named_leader_just_failed() -> None:
    clock = Clock(0.0)
    f, _ = _follower(["a:1", "b:2", "c:3"], clock)
    assert f.failed(0, _error(grpc.StatusCode.UNAVAILABLE))            # a:1 is dead
    assert f.address == "b:2"
    clock.t = 0.5
    # b:2 (a standby) still names the dead a:1: next address instead of back to a:1
    assert f.failed(1, _error(grpc.StatusCode.UNAVAILABLE, leader="a:1"))
    assert f.address == "c:3"
    clock.t = 5.0
    assert f.failed(2, _error(grpc.StatusCode.UNAVAILABLE, leader="a:1"))
    assert f.address == "a:1"                                          # long enough ago


def test_learns_a_leader_outside_its_list_and_ignores_refusals() -> None:
    clock = Clock(0.0)
    f, _ = _follower(["a:1"], clock)
    assert not f.failed(0, _error(grpc.StatusCode.UNAVAILABLE))        # one address: stay
    assert not f.failed(0, _error(grpc.StatusCode.PERMISSION_DENIED, leader="z:9"))
    assert f.failed(0, _error(grpc.StatusCode.UNAVAILABLE, leader="z:9"))
    assert f.address == "z:9" and f.addresses == ["a:1", "z:9"]


async def test_moved_from_channels_are_closed() -> None:
    f, made = _follower(["a:1", "b:2"], Clock(0.0))
    f.failed(0, _error(grpc.StatusCode.DEADLINE_EXCEEDED))
    await f.close_old()
    assert made[0].closed and not made[1].closed
    await f.close()
    assert made[1].closed


# ------------------------------------------------------------------ config


def test_node_coordinator_accepts_a_string_a_list_or_a_comma_list(tmp_path: Any) -> None:
    from cdp_common.config import ProxyConfig

    key = tmp_path / "master.key"
    key.write_text("1 " + "ab" * 32 + "\n")
    base = ('[node]\nid = "sp-1"\n{line}\n[proxy]\nrole = "target"\nkey_file = "KEY"\n'
            '[tls]\ninsecure = true\n').replace("KEY", str(key))
    for line, want in (('coordinator = "h:1"', ["h:1"]),
                       ('coordinator = "h:1, h:2,h:3"', ["h:1", "h:2", "h:3"]),
                       ('coordinator = ["h:1", "h:2"]', ["h:1", "h:2"])):
        path = tmp_path / "c.toml"
        path.write_text(base.format(line=line))
        cfg = load_config(ProxyConfig, path)
        assert coordinator_addresses(cfg.node.coordinator) == want
    for line, why in (('coordinator = ["h:1", "nope"]', "node.coordinator[1]"),
                      ('coordinator = ["h:1", 5]', "node.coordinator[1]"),
                      ('coordinator = ["h:1,h:2"]', "contains ','"),
                      ('coordinator = "h:1,bad"', "node.coordinator[1]")):
        path = tmp_path / "c.toml"
        path.write_text(base.format(line=line))
        with pytest.raises(ConfigError, match=why.replace("[", r"\[")):
            load_config(ProxyConfig, path)


# ------------------------------------------------------------------ two real coordinators


class Pair:
    """Coordinator services `a` and `b` on one store, each behind a gRPC server."""

    def __init__(self) -> None:
        self.clock = Clock()
        backing = MemoryBacking()
        cfg = config("unused.db", [pol("p1")], lease_ms=3000)
        self.a = CoordinatorService(cfg, MemoryStore(backing), leading=True)
        self.b = CoordinatorService(cfg, MemoryStore(backing), leading=False)
        self.addr: dict[str, str] = {}

    def lead(self, name: str) -> None:
        """Make `name` the leader and the other its standby."""
        leader, standby = (self.a, self.b) if name == "a" else (self.b, self.a)
        standby.become_standby(self.addr[name])
        leader.become_leader()


@contextlib.asynccontextmanager
async def pair() -> AsyncIterator[Pair]:
    p = Pair()
    servers = []
    for name, svc in (("a", p.a), ("b", p.b)):
        server = rpc.Server("127.0.0.1:0", TLS, 1 << 20)
        cgrpc.add_CoordinatorServicer_to_server(svc, server.grpc)
        await server.start()
        servers.append(server)
        p.addr[name] = server.address
    p.b.become_standby(p.addr["a"])
    try:
        yield p
    finally:
        for svc in (p.a, p.b):
            svc.close()
        for server in servers:
            await server.stop(0)


async def eventually(pred: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not pred():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def _up(svc: CoordinatorService, node_id: str) -> bool:
    n = svc.state.nodes.get(node_id)
    return n is not None and n.up


async def test_a_node_finds_the_leader_and_follows_a_takeover() -> None:
    async with pair() as p:
        sets: list[cpb.AssignmentSet] = []
        node = NodeConfig(id="filter-1", coordinator=f"{p.addr['b']},{p.addr['a']}")
        client = CoordinatorClient(node, TLS, int(Role.FILTER), "127.0.0.1:1", "",
                                   lambda: [], sets.append)
        client.start()
        try:
            # the standby b is first in the list: it sends the node to a
            await eventually(lambda: _up(p.a, "filter-1") and client.address == p.addr["a"])
            await eventually(lambda: any(w.node_id == "filter-1" for w in p.a._watchers))
            # a dies as leader; b takes over (from the store: it knows filter-1)
            p.lead("b")
            await eventually(lambda: _up(p.b, "filter-1"))
            assert client.address == p.addr["b"]
            await eventually(lambda: any(w.node_id == "filter-1" for w in p.b._watchers))
            assert not p.a._watchers                    # the deposed leader ended its streams
        finally:
            await client.stop()


def _coord(address: str) -> Coordinator:
    return Coordinator(address=address, tls=TLS, source="--coordinator")


async def test_cdpctl_calls_go_to_the_leader() -> None:
    async with pair() as p:
        both = _coord(f"{p.addr['b']},{p.addr['a']}")

        def create() -> cpb.PolicyReply:
            return coordcall.call(both, lambda s: s.CreatePolicy(cpb.CreatePolicyRequest(
                policy_json='{"name": "p2", "target": "target-1", "disks": '
                            '[{"filter": "filter-1", "name": "d9", "size_bytes": 1048576}]}'),
                timeout=5))
        await asyncio.to_thread(create)                  # refused by b, done by a
        assert "p2" in p.a.state.policies

        def status(coord: Coordinator) -> cpb.StatusReply:
            return coordcall.call(coord, lambda s: s.GetStatus(cpb.StatusRequest(), timeout=5),
                                  refusals=False)
        p.a.state.policies["only-at-a"] = p.a.state.policies["p2"]   # tell the answers apart
        reply = await asyncio.to_thread(status, _coord(p.addr["b"]))  # b names a: asked there
        assert {x.name for x in reply.policies} >= {"p1", "p2"}
        # the leader is down: the standby's own view is the answer
        dead = _coord(f"{p.addr['b']},127.0.0.1:1")
        p.b.become_standby("127.0.0.1:1")
        reply = await asyncio.to_thread(status, dead)
        assert {x.name for x in reply.policies} >= {"p1"}
        with pytest.raises(CoordinatorUnreachable):
            await asyncio.to_thread(create_on, dead)


def create_on(coord: Coordinator) -> None:
    coordcall.call(coord, lambda s: s.RequestSync(cpb.PolicyName(name="p1"), timeout=2))


def test_cdpctl_address_lists_are_checked() -> None:
    assert coordcall.addresses(_coord("a:1, b:2,a:1")) == ["a:1", "b:2"]
    from cdpctl.state import UsageError

    with pytest.raises(UsageError, match="HOST:PORT"):
        coordcall.addresses(_coord("a:1,b"))


async def test_a_standby_shows_the_nodes_the_leader_hears_and_their_reports() -> None:
    """The leader stores each node's newest heartbeat as an ephemeral liveness entry;
    a standby's view shows those nodes up with their reports, and down once the
    entries expire (no heartbeat saved for a lease)."""
    async with pair() as p:
        table = p.a.store.backing.liveness      # type: ignore[attr-defined]
        now = [1000.0]
        table.clock = lambda: now[0]
        report = cpb.PolicyReport(policy="p1", captured_seq=7, durable_seq=5)
        node = NodeConfig(id="filter-1", coordinator=p.addr["a"])
        client = CoordinatorClient(node, TLS, int(Role.FILTER), "127.0.0.1:1", "",
                                   lambda: [report])
        client.start()
        try:
            await eventually(lambda: ("filter-1", "p1") in p.a.state.reports)
            p.b._load(write=False)
            assert not _up(p.b, "filter-1"), "the standby knew before anything was saved"
            p.a.save_liveness()
            p.b._load(write=False)
            assert _up(p.b, "filter-1")
            seen = p.b.state.reports[("filter-1", "p1")]
            assert (seen.captured_seq, seen.durable_seq) == (7, 5)
            nodes = {n.info.id: n for n in p.b.state.status(p.b.clock(), p.b.wall()).nodes}
            assert nodes["filter-1"].state == NodeState.UP
        finally:
            await client.stop()
        now[0] += p.a.lease_ms / 1000 + 0.1     # the leader saves no more heartbeats
        p.b._load(write=False)
        assert not _up(p.b, "filter-1")
        assert ("filter-1", "p1") not in p.b.state.reports
