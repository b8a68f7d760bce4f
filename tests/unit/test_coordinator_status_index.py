"""Status of many policies groups the reports once (issue 13 item 4): the rows are
the very rows each policy's own scan of every report gives."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from cdp_common.config import PolicyConfig, PolicyDiskConfig
from cdp_coordinator.model import Assignment, Endpoint, Node, NodeInfo, Report, Role
from cdp_coordinator.status import policy_status, reports_by_policy, status

NODE_IDS = ["filter-1", "filter-2", "sp-1", "tp-1", "target-1", "target-2", "zz"]
ROLES = {"filter-1": Role.FILTER, "filter-2": Role.FILTER, "sp-1": Role.SOURCE_PROXY,
         "tp-1": Role.TARGET_PROXY, "target-1": Role.TARGET, "target-2": Role.TARGET,
         "zz": Role.FILTER}
POLICIES = [PolicyConfig(name=f"p{i}", disks=[PolicyDiskConfig(f"filter-{1 + i % 2}", f"d{i}",
                                                                1 << 20)],
                         target=f"target-{1 + i % 2}", enabled=i != 3) for i in range(5)]

reports = st.dictionaries(
    st.tuples(st.sampled_from(NODE_IDS), st.sampled_from([p.name for p in POLICIES] + ["x"])),
    st.builds(lambda seq, err, no_store: (seq, err, no_store), st.integers(0, 5),
              st.sampled_from(["", "", "fenced", "wrong key"]), st.booleans()),
    max_size=25)


@settings(max_examples=200, deadline=None)
@given(reports, st.sets(st.sampled_from(NODE_IDS)))
def test_grouped_reports_give_the_rows_of_one_scan_per_policy(
        raw: dict[tuple[str, str], tuple[int, str, bool]], down: set[str]) -> None:
    reps = {(nid, pol): Report(policy=pol, captured_seq=seq + 1, captured_time_ns=10**18,
                               durable_seq=seq, error=err, no_store=no_store)
            for (nid, pol), (seq, err, no_store) in raw.items()}
    nodes = {nid: Node(NodeInfo(nid, int(ROLES[nid])), last_seen=0.0, up=nid not in down)
             for nid in NODE_IDS}
    assignments = {p.name: Assignment(p.name, 3, Endpoint(p.disks[0].filter, "a:1"),
                                      Endpoint("sp-1", "b:1"), Endpoint("tp-1", "c:1"),
                                      Endpoint(p.target, "d:1")) for p in POLICIES[:4]}
    policies = {p.name: p for p in POLICIES}
    got = status(nodes, policies, assignments, reps, {}, 5.0, 1e9 + 5, since={"p1": 4.0},
                 grace_s=3.0)
    up = frozenset(nid for nid in NODE_IDS if nid not in down)
    want = [policy_status(p, assignments.get(p.name), reps, 0, 1e9 + 5, {}, 0.5, up,
                          frozenset(nodes), 1.0 if p.name == "p1" else math.inf, 3.0)
            for _, p in sorted(policies.items())]
    assert got.policies == want


def test_reports_by_policy_are_by_node_id() -> None:
    r = {("b", "p"): Report("p"), ("a", "p"): Report("p", error="e"), ("a", "q"): Report("q")}
    assert reports_by_policy(r) == {"p": [("a", Report("p", error="e")), ("b", Report("p"))],
                                    "q": [("a", Report("q"))]}
