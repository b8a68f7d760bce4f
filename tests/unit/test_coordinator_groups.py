"""Consistency groups in the coordinator (issue 12 item 2), on the pure state machine
with an injected clock: a policy on two filters is stored as one policy and placed,
assigned, reported and alarmed on as its members `<group>..<filter>`, all on one
source proxy, target proxy and target, rebound and rebalanced together; the
group's own status row; the group fields in the signed claims."""

from __future__ import annotations

from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdp_common import assignsig
from cdp_common.config import PolicyConfig, PolicyDiskConfig
from cdp_common.errors import NotAuthorizedError
from cdp_common.states import AlarmLevel, PolicyState
from cdp_coordinator.alarms import AlarmTracker, Level, level_of
from cdp_coordinator.service import assignment_pb, claims_pb, report_from_pb
from cdp_coordinator.state import CoordinatorState, NodeInfo, PolicyStatus, Report, Role

LEASE = 3.0
M1, M2 = "db..filter-1", "db..filter-2"
WALL = 10_000.0


def group(name: str = "db", **kw: object) -> PolicyConfig:
    """Two disks on filter-1, one on filter-2 (listed in between), to target-1."""
    return PolicyConfig(name=name, target="target-1", disks=[
        PolicyDiskConfig("filter-2", f"{name}-b", 1 << 20),
        PolicyDiskConfig("filter-1", f"{name}-a", 1 << 20),
        PolicyDiskConfig("filter-1", f"{name}-c", 2 << 20)], **kw)  # type: ignore[arg-type]


def single(name: str, filter_id: str = "filter-1", **kw: object) -> PolicyConfig:
    return PolicyConfig(name=name, target="target-1",
                        disks=[PolicyDiskConfig(filter_id, f"{name}-d", 1 << 20)],
                        **kw)  # type: ignore[arg-type]


def node(nid: str, role: Role, **kw: object) -> NodeInfo:
    return NodeInfo(id=nid, role=int(role), address=f"{nid}:1", **kw)  # type: ignore[arg-type]


def lab(policies: list[PolicyConfig], *proxies: NodeInfo, per_minute: int = 0,
        ) -> CoordinatorState:
    s = CoordinatorState(lease_s=LEASE)
    s.rebalance_per_minute = per_minute
    for n in (node("filter-1", Role.FILTER), node("filter-2", Role.FILTER),
              node("target-1", Role.TARGET),
              *(proxies or (node("sp-1", Role.SOURCE_PROXY), node("sp-2", Role.SOURCE_PROXY),
                            node("tp-1", Role.TARGET_PROXY), node("tp-2", Role.TARGET_PROXY)))):
        s.register(n, 0)
    s.set_policies(policies, 0)
    s.tick(0)
    return s


def binding(s: CoordinatorState, name: str) -> tuple[str, str, str]:
    a = s.assignments[name]
    return a.source_proxy.node_id, a.target_proxy.node_id, a.target.node_id


def epochs(s: CoordinatorState) -> dict[str, int]:
    return {n: a.epoch for n, a in s.assignments.items()}


def keep_alive(s: CoordinatorState, now: float, but: str = "") -> None:
    for nid in list(s.nodes):
        if nid != but:
            s.heartbeat(nid, [], now)


# ---------------------------------------------------------------- expansion

def test_a_group_is_stored_once_and_placed_as_its_members() -> None:
    s = lab([group(), single("solo")])
    assert sorted(s.policies) == ["db", "solo"]
    assert sorted(s.placed) == [M1, M2, "solo"]
    assert s.groups == {"db": (M1, M2)}
    assert sorted(s.assignments) == [M1, M2, "solo"]
    assert [d.name for d in s.placed[M1].disks] == ["db-a", "db-c"]
    assert [d.name for d in s.placed[M2].disks] == ["db-b"]
    for m, f in ((M1, "filter-1"), (M2, "filter-2")):
        a = s.assignments[m]
        assert a.filter.node_id == f and a.complete
        assert (a.group, a.group_members) == ("db", (M1, M2))
    # a one-filter policy is what it always was
    solo = s.assignments["solo"]
    assert (solo.group, solo.group_members) == ("", ())
    assert [a.policy for a in s.assignments_for("filter-2")] == [M2]
    assert [a.policy for a in s.assignments_for("target-1")] == [M1, M2, "solo"]


