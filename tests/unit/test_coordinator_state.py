"""The coordinator's lease/assignment machine, driven with an injected clock."""

from __future__ import annotations

from cdp_common.config import PolicyConfig, PolicyDiskConfig
from cdp_coordinator.state import (
    Assignment,
    CoordinatorState,
    Endpoint,
    NodeInfo,
    Report,
    Role,
    rpo_lag,
)

LEASE = 3.0


def policy(name: str, target: str = "target-1", src: str = "default", dst: str = "default",
           **kw: object) -> PolicyConfig:
    return PolicyConfig(name=name, disks=[PolicyDiskConfig("filter-1", "disk0", 4096 * 256)],
                        target=target, source_site=src, target_site=dst, **kw)  # type: ignore[arg-type]


def node(nid: str, role: Role, site: str = "default", capacity: int = 0) -> NodeInfo:
    return NodeInfo(id=nid, role=int(role), site=site, address=f"{nid}:1", capacity=capacity)


def lab(now: float = 0.0, policies: list[PolicyConfig] | None = None) -> CoordinatorState:
    s = CoordinatorState(lease_s=LEASE)
    s.set_policies(policies or [policy("p1")], now)
    for n in (node("filter-1", Role.FILTER), node("sp-1", Role.SOURCE_PROXY),
              node("tp-1", Role.TARGET_PROXY), node("target-1", Role.TARGET)):
        s.register(n, now)
    return s


def beat(s: CoordinatorState, now: float, *ids: str) -> None:
    for nid in ids:
        assert s.heartbeat(nid, [], now)


LAB_NODES = ("filter-1", "sp-1", "tp-1", "target-1")


def lease_lapses(lost: str) -> tuple[CoordinatorState, Assignment, list[str]]:
    """The lab assigns p1 at t=0; every node but `lost` heartbeats at 3.0, so at 3.5
    only the lease of `lost` has run out. Returns the state, the assignment from
    t=0, and the policies the tick at 3.5 changed."""
    s = lab()
    s.tick(0)
    before = s.assignments["p1"]
    beat(s, 3.0, *(n for n in LAB_NODES if n != lost))
    return s, before, s.tick(3.5)


def test_complete_assignment_with_endpoints() -> None:
    s = lab()
    assert s.tick(0.0) == ["p1"]
    a = s.assignments["p1"]
    assert a.source_proxy == Endpoint("sp-1", "sp-1:1")
    assert a.target_proxy == Endpoint("tp-1", "tp-1:1")
    assert a.target == Endpoint("target-1", "target-1:1")
    assert a.filter == Endpoint("filter-1", "filter-1:1")
    assert a.reason == "" and a.epoch >= 1
    for nid in LAB_NODES:
        assert [x.policy for x in s.assignments_for(nid)] == ["p1"]
    assert s.assignments_for("nobody") == []
    assert s.tick(0.5) == []


def test_role_and_site_must_fit() -> None:
    s = CoordinatorState(lease_s=LEASE)
    s.set_policies([policy("p1", src="east", dst="west")], 0)
    for n in (node("target-1", Role.TARGET, "west"), node("sp-west", Role.SOURCE_PROXY, "west"),
              node("tp-east", Role.TARGET_PROXY, "east"), node("f", Role.FILTER, "east")):
        s.register(n, 0)
    a = s.assignments["p1"]
    assert a.source_proxy.node_id == "" and a.target_proxy.node_id == ""
    assert a.reason == ("no healthy source proxy on site east; "
                        "no healthy target proxy on site west")
    assert s.status(0).policies[0].state == "error"
    s.register(node("both-east", Role.PROXY_BOTH, "east"), 1)
    s.register(node("both-west", Role.PROXY_BOTH, "west"), 1)
    a = s.assignments["p1"]
    assert (a.source_proxy.node_id, a.target_proxy.node_id) == ("both-east", "both-west")
    assert a.reason == ""
    p = s.status(1).policies[0]
    assert p.state == "error" and p.reason.startswith("filter filter-1 is not registered")
    s.register(node("filter-1", Role.FILTER, "east"), 1)
    s.heartbeat("filter-1", [Report("p1")], 1)
    s.heartbeat("target-1", [Report("p1")], 1)
    assert s.status(1).policies[0].state == "ok"


