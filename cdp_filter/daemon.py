"""cdp-filter daemon: storage + FUSE mount + shippers, on the node skeleton
(cdp_common.node, which adds the server, metrics and the control-plane client).

Startup order matters for I3 (crash anywhere): storage opens first (images,
journal recovery and redo, cdp_filter.storage), *before* the mount appears;
only then is the file system mounted and shipping started.

Shutdown (the node's order): the shippers, trackers and syncers are
cancelled, writers held back by the journal cap are released, the FUSE loop
ends and unmounts, the control-plane client and the server stop, then
journals and images are fsynced and closed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from cdp_common import assignsig, node
from cdp_common.config import FilterConfig
from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
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

    @property
    def runtimes(self) -> dict[str, PolicyRuntime]:
        return self.storage.runtimes

    @property
    def disks(self) -> list[Disk]:
        return self.storage.disks

    def _make_shippers(self) -> None:
        f = self.config.filter
        for name, rt in self.runtimes.items():
            shipper = self.shippers[name] = Shipper(
                rt, self.config.node.id, [d.info() for d in rt.disks], self.config.tls,
                self.config.node.max_message_bytes, f.batch_bytes,
                os.path.join(f.data_dir, f"assignment.{name}.json"))
            if not f.dirty_tracking:
                continue
            directory = os.path.join(f.data_dir, "dirty", name)
            core = load_core(directory)
            rt.tracker = Tracker(rt, directory, f.dirty_block_bytes,
                                 link=_link_of(shipper), hold=core.comparing)
            rt.syncer = Syncer(rt, rt.tracker, core, directory, self.config.tls,
                               self.config.node.max_message_bytes,
                               assignment=shipper.current_assignment,
                               connected=shipper.is_connected)
            shipper.on_welcome = rt.syncer.on_welcome

    def reports(self) -> list[cpb.PolicyReport]:
        return [rt.report() for rt in self.runtimes.values()]

    def _on_assignments(self, update: cpb.AssignmentSet) -> None:
        mine = {a.policy: a for a in update.assignments
                if a.policy in self.shippers and a.filter.node_id in ("", self.config.node.id)
                and self.assignments.admits(a)}
        for name, shipper in self.shippers.items():
            shipper.set_assignment(mine.get(name))
            syncer = self.runtimes[name].syncer
            if syncer is not None:
                syncer.on_assignment(mine.get(name))

    # ------------------------------------------------------------ node hooks

    async def open(self, node: node.Node) -> None:
        self.storage.open()
        self._make_shippers()

    async def start(self, node: node.Node) -> None:
        self.mount.start(self.disks, self.runtimes, on_lost=node.shutdown)
        for name, shipper in self.shippers.items():
            if node.coordinator is not None:
                shipper.on_unreachable = node.coordinator.report_unreachable
            node.spawn(shipper.run(), f"shipper-{name}")
            rt = self.runtimes[name]
            if rt.tracker is not None:
                node.spawn(rt.tracker.run(), f"resync-{name}")
            if rt.syncer is not None:
                node.spawn(rt.syncer.run(), f"sync-{name}")
            if rt.intent is not None:
                node.spawn(rt.run_checkpoints(), f"intent-{name}")

    async def stop(self) -> None:
        """Shippers are cancelled by now: release held writers, then unmount."""
        for rt in self.runtimes.values():
            rt.close()
        await self.mount.stop()

    async def close(self) -> None:
        self.storage.close()
