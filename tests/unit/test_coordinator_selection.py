"""Proxy selection, disabled policies, probe-driven rebinding, policy CRUD on the state
machine, driven with an injected clock (issue 4)."""

from __future__ import annotations

from dataclasses import replace

from cdp_common.config import PolicyConfig, PolicyDiskConfig
from cdp_coordinator.state import CoordinatorState, NodeInfo, Role

LEASE = 3.0


def policy(name: str, **kw: object) -> PolicyConfig:
    return PolicyConfig(name=name, disks=[PolicyDiskConfig("filter-1", "disk0", 4096 * 256)],
                        target="target-1", **kw)  # type: ignore[arg-type]


def node(nid: str, role: Role, capacity: int = 0) -> NodeInfo:
    return NodeInfo(id=nid, role=int(role), address=f"{nid}:1", capacity=capacity)


def base(*extra: NodeInfo, policies: list[PolicyConfig] | None = None) -> CoordinatorState:
    s = CoordinatorState(lease_s=LEASE)
    s.set_policies(policies or [policy("p1")], 0)
    for n in (node("filter-1", Role.FILTER), node("target-1", Role.TARGET), *extra):
        s.register(n, 0)
    s.tick(0)
    return s


def src(s: CoordinatorState, name: str = "p1") -> str:
    return s.assignments[name].source_proxy.node_id


def test_bytes_per_s_breaks_ties_between_equally_loaded_proxies() -> None:
    s = base(node("tp-1", Role.TARGET_PROXY))
    s.register(node("sp-a", Role.SOURCE_PROXY), 0)
    s.register(node("sp-b", Role.SOURCE_PROXY), 0)
    assert s.heartbeat("sp-a", [], 0.1, bytes_per_s=5e6)
    assert s.heartbeat("sp-b", [], 0.1, bytes_per_s=1e3)
    s.set_policy(policy("p2"), 0.2)
    # p1 was bound first (to sp-a by id, both idle then); p2 goes to sp-b (load 0)
    assert src(s, "p1") == "sp-a" and src(s, "p2") == "sp-b"
    # p3: both carry one policy; sp-b moves fewer bytes/s
    s.set_policy(policy("p3"), 0.3)
    assert src(s, "p3") == "sp-b"
    s.heartbeat("sp-b", [], 0.4, bytes_per_s=9e9)
    s.set_policy(policy("p4"), 0.5)
    assert src(s, "p4") == "sp-a"
    # NaN or negative figures never win
    s.heartbeat("sp-a", [], 0.6, bytes_per_s=float("nan"))
    assert s.nodes["sp-a"].bytes_per_s == 0.0


def test_capacity_is_a_task_limit() -> None:
    s = base(node("tp-1", Role.TARGET_PROXY), node("sp-1", Role.SOURCE_PROXY, capacity=1),
             policies=[policy("p1"), policy("p2")])
    assert src(s, "p1") == "sp-1"
    assert src(s, "p2") == ""
    assert s.assignments["p2"].reason == "no healthy source proxy on site default"
    s.register(node("sp-2", Role.SOURCE_PROXY, capacity=1), 1)
    assert src(s, "p2") == "sp-2"
    assert s.load("sp-1") == 1 and s.load("sp-2") == 1


def test_pinned_proxy_honoured_while_healthy_then_back() -> None:
    s = base(node("tp-1", Role.TARGET_PROXY), node("sp-1", Role.SOURCE_PROXY),
             node("sp-2", Role.SOURCE_PROXY),
             policies=[policy("p1", pinned_source_proxy="sp-2")])
    assert src(s) == "sp-2"
    e1 = s.assignments["p1"].epoch
    # the pinned proxy dies: fall back to the least loaded one, new epoch
    s.heartbeat("sp-1", [], 2.0)
    for nid in ("filter-1", "target-1", "tp-1"):
        s.heartbeat(nid, [], 2.0)
    s.tick(LEASE + 0.5)
    assert src(s) == "sp-1" and s.assignments["p1"].epoch == e1 + 1
    # it comes back: the policy returns to it (the operator's choice), new epoch
    s.heartbeat("sp-2", [], LEASE + 1)
    assert src(s) == "sp-2" and s.assignments["p1"].epoch == e1 + 2
    # a pinned proxy of the wrong role is never used
    s.set_policy(policy("p1", pinned_source_proxy="tp-1"), LEASE + 1)
    assert src(s) == "sp-2"


