"""Failover of a consistency group at the target: every member at its point of one
checkpoint, checked byte for byte against an oracle of each member's writes; a
member failed over elsewhere refuses it and nothing changes; undo and commit of
the group; a failure of one member rolls back the others; a target killed
between two members leaves a visible "partial" group, which undo cleans up and
the same failover again finishes (also after a real SIGKILL of a target process
amid the second member's copy). The pure state table is tested alone."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_target_groups import T0, Aborted, FakeContext, two_members

from cdp_common.errors import StorageError
from cdp_common.pb.cdp.v1 import restore_pb2 as pb
from cdp_target import restore as R
from cdp_target.grouppoints import (
    GroupFailoverRefused,
    MemberFailover,
    failover_state,
    plan_failover,
    plan_finish,
)
from cdp_target.restore_service import RestoreService
from cdp_target.service import TargetService
from cdp_target.store import PolicyStore

pytestmark = pytest.mark.timeout(60)

A, B = "g..fa", "g..fb"


# ---------------------------------------------------------------- the state table

def _m(state: str = "", cid: int = 0) -> MemberFailover:
    return MemberFailover(state, cid)


@pytest.mark.parametrize(("members", "want"), [
    ({A: _m(), B: _m()}, ""),
    ({A: _m("active", 7), B: _m("active", 7)}, "active"),
    ({A: _m("active", 7), B: _m()}, "partial"),
    ({A: _m("active", 7), B: _m("active", 8)}, "partial"),
    ({A: _m("active", 0), B: _m("active", 0)}, "partial"),   # their own points
    ({A: _m("committed", 7), B: _m("active", 7)}, "committing"),
    ({A: _m("committed", 7), B: _m("committing", 7)}, "committing"),
    ({A: _m("committed", 7), B: _m("committed", 7)}, "committed"),
    ({A: _m("committed", 7), B: _m()}, "partial"),
])
def test_the_group_state_comes_from_the_members(members: dict[str, MemberFailover],
                                                want: str) -> None:
    assert failover_state(members) == want


def test_plans_of_failover_undo_and_commit() -> None:
    assert plan_failover("g", {A: _m(), B: _m()}, 7) == [A, B]
    assert plan_failover("g", {A: _m("active", 7), B: _m()}, 7) == [B]   # finishes it
    with pytest.raises(GroupFailoverRefused, match=r"g\.\.fa active at checkpoint 6"):
        plan_failover("g", {A: _m("active", 6), B: _m()}, 7)
    with pytest.raises(GroupFailoverRefused, match="already failed over"):
        plan_failover("g", {A: _m("active", 7), B: _m("active", 7)}, 7)
    assert plan_finish("g", {A: _m("active", 7), B: _m()}, "undo") == [A]
    assert plan_finish("g", {A: _m("active", 6), B: _m("active", 0)}, "undo") == [A, B]
    with pytest.raises(GroupFailoverRefused, match="not failed over"):
        plan_finish("g", {A: _m(), B: _m()}, "undo")
    with pytest.raises(GroupFailoverRefused, match="cannot be undone"):
        plan_finish("g", {A: _m("committed", 7), B: _m("active", 7)}, "undo")
    assert plan_finish("g", {A: _m("active", 7), B: _m("active", 7)}, "commit") == [A, B]
    assert plan_finish("g", {A: _m("committed", 7), B: _m("active", 7)}, "commit") == [B]
    with pytest.raises(GroupFailoverRefused, match="only partly failed over"):
        plan_finish("g", {A: _m("active", 7), B: _m()}, "commit")
    with pytest.raises(GroupFailoverRefused, match="committed already"):
        plan_finish("g", {A: _m("committed", 7), B: _m("committed", 7)}, "commit")


# ---------------------------------------------------------------- the service

class Target:
    """A temp-dir target with a group g of members g..fa (vda, vdb) and g..fb (sdc):
    both at checkpoints 11, 13, 15; g..fa alone at 12; g..fb alone at 16."""

    def __init__(self, tmp_path: Path) -> None:
        self.data = tmp_path / "data"
        self.restores = tmp_path / "restores"
        self.members = two_members(self.data, A, B)
        self.service: TargetService | None = None
        self.rs: RestoreService | None = None

    async def start(self) -> RestoreService:
        """Open the stores and load the failover state (a target (re)starting)."""
        self.service = TargetService(self.data)
        await self.service.open_existing()
        self.rs = RestoreService(self.service, self.restores)
        await self.rs.attach()
        return self.rs

    async def stop(self) -> None:
        if self.rs is not None:
            await self.rs.close()
        if self.service is not None:
            await self.service.close()
        self.rs = self.service = None

    def rt(self, name: str) -> Any:
        assert self.service is not None
        return self.service.policies[name]

    def state(self, name: str) -> str:
        assert self.rs is not None
        return self.rs.failovers[name].state


@pytest.fixture
async def target(tmp_path: Path) -> AsyncIterator[Target]:
    t = Target(tmp_path)
    await t.start()
    yield t
    await t.stop()


async def _collect(it: AsyncIterator[pb.RestoreProgress]) -> pb.RestoreDone:
    done = None
    async for msg in it:
        if msg.phase == "done":
            done = msg.done
    assert done is not None
    return done


CTX: Any = FakeContext()


async def _failover(rs: RestoreService, policy: str, **kw: Any) -> pb.RestoreDone:
    return await _collect(rs.Failover(pb.RestoreRequest(policy=policy, **kw), CTX))


async def _listed_state(rs: RestoreService, policy: str = "g") -> str:
    return (await rs.List(pb.ListPointsRequest(policy=policy), CTX)).failover_state


def _images_equal_oracle(t: Target, cid: int, images: dict[str, Path]) -> None:
    want = {d: img for m in t.members.values() for d, img in m.at[cid].items()}
    assert set(images) == set(want)
    for disk, img in want.items():
        assert images[disk].read_bytes() == img, (cid, disk)


async def test_group_failover_brings_every_member_up_at_the_checkpoint(
        target: Target) -> None:
    rs = target.rs
    assert rs is not None
    done = await _failover(rs, "g", point_id=13)
    assert done.point.checkpoint_id == 13 and done.consistent
    assert [m.policy for m in done.point.members] == [A, B]
    images = {i.disk: Path(i.path) for i in done.images}
    _images_equal_oracle(target, 13, images)
    for name in (A, B):   # each member's own failover, in its own store directory
        assert target.state(name) == "active"
        assert "is failed over" in target.rt(name).refusal
        doc = json.loads((target.data / name / R.FAILOVER_FILE).read_text())
        assert doc["checkpoint_id"] == 13 and doc["state"] == "active"
        point = target.rt(name).local.undo.catalog.point(doc["point_id"])
        assert point.checkpoint_id == 13
    assert all(target.data / n / R.FAILOVER_DIR in images[d].parents
               for n, d in ((A, "vda"), (A, "vdb"), (B, "sdc")))
    assert await _listed_state(rs) == "active"
    # a second failover is refused; the state survives a restart
    with pytest.raises(Aborted, match="already failed over") as err:
        await _failover(rs, "g", latest=True)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    await target.stop()
    rs = await target.start()
    assert await _listed_state(rs) == "active"
    assert all("is failed over" in target.rt(n).refusal for n in (A, B))
    _images_equal_oracle(target, 13, images)


async def test_by_time_and_latest_pick_one_checkpoint_for_all(target: Target) -> None:
    rs = target.rs
    assert rs is not None
    done = await _failover(rs, "g", latest=True)
    assert done.point.checkpoint_id == 15
    _images_equal_oracle(target, 15, {i.disk: Path(i.path) for i in done.images})
    await rs.FailoverUndo(pb.FailoverRequest(policy="g"), CTX)
    done = await _failover(rs, "g", time_ns=int((T0 + 7.0) * 1e9))
    assert done.point.checkpoint_id == 11
    _images_equal_oracle(target, 11, {i.disk: Path(i.path) for i in done.images})


async def test_a_member_failed_over_elsewhere_refuses_and_nothing_changes(
        target: Target) -> None:
    rs = target.rs
    assert rs is not None
    own = await _failover(rs, A, point_id=target.rt(A).local.undo.catalog
                          .by_checkpoint[12].id)   # a checkpoint only g..fa has
    before = (target.data / A / R.FAILOVER_FILE).read_bytes()
    assert await _listed_state(rs) == "partial"
    with pytest.raises(Aborted, match=r"g\.\.fa active at checkpoint 12") as err:
        await _failover(rs, "g", point_id=13)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert (target.data / A / R.FAILOVER_FILE).read_bytes() == before
    assert all(Path(i.path).exists() for i in own.images)
    assert target.state(B) == "" and not (target.data / B / R.FAILOVER_DIR).exists()
    assert target.rt(B).refusal == ""   # still replicating
    with pytest.raises(Aborted, match="only partly failed over"):
        await rs.FailoverCommit(pb.FailoverRequest(policy="g"), CTX)
    assert target.state(A) == "active" and target.state(B) == ""
    # the member failed over at the group's checkpoint: kept, the group completes
    await rs.FailoverUndo(pb.FailoverRequest(policy=A), CTX)
    await _failover(rs, A, point_id=target.rt(A).local.undo.catalog.by_checkpoint[15].id)
    done = await _failover(rs, "g", point_id=15)
    _images_equal_oracle(target, 15, {i.disk: Path(i.path) for i in done.images})
    assert await _listed_state(rs) == "active"


async def test_undo_and_commit_of_a_group(target: Target) -> None:
    rs = target.rs
    assert rs is not None
    done = await _failover(rs, "g", point_id=13)
    images = [Path(i.path) for i in done.images]
    reply = await rs.FailoverUndo(pb.FailoverRequest(policy="g"), CTX)
    assert reply.state == "" and reply.point.checkpoint_id == 13
    assert [m.policy for m in reply.point.members] == [A, B]
    assert sorted(i.disk for i in reply.images) == ["sdc", "vda", "vdb"]
    assert not any(p.exists() for p in images)
    for name in (A, B):
        assert target.state(name) == "" and target.rt(name).refusal == ""
        assert not (target.data / name / R.FAILOVER_FILE).exists()
    assert await _listed_state(rs) == ""
    with pytest.raises(Aborted, match="not failed over") as err:
        await rs.FailoverUndo(pb.FailoverRequest(policy="g"), CTX)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION

    # again, write at DR, commit: the failover disks are every member's replicas now
    done = await _failover(rs, "g", point_id=13)
    written = {i.disk: Path(i.path) for i in done.images}
    with open(written["sdc"], "r+b") as f:
        f.write(b"PRODUCTION AT DR")
    want = {d: bytearray(img) for m in target.members.values() for d, img in m.at[13].items()}
    want["sdc"][:16] = b"PRODUCTION AT DR"
    reply = await rs.FailoverCommit(pb.FailoverRequest(policy="g"), CTX)
    assert reply.state == "committed" and len(reply.images) == 3
    for name, m in target.members.items():
        assert target.state(name) == "committed" and "is frozen" in target.rt(name).refusal
        store = target.rt(name).local
        for i, spec in m.disks.items():
            assert store.replica_path(i).read_bytes() == want[spec.name], (name, spec.name)
    assert await _listed_state(rs) == "committed"
    with pytest.raises(Aborted, match="cannot be undone"):
        await rs.FailoverUndo(pb.FailoverRequest(policy="g"), CTX)
    with pytest.raises(Aborted, match="committed already"):
        await rs.FailoverCommit(pb.FailoverRequest(policy="g"), CTX)


async def test_a_failing_member_rolls_back_the_others(
        target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    rs = target.rs
    assert rs is not None
    real = R.Failover.start

    def start(self: R.Failover, select: Callable[[], Any], progress: Any = None) -> Any:
        if self.store.dir.name == B:
            raise StorageError("no space left on the failover disk")
        return real(self, select, progress)
    monkeypatch.setattr(R.Failover, "start", start)
    with pytest.raises(Aborted, match="no space left") as err:
        await _failover(rs, "g", point_id=13)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    for name in (A, B):
        assert target.state(name) == "" and target.rt(name).refusal == ""
        assert not (target.data / name / R.FAILOVER_FILE).exists()
        assert not (target.data / name / R.FAILOVER_DIR).exists()
    assert await _listed_state(rs) == ""


async def _killed_between_members(target: Target) -> None:
    """The disk state a SIGKILL leaves when it hits a group failover at checkpoint 13
    after g..fa's failover.json, while g..fb's images are being written."""
    await target.stop()
    store = PolicyStore.open(target.data / A, target.members[A].disks, apply=False)
    try:
        R.Failover(store).start(lambda: store.undo.catalog.by_checkpoint[13])
    finally:
        store.close()
    half = target.data / B / R.FAILOVER_DIR
    half.mkdir()
    (half / "sdc.img.partial").write_bytes(b"half written")


async def test_a_crash_between_members_is_partial_and_undo_cleans_it_up(
        target: Target, caplog: pytest.LogCaptureFixture) -> None:
    await _killed_between_members(target)
    with caplog.at_level(logging.ERROR, logger="target.restore"):
        rs = await target.start()
    assert any("failover is partial" in r.getMessage() and "g..fa active at checkpoint 13"
               in r.getMessage() for r in caplog.records), caplog.text
    assert await _listed_state(rs) == "partial"
    assert target.state(A) == "active" and "is failed over" in target.rt(A).refusal
    assert target.state(B) == "" and target.rt(B).refusal == ""
    assert not (target.data / B / R.FAILOVER_DIR).exists()   # the half copy is gone
    with pytest.raises(Aborted, match="only partly failed over"):
        await rs.FailoverCommit(pb.FailoverRequest(policy="g"), CTX)
    with pytest.raises(Aborted, match=r"g\.\.fa active at checkpoint 13"):
        await _failover(rs, "g", point_id=15)
    reply = await rs.FailoverUndo(pb.FailoverRequest(policy="g"), CTX)
    assert reply.state == "" and [m.policy for m in reply.point.members] == [A]
    assert await _listed_state(rs) == ""
    assert target.state(A) == "" and target.rt(A).refusal == ""
    assert not (target.data / A / R.FAILOVER_DIR).exists()


async def test_a_crash_between_members_is_finished_by_the_same_failover(
        target: Target) -> None:
    await _killed_between_members(target)
    rs = await target.start()
    kept = (target.data / A / R.FAILOVER_FILE).read_bytes()
    done = await _failover(rs, "g", point_id=13)
    assert (target.data / A / R.FAILOVER_FILE).read_bytes() == kept   # not redone
    _images_equal_oracle(target, 13, {i.disk: Path(i.path) for i in done.images})
    assert await _listed_state(rs) == "active"


KILLER = """
import asyncio, os, signal, sys
from pathlib import Path
from cdp_common.pb.cdp.v1 import restore_pb2 as pb
from cdp_target import restore as R
from cdp_target.restore_service import RestoreService
from cdp_target.service import TargetService

