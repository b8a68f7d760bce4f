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
    mnt/     the filter's FUSE mount: one file per protected disk; with several
             filters (`Topology`), mnt/<filter id>/ each
    data/    ... filter-<i>/, target-<j>/ per filter and target

With two filters or more, the last policy (`Topology.spanning`) has disks on
every filter: a consistency group, which the coordinator runs as one member
policy per filter, `<policy>..<filter>` (cdp_common.groups). Each filter's
config names its disks' member policy (the only policy the filter knows), the
coordinator's config the group; a member's replicas are in its own store at
the target, `data/<target>/<member>/replicas/`. lab.json lists each disk
with its `policy` (the group) and its `member` (the same name for a policy on
one filter).
"""

from __future__ import annotations

import dataclasses
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
                  "coordinator": 4, "etcd": 5}
STORES = ("sqlite", "etcd")
MAX_COORDINATORS = 5
ETCD_MEMBERS = 3
MAX_PROXIES = 16
MAX_FILTERS = 8
MAX_TARGETS = 8
MAX_POLICIES = 32
MAX_DISKS = 64
MEMBER_SEPARATOR = ".."
"""As cdp_common.groups.SEPARATOR (not imported: cdpctl's light path avoids the config)."""


def member_name(policy: str, filter_id: str) -> str:
    """The member policy of `policy` on `filter_id` (cdp_common.groups.member_name)."""
    return f"{policy}{MEMBER_SEPARATOR}{filter_id}"


def proxy_ids(kind: str, n: int) -> list[str]:
    """`source-proxy-1..n` or `target-proxy-1..n`."""
    return [f"{kind}-{i}" for i in range(1, n + 1)]


def start_order(source_proxies: int = 1, target_proxies: int = 1) -> tuple[str, ...]:
    return Topology(source_proxies=source_proxies, target_proxies=target_proxies).start_order()


def ports_needed(source_proxies: int = 1, target_proxies: int = 1) -> int:
    return 2 * len(start_order(source_proxies, target_proxies))


def stop_rank(role: str) -> int:
    """`lab down` stops data producers first: filter, source proxies, ..., coordinator."""
    return ROLE_STOP_RANK.get(role, -1)
_ID = NAME_RE   # as node ids in cdp_common.config


def valid_id(node_id: str) -> bool:
    return bool(_ID.match(node_id))


def is_coordinator_id(node_id: str) -> bool:
    """`coordinator`, or `coordinator-<i>` of a lab with standby coordinators."""
    return node_id == COORDINATOR_ID or node_id.startswith(f"{COORDINATOR_ID}-")


@dataclass(frozen=True)
class NodePlan:
    id: str
    role: str            # coordinator | filter | source-proxy | target-proxy | target | etcd
    module: str          # python -m <module> run --config <config> ("" for etcd)
    address: str
    metrics_address: str
    config: Path
    log: Path
    config_text: str
    argv: tuple[str, ...] = ()
    """Not a cdp daemon (etcd): the command line to run; argv[0] is looked up on PATH."""


@dataclass(frozen=True)
class DiskPlan:
    name: str
    policy: str
    path: Path
    image: Path
    replica_path: Path
    size_bytes: int
    filter: str = FILTER_ID
    target: str = TARGET_ID
    member: str = ""
    """The member policy that captures the disk ("" = `policy`: it is on one filter)."""

    @property
    def member_policy(self) -> str:
        return self.member or self.policy


@dataclass(frozen=True)
class LabPlan:
    root: Path
    insecure: bool
    coordinator: str
    nodes: list[NodePlan]
    disks: list[DiskPlan]
    dirs: list[Path] = field(default_factory=list)
    mountpoints: dict[str, Path] = field(default_factory=dict)   # filter id -> its mount
    topology: Topology | None = None

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def key_file(self) -> Path:
        return self.root / "config" / "master.key"

    @property
    def mountpoint(self) -> Path:
        """The first filter's mount (the only one in a one-filter lab)."""
        return self.mountpoints.get(FILTER_ID, self.root / "mnt")

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
        if node_id != CLI_CERT and not is_coordinator_id(node_id):
            out["assignment_key_file"] = str(self.signing_pub)
        return out

    def identities(self) -> dict[str, tuple[str, str]]:
        """Certificate name -> (role, scope) of every certificate the lab issues: one per
        node, and CLI_CERT, the admin operator cdpctl uses in the lab."""
        out = {n.id: (n.role, "") for n in self.nodes if not n.argv}   # etcd: plain, loopback
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
            "filters": [{"id": f, "mountpoint": str(m)} for f, m in self.mountpoints.items()],
            "topology": dataclasses.asdict(self.topology) if self.topology else None,
            "restore_dir": str(self.root / "restores"),
            "processes": [
                {"id": n.id, "role": n.role, "pid": pids[n.id], "address": n.address,
                 "metrics_address": n.metrics_address, "config": str(n.config),
                 "log": str(n.log), "module": n.module,
                 **({"argv": list(n.argv)} if n.argv else {})}
                for n in self.nodes if n.id in pids],
            "disks": [
                {"name": d.name, "policy": d.policy, "member": d.member_policy,
                 "filter": d.filter, "target": d.target,
                 "path": str(d.path), "image": str(d.image),
                 "replica_path": str(d.replica_path), "size_bytes": d.size_bytes}
                for d in self.disks],
        }


