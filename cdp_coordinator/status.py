"""Status of nodes and policies, and the RPO lag (pure: `now` and `wall` are given).

Theory of operation
-------------------
RPO lag (DESIGN section 4): 0 when the target's durable seq has caught up with
the filter's captured seq; else wall-now minus the oldest capture time known
for the undelivered range: the target's `newest_time_ns` (newest durable
write) or, before any durable write, the filter's `captured_time_ns` (a lower
bound). Capture times come from the filter's wall clock, so wall-now is the
coordinator's clock moved by the filter's estimated offset
(cdp_coordinator.clocks); never negative. `wall_now` (epoch seconds) is apart
from the monotonic `now` that ages heartbeats.

A policy's state (`PolicyState`) is computed from facts: the assignment, the
reports of its nodes, their leases, the lag and the policy's age. Each fact
that stands in the way of "ok" adds a reason; the state is the most severe
class that has one, and the reason shown is all of them, most severe first:

    unprotected  disabled by the operator (lag shown as 0; no other reason
                 counts: nothing is meant to be protected)
    error        no complete assignment: "unassigned: <placement's reason>"
    error        a node reports an error for it (wrong key, fenced, frozen
                 after a failover commit, a failed journal fsync, a full or
                 quarantined target store, an unreachable peer)
    error        a filter of it is not registered or down, or is up and does
                 not report it (no such disk or policy there) once the policy
                 is older than the grace: nothing is captured, however small
                 the lag looks
    error        its target is up and does not report it once the policy is
                 older than the grace (a target reports every policy assigned
                 to it, `no_store` until the first stream arrives)
    error        its target still has no store rpo_error_s after the policy
                 was added: nothing ever reached the DR site
    error        lag >= rpo_error_s
    unprotected  its target has no store yet (no stream has arrived): nothing
                 is on the DR site, not one restore point
    unprotected  within the grace (one lease after the policy was added or
                 moved to another filter or target), a node that does not
                 report it yet: it may not have heard of it yet
    degraded     lag >= rpo_warning_s
    degraded     a gap is open (overflow, sync, repair): the points since it
                 began are not restorable until it closes
    degraded     the filter's or the target's clock is off the coordinator's by
                 more than clock_skew_alarm_s (the lag is corrected, but restore
                 point times are that node's clock)
    degraded     the target's newest verification of a restore point (`cdpctl
                 verify` or the verify_every_s schedule) failed: "restore point
                 N failed verification: <why>" (until a newer one passes)
    ok           none of the above

`age_s` is how long the coordinator has known the policy (monotonic; infinite
when not known, i.e. no grace); `grace_s` is one lease.

Consistency groups (`group_status`): each member policy has its row as
above, and the group one more, named as the group, its `filter` the members'
filters comma-joined, its proxies and target the first member's (all members
share them, see `placement`). A group restore point exists only where every
member has the checkpoint, so the group's RPO lag is the age of the oldest of
its members' newest checkpoints (`checkpoint_time_ns` from the target, each
aged on its filter's clock like the lag above). Its state is the worst of
its members' (error > unprotected > degraded > ok, each member named in the
reason) and of:

    unprotected  disabled (as above), or no member has a checkpoint yet, or
                 one member has none yet while others do (no common point)
    error        a member still has no checkpoint rpo_error_s after the group
                 was added
    error        a member's newest checkpoint trails the newest member's by
                 more than rpo_error_s ("member X has missed checkpoints ...")
    error        group lag >= rpo_error_s
    degraded     a member trails by more than max(3 x rpo_interval_s,
                 rpo_warning_s)
    degraded     group lag >= rpo_warning_s
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from cdp_common import groups as cgroups
from cdp_common.clock import describe_offset
from cdp_common.config import PolicyConfig
from cdp_common.states import NodeState, PolicyState
from cdp_common.timefmt import iso_utc
from cdp_coordinator.leases import node_state
from cdp_coordinator.model import (
    Assignment,
    Node,
    NodeStatus,
    PolicyStatus,
    Report,
    Role,
    Status,
    policy_filter,
)


def rpo_lag(captured_seq: int, captured_time_ns: int, durable_seq: int,
            newest_time_ns: int, wall_now: float) -> float:
    """RPO lag in seconds (see the module docstring); never negative."""
    if durable_seq >= captured_seq:
        return 0.0
    known = [t for t in (newest_time_ns, captured_time_ns) if t > 0]
    if not known:
        return 0.0
    return max(0.0, wall_now - min(known) / 1e9)


def rpo_state(lag_s: float, policy: PolicyConfig) -> PolicyState:
    """The state the lag alone calls for."""
    if lag_s >= policy.rpo_error_s:
        return PolicyState.ERROR
    if lag_s >= policy.rpo_warning_s:
        return PolicyState.DEGRADED
    return PolicyState.OK


def node_status(node: Node, now: float, offset_s: float | None = None,
                draining: bool = False) -> NodeStatus:
    return NodeStatus(info=node.info, state=node_state(node),
                      last_seen_age_s=-1.0 if node.last_seen is None
                      else max(0.0, now - node.last_seen), clock_offset_s=offset_s,
                      draining=draining)


def skew_reasons(node_ids: tuple[str, ...], offsets: Mapping[str, float],
                 alarm_s: float) -> list[str]:
    out = []
    for nid in dict.fromkeys(node_ids):
        off = offsets.get(nid)
        if off is not None and abs(off) > alarm_s:
            out.append(f"{describe_offset(nid, off)} (alarm above {alarm_s:g}s)")
    return out


JOURNAL_HORIZON_S = 900.0
"""A journal forecast to fill within this long makes the policy degraded (a warning)."""

DISABLED_REASON = "disabled by the operator: nothing is replicated (the filter keeps journaling)"


def policy_status(p: PolicyConfig, a: Assignment | None,
                  reports: Mapping[tuple[str, str], Report], sync_request_id: int,
                  wall: float, offsets: Mapping[str, float] | None = None,
                  skew_alarm_s: float = 0.5, up: frozenset[str] | None = None,
                  known: frozenset[str] | None = None, age_s: float = math.inf,
                  grace_s: float = 0.0,
                  breach_in: Callable[[float], float | None] | None = None,
                  by_policy: Mapping[str, list[tuple[str, Report]]] | None = None,
                  ) -> PolicyStatus:
    """One policy's row; `reports` by (node id, policy), `offsets` by node id, `up`:
    the ids of the nodes whose lease is alive, `known`: of every registered node
    (None: leases are not judged, every node counts as registered and up),
    `age_s`/`grace_s`: see the module docstring; `breach_in(lag)`: seconds until
    the lag reaches rpo_error_s at its trend (cdp_coordinator.state feeds it), or
    None; `by_policy`: `reports_by_policy(reports)`, when many rows are built from
    the same reports (else each row scans them all)."""
    offsets = offsets or {}
    a = a or Assignment(policy=p.name)
    fid = policy_filter(p)
    f = reports.get((fid, p.name), Report(policy=p.name))
    t = reports.get((p.target, p.name), Report(policy=p.name))
    lag = rpo_lag(f.captured_seq, f.captured_time_ns, t.durable_seq, t.newest_time_ns,
                  wall + offsets.get(fid, 0.0))
    eta = breach_in(lag) if breach_in is not None and p.enabled else None
    if not p.enabled:
        state, lag, reason = PolicyState.UNPROTECTED, 0.0, DISABLED_REASON
    else:
        facts = _Facts(p, a, reports, up, known, age_s, grace_s, by_policy)
        facts.judge(f, t, lag, skew_reasons((fid, p.target), offsets, skew_alarm_s))
        facts.forecast(fid, lag, eta, f.journal_full_in_s)
        state, reason = facts.state(), facts.reason()
    return PolicyStatus(
        name=p.name, source_proxy=a.source_proxy.node_id,
        target_proxy=a.target_proxy.node_id, target=p.target, filter=fid, epoch=a.epoch,
        captured_seq=f.captured_seq, durable_seq=t.durable_seq, applied_seq=t.applied_seq,
        rpo_lag_s=lag, bytes_replicated=t.bytes_replicated, journal_bytes=f.journal_bytes,
        state=state, reason=reason,
        rpo_interval_s=p.rpo_interval_s, rpo_warning_s=p.rpo_warning_s,
        rpo_error_s=p.rpo_error_s, progress=f.progress, gaps=t.gaps,
        sync_request_id=sync_request_id, enabled=p.enabled,
        rpo_breach_in_s=eta if eta and lag < p.rpo_error_s else 0.0,
        journal_full_in_s=f.journal_full_in_s, frozen=p.frozen and f.frozen,
        verified=t.verified)


@dataclass
class _Facts:
    """The reasons of one enabled policy, by the state they call for."""

    p: PolicyConfig
    a: Assignment
    reports: Mapping[tuple[str, str], Report]
    up: frozenset[str] | None
    known: frozenset[str] | None
    age_s: float
    grace_s: float
    by_policy: Mapping[str, list[tuple[str, Report]]] | None = None
    """`reports` grouped by policy, each by node id (`reports_by_policy`); None:
    scanned here (one policy's status on its own)."""
    errors: list[str] = field(default_factory=list)
    unprotected: list[str] = field(default_factory=list)
    degraded: list[str] = field(default_factory=list)

    def judge(self, f: Report, t: Report, lag: float, skews: list[str]) -> None:
        p, a = self.p, self.a
        unassigned = f"unassigned: {a.reason}" if a.reason else ""
        if unassigned:
            self.errors.append(f"{unassigned} (nothing is replicated)")
        # a filter repeats the assignment's reason as its error: say it once
        self.errors += [f"{nid}: {r.error}" for nid, r in self._reporters()
                        if r.error and r.error != unassigned]
        for fid in dict.fromkeys(d.filter for d in p.disks):
            self._filter(fid)
        self._target(t)
        if lag >= p.rpo_error_s:
            self.errors.append(f"RPO lag {lag:.1f}s >= error threshold {p.rpo_error_s:g}s")
        elif lag >= p.rpo_warning_s:
            self.degraded.append(f"RPO lag {lag:.1f}s >= warning threshold "
                                 f"{p.rpo_warning_s:g}s")
        gap = open_gap(f, t)
        self.degraded += ([gap] if gap else []) + skews
        failed = failed_verification(t)
        if failed:
            self.degraded.append(failed)

    def _reporters(self) -> list[tuple[str, Report]]:
        """(node id, report) of every node reporting this policy, by node id."""
        if self.by_policy is not None:
            return self.by_policy.get(self.p.name, [])
        return [(nid, r) for (nid, pol), r in sorted(self.reports.items())
                if pol == self.p.name]

    def forecast(self, fid: str, lag: float, breach_in: float | None,
                 journal_full_in: float) -> None:
        """Warn before the breach (none of the peers does): the lag rising steadily
        toward rpo_error_s, to reach it within as long again; the journal filling
        within JOURNAL_HORIZON_S (then it overflows and a gap opens)."""
        p = self.p
        if breach_in and lag < p.rpo_error_s and breach_in <= p.rpo_error_s:
            self.degraded.append(f"RPO lag {lag:.1f}s is rising: at this pace it reaches the "
                                 f"error threshold {p.rpo_error_s:g}s in ~{breach_in:.0f}s")
        if 0 < journal_full_in <= JOURNAL_HORIZON_S:
            self.degraded.append(f"{fid}: the journal fills in ~{journal_full_in:.0f}s at "
                                 "this pace (then it overflows into dirty tracking: a gap)")

    def _filter(self, fid: str) -> None:
        name = self.p.name
        if self.known is not None and fid not in self.known:
            self.errors.append(f"filter {fid} is not registered: nothing of policy {name} "
                               "is captured")
        elif self.up is not None and fid not in self.up:
            self.errors.append(f"filter {fid} is down: what it captures of policy {name} "
                               "is not seen")
        elif (fid, name) in self.reports:
            return
        elif self.age_s < self.grace_s:
            self.unprotected.append(f"waiting for {fid} to report policy {name} "
                                    f"(assigned {self.age_s:.1f}s ago)")
        else:
            self.errors.append(f"{fid}: does not report policy {name} (a disk of it is not "
                               "attached there, or the filter's config lacks it): nothing "
                               "is captured")

    def _target(self, t: Report) -> None:
        name, tid = self.p.name, self.p.target
        if self.up is not None and tid not in self.up:
            return   # not registered, not a target or down: the assignment's reason says it
        if (tid, name) not in self.reports:
            if self.age_s < self.grace_s:
                self.unprotected.append(f"waiting for {tid} to report policy {name} "
                                        f"(assigned {self.age_s:.1f}s ago)")
            else:
                self.errors.append(f"{tid}: does not report policy {name} (assigned to it, "
                                   "yet it says nothing of it): nothing is known to be "
                                   "durable there")
        elif t.no_store:
            if self.age_s >= self.p.rpo_error_s:
                since = "" if math.isinf(self.age_s) else f" {self.age_s:.0f}s after it was added"
                self.errors.append(f"{tid} has nothing of policy {name}{since} (no stream has "
                                   "arrived): nothing is protected")
            else:
                self.unprotected.append(f"nothing of policy {name} is on {tid} yet (no stream "
                                        "has arrived): no restore point")

    def state(self) -> PolicyState:
        if self.errors:
            return PolicyState.ERROR
        if self.unprotected:
            return PolicyState.UNPROTECTED
        if self.degraded:
            return PolicyState.DEGRADED
        return PolicyState.OK

    def reason(self) -> str:
        return "; ".join(self.errors + self.unprotected + self.degraded)


def status(nodes: Mapping[str, Node], policies: Mapping[str, PolicyConfig],
           assignments: Mapping[str, Assignment], reports: Mapping[tuple[str, str], Report],
           sync_requests: Mapping[str, int], now: float, wall: float,
           offsets: Mapping[str, float] | None = None, skew_alarm_s: float = 0.5,
           since: Mapping[str, float] | None = None, grace_s: float = 0.0,
           breach_in: Callable[[str, float], float | None] | None = None,
           draining: frozenset[str] = frozenset(),
           groups: Mapping[str, PolicyConfig] | None = None) -> Status:
    """Everything the CLI shows, nodes and policies by id/name; `since`: when (the
    monotonic `now`) each policy was added or moved to another filter or target;
    `breach_in(policy, lag)`: see policy_status; `policies` are the placed ones
    (a group's members), `groups` the groups by name: each gets a row of its own
    before its members' (`group_status`)."""
    offsets, since = offsets or {}, since or {}
    rows = [node_status(n, now, offsets.get(nid), nid in draining)
            for nid, n in sorted(nodes.items())]
    up = frozenset(r.info.id for r in rows if r.state == NodeState.UP)
    by_policy = reports_by_policy(reports)

    def age(name: str) -> float:
        return now - since[name] if name in since else math.inf

    member_rows = {name: policy_status(p, assignments.get(name), reports,
                                       sync_requests.get(name, 0), wall, offsets, skew_alarm_s,
                                       up, frozenset(nodes), age(name), grace_s,
                                       None if breach_in is None
                                       else functools.partial(breach_in, name), by_policy)
                   for name, p in sorted(policies.items())}
    out: list[PolicyStatus] = []
    in_group: set[str] = set()
    group_rows: dict[str, list[PolicyStatus]] = {}
    for g, gp in sorted((groups or {}).items()):
        ms = [replace(member_rows[m.name], group=g) for m in cgroups.members(gp)
              if m.name in member_rows]
        in_group.update(m.name for m in ms)
        group_rows[g] = [group_status(gp, ms, reports, wall, offsets,
                                      min((age(m.name) for m in ms), default=math.inf),
                                      None if breach_in is None
                                      else functools.partial(breach_in, g)), *ms]
    # each group's row, then its members', among the other policies by name
    for name in sorted(set(group_rows) | (set(member_rows) - in_group)):
        out += group_rows.get(name) or [member_rows[name]]
    return Status(nodes=rows, policies=out, unknown=unknown_policies(nodes, policies, reports))


_WORST = (PolicyState.ERROR, PolicyState.UNPROTECTED, PolicyState.DEGRADED, PolicyState.OK)


def group_status(g: PolicyConfig, members: list[PolicyStatus],
                 reports: Mapping[tuple[str, str], Report], wall: float,
                 offsets: Mapping[str, float] | None = None, age_s: float = math.inf,
                 breach_in: Callable[[float], float | None] | None = None) -> PolicyStatus:
    """The row of consistency group `g` from its members' rows (see the module doc);
    `age_s`: how long the coordinator has known its newest member."""
    offsets = offsets or {}
    by: dict[PolicyState, list[str]] = {s: [] for s in _WORST}
    ages: dict[str, float | None] = {}   # member -> age of its newest checkpoint
    for m in members:
        t = reports.get((g.target, m.name), Report(policy=m.name))
        ages[m.name] = (max(0.0, wall + offsets.get(m.filter, 0.0) - t.checkpoint_time_ns / 1e9)
                        if t.checkpoint_time_ns else None)
        if m.state is not PolicyState.OK and PolicyState.parse(m.state) is not None:
            by[PolicyState(m.state)].append(f"member {m.name} is {m.state}"
                                            + (f" ({m.reason})" if m.reason else ""))
    known = [a for a in ages.values() if a is not None]
    lag = max(known, default=0.0)
    eta = breach_in(lag) if breach_in is not None and g.enabled and known else None
    if not g.enabled:
        state, lag, reason, eta = PolicyState.UNPROTECTED, 0.0, DISABLED_REASON, None
    else:
        _checkpoints(g, ages, lag, age_s, by)
        state = next((s for s in _WORST if by[s]), PolicyState.OK)
        reason = "; ".join(r for s in _WORST for r in by[s])
    first = members[0] if members else None
    return PolicyStatus(
        name=g.name, source_proxy=first.source_proxy if first else "",
        target_proxy=first.target_proxy if first else "", target=g.target,
        filter=",".join(m.filter for m in members), epoch=max((m.epoch for m in members),
                                                              default=0),
        captured_seq=0, durable_seq=0, applied_seq=0, rpo_lag_s=lag,
        bytes_replicated=sum(m.bytes_replicated for m in members),
        journal_bytes=sum(m.journal_bytes for m in members), state=state, reason=reason,
        rpo_interval_s=g.rpo_interval_s, rpo_warning_s=g.rpo_warning_s,
        rpo_error_s=g.rpo_error_s, enabled=g.enabled,
        rpo_breach_in_s=eta if eta and lag < g.rpo_error_s else 0.0,
        journal_full_in_s=min((m.journal_full_in_s for m in members if m.journal_full_in_s > 0),
                              default=0.0),
        frozen=bool(members) and all(m.frozen for m in members),
        members=tuple(m.name for m in members))


def _checkpoints(g: PolicyConfig, ages: Mapping[str, float | None], lag: float,
                 age_s: float, by: dict[PolicyState, list[str]]) -> None:
    """The group's own facts: its members' checkpoints and its lag (module doc)."""
    known = {m: a for m, a in ages.items() if a is not None}
    if not known:
        by[PolicyState.UNPROTECTED].append("no common restore point yet: no member has "
                                           "a checkpoint")
        return
    for m in sorted(set(ages) - set(known)):
        if age_s >= g.rpo_error_s:
            since = "" if math.isinf(age_s) else f" {age_s:.0f}s after the group was added"
            by[PolicyState.ERROR].append(f"member {m} has no checkpoint{since}: no common "
                                         "restore point")
        else:
            by[PolicyState.UNPROTECTED].append(f"member {m} has no checkpoint yet: no "
                                               "common restore point")
    if len(known) < len(ages):
        return   # no common point: its lag is not known, only that of some members
    newest = min(known.values())
    warn_s = max(3 * g.rpo_interval_s, g.rpo_warning_s)
    for m, a in sorted(known.items()):
        trail = a - newest
        text = (f"member {m} has missed checkpoints for {trail:.0f} s (its newest is "
                f"{trail:.1f}s older than the newest member's)")
        if trail > g.rpo_error_s:
            by[PolicyState.ERROR].append(text)
        elif trail > warn_s:
            by[PolicyState.DEGRADED].append(text)
    if lag >= g.rpo_error_s:
        by[PolicyState.ERROR].append(f"RPO lag {lag:.1f}s (age of the newest common "
                                     f"checkpoint) >= error threshold {g.rpo_error_s:g}s")
    elif lag >= g.rpo_warning_s:
        by[PolicyState.DEGRADED].append(f"RPO lag {lag:.1f}s (age of the newest common "
                                        f"checkpoint) >= warning threshold "
                                        f"{g.rpo_warning_s:g}s")


def reports_by_policy(reports: Mapping[tuple[str, str], Report],
                      ) -> dict[str, list[tuple[str, Report]]]:
    """The reports grouped by policy, each group by node id: one sort for a whole
    status, not one scan and sort of every report per policy."""
    out: dict[str, list[tuple[str, Report]]] = {}
    for (nid, pol), r in sorted(reports.items()):
        out.setdefault(pol, []).append((nid, r))
    return out


def unknown_policies(nodes: Mapping[str, Node], policies: Mapping[str, PolicyConfig],
                     reports: Mapping[tuple[str, str], Report]) -> list[tuple[str, str]]:
    """(filter id, policy) a filter protects that the coordinator does not know: it
    is replicated nowhere the operator can see, so it is alarmed."""
    return sorted((nid, pol) for nid, pol in reports
                  if pol not in policies and nid in nodes
                  and nodes[nid].info.role == Role.FILTER)


VERIFY_DETAIL_MAX = 300
"""How much of a failed verification's detail the status reason (and alarm) carries."""


def failed_verification(t: Report) -> str:
    """Why the target's newest verification makes the policy degraded ("" when it
    passed, or there is none)."""
    v = t.verified
    if not v.time_ns or v.ok:
        return ""
    detail = " ".join(v.detail.split())   # one line: e2fsck's output has many
    if len(detail) > VERIFY_DETAIL_MAX:
        detail = detail[:VERIFY_DETAIL_MAX - 3] + "..."
    return (f"restore point {v.point_id} failed verification: {detail or 'no detail'} "
            f"(at {iso_utc(v.time_ns)})")


def open_gap(f: Report, t: Report) -> str:
    """Why restore points are not restorable right now ("" when none is open)."""
    since = f.progress.gap_begin_time_ns
    reason = f.progress.sync_reason or "overflow"
    if t.gaps and not t.gaps[-1].end_seq:
        since = since or t.gaps[-1].begin_time_ns
        reason = t.gaps[-1].reason or reason
    if not since:
        return ""
    return (f"{reason} gap open: restore points since {iso_utc(since)} are not "
            f"restorable until it closes")
