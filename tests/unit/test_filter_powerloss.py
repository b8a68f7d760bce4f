"""Power loss and kill -9 on the filter at every step of a scripted workload (issue 11.5).

The workload runs the filter's real storage (images, journal, write-intent
bitmaps, dirty-block tracker with a journal overflow) over `SimIO`: writes
through `PolicyRuntime.write` (the FUSE handler's capture point), application
flushes, acks from a target (which trim the journal and fdatasync the images
while the newest records are still unsynced), kernel writeback of the images,
write-intent checkpoints. A dry run names its steps; then for EVERY step the
workload runs again and dies there, either by a power cut (`power_cut()`: every
write not fsynced is dropped, per file) followed by a start on a new boot, or
by a kill -9 (the page cache keeps everything) followed by a start on the same
boot. The real `Storage.open` recovers, and the check is what an operator is
promised (DESIGN I3 on the source side):

- replica == source: what the target holds, plus every journal record the
  shipper will send from the target's durable seq, plus every block the
  dirty-block resync will read from the images, equals the images byte for
  byte; and where the target is ahead of the journal (seqs shipped, then lost
  from it), the shipper is told it may skip ahead (the regions are resynced);
- a kill -9 never costs a resync (no dirty bits, no gap): the journal covers it;
- a power cut during recovery itself, at each of its steps, recovers too.

A control run without power-loss protection must break the first property,
so the check is known to see the hole it guards.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cdp_common.config import DiskConfig, FilterConfig, FilterSection, NodeConfig
from cdp_common.fileio import OS_IO, FileIO
from cdp_common.fileio_sim import SimIO, SimulatedCrash, kill, steps_of
from cdp_filter.dirty import DirtyBitmap
from cdp_filter.overflow import Mode
from cdp_filter.policy import PolicyRuntime
from cdp_filter.resync import Tracker
from cdp_filter.storage import Storage

pytestmark = pytest.mark.timeout(300)

KiB = 1024
DISKS = [("d0", 256 * KiB), ("d1", 128 * KiB)]
BLOCK = 4 * KiB
REGION = 64 * KiB
CAP = 12 * (BLOCK + 64)     # the journal overflows late in the workload


def config(root: Path, protect: bool = True) -> FilterConfig:
    return FilterConfig(
        node=NodeConfig(id="filter-1", coordinator="127.0.0.1:1"),
        filter=FilterSection(mountpoint=str(root / "mnt"), data_dir=str(root / "data"),
                             journal_cap_bytes=CAP, journal_segment_bytes=4 * (BLOCK + 64),
                             dirty_block_bytes=BLOCK, intent_region_bytes=REGION,
                             power_loss_protection=protect),
        disks=[DiskConfig(name=n, policy="p1", size_bytes=s) for n, s in DISKS])


@dataclass
class Target:
    """The DR side, remote and durable: what it holds survives the source's faults."""

    durable_seq: int = 0
    replica: list[bytearray] = field(default_factory=lambda: [bytearray(s) for _, s in DISKS])

    def receive(self, rt: PolicyRuntime, through: int | None = None) -> int:
        for rec in rt.journal.records_after(self.durable_seq):
            if through is not None and rec.seq > through:
                break
            if not rec.is_marker:
                self.replica[rec.disk_id][rec.offset:rec.offset + rec.length] = rec.data
            self.durable_seq = rec.seq
        return self.durable_seq


def fill(i: int) -> bytes:
    return bytes((i * 31 + j) % 251 for j in range(BLOCK))


def open_storage(root: Path, io: FileIO, boot: str, protect: bool = True
                 ) -> tuple[Storage, PolicyRuntime]:
    storage = Storage(config(root, protect), io=io, boot_id=lambda: boot)
    storage.open()
    rt = storage.runtimes["p1"]
    rt.tracker = Tracker(rt, str(root / "data" / "dirty" / "p1"), BLOCK)
    return storage, rt


