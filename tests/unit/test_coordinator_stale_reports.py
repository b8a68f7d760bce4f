"""A heartbeat replaces the node's reports: an error that a node stopped
reporting (a proxy whose stream recovered) no longer puts the policy in error."""

from __future__ import annotations

from test_coordinator_state import lab, policy

from cdp_coordinator.model import Gap, SyncProgress
from cdp_coordinator.state import Report


def test_cleared_error_is_dropped_with_the_next_heartbeat() -> None:
    s = lab(policies=[policy("p1")])
    s.tick(0)
    s.heartbeat("filter-1", [Report("p1")], 0)
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
    """The filter is up but says nothing of p1 (no such disk there): not "ok, lag 0"."""
    s = lab(policies=[policy("p1")])
    s.tick(0)
    s.heartbeat("filter-1", [], 0)
    p = s.status(0, wall_now=1000).policies[0]
    assert p.state == "error" and p.rpo_lag_s == 0.0
    assert "filter-1: does not report policy p1" in p.reason
    s.heartbeat("filter-1", [Report("p1")], 0)
    assert s.status(0, wall_now=1000).policies[0].state == "ok"


def test_an_open_gap_degrades_the_policy_with_its_start() -> None:
    s = lab(policies=[policy("p1")])
    s.tick(0)
    began = 1_700_000_000 * 10**9
    s.heartbeat("filter-1", [Report("p1", progress=SyncProgress(
        capture_mode="tracking", gap_begin_time_ns=began))], 0)
    p = s.status(0, wall_now=1000).policies[0]
    assert p.state == "warning"
    assert p.reason == ("overflow gap open: restore points since 2023-11-14T22:13:20.000Z "
                        "are not restorable until it closes")
    # the target's open gap says the same once the filter's has closed (repair)
    s.heartbeat("filter-1", [Report("p1")], 0)
    s.heartbeat("target-1", [Report("p1", gaps=(Gap(5, 0, began, 0, "corrupt"),))], 0)
    p = s.status(0, wall_now=1000).policies[0]
    assert p.state == "warning" and p.reason.startswith("corrupt gap open: restore points")
    s.heartbeat("target-1", [Report("p1", gaps=(Gap(5, 9, began, began + 1, "corrupt"),))], 0)
    assert s.status(0, wall_now=1000).policies[0].state == "ok"


def test_a_policy_only_a_filter_knows_is_listed() -> None:
    s = lab(policies=[policy("p1")])
    s.tick(0)
    s.heartbeat("filter-1", [Report("p1"), Report("local-only", captured_seq=3)], 0)
    s.heartbeat("sp-1", [Report("ghost")], 0)     # not a filter: not "protected there"
    assert s.status(0, wall_now=1000).unknown == [("filter-1", "local-only")]
