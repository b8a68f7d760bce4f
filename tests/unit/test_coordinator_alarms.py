"""The RPO alarm tracker (pure) and its event log in the SQLite store."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdp_common.states import AlarmLevel, PolicyState, policy_level
from cdp_coordinator.alarms import AlarmTracker, Level, level_of
from cdp_coordinator.store import SqliteStore


def lv(policy: str, level: str, lag: float = 0.0) -> Level:
    return Level(policy, level, lag, f"{policy} {level}")


def test_events_only_on_level_changes() -> None:
    t = AlarmTracker()
    assert t.update([lv("a", "ok")], 1) == []
    ev = t.update([lv("a", "warning", 16)], 2)
    assert [(e.policy, e.kind, e.level) for e in ev] == [("a", "raised", "warning")]
    assert ev[0].time_ns == 2_000_000_000 and ev[0].rpo_lag_s == 16
    assert t.update([lv("a", "warning", 17)], 3) == []           # deduplicated
    assert [e.kind for e in t.update([lv("a", "error")], 4)] == ["raised"]
    assert t.update([lv("a", "error")], 5) == []
    assert [(e.kind, e.level) for e in t.update([lv("a", "warning")], 6)] == [
        ("lowered", "warning")]
    assert [(e.kind, e.level) for e in t.update([lv("a", "ok")], 7)] == [("cleared", "ok")]
    assert t.current == {}
    # ok -> error straight away is one raise
    assert [(e.kind, e.level) for e in t.update([lv("a", "error")], 8)] == [("raised", "error")]


def test_deleted_policy_is_cleared_and_restore_avoids_repeats() -> None:
    t = AlarmTracker()
    t.update([lv("a", "error"), lv("b", "warning")], 1)
    ev = t.update([lv("b", "warning")], 2)
    assert [(e.policy, e.kind, e.message) for e in ev] == [("a", "cleared", "policy deleted")]
    t2 = AlarmTracker()
    t2.restore({"b": "warning", "c": "ok", "d": "bogus"})
    assert t2.current == {"b": "warning"}
    assert t2.update([lv("b", "warning")], 3) == []
    with pytest.raises(ValueError):
        t2.update([lv("b", "loud")], 4)


def test_level_of_states() -> None:
    assert level_of("ok", 1, "", 15, 60)[0] == "ok"
    assert level_of("degraded", 20, "", 15, 60) == (
        "warning", "RPO lag 20.0s >= warning threshold 15s")
    assert level_of("degraded", 1, "overflow gap open: ...", 15, 60) == (
        "warning", "overflow gap open: ...")
    assert level_of("error", 70, "", 15, 60)[1] == "RPO lag 70.0s >= error threshold 60s"
    assert level_of("error", 1, "target-1: fenced", 15, 60) == ("error", "target-1: fenced")
    assert level_of("error", 0, "unassigned: no healthy source proxy", 15, 60) == (
        "error", "unassigned: no healthy source proxy")
    # unprotected: the operator's choice when disabled, else nothing is protected yet
    assert level_of("unprotected", 0, "disabled by the operator", 15, 60, enabled=False) == (
        "ok", "disabled by the operator")
    assert level_of("unprotected", 0, "nothing of policy p is on target-1 yet", 15, 60) == (
        "warning", "nothing of policy p is on target-1 yet")
    # a state this coordinator does not know is never fine
    assert level_of("bogus", 0, "", 15, 60)[0] == "error"


def test_older_state_names_keep_their_severity() -> None:
    assert PolicyState.parse("warning") is PolicyState.DEGRADED
    assert PolicyState.parse("unassigned") is PolicyState.ERROR
    assert PolicyState.parse("disabled") is PolicyState.UNPROTECTED
    assert PolicyState.parse("degraded") is PolicyState.DEGRADED
    assert PolicyState.parse("nonsense") is None
    assert policy_level("warning") is AlarmLevel.WARNING
    assert policy_level("unassigned") is AlarmLevel.ERROR
    assert policy_level("disabled", enabled=False) is AlarmLevel.OK
    assert [s.value for s in PolicyState] == ["ok", "degraded", "error", "unprotected"]


def test_store_event_log(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "c.db")
    t = AlarmTracker()
    saved = store.add_alarms(t.update([lv("a", "warning"), lv("b", "error")], 1))
    assert [e.id for e in saved] == [1, 2]
    store.add_alarms(t.update([lv("a", "ok"), lv("b", "error")], 2))
    assert store.alarm_levels() == {"a": "ok", "b": "error"}
    assert [(e.policy, e.kind) for e in store.list_alarms()] == [
        ("a", "raised"), ("b", "raised"), ("a", "cleared")]
    assert [e.kind for e in store.list_alarms("a", limit=1)] == ["cleared"]
    store.close()
    again = SqliteStore(tmp_path / "c.db")
    t2 = AlarmTracker()
    t2.restore(again.alarm_levels())
    assert t2.current == {"b": "error"}
    again.close()
