"""A policy's state and reasons from its nodes' reports (cdp_coordinator.status):
a heartbeat replaces the node's reports (an error that a node stopped reporting
no longer puts the policy in error); a filter or target that does not report it,
a target with no store yet, a filter down or never registered, an open gap, and
every reason shown at once, most severe first."""

from __future__ import annotations

from dataclasses import replace

from test_coordinator_state import beat, lab, policy

from cdp_common.config import PolicyDiskConfig
from cdp_coordinator.model import Assignment, Endpoint, Gap, SyncProgress
from cdp_coordinator.state import Report
from cdp_coordinator.status import policy_status


def test_cleared_error_is_dropped_with_the_next_heartbeat() -> None:
    s = lab(policies=[policy("p1")])
    s.tick(0)
    s.heartbeat("filter-1", [Report("p1")], 0)
    s.heartbeat("target-1", [Report("p1")], 0)
    s.heartbeat("sp-1", [Report("p1", error="target: No space left on device")], 0)
    p = s.status(0, wall_now=1000).policies[0]
    assert p.state == "error" and "No space left" in p.reason
    s.heartbeat("sp-1", [], 0)   # the proxy's error cleared: it reports nothing for p1
    p = s.status(0, wall_now=1000).policies[0]
    assert p.state == "ok" and p.reason == ""


def test_reports_of_other_nodes_are_kept() -> None:
    s = lab(policies=[policy("p1")])
    s.tick(0)
    s.heartbeat("filter-1", [Report("p1")], 0)
    s.heartbeat("sp-1", [Report("p1", error="boom")], 0)
    s.heartbeat("target-1", [Report("p1", durable_seq=5)], 0)
    p = s.status(0, wall_now=1000).policies[0]
    assert p.reason == "sp-1: boom" and p.durable_seq == 5


def test_a_filter_that_does_not_report_the_policy_is_an_error() -> None:
    """The filter is up but says nothing of p1 (no such disk there): not "ok, lag 0".
    For one lease after the policy was added it may just not have heard of it yet."""
    s = lab(policies=[policy("p1")])
    s.tick(0)
    s.heartbeat("filter-1", [], 1)
    s.heartbeat("target-1", [Report("p1")], 1)
    p = s.status(1, wall_now=1000).policies[0]
    assert p.state == "unprotected"
    assert p.reason == "waiting for filter-1 to report policy p1 (assigned 1.0s ago)"
    s.heartbeat("filter-1", [], 3)
    s.heartbeat("target-1", [Report("p1")], 3)
    p = s.status(3, wall_now=1000).policies[0]
    assert p.state == "error" and p.rpo_lag_s == 0.0
    assert p.reason.startswith("filter-1: does not report policy p1")
    s.heartbeat("filter-1", [Report("p1")], 3)
    assert s.status(3, wall_now=1000).policies[0].state == "ok"


def test_a_target_that_does_not_report_the_policy_is_an_error() -> None:
    """A target reports every policy assigned to it (no_store until its first stream):
    one that says nothing of it past the grace is not "ok"."""
    s = lab(policies=[policy("p1")])
    s.tick(0)
    s.heartbeat("filter-1", [Report("p1")], 1)
    s.heartbeat("target-1", [], 1)
    p = s.status(1, wall_now=1000).policies[0]
    assert p.state == "unprotected"
    assert p.reason == "waiting for target-1 to report policy p1 (assigned 1.0s ago)"
    s.heartbeat("filter-1", [Report("p1")], 4)
    s.heartbeat("target-1", [], 4)
    p = s.status(4, wall_now=1000).policies[0]
    assert p.state == "error"
    assert p.reason.startswith("target-1: does not report policy p1 (assigned to it")
    s.heartbeat("target-1", [Report("p1", durable_seq=3)], 4)
    assert s.status(4, wall_now=1000).policies[0].state == "ok"


def test_a_target_waiting_for_its_first_stream_is_unprotected_then_an_error() -> None:
    s = lab(policies=[policy("p1", rpo_warning_s=5.0, rpo_error_s=20.0)])
    s.tick(0)
    s.heartbeat("filter-1", [Report("p1")], 5)
    s.heartbeat("target-1", [Report("p1", no_store=True)], 5)
    p = s.status(5, wall_now=1000).policies[0]
    assert p.state == "unprotected"
    assert p.reason == ("nothing of policy p1 is on target-1 yet (no stream has arrived): "
                        "no restore point")
    # writes captured meanwhile: the lag counts from the first of them
    s.heartbeat("filter-1", [Report("p1", captured_seq=4, captured_time_ns=990 * 10**9)], 5)
    p = s.status(5, wall_now=1000).policies[0]
    assert p.state == "unprotected" and p.reason.endswith(
        "; RPO lag 10.0s >= warning threshold 5s")
    # still nothing on the target rpo_error_s after the policy was added
    s.heartbeat("filter-1", [Report("p1")], 20)
    s.heartbeat("target-1", [Report("p1", no_store=True)], 20)
    p = s.status(20, wall_now=1000).policies[0]
    assert p.state == "error"
    assert p.reason == ("target-1 has nothing of policy p1 20s after it was added (no "
                        "stream has arrived): nothing is protected")
    s.heartbeat("target-1", [Report("p1")], 20)
    assert s.status(20, wall_now=1000).policies[0].state == "ok"


