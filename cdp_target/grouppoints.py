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
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

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
