"""The lab plan: every generated config loads with cdp_common.config, lab.json is complete."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cdp_common import assignsig
from cdp_common.config import (
    CoordinatorConfig,
    FilterConfig,
    ProxyConfig,
    TargetConfig,
    load_config,
)
from cdpctl import labplan

PORTS = list(range(20001, 20001 + labplan.PORTS_NEEDED))
CLASSES = {"coordinator": CoordinatorConfig, "filter": FilterConfig, "source-proxy": ProxyConfig,
           "target-proxy": ProxyConfig, "target": TargetConfig}


def materialize(plan: labplan.LabPlan) -> None:
    """Write configs, stand-in TLS files and a master key, as `lab up` would (validation
    wants them; the proxies' master key must be well-formed)."""
    for d in plan.dirs:
        d.mkdir(parents=True, exist_ok=True)
    plan.key_file.write_text("00" * 32 + "\n")
    if not plan.insecure:
        assignsig.new_key_pair(plan.signing_key, plan.signing_pub)
    for node in [*plan.nodes]:
        node.config.write_text(node.config_text)
        if not plan.insecure:
            for name in ("ca.pem", f"{node.id}.pem", f"{node.id}.key"):
                (plan.pki / name).touch()


@pytest.mark.parametrize("insecure", [False, True])
def test_configs_round_trip(tmp_path: Path, insecure: bool) -> None:
    plan = labplan.plan_lab(tmp_path / "lab", 3, 256 << 20, PORTS, insecure)
    materialize(plan)
    loaded: dict[str, object] = {n.id: load_config(CLASSES[n.role], n.config) for n in plan.nodes}

    coord = loaded["coordinator"]
    assert isinstance(coord, CoordinatorConfig)
    assert coord.node.listen == plan.coordinator
    assert coord.coordinator.db_path == str(tmp_path / "lab/data/coordinator/state.db")
    (policy,) = coord.policies
    assert policy.name == "lab" and policy.target == "target-1"
    assert [(d.filter, d.name, d.size_bytes) for d in policy.disks] == [
        ("filter-1", f"disk{i}", 256 << 20) for i in range(3)]

    filt = loaded["filter-1"]
    assert isinstance(filt, FilterConfig)
    assert filt.filter.mountpoint == str(tmp_path / "lab/mnt")
    assert filt.filter.data_dir == str(tmp_path / "lab/data/filter-1")
    assert [(d.name, d.policy) for d in filt.disks] == [(f"disk{i}", "lab") for i in range(3)]

    src, dst = loaded["source-proxy-1"], loaded["target-proxy-1"]
    assert isinstance(src, ProxyConfig) and isinstance(dst, ProxyConfig)
    assert (src.proxy.role, dst.proxy.role) == ("source", "target")
    assert src.proxy.key_file == dst.proxy.key_file == str(plan.key_file)

    target = loaded["target-1"]
    assert isinstance(target, TargetConfig)
    assert target.target.data_dir == str(tmp_path / "lab/data/target-1")

    for nid, cfg in loaded.items():
        assert cfg.node.id == nid  # type: ignore[attr-defined]
        assert cfg.tls.insecure is insecure  # type: ignore[attr-defined]
        if nid != "coordinator":
            assert cfg.node.coordinator == plan.coordinator  # type: ignore[attr-defined]
        if not insecure:
            assert cfg.tls.cert_file.endswith(f"/{nid}.pem")  # type: ignore[attr-defined]


def test_ports_are_all_used_once(tmp_path: Path) -> None:
    plan = labplan.plan_lab(tmp_path, 1, 4096, PORTS)
    used = [a for n in plan.nodes for a in (n.address, n.metrics_address)]
    assert sorted(int(a.rsplit(":", 1)[1]) for a in used) == PORTS
    assert all(a.startswith("127.0.0.1:") for a in used)


def test_lab_json(tmp_path: Path) -> None:
    plan = labplan.plan_lab(tmp_path / "lab", 2, 1 << 30, PORTS)
    pids = {nid: 100 + i for i, nid in enumerate(labplan.START_ORDER)}
    doc = plan.lab_json(pids)
    assert doc["coordinator"] == plan.coordinator
    assert doc["tls"] == {"ca_file": str(tmp_path / "lab/pki/ca.pem"),
                          "cert_file": str(tmp_path / "lab/pki/cdpctl.pem"),
                          "key_file": str(tmp_path / "lab/pki/cdpctl.key")}
    assert [p["id"] for p in doc["processes"]] == list(labplan.START_ORDER)
    for p in doc["processes"]:
        assert set(p) >= {"id", "role", "pid", "address", "metrics_address", "config", "log"}
        assert p["log"] == str(tmp_path / f"lab/logs/{p['id']}.log")
    d1 = doc["disks"][1]
    assert d1 == {"name": "disk1", "policy": "lab", "member": "lab",
                  "filter": "filter-1", "target": "target-1",
                  "path": str(tmp_path / "lab/mnt/disk1"),
                  "image": str(tmp_path / "lab/data/filter-1/images/disk1.img"),
                  "replica_path": str(tmp_path / "lab/data/target-1/lab/replicas/disk1.img"),
                  "size_bytes": 1 << 30}
    # Only started processes are listed (lab.json is rewritten during start-up).
    partial = plan.lab_json({"coordinator": 1})
    assert [p["id"] for p in partial["processes"]] == ["coordinator"]
    assert plan.lab_json(pids)["tls"] != labplan.plan_lab(
        tmp_path, 1, 4096, PORTS, insecure=True).lab_json(pids)["tls"]


def test_stop_order_is_start_order_reversed() -> None:
    assert labplan.START_ORDER[::-1] == labplan.STOP_ORDER
    assert labplan.STOP_ORDER[0] == "filter-1" and labplan.STOP_ORDER[-1] == "coordinator"


def test_bad_plans(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one disk"):
        labplan.plan_lab(tmp_path, 0, 4096, PORTS)
    with pytest.raises(ValueError, match="ports"):
        labplan.plan_lab(tmp_path, 1, 4096, PORTS[:3])


def test_valid_id() -> None:
    assert labplan.valid_id("filter-1") and labplan.valid_id("a.b_c")
    assert not labplan.valid_id("") and not labplan.valid_id("-x") and not labplan.valid_id("a/b")


def test_a_multi_host_topology(tmp_path: Path) -> None:
    """2 filters, 2 targets, 3 policies, 2+2 proxies on two sites: every config
    loads, policies spread over filters and targets, the last one with disks on
    both filters (a consistency group), disk names unique per filter, one mount
    per filter, every disk listed in lab.json with its placement."""
    topo = labplan.Topology(filters=2, targets=2, policies=3, source_proxies=2,
                            target_proxies=2, disks_per_policy=2, source_site="hq",
                            dr_site="dr")
    ports = list(range(21001, 21001 + topo.ports_needed()))
    plan = labplan.plan_lab(tmp_path / "lab", 0, 64 << 20, ports, topology=topo)
    materialize(plan)
    loaded: dict[str, Any] = {n.id: load_config(CLASSES[n.role], n.config) for n in plan.nodes}
    assert sorted(loaded) == sorted(["coordinator", "filter-1", "filter-2", "target-1",
                                     "target-2", "source-proxy-1", "source-proxy-2",
                                     "target-proxy-1", "target-proxy-2"])
    coord = loaded["coordinator"]
    assert isinstance(coord, CoordinatorConfig)
    placed = {p.name: (p.target, sorted({d.filter for d in p.disks}), len(p.disks),
                       p.source_site, p.target_site) for p in coord.policies}
    assert placed == {"lab-1": ("target-1", ["filter-1"], 2, "hq", "dr"),
                      "lab-2": ("target-2", ["filter-2"], 2, "hq", "dr"),
                      "lab-3": ("target-1", ["filter-1", "filter-2"], 4, "hq", "dr")}
    sites = {nid: cfg.node.site for nid, cfg in loaded.items()}
    assert {k for k, v in sites.items() if v == "hq"} == {
        "coordinator", "filter-1", "filter-2", "source-proxy-1", "source-proxy-2"}
    mounts = set()
    for fid in ("filter-1", "filter-2"):
        f = loaded[fid]
        assert isinstance(f, FilterConfig)
        assert f.filter.mountpoint == str(tmp_path / "lab/mnt" / fid)
        assert f.filter.data_dir == str(tmp_path / "lab/data" / fid)
        names = [d.name for d in f.disks]
        assert len(names) == len(set(names))
        mounts.add(f.filter.mountpoint)
    assert len(mounts) == 2
    for tid in ("target-1", "target-2"):
        t = loaded[tid]
        assert isinstance(t, TargetConfig)
        assert t.target.data_dir == str(tmp_path / "lab/data" / tid)
    pids = {nid: 100 + i for i, nid in enumerate(topo.start_order())}
    doc = plan.lab_json(pids)
    assert len(doc["disks"]) == 8   # lab-3: 2 disks on each filter
    for d in doc["disks"]:
        assert d["path"].startswith(str(tmp_path / "lab/mnt" / d["filter"]) + "/")
        assert d["replica_path"] == str(tmp_path / "lab/data" / d["target"] / d["member"]
                                        / "replicas" / f"{d['name']}.img")
    members = {(d["policy"], d["member"], d["filter"]) for d in doc["disks"]}
    assert members == {("lab-1", "lab-1", "filter-1"), ("lab-2", "lab-2", "filter-2"),
                       ("lab-3", "lab-3..filter-1", "filter-1"),
                       ("lab-3", "lab-3..filter-2", "filter-2")}
    assert doc["filters"] == [{"id": f, "mountpoint": str(tmp_path / "lab/mnt" / f)}
                              for f in ("filter-1", "filter-2")]
    assert doc["topology"]["filters"] == 2
    # the coordinator first, the filters last (they need their proxies)
    assert doc["processes"][0]["id"] == "coordinator"
    assert [p["role"] for p in doc["processes"]][-2:] == ["filter", "filter"]


@pytest.mark.parametrize("bad", [dict(filters=0), dict(targets=9), dict(policies=33),
                                 dict(policies=9, disks_per_policy=8),
                                 dict(source_site="a/b")])
def test_topology_out_of_range_is_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        labplan.Topology(**bad).check()  # type: ignore[arg-type]


def test_two_filters_make_a_policy_spanning_both(tmp_path: Path) -> None:
    """`lab up --filters 2` (issue 12 item 1): the one policy has a disk on each filter;
    the coordinator's config names the group, each filter's its member, and lab.json
    places each replica in its member's store."""
    topo = labplan.Topology(filters=2)
    assert topo.spanning() == "lab" and topo.total_disks() == 2
    ports = list(range(22001, 22001 + topo.ports_needed()))
    plan = labplan.plan_lab(tmp_path / "lab", 0, 64 << 20, ports, topology=topo)
    materialize(plan)
    loaded: dict[str, Any] = {n.id: load_config(CLASSES[n.role], n.config) for n in plan.nodes}
    (policy,) = loaded["coordinator"].policies
    assert policy.name == "lab"
    assert [(d.filter, d.name) for d in policy.disks] == [("filter-1", "disk0"),
                                                          ("filter-2", "disk1")]
    for fid, disk in (("filter-1", "disk0"), ("filter-2", "disk1")):
        assert [(d.name, d.policy) for d in loaded[fid].disks] == [(disk, f"lab..{fid}")]
    doc = plan.lab_json({})
    assert [(d["name"], d["policy"], d["member"], d["filter"]) for d in doc["disks"]] == [
        ("disk0", "lab", "lab..filter-1", "filter-1"),
        ("disk1", "lab", "lab..filter-2", "filter-2")]
    for d in doc["disks"]:
        assert d["path"] == str(tmp_path / "lab/mnt" / d["filter"] / d["name"])
        assert d["replica_path"] == str(tmp_path / "lab/data/target-1" / d["member"]
                                        / "replicas" / f"{d['name']}.img")


def test_a_spanning_policy_has_its_disks_on_every_filter() -> None:
    topo = labplan.Topology(filters=3, policies=2, disks_per_policy=2)
    assert topo.spanning() == "lab-2"
    assert topo.disks_of(0) == ["filter-1", "filter-1"]
    assert topo.disks_of(1) == ["filter-1", "filter-2", "filter-3"] * 2
    assert topo.total_disks() == 8
    with_more = labplan.Topology(filters=2, disks_per_policy=3)
    assert with_more.disks_of(0) == ["filter-1", "filter-2"] * 3
    assert labplan.Topology().spanning() == "" and labplan.Topology().total_disks() == 1
    with pytest.raises(ValueError, match="at most 64 disks"):
        labplan.Topology(filters=8, policies=15, disks_per_policy=4).check()   # 56 + 32


def test_an_etcd_lab_with_standby_coordinators(tmp_path: Path) -> None:
    """`lab up --store etcd --coordinators 3` (issue 13 item 3): a 3-member etcd
    cluster started first and stopped last, three coordinators on it with one
    signing key, and every other node (and lab.json) given all their addresses."""
    topo = labplan.Topology(store="etcd", coordinators=3)
    ports = list(range(23001, 23001 + topo.ports_needed()))
    plan = labplan.plan_lab(tmp_path / "lab", 1, 64 << 20, ports, topology=topo)
    materialize(plan)
    order = [n.id for n in plan.nodes]
    assert order[:6] == ["etcd-1", "etcd-2", "etcd-3", "coordinator", "coordinator-2",
                         "coordinator-3"]
    etcd = [n for n in plan.nodes if n.role == "etcd"]
    cluster = ",".join(f"{n.id}=http://{n.argv[n.argv.index('--listen-peer-urls') + 1][7:]}"
                       for n in etcd)
    for n in etcd:
        assert n.argv[0] == "etcd" and str(n.config) in n.argv   # its data dir names it
        assert n.argv[n.argv.index("--initial-cluster") + 1] == cluster
    assert labplan.stop_rank("etcd") > labplan.stop_rank("coordinator")
    loaded: dict[str, Any] = {n.id: load_config(CLASSES[n.role], n.config)
                              for n in plan.nodes if n.role != "etcd"}
    coords = [loaded[c] for c in ("coordinator", "coordinator-2", "coordinator-3")]
    for c in coords:
        assert isinstance(c, CoordinatorConfig)
        assert c.coordinator.store == "etcd" and c.coordinator.db_path == ""
        assert c.coordinator.etcd_endpoints == [n.address for n in etcd]
        assert c.coordinator.signing_key_file == str(plan.signing_key)
    addresses = [plan.node(c).address for c in ("coordinator", "coordinator-2",
                                                 "coordinator-3")]
    assert plan.coordinator == ",".join(addresses)
    for nid in ("filter-1", "source-proxy-1", "target-proxy-1", "target-1"):
        assert loaded[nid].node.coordinator == ",".join(addresses), nid
    assert "etcd-1" not in plan.identities()   # plain on loopback: no certificate
    assert plan.lab_json({n.id: 1 for n in plan.nodes})["processes"][0]["argv"][0] == "etcd"


@pytest.mark.parametrize("bad,why", [(dict(store="zk"), "store"),
                                     (dict(coordinators=2), "needs store etcd"),
                                     (dict(store="etcd", coordinators=6), "coordinators")])
def test_a_bad_control_plane_is_refused(bad: dict[str, Any], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        labplan.Topology(**bad).check()
