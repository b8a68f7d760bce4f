"""The coordinator's data model: nodes, reports, endpoints, assignments, status rows.

Theory of operation
-------------------
Plain frozen values, shared by the lease bookkeeping (`leases`), proxy
placement (`placement`), status (`status`), the facade (`state`), the store
and the gRPC shell. Nothing here has behaviour beyond derived properties.

A policy with disks on several filters is a consistency group: the
coordinator stores it as one policy and runs it as member policies, one per
filter (`cdp_common.groups`); assignments, reports and status rows are per
member, plus one status row for the group itself (`status.group_status`).

Each (member) policy has one `Assignment`: filter, source proxy, target proxy and
target (as `Endpoint`s = node id + address), an epoch and a `reason` when it
is incomplete (empty reason = complete). The *binding* is (source proxy,
target proxy, target), ids and addresses: whenever it changes the policy's
epoch grows by one (see `placement`), and targets fence streams whose epoch
is older than the newest they saw. The filter is not part of the binding: a
filter moving address changes what is pushed, not the epoch.

State names (`NodeState`, `PolicyState`) come from `cdp_common.states`, so
the coordinator, its alarms and cdpctl agree on every spelling.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from cdp_common.config import PolicyConfig
from cdp_common.states import NodeState, PolicyState


class Role(enum.IntEnum):
    """Mirrors `cdp.v1.Role` (same numbers)."""

    UNSPECIFIED = 0
    FILTER = 1
    SOURCE_PROXY = 2
    TARGET_PROXY = 3
    TARGET = 4
    PROXY_BOTH = 5


SOURCE_ROLES = (Role.SOURCE_PROXY, Role.PROXY_BOTH)
TARGET_ROLES = (Role.TARGET_PROXY, Role.PROXY_BOTH)


@dataclass(frozen=True)
class NodeInfo:
    id: str
    role: int
    site: str = "default"
    address: str = ""
    capacity: int = 0
    metrics_address: str = ""
    pid: int = 0
    capacity_bytes_per_s: int = 0
    """Not stored: a restored node has 0 (unlimited) until it registers again."""


@dataclass(frozen=True)
class Gap:
    """Restore points with last_seq in [begin_seq, end_seq) are not consistent (0: open)."""

    begin_seq: int
    end_seq: int
    begin_time_ns: int = 0
    end_time_ns: int = 0
    reason: str = ""


@dataclass(frozen=True)
class SyncProgress:
    """Capture mode and sync progress a filter reports (all zero: nothing to say)."""

    capture_mode: str = ""
    dirty_bytes: int = 0
    gap_begin_time_ns: int = 0
    sync_phase: str = ""
    sync_id: int = 0
    sync_done_id: int = 0
    sync_reason: str = ""
    sync_done_bytes: int = 0
    sync_total_bytes: int = 0
    sync_rate_bps: float = 0.0
    sync_eta_s: float = 0.0


NO_PROGRESS = SyncProgress()


@dataclass(frozen=True)
class Verified:
    """A target's newest verification of a restore point of a policy (PolicyReport 58-62)."""

    point_id: int = 0
    ok: bool = False
    time_ns: int = 0          # when it was recorded, the target's clock (0: none)
    detail: str = ""
    every_s: float = 0.0      # the verify_every_s schedule the target runs (0: none)


NOT_VERIFIED = Verified()


@dataclass(frozen=True)
class Report:
    """What one node said about one policy in its latest heartbeat."""

    policy: str
    captured_seq: int = 0
    captured_time_ns: int = 0
    durable_seq: int = 0
    newest_time_ns: int = 0
    bytes_replicated: int = 0
    journal_bytes: int = 0
    error: str = ""
    applied_seq: int = 0
    progress: SyncProgress = NO_PROGRESS   # filter
    gaps: tuple[Gap, ...] = ()             # target
    resync_request_id: int = 0             # target: a corrupt delta needs a resync
    no_store: bool = False                 # target: assigned there, no data yet
    journal_full_in_s: float = 0.0         # filter: its journal overflow forecast (0: none)
    checkpoint_id: int = 0                 # target: newest point ending at a group checkpoint
    checkpoint_time_ns: int = 0            # target: that point's capture time (0: none)
    frozen: bool = False                   # filter: it refuses writes (planned failover)
    verified: Verified = NOT_VERIFIED      # target: its newest verification of a point


