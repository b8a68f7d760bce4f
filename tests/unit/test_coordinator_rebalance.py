"""Placement at scale of hosts (issue 12 item 3), on the state machine with an injected
clock: capacity in bytes/s, one target's policies spread over target proxies, and
the rebalancer: a proxy that joins takes policies from the loaded ones, bounded per
minute, never moving pinned or disabled policies, converging without ping-pong."""

from __future__ import annotations

from cdp_common.config import PolicyConfig, PolicyDiskConfig
from cdp_coordinator.rebalance import plan_moves
from cdp_coordinator.state import CoordinatorState, NodeInfo, Role

LEASE = 3.0


def policy(name: str, target: str = "target-1", **kw: object) -> PolicyConfig:
    return PolicyConfig(name=name, disks=[PolicyDiskConfig("filter-1", f"{name}-d", 4096 * 256)],
                        target=target, **kw)  # type: ignore[arg-type]


def node(nid: str, role: Role, **kw: object) -> NodeInfo:
    return NodeInfo(id=nid, role=int(role), address=f"{nid}:1", **kw)  # type: ignore[arg-type]


def state(policies: list[PolicyConfig], *proxies: NodeInfo, per_minute: int = 0,
          ) -> CoordinatorState:
    s = CoordinatorState(lease_s=LEASE)
    s.rebalance_per_minute = per_minute
    for n in (node("filter-1", Role.FILTER), node("target-1", Role.TARGET),
              node("target-2", Role.TARGET), *proxies):
        s.register(n, 0)
    s.set_policies(policies, 0)
    s.tick(0)
    return s


def loads(s: CoordinatorState, what: str = "source") -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, a in sorted(s.assignments.items()):
        ep = a.source_proxy if what == "source" else a.target_proxy
        out.setdefault(ep.node_id, []).append(name)
    return out


def keep_alive(s: CoordinatorState, now: float) -> None:
    for nid in list(s.nodes):
        s.heartbeat(nid, [], now)


def test_a_proxy_over_its_bytes_per_s_capacity_takes_no_new_policy() -> None:
    s = state([policy("p1")], node("sp-a", Role.SOURCE_PROXY, capacity_bytes_per_s=1000),
              node("sp-b", Role.SOURCE_PROXY), node("tp", Role.TARGET_PROXY))
    assert s.assignments["p1"].source_proxy.node_id == "sp-a"
    s.heartbeat("sp-a", [], 0.1, bytes_per_s=1000)   # at its capacity
    s.set_policy(policy("p2"), 0.2)
    s.set_policy(policy("p3"), 0.3)
    # sp-b carries two, sp-a one: without the bytes/s capacity p3 would go to sp-a
    assert loads(s) == {"sp-a": ["p1"], "sp-b": ["p2", "p3"]}
    assert s.assignments["p1"].source_proxy.node_id == "sp-a"   # kept, not moved
    s.heartbeat("sp-a", [], 0.4, bytes_per_s=10)     # room again
    s.set_policy(policy("p4"), 0.5)
    assert "p4" in loads(s)["sp-a"]


def test_policies_of_one_target_spread_over_target_proxies() -> None:
    ps = [policy("p1", "target-1"), policy("p2", "target-2"), policy("p3", "target-1"),
          policy("p4", "target-2")]
    s = state(ps, node("sp", Role.SOURCE_PROXY), node("tp-1", Role.TARGET_PROXY),
              node("tp-2", Role.TARGET_PROXY))
    by_target: dict[str, set[str]] = {}
    for a in s.assignments.values():
        by_target.setdefault(a.target.node_id, set()).add(a.target_proxy.node_id)
    # without the spread rule both of target-1's policies land on tp-1 (ties by id)
    assert by_target == {"target-1": {"tp-1", "tp-2"}, "target-2": {"tp-1", "tp-2"}}


