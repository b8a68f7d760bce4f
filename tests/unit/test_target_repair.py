"""A corrupt committed delta (cdp_target.repair + the store's quarantine path): reported,
moved aside, applied as empty, the resync asked for and cleared only by a resync that
began after the corruption; the coordinator turns each new request into one sync."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import pytest
from test_coordinator_state import lab
from test_target_store import DISKS, Oracle, crash, crashable, random_extents, send

from cdp_coordinator.state import Report
from cdp_target.gaps import GapBook
from cdp_target.repair import RepairCore, Repairer
from cdp_target.store import CorruptDeltaError, PolicyStore, delta_name

pytestmark = pytest.mark.timeout(30)


def test_core_clears_only_after_a_later_resync_is_applied() -> None:
    c = RepairCore()
    c.corrupt(10, 20, now_ns=1000, durable_seq=30)
    rid = c.request_id
    assert c.resync_needed and c.ranges == [[10, 20]] and rid >= 1000
    assert "10..20" in c.text()
    # an overflow gap that began before the mark ends: not enough, ask again
    assert c.gap_end(begin_time_ns=900, after_seq=25, end_seq=40, now_ns=2000,
                     durable_seq=40) == "again"
    assert c.request_id > rid and c.resync_needed
    # a sync that began later ends at 55; cleared only once 55 is applied
    assert c.gap_end(begin_time_ns=2500, after_seq=40, end_seq=55, now_ns=3000,
                     durable_seq=55) == "done"
    assert not c.applied(54) and c.resync_needed
    assert c.applied(55) and not c.resync_needed and c.repaired == 1 and not c.ranges
    assert c.text() == "" and c.gap_end(1, 1, 60, 4000, 60) == ""


def test_core_accepts_a_later_after_seq_despite_clock_skew() -> None:
    c = RepairCore()
    c.corrupt(3, 4, now_ns=10_000, durable_seq=8)
    assert c.gap_end(begin_time_ns=5, after_seq=9, end_seq=12, now_ns=10_001,
                     durable_seq=12) == "done"


def test_core_json_roundtrip() -> None:
    c = RepairCore()
    c.corrupt(1, 2, 5, 2)
    assert RepairCore.from_json(json.loads(json.dumps(c.to_json()))) == c
    with pytest.raises(ValueError):
        RepairCore.from_json({"version": 99})


def test_hold_open_widens_or_opens() -> None:
    book = GapBook(Path("/nonexistent"))
    book.hold_open(10, 1)
    assert book.open_gap is not None and book.open_gap.begin_seq == 10
    book.hold_open(5, 2)
    assert book.open_gap.begin_seq == 5 and len(book.gaps) == 1
    assert book.inconsistent(5) and not book.inconsistent(4)


def _store(tmp_path: Path) -> tuple[PolicyStore, Repairer, GapBook]:
    store = crashable(tmp_path / "p", DISKS, apply=False)
    book = GapBook.load(store.dir)
    repairer = Repairer(store.dir, lambda: book, threading.Lock(),
                        lambda: store.state.durable_seq, now_ns=lambda: 1_000)
    store.on_corrupt = repairer.corrupt
    return store, repairer, book


def _flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    path.write_bytes(bytes(raw))


def test_store_quarantines_and_goes_on(tmp_path: Path) -> None:
    rng = random.Random(5)
    store, repairer, book = _store(tmp_path)
    oracle = Oracle()
    a, b, c = random_extents(rng), random_extents(rng), random_extents(rng)
    send(store, 1, 3, a)
    send(store, 4, 6, b)
    send(store, 7, 9, c)
    _flip(store.deltas_dir / delta_name(4, 6))
    assert store.apply_pending() == 9
    oracle.apply(a)
    oracle.apply(c)
    oracle.check(store.dir)                          # b never applied, c applied after it
    assert (store.dir / "quarantine" / delta_name(4, 6)).exists()
    assert repairer.core.ranges == [[4, 6]] and repairer.request_id
    assert book.open_gap is not None and book.open_gap.begin_seq == 4
    assert json.loads((store.dir / "repair.json").read_text())["resync_needed"]
    # the restore-point chain went on through the empty delta
    newest = store.undo.catalog.newest
    assert newest is not None and newest.last_seq == 9
    store.close()


def test_without_hook_apply_stops_at_the_corrupt_delta(tmp_path: Path) -> None:
    rng = random.Random(6)
    store = PolicyStore.open(tmp_path / "p", DISKS, apply=False)
    send(store, 1, 2, random_extents(rng))
    _flip(store.deltas_dir / delta_name(1, 2))
    with pytest.raises(CorruptDeltaError, match="corrupt, not applied"):
        store.apply_pending()
    assert store.state.applied_seq == 0
    store.close()


def test_crash_after_the_move_skips_on_reopen(tmp_path: Path) -> None:
    rng = random.Random(7)
    store, _r, _b = _store(tmp_path)
    send(store, 1, 2, random_extents(rng))
    send(store, 3, 4, random_extents(rng))
    # as if the hook ran and the file was moved, then kill -9 before applied_seq
    (store.dir / "quarantine").mkdir()
    (store.deltas_dir / delta_name(1, 2)).rename(store.dir / "quarantine" / delta_name(1, 2))
    crash(store)
    again = PolicyStore.open(tmp_path / "p", DISKS, apply=False)
    assert again.apply_pending() == 4
    again.close()


def test_coordinator_asks_once_per_new_id_and_only_for_the_target() -> None:
    s = lab()
    r = Report(policy="p1", resync_request_id=7)
    assert s.resyncs_asked("filter-1", [r]) == []        # not the policy's target
    assert s.resyncs_asked("target-1", [r]) == ["p1"]
    assert s.resyncs_asked("target-1", [r]) == []        # same id: already asked
    assert s.resyncs_asked("target-1", [Report(policy="p1", resync_request_id=8)]) == ["p1"]
    assert s.resyncs_asked("target-1", [Report(policy="p1")]) == []