def test_members_are_colocated_and_a_group_needs_room_for_all() -> None:
    s = lab([single("a"), group()],
            node("sp-1", Role.SOURCE_PROXY, capacity=2), node("sp-2", Role.SOURCE_PROXY),
            node("tp-1", Role.TARGET_PROXY), node("tp-2", Role.TARGET_PROXY))
    assert binding(s, M1) == binding(s, M2)
    # "a" went first to sp-1 (load 1, room for one more): the group of two goes elsewhere
    assert binding(s, "a")[0] == "sp-1"
    assert binding(s, M1)[0] == "sp-2"
    assert s.load("sp-2") == 2


def test_killing_the_source_proxy_moves_every_member_to_one_new_proxy() -> None:
    s = lab([group()])
    sp = binding(s, M1)[0]
    other = {"sp-1": "sp-2", "sp-2": "sp-1"}[sp]
    before = epochs(s)
    assert s.mark_down(sp, 1.0)
    assert binding(s, M1)[0] == binding(s, M2)[0] == other
    assert binding(s, M1) == binding(s, M2)
    assert epochs(s) == {m: e + 1 for m, e in before.items()}
    assert sorted(s.tick(1.0)) == [M1, M2]
    # and when that one goes too: both unassigned alike, one epoch more each
    s.mark_down(other, 1.5)
    assert s.assignments[M1].reason == s.assignments[M2].reason != ""
    assert epochs(s) == {m: e + 2 for m, e in before.items()}


def test_a_lost_lease_rebinds_the_group_in_one_recompute() -> None:
    s = lab([group(), single("solo")])
    tp = binding(s, M1)[1]
    before = epochs(s)
    keep_alive(s, 2.9, but=tp)
    changed = s.tick(3.5)
    assert M1 in changed and M2 in changed
    assert binding(s, M1) == binding(s, M2) and binding(s, M1)[1] != tp
    assert s.assignments[M1].epoch == before[M1] + 1
    assert s.assignments[M2].epoch == before[M2] + 1


def test_a_member_bound_elsewhere_follows_the_first() -> None:
    s = lab([group()])
    first = s.assignments[M1]
    stray = replace(s.assignments[M2], source_proxy=replace(first.source_proxy,
                                                            node_id="sp-x", address="x:1"))
    s2 = CoordinatorState(lease_s=LEASE)
    s2.restore([n.info for n in s.nodes.values()], [group()], [first, stray], 0)
    assert binding(s2, M2) == binding(s2, M1) == binding(s, M1)
    assert s2.assignments[M2].epoch == stray.epoch + 1
    assert s2.assignments[M1].epoch == first.epoch


def test_drain_moves_the_members_together() -> None:
    s = lab([group()])
    sp = binding(s, M1)[0]
    dry = s.drain(sp, True, 1.0, dry_run=True)
    assert sorted(name for name, slot, _ in dry) == [M1, M2]
    assert len({a.source_proxy.node_id for _, _, a in dry}) == 1
    assert binding(s, M1)[0] == sp   # a dry run changes nothing
    moved = s.drain(sp, True, 1.0)
    assert sorted(name for name, _, _ in moved) == [M1, M2]
    assert binding(s, M1) == binding(s, M2) and binding(s, M1)[0] != sp


def test_rebalance_moves_a_group_whole_or_not_at_all() -> None:
    # all on sp-1 first; sp-2 joins: the group (2 slots) moves, both members
    s = lab([group(), single("p1"), single("p2")], node("sp-1", Role.SOURCE_PROXY),
            node("tp-1", Role.TARGET_PROXY), per_minute=10)
    assert {binding(s, n)[0] for n in s.placed} == {"sp-1"}
    before = epochs(s)
    s.register(node("sp-2", Role.SOURCE_PROXY), 1.0)
    on = {n: binding(s, n)[0] for n in s.placed}
    assert on[M1] == on[M2]
    assert sorted(on.values()) == ["sp-1", "sp-1", "sp-2", "sp-2"]
    assert on[M1] == "sp-2" and s.assignments[M1].epoch == before[M1] + 1
    assert s.assignments[M2].epoch == before[M2] + 1


