"""A failed verification alarms (issue 16 item 5): the target's newest verification
travels in its heartbeat (PolicyReport.verified_*) to the coordinator; a failed one
makes the policy degraded with "restore point N failed verification: ..." (a
warning alarm, `cdpctl health` warns), a passed one or none changes nothing, a newer
passing one clears it; the status reply and `cdpctl status --json` carry the fields
and the human status shows a VERIFIED line.
"""

from __future__ import annotations

import pytest
from test_coordinator_state import lab, policy

from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
from cdp_coordinator.alarms import AlarmTracker, Level, level_of
from cdp_coordinator.service import report_from_pb, status_pb
from cdp_coordinator.state import CoordinatorState
from cdp_coordinator.status import VERIFY_DETAIL_MAX
from cdpctl import status as cstatus

pytestmark = pytest.mark.timeout(30)

WALL = 1000.0
T = int(990 * 1e9)


def judged(target: cpb.PolicyReport) -> tuple[CoordinatorState, cpb.StatusReply]:
    s: CoordinatorState = lab(policies=[policy("p1")])
    s.tick(0)
    s.heartbeat("filter-1", [report_from_pb(cpb.PolicyReport(policy="p1", captured_seq=5))], 5)
    s.heartbeat("target-1", [report_from_pb(target)], 5)
    return s, status_pb(s.status(5, wall_now=WALL), int(WALL * 1e9))


def caught_up(**verified: object) -> cpb.PolicyReport:
    return cpb.PolicyReport(policy="p1", durable_seq=5, applied_seq=5, **verified)  # type: ignore[arg-type]


def test_no_verification_or_a_passed_one_is_ok() -> None:
    _, reply = judged(caught_up())
    assert (reply.policies[0].state, reply.policies[0].reason) == ("ok", "")
    _, reply = judged(caught_up(verified_point_id=7, verified_ok=True, verified_ns=T,
                                verify_detail="scheduled: e2fsck clean", verify_every_s=3600))
    p = reply.policies[0]
    assert (p.state, p.reason) == ("ok", "")
    assert (p.verified_point_id, p.verified_ok, p.verified_ns, p.verify_every_s) == (
        7, True, T, 3600)


def test_a_failed_newest_verification_degrades_the_policy_and_alarms() -> None:
    detail = "e2fsck -fn /dev/loop3 exited 4 (errors found):\nGroup 2 bad\n" + "x" * 1000
    _, reply = judged(caught_up(verified_point_id=7, verified_ok=False, verified_ns=T,
                                verify_detail=detail, verify_every_s=60))
    p = reply.policies[0]
    assert p.state == "degraded"
    assert p.reason.startswith("restore point 7 failed verification: e2fsck -fn /dev/loop3 "
                               "exited 4")
    assert len(p.reason) < VERIFY_DETAIL_MAX + 100            # the detail is cut short
    assert "\n" not in p.reason and "(errors found): Group 2 bad x" in p.reason
    assert p.verify_detail == detail                          # the whole detail is kept
    level, message = level_of(p.state, p.rpo_lag_s, p.reason, p.rpo_warning_s,
                              p.rpo_error_s)
    events = AlarmTracker().update([Level("p1", level, p.rpo_lag_s, message)], WALL)
    assert [(e.kind, e.level) for e in events] == [("raised", "warning")]
    assert "failed verification" in events[0].message


def test_a_newer_passing_verification_clears_it() -> None:
    s, reply = judged(caught_up(verified_point_id=7, verified_ok=False, verified_ns=T,
                                verify_detail="restore failed: undo segment 3: bad crc"))
    assert reply.policies[0].state == "degraded"
    s.heartbeat("target-1", [report_from_pb(caught_up(verified_point_id=9, verified_ok=True,
                                                      verified_ns=T + 10))], 6)
    p = s.status(6, wall_now=WALL).policies[0]
    assert (p.state, p.reason) == ("ok", "")


def test_cdpctl_status_and_health_show_it() -> None:
    _, reply = judged(caught_up(verified_point_id=7, verified_ok=False, verified_ns=T,
                                verify_detail="restore failed: bad crc", verify_every_s=60))
    doc = cstatus.status_dict(reply)
    p = doc["policies"][0]
    assert p["verified"] == {"point_id": 7, "ok": False, "time_ns": T,
                             "detail": "restore failed: bad crc", "every_s": 60.0}
    text = cstatus.render_status(doc)
    assert "VERIFIED" in text and "FAILED" in text
    assert "policy p1: restore point 7 failed verification: restore failed: bad crc" in text
    verdict = cstatus.evaluate(doc)
    assert verdict.status == "warning"
    assert any("failed verification" in x["message"] for x in verdict.problems)

    _, reply = judged(caught_up())
    doc = cstatus.status_dict(reply)
    assert doc["policies"][0]["verified"] is None
    assert cstatus.evaluate(doc).status == "ok"
