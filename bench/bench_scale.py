"""Coordinator at scale: 1,000 disks in 200 policies (issue 13 item 5).

    .venv/bin/python bench/bench_scale.py [--stores sqlite,etcd] [--window-s 30] \
        [--kill 2] [--dir /var/tmp]

For each store (sqlite; etcd when the `etcd` binary exists, one member started
here as tests/etcdfixture.py does) this runs one real `cdp-coordinator`
process (`python -m cdp_coordinator run`, tls.insecure, heartbeat 1 s, lease
3 s) on loopback and, in this process, simulated nodes that speak the real
gRPC protocol: 40 filters (5 policies of 5 disks each), 8 source proxies
(site "hq"), 8 target proxies and 4 targets (site "dr"). Each node registers,
holds a WatchAssignments stream and heartbeats every second with its complete
reports (filters: captured seq and time per policy; targets: durable and
applied seq; proxies: bytes/s). The 200 policies are created over
CreatePolicy once every node is registered, so placement spreads them (25
per proxy).

After a warm-up it measures, over --window-s of steady state:
- coordinator CPU (utime + stime of its process, /proc/<pid>/stat) as a
  share of one core and per heartbeat served;
  nothing else calls the coordinator meanwhile;
- then `GetStatus` latency p50/p99 (--status-calls, one every 0.25 s).
Then it stops the heartbeats and watch streams of --kill source proxies
(25 policies each) and measures the time from their last heartbeat until the
filters' watch streams show every affected policy on a new source proxy (a
lease of 3 s is part of it; printed apart).

With the etcd store a second coordinator runs as a standby (started once the
first leads). Last, the leader is SIGKILLed: the figures are the time until
the standby leads (it accepts a Register) and until every simulated node
heartbeats to it (each node moves to the other address when its coordinator
fails or refuses as a standby), and how many policies changed source proxy
(none should: the new leader loads the assignments with their epochs).

Absolute figures depend on the machine; the goals are GetStatus p99 < 1 s,
CPU < 50 % of a core, rebind of 50 policies <= 5 s, leader failover <= 5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from cdp_common import rpc  # noqa: E402
from cdp_common.config import TlsConfig  # noqa: E402
from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb  # noqa: E402
from cdp_common.pb.cdp.v1 import coordinator_pb2_grpc as cgrpc  # noqa: E402

TLS = TlsConfig(insecure=True)
FILTERS, POLICIES_PER_FILTER, DISKS_PER_POLICY = 40, 5, 5
SOURCE_PROXIES, TARGET_PROXIES, TARGETS = 8, 8, 4
HEARTBEAT_S, LEASE_MS = 1.0, 3000
MSG = 64 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


@dataclass
class Topology:
    filters: list[str] = field(default_factory=lambda: [f"filter-{i}" for i in range(FILTERS)])
    sps: list[str] = field(default_factory=lambda: [f"sp-{i}" for i in range(SOURCE_PROXIES)])
    tps: list[str] = field(default_factory=lambda: [f"tp-{i}" for i in range(TARGET_PROXIES)])
    targets: list[str] = field(default_factory=lambda: [f"target-{i}" for i in range(TARGETS)])

    def policies(self) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for fi, f in enumerate(self.filters):
            for j in range(POLICIES_PER_FILTER):
                n = fi * POLICIES_PER_FILTER + j
                out.append({"name": f"pol-{n:03d}", "target": self.targets[n % TARGETS],
                            "source_site": "hq", "target_site": "dr",
                            "disks": [{"filter": f, "name": f"p{n}d{d}",
                                       "size_bytes": 1 << 30}
                                      for d in range(DISKS_PER_POLICY)]})
        return out


class FakeNode:
    """One node: Register, a WatchAssignments stream, a Heartbeat a second."""

    def __init__(self, node_id: str, role: int, site: str, address: str,
                 policies: list[str], bench: Bench) -> None:
        self.id, self.role, self.site, self.address = node_id, role, site, address
        self.policies = policies
        self.bench = bench
        self.seq = 0
        self.stopped = False
        self.last_beat = 0.0
        self.sources: dict[str, str] = {}
        """Policy -> source proxy id in the newest AssignmentSet seen (filters)."""
        self.tasks: list[asyncio.Task[None]] = []
        self.stubs: list[cgrpc.CoordinatorStub] = []
        self.cur = 0
        """The coordinator talked to (index into stubs); moves on failure or refusal."""

    async def register(self, stub: cgrpc.CoordinatorStub) -> None:
        await stub.Register(cpb.RegisterRequest(node=cpb.NodeInfo(
            id=self.id, role=self.role, site=self.site, address=self.address)))  # type: ignore[arg-type]

    def start(self, stubs: list[cgrpc.CoordinatorStub]) -> None:
        self.stubs = stubs
        self.tasks = [asyncio.create_task(self._watch()), asyncio.create_task(self._beat())]

    async def _move(self) -> None:
        """To the next coordinator (the leader died, or this one stands by)."""
        self.cur = (self.cur + 1) % len(self.stubs)
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self.register(self.stubs[self.cur])

    def stop(self) -> None:
        self.stopped = True
        for t in self.tasks:
            t.cancel()

    def reports(self) -> list[cpb.PolicyReport]:
        now_ns = time.time_ns()
        if self.role == cpb.ROLE_FILTER:
            return [cpb.PolicyReport(policy=p, captured_seq=self.seq, captured_time_ns=now_ns,
                                     journal_bytes=4096 * (self.seq % 7), capture_mode="journaling")
                    for p in self.policies]
        if self.role == cpb.ROLE_TARGET:
            return [cpb.PolicyReport(policy=p, durable_seq=self.seq, applied_seq=self.seq,
                                     newest_time_ns=now_ns, bytes_replicated=self.seq * 4096)
                    for p in self.policies]
        return []

    async def _beat(self) -> None:
        # spread the nodes over the second, as real ones are
        await asyncio.sleep(HEARTBEAT_S * (hash(self.id) % 1000) / 1000)
        while not self.stopped:
            self.seq += 1
            req = cpb.HeartbeatRequest(node_id=self.id, policies=self.reports(),
                                       bytes_per_s=1e6 * (self.seq % 3),
                                       sent_time_ns=time.time_ns())
            try:
                await self.stubs[self.cur].Heartbeat(req, timeout=10)
                self.last_beat = time.monotonic()
                self.bench.heartbeats += 1
            except grpc.aio.AioRpcError as exc:
                if self.bench.failing_over and len(self.stubs) > 1:
                    await self._move()
                    await asyncio.sleep(0.1)
                    continue
                self.bench.errors.append(f"{self.id} heartbeat: {exc.code().name}")
            await asyncio.sleep(HEARTBEAT_S)

    async def _watch(self) -> None:
        while not self.stopped:
            try:
                async for s in self.stubs[self.cur].WatchAssignments(
                        cpb.WatchRequest(node_id=self.id)):
                    self.sources = {a.policy: a.source_proxy.node_id for a in s.assignments}
                    self.bench.changed.set()
                return
            except grpc.aio.AioRpcError as exc:
                if self.stopped:
                    return
                if not (self.bench.failing_over and len(self.stubs) > 1):
                    self.bench.errors.append(f"{self.id} watch: {exc.code().name}")
                    return
                await asyncio.sleep(0.2)   # the heartbeat loop picks the coordinator


class Bench:
    def __init__(self) -> None:
        self.heartbeats = 0
        self.errors: list[str] = []
        self.changed = asyncio.Event()
        self.failing_over = False
        """Set when the leader is killed: failed calls then move to the standby."""


def write_config(path: Path, port: int, store: str, work: Path, etcd: str,
                 node_id: str = "coordinator") -> None:
    lines = ["[node]", f'id = "{node_id}"', f'listen = "127.0.0.1:{port}"',
             "max_message_bytes = 67108864", "max_concurrent_rpcs = 100000",
             "max_streams_per_peer = 100000", "", "[coordinator]",
             f'store = "{store}"', f"heartbeat_ms = {int(HEARTBEAT_S * 1000)}",
             f"lease_ms = {LEASE_MS}"]
    lines += [f'db_path = "{work / "state.db"}"'] if store == "sqlite" else \
        [f'etcd_endpoints = ["{etcd}"]']
    lines += ["", "[tls]", "insecure = true", "", "[log]", 'level = "warning"', ""]
    path.write_text("\n".join(lines))


async def wait_up(address: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"coordinator exited {proc.returncode}: "
                               f"{log.read_text(errors='replace')[-2000:]}")
        ch = rpc.channel(address, TLS, MSG)
        try:
            await cgrpc.CoordinatorStub(ch).GetStatus(cpb.StatusRequest(), timeout=1)
            return
        except grpc.aio.AioRpcError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
        finally:
            await ch.close()


def start_coordinator(work: Path, name: str, store: str, etcd: str,
                      ) -> tuple[str, subprocess.Popen[bytes], Path]:
    port = free_port()
    cfg, log = work / f"{name}.toml", work / f"{name}.log"
    write_config(cfg, port, store, work, etcd, node_id=name)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cdp_coordinator", "run", "--config",
                                 str(cfg)], cwd=ROOT, stdout=out, stderr=out,
                                stdin=subprocess.DEVNULL)
    return f"127.0.0.1:{port}", proc, log


async def leads(stub: cgrpc.CoordinatorStub) -> bool:
    """A standby refuses Register (UNAVAILABLE); the leader takes it."""
    try:
        await stub.Register(cpb.RegisterRequest(node=cpb.NodeInfo(
            id="bench-probe", role=cpb.ROLE_TARGET_PROXY, site="probe",
            address="127.0.0.9:1")), timeout=2)
        return True
    except grpc.aio.AioRpcError:
        return False


async def run_store(store: str, args: argparse.Namespace, etcd: str) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix=f"bench-scale-{store}-", dir=args.dir))
    address, proc, log = start_coordinator(work, "coordinator", store, etcd)
    standby: subprocess.Popen[bytes] | None = None
    bench = Bench()
    topo = Topology()
    pols = topo.policies()
    by_filter: dict[str, list[str]] = {}
    by_target: dict[str, list[str]] = {}
    for p in pols:
        by_filter.setdefault(p["disks"][0]["filter"], []).append(str(p["name"]))  # type: ignore[index]
        by_target.setdefault(str(p["target"]), []).append(str(p["name"]))
    nodes: list[FakeNode] = []
    for kind, (ids, role, site, reports) in enumerate((
            (topo.filters, cpb.ROLE_FILTER, "hq", by_filter),
            (topo.sps, cpb.ROLE_SOURCE_PROXY, "hq", {}),
            (topo.tps, cpb.ROLE_TARGET_PROXY, "dr", {}),
            (topo.targets, cpb.ROLE_TARGET, "dr", by_target))):
        for i, nid in enumerate(ids):
            nodes.append(FakeNode(nid, role, site, f"127.0.0.{2 + kind}:{10000 + i}",
                                  reports.get(nid, []), bench))
    channels: list[grpc.aio.Channel] = []
    try:
        await wait_up(address, proc, log)
        addresses = [address]
        if store == "etcd":   # a standby, started once the first coordinator leads
            admin_ch = rpc.channel(address, TLS, MSG)
            channels.append(admin_ch)
            deadline = time.monotonic() + 30
            while not await leads(cgrpc.CoordinatorStub(admin_ch)):
                if time.monotonic() > deadline:
                    raise RuntimeError("the first coordinator did not lead")
                await asyncio.sleep(0.2)
            standby_address, standby, standby_log = start_coordinator(
                work, "coordinator-b", store, etcd)
            await wait_up(standby_address, standby, standby_log)
            addresses.append(standby_address)
        stubs = []
        for _ in nodes:
            node_stubs = []
            for a in addresses:
                ch = rpc.channel(a, TLS, MSG)
                channels.append(ch)
                node_stubs.append(cgrpc.CoordinatorStub(ch))
            stubs.append(node_stubs)
        admin_ch = rpc.channel(address, TLS, MSG)
        channels.append(admin_ch)
        admin = cgrpc.CoordinatorStub(admin_ch)
        t0 = time.monotonic()
        for n, s in zip(nodes, stubs, strict=True):
            await n.register(s[0])
        for n, s in zip(nodes, stubs, strict=True):
            n.start(s)
        for p in pols:
            await admin.CreatePolicy(cpb.CreatePolicyRequest(policy_json=json.dumps(p)))
        setup_s = time.monotonic() - t0
        await asyncio.sleep(args.warmup_s)

        # steady state: CPU per heartbeat (nothing else asks the coordinator anything)
        cpu0, hb0, w0 = proc_cpu_s(proc.pid), bench.heartbeats, time.monotonic()
        await asyncio.sleep(args.window_s)
        cpu1, hb1, w1 = proc_cpu_s(proc.pid), bench.heartbeats, time.monotonic()
        cpu_share = (cpu1 - cpu0) / (w1 - w0)
        beats = hb1 - hb0
        # then GetStatus latency, one call every 0.25 s (heartbeats go on)
        lat: list[float] = []
        reply = cpb.StatusReply()
        for _ in range(args.status_calls):
            t = time.perf_counter()
            reply = await admin.GetStatus(cpb.StatusRequest(), timeout=30)
            lat.append(time.perf_counter() - t)
            await asyncio.sleep(0.25)
        states: dict[str, int] = {}
        for ps in reply.policies:
            states[ps.state] = states.get(ps.state, 0) + 1

        # kill source proxies: stop their heartbeats and watch streams
        filters = [n for n in nodes if n.role == cpb.ROLE_FILTER]
        killed = {n.id for n in nodes if n.role == cpb.ROLE_SOURCE_PROXY
                  and n.id in topo.sps[:args.kill]}
        affected = {p: sp for f in filters for p, sp in f.sources.items() if sp in killed}
        spread: dict[str, int] = {}
        for f in filters:
            for sp in f.sources.values():
                spread[sp] = spread.get(sp, 0) + 1
        print(f"  [{store}] policies per source proxy: "
              + " ".join(f"{k or '-'}={v}" for k, v in sorted(spread.items())))
        for n in nodes:
            if n.id in killed:
                n.stop()
        last = max(n.last_beat for n in nodes if n.id in killed)
        deadline = time.monotonic() + 60
        rebind_s = float("nan")
        while time.monotonic() < deadline:
            bench.changed.clear()
            now_src = {p: sp for f in filters for p, sp in f.sources.items()}
            if all(now_src.get(p, "") not in killed | {""} for p in affected):
                rebind_s = time.monotonic() - last
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(bench.changed.wait(), timeout=0.5)
        failover: dict[str, float] = {}
        if standby is not None:
            failover = await kill_leader(proc, nodes, killed, bench, addresses[1])
        for n in nodes:
            n.stop()
        return {**failover, "setup_s": setup_s, "cpu_share": cpu_share, "beats": beats,
                "cpu_ms_per_beat": 1000 * (cpu1 - cpu0) / max(1, beats),
                "status_p50_ms": 1000 * statistics.median(lat),
                "status_p99_ms": 1000 * pct(lat, 0.99), "status_calls": len(lat),
                "status_bytes": reply.ByteSize(), "affected": len(affected),
                "rebind_s": rebind_s, "errors": len(bench.errors),
                "ok": states.get("ok", 0), "policies": len(reply.policies)}
    finally:
        for ch in channels:
            await ch.close()
        for coord in (proc, standby):
            if coord is None:
                continue
            coord.terminate()
            try:
                coord.wait(timeout=10)
            except subprocess.TimeoutExpired:
                coord.kill()
                coord.wait()
        if bench.errors:
            print(f"  [{store}] {len(bench.errors)} errors, first: {bench.errors[:3]}; "
                  f"coordinator log kept: {log}")
        else:
            shutil.rmtree(work, ignore_errors=True)


async def kill_leader(leader: subprocess.Popen[bytes], nodes: list[FakeNode],
                      killed: set[str], bench: Bench, standby: str) -> dict[str, float]:
    """SIGKILL the leader; time the standby's takeover and the nodes' move to it."""
    filters = [n for n in nodes if n.role == cpb.ROLE_FILTER]
    before = {p: sp for f in filters for p, sp in f.sources.items()}
    live = [n for n in nodes if n.id not in killed]
    ch = rpc.channel(standby, TLS, MSG)
    try:
        bench.failing_over = True
        leader.kill()
        leader.wait()
        t0 = time.monotonic()
        leader_s = all_s = float("nan")
        deadline = t0 + 60
        while time.monotonic() < deadline:
            if await leads(cgrpc.CoordinatorStub(ch)):
                leader_s = time.monotonic() - t0
                break
            await asyncio.sleep(0.05)
        while time.monotonic() < deadline:
            if all(n.last_beat > t0 + leader_s and n.cur == 1 for n in live):
                all_s = time.monotonic() - t0
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(2 * HEARTBEAT_S)   # the watch streams reconnected by now
        after = {p: sp for f in filters for p, sp in f.sources.items()}
        moved = sum(1 for p, sp in before.items() if after.get(p) != sp)
        return {"leader_s": leader_s, "nodes_moved_s": all_s, "assignments_moved": moved}
    finally:
        await ch.close()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/var/tmp", help="scratch directory (default /var/tmp)")
    ap.add_argument("--stores", default="sqlite,etcd")
    ap.add_argument("--window-s", type=float, default=30.0, help="steady-state window")
    ap.add_argument("--warmup-s", type=float, default=5.0)
    ap.add_argument("--status-calls", type=int, default=80, help="GetStatus calls timed")
    ap.add_argument("--kill", type=int, default=2,
                    help="source proxies killed at once (25 policies each)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from etcdfixture import EtcdServer, etcd_skip_reason

    print(f"coordinator at {FILTERS * POLICIES_PER_FILTER * DISKS_PER_POLICY} disks, "
          f"{FILTERS * POLICIES_PER_FILTER} policies, {FILTERS} filters, "
          f"{SOURCE_PROXIES}+{TARGET_PROXIES} proxies, {TARGETS} targets; heartbeat "
          f"{HEARTBEAT_S:g} s, lease {LEASE_MS / 1000:g} s")
    for store in args.stores.split(","):
        etcd_server = None
        endpoint = ""
        if store == "etcd":
            why = etcd_skip_reason()
            if why:
                print(f"[etcd] skipped: {why}")
                continue
            etcd_dir = Path(tempfile.mkdtemp(prefix="bench-scale-etcd-", dir=args.dir))
            etcd_server = EtcdServer(etcd_dir / "data").start()
            endpoint = etcd_server.endpoint
        try:
            r = await run_store(store, args, endpoint)
        finally:
            if etcd_server is not None:
                etcd_server.stop()
                shutil.rmtree(etcd_server.data_dir.parent, ignore_errors=True)
        print(f"[{store}] setup (register 60 nodes + create 200 policies) {r['setup_s']:.1f} s;"
              f" {r['ok']:.0f}/{r['policies']:.0f} policies ok")
        print(f"[{store}] coordinator CPU {100 * r['cpu_share']:.1f} % of a core; "
              f"{r['cpu_ms_per_beat']:.2f} ms per heartbeat ({r['beats']:.0f} heartbeats in "
              f"{args.window_s:g} s)")
        print(f"[{store}] GetStatus p50 {r['status_p50_ms']:.1f} ms, p99 "
              f"{r['status_p99_ms']:.1f} ms ({r['status_calls']:.0f} calls, "
              f"{r['status_bytes'] / 1024:.0f} KiB)")
        print(f"[{store}] rebind of {r['affected']:.0f} policies ({args.kill} source proxies "
              f"killed): {r['rebind_s']:.2f} s after their last heartbeat (lease "
              f"{LEASE_MS / 1000:g} s + {r['rebind_s'] - LEASE_MS / 1000:.2f} s)")
        if "leader_s" in r:
            print(f"[{store}] leader SIGKILLed: the standby leads after {r['leader_s']:.2f} s, "
                  f"every node heartbeats to it after {r['nodes_moved_s']:.2f} s; "
                  f"{r['assignments_moved']:.0f} policies changed source proxy")


if __name__ == "__main__":
    asyncio.run(main())