def test_rebalance_without_budget_for_a_whole_group_moves_another_policy() -> None:
    s = lab([group(), single("p1"), single("p2")], node("sp-1", Role.SOURCE_PROXY),
            node("tp-1", Role.TARGET_PROXY), per_minute=1)
    s.register(node("sp-2", Role.SOURCE_PROXY), 1.0)
    on = {n: binding(s, n)[0] for n in s.placed}
    assert on[M1] == on[M2] == "sp-1"
    assert sorted(n for n, sp in on.items() if sp == "sp-2") == ["p1"]


def test_rebalance_never_splits_a_group_to_even_a_difference_of_two() -> None:
    s = lab([group()], node("sp-1", Role.SOURCE_PROXY), node("tp-1", Role.TARGET_PROXY),
            per_minute=10)
    s.register(node("sp-2", Role.SOURCE_PROXY), 1.0)   # 2 vs 0: moving 2 would flip it
    assert binding(s, M1)[0] == binding(s, M2)[0] == "sp-1"
    assert s.moves == 0


# ---------------------------------------------------------------- edits of a group

def test_disable_delete_and_sync_apply_to_every_member() -> None:
    s = lab([group()])
    before = epochs(s)
    s.set_policy(group(enabled=False), 1.0)
    assert sorted(s.tick(1.0)) == [M1, M2]
    assert {s.assignments[m].reason for m in (M1, M2)} == {"disabled"}
    rid = s.request_sync("db", 5_000)
    assert s.sync_requests == {M1: rid, M2: rid}
    assert s.request_sync(M2, 1) == rid + 1 and s.sync_requests[M1] == rid
    assert s.delete_policy("db", 2.0)
    assert s.assignments == {} and s.placed == {} and s.groups == {}
    assert sorted(s.tick(2.0)) == [M1, M2]
    s.set_policy(group(), 3.0)   # created again: epochs continue from the old ones
    assert all(s.assignments[m].epoch > before[m] for m in (M1, M2))


def test_a_group_that_loses_a_filter_becomes_a_one_filter_policy() -> None:
    s = lab([group()])
    g = group()
    one = replace(g, disks=[d for d in g.disks if d.filter == "filter-1"])
    s.set_policy(one, 1.0)
    assert sorted(s.placed) == ["db"] and s.groups == {}
    assert sorted(s.assignments) == ["db"]
    assert sorted(s.tick(1.0)) == ["db", M1, M2]   # the members' removal is pushed
    s.set_policies([g], 2.0)                      # and back, through the config path
    assert sorted(s.assignments) == [M1, M2] and s.groups == {"db": (M1, M2)}


def test_target_resync_requests_are_per_member() -> None:
    s = lab([group()])
    asked = s.resyncs_asked("target-1", [Report(M2, resync_request_id=7), Report("db", 8)])
    assert asked == [M2]


# ---------------------------------------------------------------- signed claims