def test_a_joining_proxy_takes_policies_bounded_per_minute() -> None:
    ps = [policy(f"p{i}") for i in range(1, 9)]
    s = state(ps, node("sp-a", Role.SOURCE_PROXY), node("tp", Role.TARGET_PROXY),
              per_minute=2)
    assert loads(s) == {"sp-a": [f"p{i}" for i in range(1, 9)]}
    epochs = {n: a.epoch for n, a in s.assignments.items()}
    s.register(node("sp-b", Role.SOURCE_PROXY), 1.0)
    s.tick(1.0)
    moved = {n for n, a in s.assignments.items() if a.source_proxy.node_id == "sp-b"}
    assert len(moved) == 2 and s.moves == 2
    for n in moved:   # a move is a handover: a new epoch, nothing else changes
        a = s.assignments[n]
        assert a.epoch == epochs[n] + 1
        assert (a.target_proxy.node_id, a.target.node_id) == ("tp", "target-1")
    # still within the minute: no more moves, however often it is asked
    for t in (2.0, 20.0, 59.0):
        keep_alive(s, t)
        s.tick(t)
    assert s.moves == 2
    # a minute later, two more; then it is even and stays so
    for t in (61.5, 122.0, 183.0, 244.0):
        keep_alive(s, t)
        s.tick(t)
    assert {k: len(v) for k, v in loads(s).items()} == {"sp-a": 4, "sp-b": 4}
    assert s.moves == 4
    before = dict(s.assignments)
    for t in (305.0, 366.0):
        keep_alive(s, t)
        s.tick(t)
    assert s.assignments == before and s.rebinds == 0


def test_pinned_and_disabled_policies_are_never_moved() -> None:
    ps = [policy("p1", pinned_source_proxy="sp-a"), policy("p2", pinned_source_proxy="sp-a"),
          policy("p3", enabled=False), policy("p4")]
    s = state(ps, node("sp-a", Role.SOURCE_PROXY), node("tp", Role.TARGET_PROXY),
              per_minute=100)
    s.register(node("sp-b", Role.SOURCE_PROXY), 1.0)
    s.tick(1.0)
    assert s.assignments["p1"].source_proxy.node_id == "sp-a"
    assert s.assignments["p2"].source_proxy.node_id == "sp-a"
    assert s.assignments["p3"].source_proxy.node_id == ""
    # p4 is the only one that may move: 3 (p1, p2, p4) vs 0 -> p4 moves, then 2 vs 1
    assert s.assignments["p4"].source_proxy.node_id == "sp-b" and s.moves == 1


def test_rebalancing_off_keeps_every_healthy_assignment() -> None:
    ps = [policy(f"p{i}") for i in range(1, 5)]
    s = state(ps, node("sp-a", Role.SOURCE_PROXY), node("tp", Role.TARGET_PROXY), per_minute=0)
    s.register(node("sp-b", Role.SOURCE_PROXY), 1.0)
    s.tick(1.0)
    assert loads(s) == {"sp-a": ["p1", "p2", "p3", "p4"]} and s.moves == 0


def test_moves_stay_on_the_site_and_need_room() -> None:
    ps = [policy(f"p{i}", source_site="hq") for i in range(1, 5)]
    s = state(ps, node("sp-a", Role.SOURCE_PROXY, site="hq"),
              node("tp", Role.TARGET_PROXY), per_minute=100)
    s.register(node("sp-far", Role.SOURCE_PROXY, site="elsewhere"), 1.0)
    s.register(node("sp-full", Role.SOURCE_PROXY, site="hq", capacity=1), 1.0)
    s.tick(1.0)
    assert loads(s) == {"sp-a": ["p2", "p3", "p4"], "sp-full": ["p1"]}
    moves = plan_moves(s.policies, s.assignments, s.nodes, 1.0, 100)
    assert moves == []   # sp-full is full, sp-far is on another site


