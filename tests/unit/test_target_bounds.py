"""The target's bounds (issue 10): disk sizes checked before anything is created, a
failed creation leaves nothing behind, stores only for assigned policies, a store
that cannot open is quarantined (the others run), a delta is capped, a stream
must send its first message in time, files are 0600 whatever the umask, and
restores write only under restore_dir, never through a planted symlink."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import os
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import test_target_service_memory as mem
from test_restore_points import DISKS as RDISKS
from test_restore_points import Run

from cdp_common import limits
from cdp_common.config import MAX_DISK_BYTES, NodeConfig, TargetConfig, TargetSection, TlsConfig
from cdp_common.delta import Extent
from cdp_common.fileio import OsFileIO
from cdp_common.pb.cdp.v1 import replication_pb2 as rpb
from cdp_target.daemon import TargetDaemon
from cdp_target.memstore import MemoryStores
from cdp_target.restore import restore_images
from cdp_target.service import TargetService
from cdp_target.store import LocalStores
from cdp_target.storestate import STATE_FILE

pytestmark = pytest.mark.timeout(30)

HUGE = 2**63 - 1


def open_with(policy: str, size: int) -> rpb.ApplyRequest:
    return rpb.ApplyRequest(open=rpb.ApplyOpen(policy=policy, epoch=1, disks=[
        rpb.DiskInfo(disk_id=0, name="vda", size_bytes=size)]))


def tree(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under root: relative path -> (mode, content)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = (p.stat().st_mode, p.read_bytes())
    return out


async def replicate(service: TargetService, policy: str = "p1", first: int = 1) -> int:
    s = mem.Stream(service)
    await s.write(mem.open_req(policy=policy))
    durable = (await s.read()).opened.durable_seq
    await s.write(*mem.chunks(first, first, [Extent(0, 0, 4096, b"x" * 4096)]))
    acked = (await s.read()).ack.durable_seq
    assert await s.end() == grpc.StatusCode.OK
    assert acked == first and durable == first - 1
    rt = service.policies[policy]     # applied, so the files hold still for a comparison
    await mem.eventually(lambda: rt.store.snapshot().applied_seq == acked and not rt.kick.is_set())
    # applied_seq is persisted before the pass deletes the delta file and runs
    # retention: a pass of our own waits (apply lock) until that one has ended
    assert await asyncio.to_thread(rt.store.apply_pending) == acked
    return acked


# ---------------------------------------------------------------- disk sizes

@pytest.mark.parametrize(("size", "needle"), [
    (HUGE, "larger than this target's max_disk_bytes"),
    (MAX_DISK_BYTES + 4096, "larger than this target's max_disk_bytes"),
    (4097, "multiple of 4096"),
    (0, "multiple of 4096"),
])
async def test_apply_refuses_a_bad_disk_size_before_creating_anything(
        tmp_path: Path, size: int, needle: str) -> None:
    service = TargetService(tmp_path / "data")
    await service.open_existing()
    try:
        await replicate(service)          # a policy that works, before and after
        before = tree(tmp_path / "data")
        s = mem.Stream(service)
        await s.write(open_with("evil", size))
        refused = await s.aborted()
        assert refused.code == grpc.StatusCode.INVALID_ARGUMENT
        assert needle in refused.details
        assert "evil" not in service.policies
        assert not (tmp_path / "data" / "evil").exists()
        assert tree(tmp_path / "data") == before
        await replicate(service, first=2)
    finally:
        await service.close()


async def test_the_bound_is_configurable(tmp_path: Path) -> None:
    service = TargetService(tmp_path / "unused", stores=MemoryStores(tmp_path / "side"),
                            max_disk_bytes=mem.SIZE)
    s = mem.Stream(service)
    await s.write(open_with("p9", 2 * mem.SIZE))
    assert (await s.aborted()).code == grpc.StatusCode.INVALID_ARGUMENT
    await replicate(service)   # DISKS of mem are SIZE bytes: at the bound, accepted
    await service.close()


class NoBigFiles(OsFileIO):
    """A file system whose largest file is 1 MiB (ftruncate beyond: EFBIG)."""

    def ftruncate(self, fd: int, length: int) -> None:
        if length > 1 << 20:
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
        super().ftruncate(fd, length)


async def test_a_replica_that_cannot_be_made_leaves_nothing_and_the_next_start_works(
        tmp_path: Path) -> None:
    data = tmp_path / "data"
    stores = LocalStores(data, io=NoBigFiles())
    service = TargetService(data, stores=stores)
    await service.open_existing()
    await replicate(service)
    before = tree(data)
    s = mem.Stream(service)
    await s.write(open_with("big", 64 << 20))   # within max_disk_bytes, too big to make
    refused = await s.aborted()
    assert refused.code == grpc.StatusCode.UNAVAILABLE, refused.details
    assert not (data / "big").exists(), "a refused policy left its directory behind"
    assert tree(data) == before
    await service.close()
    again = TargetService(data, stores=LocalStores(data, io=NoBigFiles()))
    await again.open_existing()            # the restart that used to fail
    assert sorted(again.policies) == ["p1"] and not again.quarantined
    await replicate(again, first=2)
    await again.close()


# ---------------------------------------------------------------- assignments

async def test_new_stores_only_for_assigned_policies(tmp_path: Path) -> None:
    stores = MemoryStores(tmp_path / "side")
    first = TargetService(tmp_path / "unused", stores=stores)
    await first.open_existing()
    await replicate(first, "p1")          # an existing store, from before
    await first.close()
    service = TargetService(tmp_path / "unused", stores=stores, require_assignment=True)
    await service.open_existing()
    try:
        s = mem.Stream(service)            # no assignment seen yet: wait (transient)
        await s.write(mem.open_req(policy="p2"))
        early = await s.aborted()
        assert early.code == grpc.StatusCode.UNAVAILABLE and "no assignment" in early.details
        await replicate(service, "p1", first=2)   # existing stores keep working
        service.set_assigned({"p3"})
        s = mem.Stream(service)
        await s.write(mem.open_req(policy="p2"))
        stray = await s.aborted()
        assert stray.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "not assigned to this target" in stray.details
        assert stores.existing() == ["p1"]
        await replicate(service, "p3")
        assert stores.existing() == ["p1", "p3"]
        await replicate(service, "p1", first=3)   # no longer assigned: its store stays
    finally:
        await service.close()


# ---------------------------------------------------------------- quarantine

async def test_a_store_that_cannot_open_is_quarantined_and_the_others_run(
        tmp_path: Path) -> None:
    data = tmp_path / "data"
    service = TargetService(data)
    await service.open_existing()
    await replicate(service, "good")
    await replicate(service, "bad")
    await replicate(service, "gone")
    await service.close()
    (data / "bad" / STATE_FILE).write_text("{not json")
    (data / "gone" / "replicas" / "vda.img").unlink()   # never silently made anew
    config = TargetConfig(node=NodeConfig(id="target-1", coordinator="127.0.0.1:1"),
                          target=TargetSection(data_dir=str(data)),
                          tls=TlsConfig(insecure=True))
    daemon = TargetDaemon(config)
    await daemon.service.open_existing()      # does not raise: the daemon starts
    try:
        assert sorted(daemon.service.policies) == ["good"]
        assert sorted(daemon.service.quarantined) == ["bad", "gone"]
        assert "vda.img" in daemon.service.quarantined["gone"]
        assert not (data / "gone" / "replicas" / "vda.img").exists()
        assert not any(r.no_store for r in daemon.reports())   # nothing assigned yet
        daemon.service.set_assigned({"good", "bad", "new"})
        listed = [(r.policy, r.no_store) for r in daemon.reports()]
        assert sorted(listed) == [("bad", False), ("gone", False), ("good", False),
                                  ("new", True)]               # each policy once
        reports = {r.policy: r for r in daemon.reports()}
        assert reports["new"].error == "" and reports["new"].durable_seq == 0
        assert reports["bad"].error.startswith("store quarantined at start-up: ")
        assert STATE_FILE in reports["bad"].error or "bad" in reports["bad"].error
        assert reports["good"].error == ""
        s = mem.Stream(daemon.service)
        await s.write(mem.open_req(policy="bad"))
        refused = await s.aborted()
        assert refused.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "quarantined" in refused.details
        assert (data / "bad" / STATE_FILE).read_text() == "{not json"   # left for repair
        await replicate(daemon.service, "good", first=2)
    finally:
        await daemon.service.close()


# ---------------------------------------------------------------- delta cap

async def test_a_delta_past_the_cap_is_refused_and_discarded(tmp_path: Path) -> None:
    data = tmp_path / "data"
    service = TargetService(data, max_delta_bytes=20_000)
    await service.open_existing()
    try:
        await replicate(service)
        s = mem.Stream(service)
        await s.write(mem.open_req())
        assert (await s.read()).opened.durable_seq == 1
        big = [Extent(0, i * 4096, 4096, bytes([i]) * 4096) for i in range(8)]  # ~32 KiB
        parts = mem.chunks(2, 2, big)
        assert len(parts) >= 4
        await s.write(*parts)
        refused = await s.aborted()
        assert refused.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_delta_bytes (20000)" in refused.details
        assert service.policies["p1"].store.durable_seq == 1
        assert list((data / "p1" / "deltas").iterdir()) == []   # the partial delta is gone
        await replicate(service, first=2)   # the stream resumes from durable_seq
    finally:
        await service.close()


async def test_a_delta_at_the_cap_is_fine(tmp_path: Path) -> None:
    service = TargetService(tmp_path / "unused", stores=MemoryStores(tmp_path / "side"),
                            max_delta_bytes=4096 + 16)   # one 4 KiB extent and its header
    await service.open_existing()
    await replicate(service)
    await service.close()


# ---------------------------------------------------------------- first message

@pytest.fixture
def short_deadline() -> Iterator[None]:
    saved = limits.first_message_timeout_s()
    limits.configure(NodeConfig(id="t", first_message_timeout_s=0.2))
    yield
    limits.configure(NodeConfig(id="t", first_message_timeout_s=saved))


async def test_a_stream_without_a_first_message_is_closed(
        tmp_path: Path, short_deadline: None) -> None:
    service = TargetService(tmp_path / "unused", stores=MemoryStores(tmp_path / "side"))
    await service.open_existing()
    s = mem.Stream(service)          # sends nothing
    refused = await s.aborted()
    assert refused.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "no first message within 0.2 s" in refused.details
    assert service.policies == {}
    await replicate(service)         # a stream that does send still works
    await service.close()


async def test_first_message_helper() -> None:
    async def never() -> AsyncIterator[int]:
        await asyncio.Event().wait()
        yield 1

    async def one() -> AsyncIterator[int]:
        yield 7

    with pytest.raises(limits.FirstMessageTimeout, match="Ship stream: no first message"):
        await limits.first_message(never(), "Ship stream", timeout_s=0.05)
    assert await limits.first_message(one(), "x", timeout_s=1) == 7


# ---------------------------------------------------------------- file modes

def test_store_files_are_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        run = Run(tmp_path / "p")
        run.step(3)
        run.commit()                  # one committed, unapplied delta stays
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "p").rglob("*") if p.is_file()]
    kinds = {p.suffix for p in files}
    assert {".img", ".delta", ".undo", ".json"} <= kinds, kinds
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    run.store.close()


# ---------------------------------------------------------------- restores

@pytest.fixture
def run(tmp_path: Path) -> Iterator[Run]:
    r = Run(tmp_path / "store")
    r.step(2)
    yield r
    r.store.close()


def newest(run: Run) -> Any:
    return run.store.undo.catalog.newest


def test_restore_never_follows_a_planted_partial_symlink(tmp_path: Path, run: Run) -> None:
    root = tmp_path / "restores"
    out = root / "job"
    out.mkdir(parents=True)
    victim = tmp_path / "outside.txt"
    victim.write_text("keep me")
    (out / "vda.img.partial").symlink_to(victim)
    os.link(victim, out / "vdb.img.partial")     # a hard link to it: also never written
    old = os.umask(0)
    try:
        restored = restore_images(run.store, lambda: newest(run), out, root=root)
    finally:
        os.umask(old)
    assert victim.read_text() == "keep me"
    for i, d in RDISKS.items():
        img = restored.images[d.name]
        assert img == out / f"{d.name}.img" and not img.is_symlink()
        assert img.read_bytes() == run.prefix[newest(run).last_seq][i]
        assert stat.S_IMODE(img.stat().st_mode) == 0o600
    assert sorted(p.name for p in out.iterdir()) == ["vda.img", "vdb.img"]


def test_restore_refuses_an_existing_image(tmp_path: Path, run: Run) -> None:
    out = tmp_path / "restores" / "job"
    out.mkdir(parents=True)
    victim = tmp_path / "outside.txt"
    victim.write_text("keep me")
    (out / "vda.img").symlink_to(victim)
    with pytest.raises(Exception, match="exists; restore into an empty directory"):
        restore_images(run.store, lambda: newest(run), out, root=tmp_path / "restores")
    assert victim.read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == ["vda.img"]


def test_restore_outside_restore_dir_is_refused(tmp_path: Path, run: Run) -> None:
    root = tmp_path / "restores"
    root.mkdir()
    outside = tmp_path / "elsewhere"
    with pytest.raises(Exception, match="outside the target's restore_dir"):
        restore_images(run.store, lambda: newest(run), outside, root=root)
    assert not outside.exists()
    (root / "sneaky").symlink_to(outside, target_is_directory=True)
    outside.mkdir()
    with pytest.raises(Exception, match="outside the target's restore_dir"):
        restore_images(run.store, lambda: newest(run), root / "sneaky" / "x", root=root)
    with pytest.raises(Exception, match="outside the target's restore_dir"):
        restore_images(run.store, lambda: newest(run), root / ".." / "elsewhere", root=root)
    assert list(outside.iterdir()) == []
    restored = restore_images(run.store, lambda: newest(run), root / "ok", root=root)
    assert all(p.exists() for p in restored.images.values())


def test_lab_plan_sets_restore_dir(tmp_path: Path) -> None:
    from cdpctl import labplan
    plan = labplan.plan_lab(tmp_path / "lab", 1, 64 << 20, list(range(20000, 20040)))
    doc = plan.lab_json({})
    assert doc["restore_dir"] == str(tmp_path / "lab" / "restores")
    target = plan.node("target-1").config_text
    assert f'restore_dir = "{tmp_path / "lab" / "restores"}"' in target
    assert json.dumps(doc)


# ---------------------------------------------------------------- purge

@pytest.mark.parametrize("kind", ["files", "memory"])
async def test_a_purge_deletes_an_unassigned_store_only(tmp_path: Path, kind: str) -> None:
    data = tmp_path / "data"
    stores = LocalStores(data) if kind == "files" else MemoryStores(tmp_path / "side")
    service = TargetService(data, stores=stores, require_assignment=True)
    await service.open_existing()
    try:
        service.set_assigned({"p1", "p2"})
        await replicate(service, "p1")
        await replicate(service, "p2")
        assert not await service.purge("p2")           # assigned here: never
        assert stores.existing() == ["p1", "p2"]
        service.set_assigned({"p2"})
        assert await service.purge("p1")
        assert "p1" not in service.policies and stores.existing() == ["p2"]
        if kind == "files":
            assert not (data / "p1").exists()
        assert not await service.purge("p1")            # done already: nothing to do
        assert not await service.purge("../etc")
        await replicate(service, "p2", first=2)          # the other store is untouched
    finally:
        await service.close()


async def test_restore_point_metrics_collect(tmp_path: Path) -> None:
    """The per-policy gauges read the live catalog at every scrape (a scrape that
    raises would turn /metrics into an HTTP 500)."""
    from prometheus_client import REGISTRY, generate_latest

    from cdp_target.points import Segment
    service = TargetService(tmp_path / "data")
    await service.open_existing()
    try:
        await replicate(service, "pm")
        await replicate(service, "pm", first=2)
        undo = service.policies["pm"].store.undo   # type: ignore[attr-defined]
        # retention kept only the newest point here: give the catalog segments to read
        undo.catalog = dataclasses.replace(undo.catalog, segments=(
            Segment(0, 1, 1000), Segment(1, 2, 234)))
        text = generate_latest(REGISTRY).decode()
        assert 'cdp_target_restore_points{policy="pm"} 1.0' in text
        assert REGISTRY.get_sample_value("cdp_target_undo_bytes", {"policy": "pm"}) == 1234
        assert REGISTRY.get_sample_value("cdp_target_open_gaps", {"policy": "pm"}) == 0
    finally:
        await service.close()
