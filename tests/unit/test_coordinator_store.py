"""SQLite store of the coordinator (WAL, clear errors), and a coordinator restart keeps
nodes, policies, epochs, assignments (on the in-memory store; every store passes the same
conformance suite, test_statestore_conformance.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from coordfixtures import NODES, Clock, memory_service, pol

from cdp_common.errors import StorageError
from cdp_coordinator.memstore import MemoryBacking
from cdp_coordinator.state import Assignment, Endpoint
from cdp_coordinator.store import SqliteStore


def test_round_trip(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "sub" / "coord.db")
    p = pol("p1", rpo_interval_s=1.5, encryption=False)
    store.save_policies([p])
    store.save_node(NODES[1])
    a = Assignment("p1", 4, Endpoint("filter-1", "a:1"), Endpoint("sp-1", "b:2"),
                   Endpoint("tp-1", "c:3"), Endpoint(), "target target-1 is down")
    store.save_assignments([a])
    store.save_assignments([Assignment("p1", 2)])  # an older epoch never wins
    store.close()
    snap = SqliteStore(tmp_path / "sub" / "coord.db").load()
    assert snap.policies == [p]
    assert snap.nodes == [NODES[1]]
    assert snap.assignments[0].epoch == 4
    store2 = SqliteStore(tmp_path / "sub" / "coord.db")
    store2.save_policies([pol("p2")])
    assert [x.name for x in store2.load().policies] == ["p2"]
    assert store2.load().assignments[0].policy == "p1"  # epoch memory kept
    mode = sqlite3.connect(tmp_path / "sub" / "coord.db").execute(
        "PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_restart_keeps_policies_epochs_assignments() -> None:
    db = MemoryBacking()
    clock = Clock()
    svc = memory_service([pol("p1"), pol("p2")], db, clock=clock)
    for n in NODES:
        svc.register(n)
    before = dict(svc.state.assignments)
    assert all(a.reason == "" for a in before.values())
    # sp-1 dies; its policy moves with a higher epoch.
    lost = [name for name, a in before.items() if a.source_proxy.node_id == "sp-1"]
    assert lost
    clock.t += 0.25
    for n in NODES:
        if n.id != "sp-1":
            svc.state.heartbeat(n.id, [], clock.t)
    clock.t += 0.1
    assert svc.flush() == lost
    moved = dict(svc.state.assignments)
    svc.store.close()

    # Restart (a new policy p3 appears in the config): nothing rebinds, epochs are kept.
    clock.t += 50
    svc2 = memory_service([pol("p1"), pol("p2"), pol("p3")], db, clock=clock)
    assert set(svc2.state.policies) == {"p1", "p2", "p3"}
    for name in ("p1", "p2"):
        assert svc2.state.assignments[name] == moved[name]
        assert moved[name].epoch >= before[name].epoch
    assert {n.info.id for n in svc2.state.status(clock.t).nodes} == {n.id for n in NODES}
    assert all(n.state == "down" for n in svc2.state.status(clock.t).nodes)
    # Known nodes may heartbeat without registering again; unknown ones may not.
    assert svc2.state.heartbeat("tp-1", [], clock.t)
    assert not svc2.state.heartbeat("stranger", [], clock.t)
    svc2.store.close()

    # Third start: the config only seeds policies (the store is authoritative once
    # policies are edited from the CLI), so dropping p2/p3 from the file removes nothing;
    # the store alone decides the epochs.
    svc3 = memory_service([pol("p1")], db, clock=clock)
    assert set(svc3.state.policies) == {"p1", "p2", "p3"}
    assert svc3.state.assignments["p1"].epoch == moved["p1"].epoch
    svc3.store.close()


def test_unwritable_db_path_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match=r"coordinator\.db_path"):
        SqliteStore(blocker / "coord.db")


def test_corrupt_db_is_a_clear_error(tmp_path: Path) -> None:
    db = tmp_path / "coord.db"
    db.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StorageError, match=r"coord\.db"):
        SqliteStore(db)