def test_target_proxy_moves_prefer_the_crowded_target() -> None:
    ps = [policy("p1", "target-1"), policy("p2", "target-2"), policy("p3", "target-2"),
          policy("p4", "target-2")]
    s = state(ps, node("sp", Role.SOURCE_PROXY), node("tp-1", Role.TARGET_PROXY))
    s.register(node("tp-2", Role.TARGET_PROXY), 1.0)
    s.tick(1.0)
    moves = plan_moves(s.policies, s.assignments, s.nodes, 1.0, 1)
    assert len(moves) == 1 and moves[0].what == "target"
    assert s.policies[moves[0].policy].target == "target-2"
    assert (moves[0].from_id, moves[0].to_id) == ("tp-1", "tp-2")


def test_a_node_in_grace_is_neither_source_nor_destination() -> None:
    ps = [policy(f"p{i}") for i in range(1, 5)]
    s = state(ps, node("sp-a", Role.SOURCE_PROXY), node("tp", Role.TARGET_PROXY))
    restored = CoordinatorState(lease_s=LEASE)
    restored.rebalance_per_minute = 100
    restored.restore([n.info for n in s.nodes.values()], ps, list(s.assignments.values()),
                     now=10.0)
    restored.register(node("sp-b", Role.SOURCE_PROXY), 10.1)
    restored.tick(10.1)
    # sp-a has not been heard since the restart (grace): nothing moves off it yet
    assert restored.moves == 0
    assert loads(restored) == {"sp-a": ["p1", "p2", "p3", "p4"]}
    restored.heartbeat("sp-a", [], 10.2)
    restored.tick(10.2)
    assert restored.moves == 2
    assert {k: len(v) for k, v in loads(restored).items()} == {"sp-a": 2, "sp-b": 2}


def test_drain_moves_every_slot_off_a_proxy_and_a_dry_run_changes_nothing() -> None:
    ps = [policy("p1"), policy("p2"), policy("p3", pinned_source_proxy="sp-a")]
    s = state(ps, node("sp-a", Role.SOURCE_PROXY), node("tp", Role.TARGET_PROXY))
    s.register(node("sp-b", Role.SOURCE_PROXY), 0.5)
    s.tick(0.5)
    assert set(loads(s)) == {"sp-a"}
    before = dict(s.assignments)
    plan = s.drain("sp-a", True, 1.0, dry_run=True)
    assert [(name, slot, a.source_proxy.node_id) for name, slot, a in plan] == [
        ("p1", "source", "sp-b"), ("p2", "source", "sp-b"), ("p3", "source", "sp-b")]
    assert s.assignments == before and s.draining == set()   # a dry run
    done = s.drain("sp-a", True, 1.0)
    assert [(n, a.source_proxy.node_id) for n, _, a in done] == [
        ("p1", "sp-b"), ("p2", "sp-b"), ("p3", "sp-b")]          # the pinned one too
    assert all(s.assignments[n].epoch == before[n].epoch + 1 for n in before)
    assert s.status(1.0).nodes[1].draining                          # sp-a, by id order
    # drained: neither kept, chosen nor a rebalancing destination
    s.rebalance_per_minute = 100
    s.set_policy(policy("p4"), 1.5)
    keep_alive(s, 2.0)
    s.tick(2.0)
    assert "sp-a" not in loads(s)
    # undrained: takes policies again (the pinned one goes back to its pin at once)
    s.drain("sp-a", False, 3.0)
    assert s.assignments["p3"].source_proxy.node_id == "sp-a"


def test_draining_the_only_proxy_says_the_policies_would_stop() -> None:
    s = state([policy("p1")], node("sp-a", Role.SOURCE_PROXY), node("tp", Role.TARGET_PROXY))
    (plan,) = s.drain("sp-a", True, 1.0, dry_run=True)
    assert plan[0] == "p1" and plan[2].source_proxy.node_id == ""
    assert "no healthy source proxy" in plan[2].reason
