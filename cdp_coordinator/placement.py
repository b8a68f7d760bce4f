"""Proxy placement: which nodes serve each policy, and when its epoch grows (pure).

Theory of operation
-------------------
`place_all()` derives every policy's assignment from the nodes, the policies
and the current assignments, policy by policy in name order, so the result is
a function of the state alone. A policy has two proxy *slots* (source proxy
on `source_site`, target proxy on `target_site`); each slot is filled by the
first rule of `SLOT_RULES` that applies (one table, the same as this one):

    rule      applies when                                                 -> slot
    DISABLED  the policy is disabled                                       -> empty
    PINNED    the pinned proxy is not the bound one, is up (heard from,
              not only in grace) and fits the slot                         -> pinned
    KEEP      the bound proxy is in service (up or in grace) and fits      -> bound
    CHOOSE    some proxy is up, fits and has room                          -> least loaded
    NONE      nothing else applied                                         -> empty + reason

- *Fits*: its role serves the slot (`SOURCE_ROLES` / `TARGET_ROLES`, a
  PROXY_BOTH node serves either), it is on the slot's site, and no operator
  drained it (`cdpctl node drain`: its policies move off, pinned ones too).
- PINNED: the operator asked for that proxy, so it is used whatever its load
  or capacity. A policy bound elsewhere because its pinned proxy was down
  moves back when the pinned proxy is up again (the one exception to I-b,
  and only towards the operator's choice).
- KEEP before CHOOSE: a bound proxy is never traded for a less loaded one.
- CHOOSE: room = `capacity` 0 (unlimited) or load < capacity, and
  `capacity_bytes_per_s` 0 (unlimited) or the bytes/s it last reported below
  it; least loaded = fewest policy slots first, then (target proxy slots) the
  fewest policies of the same target, so one target's policies spread over
  its target proxies, then fewest bytes/s (as the proxy reported in its last
  heartbeat), ties broken by node id.
- NONE: reason "no healthy {source|target} proxy on site {site}".

Filter and target are named by the policy, not chosen. A down filter changes
nothing (its journal keeps capturing; the proxies keep their policy). A
target that is down, unknown or not a target empties the target endpoint and
sets the reason. A disabled policy gets no proxies and no target (reason
"disabled"); its filter still gets the assignment, so it keeps journaling and
stops shipping.

Epochs: whenever the *binding* (source proxy, target proxy, target; ids and
addresses) changes, the epoch grows by one; a policy removed and added again
starts from the epoch it had (`epoch_floor`). A change that replaces a node
that was bound (not one that fills an empty slot) counts as a rebind.

Consistency groups (a policy with disks on several filters, run as member
policies `<group>..<filter>`, cdp_common.groups): every member of a group has
the same source proxy, target proxy and target, so one source proxy can
checkpoint all of the members' streams together:

    member    placed by                                           -> binding
    first     the slot rules above (its slot must have room for   -> its own
              every member: a group counts one slot per member)
    later     nothing of its own: it copies the first member's    -> the first's
              binding and reason, now and whenever it changes
              (the first is placed before, in the same run)

So a rebind of the first member (its proxy lost, drained, its pinned proxy
back) rebinds every member the same way in the same `place_all`, each with
its own epoch +1; a member bound elsewhere (restored state) moves to the
first's binding. The rebalancer moves a group's members together or not at
all (`rebalance.py`).

Invariants: I-a epochs per policy are non-decreasing and strictly grow on every
binding change; I-b placement never changes an assignment while all its nodes
stay up (no flapping); only the rebalancer (`rebalance.py`) moves a policy off
a healthy proxy, at most `[coordinator] rebalance_max_per_minute` a minute;
I-c a proxy's load never exceeds its capacity because of a new choice (loads
only grow past capacity if capacity shrinks).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from cdp_common.config import PolicyConfig
from cdp_coordinator.leases import in_service
from cdp_coordinator.model import (
    NO_ENDPOINT,
    SOURCE_ROLES,
    TARGET_ROLES,
    Assignment,
    Endpoint,
    Node,
    Role,
    policy_filter,
)

alog = logging.getLogger("coord.assign")


class Rule(enum.Enum):
    DISABLED = "disabled"
    PINNED = "pinned"
    KEEP = "keep"
    CHOOSE = "choose"
    NONE = "none"


@dataclass(frozen=True)
class Slot:
    """One proxy slot of one policy, as the rules see it."""

    what: str                  # "source" | "target" (for the reason)
    roles: tuple[Role, ...]
    site: str
    bound: str                 # node id bound now ("" = empty)
    pinned: str                # the operator's choice ("" = none)
    enabled: bool
    target: str = ""           # the policy's target (target slots spread by it)
    width: int = 1             # slots the choice takes: a group's members all follow it


@dataclass(frozen=True)
class View:
    """What the rules may look at: the nodes, the slot loads, the time."""

    nodes: Mapping[str, Node]
    loads: Mapping[str, int]
    """Policy slots per proxy, with this slot's bound proxy already released."""
    now: float
    spread: Mapping[tuple[str, str], int] = dataclasses.field(default_factory=dict)
    """Target proxy slots per (proxy, target), likewise."""
    draining: frozenset[str] = frozenset()
    """Proxies an operator drained (`cdpctl node drain`): they fit no slot."""

    def fits(self, node: Node, slot: Slot) -> bool:
        return node.info.role in slot.roles and node.info.site == slot.site \
            and node.info.id not in self.draining

    def holds(self, node_id: str, slot: Slot) -> bool:
        node = self.nodes.get(node_id)
        return node is not None and self.fits(node, slot) and in_service(node, self.now)


