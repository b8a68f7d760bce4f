"""Consistency groups at the target: checkpoint ids on restore points (delta file,
catalog log, old formats still read), retention that keeps checkpoint points in
a group member, the group points (intersection of the members'), and a group
restore checked byte for byte against an oracle of the writes."""

from __future__ import annotations

import asyncio
import random
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from cdp_common.delta import Extent, encode_chunks
from cdp_common.errors import FormatError
from cdp_common.pb.cdp.v1 import replication_pb2 as rpb
from cdp_common.pb.cdp.v1 import restore_pb2 as pb
from cdp_common.records import crc32c
from cdp_target import catalogfile as CF
from cdp_target import points as P
from cdp_target.daemon import checkpoint_of
from cdp_target.deltafile import DELTA_MAGIC, HEADER, decode_delta_file, encode_delta_file
from cdp_target.grouppoints import GroupPointNotFound, group_points, pick
from cdp_target.restore_service import RestoreService
from cdp_target.service import TargetService
from cdp_target.store import DiskSpec, PolicyStore
from cdp_target.undostore import CATALOG_FILE, UndoStore

pytestmark = pytest.mark.timeout(60)

S = 1_000_000_000


# ---------------------------------------------------------------- delta file

def test_a_checkpoint_delta_is_version_2_and_others_stay_version_1() -> None:
    plain = encode_delta_file(1, 4, [b"ab"], newest_time_ns=7)
    marked = encode_delta_file(1, 4, [b"ab"], newest_time_ns=7, checkpoint_id=99)
    assert plain[4] == 1 and marked[4] == 2 and len(marked) == len(plain) + 8
    info, chunks = decode_delta_file(marked)
    assert (info.checkpoint_id, info.newest_time_ns, chunks) == (99, 7, [b"ab"])
    assert decode_delta_file(plain)[0].checkpoint_id == 0
    for i in range(len(marked)):   # every flipped byte is refused
        bad = bytearray(marked)
        bad[i] ^= 0x10
        with pytest.raises(FormatError):
            decode_delta_file(bytes(bad))


def test_a_version_2_file_without_a_checkpoint_or_of_an_undo_is_malformed() -> None:
    raw = bytearray(encode_delta_file(1, 4, [b"ab"], checkpoint_id=5))
    raw[-12:-4] = bytes(8)   # checkpoint 0, CRC made right again
    raw[-4:] = crc32c(bytes(raw[:-4])).to_bytes(4, "little")
    with pytest.raises(FormatError, match="names no checkpoint"):
        decode_delta_file(bytes(raw))
    undo = bytearray(encode_delta_file(1, 4, [b"ab"], checkpoint_id=5))
    undo[:HEADER.size] = HEADER.pack(DELTA_MAGIC, 2, 1, 0, 1, 4)
    undo[-4:] = crc32c(bytes(undo[:-4])).to_bytes(4, "little")
    with pytest.raises(FormatError, match="must be a delta"):
        decode_delta_file(bytes(undo))


# ---------------------------------------------------------------- catalog log

def _catalog() -> P.Catalog:
    cat = P.Catalog()
    for i in range(1, 9):
        cat = cat.with_applied(i - 1, i, i * S, None if i == 1 else 100 + i,
                               checkpoint_id=1000 + i if i % 3 == 0 else 0)
    return cat


def test_catalog_log_round_trip_keeps_checkpoint_ids(tmp_path: Path) -> None:
    cat = _catalog()
    assert [p.checkpoint_id for p in cat.points] == [0, 0, 1003, 0, 0, 1006, 0, 0]
    log = CF.CatalogLog(tmp_path / CATALOG_FILE)
    log.compact(cat)
    more = cat.with_applied(8, 9, 9 * S, 10, checkpoint_id=1009)
    log.append(CF.diff(cat, more))
    again = CF.CatalogLog(tmp_path / CATALOG_FILE)
    assert again.load() == more and again.version == CF.VERSION == 3
    assert more.by_checkpoint[1009].last_seq == 9 and more.newest_checkpoint is more.points[-1]
    patch = CF.snapshot(more)
    body = memoryview(CF.encode_record(patch))[CF.FRAME_SIZE:]
    assert CF.decode_body(body, "x") == patch


