"""The coordinator's lease and assignment state machine (pure: no I/O, no clock).

Theory of operation
-------------------
Nodes register (id, role, site, address, capacity) and heartbeat. Every call
carries `now`, a monotonic time in seconds chosen by the caller; a node whose
last heartbeat is older than `lease_s` is *down*. Nodes restored from the store
after a coordinator restart are down until they heartbeat, but for `lease_s`
after the restore they are *in grace*: an assignment that names them is kept,
so a coordinator restart does not rebind every policy.

Each policy has one assignment: filter, source proxy, target proxy, target (as
endpoints = node id + address), an epoch and a reason when it is incomplete.
`_recompute()` derives assignments from nodes and policies, policy by policy in
name order, so the result is a function of the state alone:

- A disabled policy gets no proxies and no target (reason "disabled"); its
  filter still gets the assignment, so it keeps journaling and stops shipping.
- A pinned proxy (`pinned_source_proxy` / `pinned_target_proxy`) is used
  whenever it is up and fits its slot, whatever its load or capacity: the
  operator asked for it. A policy bound elsewhere because its pinned proxy was
  down moves back when the pinned proxy is up again (the one exception to
  I-b, and only towards the operator's choice).
- Otherwise a bound proxy is kept while it is up (or in grace) and still fits
  its slot (role and site). Otherwise the healthy proxy that fits, has room
  (`capacity`, 0 = unlimited) and is least loaded is chosen: fewest policy
  slots first, then fewest bytes/s (as the proxy reported in its last
  heartbeat), ties broken by node id. No proxy -> empty endpoint + `reason`.
- `mark_down(node)` (a filter reported the node unreachable and the
  coordinator's probe failed) takes the node down at once, as an expired
  lease would; its next heartbeat brings it up again.
- Filter and target are named by the policy. A down filter changes nothing
  (the filter's journal keeps capturing; proxies keep their policy). A down or
  unknown target empties the target endpoint and sets `reason`.
- The *binding* is (source proxy, target proxy, target) ids and addresses.
  Whenever it changes, the policy's epoch grows by one. Epochs never shrink:
  the store keeps them across restarts, and targets fence streams whose epoch
  is older than the newest they saw.

Invariants: I-a epochs per policy are non-decreasing and strictly grow on every
binding change; I-b an assignment never changes while all its nodes stay up
(no flapping, no rebalancing); I-c a proxy's load never exceeds its capacity
because of a new choice (loads only grow past capacity if capacity shrinks).

Mutators record the policies whose assignment changed; `tick()` expires
leases, recomputes and returns (and forgets) that set, which the service uses
to persist and push.

RPO lag (DESIGN section 4): 0 when the target's durable seq has caught up with
the filter's captured seq; else now minus the oldest capture time known for the
undelivered range: the target's `newest_time_ns` (newest durable write) or,
before any durable write, the filter's `captured_time_ns` (a lower bound).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from cdp_common.config import PolicyConfig

log = logging.getLogger("coord.lease")
alog = logging.getLogger("coord.assign")


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
    state: str
    last_seen_age_s: float
    """Seconds since the last heartbeat; -1 when not heard since the coordinator started."""


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
    state: str
    reason: str
    rpo_interval_s: float
    rpo_warning_s: float
    rpo_error_s: float
    progress: SyncProgress = NO_PROGRESS
    gaps: tuple[Gap, ...] = ()
    sync_request_id: int = 0


@dataclass(frozen=True)
class Status:
    nodes: list[NodeStatus]
    policies: list[PolicyStatus]


def policy_filter(policy: PolicyConfig) -> str:
    return policy.disks[0].filter if policy.disks else ""


def rpo_lag(captured_seq: int, captured_time_ns: int, durable_seq: int,
            newest_time_ns: int, wall_now: float) -> float:
    """RPO lag in seconds (see the module docstring); never negative."""
    if durable_seq >= captured_seq:
        return 0.0
    known = [t for t in (newest_time_ns, captured_time_ns) if t > 0]
    if not known:
        return 0.0
    return max(0.0, wall_now - min(known) / 1e9)


def rpo_state(lag_s: float, policy: PolicyConfig) -> str:
    if lag_s >= policy.rpo_error_s:
        return "error"
    if lag_s >= policy.rpo_warning_s:
        return "warning"
    return "ok"


@dataclass
class CoordinatorState:
    lease_s: float
    nodes: dict[str, Node] = field(default_factory=dict)
    policies: dict[str, PolicyConfig] = field(default_factory=dict)
    assignments: dict[str, Assignment] = field(default_factory=dict)
    # Latest `cdpctl sync` request id per policy (in memory: a request the filter
    # has not seen before a coordinator restart is dropped; the operator retries).
    sync_requests: dict[str, int] = field(default_factory=dict)
    # Highest resync_request_id seen from each policy's target (in memory: after a
    # coordinator restart the next heartbeat asks once more; a sync is idempotent).
    target_resyncs: dict[str, int] = field(default_factory=dict)
    reports: dict[tuple[str, str], Report] = field(default_factory=dict)
    rebinds: int = 0
    """Times a bound proxy or target was lost or replaced (metrics)."""
    _dirty: set[str] = field(default_factory=set)
    _epoch_floor: dict[str, int] = field(default_factory=dict)

    # ------------------------------------------------------------ loading

    def restore(self, nodes: Iterable[NodeInfo], policies: Iterable[PolicyConfig],
                assignments: Iterable[Assignment], now: float) -> None:
        """Load persisted state: nodes are down but in grace for one lease."""
        for info in nodes:
            self.nodes[info.id] = Node(info=info, grace_until=now + self.lease_s)
        for p in policies:
            self.policies[p.name] = p
        for a in assignments:
            self._epoch_floor[a.policy] = max(self._epoch_floor.get(a.policy, 0), a.epoch)
            if a.policy in self.policies:
                self.assignments[a.policy] = a
        self._recompute(now)

    def set_policies(self, policies: Iterable[PolicyConfig], now: float) -> None:
        """Replace the policy set (config is authoritative); epochs are remembered."""
        new = {p.name: p for p in policies}
        for name in set(self.policies) - set(new):
            a = self.assignments.pop(name, None)
            if a is not None:
                self._epoch_floor[name] = max(self._epoch_floor.get(name, 0), a.epoch)
            self._dirty.add(name)
            alog.warning("policy removed", extra={"policy": name})
        self.policies = new
        self._recompute(now)

    # ------------------------------------------------------------ events

    def register(self, info: NodeInfo, now: float) -> None:
        node = self.nodes.get(info.id)
        if node is not None and node.info != info:
            log.info("node re-registered with new details", extra={"node": info.id})
        if node is None or not node.up:
            log.info("node up (registered)", extra={"node": info.id})
        self.nodes[info.id] = Node(info=info, last_seen=now, up=True)
        self._recompute(now)

    def heartbeat(self, node_id: str, reports: Iterable[Report], now: float,
                  bytes_per_s: float = 0.0) -> bool:
        """Renew the node's lease and store its reports; False if the node is unknown."""
        node = self.nodes.get(node_id)
        if node is None:
            return False
        node.last_seen = now
        node.bytes_per_s = max(0.0, bytes_per_s) if bytes_per_s == bytes_per_s else 0.0
        # A heartbeat carries the node's complete report: a policy it no longer
        # reports (e.g. a proxy whose error cleared) must not keep a stale entry.
        fresh = {(node_id, r.policy): r for r in reports}
        for key in [k for k in self.reports if k[0] == node_id and k not in fresh]:
            del self.reports[key]
        self.reports.update(fresh)
        if not node.up:
            node.up = True
            log.info("node up (heartbeat)", extra={"node": node_id})
            self._recompute(now)
        return True

    def mark_down(self, node_id: str, now: float) -> bool:
        """Take a node down before its lease runs out (failed probe); True if it was up."""
        node = self.nodes.get(node_id)
        if node is None:
            return False
        was = node.up or (node.last_seen is None and now < node.grace_until)
        node.up = False
        node.grace_until = 0.0
        if was:
            log.warning("node down (probe failed)", extra={"node": node_id})
            self._recompute(now)
        return was

    def set_policy(self, policy: PolicyConfig, now: float) -> None:
        """Add or replace one policy (validated by the caller)."""
        if self.policies.get(policy.name) != policy:
            # new parameters (RPO, retention, bandwidth...) travel in the
            # assignment: push it even when the endpoints stay the same
            self._dirty.add(policy.name)
        self.policies[policy.name] = policy
        self._recompute(now)

    def request_sync(self, name: str, now_ns: int) -> int:
        """A new sync request id for the policy: larger than any before (ns-based, so
        it still grows after a coordinator restart)."""
        rid = max(now_ns, self.sync_requests.get(name, 0) + 1)
        self.sync_requests[name] = rid
        return rid

    def resyncs_asked(self, node_id: str, reports: Iterable[Report]) -> list[str]:
        """Policies whose target (this node) asks for a digest resync it has not asked
        for before (a corrupt committed delta, cdp_target/repair.py)."""
        out = []
        for r in reports:
            p = self.policies.get(r.policy)
            if p is None or p.target != node_id or not r.resync_request_id:
                continue
            if r.resync_request_id > self.target_resyncs.get(r.policy, 0):
                self.target_resyncs[r.policy] = r.resync_request_id
                out.append(r.policy)
        return out

    def delete_policy(self, name: str, now: float) -> bool:
        if name not in self.policies:
            return False
        del self.policies[name]
        a = self.assignments.pop(name, None)
        if a is not None:
            self._epoch_floor[name] = max(self._epoch_floor.get(name, 0), a.epoch)
        self._dirty.add(name)
        alog.warning("policy deleted", extra={"policy": name})
        self._recompute(now)
        return True

    def node_by_address(self, address: str) -> str:
        for nid, node in sorted(self.nodes.items()):
            if node.info.address == address:
                return nid
        return ""

    def is_up(self, node_id: str, now: float) -> bool:
        node = self.nodes.get(node_id)
        return node is not None and (node.up or (node.last_seen is None
                                                 and now < node.grace_until))

    def tick(self, now: float) -> list[str]:
        """Expire leases, recompute; return the policies changed since the last tick."""
        for node in self.nodes.values():
            if node.up and node.last_seen is not None and now - node.last_seen > self.lease_s:
                node.up = False
                log.warning("lease expired, node down", extra={"node": node.info.id})
        self._recompute(now)
        changed, self._dirty = sorted(self._dirty), set()
        return changed

    # ------------------------------------------------------------ queries

    def assignments_for(self, node_id: str) -> list[Assignment]:
        """Assignments in which the node plays a part, by policy name."""
        return [self.assignments[name] for name in sorted(self.assignments)
                if node_id in self.assignments[name].nodes()]

    def load(self, node_id: str) -> int:
        """Policy slots (source or target) held by a proxy."""
        n = 0
        for a in self.assignments.values():
            n += (a.source_proxy.node_id == node_id) + (a.target_proxy.node_id == node_id)
        return n

    def status(self, now: float, wall_now: float | None = None) -> Status:
        """Everything the CLI shows; `wall_now` (epoch seconds) defaults to `now`."""
        wall = now if wall_now is None else wall_now
        nodes = [
            NodeStatus(info=n.info, state="up" if n.up else "down",
                       last_seen_age_s=-1.0 if n.last_seen is None
                       else max(0.0, now - n.last_seen))
            for _, n in sorted(self.nodes.items())
        ]
        policies = [self._policy_status(p, wall) for _, p in sorted(self.policies.items())]
        return Status(nodes=nodes, policies=policies)

    def _policy_status(self, p: PolicyConfig, wall: float) -> PolicyStatus:
        a = self.assignments.get(p.name, Assignment(policy=p.name))
        fid = policy_filter(p)
        f = self.reports.get((fid, p.name), Report(policy=p.name))
        t = self.reports.get((p.target, p.name), Report(policy=p.name))
        lag = rpo_lag(f.captured_seq, f.captured_time_ns, t.durable_seq, t.newest_time_ns, wall)
        reason = a.reason
        errors = [f"{nid}: {r.error}" for (nid, pol), r in sorted(self.reports.items())
                  if pol == p.name and r.error]
        if not reason:
            reason = "; ".join(errors)
        if not p.enabled:
            state, lag = "disabled", 0.0
        elif a.reason:
            state = "unassigned"
        elif errors:
            # a node says replication of this policy is failing (wrong key,
            # fenced, unreachable peer): that is an error whatever the lag says
            state = "error"
        else:
            state = rpo_state(lag, p)
        return PolicyStatus(
            name=p.name, source_proxy=a.source_proxy.node_id,
            target_proxy=a.target_proxy.node_id, target=p.target, filter=fid, epoch=a.epoch,
            captured_seq=f.captured_seq, durable_seq=t.durable_seq, applied_seq=t.applied_seq,
            rpo_lag_s=lag, bytes_replicated=t.bytes_replicated, journal_bytes=f.journal_bytes,
            state=state, reason=reason,
            rpo_interval_s=p.rpo_interval_s, rpo_warning_s=p.rpo_warning_s,
            rpo_error_s=p.rpo_error_s, progress=f.progress, gaps=t.gaps,
            sync_request_id=self.sync_requests.get(p.name, 0))

    # ------------------------------------------------------------ assignment

    def _holds(self, node_id: str, roles: tuple[Role, ...], site: str, now: float) -> bool:
        node = self.nodes.get(node_id)
        if node is None or node.info.role not in roles or node.info.site != site:
            return False
        return node.up or (node.last_seen is None and now < node.grace_until)

    def _choose(self, roles: tuple[Role, ...], site: str, loads: dict[str, int]) -> str:
        best: tuple[int, float, str] | None = None
        for nid, node in self.nodes.items():
            if not node.up or node.info.role not in roles or node.info.site != site:
                continue
            load = loads.get(nid, 0)
            if node.info.capacity and load >= node.info.capacity:
                continue
            key = (load, node.bytes_per_s, nid)
            if best is None or key < best:
                best = key
        return best[2] if best else ""

    def _endpoint(self, node_id: str) -> Endpoint:
        if not node_id:
            return NO_ENDPOINT
        node = self.nodes.get(node_id)
        return Endpoint(node_id, node.info.address if node else "")

    def _recompute(self, now: float) -> None:
        loads: dict[str, int] = {}
        for a in self.assignments.values():
            for e in (a.source_proxy, a.target_proxy):
                if e.node_id:
                    loads[e.node_id] = loads.get(e.node_id, 0) + 1
        for name in sorted(self.policies):
            p = self.policies[name]
            old = self.assignments.get(name)
            reasons: list[str] = []
            slots: list[str] = []
            for prev, pinned, roles, site, what in (
                (old.source_proxy.node_id if old else "", p.pinned_source_proxy, SOURCE_ROLES,
                 p.source_site, "source"),
                (old.target_proxy.node_id if old else "", p.pinned_target_proxy, TARGET_ROLES,
                 p.target_site, "target"),
            ):
                if not p.enabled:
                    if prev:
                        loads[prev] -= 1
                    slots.append("")
                    continue
                if pinned and pinned != prev and self.nodes.get(pinned) is not None \
                        and self.nodes[pinned].up and self._holds(pinned, roles, site, now):
                    chosen = pinned
                    if prev:
                        loads[prev] -= 1
                    loads[chosen] = loads.get(chosen, 0) + 1
                else:
                    chosen = prev if prev and self._holds(prev, roles, site, now) else ""
                if not chosen:
                    if prev:
                        loads[prev] -= 1
                    chosen = self._choose(roles, site, loads)
                    if chosen:
                        loads[chosen] = loads.get(chosen, 0) + 1
                    else:
                        reasons.append(f"no healthy {what} proxy on site {site}")
                slots.append(chosen)
            if not p.enabled:
                target = NO_ENDPOINT
                reasons = ["disabled"]
            elif self._holds(p.target, (Role.TARGET,), self._site_of(p.target), now):
                target = self._endpoint(p.target)
            else:
                target = NO_ENDPOINT
                known = p.target in self.nodes
                if known and self.nodes[p.target].info.role != Role.TARGET:
                    reasons.append(f"node {p.target} is not a target")
                else:
                    reasons.append(f"target {p.target} is "
                                   f"{'down' if known else 'not registered'}")
            new = Assignment(
                policy=name, epoch=old.epoch if old else self._epoch_floor.get(name, 0),
                filter=self._endpoint(policy_filter(p)),
                source_proxy=self._endpoint(slots[0]), target_proxy=self._endpoint(slots[1]),
                target=target, reason="; ".join(reasons))
            old_binding = old.binding if old else (NO_ENDPOINT,) * 3
            if new.binding != old_binding:
                if p.enabled and any(o.node_id and o.node_id != n.node_id
                       for o, n in zip(old_binding, new.binding, strict=True)):
                    self.rebinds += 1
                new = replace(new, epoch=new.epoch + 1)
                alog.info("policy bound: source=%s target_proxy=%s target=%s%s",
                          slots[0] or "-", slots[1] or "-", target.node_id or "-",
                          f" ({new.reason})" if new.reason else "",
                          extra={"policy": name, "epoch": new.epoch})
            if new != old:
                self.assignments[name] = new
                self._dirty.add(name)

    def _site_of(self, node_id: str) -> str:
        node = self.nodes.get(node_id)
        return node.info.site if node else ""
