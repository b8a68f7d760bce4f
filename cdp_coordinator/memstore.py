"""`MemoryStore`: the in-memory twin of `SqliteStore` (tests, and the contract's reference).

Theory of operation
-------------------
All state lives in a `MemoryBacking`, a plain object the store only points
to: `MemoryStore(backing)` on the backing of a closed store is a coordinator
restart, and sees everything the closed one saved, as a reopened SQLite file
does. Policies and assignments are kept as the JSON of `store`'s codecs, so
a restart decodes them as SQLite does, and a test can corrupt one to see the
`FormatError`. Every method changes the backing only after it has checked
its input, so a failure leaves it as it was (atomic, as the contract asks).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from cdp_common.config import PolicyConfig
from cdp_coordinator.alarms import AlarmEvent
from cdp_coordinator.model import Assignment, NodeInfo
from cdp_coordinator.store import (
    MAX_ALARMS_KEPT,
    Liveness,
    LivenessTable,
    Plan,
    Snapshot,
    assignment_from_json,
    assignment_to_json,
    plan_from_json,
    plan_to_json,
    policy_from_json,
    policy_to_json,
)


@dataclass
class MemoryBacking:
    """What a `MemoryStore` keeps; shared by the stores "reopened" on it."""

    nodes: dict[str, NodeInfo] = field(default_factory=dict)
    policies: dict[str, str] = field(default_factory=dict)
    """Name -> policy JSON."""
    assignments: dict[str, tuple[int, str]] = field(default_factory=dict)
    """Policy -> (largest epoch saved, assignment JSON of the latest save)."""
    alarms: list[AlarmEvent] = field(default_factory=list)
    """Oldest first, with their ids."""
    last_alarm_id: int = 0
    sync_requests: dict[str, int] = field(default_factory=dict)
    drains: frozenset[str] = frozenset()
    plans: dict[str, str] = field(default_factory=dict)
    """Name -> failover plan JSON."""
    liveness: LivenessTable = field(default_factory=LivenessTable)
    """Ephemeral, but shared as etcd's is: two coordinators on one backing (a leader
    and a standby in tests) see the same entries."""


class MemoryStore:
    """`StateStore` in memory (see the module docstring)."""

    def __init__(self, backing: MemoryBacking | None = None) -> None:
        self.backing = backing if backing is not None else MemoryBacking()
        self.closed = False

    def load(self) -> Snapshot:
        b = self.backing
        assignments = []
        for _, (epoch, data) in sorted(b.assignments.items()):
            a = assignment_from_json(data)
            assignments.append(dataclasses.replace(a, epoch=max(a.epoch, epoch)))
        return Snapshot(nodes=[b.nodes[k] for k in sorted(b.nodes)],
                        policies=[policy_from_json(b.policies[k]) for k in sorted(b.policies)],
                        assignments=assignments, sync_requests=dict(b.sync_requests),
                        drains=b.drains)

    def save_node(self, info: NodeInfo) -> None:
        self.backing.nodes[info.id] = info

    def save_policies(self, policies: list[PolicyConfig]) -> None:
        self.backing.policies = {p.name: policy_to_json(p) for p in policies}

    def save_assignments(self, assignments: list[Assignment]) -> None:
        rows = self.backing.assignments
        for a in assignments:
            stored = rows.get(a.policy, (a.epoch, ""))[0]
            rows[a.policy] = (max(stored, a.epoch), assignment_to_json(a))

    def save_policy(self, policy: PolicyConfig) -> None:
        self.backing.policies[policy.name] = policy_to_json(policy)

    def save_sync_requests(self, requests: dict[str, int]) -> None:
        rows = self.backing.sync_requests
        for name, rid in requests.items():
            rows[name] = max(rows.get(name, rid), rid)

    def save_drains(self, nodes: frozenset[str]) -> None:
        self.backing.drains = frozenset(nodes)

    def delete_policy(self, name: str) -> None:
        self.backing.policies.pop(name, None)

    def add_alarms(self, events: list[AlarmEvent]) -> list[AlarmEvent]:
        b = self.backing
        out = [dataclasses.replace(e, id=b.last_alarm_id + i)
               for i, e in enumerate(events, start=1)]
        if out:
            b.last_alarm_id = out[-1].id
            b.alarms.extend(out)
            del b.alarms[:max(0, len(b.alarms) - MAX_ALARMS_KEPT)]
        return out

    def list_alarms(self, policy: str = "", limit: int = 1000) -> list[AlarmEvent]:
        rows = [e for e in self.backing.alarms if not policy or e.policy == policy]
        if limit < 0:   # as SQLite's LIMIT: negative means no limit
            return rows
        return rows[-limit:] if limit else []

    def alarm_levels(self) -> dict[str, str]:
        return {e.policy: str(e.level) for e in self.backing.alarms}

    def save_plan(self, plan: Plan) -> None:
        self.backing.plans[plan.name] = plan_to_json(plan)

    def delete_plan(self, name: str) -> None:
        self.backing.plans.pop(name, None)

    def list_plans(self) -> list[Plan]:
        return [plan_from_json(self.backing.plans[k]) for k in sorted(self.backing.plans)]

    def get_plan(self, name: str) -> Plan | None:
        text = self.backing.plans.get(name)
        return None if text is None else plan_from_json(text)

    def save_liveness(self, entries: list[Liveness], ttl_s: float) -> None:
        self.backing.liveness.save(entries, ttl_s)

    def load_liveness(self) -> list[Liveness]:
        return self.backing.liveness.load()

    def close(self) -> None:
        self.closed = True
