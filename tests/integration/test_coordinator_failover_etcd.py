"""Standby coordinators (issue 13 item 2) against a real etcd: two cdp-coordinator
processes on one etcd prefix, and simulated nodes that are the real node client
(`cdp_common.coordclient.CoordinatorClient`, so they speak the real protocol and
follow the leader through their address list). The leader is SIGKILLed: the
standby leads within a few seconds (the time is printed; only a generous bound
fails), every assignment keeps its epoch, `cdpctl`'s call through the address
list answers before and after, and a source proxy lost after the takeover is
rebound by the new leader (its policy alone gets a new epoch). A leader stopped
with SIGTERM resigns, and the standby leads at once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from etcdfixture import EtcdServer, etcd_server, free_ports

from cdp_common import rpc
from cdp_common.config import NodeConfig, TlsConfig
from cdp_common.coordclient import STANDBY_KEY, CoordinatorClient, metadata_value
from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
from cdp_common.pb.cdp.v1 import coordinator_pb2_grpc as cgrpc
from cdpctl import coordcall
from cdpctl.resolve import Coordinator

__all__ = ["etcd_server"]   # the module-scoped fixture, used by name

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[2]
TLS = TlsConfig(insecure=True)
LEASE_MS = 3000
TAKEOVER_TARGET_S = 5.0
TAKEOVER_BOUND_S = 30.0

NODES = [("filter-1", cpb.ROLE_FILTER), ("filter-2", cpb.ROLE_FILTER),
         ("sp-1", cpb.ROLE_SOURCE_PROXY), ("sp-2", cpb.ROLE_SOURCE_PROXY),
         ("tp-1", cpb.ROLE_TARGET_PROXY), ("target-1", cpb.ROLE_TARGET)]
POLICIES = [("p1", "filter-1"), ("p2", "filter-2"), ("p3", "filter-1")]


def write_config(path: Path, name: str, port: int, etcd: str) -> None:
    lines = ["[node]", f'id = "{name}"', f'listen = "127.0.0.1:{port}"', "",
             "[coordinator]", 'store = "etcd"', f'etcd_endpoints = ["{etcd}"]',
             'etcd_prefix = "/failover/"', "heartbeat_ms = 500", f"lease_ms = {LEASE_MS}",
             "election_ttl_s = 2", "takeover_grace_ms = 6000", "rebalance_max_per_minute = 0",
             "", "[tls]", "insecure = true", "", "[log]", 'level = "info"', ""]
    for pname, filt in POLICIES:
        lines += ["[[policies]]", f'name = "{pname}"', 'target = "target-1"', "",
                  "[[policies.disks]]", f'filter = "{filt}"', f'name = "{pname}-d0"',
                  "size_bytes = 1048576", ""]
    path.write_text("\n".join(lines))


class Coordinators:
    def __init__(self, work: Path, etcd: str) -> None:
        self.work = work
        self.etcd = etcd
        self.ports = free_ports(2)
        self.addresses = [f"127.0.0.1:{p}" for p in self.ports]
        self.procs: list[subprocess.Popen[bytes] | None] = [None, None]

    def start(self, i: int) -> None:
        cfg = self.work / f"coordinator-{i}.toml"
        write_config(cfg, f"coordinator-{i}", self.ports[i], self.etcd)
        with open(self.work / f"coordinator-{i}.log", "ab") as out:
            self.procs[i] = subprocess.Popen(
                [sys.executable, "-m", "cdp_coordinator", "run", "--config", str(cfg)],
                cwd=ROOT, stdout=out, stderr=out, stdin=subprocess.DEVNULL)

    def kill(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        self.procs[i] = None

    def stop_all(self) -> None:
        for i, proc in enumerate(self.procs):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.kill(i)

    def log(self, i: int) -> str:
        return (self.work / f"coordinator-{i}.log").read_text(errors="replace")[-3000:]


async def role_of(address: str) -> str:
    """"leader", "standby" or "down", from one GetStatus and its trailer."""
    channel = rpc.channel(address, TLS, 8 << 20)
    try:
        call = cgrpc.CoordinatorStub(channel).GetStatus(cpb.StatusRequest(), timeout=2)
        await call
        standby = metadata_value(await call.trailing_metadata(), STANDBY_KEY)
        return "standby" if standby else "leader"
    except grpc.aio.AioRpcError:
        return "down"
    finally:
        await channel.close()


async def is_role(address: str, want: str) -> bool:
    return await role_of(address) == want


async def until(pred: Callable[[], object], timeout_s: float, what: str) -> float:
    t0 = time.monotonic()
    while True:
        result = pred()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return time.monotonic() - t0
        assert time.monotonic() - t0 < timeout_s, f"{what}: not within {timeout_s} s"
        await asyncio.sleep(0.1)


def status(addresses: list[str]) -> cpb.StatusReply:
    coord = Coordinator(address=",".join(addresses), tls=TLS, source="--coordinator")
    return coordcall.call(coord, lambda s: s.GetStatus(cpb.StatusRequest(), timeout=3),
                          refusals=False)


def reports(node_id: str) -> Callable[[], list[cpb.PolicyReport]]:
    """What a filter or target reports: its policies, caught up."""
    def fn() -> list[cpb.PolicyReport]:
        now = time.time_ns()
        if node_id.startswith("filter"):
            return [cpb.PolicyReport(policy=p, captured_seq=1, captured_time_ns=now)
                    for p, f in POLICIES if f == node_id]
        if node_id.startswith("target"):
            return [cpb.PolicyReport(policy=p, durable_seq=1, applied_seq=1, newest_time_ns=now)
                    for p, _ in POLICIES]
        return []
    return fn


@contextlib.asynccontextmanager
async def nodes(addresses: list[str]) -> AsyncIterator[dict[str, CoordinatorClient]]:
    clients: dict[str, CoordinatorClient] = {}
    for i, (nid, role) in enumerate(NODES):
        cfg = NodeConfig(id=nid, coordinator=",".join(addresses))
        clients[nid] = CoordinatorClient(cfg, TLS, role, f"127.0.0.1:{20000 + i}", "",
                                         reports(nid), lambda _set: None)
        clients[nid].start()
    try:
        yield clients
    finally:
        for c in clients.values():
            await c.stop()


def epochs(reply: cpb.StatusReply) -> dict[str, int]:
    return {p.name: p.epoch for p in reply.policies}


async def test_the_standby_takes_over_keeping_every_epoch(etcd_server: EtcdServer,
                                                         tmp_path: Path) -> None:
    coords = Coordinators(tmp_path, etcd_server.endpoint)
    coords.start(0)
    try:
        await until(lambda: is_role(coords.addresses[0], "leader"), 30,
                    "coordinator-0 leads")
        coords.start(1)
        await until(lambda: is_role(coords.addresses[1], "standby"), 30,
                    "coordinator-1 stands by")
        # the nodes list the standby first: they must find the leader themselves
        addresses = [coords.addresses[1], coords.addresses[0]]
        async with nodes(addresses) as clients:
            def all_bound() -> bool:
                reply = status(addresses)
                up = {n.info.id for n in reply.nodes if n.state == "up"}
                return up == {n for n, _ in NODES} and all(
                    p.source_proxy and p.target_proxy and p.epoch for p in reply.policies)
            await until(lambda: asyncio.to_thread(all_bound), 30, "nodes up, policies bound")
            before = epochs(await asyncio.to_thread(status, addresses))
            assert set(before) == {p for p, _ in POLICIES}
            assert all(c.address == coords.addresses[0] for c in clients.values())

            t0 = time.monotonic()
            coords.kill(0)                                   # SIGKILL the leader
            took = await until(lambda: is_role(coords.addresses[1], "leader"),
                               TAKEOVER_BOUND_S, "the standby leads")
            print(f"\nleader SIGKILLed: the standby leads after {took:.2f} s "
                  f"(target {TAKEOVER_TARGET_S:.0f} s)")
            if took > TAKEOVER_TARGET_S:
                print(f"WARNING: takeover took longer than {TAKEOVER_TARGET_S:.0f} s")

            def all_back() -> bool:
                reply = status(addresses)
                up = {n.info.id for n in reply.nodes if n.state == "up"}
                return up == {n for n, _ in NODES}
            back = await until(lambda: asyncio.to_thread(all_back), 30,
                               "every node heartbeats to the new leader")
            print(f"every node follows the new leader {time.monotonic() - t0:.2f} s after "
                  f"the kill ({back:.2f} s after the takeover)")
            assert all(c.address == coords.addresses[1] for c in clients.values())
            # past the takeover grace: still no assignment changed
            await asyncio.sleep(7.0)
            after = await asyncio.to_thread(status, addresses)
            assert epochs(after) == before, coords.log(1)
            assert all(p.source_proxy and p.target_proxy for p in after.policies)

            # a source proxy lost now is rebound by the new leader, and only its policies
            victim = next(p.source_proxy for p in after.policies if p.name == "p1")
            await clients[victim].stop()
            moved = {p.name for p in after.policies if p.source_proxy == victim}

            def rebound() -> bool:
                reply = status(addresses)
                return all(p.source_proxy and p.source_proxy != victim
                           for p in reply.policies if p.name in moved)
            await until(lambda: asyncio.to_thread(rebound), 30, "the lost proxy rebound")
            final = epochs(await asyncio.to_thread(status, addresses))
            for name, epoch in before.items():
                if name in moved:
                    assert final[name] > epoch
                else:
                    assert final[name] == epoch

            # the old leader comes back as a standby; a SIGTERM of the leader resigns:
            # the standby leads without waiting for the lease to run out
            coords.start(0)
            await until(lambda: is_role(coords.addresses[0], "standby"), 30,
                        "coordinator-0 stands by")
            proc = coords.procs[1]
            assert proc is not None
            proc.terminate()
            took = await until(lambda: is_role(coords.addresses[0], "leader"),
                               TAKEOVER_BOUND_S, "the standby leads after a SIGTERM")
            print(f"leader stopped (SIGTERM): the standby leads after {took:.2f} s")
            assert proc.wait(timeout=10) == 0
            assert epochs(await asyncio.to_thread(status, addresses)) == final
    finally:
        coords.stop_all()