real = R.Failover.start

def start(self, select, progress=None):
    def kill_at_once(phase, done, total):   # the second member's images half written
        if self.store.dir.name == "g..fb":
            os.kill(os.getpid(), signal.SIGKILL)
    return real(self, select, kill_at_once)
R.Failover.start = start

class Ctx:
    async def abort(self, code, details, trailing_metadata=()):
        raise SystemExit(f"{code}: {details}")

async def main():
    service = TargetService(Path(sys.argv[1]))
    await service.open_existing()
    rs = RestoreService(service, Path(sys.argv[2]))
    await rs.attach()
    async for _ in rs.Failover(pb.RestoreRequest(policy="g", point_id=13), Ctx()):
        pass
    raise SystemExit("the failover ended: it should have been killed")
asyncio.run(main())
"""


async def test_a_target_killed_between_members_leaves_a_partial_group(
        target: Target) -> None:
    """A real SIGKILL of a target process during the second member's copy."""
    await target.stop()
    done = subprocess.run([sys.executable, "-c", KILLER, str(target.data),
                           str(target.restores)], capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == -9, done.stderr
    assert (target.data / A / R.FAILOVER_FILE).exists()
    assert not (target.data / B / R.FAILOVER_FILE).exists()
    assert list((target.data / B / R.FAILOVER_DIR).glob("*.partial"))
    rs = await target.start()
    assert await _listed_state(rs) == "partial"
    assert not (target.data / B / R.FAILOVER_DIR).exists()
    reply = await rs.FailoverUndo(pb.FailoverRequest(policy="g"), CTX)
    assert reply.state == "" and [m.policy for m in reply.point.members] == [A]
    assert await _listed_state(rs) == ""
    assert all(target.rt(n).refusal == "" for n in (A, B))
