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

from cdp_common.config import FilterConfig
from cdp_common.errors import ConfigError, StorageError
from cdp_filter.journal import Journal
from cdp_filter.policy import Disk, PolicyRuntime
from cdp_filter.salvage import CutRepair

log = logging.getLogger("filter.storage")


def image_path(config: FilterConfig, name: str, image: str) -> str:
    return image or os.path.join(config.filter.data_dir, "images", f"{name}.img")


def open_image(path: str, size: int) -> int:
    """Open (creating sparse) the backing image of a disk; returns its fd."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StorageError(f"image {path}: cannot open ({exc.strerror})") from None
    have = os.fstat(fd).st_size
    if have > size:
        os.close(fd)
        raise ConfigError(f"image {path} is {have} bytes, larger than the disk's "
                          f"size_bytes {size}")
    if have < size:
        os.ftruncate(fd, size)
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
        os.pwrite(d.fd, rec.data, rec.offset)
        n += 1
    return n


class Storage:
    def __init__(self, config: FilterConfig) -> None:
        self.config = config
        self.runtimes: dict[str, PolicyRuntime] = {}
        self.disks: list[Disk] = []

    def open(self) -> None:
        f = self.config.filter
        by_policy: dict[str, list[Disk]] = {}
        for dc in self.config.disks:
            disks = by_policy.setdefault(dc.policy, [])
            d = Disk(name=dc.name, policy=dc.policy, disk_id=len(disks), size=dc.size_bytes,
                     image=image_path(self.config, dc.name, dc.image))
            d.fd = open_image(d.image, d.size)
            disks.append(d)
            self.disks.append(d)
        for policy, disks in by_policy.items():
            repair = CutRepair(policy, os.path.join(f.data_dir, "dirty", policy),
                               f.dirty_block_bytes, [(d.name, d.size) for d in disks],
                               enabled=f.dirty_tracking)
            journal = Journal.open(os.path.join(f.data_dir, "journal", policy),
                                   f.journal_segment_bytes, f.journal_cap_bytes, policy=policy,
                                   on_cut=repair)
            rt = PolicyRuntime(policy, journal, disks, fsync_journal=f.fsync_journal)
            rt.set_notice(repair.summary())
            rt.tail_cut_covered = bool(repair.events) and repair.enabled
            self.runtimes[policy] = rt
            n = replay(rt)
            if n:
                log.info("replayed %d journal records onto the images", n,
                         extra={"policy": policy, "seq": journal.last_seq})

    def close(self) -> None:
        for rt in self.runtimes.values():
            try:
                rt.journal.sync()
                rt.fdatasync_images()
            except (OSError, StorageError) as exc:
                log.error("final sync failed: %s", exc, extra={"policy": rt.name})
            rt.journal.close()
            if rt.tracker is not None:
                rt.tracker.close()
        for d in self.disks:
            if d.fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(d.fd)
                d.fd = -1
