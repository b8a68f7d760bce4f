"""gRPC shell around the coordinator state machine.

`CoordinatorService` owns a `CoordinatorState`, persists what changes to a
`StateStore`, and serves `cdp.v1.Coordinator`. Every RPC and the background
ticker end in `flush()`: tick the state, persist the changed assignments,
and offer each watcher its new `AssignmentSet` when it differs from the last
one offered. A watcher's queue holds one set ("latest wins"): a slow watcher
skips intermediate sets but always ends on the current one, and memory per
watcher is bounded.

Time: leases use `clock` (monotonic seconds); RPO lag uses `wall` (epoch
seconds), because capture times come from the nodes' wall clocks.

Policies: the store is authoritative, except that the config file's policies
are applied to it at every start (cdp_coordinator.reconcile; a CLI change to
one of them is answered with a warning saying so). The policy RPCs validate
with the same code as the config loader (`cdp_common.config.build_policy`)
plus the disk rules (cdp_coordinator.diskrules: one disk, one policy; no
shrinking) and refuse bad input with INVALID_ARGUMENT naming the field,
changing nothing. Failover plans (SavePlan & co.) are only kept here, in the
store, read from it at every call; a plan must name known policies (or
consistency groups) when it is saved. A delete with `purge` hands the deleted policy's nodes a
purge order for PURGE_KEEP_S (in memory) in their assignment sets.

Unreachable reports: `ReportUnreachable` probes the named node with a
grpc.health.v1 Check (PROBE_TIMEOUT_S, the coordinator's own TLS). A failed
probe takes the node down at once (`CoordinatorState.mark_down`) and the
flush pushes the new assignments; concurrent reports of one node share one
probe, and a node that answered a probe is not probed again for
PROBE_MIN_INTERVAL_S.

RPO alarms: the ticker feeds each policy's alarm level to an `AlarmTracker`
and appends its events to the store's event log. Alarms are evaluated only
once every node had a lease period to report after a (re)start, so a
coordinator restart does not clear alarms for lack of figures.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cdp_common import assignsig, groups, rpc
from cdp_common.config import CoordinatorConfig, PolicyConfig, build_policy
from cdp_common.coordclient import leader_trailer, standby_trailer
from cdp_common.errors import (
    AlreadyExistsError,
    CdpError,
    ConfigError,
    InvalidRequestError,
    NotAuthorizedError,
    NotFoundError,
    UnavailableError,
)
from cdp_common.names import NAME_RULE, is_name
from cdp_common.pb.cdp.v1 import assignment_pb2 as apb
from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
from cdp_common.pb.cdp.v1 import coordinator_pb2_grpc as cgrpc
from cdp_common.states import AlarmKind, AlarmLevel
from cdp_coordinator.alarms import AlarmEvent, AlarmTracker, Level, level_of
from cdp_coordinator.diskrules import disk_conflicts
from cdp_coordinator.model import (
    NO_PROGRESS,
    NOT_VERIFIED,
    SOURCE_ROLES,
    TARGET_ROLES,
    Assignment,
    Endpoint,
    Gap,
    NodeInfo,
    Report,
    Role,
    Status,
    SyncProgress,
    Verified,
)
from cdp_coordinator.reconcile import config_owned, reconcile
from cdp_coordinator.state import CoordinatorState
from cdp_coordinator.store import (
    Liveness,
    Plan,
    PlanGroup,
    StateStore,
    check_plan,
    policy_to_json,
)

log = logging.getLogger("coord.service")
plog = logging.getLogger("coord.policy")
alarm_log = logging.getLogger("coord.alarm")

TICK_S = 0.2
PURGE_KEEP_S = 24 * 3600.0
"""How long a purge order is handed to the nodes of a deleted policy."""
PROBE_TIMEOUT_S = 1.0
PROBE_MIN_INTERVAL_S = 1.0
STANDBY_REFRESH_S = 1.0
"""A standby reloads its read-only view from the store this often."""
LIVENESS_SAVE_S = 0.5
"""The leader saves the heartbeats heard since the last save this often (store.Liveness)."""

Probe = Callable[[str], Awaitable[str]]
"""Probe(address) -> "" when the node answers SERVING, else why not."""


def plan_pb(p: Plan) -> cpb.Plan:
    return cpb.Plan(name=p.name, groups=[cpb.PlanGroup(policies=list(g.policies),
                                                       delay_s=g.delay_s) for g in p.groups])


def plan_from_pb(p: cpb.Plan) -> Plan:
    """The plan a request carries, checked (InvalidRequestError naming the field)."""
    return check_plan(Plan(name=p.name, groups=tuple(
        PlanGroup(policies=tuple(g.policies), delay_s=g.delay_s) for g in p.groups)))


def _endpoint(e: Endpoint) -> cpb.Endpoint:
    return cpb.Endpoint(node_id=e.node_id, address=e.address)


def claims_pb(a: Assignment, p: PolicyConfig) -> apb.AssignmentClaims:
    """What the coordinator vouches for in assignment `a` (cdp_common.assignsig)."""
    return apb.AssignmentClaims(
        policy=a.policy, epoch=a.epoch,
        filter_id=a.filter.node_id, filter_address=a.filter.address,
        source_proxy_id=a.source_proxy.node_id, source_proxy_address=a.source_proxy.address,
        target_proxy_id=a.target_proxy.node_id, target_proxy_address=a.target_proxy.address,
        target_id=a.target.node_id, target_address=a.target.address,
        encryption=p.encryption, short_term_retention_s=p.short_term_retention_s,
        long_term_interval_s=p.long_term_interval_s,
        long_term_retention_s=p.long_term_retention_s,
        disks=[apb.ClaimedDisk(disk_id=i, filter=d.filter, name=d.name, size_bytes=d.size_bytes)
               for i, d in enumerate(p.disks)],
        group=a.group, group_members=list(a.group_members), frozen=p.frozen,
        verify_every_s=p.verify_every_s)


def assignment_pb(a: Assignment, p: PolicyConfig, sync_request_id: int = 0,
                  signer: assignsig.Signer | None = None) -> cpb.Assignment:
    return cpb.Assignment(
        signed=signer.sign(claims_pb(a, p)) if signer is not None else None,
        policy=a.policy, epoch=a.epoch, filter=_endpoint(a.filter),
        source_proxy=_endpoint(a.source_proxy), target_proxy=_endpoint(a.target_proxy),
        target=_endpoint(a.target),
        disks=[cpb.PolicyDisk(disk_id=i, filter=d.filter, name=d.name, size_bytes=d.size_bytes)
               for i, d in enumerate(p.disks)],
        rpo_interval_s=p.rpo_interval_s, compression_level=p.compression_level,
        encryption=p.encryption, reason=a.reason,
        bandwidth_limit_mbps=p.bandwidth_limit_mbps,
        short_term_retention_s=p.short_term_retention_s,
        long_term_interval_s=p.long_term_interval_s,
        long_term_retention_s=p.long_term_retention_s, sync_request_id=sync_request_id,
        group=a.group, group_members=list(a.group_members), frozen=p.frozen,
        verify_every_s=p.verify_every_s)


IDENTITY_ROLE = {Role.FILTER: "filter", Role.SOURCE_PROXY: "source-proxy",
                 Role.TARGET_PROXY: "target-proxy", Role.TARGET: "target",
                 Role.PROXY_BOTH: "proxy"}
"""The certificate role (cdp_common.identity) a node of each registered role holds."""


def check_claim(context: Any, node_id: str, role: Role | None, what: str) -> None:
    """A node speaks only for itself: its certificate's id (and role, when one is
    claimed) must be the claimed ones. Ids are names in any mode (a newline in a node
    id would forge status lines). Raises NotAuthorizedError / InvalidRequestError."""
    if not is_name(node_id):
        raise InvalidRequestError(f"{what}: node id {node_id!r} is not a valid name "
                                  f"({NAME_RULE})")
    who = assignsig.peer_of(context)
    if who is None:
        return   # tls.insecure: no identities (cdp_common.authz is not installed either)
    if who.id != node_id or (role is not None and who.role != IDENTITY_ROLE.get(role)):
        claimed = f"{IDENTITY_ROLE.get(role, 'node')} {node_id}" if role is not None \
            else f"node {node_id}"
        raise NotAuthorizedError(f"{what}: {who} may not speak for {claimed}")


def node_info_pb(n: NodeInfo) -> cpb.NodeInfo:
    return cpb.NodeInfo(id=n.id, role=n.role, site=n.site, address=n.address,  # type: ignore[arg-type]
                        capacity=n.capacity, metrics_address=n.metrics_address, pid=n.pid,
                        capacity_bytes_per_s=n.capacity_bytes_per_s)


def unknown_message(node_id: str, policy: str) -> str:
    return (f"{node_id} protects policy {policy}, which the coordinator does not know: "
            f"its writes are captured but replicated nowhere (`cdpctl policy create`, or "
            f"remove it from the filter's config)")


def status_pb(status: Status, now_ns: int, policies: dict[str, PolicyConfig] | None = None,
              alarms: Mapping[str, str] | None = None,
              skew_alarm_s: float = 0.5) -> cpb.StatusReply:
    return cpb.StatusReply(
        nodes=[cpb.NodeStatus(info=node_info_pb(n.info), state=n.state,
                              last_seen_age_s=n.last_seen_age_s,
                              clock_offset_s=n.clock_offset_s or 0.0,
                              clock_offset_known=n.clock_offset_s is not None,
                              draining=n.draining)
               for n in status.nodes],
        policies=[cpb.PolicyStatus(
            name=p.name, source_proxy=p.source_proxy, target_proxy=p.target_proxy,
            target=p.target, filter=p.filter, epoch=p.epoch, captured_seq=p.captured_seq,
            durable_seq=p.durable_seq, applied_seq=p.applied_seq, rpo_lag_s=p.rpo_lag_s,
            bytes_replicated=p.bytes_replicated, journal_bytes=p.journal_bytes, state=p.state,
            reason=p.reason, rpo_interval_s=p.rpo_interval_s, rpo_warning_s=p.rpo_warning_s,
            rpo_error_s=p.rpo_error_s,
            enabled=(policies or {}).get(p.name, PolicyConfig("", [], "")).enabled,
            bandwidth_limit_mbps=(policies or {}).get(
                p.name, PolicyConfig("", [], "")).bandwidth_limit_mbps,
            alarm=(alarms or {}).get(p.name, ""),
            capture_mode=p.progress.capture_mode, dirty_bytes=p.progress.dirty_bytes,
            gap_begin_time_ns=p.progress.gap_begin_time_ns,
            sync_done_bytes=p.progress.sync_done_bytes,
            sync_total_bytes=p.progress.sync_total_bytes,
            sync_rate_bps=p.progress.sync_rate_bps, sync_eta_s=p.progress.sync_eta_s,
            gaps=[cpb.GapInfo(begin_seq=g.begin_seq, end_seq=g.end_seq,
                              begin_time_ns=g.begin_time_ns, end_time_ns=g.end_time_ns,
                              reason=g.reason) for g in p.gaps],
            sync_phase=p.progress.sync_phase, sync_id=p.progress.sync_id,
            sync_done_id=p.progress.sync_done_id, sync_reason=p.progress.sync_reason,
            sync_request_id=p.sync_request_id, rpo_breach_in_s=p.rpo_breach_in_s,
            journal_full_in_s=p.journal_full_in_s, frozen=p.frozen,
            verified_point_id=p.verified.point_id, verified_ok=p.verified.ok,
            verified_ns=p.verified.time_ns, verify_detail=p.verified.detail,
            verify_every_s=p.verified.every_s) for p in status.policies],
        now_ns=now_ns, clock_skew_alarm_s=skew_alarm_s,
        unknown_policies=[cpb.UnknownPolicy(node_id=n, policy=p) for n, p in status.unknown])


def report_from_pb(r: cpb.PolicyReport) -> Report:
    return Report(policy=r.policy, captured_seq=r.captured_seq,
                  captured_time_ns=r.captured_time_ns, durable_seq=r.durable_seq,
                  newest_time_ns=r.newest_time_ns, bytes_replicated=r.bytes_replicated,
                  journal_bytes=r.journal_bytes, error=r.error, applied_seq=r.applied_seq,
                  progress=SyncProgress(
                      capture_mode=r.capture_mode, dirty_bytes=r.dirty_bytes,
                      gap_begin_time_ns=r.gap_begin_time_ns, sync_phase=r.sync_phase,
                      sync_id=r.sync_id, sync_done_id=r.sync_done_id,
                      sync_reason=r.sync_reason, sync_done_bytes=r.sync_done_bytes,
                      sync_total_bytes=r.sync_total_bytes, sync_rate_bps=r.sync_rate_bps,
                      sync_eta_s=r.sync_eta_s) if r.capture_mode or r.sync_phase
                  or r.sync_done_id else NO_PROGRESS,
                  gaps=tuple(Gap(g.begin_seq, g.end_seq, g.begin_time_ns, g.end_time_ns,
                                 g.reason) for g in r.gaps),
                  resync_request_id=r.resync_request_id, no_store=r.no_store,
                  journal_full_in_s=r.journal_full_in_s, checkpoint_id=r.checkpoint_id,
                  checkpoint_time_ns=r.checkpoint_time_ns, frozen=r.frozen,
                  verified=Verified(r.verified_point_id, r.verified_ok, r.verified_ns,
                                    r.verify_detail, r.verify_every_s)
                  if r.verified_ns or r.verify_every_s else NOT_VERIFIED)


class _Watcher:
    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.queue: asyncio.Queue[cpb.AssignmentSet | None] = asyncio.Queue(maxsize=1)
        self.last: cpb.AssignmentSet | None = None

    def offer(self, item: cpb.AssignmentSet | None) -> None:
        """Replace whatever is still queued: the newest set wins."""
        while True:
            try:
                self.queue.put_nowait(item)
                return
            except asyncio.QueueFull:
                self.queue.get_nowait()


def alarm_pb(e: AlarmEvent) -> cpb.AlarmEvent:
    return cpb.AlarmEvent(id=e.id, time_ns=e.time_ns, policy=e.policy, kind=e.kind,
                          level=e.level, rpo_lag_s=e.rpo_lag_s, message=e.message)


class CoordinatorService(cgrpc.CoordinatorServicer):
    def __init__(self, config: CoordinatorConfig, store: StateStore,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time,
                 probe: Probe | None = None, signer: assignsig.Signer | None = None,
                 leading: bool = True, takeover_grace_s: float | None = None) -> None:
        self.config = config
        self.signer = signer
        """Signs every assignment sent (None: unsigned, only with tls.insecure)."""
        self.store = store
        self.clock = clock
        self.wall = wall
        self.heartbeat_ms = config.coordinator.heartbeat_ms
        self.lease_ms = config.coordinator.lease_ms
        self.state = CoordinatorState(lease_s=self.lease_ms / 1000)
        self.state.skew_alarm_s = config.coordinator.clock_skew_alarm_ms / 1000
        self.state.rebalance_per_minute = config.coordinator.rebalance_max_per_minute
        self._watchers: set[_Watcher] = set()
        self._unsaved: set[str] = set()
        self._closed = False
        self.probe: Probe = probe or self._health_probe
        self._probes: dict[str, asyncio.Task[str]] = {}
        self._probed_ok: dict[str, float] = {}
        self.alarms = AlarmTracker()
        self.purges: dict[str, tuple[float, frozenset[str]]] = {}
        """Policies deleted with purge: (until when, the nodes that held data of it)."""
        self.leading = leading
        """This coordinator leads (always, with one coordinator); a standby only reads."""
        self.want_lead = False
        """Elected, but the state could not be loaded yet (the ticker retries)."""
        self.leader_address = ""
        """A standby's leader, as the election key names it ("" = none known)."""
        self.address = ""
        """This coordinator's own advertised address (set by the daemon; logs only)."""
        self.takeover_grace_s = max(self.lease_ms / 1000, takeover_grace_s or 0.0)
        self._view_at = -1e9
        self._alarms_from = 0.0
        self._heard: dict[str, Liveness] = {}
        """Heartbeats heard since the last `save_liveness` (the leader's)."""
        self._liveness_at = -1e9
        self._load(write=leading)

    def _load(self, *, write: bool, grace_s: float | None = None) -> None:
        """(Re)build the state from the store. `write`: as the leader, which applies the
        config file's policies and persists what the restore changed; else a standby's
        read-only view. Nodes are in grace for `grace_s` (default one lease)."""
        alarms = AlarmTracker()
        alarms.restore(self.store.alarm_levels())
        snap = self.store.load()
        if write:
            changes = reconcile(self.config.policies, {p.name: p for p in snap.policies})
            for change in changes:   # the config file's policies are the file's, every start
                self.store.save_policy(change.policy)
                plog.info("policy %s", change.text, extra={"policy": change.policy.name})
            if changes:
                snap = self.store.load()
        state = CoordinatorState(lease_s=self.lease_ms / 1000)
        state.skew_alarm_s = self.config.coordinator.clock_skew_alarm_ms / 1000
        state.rebalance_per_minute = self.config.coordinator.rebalance_max_per_minute
        now = self.clock()
        state.restore(snap.nodes, snap.policies, snap.assignments, now, grace_s,
                      snap.sync_requests, snap.drains)
        self.state, self.alarms = state, alarms
        self._alarms_from = now + max(self.lease_ms / 1000, grace_s or 0.0)
        self._view_at = now
        if not write:
            self._view_liveness(now)
        if write:
            self._unsaved.clear()
            self.flush()
            log.info("coordinator state loaded: %d nodes, %d policies",
                     len(self.state.nodes), len(self.state.policies))

    # ------------------------------------------------------------ leadership

    def become_leader(self) -> bool:
        """Elected: load the state from the store (same assignments, same epochs; the
        nodes get `takeover_grace_s` to find this coordinator) and serve. False when the
        store cannot be read yet (the ticker retries). Raises nothing."""
        self.want_lead = True
        try:
            self._load(write=True, grace_s=self.takeover_grace_s)
        except CdpError as exc:
            log.error("elected, but cannot load the state yet: %s", exc)
            return False
        self.want_lead = False
        self.leading = True
        self.leader_address = ""
        log.warning("leading: %d nodes in grace for %.1f s, %d policies",
                    len(self.state.nodes), self.takeover_grace_s, len(self.state.policies))
        return True

    def become_standby(self, leader: str) -> None:
        """Not (or no longer) the leader: stop writing, end the watch streams (their
        nodes reconnect and are sent to `leader`), serve read-only status."""
        was = self.leading
        self.leading = self.want_lead = False
        self.leader_address = leader
        if was:
            self._end_watches()
            self._view_at = -1e9   # refresh the view from the store at the next tick

    def _view_liveness(self, now: float) -> None:
        """A standby's view: the nodes the leader heard within a lease are up, with the
        reports of their newest heartbeat (the store's liveness entries)."""
        try:
            entries = self.store.load_liveness()
        except CdpError as exc:
            log.warning("standby view: node liveness unreadable, nodes shown down: %s", exc)
            return
        wall = self.wall()
        for e in entries:
            try:
                beat = cpb.HeartbeatRequest.FromString(e.payload)
            except Exception as exc:   # protobuf's DecodeError: a foreign or damaged entry
                log.warning("standby view: liveness of node %s does not decode: %s",
                            e.node_id, exc)
                continue
            age = min(max(0.0, wall - e.seen_wall_ns / 1e9), self.lease_ms / 1000)
            self.state.seen_by_leader(e.node_id, age, [report_from_pb(r) for r in beat.policies],
                                      beat.bytes_per_s, now)

    def save_liveness(self) -> None:
        """The leader: store the heartbeats heard since the last save. Raises CdpError."""
        if not self._heard or self.clock() - self._liveness_at < LIVENESS_SAVE_S:
            return
        heard, self._heard = list(self._heard.values()), {}
        self._liveness_at = self.clock()
        self.store.save_liveness(heard, self.lease_ms / 1000)

    def _end_watches(self) -> None:
        for w in list(self._watchers):
            w.offer(None)

    async def _lead_or_abort(self, context: grpc.aio.ServicerContext, what: str) -> None:
        """Refuse a call that only the leader serves: UNAVAILABLE naming the leader."""
        if self.leading:
            return
        leader = self.leader_address
        why = (f"{what}: this coordinator is a standby; the leader is {leader}" if leader
               else f"{what}: this coordinator is a standby and no leader is elected yet")
        await context.abort(grpc.StatusCode.UNAVAILABLE, why,
                            trailing_metadata=rpc.answered_trailer() + leader_trailer(leader))

    def _mark_read(self, context: grpc.aio.ServicerContext) -> None:
        """A standby's answer says so, and names the leader (clients prefer it)."""
        if not self.leading:
            context.set_trailing_metadata(standby_trailer(self.leader_address))

    # ------------------------------------------------------------ plumbing

    def flush(self) -> list[str]:
        """Tick the state; persist and push what changed. Raises StorageError."""
        changed = self.state.tick(self.clock())
        self._unsaved.update(changed)
        if self._unsaved:
            rows = [self.state.assignments[n] for n in sorted(self._unsaved)
                    if n in self.state.assignments]
            self.store.save_assignments(rows)
            self._unsaved.clear()
        if changed:
            self._notify()
        return changed

    def _save_sync(self, name: str) -> None:
        """Persist the policy's (its members') sync request. Raises StorageError."""
        names = self.state.members_of(name) or [name]
        self.store.save_sync_requests({n: self.state.sync_requests[n] for n in names
                                       if n in self.state.sync_requests})

    def _check_live_role(self, node_id: str, role: Role) -> None:
        """A live node keeps its role: another process cannot re-register its id as
        something else while its lease runs (insecure labs included)."""
        known = self.state.nodes.get(node_id)
        if known is None or known.info.role == role or not known.up:
            return
        raise NotAuthorizedError(f"Register: node {node_id} is up as role "
                                 f"{Role(known.info.role).name.lower()}; it cannot be "
                                 f"re-registered as {role.name.lower()} while its lease runs")

    def register(self, info: NodeInfo) -> None:
        """Register (or re-register) a node, persist it, push changes. Raises StorageError."""
        self.state.register(info, self.clock())
        self.store.save_node(info)
        self.flush()

    def _notify(self) -> None:
        for w in list(self._watchers):
            current = self.assignment_set(w.node_id)
            if current != w.last:
                w.last = current
                w.offer(current)

    def assignment_set(self, node_id: str) -> cpb.AssignmentSet:
        now = self.clock()
        for name in [n for n, (until, _) in self.purges.items() if until < now]:
            del self.purges[name]
        return cpb.AssignmentSet(assignments=[
            assignment_pb(a, self.state.placed[a.policy],
                          self.state.sync_requests.get(a.policy, 0), self.signer)
            for a in self.state.assignments_for(node_id)],
            purge_policies=sorted(n for n, (_, nodes) in self.purges.items()
                                  if node_id in nodes))

    async def ticker(self, period_s: float = TICK_S) -> None:
        """Expire leases, push changes and track alarms until cancelled."""
        while True:
            await asyncio.sleep(period_s)
            try:
                if self.want_lead and not self.leading:
                    self.become_leader()
                if self.leading:
                    self.flush()
                    self.check_alarms()
                    self.save_liveness()
                elif self.clock() - self._view_at >= STANDBY_REFRESH_S:
                    self._load(write=False)
            except CdpError as exc:
                log.error("%s", exc)

    def check_alarms(self) -> list[AlarmEvent]:
        """Feed every policy's alarm level to the tracker; log and store the events."""
        if self.clock() < self._alarms_from:
            return []
        wall = self.wall()
        levels = []
        status = self.state.status(self.clock(), wall)
        for p in status.policies:
            level, message = level_of(p.state, p.rpo_lag_s, p.reason, p.rpo_warning_s,
                                      p.rpo_error_s, p.enabled)
            levels.append(Level(p.name, level, p.rpo_lag_s, message))
        for node_id, name in status.unknown:
            levels.append(Level(name, AlarmLevel.ERROR, 0.0, unknown_message(node_id, name)))
        events = self.alarms.update(levels, wall)
        if events:
            events = self.store.add_alarms(events)
            for e in events:
                (alarm_log.info if e.kind is AlarmKind.CLEARED else alarm_log.warning)(
                    "alarm %s (%s): %s", e.kind, e.level, e.message, extra={"policy": e.policy})
        return events

    def close(self) -> None:
        """End every watch stream (used on shutdown)."""
        self._closed = True
        self._end_watches()

    async def _flush_or_abort(self, context: grpc.aio.ServicerContext) -> None:
        try:
            self.flush()
        except CdpError as exc:
            log.error("%s", exc)
            await rpc.abort(context, exc, grpc.StatusCode.UNAVAILABLE)

    # ------------------------------------------------------------ RPCs

    async def Register(self, request: cpb.RegisterRequest,
                       context: grpc.aio.ServicerContext) -> cpb.RegisterReply:
        await self._lead_or_abort(context, "Register")
        n = request.node
        if not n.id:
            await rpc.abort(context, InvalidRequestError("node.id is empty"))
        if n.role not in {int(r) for r in Role} or n.role == Role.UNSPECIFIED:
            await rpc.abort(context, InvalidRequestError(
                f"node {n.id}: role {n.role} is not a valid role"))
        try:
            check_claim(context, n.id, Role(n.role), "Register")
            self._check_live_role(n.id, Role(n.role))
        except CdpError as exc:
            await rpc.abort(context, exc)
        info = NodeInfo(id=n.id, role=int(n.role), site=n.site or "default", address=n.address,
                        capacity=n.capacity, metrics_address=n.metrics_address, pid=n.pid,
                        capacity_bytes_per_s=n.capacity_bytes_per_s)
        try:
            self.register(info)
        except CdpError as exc:
            log.error("%s", exc)
            await rpc.abort(context, exc, grpc.StatusCode.UNAVAILABLE)
        return cpb.RegisterReply(heartbeat_ms=self.heartbeat_ms, lease_ms=self.lease_ms)

    async def Heartbeat(self, request: cpb.HeartbeatRequest,
                        context: grpc.aio.ServicerContext) -> cpb.HeartbeatReply:
        await self._lead_or_abort(context, "Heartbeat")
        try:
            check_claim(context, request.node_id, None, "Heartbeat")
        except CdpError as exc:
            await rpc.abort(context, exc)
        reports = [report_from_pb(r) for r in request.policies]
        wall = self.wall()
        known = self.state.heartbeat(request.node_id, reports, self.clock(),
                                     bytes_per_s=request.bytes_per_s,
                                     sent_time_ns=request.sent_time_ns,
                                     received_wall_s=wall)
        if known:
            self._heard[request.node_id] = Liveness(request.node_id, int(wall * 1e9),
                                                    request.SerializeToString())
            asked = self.state.resyncs_asked(request.node_id, reports)
            for name in asked:
                rid = self.state.request_sync(name, time.time_ns())
                try:
                    self._save_sync(name)
                except CdpError as exc:
                    log.error("%s", exc)
                plog.warning("target %s asks for a digest resync (corrupt delta): sync %d "
                             "requested", request.node_id, rid, extra={"policy": name})
            await self._flush_or_abort(context)
            if asked:
                self._notify()
        return cpb.HeartbeatReply(known=known)

    async def WatchAssignments(self, request: cpb.WatchRequest,
                               context: grpc.aio.ServicerContext,
                               ) -> AsyncIterator[cpb.AssignmentSet]:
        if self._closed:
            await rpc.abort(context, UnavailableError("coordinator is shutting down"))
        await self._lead_or_abort(context, "WatchAssignments")
        try:
            check_claim(context, request.node_id, None, "WatchAssignments")
        except CdpError as exc:
            await rpc.abort(context, exc)
        w = _Watcher(request.node_id)
        w.last = self.assignment_set(request.node_id)
        self._watchers.add(w)
        try:
            yield w.last
            while True:
                item = await w.queue.get()
                if item is None:
                    return
                yield item
        finally:
            self._watchers.discard(w)

    async def GetStatus(self, request: cpb.StatusRequest,
                        context: grpc.aio.ServicerContext) -> cpb.StatusReply:
        self._mark_read(context)
        wall = self.wall()
        return status_pb(self.state.status(self.clock(), wall), int(wall * 1e9),
                         {**self.state.placed, **self.state.policies}, self.alarms.current,
                         self.state.skew_alarm_s)

    # ------------------------------------------------------------ policies

    async def _parse(self, context: grpc.aio.ServicerContext, text: str,
                     what: str) -> dict[str, Any]:
        try:
            data = json.loads(text)
        except ValueError as exc:
            await rpc.abort(context, InvalidRequestError(f"{what}: not JSON: {exc}"))
        if not isinstance(data, dict):
            await rpc.abort(context, InvalidRequestError(f"{what}: expected a JSON object"))
        return data

    async def _build(self, context: grpc.aio.ServicerContext,
                     data: dict[str, Any]) -> PolicyConfig:
        try:
            c = self.config.coordinator
            return build_policy(data, max_disk_bytes=c.max_disk_bytes,
                                verify_min_interval_s=c.verify_min_interval_s)
        except ConfigError as exc:
            await rpc.abort(context, exc)
        raise AssertionError("unreachable")

    async def _existing(self, context: grpc.aio.ServicerContext, name: str) -> PolicyConfig:
        p = self.state.policies.get(name)
        if p is None:
            await rpc.abort(context, NotFoundError(f"no policy named {name!r}"))
        assert p is not None
        return p

    def _config_warning(self, name: str, what: str) -> str:
        why = config_owned(name, self.config.policies, "")
        return f"{why}; the next coordinator start {what}" if why else ""

    async def _store_policy(self, context: grpc.aio.ServicerContext, p: PolicyConfig,
                            what: str, old: PolicyConfig | None = None) -> cpb.PolicyReply:
        why = disk_conflicts(p, old, self.state.policies)
        if why:
            await rpc.abort(context, InvalidRequestError(why))
        try:
            self.store.save_policy(p)
        except CdpError as exc:
            await rpc.abort(context, exc, grpc.StatusCode.UNAVAILABLE)
        self.state.set_policy(p, self.clock())
        plog.info("policy %s", what, extra={"policy": p.name})
        await self._flush_or_abort(context)
        return cpb.PolicyReply(policy_json=policy_to_json(p), warning=self._config_warning(
            p.name, "applies the file again") if old is not None else "")

    async def CreatePolicy(self, request: cpb.CreatePolicyRequest,
                           context: grpc.aio.ServicerContext) -> cpb.PolicyReply:
        await self._lead_or_abort(context, "CreatePolicy")
        p = await self._build(context, await self._parse(context, request.policy_json, "policy"))
        if p.name in self.state.policies:
            await rpc.abort(context, AlreadyExistsError(
                f"name: a policy named {p.name!r} already exists"))
        for name in (p.name, *groups.member_names(p)):   # a new policy is not purged
            self.purges.pop(name, None)
        return await self._store_policy(context, p, "created")

    async def UpdatePolicy(self, request: cpb.UpdatePolicyRequest,
                           context: grpc.aio.ServicerContext) -> cpb.PolicyReply:
        await self._lead_or_abort(context, "UpdatePolicy")
        old = await self._existing(context, request.name)
        patch = await self._parse(context, request.patch_json, "patch")
        if "name" in patch and patch["name"] != old.name:
            await rpc.abort(context, InvalidRequestError(
                "name: a policy cannot be renamed (create a new one)"))
        data = {**dataclasses.asdict(old), **patch}
        p = await self._build(context, data)
        return await self._store_policy(context, p, "updated", old)

    async def SetPolicyEnabled(self, request: cpb.SetPolicyEnabledRequest,
                               context: grpc.aio.ServicerContext) -> cpb.PolicyReply:
        await self._lead_or_abort(context, "SetPolicyEnabled")
        old = await self._existing(context, request.name)
        p = dataclasses.replace(old, enabled=request.enabled)
        return await self._store_policy(context, p,
                                        "enabled" if request.enabled else "disabled", old)

    async def DeletePolicy(self, request: cpb.DeletePolicyRequest,
                           context: grpc.aio.ServicerContext) -> cpb.PolicyReply:
        await self._lead_or_abort(context, "DeletePolicy")
        if request.purge and request.name not in self.state.policies:
            # Deleted before: whichever node still keeps data of it deletes it (a node
            # purges only a policy it does not serve, so telling every one is safe).
            if not is_name(request.name):
                await rpc.abort(context, InvalidRequestError(
                    f"name: {request.name!r} is not a policy name ({NAME_RULE})"))
            self.purges[request.name] = (self.clock() + PURGE_KEEP_S,
                                         frozenset(self.state.nodes))
            plog.info("purge of a deleted policy sent to every node",
                      extra={"policy": request.name})
            self._notify()   # no assignment changed: push the order itself
            return cpb.PolicyReply()
        old = await self._existing(context, request.name)
        try:
            self.store.delete_policy(old.name)
        except CdpError as exc:
            await rpc.abort(context, exc, grpc.StatusCode.UNAVAILABLE)
        if request.purge:
            nodes = frozenset({d.filter for d in old.disks} | {old.target})
            # a group's nodes keep its data by member name
            for name in self.state.members_of(old.name):
                self.purges[name] = (self.clock() + PURGE_KEEP_S, nodes)
        self.state.delete_policy(old.name, self.clock())
        plog.info("policy deleted%s", " (data purged on its nodes)" if request.purge else "",
                  extra={"policy": old.name})
        await self._flush_or_abort(context)
        return cpb.PolicyReply(policy_json=policy_to_json(old), warning=self._config_warning(
            old.name, "creates it again from the file"))

    async def GetPolicy(self, request: cpb.PolicyName,
                        context: grpc.aio.ServicerContext) -> cpb.PolicyReply:
        self._mark_read(context)
        return cpb.PolicyReply(policy_json=policy_to_json(
            await self._existing(context, request.name)))

    async def ListPolicies(self, request: cpb.ListPoliciesRequest,
                           context: grpc.aio.ServicerContext) -> cpb.ListPoliciesReply:
        self._mark_read(context)
        return cpb.ListPoliciesReply(policies_json=[
            policy_to_json(p) for _, p in sorted(self.state.policies.items())])

    # ------------------------------------------------------------ unreachable

    async def _health_probe(self, address: str) -> str:
        channel = rpc.channel(address, self.config.tls, 1 << 20)
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=PROBE_TIMEOUT_S)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return ""
            return f"health status {reply.status} (not SERVING)"
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
        finally:
            await channel.close(grace=None)

    async def report_unreachable(self, reporter: str, node_id: str, address: str,
                                 policy: str, detail: str) -> cpb.ReportUnreachableReply:
        nid = node_id or self.state.node_by_address(address)
        node = self.state.nodes.get(nid)
        if node is None:
            return cpb.ReportUnreachableReply(detail=f"unknown node {node_id or address!r}")
        now = self.clock()
        if not self.state.is_up(nid, now):
            return cpb.ReportUnreachableReply(detail=f"{nid} is already down")
        if now - self._probed_ok.get(nid, -1e9) < PROBE_MIN_INTERVAL_S:
            return cpb.ReportUnreachableReply(reachable=True,
                                              detail=f"{nid} answered a probe just now")
        log.info("%s reports %s unreachable: %s; probing", reporter or "a node", nid,
                 detail or "-", extra={"node": nid, "policy": policy})
        task = self._probes.get(nid)
        if task is None:
            task = asyncio.ensure_future(self.probe(node.info.address))
            self._probes[nid] = task
            task.add_done_callback(lambda _t: self._probes.pop(nid, None))
        why = await asyncio.shield(task)
        if not why:
            self._probed_ok[nid] = self.clock()
            log.info("probe: %s is reachable", nid, extra={"node": nid})
            return cpb.ReportUnreachableReply(probed=True, reachable=True,
                                              detail=f"{nid} answers its health check")
        rebound = self.state.mark_down(nid, self.clock())
        log.warning("probe: %s unreachable (%s); taken down", nid, why, extra={"node": nid})
        self.flush()
        return cpb.ReportUnreachableReply(probed=True, reachable=False, rebound=rebound,
                                          detail=f"{nid}: {why}")

    async def ReportUnreachable(self, request: cpb.ReportUnreachableRequest,
                                context: grpc.aio.ServicerContext,
                                ) -> cpb.ReportUnreachableReply:
        await self._lead_or_abort(context, "ReportUnreachable")
        if not request.node_id and not request.address:
            await rpc.abort(context, InvalidRequestError("node_id and address are both empty"))
        reporter = request.reporter
        try:
            who = assignsig.peer_of(context)
            reporter = reporter or (who.id if who is not None else "")
            if reporter:
                check_claim(context, reporter, None, "ReportUnreachable")
        except CdpError as exc:
            await rpc.abort(context, exc)
        try:
            return await self.report_unreachable(reporter, request.node_id,
                                                 request.address, request.policy, request.detail)
        except CdpError as exc:
            await rpc.abort(context, exc, grpc.StatusCode.UNAVAILABLE)
        raise AssertionError("unreachable")

    async def RequestSync(self, request: cpb.PolicyName,
                          context: grpc.aio.ServicerContext) -> cpb.RequestSyncReply:
        await self._lead_or_abort(context, "RequestSync")
        # a group syncs all of its members; a member may be named on its own
        p = self.state.placed.get(request.name) or await self._existing(context, request.name)
        rid = self.state.request_sync(p.name, time.time_ns())
        try:
            self._save_sync(p.name)
        except CdpError as exc:
            await rpc.abort(context, exc, grpc.StatusCode.UNAVAILABLE)
        plog.info("digest sync %d requested", rid, extra={"policy": p.name})
        self._notify()
        return cpb.RequestSyncReply(sync_request_id=rid)

    async def DrainNode(self, request: cpb.DrainNodeRequest,
                        context: grpc.aio.ServicerContext) -> cpb.DrainNodeReply:
        await self._lead_or_abort(context, "DrainNode")
        node = self.state.nodes.get(request.node_id)
        if node is None:
            await rpc.abort(context, NotFoundError(f"no node {request.node_id!r}"))
        assert node is not None
        role = Role(node.info.role)
        if role not in (*SOURCE_ROLES, *TARGET_ROLES):
            why = ("its policies move by naming another target, a full seed: "
                   "`cdpctl node drain` does that" if role == Role.TARGET
                   else "its disks cannot move elsewhere")
            await rpc.abort(context, InvalidRequestError(
                f"{node.info.id} is a {role.name.lower().replace('_', ' ')}, not a proxy: "
                f"{why}"))
        drain = not request.undrain
        if not request.dry_run:   # stored first: a restart or a takeover keeps it
            wanted = (self.state.draining | {node.info.id} if drain
                      else self.state.draining - {node.info.id})
            try:
                self.store.save_drains(frozenset(wanted))
            except CdpError as exc:
                await rpc.abort(context, exc, grpc.StatusCode.UNAVAILABLE)
        moved = self.state.drain(node.info.id, drain, self.clock(), request.dry_run)
        if not request.dry_run:
            plog.warning("proxy %s %s by an operator: %d policy slots move off it",
                         node.info.id, "drained" if drain else "undrained", len(moved))
            await self._flush_or_abort(context)
        draining = (drain if request.dry_run else node.info.id in self.state.draining)
        return cpb.DrainNodeReply(draining=draining, moves=[
            cpb.DrainMove(policy=name, slot=slot,
                          to_node=(a.source_proxy if slot == "source" else a.target_proxy).node_id,
                          reason=a.reason)
            for name, slot, a in moved])

    async def ListAlarms(self, request: cpb.ListAlarmsRequest,
                         context: grpc.aio.ServicerContext) -> cpb.ListAlarmsReply:
        self._mark_read(context)
        limit = request.limit or 1000
        try:
            events = self.store.list_alarms(request.policy, min(limit, 100_000))
        except CdpError as exc:
            await rpc.abort(context, exc, grpc.StatusCode.UNAVAILABLE)
        return cpb.ListAlarmsReply(events=[alarm_pb(e) for e in events],
                                   active=dict(self.alarms.current))

    # ------------------------------------------------------------ failover plans

    async def SavePlan(self, request: cpb.SavePlanRequest,
                       context: grpc.aio.ServicerContext) -> cpb.PlanReply:
        await self._lead_or_abort(context, "SavePlan")
        try:
            plan = plan_from_pb(request.plan)
        except CdpError as exc:
            await rpc.abort(context, exc)
        unknown = [n for n in plan.policies()
                   if n not in self.state.policies and n not in self.state.placed]
        if unknown:
            await rpc.abort(context, NotFoundError(
                f"plan {plan.name}: no policy or consistency group named "
                + ", ".join(unknown) + " (see `cdpctl policy list`)"))
        try:
            if not request.replace and self.store.get_plan(plan.name) is not None:
                await rpc.abort(context, AlreadyExistsError(
                    f"name: a plan named {plan.name!r} already exists (replace it with "
                    f"--replace, or delete it first)"))
            self.store.save_plan(plan)
        except CdpError as exc:
            await rpc.abort(context, exc, grpc.StatusCode.UNAVAILABLE)
        plog.info("failover plan %s %s: %s", plan.name,
                  "saved" if request.replace else "created",
                  " then ".join(",".join(g.policies) for g in plan.groups))
        return cpb.PlanReply(plan=plan_pb(plan))

    async def _stored_plan(self, context: grpc.aio.ServicerContext, name: str) -> Plan:
        try:
            plan = self.store.get_plan(name)
        except CdpError as exc:
            await rpc.abort(context, exc, grpc.StatusCode.UNAVAILABLE)
        if plan is None:
            await rpc.abort(context, NotFoundError(f"no failover plan named {name!r}"))
        assert plan is not None
        return plan

    async def GetPlan(self, request: cpb.PlanName,
                      context: grpc.aio.ServicerContext) -> cpb.PlanReply:
        self._mark_read(context)
        return cpb.PlanReply(plan=plan_pb(await self._stored_plan(context, request.name)))

    async def ListPlans(self, request: cpb.ListPlansRequest,
                        context: grpc.aio.ServicerContext) -> cpb.ListPlansReply:
        self._mark_read(context)
        try:
            plans = self.store.list_plans()
        except CdpError as exc:
            await rpc.abort(context, exc, grpc.StatusCode.UNAVAILABLE)
        return cpb.ListPlansReply(plans=[plan_pb(p) for p in plans])

    async def DeletePlan(self, request: cpb.PlanName,
                         context: grpc.aio.ServicerContext) -> cpb.PlanReply:
        await self._lead_or_abort(context, "DeletePlan")
        plan = await self._stored_plan(context, request.name)
        try:
            self.store.delete_plan(plan.name)
        except CdpError as exc:
            await rpc.abort(context, exc, grpc.StatusCode.UNAVAILABLE)
        plog.info("failover plan %s deleted", plan.name)
        return cpb.PlanReply(plan=plan_pb(plan))