def test_pinned_proxy_overrides_capacity() -> None:
    s = base(node("tp-1", Role.TARGET_PROXY), node("sp-1", Role.SOURCE_PROXY, capacity=1),
             node("sp-2", Role.SOURCE_PROXY),
             policies=[policy("a"), policy("b", pinned_source_proxy="sp-1")])
    assert src(s, "b") == "sp-1"


def test_disabled_policy_gets_no_proxies_and_filter_keeps_it() -> None:
    s = base(node("tp-1", Role.TARGET_PROXY), node("sp-1", Role.SOURCE_PROXY))
    e1 = s.assignments["p1"].epoch
    rebinds = s.rebinds
    s.set_policy(policy("p1", enabled=False), 1)
    a = s.assignments["p1"]
    assert a.reason == "disabled" and not a.source_proxy.node_id and not a.target.node_id
    assert a.epoch == e1 + 1
    assert a.filter.node_id == "filter-1"
    assert [x.policy for x in s.assignments_for("filter-1")] == ["p1"]
    assert s.load("sp-1") == 0 and s.rebinds == rebinds
    st = s.status(1).policies[0]
    assert st.state == "unprotected" and st.rpo_lag_s == 0.0 and not st.enabled
    assert st.reason.startswith("disabled by the operator")
    s.set_policy(policy("p1"), 2)
    assert src(s) == "sp-1" and s.assignments["p1"].reason == ""
    assert s.assignments["p1"].epoch == e1 + 2


def test_probe_failure_rebinds_at_once() -> None:
    s = base(node("tp-1", Role.TARGET_PROXY), node("sp-1", Role.SOURCE_PROXY),
             node("sp-2", Role.SOURCE_PROXY))
    assert src(s) == "sp-1"
    e1 = s.assignments["p1"].epoch
    s.tick(0.5)
    assert s.mark_down("sp-1", 0.5)          # long before its lease would run out
    assert s.tick(0.5) == ["p1"]
    assert src(s) == "sp-2" and s.assignments["p1"].epoch == e1 + 1
    assert s.rebinds == 1
    assert not s.mark_down("sp-1", 0.6)      # already down: nothing to do
    assert not s.mark_down("nobody", 0.6)
    # its next heartbeat brings it up again, but nothing flaps back
    s.heartbeat("sp-1", [], 0.7)
    assert s.is_up("sp-1", 0.7) and src(s) == "sp-2"


def test_node_by_address_and_delete_policy_keeps_epoch_floor() -> None:
    s = base(node("tp-1", Role.TARGET_PROXY), node("sp-1", Role.SOURCE_PROXY))
    assert s.node_by_address("sp-1:1") == "sp-1" and s.node_by_address("x:1") == ""
    e1 = s.assignments["p1"].epoch
    assert s.delete_policy("p1", 1) and not s.delete_policy("p1", 1)
    assert "p1" not in s.assignments and s.tick(1) == ["p1"]
    s.set_policy(policy("p1"), 2)
    assert s.assignments["p1"].epoch > e1


def test_restored_node_in_grace_can_be_marked_down() -> None:
    s = CoordinatorState(lease_s=LEASE)
    p = policy("p1")
    s.restore([node("sp-1", Role.SOURCE_PROXY), node("tp-1", Role.TARGET_PROXY),
               node("target-1", Role.TARGET), node("filter-1", Role.FILTER)], [p], [], 10)
    assert s.is_up("sp-1", 11)
    assert s.mark_down("sp-1", 11) and not s.is_up("sp-1", 11)
    assert replace(p) == s.policies["p1"]
