"""Consistency groups as the operator sees them: GetStatus carries a row per group and
per member (and alarms the group), `cdpctl status` indents the members under their
group and marks both in --json, `cdpctl health` is not OK while a group is degraded
or in error (pure: the service in process, no sockets)."""

from __future__ import annotations

import asyncio
from typing import Any

from coordfixtures import NODES, Clock, memory_service

from cdp_common.config import PolicyConfig, PolicyDiskConfig
from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
from cdp_coordinator.model import NodeInfo, Report, Role
from cdpctl import status

M1, M2 = "db..filter-1", "db..filter-2"
WALL = 50_000.0


def group() -> PolicyConfig:
    return PolicyConfig(name="db", target="target-1", disks=[
        PolicyDiskConfig("filter-1", "a", 1 << 20), PolicyDiskConfig("filter-2", "b", 1 << 20)])


def solo() -> PolicyConfig:
    return PolicyConfig(name="dz", target="target-1",
                        disks=[PolicyDiskConfig("filter-1", "z", 1 << 20)])


def service_status(ckpt: dict[str, float]) -> tuple[cpb.StatusReply, Any]:
    clock = Clock(1000.0)
    svc = memory_service([group(), solo()], clock=clock, wall=lambda: WALL, lease_ms=5000)
    for n in (*NODES, NodeInfo("filter-2", int(Role.FILTER), "default", "127.0.0.1:9")):
        svc.register(n)
    clock.t += 0.1
    now = clock()
    for f, m in (("filter-1", M1), ("filter-2", M2)):
        svc.state.heartbeat(f, [Report(m)] + ([Report("dz")] if f == "filter-1" else []), now)
    svc.state.heartbeat("target-1", [Report("dz")] + [
        Report(m, checkpoint_id=1, checkpoint_time_ns=int((WALL - age) * 1e9))
        for m, age in ckpt.items()], now)
    for n in NODES:
        if n.id not in ("filter-1", "target-1"):
            svc.state.heartbeat(n.id, [], now)
    clock.t = 1005.05   # past the alarms' start-up wait (a lease), within the leases
    svc.flush()
    events = svc.check_alarms()
    reply = asyncio.run(svc.GetStatus(cpb.StatusRequest(), None))  # type: ignore[arg-type]
    return reply, events


def test_get_status_has_group_and_member_rows() -> None:
    reply, events = service_status({M1: 1.0, M2: 1.0})
    names = [p.name for p in reply.policies]
    assert names == ["db", M1, M2, "dz"]
    g = reply.policies[0]
    assert (g.state, g.filter, g.enabled) == ("ok", "filter-1,filter-2", True)
    assert g.source_proxy == reply.policies[1].source_proxy == reply.policies[2].source_proxy
    assert events == []
    doc = status.status_dict(reply)
    rows = {p["name"]: p for p in doc["policies"]}
    assert rows["db"]["members"] == [M1, M2] and rows["db"]["group"] is None
    assert rows[M1]["group"] == rows[M2]["group"] == "db"
    assert rows["dz"]["group"] is None and rows["dz"]["members"] is None
    assert status.evaluate(doc).exit_code == status.EXIT_OK
    text = status.render_policies(doc)
    lines = text.splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["db", M1, M2, "dz"]
    assert lines[2].startswith("  " + M1) and lines[1].startswith("db ")


def test_a_lagging_member_makes_the_group_degraded_and_health_warn() -> None:
    reply, events = service_status({M1: 1.0, M2: 30.0})
    g = next(p for p in reply.policies if p.name == "db")
    assert g.state == "degraded" and f"member {M2} has missed checkpoints" in g.reason
    assert g.alarm == "warning"
    assert [(e.policy, e.level) for e in events] == [("db", "warning")]
    verdict = status.evaluate(status.status_dict(reply))
    assert verdict.exit_code == status.EXIT_WARNING
    assert [p["id"] for p in verdict.problems] == ["db"]
    assert verdict.problems[0]["message"].startswith("group db is degraded: member ")
    text = status.render_status(status.status_dict(reply))
    assert f"group db: member {M2} has missed checkpoints" in text


def test_a_member_far_behind_is_a_group_error() -> None:
    reply, _ = service_status({M1: 1.0, M2: 200.0})
    verdict = status.evaluate(status.status_dict(reply))
    assert verdict.exit_code == status.EXIT_ERROR
    assert any(p["id"] == "db" and p["severity"] == "error" for p in verdict.problems)


def test_assignment_sets_carry_the_group_fields() -> None:
    svc = memory_service([group()])
    for n in (*NODES, NodeInfo("filter-2", int(Role.FILTER), "default", "127.0.0.1:9")):
        svc.register(n)
    (a,) = svc.assignment_set("filter-2").assignments
    assert (a.policy, a.group, list(a.group_members)) == (M2, "db", [M1, M2])
    assert [d.name for d in a.disks] == ["b"]
    assert [x.policy for x in svc.assignment_set("target-1").assignments] == [M1, M2]


def test_policy_show_names_the_members() -> None:
    from cdpctl import policy
    doc = {"name": "db", "target": "target-1",
           "disks": [{"filter": "filter-2", "name": "b", "size_bytes": 1 << 20},
                     {"filter": "filter-1", "name": "a", "size_bytes": 1 << 20}]}
    assert policy.group_members(doc) == [M1, M2]
    assert f"members                {M1}, {M2} (a consistency group)" in policy.show_text(doc)
    assert policy.group_members({**doc, "disks": doc["disks"][:1]}) == []
