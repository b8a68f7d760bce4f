"""The placement fast path (issue 13 item 4): `CoordinatorState._recompute` skips
`place_all` and the rebalancer when their inputs are those of a run that changed
nothing. Over random event sequences (registrations, heartbeats with changing
bytes/s, leases running out, failed probes, policy edits and deletes, drains, a
restart in grace, time passing the rebalancer's minute) it must give the very
assignments, pushes, rebinds and moves of a state that recomputes in full every time."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdp_common.config import PolicyConfig, PolicyDiskConfig
from cdp_coordinator.state import Assignment, CoordinatorState, NodeInfo, Role

LEASE = 3.0

NODES = [NodeInfo("filter-1", int(Role.FILTER), "hq", "f1:1"),
         NodeInfo("filter-2", int(Role.FILTER), "hq", "f2:1"),
         NodeInfo("sp-1", int(Role.SOURCE_PROXY), "hq", "sp1:1", capacity=2),
         NodeInfo("sp-2", int(Role.SOURCE_PROXY), "hq", "sp2:1",
                  capacity_bytes_per_s=2_000_000),
         NodeInfo("both-1", int(Role.PROXY_BOTH), "hq", "b1:1"),
         NodeInfo("tp-1", int(Role.TARGET_PROXY), "dr", "tp1:1"),
         NodeInfo("tp-2", int(Role.TARGET_PROXY), "dr", "tp2:1", capacity=1),
         NodeInfo("target-1", int(Role.TARGET), "dr", "t1:1"),
         NodeInfo("target-2", int(Role.TARGET), "dr", "t2:1")]
"""Few proxies with small capacities, so that slots wait for room; `reregister`
gives a node other details (address, capacity, capacity in bytes/s)."""
PROXIES = [n.id for n in NODES if n.role not in (Role.FILTER, Role.TARGET)]
POLICY_NAMES = [f"p{i}" for i in range(6)]


class FullState(CoordinatorState):
    """The reference: every recompute runs placement and the rebalancer."""

    def _recompute(self, now: float) -> None:
        self._settled = None
        super()._recompute(now)


def policy(name: str, filt: str, target: str, pin_s: str, pin_t: str,
           enabled: bool, rpo: float) -> PolicyConfig:
    return PolicyConfig(name=name, disks=[PolicyDiskConfig(filt, f"{name}-d", 1 << 20)],
                        target=target, source_site="hq", target_site="dr",
                        pinned_source_proxy=pin_s, pinned_target_proxy=pin_t,
                        enabled=enabled, rpo_interval_s=rpo)


policies = st.builds(policy, st.sampled_from(POLICY_NAMES),
                     st.sampled_from(["filter-1", "filter-2"]),
                     st.sampled_from(["target-1", "target-2", "sp-1", "nobody"]),
                     st.sampled_from(["", "", "sp-1", "both-1", "tp-1"]),
                     st.sampled_from(["", "tp-2"]), st.booleans(),
                     st.sampled_from([2.0, 5.0]))
node_ids = st.sampled_from([n.id for n in NODES])
events = st.one_of(
    st.tuples(st.just("register"), node_ids),
    st.tuples(st.just("reregister"), node_ids, st.integers(0, 3), st.integers(0, 3)),
    st.tuples(st.just("heartbeat"), node_ids, st.sampled_from([0.0, 1e6, 3e6])),
    st.tuples(st.just("heartbeat"), st.sampled_from(PROXIES), st.sampled_from([0.0, 3e6])),
    st.tuples(st.just("mark_down"), node_ids),
    st.tuples(st.just("tick"), st.sampled_from([0.1, 1.0, 2.0, 4.0, 61.0])),
    st.tuples(st.just("set_policy"), policies),
    st.tuples(st.just("delete_policy"), st.sampled_from(POLICY_NAMES)),
    st.tuples(st.just("drain"), st.sampled_from(PROXIES), st.booleans()),
    st.tuples(st.just("restart")),
)


def apply(s: CoordinatorState, ev: tuple[object, ...], now: float) -> object:
    kind = ev[0]
    if kind == "register":
        return s.register(next(n for n in NODES if n.id == ev[1]), now)
    if kind == "reregister":
        base = next(n for n in NODES if n.id == ev[1])
        cap, bps = int(ev[2]), int(ev[3])  # type: ignore[call-overload]
        return s.register(NodeInfo(base.id, base.role, base.site, f"{base.id}:{cap + 2}",
                                   capacity=cap, capacity_bytes_per_s=bps * 1_000_000), now)
    if kind == "heartbeat":
        return s.heartbeat(str(ev[1]), [], now, bytes_per_s=float(ev[2]))  # type: ignore[arg-type]
    if kind == "mark_down":
        return s.mark_down(str(ev[1]), now)
    if kind == "tick":
        return s.tick(now)
    if kind == "set_policy":
        assert isinstance(ev[1], PolicyConfig)
        return s.set_policy(ev[1], now)
    if kind == "delete_policy":
        return s.delete_policy(str(ev[1]), now)
    if kind == "drain":
        return s.drain(str(ev[1]), bool(ev[2]), now)
    raise AssertionError(kind)


def restarted(s: CoordinatorState, now: float) -> CoordinatorState:
    """A coordinator restart: what the store kept, every node in grace for one lease."""
    new = type(s)(LEASE)
    new.rebalance_per_minute = s.rebalance_per_minute
    new.restore([n.info for n in s.nodes.values()], list(s.policies.values()),
                list(s.assignments.values()), now)
    return new


def snapshot(s: CoordinatorState) -> tuple[dict[str, Assignment], int, int, set[str]]:
    return dict(s.assignments), s.rebinds, s.moves, set(s._dirty)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(events, max_size=40), st.lists(policies, max_size=4),
       st.sampled_from([0, 1, 2]), st.booleans())
def test_the_fast_path_gives_what_a_full_recompute_gives(
        evs: list[tuple[object, ...]], initial: list[PolicyConfig], per_minute: int,
        restored: bool) -> None:
    fast, full = CoordinatorState(LEASE), FullState(LEASE)
    now = 100.0
    for s in (fast, full):
        s.rebalance_per_minute = per_minute
        if not restored:
            for n in NODES[:5]:
                s.register(n, now)
        s.set_policies({p.name: p for p in initial}.values(), now)
    if restored:
        fast, full = restarted(fast, now), restarted(full, now)
    assert snapshot(fast) == snapshot(full)
    for ev in evs:
        if ev[0] == "tick":
            now += float(ev[1])  # type: ignore[arg-type]
        else:
            now += 0.05
        if ev[0] == "restart":
            fast, full = restarted(fast, now), restarted(full, now)
        else:
            got, want = apply(fast, ev, now), apply(full, ev, now)
            assert got == want, ev
        assert snapshot(fast) == snapshot(full), ev
    now += 0.1
    assert fast.tick(now) == full.tick(now)
    assert snapshot(fast) == snapshot(full)


def test_heartbeats_that_change_nothing_take_the_fast_path() -> None:
    """Steady state: bytes/s change every heartbeat, placement does not run."""
    calls = []
    s = CoordinatorState(LEASE)
    s.rebalance_per_minute = 2
    nodes = [NodeInfo(n.id, n.role, n.site, n.address) for n in NODES]   # no capacities
    for n in nodes:
        s.register(n, 0.0)
    s.set_policies([policy(n, "filter-1", "target-1", "", "", True, 2.0)
                    for n in POLICY_NAMES], 0.0)
    s.tick(0.0)
    s.tick(0.1)
    real = s._rebalance

    def counting(now: float) -> int:
        calls.append(now)
        return real(now)
    s._rebalance = counting  # type: ignore[method-assign]
    for k in range(1, 20):
        for n in nodes:
            s.heartbeat(n.id, [], k * 0.5, bytes_per_s=1e6 * (k % 3))
        s.tick(k * 0.5)
    assert calls == []
    s.mark_down("sp-1", 10.0)   # a node event: placement runs again
    assert calls == [10.0]
    calls.clear()
    s.register(NodeInfo("sp-1", int(Role.SOURCE_PROXY), "hq", "sp1:1",
                        capacity_bytes_per_s=10**6), 10.5)
    assert calls == [10.5]
    s.heartbeat("sp-1", [], 11.0, bytes_per_s=2e6)   # with a capacity in bytes/s,
    s.tick(11.0)                                      # a new figure may give room
    assert calls == [10.5, 11.0]


def both(script: list[tuple[object, ...]], per_minute: int = 0,
         restart_at: int = -1) -> tuple[CoordinatorState, CoordinatorState]:
    """Run one script of (now, event) on a fast and a full state, comparing every step."""
    fast: CoordinatorState = CoordinatorState(LEASE)
    full: CoordinatorState = FullState(LEASE)
    fast.rebalance_per_minute = full.rebalance_per_minute = per_minute
    for i, (now, *ev) in enumerate(script):
        if i == restart_at:
            fast, full = restarted(fast, float(now)), restarted(full, float(now))  # type: ignore[arg-type]
        assert apply(fast, tuple(ev), float(now)) == apply(full, tuple(ev), float(now))  # type: ignore[arg-type]
        assert snapshot(fast) == snapshot(full), (now, ev)
    return fast, full


P1 = policy("p1", "filter-1", "target-1", "", "", True, 2.0)


def test_a_proxy_reporting_fewer_bytes_than_its_capacity_takes_a_waiting_slot() -> None:
    """The one way bytes/s matter once placement settled: a slot waiting for room."""
    sp2 = next(n for n in NODES if n.id == "sp-2")   # capacity_bytes_per_s = 2 MB/s
    fast, _ = both([(0.0, "register", "target-1"), (0.0, "register", "tp-1"),
                    (0.0, "register", "sp-2"), (0.1, "heartbeat", "sp-2", 3e6),
                    (0.2, "set_policy", P1), (0.3, "tick", 0), (0.4, "tick", 0),
                    (0.5, "heartbeat", "sp-2", 1e6), (0.6, "tick", 0)])
    assert fast.assignments["p1"].source_proxy.node_id == sp2.id


def test_a_restored_node_that_never_comes_back_loses_its_policies_after_grace() -> None:
    fast, _ = both([(0.0, "register", "target-1"), (0.0, "register", "tp-1"),
                    (0.0, "register", "sp-1"), (0.0, "set_policy", P1),
                    (0.0, "register", "both-1"), (0.1, "tick", 0),
                    (10.0, "tick", 0), (10.5, "heartbeat", "target-1", 0.0),
                    (10.5, "heartbeat", "tp-1", 0.0), (10.5, "heartbeat", "both-1", 0.0),
                    (11.0, "tick", 0), (12.0, "tick", 0), (13.5, "tick", 0)], restart_at=6)
    assert fast.assignments["p1"].source_proxy.node_id == "both-1"


def test_the_rebalancer_resumes_when_its_minute_is_over() -> None:
    pols = [policy(f"p{i}", "filter-1", "target-1", "", "", True, 2.0) for i in range(6)]
    script: list[tuple[object, ...]] = [(0.0, "register", "target-1"), (0.0, "register", "tp-1"),
                                        (0.0, "register", "sp-2")]
    script += [(0.1, "set_policy", p) for p in pols]
    script += [(1.0, "register", "both-1"), (1.5, "tick", 0)]
    for t in range(2, 130, 2):   # heartbeats keep everyone up; ticks between
        script += [(float(t), "heartbeat", n, 0.0) for n in ("target-1", "tp-1", "sp-2",
                                                             "both-1")]
        script.append((t + 0.5, "tick", 0))
    fast, _ = both(script, per_minute=1)
    assert fast.moves >= 2