def test_least_loaded_then_node_id() -> None:
    ps = [policy(f"p{i}") for i in range(4)]
    s2 = CoordinatorState(lease_s=LEASE)
    for n in (node("target-1", Role.TARGET), node("sp-b", Role.SOURCE_PROXY),
              node("sp-a", Role.SOURCE_PROXY), node("tp-1", Role.TARGET_PROXY)):
        s2.register(n, 0)
    s2.set_policies(ps, 0)
    got = [s2.assignments[p.name].source_proxy.node_id for p in ps]
    assert got == ["sp-a", "sp-b", "sp-a", "sp-b"]
    assert s2.load("sp-a") == 2 and s2.load("sp-b") == 2 and s2.load("tp-1") == 4
    # A newcomer takes new policies (it is least loaded) but steals nothing.
    s2.register(node("sp-c", Role.SOURCE_PROXY), 1)
    s2.set_policies([*ps, policy("p4"), policy("p5")], 1)
    assert [s2.assignments[n].source_proxy.node_id for n in ("p4", "p5")] == ["sp-c", "sp-c"]
    assert got == [s2.assignments[p.name].source_proxy.node_id for p in ps]


def test_capacity_is_respected() -> None:
    ps = [policy(f"p{i}") for i in range(3)]
    s = CoordinatorState(lease_s=LEASE)
    for n in (node("target-1", Role.TARGET), node("sp-1", Role.SOURCE_PROXY, capacity=1),
              node("sp-2", Role.SOURCE_PROXY, capacity=1), node("tp-1", Role.TARGET_PROXY)):
        s.register(n, 0)
    s.set_policies(ps, 0)
    assert [s.assignments[p.name].source_proxy.node_id for p in ps] == ["sp-1", "sp-2", ""]
    assert s.assignments["p2"].reason == "no healthy source proxy on site default"
    p = s.status(0).policies[2]
    assert p.state == "error" and p.reason.startswith(
        "unassigned: no healthy source proxy on site default (nothing is replicated)")
    s.register(node("sp-3", Role.SOURCE_PROXY, capacity=0), 1)
    assert s.assignments["p2"].source_proxy.node_id == "sp-3"
    assert s.assignments["p2"].reason == ""


def test_lease_expiry_rebinds_with_higher_epoch() -> None:
    s = lab()
    s.register(node("sp-2", Role.SOURCE_PROXY), 0)
    s.tick(0)
    before = s.assignments["p1"]
    assert before.source_proxy.node_id == "sp-1"
    t = 0.0
    while t < 2.5:  # everyone but sp-1 keeps heartbeating
        t += 1.0
        beat(s, t, "filter-1", "tp-1", "target-1", "sp-2")
        assert s.tick(t) == []
    t = 3.5
    beat(s, t, "filter-1", "tp-1", "target-1", "sp-2")
    assert s.tick(t) == ["p1"]
    after = s.assignments["p1"]
    assert after.source_proxy.node_id == "sp-2"
    assert after.target_proxy == before.target_proxy
    assert after.epoch == before.epoch + 1
    assert s.rebinds == 1
    assert {n.info.id: n.state for n in s.status(t).nodes}["sp-1"] == "down"
    # sp-1 comes back: no flapping back to it.
    s.register(node("sp-1", Role.SOURCE_PROXY), 4.0)
    assert s.tick(4.0) == []
    assert s.assignments["p1"] == after


def test_stable_while_nodes_up_and_new_proxies_do_not_steal() -> None:
    s = lab()
    s.tick(0)
    a = s.assignments["p1"]
    for t in range(1, 20):
        beat(s, t, "filter-1", "sp-1", "tp-1", "target-1")
        if t == 5:
            s.register(node("sp-0", Role.SOURCE_PROXY), t)  # less loaded, lower id
        assert s.tick(t) == []
    assert s.assignments["p1"] == a


