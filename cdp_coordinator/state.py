"""The coordinator's state machine (pure: no I/O, no clock): a facade over its parts.

Theory of operation
-------------------
`CoordinatorState` composes the pure parts and is what the gRPC shell
(`service`) and the tests drive, with an injected `now`:

    model      the values (NodeInfo, Report, Endpoint, Assignment, status rows)
    leases     heartbeat leases, grace after a restart, mark_down
    placement  the slot rules (one table), target, binding and epochs
    status     status rows, policy states and the RPO lag

Every mutator that may change who serves what (register, a heartbeat that
brings a node up, mark_down, policy edits, restore, tick) ends in
`_recompute()`, which runs `placement.place_all` and records the policies
whose assignment changed. `tick()` expires leases, recomputes and returns
(and forgets) that set, which the service uses to persist and push. A policy
whose parameters changed (RPO, retention, bandwidth...) is recorded too, even
when its endpoints stay: the new parameters travel in the assignment.

Fast path (1,000 disks: one heartbeat a second from each of dozens of nodes,
and each used to re-place every policy): placement and the rebalancer are
deterministic functions of their inputs, so `_recompute` skips both when the
inputs are exactly those of the last run and that run changed nothing (a
fixed point: running again would change nothing either). The inputs
(`_inputs`) are the policies, assignments, epoch floors, drained proxies,
each node's details, up flag and `in_service(now)` (so a grace running out
counts), and whether the rebalancer has budget left this minute. A node's
bytes/s count only while some node has a `capacity_bytes_per_s`: otherwise,
at a fixed point, bytes/s only break ties between candidates of a CHOOSE, and
there are none (every slot is kept, or waits for a node that fits and has
room, which bytes/s cannot give). tests/unit/test_coordinator_fastpath.py
compares the fast path with full recomputes over random event sequences.

Consistency groups: `policies` holds the operator's policies as stored (a
policy with disks on several filters is one entry, the group); `placed`
holds what placement, assignments, reports, alarms and status work on: every
one-filter policy as it is and, for a group, its member policies
(`cdp_common.groups.members`: `<group>..<filter>`, sorted). `groups` maps
each group to its members' names. Every mutator that changes `policies`
changes `placed` and `groups` with it; editing, deleting, enabling,
disabling or syncing a group does it to all of its members. Epochs, `since`,
sync requests and lag trends are per member (a group's row has a lag trend
of its own, by the group's name).

Epoch memory: a policy removed (or deleted) and added again starts from the
epoch it had (`_epoch_floor`), and `restore` takes the stored epochs as
floors, so epochs never shrink (invariant I-a, see `placement` for I-a, I-b,
I-c).

Heartbeats carry each node's complete set of reports: a policy a node no
longer reports (a proxy whose error cleared) loses its stale entry.

`since` remembers when each policy was added (or moved to another filter or
target): for one lease after that, status counts a node that does not report
it yet as "waiting", not as an error (the assignment may not have reached it).
In memory: after a restart (or a takeover) every policy starts a fresh grace.

The names below are re-exported so that `from cdp_coordinator.state import
NodeInfo, Role, ...` keeps working.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from dataclasses import replace

from cdp_common import groups as cgroups
from cdp_common.config import PolicyConfig
from cdp_common.forecast import Trend
from cdp_coordinator.clocks import ClockBook
from cdp_coordinator.leases import Leases, Renewal, in_service
from cdp_coordinator.model import (
    NO_ENDPOINT,
    NO_PROGRESS,
    SOURCE_ROLES,
    TARGET_ROLES,
    Assignment,
    Endpoint,
    Gap,
    Node,
    NodeInfo,
    NodeStatus,
    PolicyStatus,
    Report,
    Role,
    Status,
    SyncProgress,
    policy_filter,
)
from cdp_coordinator.placement import place_all
from cdp_coordinator.rebalance import plan_moves
from cdp_coordinator.status import rpo_lag, rpo_state, status

LAG_WINDOW_S = 30.0
LAG_MIN_SLOPE = 0.05
"""A lag rising slower than this (s/s) is not forecast: clocks and report jitter."""

__all__ = [
    "NO_ENDPOINT", "NO_PROGRESS", "SOURCE_ROLES", "TARGET_ROLES", "Assignment",
    "CoordinatorState", "Endpoint", "Gap", "Node", "NodeInfo", "NodeStatus", "PolicyStatus",
    "Report", "Role", "Status", "SyncProgress", "policy_filter", "rpo_lag", "rpo_state",
]

alog = logging.getLogger("coord.assign")


def policy_nodes(p: PolicyConfig) -> tuple[frozenset[str], str]:
    """The filters and the target that must report a policy."""
    return frozenset(d.filter for d in p.disks), p.target


class CoordinatorState:
    """Nodes, policies, assignments and reports of one coordinator."""

    def __init__(self, lease_s: float) -> None:
        self.leases = Leases(lease_s)
        self.policies: dict[str, PolicyConfig] = {}
        """The operator's policies, as stored (a consistency group is one of them)."""
        self.placed: dict[str, PolicyConfig] = {}
        """What is placed, assigned and reported: the policies, groups as their members."""
        self.groups: dict[str, tuple[str, ...]] = {}
        """Group name -> its member policies' names, sorted."""
        self.assignments: dict[str, Assignment] = {}
        # Latest `cdpctl sync` request id per policy (the service persists it, so a
        # coordinator restart or a standby taking over hands it out again).
        self.sync_requests: dict[str, int] = {}
        # Highest resync_request_id seen from each policy's target (in memory: after a
        # coordinator restart the next heartbeat asks once more; a sync is idempotent).
        self.target_resyncs: dict[str, int] = {}
        self.reports: dict[tuple[str, str], Report] = {}
        self.clocks = ClockBook()
        self.skew_alarm_s = 0.5
        self.rebinds = 0
        """Times a bound proxy or target was lost or replaced (metrics)."""
        self.rebalance_per_minute = 0
        """Most policy slots the rebalancer moves per minute (0 = never; the daemon
        sets `[coordinator] rebalance_max_per_minute`)."""
        self.moves = 0
        """Policy slots the rebalancer moved (metrics)."""
        self._move_times: list[float] = []
        self.draining: set[str] = set()
        """Proxies an operator drained (the service stores them first: `save_drains`)."""
        self.since: dict[str, float] = {}
        """When (now) each policy was added or moved to another filter or target: for one
        lease after that, a node not reporting it may not have heard of it yet (status)."""
        self.lag_trends: dict[str, Trend] = {}
        """RPO lag per policy over the last LAG_WINDOW_S, for the breach forecast."""
        self._dirty: set[str] = set()
        self._epoch_floor: dict[str, int] = {}
        self._settled: tuple[object, ...] | None = None
        """The inputs of the last placement run that changed nothing (`_recompute`)."""

    @property
    def lease_s(self) -> float:
        return self.leases.lease_s

    @property
    def nodes(self) -> dict[str, Node]:
        return self.leases.nodes

    # ------------------------------------------------------------ loading

    def restore(self, nodes: Iterable[NodeInfo], policies: Iterable[PolicyConfig],
                assignments: Iterable[Assignment], now: float,
                grace_s: float | None = None,
                sync_requests: dict[str, int] | None = None,
                drains: Iterable[str] = ()) -> None:
        """Load persisted state: nodes are down but in grace for `grace_s` (default one
        lease), the pending sync requests are handed out again, drained nodes stay
        drained."""
        self.leases.restore(nodes, now, grace_s)
        self.draining.update(drains)
        for name, rid in (sync_requests or {}).items():
            self.sync_requests[name] = max(self.sync_requests.get(name, 0), rid)
        for p in policies:
            self.policies[p.name] = p
            for m in self._expand(p):
                self._note_since(m, now)
                self.placed[m.name] = m
        for a in assignments:
            self._remember_epoch(a)
            if a.policy in self.placed:
                self.assignments[a.policy] = a
        self._recompute(now)

    def set_policies(self, policies: Iterable[PolicyConfig], now: float) -> None:
        """Replace the policy set (config is authoritative); epochs are remembered."""
        new = {p.name: p for p in policies}
        self.groups = {}
        placed = {m.name: m for p in new.values() for m in self._expand(p)}
        for name in sorted(set(self.placed) - set(placed)):
            self._forget(name)
            alog.warning("policy removed", extra={"policy": name})
        for m in placed.values():
            self._note_since(m, now)
        self.policies, self.placed = new, placed
        self._recompute(now)

    def _expand(self, p: PolicyConfig) -> list[PolicyConfig]:
        """The policies `p` is placed as (its members, for a group), noting the group."""
        out = cgroups.members(p)
        if cgroups.is_group(p):
            self.groups[p.name] = tuple(m.name for m in out)
        else:
            self.groups.pop(p.name, None)
        return out

    def members_of(self, name: str) -> list[str]:
        """The placed policies of a stored one: its members, or itself; [] if unknown."""
        if name in self.groups:
            return list(self.groups[name])
        return [name] if name in self.placed else []

    # ------------------------------------------------------------ events

    def register(self, info: NodeInfo, now: float) -> None:
        self.leases.register(info, now)
        self.clocks.forget(info.id)   # a restarted node may run on a corrected clock
        self._recompute(now)

    def heartbeat(self, node_id: str, reports: Iterable[Report], now: float,
                  bytes_per_s: float = 0.0, sent_time_ns: int = 0,
                  received_wall_s: float = 0.0) -> bool:
        """Renew the node's lease and store its reports; False if the node is unknown.
        `sent_time_ns` (the node's clock) and `received_wall_s` (ours) feed the
        clock offset estimate."""
        renewal = self.leases.renew(node_id, now, bytes_per_s)
        if renewal is Renewal.UNKNOWN:
            return False
        self.clocks.note(node_id, sent_time_ns, received_wall_s)
        fresh = {(node_id, r.policy): r for r in reports}
        for key in [k for k in self.reports if k[0] == node_id and k not in fresh]:
            del self.reports[key]
        self.reports.update(fresh)
        if renewal is Renewal.CAME_UP:
            self._recompute(now)
        return True

    def seen_by_leader(self, node_id: str, age_s: float, reports: Iterable[Report],
                       bytes_per_s: float, now: float) -> None:
        """A standby's view of a node the leader heard `age_s` ago, with these reports
        (the store's liveness entry): up, as the leader sees it. Placement is not
        recomputed: a standby shows the stored assignments."""
        node = self.leases.nodes.get(node_id)
        if node is None:
            return
        node.up, node.last_seen = True, now - age_s
        node.bytes_per_s = max(0.0, bytes_per_s) if bytes_per_s == bytes_per_s else 0.0
        for key in [k for k in self.reports if k[0] == node_id]:
            del self.reports[key]
        self.reports.update({(node_id, r.policy): r for r in reports})

    def mark_down(self, node_id: str, now: float) -> bool:
        """Take a node down before its lease runs out (failed probe); True if it was up."""
        was = self.leases.mark_down(node_id, now)
        if was:
            self._recompute(now)
        return was

    def set_policy(self, policy: PolicyConfig, now: float) -> None:
        """Add or replace one policy (validated by the caller)."""
        before = self.members_of(policy.name)
        members = self._expand(policy)
        for m in members:
            if self.placed.get(m.name) != m:
                # new parameters (RPO, retention, bandwidth...) travel in the
                # assignment: push it even when the endpoints stay the same
                self._dirty.add(m.name)
            self._note_since(m, now)
        for name in sorted(set(before) - {m.name for m in members}):
            # a group that lost a filter (or became a one-filter policy, or one became
            # a group): the old names are gone, their epochs kept
            self.placed.pop(name, None)
            self._forget(name)
            alog.warning("policy removed", extra={"policy": name})
        self.placed.update((m.name, m) for m in members)
        self.policies[policy.name] = policy
        self._recompute(now)

    def request_sync(self, name: str, now_ns: int) -> int:
        """A new sync request id for the policy: larger than any before (ns-based, so
        it still grows after a coordinator restart)."""
        names = self.members_of(name) or [name]
        rid = max(now_ns, *(self.sync_requests.get(n, 0) + 1 for n in names))
        for n in names:   # a group: every member resyncs
            self.sync_requests[n] = rid
        return rid

    def resyncs_asked(self, node_id: str, reports: Iterable[Report]) -> list[str]:
        """Policies whose target (this node) asks for a digest resync it has not asked
        for before (a corrupt committed delta, cdp_target/repair.py)."""
        out = []
        for r in reports:
            p = self.placed.get(r.policy)
            if p is None or p.target != node_id or not r.resync_request_id:
                continue
            if r.resync_request_id > self.target_resyncs.get(r.policy, 0):
                self.target_resyncs[r.policy] = r.resync_request_id
                out.append(r.policy)
        return out

    def delete_policy(self, name: str, now: float) -> bool:
        if name not in self.policies:
            return False
        for m in self.members_of(name):
            self.placed.pop(m, None)
            self._forget(m)
        del self.policies[name]
        self.groups.pop(name, None)
        self.lag_trends.pop(name, None)
        alog.warning("policy deleted", extra={"policy": name})
        self._recompute(now)
        return True

    def node_by_address(self, address: str) -> str:
        return self.leases.node_by_address(address)

    def is_up(self, node_id: str, now: float) -> bool:
        """Up, or restored and still in grace."""
        return self.leases.in_service(node_id, now)

    def tick(self, now: float) -> list[str]:
        """Expire leases, recompute; return the policies changed since the last tick."""
        self.leases.expire(now)
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
        return status(self.nodes, self.placed, self.assignments, self.reports,
                      self.sync_requests, now, now if wall_now is None else wall_now,
                      self.clocks.offsets(), self.skew_alarm_s, self.since, self.lease_s,
                      functools.partial(self._breach_in, now), frozenset(self.draining),
                      {g: self.policies[g] for g in self.groups})

    def _breach_in(self, now: float, policy: str, lag: float) -> float | None:
        """Feed the policy's lag trend (one sample a second) and forecast the breach."""
        p = self.placed.get(policy) or self.policies.get(policy)   # a member, or a group
        if p is None:
            return None
        trend = self.lag_trends.get(policy)
        if trend is None:
            # The lag moves in steps of an interval (one delta made durable); two
            # acked at once drop it by two: still a rise. An idle spell's jump and
            # fall is far larger and gives no forecast (cdp_common.forecast).
            trend = self.lag_trends[policy] = Trend(
                window_s=LAG_WINDOW_S, min_span_s=LAG_WINDOW_S / 3, min_slope=LAG_MIN_SLOPE,
                tolerance=2 * p.rpo_interval_s + 1.0, min_interval_s=1.0)
        trend.add(now, lag)
        return trend.eta(p.rpo_error_s)

    # ------------------------------------------------------------ assignment

    def _remember_epoch(self, a: Assignment) -> None:
        self._epoch_floor[a.policy] = max(self._epoch_floor.get(a.policy, 0), a.epoch)

    def _note_since(self, p: PolicyConfig, now: float) -> None:
        old = self.placed.get(p.name)
        if old is None or p.name not in self.since or policy_nodes(old) != policy_nodes(p):
            self.since[p.name] = now

    def _forget(self, name: str) -> None:
        """Drop a policy's assignment, keeping its epoch as a floor; push the removal."""
        self.since.pop(name, None)
        self.lag_trends.pop(name, None)
        a = self.assignments.pop(name, None)
        if a is not None:
            self._remember_epoch(a)
        self._dirty.add(name)

    def _inputs(self, now: float) -> tuple[object, ...]:
        """Everything `place_all` and `plan_moves` read, as a value to compare (cheap:
        the dicts are shallow copies of frozen values, compared by identity first)."""
        cap_by_bytes = any(n.info.capacity_bytes_per_s for n in self.nodes.values())
        return (dict(self.placed), dict(self.groups), dict(self.assignments),
                dict(self._epoch_floor),
                frozenset(self.draining), self.rebalance_per_minute,
                self._rebalance_budget(now) > 0,
                tuple((nid, n.info, n.up, in_service(n, now),
                       n.bytes_per_s if cap_by_bytes else 0.0)
                      for nid, n in self.nodes.items()))

    def _recompute(self, now: float) -> None:
        """Place every policy and rebalance, unless the inputs are those of the last
        run and it changed nothing (the fast path, see `_settled`)."""
        inputs = self._inputs(now)
        if inputs == self._settled:
            return
        changed, rebinds = place_all(self.placed, self.assignments, self._epoch_floor,
                                     self.nodes, now, frozenset(self.draining),
                                     groups=self.groups)
        self.rebinds += rebinds
        self.assignments.update(changed)
        self._dirty.update(changed)
        moved = self._rebalance(now)
        self._settled = inputs if not changed and not moved else None

    def drain(self, node_id: str, on: bool, now: float,
              dry_run: bool = False) -> list[tuple[str, str, Assignment]]:
        """Drain (or undrain) a proxy: (policy, slot, new assignment) of every proxy
        slot that leaves it; with `dry_run` what would, and nothing changes."""
        before = dict(self.assignments)
        if dry_run:
            draining = self.draining | {node_id} if on else self.draining - {node_id}
            after = {**before, **place_all(self.placed, before, self._epoch_floor,
                                           self.nodes, now, frozenset(draining),
                                           quiet=True, groups=self.groups)[0]}
        else:
            if on:
                self.draining.add(node_id)
            else:
                self.draining.discard(node_id)
            self._recompute(now)
            after = self.assignments
        out = []
        for name, old in sorted(before.items()):
            new = after.get(name, old)
            for slot, was, now_ep in (("source", old.source_proxy, new.source_proxy),
                                      ("target", old.target_proxy, new.target_proxy)):
                if was.node_id == node_id and now_ep.node_id != node_id:
                    out.append((name, slot, new))
        return out

    def _rebalance_budget(self, now: float) -> int:
        """Moves the rebalancer may still make this minute."""
        if self.rebalance_per_minute <= 0:
            return 0
        self._move_times = [t for t in self._move_times if now - t < 60.0]
        return self.rebalance_per_minute - len(self._move_times)

    def _rebalance(self, now: float) -> int:
        """Apply the rebalancer's moves, at most `rebalance_per_minute` a minute; returns
        how many it made."""
        budget = self._rebalance_budget(now)
        if budget <= 0:
            return 0
        moves = plan_moves(self.placed, self.assignments, self.nodes, now, budget,
                           frozenset(self.draining), self.groups)
        for m in moves:
            old = self.assignments[m.policy]
            to = Endpoint(m.to_id, self.nodes[m.to_id].info.address)
            new = replace(old, source_proxy=to) if m.what == "source" else \
                replace(old, target_proxy=to)
            new = replace(new, epoch=old.epoch + 1)
            self.assignments[m.policy] = new
            self._dirty.add(m.policy)
            self._move_times.append(now)
            self.moves += 1
            alog.info("rebalanced: %s proxy %s -> %s (%d moves left this minute)", m.what,
                      m.from_id, m.to_id,
                      self.rebalance_per_minute - len(self._move_times),
                      extra={"policy": m.policy, "epoch": new.epoch})
        return len(moves)
