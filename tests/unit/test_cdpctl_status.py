"""Health verdicts and status rendering (pure: no coordinator needed)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
from cdpctl import status


def reply() -> cpb.StatusReply:
    nodes = [cpb.NodeStatus(info=cpb.NodeInfo(id=i, role=r, site="default",
                                              address=f"127.0.0.1:{1000 + n}", pid=10 + n),
                            state="up", last_seen_age_s=0.4)
             for n, (i, r) in enumerate([("coordinator", cpb.ROLE_UNSPECIFIED),
                                         ("filter-1", cpb.ROLE_FILTER),
                                         ("source-proxy-1", cpb.ROLE_SOURCE_PROXY),
                                         ("target-proxy-1", cpb.ROLE_TARGET_PROXY),
                                         ("target-1", cpb.ROLE_TARGET)])]
    policies = [cpb.PolicyStatus(name="lab", source_proxy="source-proxy-1",
                                 target_proxy="target-proxy-1", target="target-1",
                                 filter="filter-1", epoch=3, captured_seq=120, durable_seq=100,
                                 applied_seq=90, rpo_lag_s=1.25, bytes_replicated=5 << 20,
                                 journal_bytes=4096, state="ok", rpo_interval_s=2, enabled=True,
                                 rpo_warning_s=15, rpo_error_s=60)]
    return cpb.StatusReply(nodes=nodes, policies=policies, now_ns=123)


@pytest.fixture
def doc() -> dict[str, Any]:
    return status.status_dict(reply())


def test_status_dict_fields(doc: dict[str, Any]) -> None:
    assert [n["role"] for n in doc["nodes"]] == [
        "unspecified", "filter", "source-proxy", "target-proxy", "target"]
    node = doc["nodes"][1]
    assert node["id"] == "filter-1" and node["state"] == "up" and node["pid"] == 11
    (p,) = doc["policies"]
    assert p["source_proxy"] == "source-proxy-1" and p["target_proxy"] == "target-proxy-1"
    assert (p["durable_seq"], p["rpo_lag_s"], p["bytes_replicated"]) == (100, 1.25, 5 << 20)
    assert p["state"] == "ok" and doc["now_ns"] == 123


def test_all_good_is_ok(doc: dict[str, Any]) -> None:
    v = status.evaluate(doc)
    assert (v.status, v.exit_code, v.problems) == ("ok", 0, [])
    assert v.as_dict() == {"status": "ok", "problems": []}


def test_nothing_registered_is_ok() -> None:
    assert status.evaluate({"nodes": [], "policies": []}).exit_code == 0


def test_degraded_policy(doc: dict[str, Any]) -> None:
    doc["policies"][0].update(state="degraded", rpo_lag_s=20.0)
    v = status.evaluate(doc)
    assert (v.status, v.exit_code) == ("warning", 1)
    assert v.problems[0]["severity"] == "warning"
    assert v.problems[0]["message"] == "policy lab is degraded: RPO lag 20.0s"
    doc["policies"][0]["reason"] = "overflow gap open: restore points since T are not restorable"
    assert status.evaluate(doc).problems[0]["message"] == (
        "policy lab is degraded: overflow gap open: restore points since T are not restorable")


def test_unprotected_is_a_warning_unless_disabled(doc: dict[str, Any]) -> None:
    """Enabled but nothing on the target yet: never exit 0. Disabled: the operator's
    choice, exit 0 (status still shows it with its reason)."""
    doc["policies"][0].update(state="unprotected", reason="nothing of policy lab is on "
                              "target-1 yet (no stream has arrived): no restore point")
    v = status.evaluate(doc)
    assert (v.status, v.exit_code) == ("warning", 1)
    assert v.problems[0]["message"].startswith("policy lab is unprotected: nothing of")
    doc["policies"][0].update(enabled=False, reason="disabled by the operator")
    assert status.evaluate(doc) == status.Verdict("ok", 0, [])
    assert "policy lab: disabled by the operator" in status.render_status(doc)


def test_an_older_coordinators_state_names_are_mapped() -> None:
    r = reply()
    r.policies[0].state = "warning"
    assert status.status_dict(r)["policies"][0]["state"] == "degraded"
    r.policies[0].state = "unassigned"
    assert status.status_dict(r)["policies"][0]["state"] == "error"
    r.policies[0].state = "disabled"
    r.policies[0].enabled = False
    doc = status.status_dict(r)
    assert doc["policies"][0]["state"] == "unprotected"
    assert status.evaluate(doc).exit_code == 0
    r.policies[0].state = "from-the-future"
    doc = status.status_dict(r)
    assert doc["policies"][0]["state"] == "from-the-future"
    assert status.evaluate(doc).exit_code == 2     # unknown: never silently fine


@pytest.mark.parametrize("state", ["error", "unassigned", ""])
def test_error_policy_states(doc: dict[str, Any], state: str) -> None:
    doc["policies"][0].update(state=state or "unknown", reason="no healthy source proxy")
    v = status.evaluate(doc)
    assert (v.status, v.exit_code) == ("error", 2)
    assert "no healthy source proxy" in v.problems[0]["message"]


def test_ok_policy_with_reported_error_is_a_warning(doc: dict[str, Any]) -> None:
    doc["policies"][0]["reason"] = "target-proxy-1: frame authentication failed: wrong key"
    v = status.evaluate(doc)
    assert (v.status, v.exit_code) == ("warning", 1)
    assert "reports errors: target-proxy-1: frame authentication failed" in \
        v.problems[0]["message"]
    assert status.render_status(doc).endswith(
        "policy lab: target-proxy-1: frame authentication failed: wrong key")


def test_node_down_is_error_and_beats_warning(doc: dict[str, Any]) -> None:
    doc["policies"][0]["state"] = "degraded"
    doc["nodes"][2].update(state="down", last_seen_age_s=7.5)
    v = status.evaluate(doc)
    assert (v.status, v.exit_code) == ("error", 2)
    kinds = {(p["kind"], p["severity"]) for p in v.problems}
    assert kinds == {("node", "error"), ("policy", "warning")}
    assert "source-proxy-1 is down (last seen 7.5s ago)" in v.problems[0]["message"]


def test_evaluate_does_not_modify_input(doc: dict[str, Any]) -> None:
    before = copy.deepcopy(doc)
    status.evaluate(doc)
    assert doc == before


def test_render_status(doc: dict[str, Any]) -> None:
    text = status.render_status(doc)
    lines = text.splitlines()
    assert lines[0].split() == ["NODE", "ROLE", "SITE", "STATE", "ADDRESS", "SEEN", "CLOCK"]
    assert any(line.startswith("filter-1") and " up " in line for line in lines)
    policy_header = next(i for i, line in enumerate(lines) if line.startswith("POLICY"))
    row = lines[policy_header + 1].split()
    assert row[:4] == ["lab", "ok", "source-proxy-1", "target-proxy-1"]
    assert "100" in row and "1.2s" in row and "5.0 MiB" in lines[policy_header + 1]


def test_render_empty_and_health() -> None:
    empty: dict[str, Any] = {"nodes": [], "policies": []}
    assert status.render_status(empty) == "no nodes registered\n\nno policies configured"
    doc = status.status_dict(reply())
    doc["nodes"][4]["state"] = "down"
    text = status.render_health(doc, status.evaluate(doc))
    assert "ERROR: target target-1 is down" in text
    assert text.endswith("health: ERROR")


def test_a_skewed_node_clock_is_a_health_warning() -> None:
    doc = status.status_dict(reply())
    assert all(n["clock_offset_s"] is None for n in doc["nodes"])   # not reported: unknown
    assert status.evaluate(doc).status == "ok"
    doc["clock_skew_alarm_s"] = 0.5
    doc["nodes"][1]["clock_offset_s"] = 0.4
    assert status.evaluate(doc).status == "ok"
    doc["nodes"][1]["clock_offset_s"] = -1.25
    v = status.evaluate(doc)
    assert v.status == "warning" and v.exit_code == 1
    assert v.problems == [{"severity": "warning", "kind": "clock", "id": doc["nodes"][1]["id"],
                           "message": f"clock of {doc['nodes'][1]['id']} is 1.25s behind the "
                                      "coordinator's"}]


def test_a_policy_only_a_filter_knows_is_a_health_error() -> None:
    r = reply()
    r.unknown_policies.add(node_id="filter-1", policy="local-only")
    doc = status.status_dict(r)
    assert doc["unknown_policies"] == [{"node": "filter-1", "policy": "local-only"}]
    v = status.evaluate(doc)
    assert v.status == "error" and v.exit_code == 2
    assert any(x["id"] == "local-only" and "does not know" in x["message"] for x in v.problems)