async def workload(root: Path, io: FileIO, target: Target, protect: bool = True) -> None:
    _storage, rt = open_storage(root, io, "boot-1", protect)
    d0, d1 = rt.disks
    n = 0

    async def write(d: object, off: int, count: int = 1) -> None:
        nonlocal n
        for k in range(count):
            n += 1
            await rt.write(d, off + k * BLOCK, fill(n))  # type: ignore[arg-type]

    async def ack(through: int | None = None) -> None:
        await rt.trim_through(target.receive(rt, through))  # fdatasyncs the images

    async def checkpoint() -> None:
        if rt.intent is not None:
            await rt.intent.checkpoint(rt.make_durable)

    def writeback() -> None:   # the kernel may write dirty image pages back at any time
        rt.fdatasync_images()

    await write(d0, 0)
    await write(d0, 64 * KiB)
    await write(d1, 0, 2)
    await rt.flush(d0)
    await write(d0, 4 * KiB)
    await write(d1, 64 * KiB)
    await ack()
    await write(d0, 128 * KiB, 2)       # unsynced records, then the images reach disk
    await ack(rt.journal.last_seq - 1)
    await checkpoint()                  # every region is hot: none cleared
    await write(d1, 64 * KiB)
    await checkpoint()                  # the cold ones cleared
    await write(d0, 0)                  # region 0 again: its bit is set again first
    await write(d0, 192 * KiB)
    writeback()
    await ack(rt.journal.last_seq - 2)
    await write(d0, 200 * KiB, 12)      # the journal overflows: tracking
    assert rt.tracker is not None and rt.tracker.mode is Mode.TRACKING
    await write(d1, 100 * KiB, 3)
    writeback()
    await checkpoint()
    await write(d1, 0)
    writeback()
    await checkpoint()
    await write(d1, 4 * KiB)
    writeback()


def run_workload(root: Path, io: FileIO, target: Target, protect: bool = True) -> bool:
    """Run until done or the simulated death; True when it died."""
    try:
        asyncio.run(workload(root, io, target, protect))
    except SimulatedCrash:
        return True
    return False


def read_dirty(root: Path) -> list[DirtyBitmap]:
    return [DirtyBitmap.open(str(root / "data" / "dirty" / "p1" / f"{n}.bitmap"), BLOCK, s)
            for n, s in DISKS]


