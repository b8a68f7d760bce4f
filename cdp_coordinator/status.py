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

A policy's state (`PolicyState`), first that applies:

    disabled    the operator disabled it (lag shown as 0)
    unassigned  its assignment is incomplete (reason from placement)
    error       a node reports an error for it (wrong key, fenced, unreachable
                peer): replication is failing whatever the lag says
    error       its filter is up but does not report it (no such disk or policy
                there): nothing is captured, however small the lag looks
    error       lag >= rpo_error_s
    warning     lag >= rpo_warning_s
    warning     a gap is open (overflow, sync, repair): the points since it
                began are not restorable until it closes
    warning     the filter's or the target's clock is off the coordinator's by
                more than clock_skew_alarm_s (the lag is corrected, but restore
                point times are that node's clock)
    ok          otherwise

The reason shown is the assignment's reason, else the node errors
("node: error; ...", by node id).
"""

from __future__ import annotations

from collections.abc import Mapping

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
    if lag_s >= policy.rpo_error_s:
        return PolicyState.ERROR
    if lag_s >= policy.rpo_warning_s:
        return PolicyState.WARNING
    return PolicyState.OK


def node_status(node: Node, now: float, offset_s: float | None = None) -> NodeStatus:
    return NodeStatus(info=node.info, state=node_state(node),
                      last_seen_age_s=-1.0 if node.last_seen is None
                      else max(0.0, now - node.last_seen), clock_offset_s=offset_s)


def skew_reasons(node_ids: tuple[str, ...], offsets: Mapping[str, float],
                 alarm_s: float) -> list[str]:
    out = []
    for nid in dict.fromkeys(node_ids):
        off = offsets.get(nid)
        if off is not None and abs(off) > alarm_s:
            out.append(f"{describe_offset(nid, off)} (alarm above {alarm_s:g}s)")
    return out


def policy_status(p: PolicyConfig, a: Assignment | None,
                  reports: Mapping[tuple[str, str], Report], sync_request_id: int,
                  wall: float, offsets: Mapping[str, float] | None = None,
                  skew_alarm_s: float = 0.5, up: frozenset[str] = frozenset()) -> PolicyStatus:
    """One policy's row; `reports` by (node id, policy), `offsets` by node id, `up`:
    the ids of the nodes whose lease is alive."""
    offsets = offsets or {}
    a = a or Assignment(policy=p.name)
    fid = policy_filter(p)
    f = reports.get((fid, p.name), Report(policy=p.name))
    t = reports.get((p.target, p.name), Report(policy=p.name))
    lag = rpo_lag(f.captured_seq, f.captured_time_ns, t.durable_seq, t.newest_time_ns,
                  wall + offsets.get(fid, 0.0))
    skews = skew_reasons((fid, p.target), offsets, skew_alarm_s)
    gap = open_gap(f, t)
    errors = [f"{nid}: {r.error}" for (nid, pol), r in sorted(reports.items())
              if pol == p.name and r.error]
    if fid and (fid, p.name) not in reports and fid in up:
        errors.append(f"{fid}: does not report policy {p.name} (a disk of it is not "
                      f"attached there, or the filter's config lacks it): nothing is captured")
    reason = a.reason or "; ".join(errors)
    if not p.enabled:
        state, lag = PolicyState.DISABLED, 0.0
    elif a.reason:
        state = PolicyState.UNASSIGNED
    elif errors:
        state = PolicyState.ERROR
    else:
        state = rpo_state(lag, p)
        notes = ([gap] if gap else []) + skews
        if notes and state == PolicyState.OK:
            state = PolicyState.WARNING
        reason = "; ".join([reason] * bool(reason) + notes)
    return PolicyStatus(
        name=p.name, source_proxy=a.source_proxy.node_id,
        target_proxy=a.target_proxy.node_id, target=p.target, filter=fid, epoch=a.epoch,
        captured_seq=f.captured_seq, durable_seq=t.durable_seq, applied_seq=t.applied_seq,
        rpo_lag_s=lag, bytes_replicated=t.bytes_replicated, journal_bytes=f.journal_bytes,
        state=state, reason=reason,
        rpo_interval_s=p.rpo_interval_s, rpo_warning_s=p.rpo_warning_s,
        rpo_error_s=p.rpo_error_s, progress=f.progress, gaps=t.gaps,
        sync_request_id=sync_request_id)


def status(nodes: Mapping[str, Node], policies: Mapping[str, PolicyConfig],
           assignments: Mapping[str, Assignment], reports: Mapping[tuple[str, str], Report],
           sync_requests: Mapping[str, int], now: float, wall: float,
           offsets: Mapping[str, float] | None = None, skew_alarm_s: float = 0.5) -> Status:
    """Everything the CLI shows, nodes and policies by id/name."""
    offsets = offsets or {}
    rows = [node_status(n, now, offsets.get(nid)) for nid, n in sorted(nodes.items())]
    up = frozenset(r.info.id for r in rows if r.state == NodeState.UP)
    return Status(
        nodes=rows,
        policies=[policy_status(p, assignments.get(name), reports,
                                sync_requests.get(name, 0), wall, offsets, skew_alarm_s, up)
                  for name, p in sorted(policies.items())],
        unknown=unknown_policies(nodes, policies, reports))


def unknown_policies(nodes: Mapping[str, Node], policies: Mapping[str, PolicyConfig],
                     reports: Mapping[tuple[str, str], Report]) -> list[tuple[str, str]]:
    """(filter id, policy) a filter protects that the coordinator does not know: it
    is replicated nowhere the operator can see, so it is alarmed."""
    return sorted((nid, pol) for nid, pol in reports
                  if pol not in policies and nid in nodes
                  and nodes[nid].info.role == Role.FILTER)


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
