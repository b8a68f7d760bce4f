"""Consistency-group checkpoints, piece by piece: the filter's hold gate and
marker, the shipper answering the proxy's commands (in-memory sink), the
cutter ending deltas at markers, and the proxy's two-phase rounds over fake
member links (every outcome: marked, refused, late, missing, abandoned hold).
Also the stream metadata that travels the same way: a gap's reason, carried
by the cutter and bound into the frame's associated data."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import shipperfixtures
from shipperfixtures import eventually

from cdp_common import crypto, records
from cdp_common.errors import AuthenticationError, FormatError
from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
from cdp_common.pb.cdp.v1 import replication_pb2 as rpb
from cdp_filter.memsink import MemoryRecordSink
from cdp_filter.sink import Checkpoint
from cdp_proxy.cutter import IntervalCutter
from cdp_proxy.groups import Group

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[shipperfixtures.Rig]:
    r = shipperfixtures.Rig(tmp_path, sink=MemoryRecordSink())
    yield r
    await r.close()


def journal_records(rig: shipperfixtures.Rig) -> list[records.Record]:
    data, _last = rig.journal.read_batch(0, 1 << 30)
    return list(records.decode_all(data))


# ---------------------------------------------------------------- the filter's gate

async def test_hold_blocks_new_writes_until_mark_and_marker_sits_between(
        rig: shipperfixtures.Rig) -> None:
    rt, d = rig.rt, rig.disk
    await rt.write(d, 0, b"a" * 512)
    assert rt.hold(77, 5.0) == ""
    blocked = asyncio.create_task(rt.write(d, 4096, b"b" * 512))
    await asyncio.sleep(0.05)
    assert not blocked.done(), "a write took a seq while the checkpoint was held"
    assert rig.journal.last_seq == 1
    seq = rt.mark(77)
    assert seq == 2
    await asyncio.wait_for(blocked, 2)
    recs = journal_records(rig)
    assert [(r.seq, r.flags, r.checkpoint_id) for r in recs] == [
        (1, 0, 0), (2, records.FLAG_CHECKPOINT, 77), (3, 0, 0)]
    assert recs[1].is_marker and recs[1].length == 0 and rt.held_id == 0


async def test_expired_hold_releases_writers_and_ignores_a_late_mark(
        rig: shipperfixtures.Rig) -> None:
    rt, d = rig.rt, rig.disk
    assert rt.hold(5, 0.05) == ""
    blocked = asyncio.create_task(rt.write(d, 0, b"x" * 512))
    await asyncio.wait_for(blocked, 2)          # released by the timeout alone
    assert rt.mark(5) == 0                      # abandoned: no marker
    assert all(not r.is_marker for r in journal_records(rig))


async def test_release_and_a_newer_hold_abandon_the_older(rig: shipperfixtures.Rig) -> None:
    rt = rig.rt
    assert rt.hold(1, 5.0) == ""
    assert rt.hold(2, 5.0) == ""
    assert rt.mark(1) == 0 and rt.held_id == 2
    rt.release(2)
    assert rt.held_id == 0 and rt.mark(2) == 0
    assert rig.journal.last_seq == 0


async def test_hold_refused_out_of_range_and_when_closing(rig: shipperfixtures.Rig) -> None:
    assert "out of range" in rig.rt.hold(0, 1.0)
    assert "out of range" in rig.rt.hold(1 << 64, 1.0)
    rig.rt.close()
    assert "shutting down" in rig.rt.hold(3, 1.0)


# ---------------------------------------------------------------- the shipper

def assignment() -> cpb.Assignment:
    return cpb.Assignment(
        policy="p", epoch=1, source_proxy=cpb.Endpoint(node_id="sp", address="mem:1"),
        target_proxy=cpb.Endpoint(node_id="tp", address="mem:2"),
        target=cpb.Endpoint(node_id="t", address="mem:3"), rpo_interval_s=2.0)


async def test_shipper_answers_hold_and_ships_the_marker(rig: shipperfixtures.Rig) -> None:
    sink = rig.sink
    assert isinstance(sink, MemoryRecordSink)
    rig.write(2)
    rig.shipper.set_assignment(assignment())
    rig.start()
    await eventually(lambda: len(sink.sessions) == 1 and sink.downstream.applied == [1, 2])
    session = sink.sessions[0]
    session.command(Checkpoint("hold", 9, 1.0))
    await eventually(lambda: len(session.held) == 1)
    assert session.held[0] == rpb.CheckpointHeld(checkpoint_id=9)
    assert rig.rt.held_id == 9
    session.command(Checkpoint("mark", 9))
    await eventually(lambda: 3 in sink.downstream.received)
    marker = sink.downstream.received[3]
    assert marker.flags == records.FLAG_CHECKPOINT and marker.checkpoint_id == 9
    assert rig.rt.held_id == 0


# ---------------------------------------------------------------- the cutter

def rec(seq: int, t: int, off: int = 0, data: bytes = b"z" * 8, flags: int = 0) -> records.Record:
    return records.Record(seq, t, 0, off, data, flags)


def test_cutter_ends_a_delta_at_each_marker_with_its_id() -> None:
    c = IntervalCutter(2.0, 1 << 20, checkpoints=True, disk_sizes={0: 1 << 20})
    assert c.feed(rec(1, 10), 0.0) is None
    d = c.feed(rec(2, 20, flags=records.FLAG_CHECKPOINT, off=555, data=b""), 0.1)
    assert d is not None and (d.first_seq, d.last_seq, d.checkpoint_id) == (1, 2, 555)
    assert d.newest_time_ns == 20 and len(d.extents) == 1
    # an idle interval still makes the member's part of a group point
    idle = c.feed(rec(3, 30, flags=records.FLAG_CHECKPOINT, off=556, data=b""), 0.2)
    assert idle is not None and (idle.first_seq, idle.last_seq, idle.checkpoint_id,
                                 idle.extents, idle.newest_time_ns) == (3, 3, 556, [], 30)


def test_group_member_time_cuts_wait_three_intervals() -> None:
    c = IntervalCutter(1.0, 1 << 20, checkpoints=True)
    c.feed(rec(1, 0), 0.0)
    assert c.tick(2.9) is None
    d = c.tick(3.0)
    assert d is not None and d.checkpoint_id == 0
    plain = IntervalCutter(1.0, 1 << 20)
    plain.feed(rec(1, 0), 0.0)
    assert plain.tick(1.0) is not None


@pytest.mark.parametrize("disk_id,off,data", [(1, 5, b""), (0, 0, b""), (0, 5, b"x")])
def test_cutter_refuses_a_malformed_marker(disk_id: int, off: int, data: bytes) -> None:
    c = IntervalCutter(1.0, 1 << 20, checkpoints=True)
    with pytest.raises(FormatError, match="CHECKPOINT"):
        c.feed(records.Record(1, 1, disk_id, off, data, records.FLAG_CHECKPOINT), 0.0)


# ---------------------------------------------------------------- the proxy's rounds

class FakeLink:
    """A member's session: answers holds as its filter would (or not)."""

    def __init__(self, policy: str, group: list[Group], answer: str = "held") -> None:
        self.policy = policy
        self.group = group
        self.answer = answer
        self.sent: list[str] = []

    async def send_control(self, response: rpb.ShipResponse) -> None:
        body = response.WhichOneof("body")
        self.sent.append(body or "")
        if body == "hold" and self.answer != "silent":
            cid = response.hold.checkpoint_id
            refused = self.answer == "refuse"
            asyncio.get_running_loop().call_soon(
                self.group[0].on_held, self.policy,
                rpb.CheckpointHeld(checkpoint_id=cid, refused=refused,
                                   reason="tracking" if refused else ""))


