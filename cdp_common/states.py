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
    PolicyState   ok | warning | error | unassigned | disabled
    AlarmLevel    ok | warning | error              (ordered: ok < warning < error)
    AlarmKind     raised | lowered | cleared

How a policy state maps to an alarm level (`PolicyState.alarm_level`):
warning/error as is; unassigned is an error (nothing is replicated, the lag
only grows); ok and disabled (the operator's choice) are ok.
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
    """Protection state of a policy in status, health and JSON."""

    OK = "ok"
    WARNING = "warning"          # RPO lag at or over the warning threshold
    ERROR = "error"              # lag over the error threshold, or a node reports an error
    UNASSIGNED = "unassigned"    # no complete assignment (no proxy or target): nothing moves
    DISABLED = "disabled"        # the operator turned it off

    @property
    def alarm_level(self) -> AlarmLevel:
        """The alarm level this state raises (see the module docstring)."""
        return _POLICY_LEVEL[self]


_POLICY_LEVEL = {
    PolicyState.OK: AlarmLevel.OK,
    PolicyState.WARNING: AlarmLevel.WARNING,
    PolicyState.ERROR: AlarmLevel.ERROR,
    PolicyState.UNASSIGNED: AlarmLevel.ERROR,
    PolicyState.DISABLED: AlarmLevel.OK,
}


class AlarmKind(enum.StrEnum):
    """What an alarm event did to a policy's level."""

    RAISED = "raised"      # to a higher level (ok -> warning/error, warning -> error)
    LOWERED = "lowered"    # error -> warning
    CLEARED = "cleared"    # back to ok (or the policy was deleted)
