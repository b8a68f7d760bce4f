"""`cdpctl status` and `cdpctl health`: ask the coordinator, judge, print.

Theory of operation: `fetch_status` is the only part that talks gRPC; it
turns `Coordinator.GetStatus` into plain dicts (`status_dict`), which is also
the `--json` output. `evaluate` is a pure function from that dict to an
overall verdict, a list of problems and the exit code:

    0 ok       every node up, every policy "ok" (or "unprotected" because the
               operator disabled it: not a problem, `status` shows it)
    1 warning  some policy "degraded" (an open gap, RPO lag over its warning
               threshold, a skewed clock) or "unprotected" while enabled (nothing
               of it has reached the target yet), a node's clock skewed, or an
               "ok" policy from an older coordinator with an error reported
    2 error    a node down, a policy in "error" (or in a state this cdpctl does
               not know), a policy only a filter knows
    3          the coordinator cannot be reached (raised by fetch_status)

Consistency groups: a policy on several filters runs as member policies
`<group>..<filter>` (cdp_common.groups); the coordinator sends a row per
member and one for the group (its `filter` the members' filters,
comma-joined). `status_dict` marks them: a group row gets `"members"`, a
member row `"group"` (both `null` for a one-filter policy); the tables show
each member indented under its group, and health judges the group row like
any policy (degraded while a member misses checkpoints, error while one is
in error).

The severity of a policy state is `cdp_common.states.policy_level`, the same
function that sets the coordinator's alarm level. An older coordinator's
"warning", "unassigned" and "disabled" are read as degraded, error and
unprotected (`status_dict` shows the new names).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cdp_common.clock import describe_offset
from cdp_common.states import AlarmLevel, NodeState, PolicyState, policy_level
from cdpctl import lazy, table
from cdpctl.resolve import Coordinator
from cdpctl.units import format_bytes, format_seconds

if TYPE_CHECKING:
    from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
    from cdpctl import coordcall
else:   # loaded when a command talks to the coordinator, not for --help
    cpb = lazy.module("cdp_common.pb.cdp.v1.coordinator_pb2")
    coordcall = lazy.module("cdpctl.coordcall")

EXIT_OK, EXIT_WARNING, EXIT_ERROR, EXIT_UNREACHABLE = 0, 1, 2, 3


def role_name(role: int) -> str:
    names: dict[int, str] = {
        cpb.ROLE_UNSPECIFIED: "unspecified",
        cpb.ROLE_FILTER: "filter",
        cpb.ROLE_SOURCE_PROXY: "source-proxy",
        cpb.ROLE_TARGET_PROXY: "target-proxy",
        cpb.ROLE_TARGET: "target",
        cpb.ROLE_PROXY_BOTH: "proxy",
    }
    return names.get(role, str(role))


def status_dict(reply: cpb.StatusReply) -> dict[str, Any]:
    """The JSON document of `cdpctl status --json`."""
    nodes = [{
        "id": n.info.id, "role": role_name(n.info.role),
        "site": n.info.site, "address": n.info.address,
        "metrics_address": n.info.metrics_address, "pid": n.info.pid,
        "capacity": n.info.capacity, "state": n.state or "unknown",
        "last_seen_age_s": round(n.last_seen_age_s, 3),
        "clock_offset_s": round(n.clock_offset_s, 3) if n.clock_offset_known else None,
        "draining": n.draining,
    } for n in reply.nodes]
    policies = [{
        "name": p.name, "state": policy_state_name(p.state), "reason": p.reason,
        "filter": p.filter, "source_proxy": p.source_proxy, "target_proxy": p.target_proxy,
        "target": p.target, "epoch": p.epoch,
        "captured_seq": p.captured_seq, "durable_seq": p.durable_seq,
        "applied_seq": p.applied_seq, "rpo_lag_s": round(p.rpo_lag_s, 3),
        "bytes_replicated": p.bytes_replicated, "journal_bytes": p.journal_bytes,
        "rpo_interval_s": p.rpo_interval_s, "rpo_warning_s": p.rpo_warning_s,
        "rpo_error_s": p.rpo_error_s, "enabled": p.enabled,
        "bandwidth_limit_mbps": p.bandwidth_limit_mbps, "alarm": p.alarm,
        "capture_mode": p.capture_mode, "dirty_bytes": p.dirty_bytes,
        "gap_begin_time_ns": p.gap_begin_time_ns,
        "sync_phase": p.sync_phase, "sync_reason": p.sync_reason, "sync_id": p.sync_id,
        "sync_done_id": p.sync_done_id, "sync_request_id": p.sync_request_id,
        "sync_done_bytes": p.sync_done_bytes, "sync_total_bytes": p.sync_total_bytes,
        "sync_rate_bps": round(p.sync_rate_bps, 1), "sync_eta_s": round(p.sync_eta_s, 1),
        # forecasts (0: none): the RPO breach, the journal's overflow
        "rpo_breach_in_s": round(p.rpo_breach_in_s, 1),
        "journal_full_in_s": round(p.journal_full_in_s, 1),
        # a planned failover froze it and its filter refuses writes (captured_seq is final)
        "frozen": p.frozen,
        "gaps": [{"begin_seq": g.begin_seq, "end_seq": g.end_seq,
                  "begin_time_ns": g.begin_time_ns, "end_time_ns": g.end_time_ns,
                  "reason": g.reason} for g in p.gaps],
        # the target's newest verification of a restore point (None: none, no schedule)
        "verified": {"point_id": p.verified_point_id, "ok": p.verified_ok,
                     "time_ns": p.verified_ns, "detail": p.verify_detail,
                     "every_s": p.verify_every_s}
        if p.verified_ns or p.verify_every_s else None,
        "group": None, "members": None,
    } for p in reply.policies]
    mark_groups(policies)
    return {"now_ns": reply.now_ns, "clock_skew_alarm_s": reply.clock_skew_alarm_s or 0.5,
            "nodes": nodes, "policies": policies,
            "unknown_policies": [{"node": u.node_id, "policy": u.policy}
                                 for u in reply.unknown_policies]}


GROUP_SEPARATOR = ".."   # as cdp_common.groups.SEPARATOR (not imported: cdpctl stays light)


def mark_groups(policies: list[dict[str, Any]]) -> None:
    """Set `members` on group rows and `group` on their members' rows: a group row is
    one whose `<name>..<filter>` rows, one per filter of its comma-joined `filter`,
    are all there."""
    names = {p["name"] for p in policies}
    for p in policies:
        filters = [f for f in (p.get("filter") or "").split(",") if f]
        members = [f"{p['name']}{GROUP_SEPARATOR}{f}" for f in filters]
        if len(members) > 1 and all(m in names for m in members):
            p["members"] = sorted(members)
    by_name = {p["name"]: p for p in policies}
    for p in policies:
        for m in p.get("members") or ():
            by_name[m]["group"] = p["name"]


def ordered_policies(policies: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """(depth, row) by name, each group's members (depth 1) right after it."""
    by_name = {p["name"]: p for p in policies}
    out: list[tuple[int, dict[str, Any]]] = []
    for p in sorted(policies, key=lambda p: p["name"]):
        if p.get("group") and p["group"] in by_name:
            continue
        out.append((0, p))
        out += [(1, by_name[m]) for m in p.get("members") or () if m in by_name]
    return out


