"""The coordinator daemon over real gRPC on loopback (insecure): register, heartbeat,
watch assignments, status, lease expiry -> rebind pushed to watchers, restart.

The same round trip, restart and shutdown run once more without a daemon or a socket:
the servicer's methods called directly on the in-memory store, with injected clocks
(the `_direct` tests)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path

import grpc
import pytest
from coordfixtures import TLS, Aborted, Clock, DirectStub, FakeContext, config, memory_service, pol
from prometheus_client import REGISTRY

from cdp_common import rpc
from cdp_common.config import CoordinatorConfig, NodeConfig
from cdp_common.coordclient import CoordinatorClient
from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
from cdp_common.pb.cdp.v1 import coordinator_pb2_grpc as cgrpc
from cdp_coordinator.daemon import CoordinatorDaemon
from cdp_coordinator.memstore import MemoryBacking
from cdp_coordinator.service import CoordinatorService

pytestmark = pytest.mark.timeout(30)


async def eventually(cond: Callable[[], object], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


P1 = pol("p1", rpo_warning_s=5, rpo_error_s=10, compression_level=3, encryption=True,
         rpo_interval_s=1.0)
LEASE_MS = 500


def assert_first_binding(a: cpb.Assignment) -> None:
    """P1 bound to sp-1, tp-1 and target-1 (the dual proxy sp-2 registered last)."""
    assert a.source_proxy.node_id == "sp-1"
    assert a.target_proxy.node_id == "tp-1"
    assert a.target.node_id == "target-1" and a.target.address == "127.0.0.1:10004"
    assert a.filter.node_id == "filter-1"
    assert [(x.disk_id, x.filter, x.name, x.size_bytes) for x in a.disks] == \
        [(0, "filter-1", "disk0", 1 << 20), (1, "filter-1", "disk1", 2 << 20)]
    assert (a.rpo_interval_s, a.compression_level, a.encryption) == (1.0, 3, True)


def assert_status_ok(st: cpb.StatusReply, a: cpb.Assignment, node_ids: Iterable[str]) -> None:
    """Every node up; p1 ok on its first binding with the canned reports' figures."""
    assert {n.info.id: n.state for n in st.nodes} == dict.fromkeys(node_ids, "up")
    (p,) = st.policies
    assert (p.name, p.source_proxy, p.filter, p.target, p.state) == \
        ("p1", "sp-1", "filter-1", "target-1", "ok")
    assert (p.captured_seq, p.durable_seq, p.applied_seq, p.journal_bytes,
            p.bytes_replicated, p.rpo_lag_s) == (50, 50, 40, 777, 4096, 0.0)
    assert p.epoch == a.epoch and (p.rpo_warning_s, p.rpo_error_s) == (5, 10)


def make_config(db: Path, listen: str = "127.0.0.1:0") -> CoordinatorConfig:
    return config(db, [P1], lease_ms=LEASE_MS, listen=listen)


@contextlib.asynccontextmanager
async def running(config: CoordinatorConfig) -> AsyncIterator[CoordinatorDaemon]:
    d = CoordinatorDaemon(config)
    task = asyncio.create_task(d.run())
    try:
        await asyncio.wait_for(d.ready.wait(), 5)
        yield d
    finally:
        await d.shutdown()
        await asyncio.wait_for(task, 10)


class FakeNode:
    """A real CoordinatorClient with canned reports, recording what it is told."""

    def __init__(self, coord: str, nid: str, role: int, reports: list[cpb.PolicyReport]
                 | None = None) -> None:
        self.sets: list[cpb.AssignmentSet] = []
        self.reports = reports or []
        self.client = CoordinatorClient(NodeConfig(id=nid, coordinator=coord), TLS, role,
                                        f"127.0.0.1:{10000 + role}", "", lambda: self.reports,
                                        self.sets.append)

    def latest(self) -> dict[str, cpb.Assignment]:
        return {a.policy: a for a in self.sets[-1].assignments} if self.sets else {}


