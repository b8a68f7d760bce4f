"""Restore points of a consistency group: the intersection of its members' (pure).

Theory of operation
-------------------
A group runs as member policies ``<group>..<filter>`` (cdp_common.groups),
each with its own store and catalog at this target. The source proxy has
every member's filter write a CHECKPOINT marker with one shared id; a
member's point that ends at a marker carries that ``checkpoint_id``
(`points.Point`). A *group point* exists for exactly the checkpoint ids that
every member has as a point, and it is, per member, that member's point:
restoring each member at its point gives the disks of all members at one
instant of the group's write order.

`group_points` is one pass over each member's points (dicts, no quadratic
scan): the ids of the member with the fewest checkpoint points, kept when
every other member's `Catalog.by_checkpoint` has them, in that member's seq
order (which is checkpoint order at every member: the markers are written in
the order the proxy asks for them). A group point's time is the newest of
its members' times (the instant every member had reached), so group points
are ordered by time too (each member's times never decrease).

`pick` chooses one as a single policy's `restore.pick_point` does: by id
(the checkpoint id), by time (the newest group point at or before it) or
the newest.

Failover of a group
-------------------
A group has no failover state of its own: each member keeps its own
(`restore.Failover`, ``failover.json`` with the checkpoint id of its point),
and the group's state is derived from the members' (`failover_state`):

    every member ""                              ""
    every member active, at one checkpoint       "active"
    every member committed                       "committed"
    every member committing/committed (or some   "committing"
      of them active, at one checkpoint)
    anything else: some failed over and some     "partial"
      not, or at different points

A group failover fails the members over one by one in name order, each
persisted as a single policy's is, so a crash between two members leaves a
"partial" group that says which members are failed over. `plan_failover`
decides what a failover at a checkpoint does: it skips members already active
at that checkpoint (so repeating the failover finishes an interrupted one) and
refuses, before anything changes, when a member is failed over elsewhere or
committed. `plan_finish` picks the members an undo or commit acts on: undo
every active member (of a partial group too: that is its clean-up), never
once a commit began; commit only a group wholly failed over at one
checkpoint (a commit of some members would make production of part of the
group), and finishes an interrupted commit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from cdp_common.errors import CdpError
from cdp_target.points import Catalog, Point


class GroupPointNotFound(CdpError, grpc_status="NOT_FOUND"):
    """No group restore point matches the request."""


@dataclass(frozen=True)
class GroupPoint:
    checkpoint_id: int
    members: tuple[tuple[str, Point], ...]
    """(member policy, its point of this checkpoint), sorted by member."""

    @property
    def id(self) -> int:
        return self.checkpoint_id

    @property
    def time_ns(self) -> int:
        return max(p.time_ns for _, p in self.members)

    @property
    def kind(self) -> str:
        """"long" when every member keeps its point as long-term, else "short"."""
        return "long" if all(p.kind == "long" for _, p in self.members) else "short"

    def point_of(self, member: str) -> Point:
        for name, p in self.members:
            if name == member:
                return p
        raise KeyError(member)


def group_points(catalogs: Mapping[str, Catalog]) -> list[GroupPoint]:
    """The group points of members with these catalogs, oldest first (module docstring)."""
    if not catalogs:
        return []
    names = sorted(catalogs)
    index = {n: catalogs[n].by_checkpoint for n in names}
    lead = min(names, key=lambda n: len(index[n]))
    out = []
    for p in catalogs[lead].points:
        cid = p.checkpoint_id
        if not cid or index[lead].get(cid) is not p:
            continue
        members = []
        for n in names:
            q = index[n].get(cid)
            if q is None:
                break
            members.append((n, q))
        else:
            out.append(GroupPoint(cid, tuple(members)))
    return out


def pick(group: str, points: list[GroupPoint], point_id: int = 0, time_ns: int = 0,
         latest: bool = False) -> GroupPoint:
    """The group point asked for: by checkpoint id, newest at or before a time, or newest."""
    if not points:
        raise GroupPointNotFound(f"consistency group {group} has no group restore point yet "
                                 f"(no checkpoint is a point of every member)")
    if latest or (not point_id and not time_ns):
        return points[-1]
    if point_id:
        for gp in points:
            if gp.checkpoint_id == point_id:
                return gp
        raise GroupPointNotFound(f"consistency group {group} has no restore point {point_id}; "
                                 f"`cdpctl restore-points {group}` lists them")
    best = None
    for gp in points:
        if gp.time_ns <= time_ns:
            best = gp
    if best is None:
        raise GroupPointNotFound(f"consistency group {group} has no restore point at or "
                                 f"before the requested time (the oldest is at "
                                 f"{points[0].time_ns} ns)")
    return best


# ---------------------------------------------------------------- failover

class GroupFailoverRefused(CdpError, grpc_status="FAILED_PRECONDITION"):
    """The members' failover states forbid this group failover, undo or commit."""


