"""`cdpctl failover POLICY --planned`: a failover that loses no write (RPO 0).

Theory of operation
-------------------
1. *Freeze*: `UpdatePolicy {"frozen": true}`. The coordinator passes it to the
   policy's filter (every member's, for a consistency group) with the
   assignment; the filter refuses every new write with EROFS and keeps
   shipping, so its journal drains (cdp_filter.policy, `set_frozen`).
2. *Drain*: wait until every member's status row says its filter reports the
   freeze (its captured seq is then final) and the target applied all of it
   (`drained`).
3. *The final point*: for a policy, a restore point whose last seq is the
   captured seq; for a group, a group point whose every member point reaches
   its member's captured seq (a checkpoint taken after the freeze; the filters
   still mark while frozen) (`final_point`).
4. *Failover* at exactly that point, and check that it holds every write.

Anything failing before step 4 unfreezes the policy again (production takes
writes) and says why; after step 4 the policy stays frozen, since production
moved to the DR site, until `cdpctl failover undo POLICY` unfreezes it.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cdp_common.errors import CdpError
from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
from cdp_common.pb.cdp.v1 import restore_pb2 as pb
from cdpctl import coordcall
from cdpctl.resolve import Coordinator
from cdpctl.status import fetch_status

POLL_S = 0.5


class PlannedFailoverError(CdpError):
    """The planned failover could not drain or find its final point (nothing failed over)."""


def member_rows(status: Mapping[str, Any], policy: str) -> list[dict[str, Any]]:
    """The status rows of what captures `policy`: its members for a group, else itself."""
    rows = status["policies"]
    members = [r for r in rows if r.get("group") == policy]
    if members:
        return members
    mine = [r for r in rows if r["name"] == policy]
    if not mine:
        raise PlannedFailoverError(f"policy {policy} is not in the coordinator's status")
    return mine


def drained(rows: Sequence[Mapping[str, Any]]) -> str:
    """Why the frozen policy is not drained yet ("" once it is)."""
    for r in rows:
        if not r.get("frozen"):
            return f"{r['name']}: its filter has not reported the freeze yet"
        if r["applied_seq"] < r["captured_seq"]:
            return (f"{r['name']}: the target applied seq {r['applied_seq']} of "
                    f"{r['captured_seq']}")
    return ""


def final_point(points: Sequence[pb.PointInfo], captured: Mapping[str, int],
                policy: str) -> pb.PointInfo | None:
    """The newest point holding every captured write (module docstring, step 3)."""
    for p in reversed(points):
        if p.members:
            have = {m.policy: m.last_seq for m in p.members}
            if all(have.get(name, -1) >= seq for name, seq in captured.items()):
                return p
        elif p.last_seq >= captured.get(policy, 0):
            return p
    return None


def set_frozen(coord: Coordinator, policy: str, on: bool, timeout_s: float) -> None:
    request = cpb.UpdatePolicyRequest(name=policy, patch_json=json.dumps({"frozen": on}))
    coordcall.call(coord, lambda s: s.UpdatePolicy(request, timeout=timeout_s))


def is_frozen(coord: Coordinator, policy: str, timeout_s: float) -> bool:
    """Whether the policy (or group) is frozen, as the coordinator stores it."""
    reply = coordcall.call(coord, lambda s: s.GetPolicy(cpb.PolicyName(name=policy),
                                                        timeout=timeout_s))
    return bool(json.loads(reply.policy_json).get("frozen"))


def drain(coord: Coordinator, policy: str, list_points: Callable[[], Sequence[pb.PointInfo]],
          timeout_s: float, quiet: bool) -> tuple[pb.PointInfo, dict[str, int]]:
    """Steps 2 and 3: the final point and each member's captured seq."""
    deadline = time.monotonic() + timeout_s
    why = "nothing checked yet"
    said = ""
    while time.monotonic() < deadline:
        rows = member_rows(fetch_status(coord), policy)
        why = drained(rows)
        if not why:
            captured = {r["name"]: r["captured_seq"] for r in rows}
            point = final_point(list_points(), captured, policy)
            if point is not None:
                return point, captured
            why = "no restore point holds every captured write yet"
        if not quiet and why != said:
            print(f"planned failover of {policy}: waiting: {why}", file=sys.stderr)
            said = why
        time.sleep(POLL_S)
    raise PlannedFailoverError(f"planned failover of {policy}: not drained within "
                               f"{timeout_s:.0f} s ({why})")