def group_with(answers: dict[str, str]) -> tuple[Group, dict[str, FakeLink]]:
    holder: list[Group] = []
    g = Group("G", tuple(sorted(answers)), 60.0, clock=lambda: 1000)
    holder.append(g)
    links = {m: FakeLink(m, holder, a) for m, a in answers.items()}
    g.links.update(links)   # joined without starting the timed loop
    return g, links


async def test_round_marks_only_once_every_member_held() -> None:
    g, links = group_with({"G..f1": "held", "G..f2": "held"})
    assert await g.checkpoint()
    assert all(link.sent == ["hold", "mark"] for link in links.values())
    assert g.last_id == 1000 and g.marked == 1
    assert await g.checkpoint() and g.last_id == 1001   # ids grow even on a stuck clock


@pytest.mark.parametrize("answer,problem", [("refuse", "refused: tracking"),
                                            ("silent", "no answer from G..f2")])
async def test_round_is_abandoned_when_a_member_refuses_or_is_late(answer: str,
                                                                   problem: str) -> None:
    g, links = group_with({"G..f1": "held", "G..f2": answer})
    g.wait_s = 0.05
    assert not await g.checkpoint()
    assert all(link.sent == ["hold", "release"] for link in links.values())
    assert "mark" not in links["G..f1"].sent and g.abandoned == 1
    assert problem in g.last_problem


async def test_no_round_while_a_member_has_no_session() -> None:
    holder: list[Group] = []
    g = Group("G", ("G..f1", "G..f2"), 0.05)
    holder.append(g)
    link = FakeLink("G..f1", holder)
    g.join(link)
    await asyncio.sleep(0.2)
    assert link.sent == [] and "G..f2 has no session" in g.last_problem
    assert g.leave(link)


# ---------------------------------------------------------------- a gap's reason

def test_the_cutter_carries_the_gap_reason_the_filter_gave() -> None:
    c = IntervalCutter(2.0, 1 << 20)
    c.note_gap(100, 7, "operator")
    c.feed(rec(8, 10), 0.0, skip_ok=True)
    d = c.cut()
    assert d is not None and (d.gap_begin_time_ns, d.gap_after_seq, d.gap_reason) == (
        100, 7, "operator")
    c.feed(rec(9, 11), 0.1)
    plain = c.cut()
    assert plain is not None and plain.gap_reason == ""   # no gap, no reason


def test_the_gap_reason_is_authenticated() -> None:
    key = bytes(32)
    sid = bytes(16)
    h = crypto.FrameHeader(1, 2, 0, True, 5, 100, 0, 0, 0, 0, "operator")
    sealed = crypto.FrameSealer("p", sid, key).seal(h, b"x" * 64)
    opener = crypto.FrameOpener("p", sid, key)
    assert opener.open(h, sealed) == b"x" * 64
    forged = crypto.FrameHeader(1, 2, 0, True, 5, 100, 0, 0, 0, 0, "overflow")
    with pytest.raises(AuthenticationError, match="tampered frame"):
        crypto.FrameOpener("p", sid, key).open(forged, sealed)