@dataclass(frozen=True)
class MemberFailover:
    """One member's failover, as its own failover state says."""

    state: str
    """"" (none) | "active" | "committing" | "committed" (`restore.Failover.state`)."""
    checkpoint_id: int = 0
    """The checkpoint its failover point ends at; 0: none, or not at a checkpoint."""

    def describe(self) -> str:
        if not self.state:
            return "not failed over"
        at = f"checkpoint {self.checkpoint_id}" if self.checkpoint_id else \
            "a point of its own (no checkpoint)"
        return f"{self.state} at {at}"


def failover_state(members: Mapping[str, MemberFailover]) -> str:
    """The group's failover state from its members' (module docstring's table)."""
    states = {m.state for m in members.values()}
    if not members or states == {""}:
        return ""
    ids = {m.checkpoint_id for m in members.values()}
    one_point = len(ids) == 1 and 0 not in ids
    if states == {"active"}:
        return "active" if one_point else "partial"
    if states == {"committed"}:
        return "committed"
    if states <= {"active", "committing", "committed"} and one_point:
        return "committing"
    return "partial"


def describe_members(members: Mapping[str, MemberFailover]) -> str:
    return "; ".join(f"{n} {m.describe()}" for n, m in sorted(members.items()))


def plan_failover(group: str, members: Mapping[str, MemberFailover],
                  checkpoint_id: int) -> list[str]:
    """The members to fail over (name order) for a failover of `group` at
    `checkpoint_id`: those not failed over; a member already active at that
    checkpoint is kept as it is. GroupFailoverRefused when any member is failed
    over at another point, or committing or committed: nothing may change then."""
    state = failover_state(members)
    if state in ("active", "committing", "committed"):
        at = next(iter(members.values())).checkpoint_id
        raise GroupFailoverRefused(
            f"consistency group {group} is already failed over ({state}, at checkpoint "
            f"{at})" + (f"; `cdpctl failover undo {group}` first" if state == "active"
                        else ""))
    other = {n: m for n, m in members.items()
             if m.state and not (m.state == "active" and m.checkpoint_id == checkpoint_id)}
    if other:
        raise GroupFailoverRefused(
            f"consistency group {group}: member(s) {describe_members(other)}; a group "
            f"failover at checkpoint {checkpoint_id} needs every member not failed over "
            f"(or failed over at that checkpoint): `cdpctl failover undo {group}` first")
    return sorted(n for n, m in members.items() if not m.state)


def plan_finish(group: str, members: Mapping[str, MemberFailover],
                what: Literal["undo", "commit"]) -> list[str]:
    """The members an undo or commit of `group` acts on (name order), each of them
    active (module docstring); GroupFailoverRefused when the states forbid it."""
    state = failover_state(members)
    active = sorted(n for n, m in members.items() if m.state == "active")
    now = describe_members(members)
    if not state:
        raise GroupFailoverRefused(f"consistency group {group} is not failed over; nothing "
                                   f"to {what}")
    if what == "undo":
        if state in ("committing", "committed") or any(
                m.state in ("committing", "committed") for m in members.values()):
            raise GroupFailoverRefused(
                f"consistency group {group}: failover is {state} (members: {now}); a commit "
                f"cannot be undone" + (f": `cdpctl failover commit {group}` finishes it"
                                       if state == "committing" else ""))
        return active
    if state == "committed":
        raise GroupFailoverRefused(f"consistency group {group}: failover is committed "
                                   f"already; nothing to commit")
    if state == "partial":
        raise GroupFailoverRefused(
            f"consistency group {group} is only partly failed over (members: {now}); "
            f"commit needs every member failed over at one checkpoint: `cdpctl failover "
            f"{group} --point ID` finishes the failover, `cdpctl failover undo {group}` "
            f"undoes it")
    if not active:   # committing members only: recovery completes them at open
        raise GroupFailoverRefused(
            f"consistency group {group}: its members' commit is under way ({now}); a "
            f"restart of the target completes it")
    return active