@dataclass(frozen=True)
class Topology:
    """How many of each daemon a lab runs, and where.

    Policy i (0-based) protects `disks_per_policy` disks on filter i mod
    `filters` and replicates them to target i mod `targets`; with two filters or
    more, the last policy instead has `disks_per_policy` disks on every filter
    (disk j on filter j mod `filters`): a consistency group (`spanning`). Nodes of the source
    site: the coordinator, the filters, the source proxies; of the DR site: the
    targets and the target proxies. The defaults are the one-of-each lab.

    `store = "etcd"` runs a 3-member etcd cluster on loopback (`etcd-1..3`,
    plain: loopback only) as the coordinators' store, and `coordinators` > 1
    (etcd only) runs `coordinator`, `coordinator-2`, ...: one leader, the
    others standby; every node and cdpctl get the list of their addresses.
    """

    filters: int = 1
    targets: int = 1
    policies: int = 1
    source_proxies: int = 1
    target_proxies: int = 1
    disks_per_policy: int = 1
    source_site: str = "default"
    dr_site: str = "default"
    store: str = "sqlite"
    coordinators: int = 1

    def check(self) -> None:
        """Raises ValueError naming the first count out of range."""
        for what, n, most in (("filters", self.filters, MAX_FILTERS),
                              ("targets", self.targets, MAX_TARGETS),
                              ("policies", self.policies, MAX_POLICIES),
                              ("source proxies", self.source_proxies, MAX_PROXIES),
                              ("target proxies", self.target_proxies, MAX_PROXIES),
                              ("disks", self.disks_per_policy, MAX_DISKS)):
            if not 1 <= n <= most:
                raise ValueError(f"{what}: expected 1..{most}, got {n}")
        if self.total_disks() > MAX_DISKS:
            raise ValueError(f"{self.policies} policies of {self.disks_per_policy} disks: "
                             f"at most {MAX_DISKS} disks in a lab")
        for what, site in (("source site", self.source_site), ("DR site", self.dr_site)):
            if not valid_id(site):
                raise ValueError(f"{what}: {site!r} is not a valid name")
        if self.store not in STORES:
            raise ValueError(f"store: expected one of {', '.join(STORES)}, got {self.store!r}")
        if not 1 <= self.coordinators <= MAX_COORDINATORS:
            raise ValueError(f"coordinators: expected 1..{MAX_COORDINATORS}, "
                             f"got {self.coordinators}")
        if self.coordinators > 1 and self.store != "etcd":
            raise ValueError("coordinators: more than one needs store etcd (they share it)")

    def coordinator_ids(self) -> list[str]:
        return [COORDINATOR_ID, *(f"{COORDINATOR_ID}-{i}"
                                  for i in range(2, self.coordinators + 1))]

    def etcd_ids(self) -> list[str]:
        return [f"etcd-{i}" for i in range(1, ETCD_MEMBERS + 1)] if self.store == "etcd" else []

    def filter_ids(self) -> list[str]:
        return [f"filter-{i}" for i in range(1, self.filters + 1)]

    def target_ids(self) -> list[str]:
        return [f"target-{i}" for i in range(1, self.targets + 1)]

    def policy_names(self) -> list[str]:
        """`lab` for a one-policy lab (as always), else `lab-1..K`."""
        if self.policies == 1:
            return [POLICY]
        return [f"{POLICY}-{i}" for i in range(1, self.policies + 1)]

    def spanning(self) -> str:
        """The policy with disks on every filter ("" with one filter)."""
        return self.policy_names()[-1] if self.filters > 1 else ""

    def disks_of(self, index: int) -> list[str]:
        """The filters of policy `index`'s disks, in disk order."""
        filters = self.filter_ids()
        if self.policy_names()[index] == self.spanning():
            n = self.disks_per_policy * self.filters
            return [filters[j % self.filters] for j in range(n)]
        return [filters[index % self.filters]] * self.disks_per_policy

    def total_disks(self) -> int:
        return sum(len(self.disks_of(i)) for i in range(len(self.policy_names())))

    def disk_name(self, policy: str, index: int) -> str:
        """`disk<j>` in a one-policy lab, else `<policy>-disk<j>`: disk names are
        unique on a filter, whichever policy they belong to."""
        return f"disk{index}" if self.policies == 1 else f"{policy}-disk{index}"

    def start_order(self) -> tuple[str, ...]:
        return (*self.etcd_ids(), *self.coordinator_ids(), *self.target_ids(),
                *proxy_ids("target-proxy", self.target_proxies),
                *proxy_ids("source-proxy", self.source_proxies), *self.filter_ids())

    def ports_needed(self) -> int:
        return 2 * len(self.start_order())


