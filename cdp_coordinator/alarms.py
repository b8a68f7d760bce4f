"""RPO alarms: which policies are above their warning/error thresholds (pure).

Theory of operation
-------------------
`AlarmTracker.update(levels, wall_now)` is fed, every coordinator tick, the
alarm level each policy is at now ("ok", "warning" or "error", derived from
its status by `level_of`) and returns the *events*: one per change of level,
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

Level of a policy (`level_of`): its status state "warning"/"error" as is;
"unassigned" is an error (nothing is being replicated, the lag will only
grow); "ok" and "disabled" are ok. The message says why (the status reason,
or the lag against the threshold).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

LEVELS = ("ok", "warning", "error")
_RANK = {name: i for i, name in enumerate(LEVELS)}


@dataclass(frozen=True)
class Level:
    policy: str
    level: str
    rpo_lag_s: float = 0.0
    message: str = ""


@dataclass(frozen=True)
class AlarmEvent:
    time_ns: int
    policy: str
    kind: str      # raised | lowered | cleared
    level: str     # level after the event
    rpo_lag_s: float
    message: str
    id: int = 0    # assigned by the store


def level_of(state: str, rpo_lag_s: float, reason: str, rpo_warning_s: float,
             rpo_error_s: float) -> tuple[str, str]:
    """(alarm level, message) of one policy status."""
    if state == "unassigned":
        return "error", f"unassigned: {reason}" if reason else "unassigned"
    if state == "error":
        if reason:
            return "error", reason
        return "error", f"RPO lag {rpo_lag_s:.1f}s >= error threshold {rpo_error_s:g}s"
    if state == "warning":
        return "warning", f"RPO lag {rpo_lag_s:.1f}s >= warning threshold {rpo_warning_s:g}s"
    return "ok", f"RPO lag {rpo_lag_s:.1f}s"


@dataclass
class AlarmTracker:
    current: dict[str, str] = field(default_factory=dict)
    """Policy -> level, only for policies not at "ok"."""

    def restore(self, levels: Mapping[str, str]) -> None:
        self.current = {p: lv for p, lv in levels.items() if lv in _RANK and lv != "ok"}

    def update(self, levels: Iterable[Level], wall_now: float) -> list[AlarmEvent]:
        t = int(wall_now * 1e9)
        events: list[AlarmEvent] = []
        seen: set[str] = set()
        for lv in sorted(levels, key=lambda x: x.policy):
            if lv.level not in _RANK:
                raise ValueError(f"unknown alarm level {lv.level!r}")
            seen.add(lv.policy)
            old = self.current.get(lv.policy, "ok")
            if old == lv.level:
                continue
            if lv.level == "ok":
                kind = "cleared"
                del self.current[lv.policy]
            else:
                kind = "raised" if _RANK[lv.level] > _RANK[old] else "lowered"
                self.current[lv.policy] = lv.level
            events.append(AlarmEvent(t, lv.policy, kind, lv.level, lv.rpo_lag_s, lv.message))
        for policy in sorted(set(self.current) - seen):
            del self.current[policy]
            events.append(AlarmEvent(t, policy, "cleared", "ok", 0.0, "policy deleted"))
        return events