def test_no_proxy_then_proxy_appears() -> None:
    s = CoordinatorState(lease_s=LEASE)
    s.set_policies([policy("p1")], 0)
    s.register(node("target-1", Role.TARGET), 0)
    s.register(node("tp-1", Role.TARGET_PROXY), 0)
    s.tick(0)
    a = s.assignments["p1"]
    assert a.reason == "no healthy source proxy on site default"
    p = s.status(0).policies[0]
    assert p.state == "error" and p.reason.startswith("unassigned: no healthy source proxy")
    s.register(node("sp-1", Role.SOURCE_PROXY), 1)
    assert s.tick(1) == ["p1"]
    b = s.assignments["p1"]
    assert b.reason == "" and b.epoch == a.epoch + 1


def test_proxy_lost_without_replacement_bumps_epoch_and_sets_reason() -> None:
    s, before, changed = lease_lapses("sp-1")
    e = before.epoch
    assert changed == ["p1"]
    a = s.assignments["p1"]
    assert a.source_proxy == Endpoint() and a.epoch == e + 1
    assert "no healthy source proxy" in a.reason
    assert [x.policy for x in s.assignments_for("sp-1")] == []


def test_filter_down_does_not_rebind() -> None:
    s, before, changed = lease_lapses("filter-1")
    assert changed == []
    assert s.assignments["p1"] == before
    assert {n.info.id: n.state for n in s.status(3.5).nodes}["filter-1"] == "down"


def test_target_down_and_back() -> None:
    s, before, changed = lease_lapses("target-1")
    e = before.epoch
    assert changed == ["p1"]
    a = s.assignments["p1"]
    assert a.target == Endpoint() and a.reason == "target target-1 is down"
    assert a.source_proxy.node_id == "sp-1" and a.epoch == e + 1
    assert s.heartbeat("target-1", [], 4.0)
    assert s.tick(4.0) == ["p1"]
    b = s.assignments["p1"]
    assert b.target.node_id == "target-1" and b.reason == "" and b.epoch == e + 2


def test_unregistered_target_and_unknown_heartbeat() -> None:
    s = CoordinatorState(lease_s=LEASE)
    s.set_policies([policy("p1", target="t-x")], 0)
    assert s.assignments["p1"].reason.endswith("target t-x is not registered")
    assert not s.heartbeat("ghost", [], 0)


def test_address_change_bumps_epoch_filter_change_does_not() -> None:
    s = lab()
    s.tick(0)
    e = s.assignments["p1"].epoch
    s.register(NodeInfo("filter-1", int(Role.FILTER), "default", "filter-1:2"), 1)
    assert s.tick(1) == ["p1"]
    assert s.assignments["p1"].filter.address == "filter-1:2"
    assert s.assignments["p1"].epoch == e
    s.register(NodeInfo("tp-1", int(Role.TARGET_PROXY), "default", "tp-1:2"), 2)
    assert s.tick(2) == ["p1"]
    assert s.assignments["p1"].target_proxy.address == "tp-1:2"
    assert s.assignments["p1"].epoch == e + 1


def test_restore_keeps_assignment_through_grace() -> None:
    s = lab()
    s.tick(0)
    a = s.assignments["p1"]
    r = CoordinatorState(lease_s=LEASE)
    r.restore([n.info for n in s.nodes.values()], list(s.policies.values()),
              [a], now=100.0)
    assert r.tick(100.0) == []
    assert r.assignments["p1"] == a
    assert all(n.state == "down" for n in r.status(100).nodes)
    assert r.heartbeat("sp-1", [], 101) and r.heartbeat("tp-1", [], 101)
    assert r.heartbeat("target-1", [], 101)
    assert r.tick(103.5) == []  # sp/tp/target heard from; filter never needed
    assert r.assignments["p1"] == a


def test_restore_rebinds_after_grace_when_node_silent() -> None:
    a = Assignment("p1", epoch=7, filter=Endpoint("filter-1", "filter-1:1"),
                   source_proxy=Endpoint("sp-1", "sp-1:1"),
                   target_proxy=Endpoint("tp-1", "tp-1:1"),
                   target=Endpoint("target-1", "target-1:1"))
    r = CoordinatorState(lease_s=LEASE)
    r.restore([node("filter-1", Role.FILTER), node("sp-1", Role.SOURCE_PROXY),
               node("tp-1", Role.TARGET_PROXY), node("target-1", Role.TARGET)],
              [policy("p1")], [a], now=0)
    assert r.assignments["p1"].epoch == 7
    r.register(node("sp-2", Role.SOURCE_PROXY), 1)
    beat(r, 1, "tp-1", "target-1")
    assert r.tick(2) == []
    beat(r, 3, "tp-1", "target-1", "sp-2")
    assert r.tick(3.5) == ["p1"]
    b = r.assignments["p1"]
    assert b.source_proxy.node_id == "sp-2" and b.epoch == 8


