"""One conformance suite for every `StateStore` (the contract in cdp_coordinator/store.py):
SQLite on a tmp file, the in-memory twin and etcd (a real etcd process, one per module,
a fresh key prefix per test), each with a "restart" that reopens the same backing (for
etcd: a new client on the same etcd and prefix)."""

from __future__ import annotations

import itertools
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from coordfixtures import NODES, pol
from etcdfixture import EtcdServer, etcd_server, put_raw

from cdp_common.errors import FormatError
from cdp_common.states import AlarmKind, AlarmLevel
from cdp_coordinator.alarms import AlarmEvent
from cdp_coordinator.etcdstore import EtcdStore
from cdp_coordinator.memstore import MemoryBacking, MemoryStore
from cdp_coordinator.model import Assignment, Endpoint
from cdp_coordinator.store import (
    Liveness,
    Plan,
    PlanGroup,
    SqliteStore,
    StateStore,
    plan_to_json,
    policy_to_json,
)


@dataclass
class Harness:
    """One implementation: a store, how to reopen it, how to corrupt a stored row."""

    store: StateStore
    _reopen: Callable[[], StateStore]
    corrupt: Callable[[str, str, str], None]
    """corrupt(table, key, text): overwrite a stored policy/assignment/plan with `text`."""

    def restart(self) -> StateStore:
        self.store.close()
        self.store = self._reopen()
        return self.store


def sqlite_harness(tmp_path: Path) -> Harness:
    db = tmp_path / "coord.db"

    def corrupt(table: str, key: str, text: str) -> None:
        con = sqlite3.connect(db)
        if table == "policies":
            con.execute("UPDATE policies SET config = ? WHERE name = ?", (text, key))
        elif table == "plans":
            con.execute("UPDATE plans SET data = ? WHERE name = ?", (text, key))
        else:
            con.execute("UPDATE assignments SET data = ? WHERE policy = ?", (text, key))
        con.commit()
        con.close()

    return Harness(SqliteStore(db), lambda: SqliteStore(db), corrupt)


def memory_harness(tmp_path: Path) -> Harness:
    backing = MemoryBacking()

    def corrupt(table: str, key: str, text: str) -> None:
        if table == "policies":
            backing.policies[key] = text
        elif table == "plans":
            backing.plans[key] = text
        else:
            backing.assignments[key] = (backing.assignments[key][0], text)

    return Harness(MemoryStore(backing), lambda: MemoryStore(backing), corrupt)


_prefixes = itertools.count(1)


def etcd_harness(server: EtcdServer) -> Harness:
    prefix = f"/cdp-test-{next(_prefixes)}/"

    def open_store() -> StateStore:
        return EtcdStore([server.endpoint], prefix=prefix)

    def corrupt(table: str, key: str, text: str) -> None:
        put_raw(server.endpoint, f"{prefix}{table}/{key}".encode(), text.encode())

    return Harness(open_store(), open_store, corrupt)


