"""Rebalancing: policy slots moved from the most to the least loaded proxy (pure).

Theory of operation
-------------------
Placement (`placement.py`) never moves a policy off a healthy proxy (I-b), so
a proxy that joins — a new one, or one back from a failure — would stay idle
while the others carry everything. `plan_moves()` proposes at most `limit`
moves. Proxies are grouped by the slot they serve and the site (source proxies
of site "hq", target proxies of site "dr", ...); within a group, while the
most loaded proxy holds two or more slots more than the least loaded one with
room (`placement.has_room`), one slot moves from the first to the second.
Loads are the same slot counts placement balances (a PROXY_BOTH node counts
both kinds).

- Only nodes that are up (heard from since the coordinator started; not a
  node in grace after a restart) take part, as source or destination.
- Disabled policies and pinned slots are never moved: the pin is the
  operator's choice, placement keeps it.
- Which slot moves: of a target proxy, the policy whose target has the most
  slots on that proxy (so one target's policies spread out); then by name.
  Deterministic: the same state gives the same moves.
- A consistency group's members (`placement`: one binding for all) move
  together, as one unit of as many slots as members, or not at all: only when
  every member is on the loaded proxy, the difference is at least twice the
  unit, the destination has room for all of them and the minute's budget
  covers them all. Otherwise the group stays and another policy moves.
- Each move stops the imbalance it fixes from growing back: a difference of 2
  becomes 0, never the other way round, so moves converge and never ping-pong.

The caller (`state.CoordinatorState`) applies a move as a handover with a new
epoch — the filter or the source proxy reconnects to the new proxy and resumes
from the target's durable seq, like any rebind, so nothing is lost — and
rate-limits them to `[coordinator] rebalance_max_per_minute`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cdp_common.config import PolicyConfig
from cdp_coordinator.leases import in_service
from cdp_coordinator.model import SOURCE_ROLES, TARGET_ROLES, Assignment, Node, Role
from cdp_coordinator.placement import has_room, loads_of, member_groups, spread_of


@dataclass(frozen=True)
class Move:
    policy: str
    what: str       # "source" | "target": which proxy slot
    from_id: str
    to_id: str


def _bound(a: Assignment, what: str) -> str:
    return a.source_proxy.node_id if what == "source" else a.target_proxy.node_id


def _pinned(p: PolicyConfig, what: str) -> str:
    return p.pinned_source_proxy if what == "source" else p.pinned_target_proxy


def plan_moves(policies: Mapping[str, PolicyConfig], assignments: Mapping[str, Assignment],
               nodes: Mapping[str, Node], now: float, limit: int,
               draining: frozenset[str] = frozenset(),
               groups: Mapping[str, Sequence[str]] | None = None) -> list[Move]:
    """At most `limit` moves that even out the proxies' loads (see the module doc);
    `groups`: group name -> member names, as for `placement.place_all`."""
    loads, spread = loads_of(assignments), spread_of(assignments, policies)
    of = member_groups(groups or {})
    bound = {(name, what): _bound(a, what) for name, a in assignments.items()
             for what in ("source", "target")}
    moves: list[Move] = []
    kinds = sorted({(what, site) for p in policies.values()
                    for what, site in (("source", p.source_site), ("target", p.target_site))})
    for what, site in kinds:
        roles: tuple[Role, ...] = SOURCE_ROLES if what == "source" else TARGET_ROLES
        members = sorted(nid for nid, n in nodes.items()
                         if n.up and in_service(n, now) and n.info.role in roles
                         and n.info.site == site and nid not in draining)
        exhausted: set[str] = set()   # most loaded, but nothing of it may move
        while len(moves) < limit:
            sources = [m for m in members if m not in exhausted]
            if not sources:
                break
            hi = max(sources, key=lambda m: (loads.get(m, 0), m))
            roomy = [m for m in members if m != hi and has_room(nodes[m], loads.get(m, 0))]
            if not roomy:
                break
            lo = min(roomy, key=lambda m: (loads.get(m, 0), nodes[m].bytes_per_s, m))
            if loads.get(hi, 0) - loads.get(lo, 0) < 2:
                break
            gap = loads.get(hi, 0) - loads.get(lo, 0)
            units = []   # what may move: a policy, or all the members of a group
            for name in sorted(policies):
                _, members_of = of.get(name, ("", (name,)))
                if name != members_of[0] or not all(
                        m in policies and bound.get((m, what)) == hi for m in members_of):
                    continue
                p = policies[name]
                if not p.enabled or _pinned(p, what) \
                        or (what == "target" and p.target_site != site) \
                        or (what == "source" and p.source_site != site):
                    continue
                k = len(members_of)
                if gap >= 2 * k and len(moves) + k <= limit \
                        and has_room(nodes[lo], loads.get(lo, 0) + k - 1):
                    units.append(members_of)
            if not units:
                exhausted.add(hi)
                continue
            if what == "target":
                units.sort(key=lambda u: -spread.get((hi, policies[u[0]].target), 0))
            for name in units[0]:
                moves.append(Move(name, what, hi, lo))
                bound[(name, what)] = lo
                loads[hi] = loads.get(hi, 0) - 1
                loads[lo] = loads.get(lo, 0) + 1
                if what == "target":
                    target = policies[name].target
                    spread[(hi, target)] = spread.get((hi, target), 0) - 1
                    spread[(lo, target)] = spread.get((lo, target), 0) + 1
    return moves