def divergence(root: Path, target: Target, boot: str, io: FileIO = OS_IO,
               protect: bool = True) -> tuple[list[str], int]:
    """Start the filter again; what the replica would differ in once it resumed,
    and how many dirty blocks the start left to resync."""
    storage, rt = open_storage(root, io, boot, protect)
    try:
        journal, tracker = rt.journal, rt.tracker
        assert tracker is not None
        replica = [bytearray(r) for r in target.replica]
        resume = target.durable_seq
        problems = []
        if resume > journal.last_seq:
            if not rt.tail_cut_covered:
                problems.append(f"target ahead (seq {resume} > {journal.last_seq}) and not "
                                "covered: the shipper stops in error")
        elif resume + 1 < journal.oldest_seq and not tracker.m.hole_ok(resume,
                                                                        journal.oldest_seq):
            problems.append(f"records {resume + 1}..{journal.oldest_seq - 1} are gone")
        for rec in journal.records_after(resume):
            if not rec.is_marker:
                replica[rec.disk_id][rec.offset:rec.offset + rec.length] = rec.data
        dirty = 0
        bitmaps = read_dirty(root)
        for i, (d, bm) in enumerate(zip(rt.disks, bitmaps, strict=True)):
            b = bm.next_set(0)
            while b >= 0:
                dirty += 1
                replica[i][b * BLOCK:(b + 1) * BLOCK] = os.pread(d.fd, BLOCK, b * BLOCK)
                b = bm.next_set(b + 1)
            bm.close()
            image = os.pread(d.fd, d.size, 0)
            for b in range(d.size // BLOCK):
                if image[b * BLOCK:(b + 1) * BLOCK] != replica[i][b * BLOCK:(b + 1) * BLOCK]:
                    problems.append(f"{d.name} block {b} differs after resync")
        if dirty:
            assert tracker.mode is Mode.TRACKING, "dirty bits, but no resync planned"
        return problems, dirty
    finally:
        storage.close()


def fresh(base: Path, name: str) -> Path:
    root = base / name
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    return root


def dry_steps(base: Path, protect: bool = True) -> list[str]:
    root = fresh(base, "dry")
    io = SimIO([root])
    assert not run_workload(root, io, Target(), protect)
    return io.steps


def crash_each_step(base: Path, after: Callable[[Path, SimIO, Target], None],
                    protect: bool = True) -> int:
    steps = dry_steps(base, protect)
    assert len(steps) > 100, steps_of(steps)
    for n in range(len(steps)):
        root = fresh(base, "run")
        io = SimIO([root], crash_at=n)
        target = Target()
        assert run_workload(root, io, target, protect), f"no crash at step {n}"
        try:
            after(root, io, target)
        except AssertionError as exc:
            raise AssertionError(f"crash at step {n} ({steps[n]}): {exc}") from None
    return len(steps)


def test_power_cut_at_every_step_the_replica_converges(tmp_path: Path) -> None:
    def after(root: Path, io: SimIO, target: Target) -> None:
        io.power_cut()
        problems, _dirty = divergence(root, target, "boot-2")
        assert not problems, problems
        problems, _dirty = divergence(root, target, "boot-2")   # and a second start
        assert not problems, problems

    crash_each_step(tmp_path, after)


def test_kill_at_every_step_needs_no_resync(tmp_path: Path) -> None:
    def after(root: Path, io: SimIO, target: Target) -> None:
        kill(io)
        before = sum(read_dirty_counts(root))   # what the workload's overflow marked
        problems, dirty = divergence(root, target, "boot-1")
        assert not problems, problems
        assert dirty == before, f"a kill -9 added {dirty - before} blocks to resync"

    crash_each_step(tmp_path, after)


def read_dirty_counts(root: Path) -> list[int]:
    out = []
    for bm in read_dirty(root):
        out.append(bm.count)
        bm.close()
    return out


def test_power_cut_during_recovery(tmp_path: Path) -> None:
    steps = dry_steps(tmp_path)
    for n in range(0, len(steps), 7):
        base = fresh(tmp_path, "base")
        io = SimIO([base], crash_at=n)
        target = Target()
        assert run_workload(base, io, target)
        io.power_cut()
        probe = fresh(tmp_path, "probe")
        shutil.copytree(base, probe, dirs_exist_ok=True)
        sim = SimIO([probe])
        divergence(probe, target, "boot-2", io=sim)
        recovery = len(sim.steps)
        for m in range(recovery):
            again = fresh(tmp_path, "again")
            shutil.copytree(base, again, dirs_exist_ok=True)
            sim = SimIO([again], crash_at=m)
            with pytest.raises(SimulatedCrash):
                divergence(again, target, "boot-2", io=sim)
            sim.power_cut()
            problems, _ = divergence(again, target, "boot-3")
            assert not problems, (f"crash at workload step {n} ({steps[n]}), then at "
                                  f"recovery step {m} ({sim.steps[m]}): {problems}")


def test_without_protection_a_power_cut_diverges(tmp_path: Path) -> None:
    """The control: the hole the intent bitmap closes is real, and the check sees it."""
    found = []

    def after(root: Path, io: SimIO, target: Target) -> None:
        io.power_cut()
        problems, _ = divergence(root, target, "boot-2", protect=False)
        if problems:
            found.append(problems)

    crash_each_step(tmp_path, after, protect=False)
    assert found, "no crash point showed a divergence without the write-intent bitmap"
