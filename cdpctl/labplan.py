"""The plan of a local lab: directories, ports, configs and lab.json, with no I/O.

Theory of operation: `plan_lab(root, disks, size, ports, insecure)` turns the
operator's few choices plus a list of free ports into a `LabPlan` — one
`NodePlan` per daemon with its rendered TOML config — and `lab_json()` gives
the state file `cdpctl lab` writes once everything runs. Side effects
(picking ports, writing files, starting processes) live in `cdpctl.lab`, so
what a lab looks like is tested here without starting anything.

Layout under the lab directory:

    pki/     ca.pem, ca.key, <node>.pem/.key, cdpctl.pem/.key (the CLI's admin operator cert),
             assignments.key/.pub (the coordinator's assignment signing key)
    config/  <node>.toml, master.key (shared by both proxies)
    data/    coordinator/state.db, target-1/<policy>/replicas/, filter-1/images/
    logs/    <node>.log (stdout + stderr of each daemon)
    mnt/     the filter's FUSE mount: one file per protected disk
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdp_common import identity
from cdp_common.names import NAME_RE
from cdpctl import tomlw

POLICY = "lab"
FILTER_ID = "filter-1"
TARGET_ID = "target-1"
SOURCE_PROXY_ID = "source-proxy-1"
TARGET_PROXY_ID = "target-proxy-1"
COORDINATOR_ID = "coordinator"
CLI_CERT = "cdpctl"
HOST = "127.0.0.1"

# Start order; `lab down` stops in STOP_ORDER (data producers first).
START_ORDER = (COORDINATOR_ID, TARGET_ID, TARGET_PROXY_ID, SOURCE_PROXY_ID, FILTER_ID)
STOP_ORDER = (FILTER_ID, SOURCE_PROXY_ID, TARGET_PROXY_ID, TARGET_ID, COORDINATOR_ID)
PORTS_NEEDED = 2 * len(START_ORDER)
ROLE_STOP_RANK = {"filter": 0, "source-proxy": 1, "target-proxy": 2, "target": 3,
                  "coordinator": 4}
MAX_PROXIES = 16


def proxy_ids(kind: str, n: int) -> list[str]:
    """`source-proxy-1..n` or `target-proxy-1..n`."""
    return [f"{kind}-{i}" for i in range(1, n + 1)]


def start_order(source_proxies: int = 1, target_proxies: int = 1) -> tuple[str, ...]:
    return (COORDINATOR_ID, TARGET_ID, *proxy_ids("target-proxy", target_proxies),
            *proxy_ids("source-proxy", source_proxies), FILTER_ID)


def ports_needed(source_proxies: int = 1, target_proxies: int = 1) -> int:
    return 2 * len(start_order(source_proxies, target_proxies))


def stop_rank(role: str) -> int:
    """`lab down` stops data producers first: filter, source proxies, ..., coordinator."""
    return ROLE_STOP_RANK.get(role, -1)
_ID = NAME_RE   # as node ids in cdp_common.config


def valid_id(node_id: str) -> bool:
    return bool(_ID.match(node_id))


@dataclass(frozen=True)
class NodePlan:
    id: str
    role: str            # coordinator | filter | source-proxy | target-proxy | target
    module: str          # python -m <module> run --config <config>
    address: str
    metrics_address: str
    config: Path
    log: Path
    config_text: str


@dataclass(frozen=True)
class DiskPlan:
    name: str
    policy: str
    path: Path
    image: Path
    replica_path: Path
    size_bytes: int


@dataclass(frozen=True)
class LabPlan:
    root: Path
    insecure: bool
    coordinator: str
    nodes: list[NodePlan]
    disks: list[DiskPlan]
    dirs: list[Path] = field(default_factory=list)

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def key_file(self) -> Path:
        return self.root / "config" / "master.key"

    @property
    def mountpoint(self) -> Path:
        return self.root / "mnt"

    @property
    def signing_key(self) -> Path:
        """The coordinator's Ed25519 key that signs assignments (and .pub beside it)."""
        return self.pki / "assignments.key"

    @property
    def signing_pub(self) -> Path:
        return self.pki / "assignments.pub"

    def tls(self, node_id: str) -> dict[str, Any]:
        if self.insecure:
            return {"insecure": True}
        out = {"ca_file": str(self.pki / "ca.pem"), "cert_file": str(self.pki / f"{node_id}.pem"),
               "key_file": str(self.pki / f"{node_id}.key")}
        if node_id not in (COORDINATOR_ID, CLI_CERT):
            out["assignment_key_file"] = str(self.signing_pub)
        return out

    def identities(self) -> dict[str, tuple[str, str]]:
        """Certificate name -> (role, scope) of every certificate the lab issues: one per
        node, and CLI_CERT, the admin operator cdpctl uses in the lab."""
        out = {n.id: (n.role, "") for n in self.nodes}
        out[CLI_CERT] = (identity.OPERATOR, identity.ADMIN)
        return out

    def node(self, node_id: str) -> NodePlan:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(node_id)

    def lab_json(self, pids: dict[str, int]) -> dict[str, Any]:
        """The lab.json document; `pids` maps node id -> pid of the started ones."""
        return {
            "version": 1,
            "dir": str(self.root),
            "coordinator": self.coordinator,
            "tls": self.tls(CLI_CERT),
            "mountpoint": str(self.mountpoint),
            "restore_dir": str(self.root / "restores"),
            "processes": [
                {"id": n.id, "role": n.role, "pid": pids[n.id], "address": n.address,
                 "metrics_address": n.metrics_address, "config": str(n.config),
                 "log": str(n.log), "module": n.module}
                for n in self.nodes if n.id in pids],
            "disks": [
                {"name": d.name, "policy": d.policy, "path": str(d.path), "image": str(d.image),
                 "replica_path": str(d.replica_path), "size_bytes": d.size_bytes}
                for d in self.disks],
        }


