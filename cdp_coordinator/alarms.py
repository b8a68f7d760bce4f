"""RPO alarms: which policies are above their warning/error thresholds (pure).

Theory of operation
-------------------
`AlarmTracker.update(levels, wall_now)` is fed, every coordinator tick, the
alarm level each policy is at now (`AlarmLevel`: ok, warning or error,
derived from its status by `level_of`) and returns the *events*: one per change of level,
never one per tick, so the event log stays small however long a policy stays
in error (deduplicated, no hysteresis: the thresholds are the policy's own).

    ok -> warning/error         "raised"
    warning -> error            "raised"
    error -> warning            "lowered"
    warning/error -> ok         "cleared"

A policy that disappears (deleted) while alarmed is cleared. The tracker's
memory is the current level per policy; the coordinator restores it from the
event log at start-up (`restore`), so a restart neither repeats a raise nor
forgets to clear one.

Level of a policy (`level_of`): `policy_level` (cdp_common.states): degraded
is a warning, error an error, unprotected a warning unless the policy is
disabled (the operator's choice: ok), ok is ok. The message is the status
reason (which names every cause, the lag against its threshold included),
or the lag when there is none.

Levels and kinds are the `AlarmLevel` / `AlarmKind` StrEnums, so the event
log and the wire keep the plain strings.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cdp_common.states import AlarmKind, AlarmLevel, PolicyState, policy_level

LEVELS = tuple(AlarmLevel)


@dataclass(frozen=True)
class Level:
    policy: str
    level: AlarmLevel
    rpo_lag_s: float = 0.0
    message: str = ""


@dataclass(frozen=True)
class AlarmEvent:
    time_ns: int
    policy: str
    kind: AlarmKind
    level: AlarmLevel  # level after the event
    rpo_lag_s: float
    message: str
    id: int = 0    # assigned by the store


def level_of(state: PolicyState | str, rpo_lag_s: float, reason: str, rpo_warning_s: float,
             rpo_error_s: float, enabled: bool = True) -> tuple[AlarmLevel, str]:
    """(alarm level, message) of one policy status."""
    level = policy_level(state, enabled)
    if reason:
        return level, reason
    if level is AlarmLevel.ERROR:
        return level, f"RPO lag {rpo_lag_s:.1f}s >= error threshold {rpo_error_s:g}s"
    if level is AlarmLevel.WARNING:
        return level, f"RPO lag {rpo_lag_s:.1f}s >= warning threshold {rpo_warning_s:g}s"
    return level, f"RPO lag {rpo_lag_s:.1f}s"


@dataclass
class AlarmTracker:
    current: dict[str, AlarmLevel] = field(default_factory=dict)
    """Policy -> level, only for policies not at ok."""

    def restore(self, levels: Mapping[str, str]) -> None:
        """Levels from the event log; unknown names (a newer coordinator's) are dropped."""
        self.current = {p: AlarmLevel(lv) for p, lv in levels.items()
                        if lv in LEVELS and lv != AlarmLevel.OK}

    def update(self, levels: Iterable[Level], wall_now: float) -> list[AlarmEvent]:
        t = int(wall_now * 1e9)
        events: list[AlarmEvent] = []
        seen: set[str] = set()
        for lv in sorted(levels, key=lambda x: x.policy):
            if lv.level not in LEVELS:
                raise ValueError(f"unknown alarm level {lv.level!r}")
            level = AlarmLevel(lv.level)
            seen.add(lv.policy)
            old = self.current.get(lv.policy, AlarmLevel.OK)
            if old == level:
                continue
            if level is AlarmLevel.OK:
                kind = AlarmKind.CLEARED
                del self.current[lv.policy]
            else:
                kind = AlarmKind.RAISED if level.rank > old.rank else AlarmKind.LOWERED
                self.current[lv.policy] = level
            events.append(AlarmEvent(t, lv.policy, kind, level, lv.rpo_lag_s, lv.message))
        for policy in sorted(set(self.current) - seen):
            del self.current[policy]
            events.append(AlarmEvent(t, policy, AlarmKind.CLEARED, AlarmLevel.OK, 0.0,
                                     "policy deleted"))
        return events
