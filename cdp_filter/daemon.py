"""cdp-filter daemon: journals + FUSE mount + shippers, on the node skeleton
(cdp_common.node, which adds the server, metrics and the control-plane client).

Startup order matters for I3 (crash anywhere): images are opened (created
sparse when missing), each policy's journal is recovered and every untrimmed
record is replayed onto the images (redo; idempotent) *before* the mount
appears, so a write that reached the journal but not the image before a
kill -9 is in the image again before anyone can read it. Only then is the
file system mounted and shipping started.

Shutdown: stop the shippers, release writers held back by the journal cap,
end the FUSE loop and unmount, stop the control-plane client and the server,
then fsync journals and images.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable

import grpc
import pyfuse3
import pyfuse3.asyncio

from cdp_common import node
from cdp_common.config import FilterConfig
from cdp_common.errors import ConfigError, StorageError
from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
from cdp_filter import fs
from cdp_filter.journal import Journal
from cdp_filter.policy import Disk, PolicyRuntime
from cdp_filter.resync import Tracker
from cdp_filter.salvage import CutRepair
from cdp_filter.shipper import Shipper
from cdp_filter.sync import Syncer, load_core

pyfuse3.asyncio.enable()
log = logging.getLogger("filter.daemon")


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


def _link_of(shipper: Shipper) -> Callable[[], int]:
    """0 while the shipper has no welcomed stream, else which stream it is."""
    return lambda: shipper.welcomes if shipper.connected else 0


class FilterDaemon(node.NodeDaemon):
    def __init__(self, config: FilterConfig) -> None:
        self.config = config
        self.runtimes: dict[str, PolicyRuntime] = {}
        self.shippers: dict[str, Shipper] = {}
        self.disks: list[Disk] = []
        self._fuse_task: asyncio.Task[None] | None = None
        self._mounted = False
        self.mountpoint = config.filter.mountpoint
        self.node = node.Node(config, self, kind="cdp-filter", role=cpb.ROLE_FILTER,
                              grace_s=1.0, on_assignments=self._on_assignments)

    # ------------------------------------------------------------ setup

    def _open_storage(self) -> None:
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
            # A corrupt journal tail is marked for a resync from the images before it
            # is cut (cdp_filter.salvage).
            repair = CutRepair(policy, os.path.join(f.data_dir, "dirty", policy),
                               f.dirty_block_bytes, [(d.name, d.size) for d in disks],
                               enabled=f.dirty_tracking)
            journal = Journal.open(os.path.join(f.data_dir, "journal", policy),
                                   f.journal_segment_bytes, f.journal_cap_bytes, policy=policy,
                                   on_cut=repair)
            rt = PolicyRuntime(policy, journal, disks, fsync_journal=f.fsync_journal)
            rt.set_notice(repair.summary())
            self.runtimes[policy] = rt
            n = replay(rt)
            if n:
                log.info("replayed %d journal records onto the images", n,
                         extra={"policy": policy, "seq": journal.last_seq})

    def _make_shippers(self) -> None:
        for name, rt in self.runtimes.items():
            self.shippers[name] = Shipper(
                rt, self.config.node.id, [d.info() for d in rt.disks], self.config.tls,
                self.config.node.max_message_bytes, self.config.filter.batch_bytes,
                os.path.join(self.config.filter.data_dir, f"assignment.{name}.json"))
        if self.config.filter.dirty_tracking:
            for name, rt in self.runtimes.items():
                shipper = self.shippers[name]
                directory = os.path.join(self.config.filter.data_dir, "dirty", name)
                core = load_core(directory)
                rt.tracker = Tracker(rt, directory, self.config.filter.dirty_block_bytes,
                                     link=_link_of(shipper), hold=core.comparing)
                rt.syncer = Syncer(rt, rt.tracker, core, directory, self.config.tls,
                                   self.config.node.max_message_bytes,
                                   assignment=shipper.current_assignment,
                                   connected=shipper.is_connected)
                shipper.on_welcome = rt.syncer.on_welcome

    def _mount(self) -> None:
        fs.prepare_mountpoint(self.mountpoint)
        ops = fs.FilterFs(self.disks)
        ops.runtimes = dict(self.runtimes)
        try:
            pyfuse3.init(ops, self.mountpoint, fs.mount_options())
        except RuntimeError as exc:
            raise StorageError(f"filter.mountpoint: cannot mount FUSE at {self.mountpoint}: "
                               f"{exc}") from None
        self._mounted = True
        self._fuse_task = asyncio.create_task(self._fuse_main(), name="fuse")
        log.info("mounted %d disks at %s", len(self.disks), self.mountpoint)

    async def _fuse_main(self) -> None:
        try:
            await pyfuse3.main()
        finally:
            if not self.node.stopping:
                log.warning("FUSE loop ended (unmounted from outside?); shutting down")
                await self.node.shutdown()

    def reports(self) -> list[cpb.PolicyReport]:
        return [rt.report() for rt in self.runtimes.values()]

    def _on_assignments(self, update: cpb.AssignmentSet) -> None:
        mine = {a.policy: a for a in update.assignments
                if a.policy in self.shippers and a.filter.node_id in ("", self.config.node.id)}
        for name, shipper in self.shippers.items():
            shipper.set_assignment(mine.get(name))
            syncer = self.runtimes[name].syncer
            if syncer is not None:
                syncer.on_assignment(mine.get(name))

    # ------------------------------------------------------------ node hooks

    async def open(self, node: node.Node) -> None:
        self._open_storage()
        self._make_shippers()

    def add_servicers(self, server: grpc.aio.Server) -> None:
        """The filter serves only health (its server is how peers and systemd see it up)."""

    async def start(self, node: node.Node) -> None:
        self._mount()
        for name, shipper in self.shippers.items():
            if node.coordinator is not None:
                shipper.on_unreachable = node.coordinator.report_unreachable
            node.spawn(shipper.run(), f"shipper-{name}")
            tracker = self.runtimes[name].tracker
            if tracker is not None:
                node.spawn(tracker.run(), f"resync-{name}")
            syncer = self.runtimes[name].syncer
            if syncer is not None:
                node.spawn(syncer.run(), f"sync-{name}")

    async def stop(self) -> None:
        """Shippers are cancelled by now: release held writers, then unmount."""
        for rt in self.runtimes.values():
            rt.close()
        if self._mounted:
            with contextlib.suppress(Exception):
                pyfuse3.terminate()
            if self._fuse_task is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(self._fuse_task), 10)
                except (TimeoutError, Exception) as exc:
                    log.warning("FUSE loop did not end cleanly: %s", exc)
            try:
                pyfuse3.close(unmount=True)
            except Exception as exc:
                log.warning("unmount failed: %s", exc)
            self._mounted = False

    async def close(self) -> None:
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