def test_epoch_survives_policy_removal_and_readd() -> None:
    s = lab()
    s.tick(0)
    e = s.assignments["p1"].epoch
    s.set_policies([], 1)
    assert s.tick(1) == ["p1"] and "p1" not in s.assignments
    s.set_policies([policy("p1")], 2)
    assert s.assignments["p1"].epoch == e + 1


def test_rpo_lag_formula() -> None:
    assert rpo_lag(10, 5_000_000_000, 10, 5_000_000_000, 100.0) == 0.0
    assert rpo_lag(10, 9_000_000_000, 4, 3_000_000_000, 10.0) == 7.0
    assert rpo_lag(10, 9_000_000_000, 0, 0, 10.0) == 1.0  # lower bound before any durable
    assert rpo_lag(10, 0, 0, 0, 10.0) == 0.0
    assert rpo_lag(10, 0, 2, 20_000_000_000, 10.0) == 0.0  # clock skew: never negative


def test_rpo_states_from_reports() -> None:
    s = lab(policies=[policy("p1", rpo_warning_s=5.0, rpo_error_s=20.0)])
    s.tick(0)

    def state_at(wall: float) -> tuple[str, float]:
        p = s.status(0, wall_now=wall).policies[0]
        return p.state, p.rpo_lag_s

    s.heartbeat("filter-1", [Report("p1", captured_seq=100, captured_time_ns=1000 * 10**9,
                                    journal_bytes=4096)], 0)
    s.heartbeat("target-1", [Report("p1", durable_seq=100, newest_time_ns=1000 * 10**9,
                                    applied_seq=90, bytes_replicated=123)], 0)
    assert state_at(2000) == ("ok", 0.0)
    p = s.status(0, wall_now=2000).policies[0]
    assert (p.captured_seq, p.durable_seq, p.applied_seq, p.bytes_replicated,
            p.journal_bytes) == (100, 100, 90, 123, 4096)
    assert (p.source_proxy, p.target_proxy, p.filter, p.target) == \
        ("sp-1", "tp-1", "filter-1", "target-1")
    s.heartbeat("filter-1", [Report("p1", captured_seq=150, captured_time_ns=1010 * 10**9)], 0)
    assert state_at(1003) == ("ok", 3.0)
    assert state_at(1006) == ("degraded", 6.0)
    assert s.status(0, wall_now=1006).policies[0].reason == \
        "RPO lag 6.0s >= warning threshold 5s"
    assert state_at(1021) == ("error", 21.0)
    assert s.status(0, wall_now=1021).policies[0].reason == \
        "RPO lag 21.0s >= error threshold 20s"
    s.heartbeat("sp-1", [Report("p1", error="target proxy unreachable")], 0)
    assert s.status(0, wall_now=1003).policies[0].reason == "sp-1: target proxy unreachable"


def test_status_node_ages() -> None:
    s = lab()
    st = {n.info.id: n for n in s.status(2.0).nodes}
    assert st["sp-1"].state == "up" and st["sp-1"].last_seen_age_s == 2.0


def test_edited_policy_parameters_are_pushed_to_watchers() -> None:
    """An edit that keeps the endpoints still changes what the nodes must run."""
    s = lab()
    assert s.tick(0.0) == ["p1"]
    epoch = s.assignments["p1"].epoch
    s.set_policy(policy("p1", rpo_interval_s=5.0), 0.1)
    assert s.tick(0.2) == ["p1"]
    assert s.assignments["p1"].epoch == epoch  # same endpoints: no rebind
    s.set_policy(policy("p1", rpo_interval_s=5.0), 0.3)  # no change: nothing to push
    assert s.tick(0.4) == []
