"""Durable coordinator state: the `StateStore` interface and its SQLite implementation.

Theory of operation
-------------------
The store keeps what must survive a coordinator restart: the node registry
(so restarted coordinators still know the nodes that heartbeat to them), the
policies (JSON of `PolicyConfig`) and the assignments with their epochs (so an
epoch never goes backwards, which would let a stale proxy pass the target's
fence). Heartbeats and reports are not stored durably: they are renewed every
second. The leader does keep each node's newest heartbeat as an *ephemeral*
liveness entry (`save_liveness`), which expires by itself `ttl_s` after its
last save, so that standby coordinators sharing the store show which nodes
are up and what they report. Only the etcd store shares it across processes
(each entry under its own etcd lease); SQLite and the memory twin, which one
coordinator alone reads, keep it in the process (`LivenessTable`).

Every write is one transaction; SQLite runs in WAL mode with
`synchronous=NORMAL` (a committed transaction survives a process crash; a
power loss may lose the last few, and epochs then still only grow because the
target refuses older epochs and the coordinator bumps on the next rebind).

Policies are edited from the CLI (policy RPCs) and stored here; the config
file's `[[policies]]` are applied to the store at every start
(cdp_coordinator.reconcile). The `seeded` table of older versions, which made
them seed the store only once, is kept in the schema but no longer used.

Pending `cdpctl sync` requests (the newest request id per placed policy)
are stored too, so that a restarted coordinator or a standby taking over
still hands them to the filters; ids only grow.

The RPO alarm event log (`alarms`) is append-only; the current alarm level
per policy is the level of its newest event.

Failover plans (`cdpctl plan`, `Plan`) are stored as the JSON of
`plan_to_json` by name, apart from everything else: the coordinator only
keeps them (cdpctl carries them out), so `load` does not return them;
`list_plans` / `get_plan` read them when asked.

SQLite is the embedded default; `cdp_coordinator.memstore.MemoryStore` is
the in-memory twin for tests; `cdp_coordinator.etcdstore.EtcdStore` is the
distributed one (`[coordinator] store = "etcd"`); all three pass the same
conformance suite.
Policies and assignments are stored as the JSON of this module's codecs in
every implementation, and a stored value that does not decode raises
`FormatError`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cdp_common.config import PolicyConfig, PolicyDiskConfig
from cdp_common.errors import CorruptStateError, FormatError, InvalidRequestError, StorageError
from cdp_common.names import NAME_RULE, is_name
from cdp_common.states import AlarmKind, AlarmLevel
from cdp_coordinator.alarms import AlarmEvent
from cdp_coordinator.model import Assignment, Endpoint, NodeInfo

log = logging.getLogger("coord.store")

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
    id TEXT PRIMARY KEY, role INTEGER NOT NULL, site TEXT NOT NULL, address TEXT NOT NULL,
    capacity INTEGER NOT NULL, metrics_address TEXT NOT NULL, pid INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS policies (name TEXT PRIMARY KEY, config TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS assignments (
    policy TEXT PRIMARY KEY, epoch INTEGER NOT NULL, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS seeded (name TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS sync_requests (policy TEXT PRIMARY KEY, id INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS drains (node TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS plans (name TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS alarms (
    id INTEGER PRIMARY KEY AUTOINCREMENT, time_ns INTEGER NOT NULL, policy TEXT NOT NULL,
    kind TEXT NOT NULL, level TEXT NOT NULL, rpo_lag_s REAL NOT NULL, message TEXT NOT NULL);
"""

MAX_ALARMS_KEPT = 100_000

MAX_PLAN_DELAY_S = 86400.0
"""The longest delay a failover plan may wait after a group (one day)."""


@dataclass(frozen=True)
class PlanGroup:
    """One step of a failover plan: policies failed over together, then a wait."""

    policies: tuple[str, ...]
    """Policy or consistency-group names, failed over concurrently."""
    delay_s: float = 0.0
    """Seconds to wait after this group before the next starts (0..MAX_PLAN_DELAY_S)."""


@dataclass(frozen=True)
class Plan:
    """A failover plan (`cdpctl plan`): its groups run in order."""

    name: str
    groups: tuple[PlanGroup, ...]

    def policies(self) -> list[str]:
        """Every policy the plan names, in the order it runs them."""
        return [p for g in self.groups for p in g.policies]