async def test_round_trip_and_rebind(tmp_path: Path) -> None:
    async with running(make_config(tmp_path / "c.db")) as d:
        now_ns = time.time_ns()
        nodes = {
            "filter-1": FakeNode(d.address, "filter-1", cpb.ROLE_FILTER, [cpb.PolicyReport(
                policy="p1", captured_seq=50, captured_time_ns=now_ns, journal_bytes=777)]),
            "sp-1": FakeNode(d.address, "sp-1", cpb.ROLE_SOURCE_PROXY),
            "sp-2": FakeNode(d.address, "sp-2", cpb.ROLE_PROXY_BOTH),
            "tp-1": FakeNode(d.address, "tp-1", cpb.ROLE_TARGET_PROXY),
            "target-1": FakeNode(d.address, "target-1", cpb.ROLE_TARGET, [cpb.PolicyReport(
                policy="p1", durable_seq=50, applied_seq=40, newest_time_ns=now_ns,
                bytes_replicated=4096)]),
        }
        # sp-2 (a dual proxy) comes last, so the binding is deterministic.
        for nid, n in nodes.items():
            if nid != "sp-2":
                n.client.start()
        f = nodes["filter-1"]
        try:
            await eventually(lambda: f.latest().get("p1") is not None
                             and f.latest()["p1"].reason == "")
            nodes["sp-2"].client.start()
            a = f.latest()["p1"]
            assert_first_binding(a)
            await eventually(lambda: nodes["sp-1"].latest().get("p1") == f.latest()["p1"])
            assert nodes["target-1"].latest()["p1"] == a

            async with rpc.channel(d.address, TLS, 1 << 20) as ch:
                stub = cgrpc.CoordinatorStub(ch)
                await eventually(lambda: d.service is not None and [
                    n.state for n in d.service.state.status(0).nodes] == ["up"] * 5)
                st = await stub.GetStatus(cpb.StatusRequest(), timeout=5)
                assert_status_ok(st, a, nodes)
                assert st.now_ns > 0

                # Unknown node heartbeat -> known=false; bad registration -> INVALID_ARGUMENT.
                hb = await stub.Heartbeat(cpb.HeartbeatRequest(node_id="ghost"), timeout=5)
                assert not hb.known
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Register(cpb.RegisterRequest(node=cpb.NodeInfo(id="x")),
                                        timeout=5)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

                # sp-1 dies: within a lease the filter is told to use sp-2, higher epoch.
                await nodes["sp-1"].client.stop()
                await eventually(lambda: f.latest()["p1"].source_proxy.node_id == "sp-2")
                b = f.latest()["p1"]
                assert b.epoch > a.epoch and b.reason == ""
                st = await stub.GetStatus(cpb.StatusRequest(), timeout=5)
                assert {n.info.id: n.state for n in st.nodes}["sp-1"] == "down"
                assert st.policies[0].source_proxy == "sp-2"
                assert d.service is not None
                d.update_metrics(d.service)
                assert REGISTRY.get_sample_value("cdp_coordinator_nodes",
                                                 {"state": "down"}) == 1
                assert (REGISTRY.get_sample_value("cdp_coordinator_rebinds_total") or 0) >= 1
                assert REGISTRY.get_sample_value("cdp_coordinator_rpo_lag_seconds",
                                                 {"policy": "p1"}) == 0.0
                shown = (await stub.GetStatus(cpb.StatusRequest(), timeout=5)).policies[0].state
                state = {s: REGISTRY.get_sample_value("cdp_coordinator_policy_state",
                                                      {"policy": "p1", "state": s})
                         for s in ("ok", "degraded", "error", "unprotected")}
                assert state[shown] == 1.0 and sum(v or 0 for v in state.values()) == 1.0, state
                # every node's heartbeats carry its clock: same host, offset ~0
                for n in st.nodes:
                    assert n.clock_offset_known and abs(n.clock_offset_s) < 0.5, n
                offset = REGISTRY.get_sample_value("cdp_coordinator_node_clock_offset_seconds",
                                                   {"node": "target-1"})
                assert offset is not None and abs(offset) < 0.5
                # what the alert rules and the dashboard read (deploy/monitoring)
                def sample(name: str, **labels: str) -> float | None:
                    return REGISTRY.get_sample_value(name, labels)
                assert sample("cdp_coordinator_node_up", node="sp-1", role="source_proxy") == 0
                assert sample("cdp_coordinator_node_up", node="target-1", role="target") == 1
                p1 = d.service.state.policies["p1"]
                assert sample("cdp_coordinator_policy_rpo_warning_seconds",
                              policy="p1") == p1.rpo_warning_s
                assert sample("cdp_coordinator_policy_rpo_error_seconds",
                              policy="p1") == p1.rpo_error_s
                level = sample("cdp_coordinator_policy_alarm_level", policy="p1")
                assert level == {"ok": 0, "degraded": 1, "unprotected": 1, "error": 2}[shown]
                assert sample("cdp_coordinator_policy_gap_open", policy="p1") == 0
                assert sample("cdp_coordinator_policy_capture_mode", policy="p1",
                              mode="journaling") == 1
                # a deleted policy's series go away
                await stub.DeletePolicy(cpb.DeletePolicyRequest(name="p1"), timeout=5)
                d.update_metrics(d.service)
                for name in ("cdp_coordinator_rpo_lag_seconds",
                             "cdp_coordinator_policy_alarm_level",
                             "cdp_coordinator_policy_journal_bytes"):
                    assert sample(name, policy="p1") is None, name
                assert sample("cdp_coordinator_policy_state", policy="p1", state="ok") is None
        finally:
            for n in nodes.values():
                await n.client.stop()


