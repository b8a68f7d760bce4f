"""What the `StateStore` contract asks of etcd beyond the conformance suite
(test_statestore_conformance.py runs that over etcd too): several clients on one etcd,
an etcd that is down or crashes, compare-and-swap under concurrent writers, etcd's
transaction limits, alarm pruning and paging. Real etcd processes (tests/etcdfixture.py)."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import assert_eventually
from coordfixtures import NODES, pol
from etcdfixture import EtcdServer, etcd_server, etcd_skip_reason, free_ports, put_raw
from test_statestore_conformance import bound, event

from cdp_common import config
from cdp_common.config import (
    CoordinatorConfig,
    CoordinatorSection,
    NodeConfig,
    TlsConfig,
    load_config,
)
from cdp_common.errors import ConfigError, FormatError, StorageError
from cdp_common.states import AlarmLevel
from cdp_coordinator import etcdstore
from cdp_coordinator.daemon import open_store as daemon_open_store
from cdp_coordinator.etcdstore import EtcdStore
from cdp_coordinator.store import SqliteStore

__all__ = ["etcd_server"]   # the module-scoped fixture, used by name

_prefixes = itertools.count(1)


@pytest.fixture
def prefix() -> str:
    return f"/etcdstore-test-{next(_prefixes)}/"


@pytest.fixture
def own_etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """An etcd of this test's own, to stop and crash."""
    if reason := etcd_skip_reason():
        pytest.skip(reason)
    server = EtcdServer(tmp_path / "etcd").start()
    try:
        yield server
    finally:
        server.stop()


def open_store(server: EtcdServer, prefix: str) -> EtcdStore:
    return EtcdStore([server.endpoint], prefix=prefix, timeout_s=5.0)


def test_a_second_client_sees_the_state_and_prefixes_keep_apart(
        etcd_server: EtcdServer, prefix: str) -> None:
    a, b = open_store(etcd_server, prefix), open_store(etcd_server, prefix)
    other = open_store(etcd_server, prefix + "other/")
    try:
        a.save_policies([pol("p1")])
        a.save_node(NODES[0])
        a.save_assignments([bound("p1", 3)])
        a.add_alarms([event("p1", AlarmLevel.WARNING)])
        snap = b.load()                     # open at the same time, not reopened
        assert [p.name for p in snap.policies] == ["p1"]
        assert snap.nodes == [NODES[0]] and snap.assignments == [bound("p1", 3)]
        assert b.alarm_levels() == {"p1": "warning"}
        assert [e.id for e in b.add_alarms([event("p1", AlarmLevel.OK)])] == [2]
        empty = other.load()   # "<prefix>other/..." is not under "<prefix>policies/"
        assert (empty.policies, empty.nodes, other.list_alarms()) == ([], [], [])
    finally:
        for s in (a, b, other):
            s.close()


def test_an_endpoint_that_is_down_is_skipped(etcd_server: EtcdServer, prefix: str) -> None:
    dead = f"127.0.0.1:{free_ports(1)[0]}"
    store = EtcdStore([dead, etcd_server.endpoint], prefix=prefix)
    try:
        store.save_policy(pol("p1"))
        assert [p.name for p in store.load().policies] == ["p1"]
    finally:
        store.close()


def test_etcd_down_is_a_storage_error_naming_the_endpoints(tmp_path: Path) -> None:
    dead = [f"127.0.0.1:{p}" for p in free_ports(2)]
    with pytest.raises(StorageError, match="etcd unreachable at " + ", ".join(dead)) as err:
        EtcdStore(dead, prefix="/cdp/")
    assert err.value.transient       # a reconnect may help
    with pytest.raises(StorageError, match="no endpoint"):
        EtcdStore([], prefix="/cdp/")


def test_etcd_stopping_mid_run_leaves_nothing_half_written(own_etcd: EtcdServer,
                                                           prefix: str) -> None:
    store = open_store(own_etcd, prefix)
    try:
        store.save_policies([pol("p1"), pol("p2")])
        store.save_assignments([bound("p1", 4)])
        before = store.load()
        own_etcd.stop()
        for write in (lambda: store.save_policies([pol("p3")]),
                      lambda: store.save_assignments([bound("p1", 9), bound("p3", 1)]),
                      lambda: store.add_alarms([event("p1", AlarmLevel.ERROR)]),
                      store.load):
            with pytest.raises(StorageError, match=own_etcd.endpoint):
                write()
        own_etcd.start()                 # same data dir
        # the running store's channel reconnects by itself (short backoff)
        assert assert_eventually(store.load, timeout_s=20) == before
        assert store.list_alarms() == []
    finally:
        store.close()