@dataclass(frozen=True)
class Endpoint:
    node_id: str = ""
    address: str = ""


NO_ENDPOINT = Endpoint()


@dataclass(frozen=True)
class Assignment:
    policy: str
    epoch: int = 0
    filter: Endpoint = NO_ENDPOINT
    source_proxy: Endpoint = NO_ENDPOINT
    target_proxy: Endpoint = NO_ENDPOINT
    target: Endpoint = NO_ENDPOINT
    reason: str = ""
    group: str = ""
    """A member policy's consistency group ("" for a policy on one filter)."""
    group_members: tuple[str, ...] = ()
    """Every member of that group, sorted (the member itself included)."""

    @property
    def binding(self) -> tuple[Endpoint, Endpoint, Endpoint]:
        return (self.source_proxy, self.target_proxy, self.target)

    @property
    def complete(self) -> bool:
        return not self.reason

    def nodes(self) -> set[str]:
        return {e.node_id for e in (self.filter, *self.binding) if e.node_id}


@dataclass
class Node:
    info: NodeInfo
    last_seen: float | None = None
    """`now` of the last register/heartbeat; None = not heard since restore."""
    up: bool = False
    grace_until: float = 0.0
    """A restored node holds its assignments until then, unless heard from."""
    bytes_per_s: float = 0.0
    """Payload bytes per second the node reported in its last heartbeat (proxies)."""


@dataclass(frozen=True)
class NodeStatus:
    info: NodeInfo
    state: NodeState
    last_seen_age_s: float
    """Seconds since the last heartbeat; -1 when not heard since the coordinator started."""
    clock_offset_s: float | None = None
    """Node clock minus coordinator clock (cdp_coordinator.clocks); None: not known."""
    draining: bool = False
    """Drained by an operator (`cdpctl node drain`): takes no policy."""


@dataclass(frozen=True)
class PolicyStatus:
    name: str
    source_proxy: str
    target_proxy: str
    target: str
    filter: str
    epoch: int
    captured_seq: int
    durable_seq: int
    applied_seq: int
    rpo_lag_s: float
    bytes_replicated: int
    journal_bytes: int
    state: PolicyState
    reason: str
    rpo_interval_s: float
    rpo_warning_s: float
    rpo_error_s: float
    progress: SyncProgress = NO_PROGRESS
    gaps: tuple[Gap, ...] = ()
    sync_request_id: int = 0
    enabled: bool = True
    rpo_breach_in_s: float = 0.0
    """Seconds until the lag reaches rpo_error_s at its steady rise (0: none forecast)."""
    journal_full_in_s: float = 0.0
    """The filter's forecast of its journal's overflow (0: not filling)."""
    frozen: bool = False
    """Frozen for a planned failover, and the filter said it refuses writes."""
    group: str = ""
    """A member's row: its consistency group ("" otherwise)."""
    members: tuple[str, ...] = ()
    """A group's row: its member policies (every other row: none)."""
    verified: Verified = NOT_VERIFIED
    """The target's newest verification of a point of it, and its schedule."""


@dataclass(frozen=True)
class Status:
    nodes: list[NodeStatus]
    policies: list[PolicyStatus]
    unknown: list[tuple[str, str]] = field(default_factory=list)
    """(filter id, policy) protected by a filter but unknown to the coordinator."""


def policy_filter(policy: PolicyConfig) -> str:
    """The filter that captures the policy (its first disk's; "" without disks)."""
    return policy.disks[0].filter if policy.disks else ""
