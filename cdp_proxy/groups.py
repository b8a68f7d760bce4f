"""Consistency-group checkpoints, driven by the source proxy that serves the group.

Theory of operation (docs/ARCHITECTURE.md "Consistency groups")
---------------------------------------------------------------
A group's member policies (one per filter, cdp_common.groups) are all placed
on this proxy, each with its own Ship session. Every `interval_s`, once every
member's session has joined, a `Group` takes one checkpoint in two phases:

1. HOLD: a fresh id (this proxy's wall clock in ns, above the last one) goes to
   every member; each filter stops giving seqs to new writes and answers HELD
   (or refuses: a gap is open). The proxy waits up to `wait_s` for all answers.
2. MARK, once every member held: each filter appends a CHECKPOINT marker with
   the id and lets its writers go. Otherwise RELEASE: the round is abandoned,
   no member writes a marker for it.

Invariant (the dependent-write rule): when the last HELD arrives, every member
is holding, so at that instant no member takes a seq. A write X acknowledged
on filter A before a write Y was issued on filter B took its seq before B's
hold began if Y is before B's marker, hence before that instant, hence before
A's marker: no group point holds Y without X. A filter whose hold timed out
(`hold_timeout_s`, its own clock) before the mark arrived ignores the mark, so
a marker always means "held from HELD through the marker".

Failure cases: a member missing (its filter down, its session not yet open) or
one that does not answer in time makes the round abandoned, and the points of
the members that did mark earlier rounds stay usable; a lost MARK (stream cut)
leaves that member without the marker, so the id is not a group point (the
target intersects). The proxy keeps nothing durable: after a restart or a
rebind the next round starts from the clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from cdp_common.pb.cdp.v1 import replication_pb2 as rpb
from cdp_proxy import metrics

log = logging.getLogger("proxy.group")

WAIT_FRACTION = 0.5     # of the interval, at most WAIT_MAX_S: how long HELDs may take
WAIT_MAX_S = 0.5
HOLD_TIMEOUT_S = 1.0    # a filter releases by itself after this (writes wait no longer)
SEND_TIMEOUT_S = 0.5


class MemberLink(Protocol):
    """One member's Ship session, as the group sees it."""

    policy: str
    epoch: int
    filter_id: str
    """The filter the session's signed assignment names (it alone may answer)."""

    async def send_control(self, response: rpb.ShipResponse) -> None:
        """Write one checkpoint command to the member's filter."""


@dataclass
class _Round:
    checkpoint_id: int
    waiting: set[str]
    refused: dict[str, str] = field(default_factory=dict)
    answered: asyncio.Event = field(default_factory=asyncio.Event)


class Group:
    """The checkpoints of one consistency group over its members' sessions here."""

    def __init__(self, name: str, members: tuple[str, ...], interval_s: float,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self.name = name
        self.members = members
        self.interval_s = interval_s
        self.wait_s = min(WAIT_MAX_S, interval_s * WAIT_FRACTION)
        self.clock = clock
        self.links: dict[str, MemberLink] = {}
        self.last_id = 0
        self.marked = 0
        self.abandoned = 0
        self.last_problem = ""
        self._round: _Round | None = None
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ membership

    def join(self, link: MemberLink) -> None:
        """A member's session opened (a newer one replaces the older)."""
        self.links[link.policy] = link
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"group-{self.name}")

    def leave(self, link: MemberLink) -> bool:
        """A member's session ended; True when no member is left here."""
        if self.links.get(link.policy) is link:
            del self.links[link.policy]
        if self.links:
            return False
        if self._task is not None:
            self._task.cancel()
        return True

    def on_held(self, member: str, held: rpb.CheckpointHeld) -> None:
        r = self._round
        if r is None or held.checkpoint_id != r.checkpoint_id or member not in r.waiting:
            return   # an answer to an abandoned round
        r.waiting.discard(member)
        if held.refused:
            r.refused[member] = held.reason or "refused"
        if not r.waiting or r.refused:
            r.answered.set()

    # ------------------------------------------------------------ rounds

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            missing = [m for m in self.members if m not in self.links]
            if missing:
                self._problem(f"member {', '.join(missing)} has no session on this proxy")
            else:
                await self.checkpoint()
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - started)))

    async def checkpoint(self) -> bool:
        """One two-phase round over the members joined now; True when it marked."""
        cid = max(self.clock(), self.last_id + 1)
        self.last_id = cid
        links = dict(self.links)
        r = self._round = _Round(cid, set(links))
        try:
            hold = rpb.ShipResponse(hold=rpb.CheckpointHold(checkpoint_id=cid,
                                                            timeout_s=HOLD_TIMEOUT_S))
            sent = await self._send_all(links, hold)
            if sent:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(r.answered.wait(), self.wait_s)
            ok = sent and not r.waiting and not r.refused
            if ok:
                await self._send_all(links, rpb.ShipResponse(
                    mark=rpb.CheckpointMark(checkpoint_id=cid)))
                self.marked += 1
                metrics.CHECKPOINTS.labels("marked").inc()
                self.last_problem = ""
                return True
            await self._send_all(links, rpb.ShipResponse(
                release=rpb.CheckpointRelease(checkpoint_id=cid)))
            self.abandoned += 1
            metrics.CHECKPOINTS.labels("abandoned").inc()
            if r.refused:
                self._problem("; ".join(f"{m} refused: {why}"
                                        for m, why in sorted(r.refused.items())))
            else:
                self._problem(f"no answer from {', '.join(sorted(r.waiting))} within "
                              f"{self.wait_s:.2f} s" if r.waiting else "a hold was not sent")
            return False
        finally:
            self._round = None

    async def _send_all(self, links: dict[str, MemberLink], response: rpb.ShipResponse) -> bool:
        """Send to every member at once; False if any send failed or stalled."""
        async def one(link: MemberLink) -> bool:
            try:
                await asyncio.wait_for(link.send_control(response), SEND_TIMEOUT_S)
            except Exception as exc:   # the session's own reader reports its failure
                log.debug("checkpoint command to %s failed: %s", link.policy, exc,
                          extra={"policy": self.name})
                return False
            return True
        results = await asyncio.gather(*(one(link) for link in links.values()))
        return all(results)

    def _problem(self, text: str) -> None:
        if text != self.last_problem:
            log.info("group checkpoint abandoned: %s", text, extra={"policy": self.name})
        self.last_problem = text


class Groups:
    """The groups this proxy serves, by name (created with the first member)."""

    def __init__(self) -> None:
        self.by_name: dict[str, Group] = {}

    def join(self, name: str, members: tuple[str, ...], interval_s: float,
             link: MemberLink) -> Group:
        g = self.by_name.get(name)
        if g is None or g.members != members or g.interval_s != interval_s:
            # a changed group (members, interval) starts afresh with this session
            if g is not None:
                for old in list(g.links.values()):
                    g.leave(old)
            g = self.by_name[name] = Group(name, members, interval_s)
        g.join(link)
        return g

    def leave(self, group: Group, link: MemberLink) -> None:
        if group.leave(link) and self.by_name.get(group.name) is group:
            del self.by_name[group.name]

    def member(self, policy: str) -> tuple[Group, MemberLink] | None:
        """The group and open session of member `policy` here (None: no such session)."""
        for g in self.by_name.values():
            link = g.links.get(policy)
            if link is not None:
                return g, link
        return None