Pick = Callable[[Slot, View], "str | None"]
"""A rule: the node id for the slot ("" = leave it empty), or None = does not apply."""


def _disabled(slot: Slot, view: View) -> str | None:
    return None if slot.enabled else ""


def _pinned(slot: Slot, view: View) -> str | None:
    node = view.nodes.get(slot.pinned) if slot.pinned else None
    if node is None or slot.pinned == slot.bound or not node.up:
        return None
    return slot.pinned if view.holds(slot.pinned, slot) else None


def _keep(slot: Slot, view: View) -> str | None:
    return slot.bound if slot.bound and view.holds(slot.bound, slot) else None


def has_room(node: Node, load: int) -> bool:
    """Room for one more policy slot: under both of its capacities."""
    if node.info.capacity and load >= node.info.capacity:
        return False
    return not (node.info.capacity_bytes_per_s
                and node.bytes_per_s >= node.info.capacity_bytes_per_s)


def _choose(slot: Slot, view: View) -> str | None:
    best: tuple[int, int, float, str] | None = None
    for nid, node in view.nodes.items():
        if not node.up or not view.fits(node, slot):
            continue
        load = view.loads.get(nid, 0)
        if not has_room(node, load + slot.width - 1):
            continue
        same = view.spread.get((nid, slot.target), 0) if slot.what == "target" else 0
        key = (load, same, node.bytes_per_s, nid)
        if best is None or key < best:
            best = key
    return best[3] if best else None


def _none(slot: Slot, view: View) -> str | None:
    return ""


SLOT_RULES: tuple[tuple[Rule, Pick], ...] = (
    (Rule.DISABLED, _disabled),
    (Rule.PINNED, _pinned),
    (Rule.KEEP, _keep),
    (Rule.CHOOSE, _choose),
    (Rule.NONE, _none),
)


def fill(slot: Slot, nodes: Mapping[str, Node], loads: dict[str, int],
         now: float, spread: dict[tuple[str, str], int] | None = None,
         draining: frozenset[str] = frozenset()) -> tuple[Rule, str]:
    """Apply `SLOT_RULES` to one slot; moves the slot's load in `loads` (and, for a
    target slot, in `spread`) to the chosen node."""
    spread = {} if spread is None else spread
    counted = slot.what == "target"
    if slot.bound:
        loads[slot.bound] -= 1
        if counted:
            spread[(slot.bound, slot.target)] -= 1
    view = View(nodes, loads, now, spread, draining)
    for rule, pick in SLOT_RULES:
        chosen = pick(slot, view)
        if chosen is not None:
            if chosen:
                loads[chosen] = loads.get(chosen, 0) + 1
                if counted:
                    spread[(chosen, slot.target)] = spread.get((chosen, slot.target), 0) + 1
            return rule, chosen
    raise AssertionError("SLOT_RULES ends with NONE, which always applies")