def test_claims_carry_the_group_and_verify() -> None:
    s = lab([group()])
    key = Ed25519PrivateKey.generate()
    signer, verifier = assignsig.Signer(key), assignsig.Verifier(key.public_key())
    a, p = s.assignments[M2], s.placed[M2]
    claims = claims_pb(a, p)
    assert (claims.group, list(claims.group_members)) == ("db", [M1, M2])
    msg = assignment_pb(a, p, 0, signer)
    assert (msg.group, list(msg.group_members)) == ("db", [M1, M2])
    got = verifier.verify(msg.signed, "test")
    assert (got.group, list(got.group_members)) == ("db", [M1, M2])
    assignsig.check_assignment(verifier, msg, "filter-2")
    for forged in ("other", ""):
        bad = assignment_pb(a, p, 0, signer)
        bad.group = forged
        with pytest.raises(NotAuthorizedError, match="differ from its signed claims"):
            assignsig.check_assignment(verifier, bad, "filter-2")
    bad = assignment_pb(a, p, 0, signer)
    del bad.group_members[0]
    with pytest.raises(NotAuthorizedError, match="differ from its signed claims"):
        assignsig.check_assignment(verifier, bad, "filter-2")
    # a one-filter policy signs no group
    solo = lab([single("solo")])
    c = claims_pb(solo.assignments["solo"], solo.placed["solo"])
    assert (c.group, list(c.group_members)) == ("", [])


def test_reports_carry_checkpoints() -> None:
    from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
    r = report_from_pb(cpb.PolicyReport(policy=M1, checkpoint_id=9, checkpoint_time_ns=5))
    assert (r.checkpoint_id, r.checkpoint_time_ns) == (9, 5)


# ---------------------------------------------------------------- group status

def reported(s: CoordinatorState, now: float, ckpt: dict[str, float | None],
             errors: dict[str, str] | None = None) -> None:
    """Every node heartbeats; the filters report their member, the target every
    member with its newest checkpoint at `ckpt[member]` seconds (wall) or none."""
    errors = errors or {}
    for f, m in (("filter-1", M1), ("filter-2", M2)):
        s.heartbeat(f, [Report(m, error=errors.get(m, ""))], now)
    s.heartbeat("target-1", [
        Report(m, checkpoint_id=int(t) if t else 0,
               checkpoint_time_ns=int(t * 1e9) if t else 0)
        for m, t in ckpt.items()], now)
    for nid in s.nodes:
        if nid not in ("filter-1", "filter-2", "target-1"):
            s.heartbeat(nid, [], now)


def rows(s: CoordinatorState, now: float = 10.0) -> dict[str, PolicyStatus]:
    return {p.name: p for p in s.status(now, wall_now=WALL).policies}


def test_status_shows_the_group_row_before_its_members() -> None:
    s = lab([single("da"), group(), single("dz")])
    reported(s, 10.0, {M1: WALL - 1, M2: WALL - 1.5})
    order = [p.name for p in s.status(10.0, wall_now=WALL).policies]
    assert order == ["da", "db", M1, M2, "dz"]
    g = rows(s)["db"]
    assert g.state is PolicyState.OK, g.reason
    assert g.filter == "filter-1,filter-2" and g.members == (M1, M2)
    assert g.rpo_lag_s == pytest.approx(1.5)
    assert (g.source_proxy, g.target_proxy, g.target) == binding(s, M1)
    assert rows(s)[M1].group == rows(s)[M2].group == "db"
    assert rows(s)["da"].group == "" and rows(s)["da"].members == ()


def test_group_unprotected_until_every_member_has_a_checkpoint() -> None:
    s = lab([group()])
    reported(s, 1.0, {M1: None, M2: None})
    g = rows(s, 1.0)["db"]
    assert g.state is PolicyState.UNPROTECTED
    assert "no member has a checkpoint" in g.reason
    reported(s, 2.0, {M1: WALL - 1, M2: None})
    g = rows(s, 2.0)["db"]
    assert g.state is PolicyState.UNPROTECTED
    assert f"member {M2} has no checkpoint yet" in g.reason
    # still none long after the group was added: an error
    g = rows(s, 2.0 + group().rpo_error_s)["db"]
    assert g.state is PolicyState.ERROR and f"member {M2} has no checkpoint" in g.reason


