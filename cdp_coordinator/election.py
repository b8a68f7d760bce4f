"""Leader election among coordinators: the pure state machine (no I/O, no clock).

Theory of operation
-------------------
Several coordinators share one etcd store; exactly one of them, the *leader*,
writes to it, tracks the nodes' leases and serves the nodes. The others are
*standbys*: they serve read-only status and refuse everything else with
UNAVAILABLE naming the leader (cdp_coordinator.service).

Leadership is one etcd key (`<prefix>leader`) attached to a lease of the
candidate (TTL `coordinator.election_ttl_s`). A candidate *campaigns* with one
transaction: "if the key does not exist (create_revision = 0), put it with my
identity and my lease; else read it". The transaction makes it a
compare-and-swap, so two candidates can never both win. The key disappears
when its holder's lease expires (the holder died or lost etcd) or when it
resigns (revokes its lease on shutdown); a standby that sees it gone
campaigns at once.

A leader cannot know that its lease still runs except by renewing it: when
no renewal was confirmed for `ttl_s - margin_s` (the lease may have expired
at etcd meanwhile, and a standby may be leading), the leader steps down on
its own (`tick`). Its writes are fenced as well: every store transaction of
the leader compares the election key's create_revision with the one it won
(cdp_coordinator.etcdstore `fence`), so a leader that was deposed before it
noticed cannot write (FencedError).

Transitions (one table, `TRANSITIONS`):

    role        event        -> role        action
    CANDIDATE   won          -> LEADER      LEAD     (load the state from the store, serve)
    CANDIDATE   lost         -> STANDBY     FOLLOW   (the key names another leader)
    STANDBY     lost         -> STANDBY     FOLLOW   (the key names a leader, maybe a new one)
    STANDBY     vacant       -> CANDIDATE   CAMPAIGN (the key is gone: try to take it)
    STANDBY     lease_lost   -> CANDIDATE   CAMPAIGN (own lease gone: a new one, then try)
    LEADER      vacant       -> CANDIDATE   STEP_DOWN (the key is gone or not ours any more)
    LEADER      lease_lost   -> CANDIDATE   STEP_DOWN (own lease gone, or unconfirmed too long)
    LEADER      lost         -> STANDBY     STEP_DOWN (another holds the key)
    CANDIDATE   vacant       -> CANDIDATE   CAMPAIGN
    CANDIDATE   lease_lost   -> CANDIDATE   CAMPAIGN
    LEADER      won          -> LEADER      NONE     (the key is still ours)
    *           stop         -> STOPPED     STEP_DOWN if LEADER, else NONE
    *           anything else   unchanged   NONE

`renewed(now)` records a confirmed renewal; `tick(now)` turns an unconfirmed
leader into `lease_lost`. The shell (cdp_coordinator.leader) feeds the events
and carries out the actions; tests drive this table directly.

Invariant: at most one coordinator acts as leader at any time, provided
clocks run at the same rate: a leader stops acting `margin_s` before the
lease it last renewed can have expired at etcd, and a standby can win only
after that expiry.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Role(enum.Enum):
    CANDIDATE = "candidate"
    STANDBY = "standby"
    LEADER = "leader"
    STOPPED = "stopped"


class Event(enum.Enum):
    WON = "won"
    LOST = "lost"
    VACANT = "vacant"
    LEASE_LOST = "lease_lost"
    STOP = "stop"


class Action(enum.Enum):
    NONE = "none"
    LEAD = "lead"
    FOLLOW = "follow"
    CAMPAIGN = "campaign"
    STEP_DOWN = "step_down"


TRANSITIONS: dict[tuple[Role, Event], tuple[Role, Action]] = {
    (Role.CANDIDATE, Event.WON): (Role.LEADER, Action.LEAD),
    (Role.CANDIDATE, Event.LOST): (Role.STANDBY, Action.FOLLOW),
    (Role.STANDBY, Event.LOST): (Role.STANDBY, Action.FOLLOW),
    (Role.STANDBY, Event.VACANT): (Role.CANDIDATE, Action.CAMPAIGN),
    (Role.STANDBY, Event.LEASE_LOST): (Role.CANDIDATE, Action.CAMPAIGN),
    (Role.LEADER, Event.VACANT): (Role.CANDIDATE, Action.STEP_DOWN),
    (Role.LEADER, Event.LEASE_LOST): (Role.CANDIDATE, Action.STEP_DOWN),
    (Role.LEADER, Event.LOST): (Role.STANDBY, Action.STEP_DOWN),
    (Role.CANDIDATE, Event.VACANT): (Role.CANDIDATE, Action.CAMPAIGN),
    (Role.CANDIDATE, Event.LEASE_LOST): (Role.CANDIDATE, Action.CAMPAIGN),
    (Role.LEADER, Event.WON): (Role.LEADER, Action.NONE),
    (Role.LEADER, Event.STOP): (Role.STOPPED, Action.STEP_DOWN),
    (Role.STANDBY, Event.STOP): (Role.STOPPED, Action.NONE),
    (Role.CANDIDATE, Event.STOP): (Role.STOPPED, Action.NONE),
}


@dataclass(frozen=True)
class Step:
    """What one event did: the role before and after, and what the shell must do."""

    before: Role
    after: Role
    action: Action
    leader: str
    """The leader's address as known after the event ("" = none known)."""


class Election:
    """One coordinator's view of the election (see the module docstring)."""

    def __init__(self, ttl_s: float, margin_s: float | None = None) -> None:
        self.ttl_s = ttl_s
        self.margin_s = min(ttl_s / 4, 0.5) if margin_s is None else margin_s
        """A leader stops this long before its last renewed lease can expire."""
        self.role = Role.CANDIDATE
        self.leader = ""
        """Address of the leader ("" = none known); our own address while we lead."""
        self.confirmed_at: float | None = None
        """When (now) our lease was last confirmed alive (granted or renewed)."""
        self.terms = 0
        """Times this coordinator became leader."""

    def handle(self, event: Event, now: float, leader: str = "") -> Step:
        """Feed one event; `leader` is the holder's address for WON (ours) and LOST."""
        before = self.role
        after, action = TRANSITIONS.get((before, event), (before, Action.NONE))
        self.role = after
        if event in (Event.WON, Event.LOST):
            self.leader = leader
        elif event in (Event.VACANT, Event.LEASE_LOST, Event.STOP):
            self.leader = ""
        if event is Event.LEASE_LOST:
            self.confirmed_at = None
        if action is Action.LEAD:
            self.terms += 1
            if self.confirmed_at is None:
                self.confirmed_at = now
        return Step(before, after, action, self.leader)

    def renewed(self, now: float) -> None:
        """Our lease was granted or renewed at `now` (etcd answered with a TTL > 0)."""
        self.confirmed_at = now

    def deadline(self) -> float | None:
        """When a leader must step down unless its lease is confirmed again."""
        if self.confirmed_at is None:
            return None
        return self.confirmed_at + self.ttl_s - self.margin_s

    def tick(self, now: float) -> Step | None:
        """A leader whose lease went unconfirmed too long loses it (LEASE_LOST)."""
        if self.role is not Role.LEADER:
            return None
        deadline = self.deadline()
        if deadline is None or now >= deadline:
            return self.handle(Event.LEASE_LOST, now)
        return None

    @property
    def leading(self) -> bool:
        return self.role is Role.LEADER