def plan_lab(root: Path, disks: int, disk_size_bytes: int, ports: list[int],
             insecure: bool = False, source_proxies: int = 1,
             target_proxies: int = 1) -> LabPlan:
    """Everything about a lab in `root` (absolute) using `ports` (PORTS_NEEDED free ports)."""
    if disks < 1:
        raise ValueError("a lab needs at least one disk")
    for what, n in (("source", source_proxies), ("target", target_proxies)):
        if not 1 <= n <= MAX_PROXIES:
            raise ValueError(f"{what} proxies: expected 1..{MAX_PROXIES}, got {n}")
    order = start_order(source_proxies, target_proxies)
    if len(ports) < 2 * len(order):
        raise ValueError(f"need {2 * len(order)} ports, got {len(ports)}")
    root = root.absolute()
    free = iter(ports)
    addr = {nid: (f"{HOST}:{next(free)}", f"{HOST}:{next(free)}") for nid in order}
    coordinator = addr[COORDINATOR_ID][0]
    config_dir, data, logs, mnt = root / "config", root / "data", root / "logs", root / "mnt"
    filter_data, target_data = data / FILTER_ID, data / TARGET_ID

    disk_plans = [DiskPlan(name=f"disk{i}", policy=POLICY, path=mnt / f"disk{i}",
                           image=filter_data / "images" / f"disk{i}.img",
                           replica_path=target_data / POLICY / "replicas" / f"disk{i}.img",
                           size_bytes=disk_size_bytes)
                  for i in range(disks)]

    plan = LabPlan(root=root, insecure=insecure, coordinator=coordinator, nodes=[],
                   disks=disk_plans,
                   dirs=[root / "pki", config_dir, data, logs, mnt, data / COORDINATOR_ID,
                         filter_data, filter_data / "images", target_data])

    def node_section(nid: str) -> dict[str, Any]:
        section: dict[str, Any] = {"id": nid, "site": "default", "listen": addr[nid][0],
                                   "metrics_listen": addr[nid][1]}
        if nid != COORDINATOR_ID:
            section["coordinator"] = coordinator
        return section

    docs: dict[str, tuple[str, str, dict[str, Any]]] = {
        COORDINATOR_ID: ("coordinator", "cdp_coordinator", {
            "node": node_section(COORDINATOR_ID),
            "coordinator": {"db_path": str(data / COORDINATOR_ID / "state.db"),
                            **({} if insecure else {"signing_key_file": str(plan.signing_key)})},
            "policies": [{
                "name": POLICY, "target": TARGET_ID,
                "disks": [{"filter": FILTER_ID, "name": d.name, "size_bytes": d.size_bytes}
                          for d in disk_plans],
            }],
        }),
        TARGET_ID: ("target", "cdp_target", {
            "node": node_section(TARGET_ID),
            "target": {"data_dir": str(target_data), "restore_dir": str(root / "restores")},
        }),
        TARGET_PROXY_ID: ("target-proxy", "cdp_proxy", {
            "node": node_section(TARGET_PROXY_ID),
            "proxy": {"role": "target", "key_file": str(plan.key_file)},
        }),
        SOURCE_PROXY_ID: ("source-proxy", "cdp_proxy", {
            "node": node_section(SOURCE_PROXY_ID),
            "proxy": {"role": "source", "key_file": str(plan.key_file)},
        }),
        FILTER_ID: ("filter", "cdp_filter", {
            "node": node_section(FILTER_ID),
            "filter": {"mountpoint": str(mnt), "data_dir": str(filter_data)},
            "disks": [{"name": d.name, "policy": d.policy, "size_bytes": d.size_bytes,
                       "image": str(d.image)} for d in disk_plans],
        }),
    }
    for kind, n in (("target-proxy", target_proxies), ("source-proxy", source_proxies)):
        role_doc = docs[f"{kind}-1"]
        for nid in proxy_ids(kind, n)[1:]:
            docs[nid] = (role_doc[0], role_doc[1], {
                "node": node_section(nid), "proxy": dict(role_doc[2]["proxy"])})
    for nid in order:
        role, module, doc = docs[nid]
        doc["tls"] = plan.tls(nid)
        plan.nodes.append(NodePlan(
            id=nid, role=role, module=module, address=addr[nid][0], metrics_address=addr[nid][1],
            config=config_dir / f"{nid}.toml", log=logs / f"{nid}.log",
            config_text=f"# Generated by `cdpctl lab up`; {role} of the lab in {root}.\n"
                        + tomlw.dumps(doc)))
    return plan