def test_group_degraded_then_error_as_a_member_misses_checkpoints() -> None:
    p = group()
    warn_s = max(3 * p.rpo_interval_s, p.rpo_warning_s)
    s = lab([p])
    reported(s, 10.0, {M1: WALL - 1, M2: WALL - 1 - warn_s - 2})
    g = rows(s)["db"]
    assert g.state is PolicyState.DEGRADED, g.reason
    assert f"member {M2} has missed checkpoints for {warn_s + 2:.0f} s" in g.reason
    assert g.rpo_lag_s == pytest.approx(1 + warn_s + 2)
    reported(s, 11.0, {M1: WALL - 1, M2: WALL - 2 - p.rpo_error_s})
    g = rows(s, 11.0)["db"]
    assert g.state is PolicyState.ERROR
    assert f"member {M2} has missed checkpoints" in g.reason
    assert rows(s, 11.0)[M1].state is PolicyState.OK   # the members' own rows are fine


def test_group_lag_itself_over_the_thresholds() -> None:
    p = group()
    s = lab([p])
    old = WALL - p.rpo_warning_s - 1
    reported(s, 10.0, {M1: old, M2: old})   # no member trails: the whole group is old
    g = rows(s)["db"]
    assert g.state is PolicyState.DEGRADED and "age of the newest common checkpoint" in g.reason
    reported(s, 11.0, {M1: WALL - p.rpo_error_s, M2: WALL - p.rpo_error_s})
    assert rows(s, 11.0)["db"].state is PolicyState.ERROR


def test_group_error_when_a_member_is_in_error_and_alarmed() -> None:
    s = lab([group()])
    reported(s, 10.0, {M1: WALL - 1, M2: WALL - 1}, errors={M2: "wrong key"})
    r = rows(s)
    assert r[M2].state is PolicyState.ERROR
    g = r["db"]
    assert g.state is PolicyState.ERROR
    assert g.reason.startswith(f"member {M2} is error (filter-2: wrong key")
    tracker = AlarmTracker()
    events = tracker.update([Level(p.name, *level_of(p.state, p.rpo_lag_s, p.reason,
                                                     p.rpo_warning_s, p.rpo_error_s,
                                                     p.enabled)[:1], p.rpo_lag_s)
                             for p in s.status(10.0, wall_now=WALL).policies], WALL)
    assert {(e.policy, e.level) for e in events} == {("db", AlarmLevel.ERROR),
                                                     (M2, AlarmLevel.ERROR)}


def test_disabled_group_is_unprotected_by_choice() -> None:
    s = lab([group(enabled=False)])
    reported(s, 10.0, {M1: None, M2: None})
    g = rows(s)["db"]
    assert g.state is PolicyState.UNPROTECTED and not g.enabled and g.rpo_lag_s == 0
    assert "disabled by the operator" in g.reason


# ---------------------------------------------------------------- invariants

_PROXIES = ["sp-1", "sp-2", "sp-3", "tp-1", "tp-2"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["down", "up", "drain", "undrain", "tick"]),
                          st.sampled_from(_PROXIES)), max_size=25))
def test_members_stay_together_and_epochs_only_grow(steps: list[tuple[str, str]]) -> None:
    """Whatever happens to the proxies, a group's members share one binding, each
    member's epoch never shrinks, and grows whenever its binding changes."""
    proxies = [node(p, Role.SOURCE_PROXY if p.startswith("sp") else Role.TARGET_PROXY,
                    capacity=3) for p in _PROXIES]
    s = lab([group(), group("eb"), single("p1"), single("p2", "filter-2")], *proxies,
            per_minute=4)
    last = {n: (a.epoch, a.binding) for n, a in s.assignments.items()}
    now = 0.0
    for what, nid in steps:
        now += 1.0
        if what == "down":
            s.mark_down(nid, now)
        elif what == "up":
            s.register(next(p for p in proxies if p.id == nid), now)
        elif what in ("drain", "undrain"):
            s.drain(nid, what == "drain", now)
        keep_alive(s, now)
        s.tick(now)
        for g, ms in s.groups.items():
            assert len({s.assignments[m].binding for m in ms}) == 1, g
            assert len({s.assignments[m].reason for m in ms}) == 1, g
        for n, a in s.assignments.items():
            epoch, bound = last[n]
            assert a.epoch >= epoch
            if a.binding != bound:
                assert a.epoch > epoch
            last[n] = (a.epoch, a.binding)
