"""The filter's local storage: the disks' backing images and each policy's journal.

`Storage.open()` opens (creating sparse) every image, recovers each policy's
journal (a corrupt tail is marked for a resync from the images before it is
cut, cdp_filter.salvage) and replays every untrimmed record onto the images
(redo; idempotent) -- all before the mount appears, so a write that reached
the journal but not the image before a kill -9 is in the image again before
anyone can read it (I3). `close()` fsyncs journals and images and closes
everything that was opened, also after a failed open().
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence

from cdp_common.config import FilterConfig
from cdp_common.errors import ConfigError, StorageError
from cdp_common.fileio import OS_IO, FileIO
from cdp_filter.diskset import DiskSpec
from cdp_filter.intent import IntentLog, current_boot_id, load_boot_id, save_boot_id
from cdp_filter.journal import Journal
from cdp_filter.policy import Disk, PolicyRuntime
from cdp_filter.salvage import CutRepair, mark_for_resync

log = logging.getLogger("filter.storage")


def image_path(config: FilterConfig, name: str, image: str) -> str:
    return image or os.path.join(config.filter.data_dir, "images", f"{name}.img")


def open_image(path: str, size: int, io: FileIO = OS_IO) -> int:
    """Open (creating sparse) the backing image of a disk; returns its fd."""
    try:
        io.makedirs(os.path.dirname(os.path.abspath(path)))
        fd = io.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StorageError(f"image {path}: cannot open ({exc.strerror})") from None
    have = os.fstat(fd).st_size
    if have > size:
        io.close(fd)
        raise ConfigError(f"image {path} is {have} bytes, larger than the disk's "
                          f"size_bytes {size}")
    if have < size:
        io.ftruncate(fd, size)
    return fd


def replay(rt: PolicyRuntime) -> int:
    """Redo every untrimmed journal record onto the images; returns how many."""
    n = 0
    for rec in rt.journal.records_after(rt.journal.trimmed_through):
        if rec.disk_id >= len(rt.disks):
            raise ConfigError(f"policy {rt.name}: journal record seq {rec.seq} is for disk_id "
                              f"{rec.disk_id} but the policy has {len(rt.disks)} disks "
                              "(disks removed or reordered in the config?)")
        d = rt.disks[rec.disk_id]
        if rec.offset + rec.length > d.size:
            raise ConfigError(f"policy {rt.name}: journal record seq {rec.seq} writes past "
                              f"the end of disk {d.name} (size_bytes shrunk?)")
        rt.io.pwrite(d.fd, rec.data, rec.offset)
        n += 1
    return n


def recover_intent(rt: PolicyRuntime, intent: IntentLog, host_crashed: bool,
                   dirty_dir: str, block_bytes: int) -> bool:
    """After an unclean stop (bits set): if the host went down too, mark every region
    marked for a resync from the images (cdp_filter.intent); returns whether it did."""
    extents = intent.extents()
    if not extents or not host_crashed:
        return False
    marked = mark_for_resync(dirty_dir, block_bytes, [(d.name, d.size) for d in rt.disks],
                             extents, rt.journal.last_seq, "power-loss", rt.io)
    log.warning("the host went down while this policy was being written (power loss or "
                "crash): %d regions written since their last flush (%d dirty blocks) are "
                "resynced from the images", len(extents), marked,
                extra={"policy": rt.name, "seq": rt.journal.last_seq})
    return True


class Storage:
    def __init__(self, config: FilterConfig, io: FileIO = OS_IO,
                 boot_id: Callable[[], str] = current_boot_id) -> None:
        self.config = config
        self.io = io
        self.boot_id = boot_id
        self.runtimes: dict[str, PolicyRuntime] = {}
        self.disks: list[Disk] = []
        self.host_crashed = False
        """The host went down since the last start (cdp_filter.intent)."""

    def open(self) -> None:
        """Open the [[disks]] of the config (managed policies: `open_policy`)."""
        f, io = self.config.filter, self.io
        intent_root = os.path.join(f.data_dir, "intent")
        boot = self.boot_id()
        last_boot = load_boot_id(intent_root, io)
        self.host_crashed = not boot or boot != last_boot
        by_policy: dict[str, list[Disk]] = {}
        for dc in self.config.disks:
            disks = by_policy.setdefault(dc.policy, [])
            disks.append(Disk(name=dc.name, policy=dc.policy, disk_id=len(disks),
                              size=dc.size_bytes,
                              image=image_path(self.config, dc.name, dc.image)))
        for policy, disks in by_policy.items():
            self.open_policy(policy, disks)
        if f.power_loss_protection and boot != last_boot:
            save_boot_id(intent_root, boot, io)

    def managed_disks(self, policy: str, specs: Sequence[DiskSpec]) -> list[Disk]:
        return [Disk(name=s.name, policy=policy, disk_id=s.disk_id, size=s.size_bytes,
                     image=image_path(self.config, s.name, "")) for s in specs]

    def open_policy(self, policy: str, disks: list[Disk]) -> PolicyRuntime:
        """Open one policy's images, journal and write-intent bitmaps, recover and
        replay; on failure everything it opened is closed again."""
        f, io = self.config.filter, self.io
        opened: list[Disk] = []
        journal: Journal | None = None
        intent: IntentLog | None = None
        try:
            for d in disks:
                d.fd = open_image(d.image, d.size, io)
                opened.append(d)
            dirty_dir = os.path.join(f.data_dir, "dirty", policy)
            repair = CutRepair(policy, dirty_dir, f.dirty_block_bytes,
                               [(d.name, d.size) for d in disks],
                               enabled=f.dirty_tracking, io=io)
            journal = Journal.open(os.path.join(f.data_dir, "journal", policy),
                                   f.journal_segment_bytes, f.journal_cap_bytes, policy=policy,
                                   on_cut=repair, io=io)
            if f.power_loss_protection:
                intent = IntentLog(os.path.join(f.data_dir, "intent", policy),
                                   f.intent_region_bytes, [(d.name, d.size) for d in disks], io)
            rt = PolicyRuntime(policy, journal, disks, fsync_journal=f.fsync_journal, io=io,
                               intent=intent)
            rt.set_notice(repair.summary())
            rt.tail_cut_covered = bool(repair.events) and repair.enabled
            if intent is not None and recover_intent(rt, intent, self.host_crashed, dirty_dir,
                                                     f.dirty_block_bytes):
                rt.tail_cut_covered = True   # the target may hold seqs this journal lost
            n = replay(rt)
            if n:
                log.info("replayed %d journal records onto the images", n,
                         extra={"policy": policy, "seq": journal.last_seq})
            if intent is not None and intent.marked:
                # What the dead process left (journal, replayed images) durable, then
                # the bits are no longer needed: its regions are resynced or covered.
                journal.sync_all()
                rt.fdatasync_images()
                intent.clear_all()
        except BaseException:
            if intent is not None:
                intent.close()
            if journal is not None:
                journal.close()
            for d in opened:
                with contextlib.suppress(OSError):
                    io.close(d.fd)
                d.fd = -1
            raise
        self.runtimes[policy] = rt
        self.disks.extend(disks)
        return rt

    def grow(self, rt: PolicyRuntime, sizes: Mapping[int, int]) -> list[Disk]:
        """Grow disks of a policy (disk_id -> new size): image, dirty and write-intent
        bitmaps; returns the disks grown. Shrinking never happens here (diskset)."""
        grown = []
        for d in rt.disks:
            size = sizes.get(d.disk_id, d.size)
            if size <= d.size:
                continue
            # The bitmaps first: a write past the old end must find its bits.
            if rt.tracker is not None:
                rt.tracker.grow(d.disk_id, size)
            if rt.intent is not None:
                rt.intent.bitmaps[d.disk_id].grow(size)
            try:
                self.io.ftruncate(d.fd, size)   # sparse
                self.io.fsync(d.fd)
            except OSError as exc:
                raise StorageError(f"image {d.image}: cannot grow to {size} bytes "
                                   f"({exc.strerror})") from None
            log.info("disk %s grown from %d to %d bytes", d.name, d.size, size,
                     extra={"policy": rt.name, "disk": d.name})
            d.size = size
            grown.append(d)
        return grown

    def close_policy(self, policy: str) -> None:
        """Make one policy's state durable and close it (a detached policy)."""
        rt = self.runtimes.pop(policy)
        self._close_runtime(rt)
        for d in rt.disks:
            self.disks.remove(d)

    def close(self) -> None:
        for rt in list(self.runtimes.values()):
            self._close_runtime(rt)
        self.runtimes.clear()
        self.disks.clear()

    def _close_runtime(self, rt: PolicyRuntime) -> None:
        try:
            if rt.tracker is not None:
                rt.tracker.sync_bitmaps()
            rt.journal.sync()
            rt.fdatasync_images()
        except (OSError, StorageError) as exc:
            log.error("final sync failed: %s", exc, extra={"policy": rt.name})
        else:
            if rt.intent is not None:
                try:
                    rt.intent.clear_all()   # a clean stop: nothing left to fear
                except StorageError as exc:
                    log.warning("cannot clear the write-intent bits: %s", exc,
                                extra={"policy": rt.name})
        rt.journal.close()
        if rt.intent is not None:
            rt.intent.close()
        if rt.tracker is not None:
            rt.tracker.close()
        for d in rt.disks:
            if d.fd >= 0:
                with contextlib.suppress(OSError):
                    self.io.close(d.fd)
                d.fd = -1
