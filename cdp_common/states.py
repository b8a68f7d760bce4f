"""The control plane's state names, shared by the coordinator, its alarms and cdpctl.

Theory of operation
-------------------
Every state a node, a policy or an alarm can be in is one member of a
`StrEnum` here, and its *value* is the string that goes on the wire
(`cpb.NodeStatus.state`, `cpb.PolicyStatus.state`, `cpb.AlarmEvent.level`),
into the JSON of `cdpctl status --json` and into the coordinator's alarm log.
A `StrEnum` member *is* a `str` equal to its value, so code that still
compares against the plain string, protobuf fields and `json.dumps` all keep
working; new code compares against the members, so a typo is an
AttributeError instead of a branch that is never taken.

Leaf code: imports nothing from the daemons.

    NodeState     up | down
    PolicyState   ok | degraded | error | unprotected
    AlarmLevel    ok | warning | error              (ordered: ok < warning < error)
    AlarmKind     raised | lowered | cleared

How a policy state maps to an alarm level and a `cdpctl health` severity
(`policy_level`): ok is ok; degraded is a warning; error is an error;
unprotected is ok when the policy is disabled (the operator chose not to
protect it; status still shows it, with the reason) and a warning otherwise
(nothing of it is on the DR site yet: a new policy waiting for its first
data; the coordinator turns it into an error once that lasts rpo_error_s).
So `health` never exits 0 while an enabled policy is not protected.

Older coordinators said warning, unassigned and disabled; `PolicyState.parse`
reads them as degraded, error and unprotected, so a newer cdpctl judges an
older coordinator's status the same way.
"""

from __future__ import annotations

import enum


class NodeState(enum.StrEnum):
    """Lease state of a node as the coordinator sees it."""

    UP = "up"
    DOWN = "down"


class AlarmLevel(enum.StrEnum):
    """RPO alarm level of a policy; members compare by severity via `rank`."""

    OK = "ok"
    WARNING = "warning"
    ERROR = "error"

    @property
    def rank(self) -> int:
        """0 for ok, 1 for warning, 2 for error."""
        return _LEVEL_RANK[self]


_LEVEL_RANK = {AlarmLevel.OK: 0, AlarmLevel.WARNING: 1, AlarmLevel.ERROR: 2}


class PolicyState(enum.StrEnum):
    """Protection state of a policy in status, health, metrics and JSON
    (cdp_coordinator.status computes it; every state but ok carries reasons)."""

    OK = "ok"                    # captured, shipped, durable, within RPO, no open gap
    DEGRADED = "degraded"        # an open gap, or RPO lag at or over the warning threshold
    ERROR = "error"              # something that should protect the policy does not
    UNPROTECTED = "unprotected"  # disabled, or nothing of it has reached the target yet

    @classmethod
    def parse(cls, text: str) -> PolicyState | None:
        """The state a wire string names, older names included; None if unknown."""
        try:
            return cls(text)
        except ValueError:
            return _LEGACY.get(text)


_LEGACY = {"warning": PolicyState.DEGRADED, "unassigned": PolicyState.ERROR,
           "disabled": PolicyState.UNPROTECTED}

_POLICY_LEVEL = {
    PolicyState.OK: AlarmLevel.OK,
    PolicyState.DEGRADED: AlarmLevel.WARNING,
    PolicyState.ERROR: AlarmLevel.ERROR,
    PolicyState.UNPROTECTED: AlarmLevel.WARNING,
}


def policy_level(state: str, enabled: bool = True) -> AlarmLevel:
    """Alarm level and health severity of a policy state (see the module docstring);
    an unknown state string is an error (never silently fine)."""
    parsed = PolicyState.parse(state)
    if parsed is None:
        return AlarmLevel.ERROR
    if parsed is PolicyState.UNPROTECTED and not enabled:
        return AlarmLevel.OK
    return _POLICY_LEVEL[parsed]


class AlarmKind(enum.StrEnum):
    """What an alarm event did to a policy's level."""

    RAISED = "raised"      # to a higher level (ok -> warning/error, warning -> error)
    LOWERED = "lowered"    # error -> warning
    CLEARED = "cleared"    # back to ok (or the policy was deleted)