def loads_of(assignments: Mapping[str, Assignment]) -> dict[str, int]:
    """Policy slots (source or target) each proxy holds."""
    loads: dict[str, int] = {}
    for a in assignments.values():
        for e in (a.source_proxy, a.target_proxy):
            if e.node_id:
                loads[e.node_id] = loads.get(e.node_id, 0) + 1
    return loads


def spread_of(assignments: Mapping[str, Assignment],
              policies: Mapping[str, PolicyConfig]) -> dict[tuple[str, str], int]:
    """Target proxy slots per (target proxy, the target its policy names)."""
    out: dict[tuple[str, str], int] = {}
    for a in assignments.values():
        p = policies.get(a.policy)
        if a.target_proxy.node_id and p is not None:
            key = (a.target_proxy.node_id, p.target)
            out[key] = out.get(key, 0) + 1
    return out


def _endpoint(nodes: Mapping[str, Node], node_id: str) -> Endpoint:
    if not node_id:
        return NO_ENDPOINT
    node = nodes.get(node_id)
    return Endpoint(node_id, node.info.address if node else "")


def _target(p: PolicyConfig, nodes: Mapping[str, Node], now: float) -> tuple[Endpoint, str]:
    """The policy's target endpoint, or NO_ENDPOINT and why not."""
    node = nodes.get(p.target)
    if node is None:
        return NO_ENDPOINT, f"target {p.target} is not registered"
    if node.info.role != Role.TARGET:
        return NO_ENDPOINT, f"node {p.target} is not a target"
    if not in_service(node, now):
        return NO_ENDPOINT, f"target {p.target} is down"
    return _endpoint(nodes, p.target), ""


@dataclass(frozen=True)
class Placement:
    assignment: Assignment
    rebound: bool
    """A bound node was lost or replaced (counted in `rebinds`)."""


Group = tuple[str, tuple[str, ...]]
NO_GROUP: Group = ("", ())
"""(group name, its member names sorted) of a member policy; NO_GROUP otherwise."""


def place(p: PolicyConfig, old: Assignment | None, epoch_floor: int,
          nodes: Mapping[str, Node], loads: dict[str, int], now: float,
          spread: dict[tuple[str, str], int] | None = None,
          draining: frozenset[str] = frozenset(), quiet: bool = False,
          group: Group = NO_GROUP) -> Placement:
    """The policy's assignment now; `loads` and `spread` follow the slots that moved.
    `group`: the policy is the first member of that group (its choices must have
    room for every member)."""
    spread = {} if spread is None else spread
    rules: list[tuple[Slot, Rule, str]] = []
    for what, roles, site, bound, pinned in (
            ("source", SOURCE_ROLES, p.source_site,
             old.source_proxy.node_id if old else "", p.pinned_source_proxy),
            ("target", TARGET_ROLES, p.target_site,
             old.target_proxy.node_id if old else "", p.pinned_target_proxy)):
        slot = Slot(what, roles, site, bound, pinned, p.enabled, p.target,
                    max(1, len(group[1])))
        rules.append((slot, *fill(slot, nodes, loads, now, spread, draining)))
    reasons = [f"no healthy {slot.what} proxy on site {slot.site}"
               for slot, rule, _ in rules if rule is Rule.NONE]
    if p.enabled:
        target, why = _target(p, nodes, now)
        reasons += [why] if why else []
    else:
        target, reasons = NO_ENDPOINT, ["disabled"]
    source_id, target_proxy_id = rules[0][2], rules[1][2]
    new = Assignment(
        policy=p.name, epoch=old.epoch if old else epoch_floor,
        filter=_endpoint(nodes, policy_filter(p)),
        source_proxy=_endpoint(nodes, source_id),
        target_proxy=_endpoint(nodes, target_proxy_id),
        target=target, reason="; ".join(reasons), group=group[0], group_members=group[1])
    return _epoch(p, old, new, quiet)