async def test_restart_keeps_epoch_and_nodes_need_not_register(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    async with running(make_config(db)) as d:
        addr = d.address
        for nid, role in (("sp-1", cpb.ROLE_SOURCE_PROXY), ("tp-1", cpb.ROLE_TARGET_PROXY),
                          ("target-1", cpb.ROLE_TARGET)):
            async with rpc.channel(addr, TLS, 1 << 20) as ch:
                await cgrpc.CoordinatorStub(ch).Register(cpb.RegisterRequest(
                    node=cpb.NodeInfo(id=nid, role=role, address="127.0.0.1:9")), timeout=5)
        assert d.service is not None
        epoch = d.service.state.assignments["p1"].epoch
        assert epoch > 0
    async with running(make_config(db, listen=addr)) as d2, \
            rpc.channel(d2.address, TLS, 1 << 20) as ch:
        stub = cgrpc.CoordinatorStub(ch)
        hb = await stub.Heartbeat(cpb.HeartbeatRequest(node_id="sp-1"), timeout=5)
        assert hb.known
        watch = stub.WatchAssignments(cpb.WatchRequest(node_id="sp-1"))
        first = await asyncio.wait_for(watch.read(), 5)
        assert first.assignments[0].epoch == epoch
        assert first.assignments[0].source_proxy.node_id == "sp-1"
        watch.cancel()


async def test_shutdown_ends_watch_streams(tmp_path: Path) -> None:
    d = CoordinatorDaemon(make_config(tmp_path / "c.db"))
    task = asyncio.create_task(d.run())
    await asyncio.wait_for(d.ready.wait(), 5)
    async with rpc.channel(d.address, TLS, 1 << 20) as ch:
        watch = cgrpc.CoordinatorStub(ch).WatchAssignments(cpb.WatchRequest(node_id="nobody"))
        first = await asyncio.wait_for(watch.read(), 5)
        assert list(first.assignments) == []
        t0 = time.monotonic()
        await d.shutdown()
        await asyncio.wait_for(task, 10)
        assert time.monotonic() - t0 < 1.5
        end = await asyncio.wait_for(watch.read(), 5)
        assert end is grpc.aio.EOF


async def test_watcher_queue_latest_wins() -> None:
    from cdp_coordinator.service import _Watcher

    w = _Watcher("n")
    for epoch in (1, 2, 3):
        w.offer(cpb.AssignmentSet(assignments=[cpb.Assignment(policy="p", epoch=epoch)]))
    assert w.queue.qsize() == 1
    got = w.queue.get_nowait()
    assert got is not None and got.assignments[0].epoch == 3


# ---------------------------------------------------------------- direct (no daemon, no socket)

ROLES = {"filter-1": cpb.ROLE_FILTER, "sp-1": cpb.ROLE_SOURCE_PROXY, "tp-1": cpb.ROLE_TARGET_PROXY,
         "target-1": cpb.ROLE_TARGET, "sp-2": cpb.ROLE_PROXY_BOTH}


class Watch:
    """A WatchAssignments stream read straight from the servicer."""

    def __init__(self, svc: CoordinatorService, node_id: str) -> None:
        self.stream = svc.WatchAssignments(cpb.WatchRequest(node_id=node_id), FakeContext())  # type: ignore[arg-type]

    async def next(self) -> dict[str, cpb.Assignment]:
        try:
            got = await asyncio.wait_for(self.stream.__anext__(), 5)
        except Aborted as exc:
            raise exc.as_rpc_error() from None
        return {a.policy: a for a in got.assignments}

    async def until(self, ok: Callable[[dict[str, cpb.Assignment]], bool]
                    ) -> dict[str, cpb.Assignment]:
        """The first set pushed that satisfies `ok` (the queue keeps only the latest)."""
        while not ok(got := await self.next()):
            pass
        return got


async def register(stub: DirectStub, *ids: str) -> None:
    for nid in ids:
        await stub.Register(cpb.RegisterRequest(node=cpb.NodeInfo(
            id=nid, role=ROLES[nid], address=f"127.0.0.1:{10000 + ROLES[nid]}")))  # type: ignore[arg-type]


async def test_round_trip_and_rebind_direct() -> None:
    clock, wall = Clock(), Clock(1_700_000_000.0)
    svc = memory_service([P1], clock=clock, wall=wall, lease_ms=LEASE_MS)
    stub = DirectStub(svc)
    now_ns = int(wall.t * 1e9)
    reports = {"filter-1": [cpb.PolicyReport(policy="p1", captured_seq=50,
                                             captured_time_ns=now_ns, journal_bytes=777)],
               "target-1": [cpb.PolicyReport(policy="p1", durable_seq=50, applied_seq=40,
                                             newest_time_ns=now_ns, bytes_replicated=4096)]}

    async def beat(*ids: str) -> None:
        for nid in ids:
            hb = await stub.Heartbeat(cpb.HeartbeatRequest(node_id=nid,
                                                           policies=reports.get(nid, [])))
            assert hb.known

    f = Watch(svc, "filter-1")
    assert (await f.next())["p1"].reason != ""   # nothing registered: not bound yet
    # sp-2 (a dual proxy) comes last, so the binding is deterministic.
    await register(stub, "filter-1", "sp-1", "tp-1", "target-1")
    a = (await f.until(lambda got: got["p1"].reason == ""))["p1"]
    await register(stub, "sp-2")
    assert a.reason == ""
    assert_first_binding(a)
    assert (await Watch(svc, "sp-1").next())["p1"] == a
    assert (await Watch(svc, "target-1").next())["p1"] == a

    await beat(*ROLES)
    st = await stub.GetStatus(cpb.StatusRequest())
    assert_status_ok(st, a, ROLES)
    assert st.now_ns == now_ns

    # Unknown node heartbeat -> known=false; bad registration -> INVALID_ARGUMENT.
    hb = await stub.Heartbeat(cpb.HeartbeatRequest(node_id="ghost"))
    assert not hb.known
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Register(cpb.RegisterRequest(node=cpb.NodeInfo(id="x")))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # sp-1 falls silent: past its lease the filter is told to use sp-2, higher epoch.
    clock.t += LEASE_MS / 1000 * 0.6
    await beat("filter-1", "tp-1", "target-1", "sp-2")
    clock.t += LEASE_MS / 1000 * 0.6
    svc.flush()                                   # what the ticker does
    b = (await f.until(lambda got: got["p1"].source_proxy.node_id == "sp-2"))["p1"]
    assert b.epoch > a.epoch and b.reason == ""
    st = await stub.GetStatus(cpb.StatusRequest())
    assert {n.info.id: n.state for n in st.nodes}["sp-1"] == "down"
    assert st.policies[0].source_proxy == "sp-2"
    assert svc.state.rebinds >= 1


async def test_restart_keeps_epoch_and_nodes_need_not_register_direct() -> None:
    backing, clock = MemoryBacking(), Clock()
    svc = memory_service([P1], backing, clock=clock, lease_ms=LEASE_MS)
    await register(DirectStub(svc), "sp-1", "tp-1", "target-1")
    epoch = svc.state.assignments["p1"].epoch
    assert epoch > 0
    svc.close()
    svc.store.close()
    clock.t += 60
    svc2 = memory_service([P1], backing, clock=clock, lease_ms=LEASE_MS)
    hb = await DirectStub(svc2).Heartbeat(cpb.HeartbeatRequest(node_id="sp-1"))
    assert hb.known
    first = (await Watch(svc2, "sp-1").next())["p1"]
    assert first.epoch == epoch
    assert first.source_proxy.node_id == "sp-1"


async def test_close_ends_watch_streams_direct() -> None:
    svc = memory_service([P1])
    w = Watch(svc, "nobody")
    assert await w.next() == {}
    svc.close()
    with pytest.raises(StopAsyncIteration):
        await w.next()
    with pytest.raises(grpc.aio.AioRpcError) as err:   # no new streams once closed
        await Watch(svc, "nobody").next()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_drain_is_stored_and_survives_a_restart_direct() -> None:
    """`cdpctl node drain` is stored before it takes effect: after a coordinator
    restart (or a standby's takeover, which loads the same way) the proxy is still
    drained and gets no policy back; an undrain is stored too."""
    backing, clock = MemoryBacking(), Clock()
    svc = memory_service([P1], backing, clock=clock, lease_ms=LEASE_MS)
    stub = DirectStub(svc)
    await register(stub, "filter-1", "sp-1", "sp-2", "tp-1", "target-1")
    first = svc.state.assignments["p1"].source_proxy.node_id
    other = ({"sp-1", "sp-2"} - {first}).pop()
    reply = await stub.DrainNode(cpb.DrainNodeRequest(node_id=first))
    assert reply.draining and backing.drains == {first}
    assert svc.state.assignments["p1"].source_proxy.node_id == other
    svc.close()
    svc.store.close()
    svc2 = memory_service([P1], backing, clock=clock, lease_ms=LEASE_MS)
    assert svc2.state.draining == {first}
    await register(DirectStub(svc2), "filter-1", first, other, "tp-1", "target-1")
    assert svc2.state.assignments["p1"].source_proxy.node_id == other
    st = await DirectStub(svc2).GetStatus(cpb.StatusRequest())
    assert {n.info.id: n.draining for n in st.nodes}[first]
    await DirectStub(svc2).DrainNode(cpb.DrainNodeRequest(node_id=first, undrain=True))
    assert backing.drains == frozenset() and svc2.state.draining == set()