def test_a_filter_down_or_never_registered_is_an_error() -> None:
    s = lab(policies=[policy("p1"), replace(policy("p2"), disks=[
        PolicyDiskConfig("filter-9", "disk0", 4096)])])
    s.tick(0)
    s.heartbeat("filter-1", [Report("p1"), Report("p2")], 1)
    s.heartbeat("target-1", [Report("p1"), Report("p2")], 1)
    by_name = {p.name: p for p in s.status(1, wall_now=1000).policies}
    assert by_name["p1"].state == "ok"
    assert by_name["p2"].state == "error" and by_name["p2"].reason == (
        "filter filter-9 is not registered: nothing of policy p2 is captured")
    beat(s, 3, "sp-1", "tp-1")                 # filter-1 stops heartbeating
    s.heartbeat("target-1", [Report("p1"), Report("p2")], 3)
    s.tick(4.5)
    p = {p.name: p for p in s.status(4.5, wall_now=1000).policies}["p1"]
    assert p.state == "error" and p.reason == (
        "filter filter-1 is down: what it captures of policy p1 is not seen")


def test_every_reason_is_shown_most_severe_first() -> None:
    s = lab(policies=[policy("p1")])
    s.tick(0)
    began = 1_700_000_000 * 10**9
    s.heartbeat("filter-1", [Report("p1", error="journal /j: fsync failed (EIO)",
                                    progress=SyncProgress(capture_mode="tracking",
                                                          gap_begin_time_ns=began))], 5)
    s.heartbeat("target-1", [Report("p1")], 5)
    p = s.status(5, wall_now=1000).policies[0]
    assert p.state == "error"
    assert p.reason == ("filter-1: journal /j: fsync failed (EIO); overflow gap open: "
                        "restore points since 2023-11-14T22:13:20.000Z are not restorable "
                        "until it closes")


def test_an_unassigned_policy_says_it_once() -> None:
    """The filter repeats the assignment's reason as its error: shown once."""
    s = lab(policies=[policy("p1")])
    s.tick(0)
    beat(s, 3.0, "filter-1", "tp-1", "target-1")     # the only source proxy is lost
    s.tick(3.5)
    why = s.assignments["p1"].reason
    assert why == "no healthy source proxy on site default"
    s.heartbeat("filter-1", [Report("p1", error=f"unassigned: {why}")], 3.5)
    s.heartbeat("target-1", [Report("p1")], 3.5)
    p = s.status(3.5, wall_now=1000).policies[0]
    assert p.state == "error"
    assert p.reason == f"unassigned: {why} (nothing is replicated)"


def test_an_open_gap_degrades_the_policy_with_its_start() -> None:
    s = lab(policies=[policy("p1")])
    s.tick(0)
    began = 1_700_000_000 * 10**9
    s.heartbeat("filter-1", [Report("p1", progress=SyncProgress(
        capture_mode="tracking", gap_begin_time_ns=began))], 0)
    s.heartbeat("target-1", [Report("p1")], 0)
    p = s.status(0, wall_now=1000).policies[0]
    assert p.state == "degraded"
    assert p.reason == ("overflow gap open: restore points since 2023-11-14T22:13:20.000Z "
                        "are not restorable until it closes")
    # the target's open gap says the same once the filter's has closed (repair)
    s.heartbeat("filter-1", [Report("p1")], 0)
    s.heartbeat("target-1", [Report("p1", gaps=(Gap(5, 0, began, 0, "corrupt"),))], 0)
    p = s.status(0, wall_now=1000).policies[0]
    assert p.state == "degraded" and p.reason.startswith("corrupt gap open: restore points")
    s.heartbeat("target-1", [Report("p1", gaps=(Gap(5, 9, began, began + 1, "corrupt"),))], 0)
    assert s.status(0, wall_now=1000).policies[0].state == "ok"


def test_a_policy_only_a_filter_knows_is_listed() -> None:
    s = lab(policies=[policy("p1")])
    s.tick(0)
    s.heartbeat("filter-1", [Report("p1"), Report("local-only", captured_seq=3)], 0)
    s.heartbeat("sp-1", [Report("ghost")], 0)     # not a filter: not "protected there"
    assert s.status(0, wall_now=1000).unknown == [("filter-1", "local-only")]


def test_without_a_known_age_no_grace_applies() -> None:
    """policy_status alone (no age known): a missing report is an error at once."""
    p = policy("p1")
    a = Assignment("p1", 1, source_proxy=Endpoint("sp-1", "a"),
                   target_proxy=Endpoint("tp-1", "b"), target=Endpoint("target-1", "c"))
    got = policy_status(p, a, {("filter-1", "p1"): Report("p1"),
                               ("target-1", "p1"): Report("p1", no_store=True)}, 0, 1000.0)
    assert (got.state, got.reason) == ("error", "target-1 has nothing of policy p1 (no stream "
                                                "has arrived): nothing is protected")
    got = policy_status(p, a, {("target-1", "p1"): Report("p1")}, 0, 1000.0)
    assert got.state == "error" and got.reason.startswith("filter-1: does not report policy")
    got = policy_status(p, a, {("filter-1", "p1"): Report("p1"),
                               ("target-1", "p1"): Report("p1")}, 0, 1000.0)
    assert (got.state, got.reason) == ("ok", "")