def _v2_log(cat: P.Catalog) -> bytes:
    """A points.log as the build before checkpoints wrote it (version 2)."""
    parts = [CF.BODY_HEAD.pack(CF.OP_PATCH, CF.FLAG_CLEAR, 0, 0, len(cat.points), 0,
                               len(cat.segments))]
    parts += [struct.pack("<QQBB", p.last_seq, p.time_ns, (P.SHORT, P.LONG).index(p.kind),
                          int(p.on_demand)) for p in cat.points]
    parts += [CF.PUT_SEG.pack(s.lo, s.hi, s.size_bytes) for s in cat.segments]
    body = b"".join(parts)
    length = len(body).to_bytes(4, "little")
    return (CF.HEADER.pack(CF.MAGIC, 2, 0, 0) + length + crc32c(length).to_bytes(4, "little")
            + crc32c(length, body).to_bytes(4, "little") + body)


def test_an_old_version_2_log_still_reads_and_is_upgraded_at_the_first_change(
        tmp_path: Path) -> None:
    old = P.Catalog(tuple(P.Point(p.last_seq, p.time_ns, p.kind, p.on_demand)
                          for p in _catalog().points), _catalog().segments)
    (tmp_path / CATALOG_FILE).write_bytes(_v2_log(old))
    undo = UndoStore(tmp_path, now_ns=lambda: 9 * S)
    undo.recover(applied_seq=8, newest_time_ns=8 * S)
    assert undo.catalog == old and undo.log.version == 2
    assert all(p.checkpoint_id == 0 for p in undo.catalog.points)
    undo.after_apply(8, 9, 9 * S, 10, checkpoint_id=77)   # compacts: a version 3 file
    assert (tmp_path / CATALOG_FILE).read_bytes()[4] == 3
    again = UndoStore(tmp_path)
    again.recover(applied_seq=9, newest_time_ns=9 * S)
    assert again.catalog.points[-1].checkpoint_id == 77
    assert again.catalog.points[:-1] == old.points


# ---------------------------------------------------------------- retention

def _member(times_s: list[float], checkpoints: dict[int, int]) -> P.Catalog:
    """Points 1..n at these times; point i ends at checkpoint checkpoints[i] (if any)."""
    cat = P.Catalog()
    for i, t in enumerate(times_s, start=1):
        cat = cat.with_applied(i - 1, i, int(t * S), None if i == 1 else 10,
                               checkpoint_id=checkpoints.get(i, 0))
    return cat


def test_a_group_member_promotes_checkpoint_points_only() -> None:
    r = P.Retention(short_term_retention_s=30, long_term_interval_s=100,
                    long_term_retention_s=10_000, compact_run=4)
    # a point every 2 s, a checkpoint every 5th point; the 100 s buckets are cut at
    # 100, 200, ... and the first point after each edge is NOT a checkpoint
    times = [1000 + 2 * i + 1 for i in range(160)]
    ck = {i: 5000 + i for i in range(5, 161, 5)}
    cat = _member(times, ck)
    plan = P.plan_retention(cat, int(times[-1] * S), r, group=True)
    longs = [p for p in plan.catalog.points if p.kind == P.LONG]
    assert longs and all(p.checkpoint_id for p in longs)
    # not a group member: the first point after the interval, checkpoint or not
    plain = P.plan_retention(cat, int(times[-1] * S), r)
    assert any(not p.checkpoint_id for p in plain.catalog.points if p.kind == P.LONG)
    # kept points keep their checkpoint ids through the merges
    assert plan.merges
    kept = {p.last_seq: p.checkpoint_id for p in plan.catalog.points}
    assert all(kept[s] == ck.get(s, 0) for s in kept)
    plan.catalog.check()


