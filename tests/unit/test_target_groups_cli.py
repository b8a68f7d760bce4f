"""cdpctl's view of a consistency group's restore points (pure helpers)."""

from __future__ import annotations

from cdp_common.pb.cdp.v1 import restore_pb2 as pb
from cdpctl.restore import point_dict, render_points

S = 1_000_000_000


def _group_point(cid: int) -> pb.PointInfo:
    return pb.PointInfo(id=cid, kind="short", time_ns=cid * S, size_bytes=10,
                        checkpoint_id=cid,
                        members=[pb.MemberPoint(policy="g..a", point_id=30 + cid,
                                                last_seq=30 + cid, time_ns=cid * S),
                                 pb.MemberPoint(policy="g..b", point_id=cid, last_seq=cid,
                                                time_ns=cid * S)])


def test_a_group_point_is_consistent_when_every_member_point_is() -> None:
    gaps = {"g..a": [{"begin_seq": 40, "end_seq": 0, "reason": "overflow"}]}
    ok, bad = (point_dict(_group_point(c), [], gaps) for c in (5, 12))
    assert ok["consistent"] and ok["checkpoint_id"] == 5
    assert [m["point_id"] for m in ok["members"]] == [35, 5]
    assert not bad["consistent"] and bad["gap"] == "g..a: overflow"
    text = render_points([ok, bad])
    assert "MEMBERS" in text and "g..a:35 g..b:5" in text and "LAST SEQ" not in text


def test_a_members_points_show_their_checkpoints() -> None:
    pts = [point_dict(pb.PointInfo(id=i, kind="short", last_seq=i,
                                   checkpoint_id=700 if i == 2 else 0), []) for i in (1, 2)]
    text = render_points(pts)
    assert "CHECKPOINT" in text and "700" in text
    plain = render_points([point_dict(pb.PointInfo(id=1, kind="long", last_seq=1), [])])
    assert "CHECKPOINT" not in plain and "MEMBERS" not in plain