def plan_problem(plan: Plan) -> str:
    """Why `plan` is not a valid plan, naming the field ("" when it is). Whether its
    policies exist is the coordinator's check, at save time."""
    if not is_name(plan.name):
        return f"name: {plan.name!r} is not a plan name ({NAME_RULE})"
    if not plan.groups:
        return "groups: a plan needs at least one group of policies"
    seen: dict[str, int] = {}
    for i, g in enumerate(plan.groups, start=1):
        if not g.policies:
            return f"groups[{i}]: a group needs at least one policy"
        for name in g.policies:
            if not is_name(name):
                return f"groups[{i}].policies: {name!r} is not a policy name ({NAME_RULE})"
            if name in seen:
                return (f"groups[{i}].policies: policy {name} is already in group "
                        f"{seen[name]}; a plan fails a policy over once")
            seen[name] = i
        if not (isinstance(g.delay_s, int | float) and math.isfinite(g.delay_s)
                and 0 <= g.delay_s <= MAX_PLAN_DELAY_S):
            return (f"groups[{i}].delay_s: must be 0..{MAX_PLAN_DELAY_S:.0f} seconds, "
                    f"got {g.delay_s!r}")
    return ""


def check_plan(plan: Plan) -> Plan:
    """`plan` if valid (`plan_problem`), else InvalidRequestError."""
    why = plan_problem(plan)
    if why:
        raise InvalidRequestError(why)
    return plan


@dataclass(frozen=True)
class Liveness:
    """A node's newest heartbeat, as the leader heard it (`StateStore.save_liveness`)."""

    node_id: str
    seen_wall_ns: int
    """The leader's wall clock when the heartbeat arrived."""
    payload: bytes = b""
    """The heartbeat, serialized by the coordinator's service (opaque to the store)."""