def test_skewed_members_share_a_long_term_checkpoint_in_every_bucket() -> None:
    r = P.Retention(short_term_retention_s=20, long_term_interval_s=60,
                    long_term_retention_s=100_000)
    rng = random.Random(5)
    for _ in range(30):
        n = 300
        base = [1000.0 + 3 * i + rng.random() for i in range(n)]   # a checkpoint every ~3 s
        skew_b = [t + rng.uniform(-1.4, 1.4) for t in base]        # less than the spacing
        skew_b = [max(skew_b[: i + 1]) for i in range(n)]          # times never decrease
        ck = {i: 70_000 + i for i in range(1, n + 1)}
        now = int((base[-1] + 5) * S)
        longs = []
        for times in (base, skew_b):
            plan = P.plan_retention(_member(times, ck), now, r, group=True)
            longs.append({p.checkpoint_id for p in plan.catalog.points if p.kind == P.LONG})
        shared = longs[0] & longs[1]
        # at every bucket edge (as one member sees it) both promoted the same
        # checkpoint: the first of the bucket or the one before it
        edges = [i for i in range(2, n + 1) if base[i - 1] // 60 != base[i - 2] // 60]
        assert edges
        for i in edges:
            assert ck[i] in shared or ck[i - 1] in shared, i


# ---------------------------------------------------------------- group points

def test_group_points_are_the_checkpoints_every_member_has() -> None:
    a = _member([10, 20, 30, 40, 50], {2: 7, 3: 8, 5: 9})
    b = _member([11, 21, 31, 41], {1: 6, 2: 7, 4: 9})       # no 8: it refused that one
    c = _member([12, 22, 32], {1: 7, 3: 9})
    gps = group_points({"g..a": a, "g..b": b, "g..c": c})
    assert [gp.checkpoint_id for gp in gps] == [7, 9]
    nine = gps[1]
    assert [(n, p.last_seq) for n, p in nine.members] == [("g..a", 5), ("g..b", 4),
                                                          ("g..c", 3)]
    assert nine.time_ns == 50 * S and nine.id == 9
    assert pick("g", gps, latest=True) is nine
    assert pick("g", gps, point_id=7) is gps[0]
    assert pick("g", gps, time_ns=49 * S) is gps[0]
    with pytest.raises(GroupPointNotFound):
        pick("g", gps, point_id=8)
    with pytest.raises(GroupPointNotFound):
        pick("g", gps, time_ns=5 * S)
    assert group_points({"g..a": a, "g..z": P.Catalog()}) == []


# ---------------------------------------------------------------- the service

SIZE = 64 * 1024
T0 = time.time() - 3600   # within the default short-term retention: nothing expires


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code


class FakeContext:
    def peer(self) -> str:
        return "ipv4:192.0.2.1:5000"

    async def abort(self, code: grpc.StatusCode, details: str,
                    trailing_metadata: object = ()) -> None:
        raise Aborted(code, details)


class Member:
    """A member store fed with random deltas, and its images after each point."""

    def __init__(self, data_dir: Path, name: str, disks: dict[int, DiskSpec],
                 seed: int) -> None:
        self.dir = data_dir / name
        self.disks = disks
        self.rng = random.Random(seed)
        self.images = {i: bytearray(d.size_bytes) for i, d in disks.items()}
        self.at: dict[int, dict[str, bytes]] = {}   # checkpoint id -> disk name -> bytes
        self.seq = 0
        self.store = PolicyStore.open(self.dir, disks, apply=False)

    def delta(self, t_s: float, checkpoint_id: int = 0) -> None:
        ext = []
        for disk, spec in self.disks.items():
            for blk in sorted(self.rng.sample(range(spec.size_bytes // 4096), 2)):
                ext.append(Extent(disk, blk * 4096, 4096, self.rng.randbytes(4096)))
        first, last = self.seq + 1, self.seq + 3
        self.store.begin(first, last, checkpoint_id)
        for chunk in encode_chunks(ext, 8192):
            self.store.add_chunk(chunk)
        self.store.commit(int(t_s * S))
        self.store.apply_pending()
        self.seq = last
        for e in ext:
            assert e.data is not None
            self.images[e.disk_id][e.offset:e.offset + e.length] = e.data
        if checkpoint_id:
            self.at[checkpoint_id] = {self.disks[i].name: bytes(img)
                                      for i, img in self.images.items()}


async def _collect(it: AsyncIterator[pb.RestoreProgress]) -> pb.RestoreDone:
    done = None
    async for msg in it:
        if msg.phase == "done":
            done = msg.done
    assert done is not None
    return done


def two_members(data: Path, a_name: str = "g..fa", b_name: str = "g..fb") -> dict[str, Member]:
    """Two members' stores, closed: `a` (disks vda, vdb) and `b` (sdc), both with points
    at checkpoints 11, 13, 15, `a` alone at 12, `b` alone at 16, plain points between."""
    a = Member(data, a_name, {0: DiskSpec("vda", SIZE), 1: DiskSpec("vdb", SIZE // 2)}, 1)
    b = Member(data, b_name, {0: DiskSpec("sdc", SIZE)}, 2)
    t = T0
    for k in range(1, 7):
        a.delta(t)
        b.delta(t + 0.3)
        t += 2
        cid = 10 + k
        if cid % 2 or cid == 12:
            a.delta(t, cid)
        if cid % 2 or cid == 16:
            b.delta(t + 0.5, cid)
        t += 2
    for m in (a, b):
        m.store.close()
    return {a_name: a, b_name: b}


@pytest.fixture
async def group(tmp_path: Path) -> AsyncIterator[tuple[TargetService, RestoreService,
                                                       dict[str, Member]]]:
    data = tmp_path / "data"
    members = two_members(data)
    service = TargetService(data)
    await service.open_existing()
    rs = RestoreService(service, tmp_path / "restores")
    yield service, rs, members
    await service.close()


async def test_list_of_a_group_gives_the_shared_checkpoints(
        group: tuple[TargetService, RestoreService, dict[str, Member]]) -> None:
    service, rs, members = group
    ctx: Any = FakeContext()
    reply = await rs.List(pb.ListPointsRequest(policy="g"), ctx)
    assert [p.id for p in reply.points] == [11, 13, 15]
    p = reply.points[-1]
    assert p.checkpoint_id == 15 and p.last_seq == 0 and p.verified == ""
    assert [m.policy for m in p.members] == ["g..fa", "g..fb"]
    cats = {n: service.policies[n].local.undo.catalog for n in members}
    assert p.time_ns == max(m.time_ns for m in p.members)
    assert p.size_bytes == sum(cats[m.policy].size_of(cats[m.policy].point(m.point_id))
                               for m in p.members)
    # a member lists its own points with their checkpoint ids
    own = await rs.List(pb.ListPointsRequest(policy="g..fa"), ctx)
    assert [q.checkpoint_id for q in own.points if q.checkpoint_id] == [11, 12, 13, 15]
    # a member the coordinator names, without a store here: named in the refusal
    service.set_groups({"g": ["g..fa", "g..fb", "g..fc"]})
    with pytest.raises(Aborted, match=r"g\.\.fc") as err:
        await rs.List(pb.ListPointsRequest(policy="g"), ctx)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(Aborted, match=r"g\.\.fc"):
        await _collect(rs.Restore(pb.RestoreRequest(policy="g", latest=True,
                                                    out_dir=str(rs.restore_dir)), ctx))


async def test_restore_of_a_group_writes_every_member_at_the_checkpoint(
        group: tuple[TargetService, RestoreService, dict[str, Member]]) -> None:
    _, rs, members = group
    assert rs.restore_dir is not None
    ctx: Any = FakeContext()
    for cid, req in ((13, pb.RestoreRequest(point_id=13)),
                     (15, pb.RestoreRequest(latest=True)),
                     (11, pb.RestoreRequest(time_ns=int((T0 + 7.0) * S)))):
        out = rs.restore_dir / f"r{cid}"
        req.policy, req.out_dir = "g", str(out)
        done = await _collect(rs.Restore(req, ctx))
        assert done.point.checkpoint_id == cid and done.consistent
        assert {m.policy for m in done.point.members} == set(members)
        want = {d: img for m in members.values() for d, img in m.at[cid].items()}
        assert {i.disk for i in done.images} == set(want)
        for disk, img in want.items():
            assert (out / f"{disk}.img").read_bytes() == img, (cid, disk)
    with pytest.raises(Aborted) as err:   # only a member has 12
        await _collect(rs.Restore(pb.RestoreRequest(policy="g", point_id=12,
                                                    out_dir=str(rs.restore_dir / "x")), ctx))
    assert err.value.code == grpc.StatusCode.NOT_FOUND


async def test_a_failed_member_leaves_no_image_of_the_others(
        group: tuple[TargetService, RestoreService, dict[str, Member]]) -> None:
    _, rs, _ = group
    assert rs.restore_dir is not None
    out = rs.restore_dir / "clash"
    out.mkdir(parents=True)
    (out / "sdc.img").write_bytes(b"the operator's")   # the second member's disk is taken
    ctx: Any = FakeContext()
    with pytest.raises(Aborted, match="exists"):
        await _collect(rs.Restore(pb.RestoreRequest(policy="g", latest=True,
                                                    out_dir=str(out)), ctx))
    assert sorted(p.name for p in out.iterdir()) == ["sdc.img"]
    assert (out / "sdc.img").read_bytes() == b"the operator's"


async def test_test_failover_of_a_group(
        group: tuple[TargetService, RestoreService, dict[str, Member]]) -> None:
    _, rs, members = group
    assert rs.restore_dir is not None
    ctx: Any = FakeContext()
    out = rs.restore_dir / "drill"
    done = await _collect(rs.TestStart(pb.TestStartRequest(
        name="t1", restore=pb.RestoreRequest(policy="g", point_id=13, out_dir=str(out))), ctx))
    assert done.point.checkpoint_id == 13
    listed = await rs.TestList(pb.FailoverRequest(policy="g"), ctx)
    assert [t.name for t in listed.tests] == ["t1"] and listed.tests[0].state == "ready"
    assert listed.tests[0].point.checkpoint_id == 13
    assert {i.disk for i in listed.tests[0].images} == {"vda", "vdb", "sdc"}
    assert (out / "sdc.img").read_bytes() == members["g..fb"].at[13]["sdc"]
    stopped = await rs.TestStop(pb.TestStopRequest(policy="g", name="t1"), ctx)
    assert stopped.name == "t1" and not out.exists()
    with pytest.raises(Aborted) as err:
        await rs.TestStop(pb.TestStopRequest(policy="g", name="t1"), ctx)
    assert err.value.code == grpc.StatusCode.NOT_FOUND


async def test_create_marks_the_newest_group_point_in_every_member(
        group: tuple[TargetService, RestoreService, dict[str, Member]]) -> None:
    service, rs, members = group
    ctx: Any = FakeContext()
    p = await rs.Create(pb.CreatePointRequest(policy="g"), ctx)
    assert p.id == 15 and p.kind == "long" and p.on_demand
    for n in members:
        cat = service.policies[n].local.undo.catalog
        assert cat.by_checkpoint[15].kind == P.LONG


def test_member_stores_promote_checkpoints(tmp_path: Path) -> None:
    assert UndoStore(tmp_path / "g..f1").group_member
    assert not UndoStore(tmp_path / "plain").group_member



# ---------------------------------------------------------------- Apply

def _chunks(policy: str, first: int, last: int, checkpoints: list[int]
            ) -> list[rpb.ApplyRequest]:
    ext = [Extent(0, 4096 * i, 4096, bytes([i + 1]) * 4096) for i in range(len(checkpoints))]
    out = []
    for i, (e, cid) in enumerate(zip(ext, checkpoints, strict=True)):
        (chunk,) = encode_chunks([e], 1 << 20)
        out.append(rpb.ApplyRequest(chunk=rpb.DeltaChunk(
            first_seq=first, last_seq=last, index=i, final=i == len(ext) - 1, extents=chunk,
            newest_time_ns=int(T0 * S), checkpoint_id=cid)))
    return out


async def _apply(service: TargetService, reqs: list[rpb.ApplyRequest]) -> list[Any]:
    async def it() -> AsyncIterator[rpb.ApplyRequest]:
        yield rpb.ApplyRequest(open=rpb.ApplyOpen(
            policy="g..fa", epoch=1, disks=[rpb.DiskInfo(disk_id=0, name="vda",
                                                         size_bytes=SIZE)]))
        for r in reqs:
            yield r
    ctx: Any = FakeContext()
    out: list[Any] = []
    try:
        async for resp in service.Apply(it(), ctx):
            out.append(resp)
    except Aborted as exc:
        out.append(exc)
    return out


async def test_apply_records_the_checkpoint_with_the_point(tmp_path: Path) -> None:
    service = TargetService(tmp_path / "data")
    await service.open_existing()
    try:
        got = await _apply(service, _chunks("g..fa", 1, 4, [0, 0]) +
                           _chunks("g..fa", 5, 6, [42, 42]))
        assert [r.ack.durable_seq for r in got[1:]] == [4, 6]
        # durable with the delta, before it is applied: in the delta file
        rt = service.policies["g..fa"]
        await asyncio.to_thread(rt.store.apply_pending)
        cat = rt.local.undo.catalog
        assert [(p.last_seq, p.checkpoint_id) for p in cat.points][-2:] == [(4, 0), (6, 42)]
        assert checkpoint_of("g..fa", rt.store) == cat.points[-1]
        assert checkpoint_of("plain", rt.store) is None
        bad = await _apply(service, _chunks("g..fa", 7, 8, [43, 44]))
        assert isinstance(bad[-1], Aborted) and bad[-1].code == grpc.StatusCode.INVALID_ARGUMENT
        assert rt.store.durable_seq == 6
    finally:
        await service.close()


async def test_a_purge_stops_the_policys_test_failovers(
        group: tuple[TargetService, RestoreService, dict[str, Member]]) -> None:
    """Test images lie under restore_dir, outside the store: a purge deletes them too."""
    service, rs, _ = group
    assert rs.restore_dir is not None
    ctx: Any = FakeContext()
    out = rs.restore_dir / "drill-a"
    await _collect(rs.TestStart(pb.TestStartRequest(
        name="t1", restore=pb.RestoreRequest(policy="g..fa", latest=True,
                                             out_dir=str(out))), ctx))
    assert (out / "vda.img").exists()
    service.set_assigned({"g..fb"})
    assert await rs.purge("g..fa")
    assert not out.exists() and "g..fa" not in service.policies
    assert not await rs.purge("g..fb")   # assigned here: nothing happens
    assert "g..fb" in service.policies