def kind_of(p: dict[str, Any]) -> str:
    return "group" if p.get("members") else "policy"


def policy_state_name(wire: str) -> str:
    """The state as this cdpctl names it (older coordinators' names mapped)."""
    state = PolicyState.parse(wire)
    return str(state) if state is not None else (wire or "unknown")


def fetch_status(coord: Coordinator, timeout_s: float = 5.0) -> dict[str, Any]:
    """GetStatus as a dict; CoordinatorUnreachable (exit 3) on any gRPC failure."""
    reply = coordcall.call(coord, lambda stub: stub.GetStatus(cpb.StatusRequest(),
                                                              timeout=timeout_s),
                           refusals=False)
    return status_dict(reply)


@dataclass(frozen=True)
class Verdict:
    status: str                       # "ok" | "warning" | "error"
    exit_code: int
    problems: list[dict[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "problems": self.problems}


def evaluate(status: dict[str, Any]) -> Verdict:
    """Health verdict of a status document (pure)."""
    problems: list[dict[str, str]] = []
    for n in status.get("nodes", []):
        if n.get("state") != NodeState.UP:
            problems.append({"severity": "error", "kind": "node", "id": n["id"],
                             "message": f"{n.get('role', 'node')} {n['id']} is "
                                        f"{n.get('state', 'unknown')} (last seen "
                                        f"{format_seconds(float(n.get('last_seen_age_s', 0)))} "
                                        "ago)"})
        elif (off := n.get("clock_offset_s")) is not None \
                and abs(off) > float(status.get("clock_skew_alarm_s") or 0.5):
            problems.append({"severity": "warning", "kind": "clock", "id": n["id"],
                             "message": describe_offset(n["id"], off)})
    for u in status.get("unknown_policies", []):
        problems.append({"severity": "error", "kind": "policy", "id": u["policy"],
                         "message": f"{u['node']} protects policy {u['policy']}, which the "
                                    "coordinator does not know: replicated nowhere"})
    for p in status.get("policies", []):
        state = p.get("state", "unknown")
        level = policy_level(state, bool(p.get("enabled", True)))
        reason = p.get("reason") or ""
        if level is AlarmLevel.OK:
            if state == PolicyState.OK and reason:
                # An older coordinator's "ok" while a node reports an error on it
                # (wrong key, unreachable peer, ...): the lag will grow, say so now.
                problems.append({"severity": "warning", "kind": "policy", "id": p["name"],
                                 "message": f"policy {p['name']} reports errors: {reason}"})
            continue   # ok, or disabled: the operator's choice; `cdpctl status` shows it
        if not reason and PolicyState.parse(state) in (PolicyState.DEGRADED,
                                                       PolicyState.ERROR):
            reason = f"RPO lag {format_seconds(float(p.get('rpo_lag_s', 0)))}"
        message = f"{kind_of(p)} {p['name']} is {state}" + (f": {reason}" if reason else "")
        problems.append({"severity": str(level), "kind": "policy", "id": p["name"],
                         "message": message})
    if any(x["severity"] == "error" for x in problems):
        return Verdict("error", EXIT_ERROR, problems)
    if problems:
        return Verdict("warning", EXIT_WARNING, problems)
    return Verdict("ok", EXIT_OK, problems)


def render_nodes(status: dict[str, Any]) -> str:
    rows = [(n["id"], n["role"], n["site"],
             n["state"] + (" (drained)" if n.get("draining") else ""), n["address"],
             format_seconds(float(n["last_seen_age_s"])),
             "?" if n.get("clock_offset_s") is None else f"{n['clock_offset_s']:+.3f}s")
            for n in sorted(status["nodes"], key=lambda n: (n["role"], n["id"]))]
    if not rows:
        return "no nodes registered"
    return table.render(("NODE", "ROLE", "SITE", "STATE", "ADDRESS", "SEEN", "CLOCK"), rows,
                        right=("SEEN", "CLOCK"))


def verified_text(p: dict[str, Any], now_ns: int) -> str:
    """The VERIFIED column: `ok #7 3m ago`, `FAILED #7 10s ago`, `pending` (scheduled,
    none yet), `-` (none)."""
    v = p.get("verified")
    if not v:
        return "-"
    if not v.get("time_ns"):
        return "pending"
    age = format_seconds(max(0.0, (now_ns - int(v["time_ns"])) / 1e9)) if now_ns else "?"
    return f"{'ok' if v.get('ok') else 'FAILED'} #{v.get('point_id', 0)} {age} ago"


def render_policies(status: dict[str, Any]) -> str:
    """One row per policy; a consistency group's members indented under it (the
    group's DURABLE SEQ is '-': seqs are per member; its RPO LAG is the age of its
    newest common checkpoint; VERIFIED is the target's newest verification of a
    restore point, `cdpctl verify` or the verify_every_s schedule)."""
    now_ns = int(status.get("now_ns") or 0)
    rows = [("  " * depth + p["name"], p["state"], p["source_proxy"] or "-",
             p["target_proxy"] or "-", "-" if p.get("members") else p["durable_seq"],
             format_seconds(float(p["rpo_lag_s"])),
             format_bytes(p["bytes_replicated"]), format_bytes(p["journal_bytes"]),
             verified_text(p, now_ns))
            for depth, p in ordered_policies(status["policies"])]
    if not rows:
        return "no policies configured"
    return table.render(("POLICY", "STATE", "SOURCE PROXY", "TARGET PROXY", "DURABLE SEQ",
                         "RPO LAG", "REPLICATED", "JOURNAL", "VERIFIED"), rows,
                        right=("DURABLE SEQ", "RPO LAG", "REPLICATED", "JOURNAL"))


def render_status(status: dict[str, Any]) -> str:
    text = render_nodes(status) + "\n\n" + render_policies(status)
    ordered = [p for _, p in ordered_policies(status["policies"])]
    reasons = [f"{kind_of(p)} {p['name']}: {p['reason']}" for p in ordered if p.get("reason")]
    reasons += [line for p in ordered for line in capture_lines(p)]
    return "\n".join([text, "", *reasons]) if reasons else text


def _when(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9)) if ns else "?"