def plan_lab(root: Path, disks: int, disk_size_bytes: int, ports: list[int],
             insecure: bool = False, source_proxies: int = 1,
             target_proxies: int = 1, topology: Topology | None = None) -> LabPlan:
    """Everything about a lab in `root` using `ports` (topology.ports_needed() free
    ports). `topology` overrides `disks` and the proxy counts when given."""
    topo = topology or Topology(source_proxies=source_proxies, target_proxies=target_proxies,
                                disks_per_policy=disks)
    if topo.disks_per_policy < 1:
        raise ValueError("a lab needs at least one disk")
    topo.check()
    order = topo.start_order()
    if len(ports) < 2 * len(order):
        raise ValueError(f"need {2 * len(order)} ports, got {len(ports)}")
    root = root.absolute()
    free = iter(ports)
    addr = {nid: (f"{HOST}:{next(free)}", f"{HOST}:{next(free)}") for nid in order}
    coordinators = topo.coordinator_ids()
    coordinator = ",".join(addr[c][0] for c in coordinators)   # every node follows the leader
    config_dir, data, logs, mnt = root / "config", root / "data", root / "logs", root / "mnt"
    filters, targets = topo.filter_ids(), topo.target_ids()
    # One filter mounts on mnt/ (as always); several each on mnt/<filter id>/.
    mounts = {f: (mnt if topo.filters == 1 else mnt / f) for f in filters}

    disk_plans: list[DiskPlan] = []
    placed: list[tuple[str, str, str]] = []   # (policy, filter, target)
    for i, policy in enumerate(topo.policy_names()):
        target_id = targets[i % topo.targets]
        on = topo.disks_of(i)
        placed.append((policy, on[0], target_id))
        group = len(set(on)) > 1
        for j, filter_id in enumerate(on):
            name = topo.disk_name(policy, j)
            member = member_name(policy, filter_id) if group else policy
            disk_plans.append(DiskPlan(
                name=name, policy=policy, path=mounts[filter_id] / name,
                image=data / filter_id / "images" / f"{name}.img",
                replica_path=data / target_id / member / "replicas" / f"{name}.img",
                size_bytes=disk_size_bytes, filter=filter_id, target=target_id,
                member=member if group else ""))

    plan = LabPlan(root=root, insecure=insecure, coordinator=coordinator, nodes=[],
                   disks=disk_plans, mountpoints=mounts, topology=topo,
                   dirs=[root / "pki", config_dir, data, logs, mnt, data / COORDINATOR_ID,
                         *mounts.values(),
                         *[d for f in filters for d in (data / f, data / f / "images")],
                         *[data / t for t in targets]])
    source_ids = {*filters, *proxy_ids("source-proxy", topo.source_proxies), *coordinators}

    def node_section(nid: str) -> dict[str, Any]:
        site = topo.source_site if nid in source_ids else topo.dr_site
        section: dict[str, Any] = {"id": nid, "site": site, "listen": addr[nid][0],
                                   "metrics_listen": addr[nid][1]}
        if not is_coordinator_id(nid):
            section["coordinator"] = coordinator
        return section

    def policy_doc(policy: str, filter_id: str, target_id: str) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "name": policy, "target": target_id,
            "disks": [{"filter": d.filter, "name": d.name, "size_bytes": d.size_bytes}
                      for d in disk_plans if d.policy == policy]}
        if (topo.source_site, topo.dr_site) != ("default", "default"):
            doc |= {"source_site": topo.source_site, "target_site": topo.dr_site}
        return doc

    etcd = topo.etcd_ids()
    store: dict[str, Any] = (
        {"store": "etcd", "etcd_endpoints": [addr[e][0] for e in etcd]} if etcd
        else {"db_path": str(data / COORDINATOR_ID / "state.db")})
    docs: dict[str, tuple[str, str, dict[str, Any]]] = {
        c: ("coordinator", "cdp_coordinator", {
            "node": node_section(c),
            "coordinator": {**store,
                            **({} if insecure else {"signing_key_file": str(plan.signing_key)})},
            "policies": [policy_doc(*p) for p in placed],
        }) for c in coordinators}
    for t in targets:
        docs[t] = ("target", "cdp_target", {
            "node": node_section(t),
            "target": {"data_dir": str(data / t), "restore_dir": str(root / "restores")},
        })
    for kind, role, n in (("target-proxy", "target", topo.target_proxies),
                          ("source-proxy", "source", topo.source_proxies)):
        for nid in proxy_ids(kind, n):
            docs[nid] = (kind, "cdp_proxy", {
                "node": node_section(nid),
                "proxy": {"role": role, "key_file": str(plan.key_file)},
            })
    for f in filters:
        docs[f] = ("filter", "cdp_filter", {
            "node": node_section(f),
            "filter": {"mountpoint": str(mounts[f]), "data_dir": str(data / f)},
            # a filter knows only the member policy of a group's disks on it
            "disks": [{"name": d.name, "policy": d.member_policy, "size_bytes": d.size_bytes,
                       "image": str(d.image)} for d in disk_plans if d.filter == f],
        })
    cluster = ",".join(f"{e}=http://{addr[e][1]}" for e in etcd)
    for e in etcd:
        plan.nodes.append(NodePlan(   # `config`: its data dir, which names it on its cmdline
            id=e, role="etcd", module="", address=addr[e][0], metrics_address=addr[e][0],
            config=data / e, log=logs / f"{e}.log", config_text="",
            argv=("etcd", "--name", e, "--data-dir", str(data / e),
                  "--listen-client-urls", f"http://{addr[e][0]}",
                  "--advertise-client-urls", f"http://{addr[e][0]}",
                  "--listen-peer-urls", f"http://{addr[e][1]}",
                  "--initial-advertise-peer-urls", f"http://{addr[e][1]}",
                  "--initial-cluster", cluster, "--initial-cluster-state", "new",
                  "--initial-cluster-token", "cdp-lab", "--log-level", "warn",
                  "--logger", "zap",
                  # loopback: a member lost is noticed (and a new raft leader
                  # elected) in about half a second, well inside the coordinators'
                  # election lease
                  "--heartbeat-interval", "50", "--election-timeout", "500")))
    for nid in order:
        if nid in etcd:
            continue
        role, module, doc = docs[nid]
        doc["tls"] = plan.tls(nid)
        plan.nodes.append(NodePlan(
            id=nid, role=role, module=module, address=addr[nid][0], metrics_address=addr[nid][1],
            config=config_dir / f"{nid}.toml", log=logs / f"{nid}.log",
            config_text=f"# Generated by `cdpctl lab up`; {role} of the lab in {root}.\n"
                        + tomlw.dumps(doc)))
    return plan
