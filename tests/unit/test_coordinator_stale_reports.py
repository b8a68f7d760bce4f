"""A heartbeat replaces the node's reports: an error that a node stopped
reporting (a proxy whose stream recovered) no longer puts the policy in error."""

from __future__ import annotations

from test_coordinator_state import lab, policy

from cdp_coordinator.state import Report


def test_cleared_error_is_dropped_with_the_next_heartbeat() -> None:
    s = lab(policies=[policy("p1")])
    s.tick(0)
    s.heartbeat("sp-1", [Report("p1", error="target: No space left on device")], 0)
    p = s.status(0, wall_now=1000).policies[0]
    assert p.state == "error" and "No space left" in p.reason
    s.heartbeat("sp-1", [], 0)   # the proxy's error cleared: it reports nothing for p1
    p = s.status(0, wall_now=1000).policies[0]
    assert p.state == "ok" and p.reason == ""


def test_reports_of_other_nodes_are_kept() -> None:
    s = lab(policies=[policy("p1")])
    s.tick(0)
    s.heartbeat("sp-1", [Report("p1", error="boom")], 0)
    s.heartbeat("target-1", [Report("p1", durable_seq=5)], 0)
    p = s.status(0, wall_now=1000).policies[0]
    assert p.reason == "sp-1: boom" and p.durable_seq == 5