def capture_lines(p: dict[str, Any]) -> list[str]:
    """What the filter is doing besides journaling, and the policy's gaps (pure)."""
    name, out = p["name"], []
    mode = p.get("capture_mode") or ""
    if mode and mode != "journaling":
        out.append(f"policy {name}: {mode}, {format_bytes(p.get('dirty_bytes', 0))} dirty"
                   + (f", gap open since {_when(p['gap_begin_time_ns'])}"
                      if p.get("gap_begin_time_ns") else ""))
    if p.get("sync_phase"):
        out.append(f"policy {name}: sync {p.get('sync_reason') or ''} "
                   f"{sync_progress_text(p)}".replace("  ", " "))
    for g in p.get("gaps", []):
        if not gap_holds_points(g):
            continue
        # end_seq is the first consistent point again: the last one in the gap is before it
        end = (f"seq {g['end_seq'] - 1} (closed {_when(g['end_time_ns'])})" if g["end_seq"]
               else "now (still open)")
        out.append(f"policy {name}: gap ({g.get('reason') or 'overflow'}): restore points "
                   f"from seq {g['begin_seq']} ({_when(g['begin_time_ns'])}) to {end} are "
                   "not consistent")
    return out


def gap_holds_points(g: dict[str, Any]) -> bool:
    """A gap covers points with last seq in [begin_seq, end_seq) (end 0: open); a
    closed one with end_seq <= begin_seq covers none and is not shown."""
    return not g["end_seq"] or g["end_seq"] > g["begin_seq"]


def sync_progress_text(p: dict[str, Any]) -> str:
    """`compare 42% 120 MiB of 256 MiB, 310 MiB/s, ETA 0.4s` (pure)."""
    phase = p.get("sync_phase") or "-"
    done, total = int(p.get("sync_done_bytes", 0)), int(p.get("sync_total_bytes", 0))
    pct = f"{100 * done / total:.0f}% " if total else ""
    rate = float(p.get("sync_rate_bps", 0.0))
    eta = float(p.get("sync_eta_s", 0.0))
    text = f"{phase} {pct}{format_bytes(done)} of {format_bytes(total)}"
    if rate > 0:
        text += f", {format_bytes(int(rate))}/s, ETA {format_seconds(eta)}"
    return text


def render_health(status: dict[str, Any], verdict: Verdict) -> str:
    lines = [render_status(status), ""]
    for p in verdict.problems:
        lines.append(f"{p['severity'].upper()}: {p['message']}")
    lines.append(f"health: {verdict.status.upper()}")
    return "\n".join(lines)