class LivenessTable:
    """Liveness entries kept in this process, each `ttl_s` after its last save (the
    stores that one coordinator alone reads; `clock`: monotonic seconds)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._rows: dict[str, tuple[float, Liveness]] = {}

    def save(self, entries: Iterable[Liveness], ttl_s: float) -> None:
        until = self.clock() + ttl_s
        for e in entries:
            self._rows[e.node_id] = (until, e)

    def load(self) -> list[Liveness]:
        now = self.clock()
        for node in [n for n, (until, _) in self._rows.items() if until <= now]:
            del self._rows[node]
        return [e for _, (_, e) in sorted(self._rows.items())]


@dataclass(frozen=True)
class Snapshot:
    nodes: list[NodeInfo]
    policies: list[PolicyConfig]
    assignments: list[Assignment]
    sync_requests: dict[str, int] = dataclasses.field(default_factory=dict)
    """The newest sync request id per placed policy (`save_sync_requests`)."""
    drains: frozenset[str] = frozenset()
    """Proxies an operator drained (`save_drains`)."""


class StateStore(Protocol):
    """Persistence of the coordinator: what must survive a coordinator restart.

    The contract every implementation keeps (one conformance suite checks them
    all, tests/unit/test_statestore_conformance.py):

    - *Atomic*: a method either takes effect entirely or not at all; when it
      cannot, it raises `StorageError` and the stored state is as before.
    - *Durable*: once a mutator has returned, a store opened again on the same
      backing (a restart: close + reopen) sees its effect. (SQLite: survives a
      process crash; a power loss may lose the last transactions, see the
      module docstring.)
    - *Idempotent*: repeating a save with the same arguments (a redo after a
      crash, a retried RPC) leaves the state as doing it once did. The one
      exception is `add_alarms`, an append.
    - *Epochs never shrink*: the epoch `load` returns for a policy is the
      largest ever given to `save_assignments` for it, across restarts and
      across the policy being deleted (its assignment row is kept as the
      epoch floor), so a stale proxy never passes the target's fence.
    - *Corrupt data is an error*: a stored policy, assignment or alarm that
      does not decode raises `FormatError` (naming the store), never a
      partial snapshot or a default value.
    """

    def load(self) -> Snapshot:
        """Everything stored: nodes by id, policies by name, assignments by policy
        (including those of deleted policies, which carry their epoch floor), each
        assignment with the largest epoch ever saved for it. Raises FormatError."""

    def save_node(self, info: NodeInfo) -> None:
        """Insert or replace the node (by id)."""

    def save_policies(self, policies: list[PolicyConfig]) -> None:
        """Upsert these policies and delete the others (their epochs are kept)."""

    def save_assignments(self, assignments: list[Assignment]) -> None:
        """Upsert by policy: the stored endpoints/reason become the given ones; the
        stored epoch becomes the larger of stored and given (an older epoch never
        wins, even when it comes last)."""

    def save_policy(self, policy: PolicyConfig) -> None:
        """Insert or replace one policy."""

    def save_sync_requests(self, requests: dict[str, int]) -> None:
        """Upsert by policy: the stored id becomes the larger of stored and given
        (`load` returns them in `Snapshot.sync_requests`)."""

    def save_drains(self, nodes: frozenset[str]) -> None:
        """Replace the set of drained nodes (`cdpctl node drain`; `load` returns it in
        `Snapshot.drains`), so a restart or a takeover keeps them drained."""

    def delete_policy(self, name: str) -> None:
        """Delete the policy if stored (its epoch is kept)."""

    def add_alarms(self, events: list[AlarmEvent]) -> list[AlarmEvent]:
        """Append the events, in order; returns them with their ids, which grow
        strictly (also across restarts; an id is never reused). The log keeps at
        least the newest MAX_ALARMS_KEPT events."""

    def list_alarms(self, policy: str = "", limit: int = 1000) -> list[AlarmEvent]:
        """The newest `limit` events (of `policy`, if given), oldest first."""

    def alarm_levels(self) -> dict[str, str]:
        """Level of the newest event per policy, as stored (the tracker drops
        names it does not know)."""

    def save_plan(self, plan: Plan) -> None:
        """Insert or replace the failover plan (by name)."""

    def save_liveness(self, entries: list[Liveness], ttl_s: float) -> None:
        """Keep these nodes' newest heartbeats (replacing older ones), each until
        `ttl_s` after this save unless saved again: *ephemeral*, the one exception to
        durability (a store opened again may or may not see them; no entry outlives
        its `ttl_s`, rounded up to whole seconds by etcd)."""

    def load_liveness(self) -> list[Liveness]:
        """The entries not expired, by node id."""

    def delete_plan(self, name: str) -> None:
        """Delete the plan if stored."""

    def list_plans(self) -> list[Plan]:
        """Every stored plan, by name. Raises FormatError."""

    def get_plan(self, name: str) -> Plan | None:
        """The stored plan of that name (None: none). Raises FormatError."""

    def close(self) -> None:
        """Release the store; the backing (file, shared dict) keeps the state."""


def _json_object(text: str, what: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise FormatError(f"{what}: not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise FormatError(f"{what}: expected a JSON object, got {type(data).__name__}")
    return data


def policy_to_json(p: PolicyConfig) -> str:
    return json.dumps(dataclasses.asdict(p), sort_keys=True)


def policy_from_json(text: str) -> PolicyConfig:
    """The stored policy; unknown keys (a newer coordinator's) are ignored.
    Raises FormatError."""
    data = _json_object(text, "stored policy")
    names = {f.name for f in dataclasses.fields(PolicyConfig)}
    disk_names = {f.name for f in dataclasses.fields(PolicyDiskConfig)}
    data = {k: v for k, v in data.items() if k in names}
    try:
        data["disks"] = [PolicyDiskConfig(**{k: v for k, v in d.items() if k in disk_names})
                         for d in data.get("disks", [])]
        return PolicyConfig(**data)
    except (AttributeError, TypeError) as exc:
        raise FormatError(f"stored policy {data.get('name', '?')!r}: {exc}") from None


def assignment_to_json(a: Assignment) -> str:
    return json.dumps(dataclasses.asdict(a), sort_keys=True)


def assignment_from_json(text: str) -> Assignment:
    """The stored assignment. Raises FormatError."""
    d = _json_object(text, "stored assignment")

    def ep(key: str) -> Endpoint:
        e = d.get(key) or {}
        if not isinstance(e, dict):
            raise FormatError(f"stored assignment: {key} is not an object")
        return Endpoint(node_id=str(e.get("node_id", "")), address=str(e.get("address", "")))

    try:
        return Assignment(policy=str(d["policy"]), epoch=int(d.get("epoch", 0)),
                          filter=ep("filter"), source_proxy=ep("source_proxy"),
                          target_proxy=ep("target_proxy"), target=ep("target"),
                          reason=str(d.get("reason", "")), group=str(d.get("group", "")),
                          group_members=tuple(str(m) for m in _list(d, "group_members")))
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(f"stored assignment: bad or missing {exc}") from None


def _list(d: dict[str, Any], key: str) -> list[Any]:
    value = d.get(key) or []
    if not isinstance(value, list):
        raise FormatError(f"stored assignment: {key} is not a list")
    return value


def plan_to_json(plan: Plan) -> str:
    return json.dumps({"name": plan.name,
                       "groups": [{"policies": list(g.policies), "delay_s": g.delay_s}
                                  for g in plan.groups]}, sort_keys=True)


def plan_from_json(text: str) -> Plan:
    """The stored plan; unknown keys are ignored. Raises FormatError."""
    d = _json_object(text, "stored plan")
    try:
        groups = d["groups"]
        if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
            raise TypeError("groups is not a list of objects")
        plan = Plan(name=str(d["name"]), groups=tuple(
            PlanGroup(policies=tuple(str(p) for p in _plan_list(g)),
                      delay_s=float(g.get("delay_s", 0))) for g in groups))
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(f"stored plan {d.get('name', '?')!r}: bad or missing {exc}") from None
    why = plan_problem(plan)
    if why:
        raise FormatError(f"stored plan {plan.name!r}: {why}")
    return plan


def _plan_list(g: dict[str, Any]) -> list[Any]:
    value = g.get("policies")
    if not isinstance(value, list):
        raise TypeError("policies is not a list")
    return value


def alarm_event(id: int, time_ns: int, policy: str, kind: str, level: str,
                rpo_lag_s: float, message: str) -> AlarmEvent:
    """An alarm event from its stored fields. Raises FormatError."""
    try:
        return AlarmEvent(id=id, time_ns=time_ns, policy=policy, kind=AlarmKind(kind),
                          level=AlarmLevel(level), rpo_lag_s=rpo_lag_s, message=message)
    except ValueError as exc:
        raise FormatError(f"stored alarm event {id}: {exc}") from None


def _is_corrupt(exc: sqlite3.Error) -> bool:
    """A file that is not (or no longer) a database, as opposed to one that cannot be opened."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code in (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT) or "not a database" in str(exc)


class SqliteStore:
    """`StateStore` in one SQLite file (WAL)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.liveness = LivenessTable()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise FormatError(f"{self.path}: schema version {row[0]} is newer than this "
                                  f"coordinator ({SCHEMA_VERSION})")
        except sqlite3.DatabaseError as exc:
            if _is_corrupt(exc):
                raise CorruptStateError(f"coordinator.db_path: {self.path} is corrupt or not "
                                        f"a cdp state database: {exc}") from None
            raise StorageError(f"coordinator.db_path: cannot open {self.path}: {exc}") from None
        except sqlite3.Error as exc:
            raise StorageError(f"coordinator.db_path: cannot open {self.path}: {exc}") from None
        except OSError as exc:
            raise StorageError(f"coordinator.db_path: cannot create {self.path.parent}: "
                               f"{exc.strerror}") from None

    def _tx(self) -> _Transaction:
        return _Transaction(self._db, self.path)

    def load(self) -> Snapshot:
        try:
            nodes = [NodeInfo(id=r[0], role=r[1], site=r[2], address=r[3], capacity=r[4],
                              metrics_address=r[5], pid=r[6])
                     for r in self._db.execute(
                         "SELECT id, role, site, address, capacity, metrics_address, pid "
                         "FROM nodes ORDER BY id")]
            policies = [policy_from_json(r[0]) for r in self._db.execute(
                "SELECT config FROM policies ORDER BY name")]
            assignments = []
            for epoch, data in self._db.execute(
                    "SELECT epoch, data FROM assignments ORDER BY policy"):
                a = assignment_from_json(data)
                assignments.append(dataclasses.replace(a, epoch=max(a.epoch, epoch)))
            syncs = {r[0]: int(r[1]) for r in self._db.execute(
                "SELECT policy, id FROM sync_requests")}
            drains = frozenset(r[0] for r in self._db.execute("SELECT node FROM drains"))
        except sqlite3.Error as exc:
            raise StorageError(f"{self.path}: cannot read coordinator state: {exc}") from None
        except FormatError as exc:
            raise FormatError(f"{self.path}: corrupt coordinator state: {exc}") from None
        return Snapshot(nodes=nodes, policies=policies, assignments=assignments,
                        sync_requests=syncs, drains=drains)

    def save_node(self, info: NodeInfo) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO nodes VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (info.id, int(info.role), info.site, info.address, info.capacity,
                        info.metrics_address, info.pid))

    def save_policies(self, policies: list[PolicyConfig]) -> None:
        with self._tx() as db:
            names = [p.name for p in policies]
            db.execute(f"DELETE FROM policies WHERE name NOT IN ({','.join('?' * len(names))})",
                       names)
            for p in policies:
                db.execute("INSERT OR REPLACE INTO policies VALUES (?, ?)",
                           (p.name, policy_to_json(p)))

    def save_assignments(self, assignments: list[Assignment]) -> None:
        with self._tx() as db:
            for a in assignments:
                db.execute(
                    "INSERT INTO assignments VALUES (?, ?, ?) ON CONFLICT(policy) DO UPDATE SET "
                    "epoch = MAX(epoch, excluded.epoch), data = excluded.data",
                    (a.policy, a.epoch, assignment_to_json(a)))

    def save_policy(self, policy: PolicyConfig) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO policies VALUES (?, ?)",
                       (policy.name, policy_to_json(policy)))

    def save_sync_requests(self, requests: dict[str, int]) -> None:
        if not requests:
            return
        with self._tx() as db:
            for name, rid in sorted(requests.items()):
                db.execute("INSERT INTO sync_requests VALUES (?, ?) ON CONFLICT(policy) DO "
                           "UPDATE SET id = MAX(id, excluded.id)", (name, rid))

    def save_drains(self, nodes: frozenset[str]) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM drains")
            db.executemany("INSERT INTO drains VALUES (?)", [(n,) for n in sorted(nodes)])

    def delete_policy(self, name: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM policies WHERE name = ?", (name,))

    def add_alarms(self, events: list[AlarmEvent]) -> list[AlarmEvent]:
        out = []
        with self._tx() as db:
            for e in events:
                cur = db.execute(
                    "INSERT INTO alarms (time_ns, policy, kind, level, rpo_lag_s, message) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (e.time_ns, e.policy, e.kind, e.level, e.rpo_lag_s, e.message))
                out.append(dataclasses.replace(e, id=int(cur.lastrowid or 0)))
            if out and out[-1].id > MAX_ALARMS_KEPT:
                db.execute("DELETE FROM alarms WHERE id <= ?", (out[-1].id - MAX_ALARMS_KEPT,))
        return out

    def list_alarms(self, policy: str = "", limit: int = 1000) -> list[AlarmEvent]:
        sql = "SELECT id, time_ns, policy, kind, level, rpo_lag_s, message FROM alarms"
        args: tuple[Any, ...] = ()
        if policy:
            sql += " WHERE policy = ?"
            args = (policy,)
        sql += " ORDER BY id DESC LIMIT ?"
        try:
            rows = self._db.execute(sql, (*args, limit)).fetchall()
        except sqlite3.Error as exc:
            raise StorageError(f"{self.path}: cannot read alarms: {exc}") from None
        try:
            return [alarm_event(*r) for r in reversed(rows)]
        except FormatError as exc:
            raise FormatError(f"{self.path}: {exc}") from None

    def alarm_levels(self) -> dict[str, str]:
        try:
            rows = self._db.execute(
                "SELECT policy, level FROM alarms WHERE id IN "
                "(SELECT MAX(id) FROM alarms GROUP BY policy)").fetchall()
        except sqlite3.Error as exc:
            raise StorageError(f"{self.path}: cannot read alarms: {exc}") from None
        return {r[0]: r[1] for r in rows}

    def save_plan(self, plan: Plan) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO plans VALUES (?, ?)",
                       (plan.name, plan_to_json(plan)))

    def delete_plan(self, name: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM plans WHERE name = ?", (name,))

    def list_plans(self) -> list[Plan]:
        return self._plans("SELECT data FROM plans ORDER BY name", ())

    def get_plan(self, name: str) -> Plan | None:
        found = self._plans("SELECT data FROM plans WHERE name = ?", (name,))
        return found[0] if found else None

    def _plans(self, sql: str, args: tuple[Any, ...]) -> list[Plan]:
        try:
            rows = self._db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise StorageError(f"{self.path}: cannot read plans: {exc}") from None
        try:
            return [plan_from_json(r[0]) for r in rows]
        except FormatError as exc:
            raise FormatError(f"{self.path}: corrupt coordinator state: {exc}") from None

    def save_liveness(self, entries: list[Liveness], ttl_s: float) -> None:
        self.liveness.save(entries, ttl_s)   # one coordinator reads it: not on disk

    def load_liveness(self) -> list[Liveness]:
        return self.liveness.load()

    def close(self) -> None:
        self._db.close()


class _Transaction:
    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self._db = db
        self._path = path

    def __enter__(self) -> sqlite3.Connection:
        self._db.execute("BEGIN IMMEDIATE")
        return self._db

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            try:
                self._db.execute("COMMIT")
                return
            except sqlite3.Error as err:
                self._db.execute("ROLLBACK")
                raise StorageError(f"{self._path}: cannot write coordinator state: "
                                   f"{err}") from None
        self._db.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise StorageError(f"{self._path}: cannot write coordinator state: {exc}") from None