def test_saves_survive_an_etcd_crash(own_etcd: EtcdServer, prefix: str) -> None:
    store = open_store(own_etcd, prefix)
    store.save_policies([pol("p1")])
    store.save_node(NODES[1])
    store.save_assignments([bound("p1", 7)])
    saved = store.add_alarms([event("p1", AlarmLevel.ERROR)])
    store.close()
    own_etcd.kill()                      # SIGKILL right after the answers
    own_etcd.start()
    again = open_store(own_etcd, prefix)
    try:
        snap = again.load()
        assert [p.name for p in snap.policies] == ["p1"] and snap.nodes == [NODES[1]]
        assert snap.assignments == [bound("p1", 7)]
        assert again.list_alarms() == saved
        assert [e.id for e in again.add_alarms([event("p1", AlarmLevel.OK)])] == [2]
    finally:
        again.close()


def test_a_concurrent_save_between_read_and_commit_is_retried(
        etcd_server: EtcdServer, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writer A reads epoch 1; writer B stores epoch 9 before A commits epoch 5: A's
    compare fails, A reads again and keeps 9 (the max rule across writers)."""
    a, b = open_store(etcd_server, prefix), open_store(etcd_server, prefix)
    try:
        a.save_assignments([bound("p1", 1)])
        commits: list[bool] = []
        real = a._commit

        def racing_commit(what, compare, ops):  # type: ignore[no-untyped-def]
            if not commits:
                b.save_assignments([bound("p1", 9, sp="sp-b")])
            commits.append(real(what, compare, ops))
            return commits[-1]

        monkeypatch.setattr(a, "_commit", racing_commit)
        a.save_assignments([bound("p1", 5, sp="sp-a")])
        assert commits == [False, True]
        (got,) = b.load().assignments
        assert (got.epoch, got.source_proxy.node_id) == (9, "sp-a")   # epoch max, data latest
    finally:
        a.close()
        b.close()


def test_concurrent_writers_never_shrink_an_epoch_nor_share_an_alarm_id(
        etcd_server: EtcdServer, prefix: str) -> None:
    stores = [open_store(etcd_server, prefix) for _ in range(3)]
    ids: list[list[int]] = [[] for _ in stores]
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            for i in range(15):
                stores[k].save_assignments([bound("p1", 1 + (i * 7 + k * 11) % 40),
                                            bound(f"own-{k}", i)])
                ids[k] += [e.id for e in stores[k].add_alarms([event("p1", AlarmLevel.OK)])]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors
        epochs = {a.policy: a.epoch for a in stores[0].load().assignments}
        largest = max(1 + (i * 7 + k * 11) % 40 for i in range(15) for k in range(3))
        assert epochs == {"p1": largest, "own-0": 14, "own-1": 14, "own-2": 14}
        for mine in ids:
            assert mine == sorted(mine)            # strictly growing for each writer
        assert sorted(itertools.chain(*ids)) == list(range(1, 46))   # none shared or lost
    finally:
        for s in stores:
            s.close()


def test_saves_write_only_changes_and_fail_whole_beyond_the_txn_limit(
        etcd_server: EtcdServer, prefix: str) -> None:
    """etcd takes at most --max-txn-ops (128) operations per transaction."""
    store = open_store(etcd_server, prefix)
    try:
        many = [pol(f"p{i:03d}") for i in range(300)]
        with pytest.raises(StorageError, match=r"300 changes .* --max-txn-ops") as err:
            store.save_policies(many)
        assert not err.value.transient and store.load().policies == []   # nothing written
        for n in (100, 200, 300):            # only what differs is written: 100 each time
            store.save_policies(many[:n])
            store.save_assignments([bound(p.name, 2) for p in many[:n]])
        store.save_policies(many)            # a redo writes nothing
        store.save_assignments([bound(p.name, 1) for p in many])   # older epochs: no change
        snap = store.load()
        assert [p.name for p in snap.policies] == [p.name for p in many]
        assert {a.epoch for a in snap.assignments} == {2} and len(snap.assignments) == 300
        store.save_policies(many[:180])      # 120 deletes
        assert len(store.load().policies) == 180
        # the append is split into transactions instead; ids still 1, 2, ...
        saved = store.add_alarms([event(f"p{i % 7}", AlarmLevel.WARNING) for i in range(200)])
        assert [e.id for e in saved] == list(range(1, 201))
        assert [e.id for e in store.list_alarms(limit=-1)] == list(range(1, 201))
    finally:
        store.close()


def test_a_mass_rebind_beyond_the_txn_limit_is_saved_in_several_transactions(
        etcd_server: EtcdServer, prefix: str) -> None:
    """A lost proxy of 300 policies at 1,000 disks: all 300 new epochs are saved,
    the max-epoch rule still holds for each (bench_scale found the coordinator stuck
    failing this save at every flush)."""
    store = open_store(etcd_server, prefix)
    try:
        many = [pol(f"p{i:03d}") for i in range(300)]
        for i in range(0, 300, 100):
            store.save_policies(many[:i + 100])
        store.save_assignments([bound(p.name, 5) for p in many[:50]])
        store.save_assignments([bound(p.name, 3, sp="sp-2") for p in many])
        epochs = {a.policy: a.epoch for a in store.load().assignments}
        assert len(epochs) == 300
        assert all(epochs[p.name] == (5 if i < 50 else 3) for i, p in enumerate(many))
    finally:
        store.close()


def test_a_refused_transaction_writes_nothing(etcd_server: EtcdServer, prefix: str) -> None:
    """etcd (its gRPC server) refuses a request over its size limit (about 2 MiB): the
    whole save fails, the small policy in it is not saved either."""
    store = open_store(etcd_server, prefix)
    try:
        store.save_policies([pol("keep")])
        with pytest.raises(StorageError, match=r"too large|larger than max") as err:
            store.save_policies([pol("small"), pol("x" * (2 << 20))])
        assert not err.value.transient                     # retrying cannot help
        assert [p.name for p in store.load().policies] == ["keep"]
    finally:
        store.close()


def test_alarms_beyond_the_kept_number_are_pruned(
        etcd_server: EtcdServer, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(etcdstore, "MAX_ALARMS_KEPT", 5)
    monkeypatch.setattr(etcdstore, "LIST_PAGE", 2)         # and list across pages
    store = open_store(etcd_server, prefix)
    try:
        for batch in ([event("a", AlarmLevel.WARNING)] * 3, [event("b", AlarmLevel.ERROR)] * 3,
                      [event("a", AlarmLevel.OK)] * 2):
            store.add_alarms(batch)
        assert [e.id for e in store.list_alarms(limit=-1)] == [4, 5, 6, 7, 8]
        assert [e.id for e in store.list_alarms("a")] == [7, 8]
        assert [e.id for e in store.list_alarms("b", limit=2)] == [5, 6]
        assert [e.id for e in store.list_alarms(limit=3)] == [6, 7, 8]
        assert store.alarm_levels() == {"a": "ok", "b": "error"}
        assert [e.id for e in store.add_alarms([event("c", AlarmLevel.OK)] * 7)] == \
            list(range(9, 16))                           # a batch larger than what is kept
        assert [e.id for e in store.list_alarms(limit=-1)] == list(range(9, 16))
    finally:
        store.close()


@pytest.mark.parametrize(("key", "value", "match"), [
    ("nodes/n1", b'{"id": "n1"}', "node"),
    ("nodes/n1", b"\xff\xfe", "UTF-8"),
    ("alarms/00000000000000000001", b'{"policy": "a"}', "alarm"),
    ("alarms/not-an-id", b"{}", "alarm"),
    ("alarm-last-id", b"seven", "alarm counter"),
    ("meta/schema", b"99", "newer"),
    ("meta/schema", b"one", "schema"),
])
def test_corrupt_etcd_state_is_a_format_error(etcd_server: EtcdServer, prefix: str, key: str,
                                              value: bytes, match: str) -> None:
    store = open_store(etcd_server, prefix)
    try:
        put_raw(etcd_server.endpoint, f"{prefix}{key}".encode(), value)
        with pytest.raises(FormatError, match=match):
            open_store(etcd_server, prefix).close()
            store.load()
            store.list_alarms()
            store.add_alarms([event("a", AlarmLevel.OK)])
    finally:
        store.close()


def test_a_corrupt_stored_assignment_is_never_overwritten(etcd_server: EtcdServer,
                                                          prefix: str) -> None:
    """Its epoch floor is unknown, so a save that might lower it fails instead."""
    store = open_store(etcd_server, prefix)
    try:
        store.save_assignments([bound("p1", 8)])
        put_raw(etcd_server.endpoint, f"{prefix}assignments/p1".encode(), b"{not json")
        with pytest.raises(FormatError, match="assignments/p1"):
            store.save_assignments([bound("p1", 2), bound("p2", 1)])
        put_raw(etcd_server.endpoint, f"{prefix}assignments/p1".encode(),
                etcdstore.assignment_to_json(bound("p1", 8)).encode())
        assert [a.policy for a in store.load().assignments] == ["p1"]   # p2 not written
        store.save_assignments([replace(bound("p1", 2), reason="x")])
        assert store.load().assignments == [replace(bound("p1", 8), reason="x")]
    finally:
        store.close()


# ---------------------------------------------------------------- config

def coordinator_toml(tmp_path: Path, coordinator: str, insecure: bool = True) -> Path:
    path = tmp_path / "coordinator.toml"
    path.write_text(f'[node]\nid = "coordinator"\nlisten = "127.0.0.1:7000"\n'
                    f'[coordinator]\n{coordinator}\n[tls]\ninsecure = {str(insecure).lower()}\n')
    return path


@pytest.mark.parametrize(("coordinator", "insecure", "needle"), [
    ('store = "zookeeper"', True, "coordinator.store: must be one of 'sqlite', 'etcd'"),
    ("", True, "coordinator.db_path: required"),
    ('store = "etcd"', True, "coordinator.etcd_endpoints: required"),
    ('store = "etcd"\netcd_endpoints = ["etcd-1"]', True,
     "coordinator.etcd_endpoints[0]: expected host:port"),
    ('store = "etcd"\netcd_endpoints = ["127.0.0.1:2379"]\netcd_prefix = "cdp"', True,
     "coordinator.etcd_prefix: must start and end with '/'"),
    ('store = "etcd"\netcd_endpoints = ["127.0.0.1:2379"]\netcd_prefix = "/"', True,
     "coordinator.etcd_prefix"),
    ('store = "etcd"\netcd_endpoints = ["127.0.0.1:2379"]\netcd_timeout_ms = 0', True,
     "coordinator.etcd_timeout_ms"),
    ('store = "etcd"\netcd_endpoints = "127.0.0.1:2379"', True,
     "coordinator.etcd_endpoints: expected a list"),
])
def test_bad_store_settings_are_config_errors(tmp_path: Path, coordinator: str, insecure: bool,
                                              needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(CoordinatorConfig, coordinator_toml(tmp_path, coordinator, insecure))
    assert needle in str(err.value), str(err.value)


def test_a_remote_etcd_needs_tls_insecure_until_the_client_has_tls() -> None:
    section = CoordinatorSection(store="etcd", etcd_endpoints=["127.0.0.1:2379", "etcd-1:2379"])
    node = NodeConfig(id="coordinator", listen="127.0.0.1:7000")
    with pytest.raises(ConfigError, match=r"etcd_endpoints\[1\]: etcd-1:2379 .* no TLS yet"):
        config._validate_store(CoordinatorConfig(node, section, tls=TlsConfig(insecure=False)))
    config._validate_store(CoordinatorConfig(node, replace(section, etcd_endpoints=[
        "localhost:2379", "[::1]:2379"]), tls=TlsConfig(insecure=False)))


def test_the_coordinator_opens_the_store_its_config_names(etcd_server: EtcdServer,
                                                          tmp_path: Path, prefix: str) -> None:
    etcd = load_config(CoordinatorConfig, coordinator_toml(
        tmp_path, f'store = "etcd"\netcd_endpoints = ["{etcd_server.endpoint}"]\n'
                  f'etcd_prefix = "{prefix}"\netcd_timeout_ms = 3000'))
    store = daemon_open_store(etcd.coordinator)
    try:
        assert isinstance(store, EtcdStore) and store.timeout_s == 3.0
        store.save_policy(pol("p1"))
    finally:
        store.close()
    check = open_store(etcd_server, prefix)
    assert [p.name for p in check.load().policies] == ["p1"]
    check.close()
    sqlite = load_config(CoordinatorConfig, coordinator_toml(
        tmp_path, f'db_path = "{tmp_path / "state.db"}"'))
    assert sqlite.coordinator.store == "sqlite"
    store = daemon_open_store(sqlite.coordinator)
    assert isinstance(store, SqliteStore)
    store.close()
