"""The pure steps of `cdpctl failover --planned` (cdpctl.planned): when a frozen
policy or group is drained, and which point holds every captured write."""

from __future__ import annotations

from typing import Any

import pytest

from cdp_common.pb.cdp.v1 import restore_pb2 as pb
from cdpctl import planned

pytestmark = pytest.mark.timeout(10)


def row(name: str, captured: int, applied: int, frozen: bool = True,
        group: str | None = None) -> dict[str, Any]:
    return {"name": name, "captured_seq": captured, "applied_seq": applied,
            "frozen": frozen, "group": group}


def test_member_rows_of_a_group_and_of_a_policy() -> None:
    status = {"policies": [row("g", 0, 0, group=None), row("g..f1", 5, 5, group="g"),
                           row("g..f2", 7, 7, group="g"), row("p", 3, 3)]}
    assert [r["name"] for r in planned.member_rows(status, "g")] == ["g..f1", "g..f2"]
    assert [r["name"] for r in planned.member_rows(status, "p")] == ["p"]
    with pytest.raises(planned.PlannedFailoverError, match="not in the coordinator"):
        planned.member_rows(status, "nope")


def test_drained_needs_every_filter_frozen_and_everything_applied() -> None:
    assert "not reported the freeze" in planned.drained([row("a", 5, 5, frozen=False)])
    assert "applied seq 4 of 5" in planned.drained([row("a", 5, 5), row("b", 5, 4)])
    assert planned.drained([row("a", 5, 5), row("b", 9, 9)]) == ""


def test_final_point_of_a_policy_holds_the_last_captured_seq() -> None:
    points = [pb.PointInfo(id=1, last_seq=3), pb.PointInfo(id=2, last_seq=5)]
    assert planned.final_point(points, {"p": 5}, "p").id == 2
    assert planned.final_point(points, {"p": 6}, "p") is None


def test_final_point_of_a_group_needs_every_member_past_its_seq() -> None:
    def gp(cid: int, a: int, b: int) -> pb.PointInfo:
        return pb.PointInfo(id=cid, checkpoint_id=cid, members=[
            pb.MemberPoint(policy="g..f1", last_seq=a), pb.MemberPoint(policy="g..f2",
                                                                      last_seq=b)])
    points = [gp(10, 4, 4), gp(11, 6, 8), gp(12, 7, 8)]
    assert planned.final_point(points, {"g..f1": 6, "g..f2": 8}, "g").id == 12
    assert planned.final_point(points, {"g..f1": 5, "g..f2": 9}, "g") is None
    assert planned.final_point(points, {"g..f1": 6, "g..f2": 8, "g..f3": 1}, "g") is None
