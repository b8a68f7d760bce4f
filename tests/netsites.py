"""Two sites in network namespaces (DESIGN §8), for network fault tests.

Theory of operation: `TwoSites.up()` creates two network namespaces joined
by one veth pair on TEST-NET-2 (198.51.100.0/24: this machine's own network
is 192.0.2.0/24, so the sites stay off it): the source site (coordinator,
filter, source proxy) at 198.51.100.1 and the DR site (target proxy,
target) at 198.51.100.2. The daemons' configs are the local lab's
(cdpctl.labplan) with every 127.0.0.1 address moved to its site's address
and the sites named "src" and "dr"; certificates name both addresses. Each
daemon runs as `nsenter --net=/run/netns/NS python -m cdp_X run`: only the
network namespace changes, so the filter's FUSE mount is visible to the
test. Faults are iptables rules and a tc qdisc in the source namespace, on
the veth: they cut or thin out everything between the sites and nothing
inside a site. `down()` kills what it started (by pid), lazily unmounts the
FUSE mounts and deletes both namespaces (which removes the veth pair and
every rule and qdisc in them).

`topology` (a `labplan.Topology`) runs a bigger lab the same way: every
filter and source proxy with the coordinator at the source site, every target
proxy and target at the DR site (the plan names the sites "src" and "dr").
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdp_common import assignsig, crypto, pki
from cdpctl import labplan

SRC_IP, DR_IP = "198.51.100.1", "198.51.100.2"
SRC_NODES = (labplan.COORDINATOR_ID, labplan.SOURCE_PROXY_ID, labplan.FILTER_ID)
SRC_ROLES = ("coordinator", "filter", "source-proxy")


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=30)


def netns_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    dirs = [*os.environ.get("PATH", "/usr/bin").split(os.pathsep), "/usr/sbin", "/sbin"]
    for tool in ("ip", "iptables", "tc", "nsenter"):
        if not any(os.access(os.path.join(d, tool), os.X_OK) for d in dirs):
            return f"{tool} is missing (scripts/bootstrap.sh installs iproute2 and iptables)"
    return None


@dataclass
class TwoSites:
    root: Path
    disk_size: int = 64 * 1024 * 1024
    tag: str = field(default_factory=lambda: f"{os.getpid() % 100000}")
    pids: dict[str, int] = field(default_factory=dict)
    plan: labplan.LabPlan | None = None
    topology: labplan.Topology | None = None

    @property
    def ns_src(self) -> str:
        return f"cdpsrc{self.tag}"

    @property
    def ns_dr(self) -> str:
        return f"cdpdr{self.tag}"

    @property
    def veth(self) -> str:
        return f"cdpv{self.tag}"      # in the source namespace; its peer is in the DR one

    def ns_of(self, node_id: str) -> str:
        return self.ns_src if self._at_source(node_id) else self.ns_dr

    def _at_source(self, node_id: str) -> bool:
        if self.plan is None:
            return node_id in SRC_NODES
        return self.plan.node(node_id).role in SRC_ROLES

    # ------------------------------------------------------------ set-up

    def up(self) -> None:
        self._network()
        self._configs()
        for node in self._plan().nodes:
            self.start(node.id)
            if node.id == labplan.COORDINATOR_ID:
                self.wait(lambda: self.cli("status").returncode == 0, 30,
                          "the coordinator did not come up")
        self.wait(lambda: all(Path(d.path).exists() for d in self._plan().disks), 30,
                  "the FUSE disk did not appear")

    def _plan(self) -> labplan.LabPlan:
        assert self.plan is not None
        return self.plan

    def _network(self) -> None:
        peer = f"{self.veth}d"
        run("ip", "netns", "add", self.ns_src)
        run("ip", "netns", "add", self.ns_dr)
        run("ip", "link", "add", self.veth, "netns", self.ns_src, "type", "veth",
            "peer", "name", peer, "netns", self.ns_dr)
        for ns, dev, ip in ((self.ns_src, self.veth, SRC_IP), (self.ns_dr, peer, DR_IP)):
            run("ip", "-n", ns, "link", "set", "lo", "up")
            run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            run("ip", "-n", ns, "link", "set", dev, "up")

    def _configs(self) -> None:
        topo = (dataclasses.replace(self.topology, source_site="src", dr_site="dr")
                if self.topology is not None else None)
        need = topo.ports_needed() if topo is not None else labplan.PORTS_NEEDED
        ports = list(range(17000, 17000 + need))  # free: fresh namespaces
        plan = labplan.plan_lab(self.root, 1, self.disk_size, ports, topology=topo)
        for d in plan.dirs:
            d.mkdir(parents=True, exist_ok=True)
        pki.create_ca(plan.pki, name="cdp netns CA")
        assignsig.new_key_pair(plan.signing_key, plan.signing_pub)
        for nid, (role, scope) in plan.identities().items():
            pki.create_node_cert(plan.pki / "ca.pem", plan.pki / "ca.key", plan.pki, nid,
                                 [SRC_IP, DR_IP, "127.0.0.1"], role=role, scope=scope)
        crypto.write_new_key(plan.key_file)
        self.plan = plan
        moves: dict[str, str] = {}
        for node in plan.nodes:
            ip = SRC_IP if self._at_source(node.id) else DR_IP
            for addr in (node.address, node.metrics_address):
                moves[addr] = addr.replace(labplan.HOST, ip)
        for node in plan.nodes:
            text = node.config_text
            for old, new in moves.items():
                text = text.replace(f'"{old}"', f'"{new}"')
            site = "src" if self._at_source(node.id) else "dr"
            text = text.replace('site = "default"', f'site = "{site}"')
            if node.id == labplan.COORDINATOR_ID and topo is None:
                text = text.replace('target = "target-1"\n',
                                    'target = "target-1"\nsource_site = "src"\n'
                                    'target_site = "dr"\n', 1)
            node.config.write_text(text)
        self.coordinator = moves[plan.node(labplan.COORDINATOR_ID).address]

    def start(self, node_id: str) -> int:
        node = self._plan().node(node_id)
        node.log.parent.mkdir(parents=True, exist_ok=True)
        with open(node.log, "ab") as out:
            proc = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{self.ns_of(node_id)}", sys.executable, "-m",
                 node.module, "run", "--config", str(node.config)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.pids[node_id] = proc.pid   # nsenter execs the daemon: same pid
        return proc.pid

    # ------------------------------------------------------------ use

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """cdpctl ARGS run inside the source site (where the coordinator is)."""
        pk = self._plan().pki
        return subprocess.run(
            ["nsenter", f"--net=/run/netns/{self.ns_src}", sys.executable, "-m", "cdpctl",
             *args, "--coordinator", self.coordinator, "--ca", str(pk / "ca.pem"),
             "--cert", str(pk / "cdpctl.pem"), "--key", str(pk / "cdpctl.key")],
            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)

    def status(self) -> dict[str, Any]:
        done = self.cli("status", "--json")
        assert done.returncode == 0, done.stdout + done.stderr
        return dict(json.loads(done.stdout))

    def policy(self) -> dict[str, Any]:
        return dict(self.status()["policies"][0])

    @property
    def disk_path(self) -> Path:
        return Path(self._plan().disks[0].path)

    @property
    def replica_path(self) -> Path:
        return Path(self._plan().disks[0].replica_path)

    def log(self, node_id: str) -> str:
        return self._plan().node(node_id).log.read_text(errors="replace")

    @staticmethod
    def wait(fn: Any, timeout_s: float, message: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not fn():
            if time.monotonic() > deadline:
                raise AssertionError(f"{message} (within {timeout_s}s)")
            time.sleep(0.3)

    # ------------------------------------------------------------ faults

    def ipt(self, action: str, *rule: str) -> None:
        run("ip", "netns", "exec", self.ns_src, "iptables", action, *rule)

    def partition(self, on: bool) -> None:
        """Drop every packet between the sites (both directions)."""
        action = "-I" if on else "-D"
        self.ipt(action, "INPUT", "-i", self.veth, "-j", "DROP")
        self.ipt(action, "OUTPUT", "-o", self.veth, "-j", "DROP")

    def loss(self, on: bool, probability: float = 0.1) -> None:
        """Drop a random share of the packets in each direction."""
        action = "-I" if on else "-D"
        for chain, flag in (("INPUT", "-i"), ("OUTPUT", "-o")):
            self.ipt(action, chain, flag, self.veth, "-m", "statistic", "--mode", "random",
                     "--probability", str(probability), "-j", "DROP")

    def bandwidth(self, on: bool, rate: str = "20mbit") -> None:
        """Cap what the source site sends to the DR site (token bucket)."""
        if on:
            run("ip", "netns", "exec", self.ns_src, "tc", "qdisc", "add", "dev", self.veth,
                "root", "tbf", "rate", rate, "burst", "32kbit", "latency", "400ms")
        else:
            run("ip", "netns", "exec", self.ns_src, "tc", "qdisc", "del", "dev", self.veth,
                "root")

    # ------------------------------------------------------------ tear-down

    def down(self) -> None:
        order = (sorted(self.pids, key=lambda n: labplan.stop_rank(self._plan().node(n).role))
                 if self.plan is not None else labplan.STOP_ORDER)
        for node_id in order:
            pid = self.pids.get(node_id)
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for pid in self.pids.values():
            while time.monotonic() < deadline:
                with contextlib.suppress(ChildProcessError):
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:
                        break
                time.sleep(0.05)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
        if self.plan is not None:
            for mnt in {self.plan.mountpoint, *self.plan.mountpoints.values()}:
                run("fusermount3", "-u", "-z", str(mnt), check=False)
        run("ip", "netns", "del", self.ns_src, check=False)
        run("ip", "netns", "del", self.ns_dr, check=False)