def follow(p: PolicyConfig, old: Assignment | None, epoch_floor: int, first: Assignment,
           nodes: Mapping[str, Node], loads: dict[str, int],
           spread: dict[tuple[str, str], int], group: Group,
           quiet: bool = False) -> Placement:
    """A later member of a group: the first member's binding and reason (see the
    module doc); `loads` and `spread` follow its slots."""
    for what, was, now_ep in (("source", old.source_proxy if old else NO_ENDPOINT,
                               first.source_proxy),
                              ("target", old.target_proxy if old else NO_ENDPOINT,
                               first.target_proxy)):
        for ep, step in ((was, -1), (now_ep, 1)):
            if ep.node_id:
                loads[ep.node_id] = loads.get(ep.node_id, 0) + step
                if what == "target":
                    key = (ep.node_id, p.target)
                    spread[key] = spread.get(key, 0) + step
    new = Assignment(
        policy=p.name, epoch=old.epoch if old else epoch_floor,
        filter=_endpoint(nodes, policy_filter(p)), source_proxy=first.source_proxy,
        target_proxy=first.target_proxy, target=first.target, reason=first.reason,
        group=group[0], group_members=group[1])
    return _epoch(p, old, new, quiet)


def _epoch(p: PolicyConfig, old: Assignment | None, new: Assignment,
           quiet: bool) -> Placement:
    """`new` with the epoch grown when its binding is not `old`'s (I-a)."""
    source_id, target_proxy_id = new.source_proxy.node_id, new.target_proxy.node_id
    target = new.target
    old_binding = old.binding if old else (NO_ENDPOINT,) * 3
    rebound = False
    if new.binding != old_binding:
        rebound = p.enabled and any(o.node_id and o.node_id != n.node_id
                                    for o, n in zip(old_binding, new.binding, strict=True))
        new = replace(new, epoch=new.epoch + 1)
        if not quiet:
            alog.info("policy bound: source=%s target_proxy=%s target=%s%s",
                      source_id or "-", target_proxy_id or "-", target.node_id or "-",
                      f" ({new.reason})" if new.reason else "",
                      extra={"policy": p.name, "epoch": new.epoch})
    return Placement(new, rebound)


def member_groups(groups: Mapping[str, Sequence[str]]) -> dict[str, Group]:
    """Member name -> (group, its members sorted), from group -> member names."""
    out: dict[str, Group] = {}
    for g, names in groups.items():
        ms = tuple(sorted(names))
        out.update({m: (g, ms) for m in ms})
    return out


def place_all(policies: Mapping[str, PolicyConfig], assignments: Mapping[str, Assignment],
              epoch_floor: Mapping[str, int], nodes: Mapping[str, Node],
              now: float, draining: frozenset[str] = frozenset(), quiet: bool = False,
              groups: Mapping[str, Sequence[str]] | None = None,
              ) -> tuple[dict[str, Assignment], int]:
    """Every policy's placement, by name: (the assignments that changed, rebinds).
    `quiet`: a what-if (a drain's dry run), nothing logged; `groups`: group name ->
    its member policies' names (each a key of `policies`)."""
    loads, spread = loads_of(assignments), spread_of(assignments, policies)
    of = member_groups(groups or {})
    changed: dict[str, Assignment] = {}
    placed: dict[str, Assignment] = {}
    rebinds = 0
    for name in sorted(policies):
        old = assignments.get(name)
        group = of.get(name, NO_GROUP)
        first = placed.get(group[1][0]) if group[1] and group[1][0] != name else None
        if first is not None:
            got = follow(policies[name], old, epoch_floor.get(name, 0), first, nodes, loads,
                         spread, group, quiet)
        else:
            got = place(policies[name], old, epoch_floor.get(name, 0), nodes, loads, now,
                        spread, draining, quiet, group)
        placed[name] = got.assignment
        rebinds += got.rebound
        if got.assignment != old:
            changed[name] = got.assignment
    return changed, rebinds
