"""cdp-filter daemon: storage + FUSE mount + shippers, on the node skeleton
(cdp_common.node, which adds the server, metrics and the control-plane client).

Startup order matters for I3 (crash anywhere): storage opens first (images,
journal recovery and redo, cdp_filter.storage), *before* the mount appears;
only then is the file system mounted and shipping started. The disks are the
config's [[disks]] and those the manifest lists (cdp_filter.diskset), each
managed policy opened on its own so one that cannot open is refused alone.

At run time every admitted assignment set is reconciled with the disks
(`_reconcile`, the plan of cdp_filter.diskset): a new managed policy is
created and attached (manifest first, then images, journal, workers, mount),
a grown one grown, an unassigned one detached (workers cancelled, tracking
only, out of the directory at once, closed with its last handle), a purged
one deleted; what cannot be done is the policy's reported error. Updates
that arrive before the mount is up are applied once it is.

Shutdown (the node's order): the shippers, trackers and syncers are
cancelled, writers held back by the journal cap are released, the FUSE loop
ends and unmounts, the control-plane client and the server stop, then
journals and images are fsynced and closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from collections.abc import Callable

from cdp_common import assignsig, node
from cdp_common.config import FilterConfig
from cdp_common.errors import CdpError, ConfigError
from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
from cdp_filter import diskset, metrics
from cdp_filter.mount import Mount
from cdp_filter.policy import Disk, PolicyRuntime
from cdp_filter.resync import Tracker
from cdp_filter.shipper import Shipper
from cdp_filter.storage import Storage
from cdp_filter.sync import Syncer, load_core

log = logging.getLogger("filter.daemon")

def _link_of(shipper: Shipper) -> Callable[[], int]:
    """0 while the shipper has no welcomed stream, else which stream it is."""
    return lambda: shipper.welcomes if shipper.connected else 0


class FilterDaemon(node.NodeDaemon):
    def __init__(self, config: FilterConfig) -> None:
        self.config = config
        self.storage = Storage(config)
        self.shippers: dict[str, Shipper] = {}
        self.mountpoint = config.filter.mountpoint
        self.mount = Mount(self.mountpoint)
        self.assignments = assignsig.AssignmentGate(
            assignsig.load_optional_verifier(config.tls.assignment_key_file,
                                             config.tls.insecure),
            config.node.id, assignsig.FILTER, log)
        """Admits only the coordinator's own assignments for this filter."""
        self.node = node.Node(config, self, kind="cdp-filter", role=cpb.ROLE_FILTER,
                              grace_s=1.0, on_assignments=self._on_assignments)
        self.manifest: dict[str, diskset.ManagedPolicy] = {}
        """The disks created for the coordinator's policies (cdp_filter.diskset)."""
        self.declared = set(diskset.declared_disks(config.disks))
        self.refusals: dict[str, str] = {}
        """Why an assigned policy is not (fully) honoured here, reported as its error."""
        self._tasks: dict[str, list[asyncio.Task[None]]] = {}
        self._node: node.Node | None = None
        self._early: cpb.AssignmentSet | None = None
        self._purge_after_close: set[str] = set()
        self._admitted: dict[str, cpb.Assignment] = {}
        """The last assignment set's admitted assignments for this filter, by policy."""

    @property
    def runtimes(self) -> dict[str, PolicyRuntime]:
        return self.storage.runtimes

    @property
    def disks(self) -> list[Disk]:
        return self.storage.disks

    def _make_workers(self, rt: PolicyRuntime) -> None:
        """The shipper, and with dirty tracking the tracker and the syncer, of a policy."""
        f, name = self.config.filter, rt.name
        shipper = self.shippers[name] = Shipper(
            rt, self.config.node.id, [d.info() for d in rt.disks], self.config.tls,
            self.config.node.max_message_bytes, f.batch_bytes,
            os.path.join(f.data_dir, f"assignment.{name}.json"))
        if not f.dirty_tracking:
            return
        directory = os.path.join(f.data_dir, "dirty", name)
        core = load_core(directory)
        rt.tracker = Tracker(rt, directory, f.dirty_block_bytes,
                             link=_link_of(shipper), hold=core.comparing)
        rt.syncer = Syncer(rt, rt.tracker, core, directory, self.config.tls,
                           self.config.node.max_message_bytes,
                           assignment=shipper.current_assignment,
                           connected=shipper.is_connected)
        shipper.on_welcome = rt.syncer.on_welcome

    def _start_workers(self, node: node.Node, name: str) -> None:
        shipper, rt = self.shippers[name], self.runtimes[name]
        if node.coordinator is not None:
            shipper.on_unreachable = node.coordinator.report_unreachable
        tasks = [node.spawn(shipper.run(), f"shipper-{name}")]
        if rt.tracker is not None:
            tasks.append(node.spawn(rt.tracker.run(), f"resync-{name}"))
        if rt.syncer is not None:
            tasks.append(node.spawn(rt.syncer.run(), f"sync-{name}"))
        if rt.intent is not None:
            tasks.append(node.spawn(rt.run_checkpoints(), f"intent-{name}"))
        self._tasks[name] = tasks

    def reports(self) -> list[cpb.PolicyReport]:
        out = []
        for name, rt in self.runtimes.items():
            if name in self.shippers:   # not while a deleted policy waits for its handles
                report = rt.report()
                if name in self.refusals:   # the cause first: it explains what follows
                    report.error = "; ".join(e for e in (self.refusals[name], report.error)
                                             if e)
                out.append(report)
        out.extend(cpb.PolicyReport(policy=name, error=why)
                   for name, why in sorted(self.refusals.items()) if name not in self.shippers)
        return out

    def _on_assignments(self, update: cpb.AssignmentSet) -> None:
        if self._node is None:
            self._early = update   # applied once the mount is up (start)
            return
        me = self.config.node.id
        self._admitted = {a.policy: a for a in update.assignments
                          if a.filter.node_id in ("", me) and self.assignments.admits(a)}
        self._apply()
        for name in update.purge_policies:
            if name not in self._admitted:
                self._purge(name)

    def _apply(self) -> None:
        """Make the disks match the admitted assignments, then hand them to the workers."""
        me = self.config.node.id
        self._reconcile({name: [diskset.DiskSpec(d.disk_id, d.name, d.size_bytes)
                                for d in a.disks if d.filter in ("", me)]
                         for name, a in self._admitted.items()})
        for name, shipper in self.shippers.items():
            shipper.set_assignment(self._admitted.get(name))
            syncer = self.runtimes[name].syncer
            if syncer is not None:
                syncer.on_assignment(self._admitted.get(name))

    # ------------------------------------------------------------ policies come and go

    def _reconcile(self, assigned: dict[str, list[diskset.DiskSpec]]) -> None:
        attached = {name: [diskset.DiskSpec(d.disk_id, d.name, d.size) for d in rt.disks]
                    for name, rt in self.runtimes.items()
                    if name not in self.declared and name in self.shippers}
        plan = diskset.plan(self.config.disks, self.manifest, assigned, attached,
                            self.config.filter.max_disk_bytes)
        refusals = dict(plan.errors)
        for name in plan.detach:
            self._detach(name)
        for name, specs in plan.grow.items():
            why = self._grow(name, specs)
            if why:
                refusals[name] = why
        for name, specs in plan.attach.items():
            why = self._attach(name, specs)
            if why:
                refusals[name] = why
        for name in sorted(set(refusals) - set(self.refusals)):
            log.error("%s", refusals[name], extra={"policy": name})
        self.refusals = refusals

    def _attach(self, name: str, specs: list[diskset.DiskSpec]) -> str:
        """Create (or re-attach) a managed policy's disks and capture; '' or why not."""
        assert self._node is not None
        if name in self.runtimes:   # deleted, its last handles still open (_closed retries)
            return (f"policy {name}: still detaching its disks (open handles left); it is "
                    "attached again once they are closed")
        data_dir = self.config.filter.data_dir
        old = self.manifest.get(name)
        disks = self.storage.managed_disks(name, specs)
        for d in disks:
            if old is None and os.path.lexists(d.image):
                return (f"policy {name}: disk {d.name}: {d.image} already exists and belongs "
                        "to no policy here; to protect an existing image declare it in "
                        "[[disks]], else remove the file")
        if old is not None:
            why = self._missing_image(name, disks)
            if why:
                return why
        self.manifest[name] = diskset.ManagedPolicy(diskset.ACTIVE, list(specs))
        try:
            diskset.save_manifest(data_dir, self.manifest)
            rt = self.storage.open_policy(name, disks)
        except CdpError as exc:
            self._forget(name, old, disks)
            return f"policy {name}: cannot attach its disks: {exc}"
        self._make_workers(rt)
        self.mount.add(rt.disks, rt)
        self._start_workers(self._node, name)
        log.info("policy %s: %s %s", name, "re-attached" if old else "created",
                 ", ".join(f"{d.name} ({d.size} bytes, image {d.image})" for d in disks),
                 extra={"policy": name})
        return ""

    @staticmethod
    def _missing_image(name: str, disks: list[Disk]) -> str:
        for d in disks:
            if not os.path.exists(d.image):
                return (f"policy {name}: disk {d.name}: its image {d.image} is missing; "
                        "not created empty (that would lose the disk's data)")
        return ""

    def _grow(self, name: str, specs: list[diskset.DiskSpec]) -> str:
        """Grow a managed policy's disks (the manifest first: a start grows the image
        to what it says); the next stream announces the new sizes."""
        rt = self.runtimes[name]
        sizes = {s.disk_id: s.size_bytes for s in specs}
        self.manifest[name] = diskset.ManagedPolicy(diskset.ACTIVE, [
            diskset.DiskSpec(d.disk_id, d.name, sizes.get(d.disk_id, d.size)) for d in rt.disks])
        try:
            diskset.save_manifest(self.config.filter.data_dir, self.manifest)
            grown = self.storage.grow(rt, sizes)
        except CdpError as exc:
            return f"policy {name}: cannot grow its disks: {exc}"
        self.shippers[name].disks = [d.info() for d in rt.disks]
        if self._node is not None:
            for d in grown:
                self._node.spawn(self.mount.refresh(d), f"refresh-{d.name}")
        return ""

    def _forget(self, name: str, old: diskset.ManagedPolicy | None, disks: list[Disk]) -> None:
        """Undo a failed attach: the manifest as it was, no image left that we created."""
        if old is None:
            self.manifest.pop(name, None)
            for d in disks:
                with contextlib.suppress(OSError):
                    os.unlink(d.image)
        else:
            self.manifest[name] = old
        with contextlib.suppress(CdpError):
            diskset.save_manifest(self.config.filter.data_dir, self.manifest)

    def _detach(self, name: str) -> None:
        """The policy is no longer assigned here: stop capturing; its data stays."""
        rt = self.runtimes[name]
        for task in self._tasks.pop(name, []):
            task.cancel()
        self.shippers.pop(name, None)
        if rt.tracker is not None:
            # Later writes through handles still open only mark blocks, so a policy
            # attached again with these disks resyncs them.
            rt.tracker.overflow("policy deleted")
        self.manifest[name] = diskset.ManagedPolicy(
            diskset.DELETED, [diskset.DiskSpec(d.disk_id, d.name, d.size) for d in rt.disks])
        try:
            diskset.save_manifest(self.config.filter.data_dir, self.manifest)
        except CdpError as exc:
            log.error("%s", exc, extra={"policy": name})
        rt.close()
        log.warning("policy %s is no longer assigned to this filter: capture stopped; its "
                    "disks are detached once closed, their data kept until purged", name,
                    extra={"policy": name})
        self.mount.hide(name, lambda: self._closed(name))

    def _purge(self, name: str) -> None:
        """The coordinator purged a deleted policy: delete what this filter kept of it
        (images, journal, bitmaps, cached assignment). Only a managed policy that is
        deleted here, never a declared or an attached one; once its last handle is
        closed when it is still detaching."""
        p = self.manifest.get(name)
        if name in self.declared:
            log.warning("purge of policy %s ignored: it is declared in [[disks]]", name,
                        extra={"policy": name})
            return
        if p is None or p.state != diskset.DELETED:
            return
        if name in self.runtimes:
            self._purge_after_close.add(name)   # still open: when its last handle closes
            return
        f = self.config.filter
        for d in self.storage.managed_disks(name, p.disks):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(d.image)
        for sub in ("journal", "dirty", "intent"):
            shutil.rmtree(os.path.join(f.data_dir, sub, name), ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(f.data_dir, f"assignment.{name}.json"))
        del self.manifest[name]
        try:
            diskset.save_manifest(f.data_dir, self.manifest)
        except CdpError as exc:
            log.error("%s", exc, extra={"policy": name})
        log.warning("policy %s purged: its images and journal are deleted", name,
                    extra={"policy": name})

    def _closed(self, name: str) -> None:
        """The last handle of a detached policy's disks is closed."""
        self.storage.close_policy(name)
        metrics.forget(name)
        if name in self._purge_after_close:
            self._purge_after_close.discard(name)
            self._purge(name)
        if name in self._admitted:   # assigned again meanwhile: attach it now
            self._apply()

    # ------------------------------------------------------------ node hooks

    async def open(self, node: node.Node) -> None:
        self.manifest = diskset.load_manifest(self.config.filter.data_dir)
        clash = sorted(set(self.manifest) & self.declared)
        if clash:
            raise ConfigError(f"policy {clash[0]} is declared in [[disks]] but was created "
                              f"here by the coordinator ({diskset.MANIFEST_FILE}): remove "
                              "its [[disks]] or purge the policy")
        self.storage.open()
        for name, p in sorted(self.manifest.items()):
            if p.state != diskset.ACTIVE:
                continue
            # One managed policy that cannot open must not keep the others down.
            disks = self.storage.managed_disks(name, p.disks)
            why = self._missing_image(name, disks)
            if not why:
                try:
                    self.storage.open_policy(name, disks)
                except CdpError as exc:
                    why = f"policy {name}: cannot attach its disks: {exc}"
            if why:
                log.error("%s", why, extra={"policy": name})
                self.refusals[name] = why
        for rt in self.runtimes.values():
            self._make_workers(rt)

    async def start(self, node: node.Node) -> None:
        self.mount.start(self.disks, self.runtimes, on_lost=node.shutdown)
        for name in self.shippers:
            self._start_workers(node, name)
        self._node = node
        if self._early is not None:
            update, self._early = self._early, None
            self._on_assignments(update)

    async def stop(self) -> None:
        """Shippers are cancelled by now: release held writers, then unmount."""
        for rt in self.runtimes.values():
            rt.close()
        await self.mount.stop()

    async def close(self) -> None:
        self.storage.close()