@pytest.fixture(params=["sqlite", "memory", "etcd"])
def h(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    if request.param == "etcd":
        harness = etcd_harness(request.getfixturevalue(etcd_server.__name__))
    else:
        harness = {"sqlite": sqlite_harness, "memory": memory_harness}[request.param](tmp_path)
    yield harness
    harness.store.close()


def bound(policy: str, epoch: int, sp: str = "sp-1", reason: str = "") -> Assignment:
    return Assignment(policy, epoch, Endpoint("filter-1", "a:1"), Endpoint(sp, "b:2"),
                      Endpoint("tp-1", "c:3"), Endpoint("target-1", "d:4"), reason)


def event(policy: str, level: AlarmLevel, t: int = 1) -> AlarmEvent:
    kind = AlarmKind.CLEARED if level is AlarmLevel.OK else AlarmKind.RAISED
    return AlarmEvent(t, policy, kind, level, 1.5, f"{policy} {level}")


def test_empty_store_loads_nothing(h: Harness) -> None:
    snap = h.store.load()
    assert (snap.nodes, snap.policies, snap.assignments) == ([], [], [])
    assert h.store.list_alarms() == [] and h.store.alarm_levels() == {}


def test_save_load_round_trip_and_restart(h: Harness) -> None:
    p1, p2 = pol("p1", rpo_interval_s=1.5, encryption=False), pol("p2", enabled=False)
    h.store.save_policies([p2, p1])
    for n in reversed(NODES):
        h.store.save_node(n)
    a = bound("p1", 4, reason="target target-1 is down")
    h.store.save_assignments([a, bound("p2", 1)])
    for restart in (False, True):
        snap = (h.restart() if restart else h.store).load()
        assert snap.policies == [p1, p2]                     # by name
        assert snap.nodes == sorted(NODES, key=lambda n: n.id)  # by id
        assert snap.assignments == [a, bound("p2", 1)]       # by policy
    h.store.save_node(replace(NODES[1], address="127.0.0.1:99"))   # replace by id
    assert {n.id: n.address for n in h.restart().load().nodes}["sp-1"] == "127.0.0.1:99"


def test_epochs_never_shrink_across_restarts_and_deletes(h: Harness) -> None:
    h.store.save_policies([pol("p1")])
    h.store.save_assignments([bound("p1", 4)])
    h.store.save_assignments([bound("p1", 2, sp="sp-2")])   # an older epoch never wins
    (a,) = h.restart().load().assignments
    assert a.epoch == 4 and a.source_proxy.node_id == "sp-2"   # the rest is the latest
    h.store.delete_policy("p1")
    h.store.save_policies([pol("p2")])
    snap = h.restart().load()
    assert [p.name for p in snap.policies] == ["p2"]
    assert [(x.policy, x.epoch) for x in snap.assignments] == [("p1", 4)]  # epoch floor
    h.store.save_assignments([bound("p1", 7)])
    assert h.restart().load().assignments[0].epoch == 7


def test_redo_of_saves_is_idempotent(h: Harness) -> None:
    def saves(store: StateStore) -> None:
        store.save_policies([pol("p1"), pol("p2")])
        store.save_node(NODES[0])
        store.save_assignments([bound("p1", 3), bound("p2", 5)])
        store.save_policy(pol("p3"))
        store.delete_policy("p2")
        store.delete_policy("never-there")

    saves(h.store)
    once = h.store.load()
    saves(h.store)                 # a retry
    assert h.store.load() == once
    saves(h.restart())             # a redo after a crash
    assert h.store.load() == once
    assert [p.name for p in once.policies] == ["p1", "p3"]


def test_drained_nodes_are_replaced_as_a_set_and_survive_a_restart(h: Harness) -> None:
    assert h.store.load().drains == frozenset()
    h.store.save_drains(frozenset({"sp-1", "tp-1"}))
    assert h.restart().load().drains == {"sp-1", "tp-1"}
    h.store.save_drains(frozenset({"tp-1", "sp-2"}))   # undrain sp-1, drain sp-2
    h.store.save_drains(frozenset({"tp-1", "sp-2"}))   # the same again: no change
    assert h.restart().load().drains == {"tp-1", "sp-2"}
    h.store.save_drains(frozenset())
    assert h.restart().load().drains == frozenset()


def test_alarms_appended_in_order_and_listed(h: Harness) -> None:
    saved = h.store.add_alarms([event("a", AlarmLevel.WARNING, 1),
                                event("b", AlarmLevel.ERROR, 2)])
    assert [e.id for e in saved] == [1, 2]
    assert saved[0] == replace(event("a", AlarmLevel.WARNING, 1), id=1)
    assert h.store.add_alarms([]) == []
    more = h.restart().add_alarms([event("a", AlarmLevel.OK, 3), event("a", AlarmLevel.ERROR, 4)])
    assert [e.id for e in more] == [3, 4]                     # ids grow across restarts
    store = h.store
    assert [(e.id, e.policy, e.kind) for e in store.list_alarms()] == [
        (1, "a", "raised"), (2, "b", "raised"), (3, "a", "cleared"), (4, "a", "raised")]
    assert [e.id for e in store.list_alarms(limit=2)] == [3, 4]     # newest, oldest first
    assert [e.id for e in store.list_alarms("a", limit=2)] == [3, 4]
    assert [e.id for e in store.list_alarms("a")] == [1, 3, 4]
    assert [e.id for e in store.list_alarms("b", limit=5)] == [2]
    assert store.list_alarms("nobody") == []
    assert store.list_alarms(limit=0) == []
    assert store.alarm_levels() == {"a": "error", "b": "error"}
    listed = store.list_alarms()
    assert isinstance(listed[0].kind, AlarmKind) and isinstance(listed[0].level, AlarmLevel)
    assert listed[2].rpo_lag_s == 1.5 and listed[2].message == "a ok" and listed[2].time_ns == 3


def test_corrupt_policy_is_a_format_error(h: Harness) -> None:
    h.store.save_policies([pol("p1")])
    for text in ("{not json", "[1, 2]", '{"name": "p1", "disks": [7]}',
                 '{"name": "p1", "disks": "disk0"}', '{"nom": "p1"}'):
        h.corrupt("policies", "p1", text)
        with pytest.raises(FormatError, match="policy"):
            h.store.load()
    # keys of a newer coordinator are ignored: not corrupt
    h.corrupt("policies", "p1", policy_to_json(pol("p1"))[:-1] + ', "colour": "red"}')
    assert h.store.load().policies == [pol("p1")]


def test_corrupt_assignment_is_a_format_error(h: Harness) -> None:
    h.store.save_assignments([bound("p1", 3)])
    for text in ("{not json", '"a string"', '{"epoch": 3}', '{"policy": "p1", "epoch": "x"}',
                 '{"policy": "p1", "filter": 5}'):
        h.corrupt("assignments", "p1", text)
        with pytest.raises(FormatError, match="assignment"):
            h.store.load()


# ---------------------------------------------------------------- failover plans

def plan(name: str, *groups: tuple[tuple[str, ...], float]) -> Plan:
    return Plan(name, tuple(PlanGroup(ps, d) for ps, d in groups))


def test_plans_round_trip_replace_delete_and_restart(h: Harness) -> None:
    assert h.store.list_plans() == [] and h.store.get_plan("dr") is None
    dr = plan("dr", (("db",), 30.0), (("app", "web"), 0.0))
    other = plan("a-first", (("x",), 1.5))
    h.store.save_plan(dr)
    h.store.save_plan(other)
    for restart in (False, True):
        store = h.restart() if restart else h.store
        assert store.list_plans() == [other, dr]                      # by name
        assert store.get_plan("dr") == dr and store.get_plan("nope") is None
        assert store.get_plan("dr").groups[1].policies == ("app", "web")  # order kept
    changed = plan("dr", (("web", "app"), 5.0))
    h.store.save_plan(changed)                                        # replace by name
    assert h.restart().get_plan("dr") == changed
    h.store.delete_plan("dr")
    h.store.delete_plan("never-there")
    assert h.restart().list_plans() == [other]
    assert h.store.load().policies == []                              # apart from the rest


def test_plan_saves_are_idempotent(h: Harness) -> None:
    def saves(store: StateStore) -> None:
        store.save_plan(plan("p1", (("a",), 2.0)))
        store.save_plan(plan("p2", (("b", "c"), 0.0)))
        store.delete_plan("p2")

    saves(h.store)
    once = h.store.list_plans()
    saves(h.store)
    assert h.store.list_plans() == once
    saves(h.restart())
    assert h.store.list_plans() == once == [plan("p1", (("a",), 2.0))]


def test_corrupt_plan_is_a_format_error(h: Harness) -> None:
    h.store.save_plan(plan("dr", (("db",), 1.0)))
    for text in ("{not json", "[1]", '{"name": "dr"}', '{"name": "dr", "groups": [7]}',
                 '{"name": "dr", "groups": [{"policies": "db"}]}',
                 '{"name": "dr", "groups": [{"policies": ["db"], "delay_s": "x"}]}',
                 '{"name": "dr", "groups": []}',
                 '{"name": "dr", "groups": [{"policies": ["db", "db"]}]}'):
        h.corrupt("plans", "dr", text)
        with pytest.raises(FormatError, match="plan"):
            h.store.list_plans()
        with pytest.raises(FormatError, match="plan"):
            h.store.get_plan("dr")
    # keys of a newer coordinator are ignored: not corrupt
    good = plan("dr", (("db",), 1.0))
    h.corrupt("plans", "dr", plan_to_json(good)[:-1] + ', "colour": "red"}')
    assert h.store.list_plans() == [good]


# ------------------------------------------------------------ ephemeral liveness

def test_liveness_keeps_the_newest_heartbeat_per_node(h: Harness) -> None:
    h.store.save_liveness([Liveness("b", 1, b"b1"), Liveness("a", 1, b"a1")], 30.0)
    h.store.save_liveness([Liveness("a", 2, b"\x00a2\xff")], 30.0)
    assert h.store.load_liveness() == [Liveness("a", 2, b"\x00a2\xff"), Liveness("b", 1, b"b1")]
    h.store.save_liveness([], 30.0)
    assert [e.node_id for e in h.store.load_liveness()] == ["a", "b"]


def test_liveness_expires_unless_saved_again(h: Harness) -> None:
    """An entry lives `ttl_s` (etcd: rounded up, at least its minimum lease TTL) after
    its last save: one saved again and again outlives one saved once, which vanishes."""
    h.store.save_liveness([Liveness("kept", 1, b"k"), Liveness("gone", 1, b"g")], 1.0)
    deadline = time.monotonic() + 15
    seen_after = 0
    while True:
        h.store.save_liveness([Liveness("kept", 2, b"k")], 1.0)
        live = {e.node_id for e in h.store.load_liveness()}
        assert "kept" in live
        if "gone" not in live:
            break
        seen_after += 1
        assert time.monotonic() < deadline, "an entry saved once never expired"
        time.sleep(0.25)
    assert seen_after >= 1, "the entry vanished at once, not after its ttl"
    t0 = time.monotonic()
    while h.store.load_liveness():
        assert time.monotonic() - t0 < 15, "an entry no longer saved never expired"
        time.sleep(0.25)


def test_corrupt_liveness_of_etcd_is_a_format_error(tmp_path: Path,
                                                    request: pytest.FixtureRequest) -> None:
    server = request.getfixturevalue(etcd_server.__name__)
    harness = etcd_harness(server)
    try:
        harness.corrupt("live", "node-x", "{not json")
        with pytest.raises(FormatError, match="live/node-x"):
            harness.store.load_liveness()
    finally:
        harness.store.close()
