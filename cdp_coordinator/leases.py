"""Heartbeat leases of the coordinator's nodes (pure: no I/O, no clock).

Theory of operation
-------------------
Nodes register (id, role, site, address, capacity) and heartbeat. Every call
carries `now`, a monotonic time in seconds chosen by the caller; a node whose
last heartbeat is older than `lease_s` is *down* (`expire`). Register and
heartbeat bring a node *up* at once.

Nodes restored from the store after a coordinator restart are down until they
heartbeat, but for `lease_s` after the restore (or the takeover grace of a
standby that became leader) they are *in grace*: an
assignment that names them is kept (`in_service` is true), so a coordinator
restart does not rebind every policy. A node heard from since the restore
has left grace for good: from then on only its lease counts.

`mark_down(node)` (a filter reported the node unreachable and the
coordinator's probe failed) takes the node down at once, as an expired lease
would, and ends its grace; its next heartbeat brings it up again.

This module only keeps the books; the facade (`state.CoordinatorState`)
recomputes the assignments whenever a node's service changes.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable

from cdp_common.states import NodeState
from cdp_coordinator.model import Node, NodeInfo

log = logging.getLogger("coord.lease")


class Renewal(enum.Enum):
    """What a heartbeat did to the node's lease."""

    UNKNOWN = "unknown"    # no such node: it must register first
    RENEWED = "renewed"    # it was up and stays up
    CAME_UP = "came_up"    # it was down (expired, marked down or restored): up again


def in_service(node: Node, now: float) -> bool:
    """Up, or restored and still in grace (not heard from since the restore)."""
    return node.up or (node.last_seen is None and now < node.grace_until)


def node_state(node: Node) -> NodeState:
    """The state shown to operators: a node in grace is still shown down."""
    return NodeState.UP if node.up else NodeState.DOWN


class Leases:
    """The node registry and each node's lease."""

    def __init__(self, lease_s: float) -> None:
        self.lease_s = lease_s
        self.nodes: dict[str, Node] = {}

    def restore(self, infos: Iterable[NodeInfo], now: float,
                grace_s: float | None = None) -> None:
        """Nodes loaded from the store: down, in grace for `grace_s` (default one lease;
        a standby taking over gives longer, as the nodes must find it first)."""
        grace = self.lease_s if grace_s is None else grace_s
        for info in infos:
            self.nodes[info.id] = Node(info=info, grace_until=now + grace)

    def register(self, info: NodeInfo, now: float) -> None:
        node = self.nodes.get(info.id)
        if node is not None and node.info != info:
            log.info("node re-registered with new details", extra={"node": info.id})
        if node is None or not node.up:
            log.info("node up (registered)", extra={"node": info.id})
        self.nodes[info.id] = Node(info=info, last_seen=now, up=True)

    def renew(self, node_id: str, now: float, bytes_per_s: float = 0.0) -> Renewal:
        """A heartbeat: renew the lease and keep the node's reported throughput."""
        node = self.nodes.get(node_id)
        if node is None:
            return Renewal.UNKNOWN
        node.last_seen = now
        # NaN (x != x) or negative figures must never make a proxy look idle
        node.bytes_per_s = max(0.0, bytes_per_s) if bytes_per_s == bytes_per_s else 0.0
        if node.up:
            return Renewal.RENEWED
        node.up = True
        log.info("node up (heartbeat)", extra={"node": node_id})
        return Renewal.CAME_UP

    def mark_down(self, node_id: str, now: float) -> bool:
        """Take a node down before its lease runs out; True if it was in service."""
        node = self.nodes.get(node_id)
        if node is None:
            return False
        was = in_service(node, now)
        node.up = False
        node.grace_until = 0.0
        if was:
            log.warning("node down (probe failed)", extra={"node": node_id})
        return was

    def expire(self, now: float) -> list[str]:
        """Take down every node whose lease ran out; returns their ids."""
        gone = []
        for node in self.nodes.values():
            if node.up and node.last_seen is not None and now - node.last_seen > self.lease_s:
                node.up = False
                gone.append(node.info.id)
                log.warning("lease expired, node down", extra={"node": node.info.id})
        return gone

    def in_service(self, node_id: str, now: float) -> bool:
        node = self.nodes.get(node_id)
        return node is not None and in_service(node, now)

    def node_by_address(self, address: str) -> str:
        """The id of the node at `address` (lowest id if several), or ""."""
        for nid, node in sorted(self.nodes.items()):
            if node.info.address == address:
                return nid
        return ""
