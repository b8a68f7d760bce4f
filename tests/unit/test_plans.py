"""Failover plans in cdpctl (cdpctl.plan): the --group/--delay parser, the pure core
`execute` with a fake clock and a fake runner (group order, concurrency inside a
group, the delays, stop on failure, the stop pass that goes on), the JSON shape and
the text table; the parser wiring of `cdpctl plan`."""

from __future__ import annotations

import datetime as dt
import json
import threading
from typing import Any

import pytest

from cdp_common.errors import CdpError
from cdpctl import cli, plan
from cdpctl.plan import FAILED, NOT_STARTED, OK, Group, execute, parse_groups
from cdpctl.state import UsageError

pytestmark = pytest.mark.timeout(30)


class FakeTime:
    """A wall clock that only `sleep` moves (thread-safe: the steps read it at once)."""

    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t
        self.slept: list[float] = []
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self.t

    def sleep(self, s: float) -> None:
        with self._lock:
            self.slept.append(s)
            self.t += s

    def advance(self, s: float) -> None:
        with self._lock:
            self.t += s


def stamp(text: str) -> float:
    return dt.datetime.fromisoformat(text).timestamp()


PLAN = [Group(("db",), 30.0), Group(("app", "web"), 5.0), Group(("report",), 0.0)]


# ---------------------------------------------------------------- --group / --delay

def test_parse_groups_in_the_order_given() -> None:
    got = parse_groups([("group", "db"), ("delay", "30"), ("group", "app, web"),
                        ("group", "x"), ("delay", "1.5")])
    assert got == [Group(("db",), 30.0), Group(("app", "web"), 0.0), Group(("x",), 1.5)]


@pytest.mark.parametrize(("items", "why"), [
    ([], "at least one --group"),
    ([("delay", "3"), ("group", "db")], "after the --group"),
    ([("group", "db"), ("delay", "soon")], "expected seconds"),
    ([("group", "db"), ("delay", "1"), ("delay", "2")], "has a delay already"),
    ([("group", "db,,app")], "expected POLICY"),
])
def test_parse_groups_refuses(items: list[tuple[str, str]], why: str) -> None:
    with pytest.raises(UsageError, match=why):
        parse_groups(items)


def test_cli_parser_keeps_group_and_delay_order() -> None:
    args = cli.build_parser().parse_args(
        ["plan", "create", "dr", "--group", "db", "--delay", "30", "--group", "app,web"])
    assert args.steps == [("group", "db"), ("delay", "30"), ("group", "app,web")]
    assert args.func is plan.cmd_create
    args = cli.build_parser().parse_args(["plan", "test", "dr", "--stop"])
    assert args.func is plan.cmd_test and args.stop and args.point == "latest"


def test_cli_refuses_point_with_time_and_planned_with_time(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.run(["plan", "run", "dr", "--point", "latest", "--time", "2024-05-01"]) == 64
    assert cli.run(["plan", "run", "dr", "--planned", "--time", "2024-05-01T00:00:00Z",
                    "--coordinator", "127.0.0.1:1"]) == 64
    assert "--planned" in capsys.readouterr().err
    assert cli.run(["plan", "test", "dr", "--coordinator", "127.0.0.1:1"]) == 64
    assert "--out DIR" in capsys.readouterr().err
    assert cli.run(["plan", "run", "dr", "--time", "yesterday",
                    "--coordinator", "127.0.0.1:1"]) == 64   # before any call


# ---------------------------------------------------------------- execute

def test_groups_run_in_order_with_their_delays() -> None:
    clock = FakeTime()
    calls: list[tuple[str, float]] = []
    lock = threading.Lock()

    def runner(policy: str) -> dict[str, Any]:
        with lock:
            calls.append((policy, clock.now()))
        return {"point": {"id": 7, "time": "2024-05-01T12:00:00.000Z", "last_seq": 9},
                "images": [{"disk": "disk0", "path": f"/r/{policy}/disk0.img"}]}

    doc = execute(PLAN, plan.FAILOVER, runner, now=clock.now, sleep=clock.sleep)
    assert doc["ok"] and clock.slept == [30.0, 5.0]         # none after the last group
    order = [p for p, _ in calls]
    assert order[0] == "db" and sorted(order[1:3]) == ["app", "web"] and order[3] == "report"
    at = dict(calls)
    assert at["app"] - at["db"] == at["web"] - at["db"] == 30.0
    assert at["report"] - at["app"] == 5.0
    steps = {s["policy"]: s for s in doc["steps"]}
    assert [s["policy"] for s in doc["steps"]] == ["db", "app", "web", "report"]
    assert stamp(steps["app"]["start"]) - stamp(steps["db"]["end"]) == pytest.approx(30.0)
    assert [g["waited_s"] for g in doc["groups"]] == [30.0, 5.0, 0.0]
    assert all(s["state"] == OK and s["ok"] and s["error"] == "" for s in steps.values())
    assert steps["web"]["point"]["id"] == 7 and steps["web"]["images"][0]["path"].endswith(
        "web/disk0.img")
    assert doc["seconds"] == 35.0


def test_a_group_runs_concurrently() -> None:
    both = threading.Barrier(2, timeout=5)

    def runner(policy: str) -> dict[str, Any]:
        both.wait()       # returns only once the other policy of the group runs too
        return {}

    doc = execute([Group(("app", "web"))], plan.TEST_START, runner)
    assert doc["ok"], doc["steps"]


def test_a_failure_stops_the_plan_after_its_group() -> None:
    clock = FakeTime()

    def runner(policy: str) -> dict[str, Any]:
        clock.advance(0.0)
        if policy == "app":
            raise CdpError("failover: the target refused: no restore point yet")
        if policy == "web":
            raise RuntimeError("boom")
        return {}

    doc = execute(PLAN, plan.FAILOVER, runner, now=clock.now, sleep=clock.sleep)
    assert not doc["ok"]
    assert clock.slept == [30.0]                          # no wait after the failed group
    st = {s["policy"]: s for s in doc["steps"]}
    assert st["db"]["state"] == OK
    assert st["app"]["state"] == FAILED and "no restore point yet" in st["app"]["error"]
    assert st["web"]["state"] == FAILED and st["web"]["error"] == "RuntimeError: boom"
    assert st["report"]["state"] == NOT_STARTED and st["report"]["start"] is None
    assert [g["state"] for g in doc["groups"]] == [OK, FAILED, NOT_STARTED]


def test_the_stop_pass_goes_on_past_a_failure_without_delays() -> None:
    seen: list[str] = []

    def runner(policy: str) -> dict[str, Any]:
        seen.append(policy)
        if policy == "db":
            raise CdpError("target unreachable")
        return {"note": "1 image(s) deleted"}

    clock = FakeTime()
    doc = execute(PLAN, plan.TEST_STOP, runner, now=clock.now, sleep=clock.sleep,
                  stop_on_failure=False, wait=False, reverse=True)
    assert clock.slept == [] and seen[0] == "report" and seen[-1] == "db"
    assert not doc["ok"] and [s["state"] for s in doc["steps"]].count(OK) == 3
    assert [(s["group"], s["policy"]) for s in doc["steps"]][::3] == [(3, "report"),
                                                                      (1, "db")]
    assert [g["group"] for g in doc["groups"]] == [3, 2, 1]     # each keeps its number
    assert ", point" not in plan.render_run({"plan": "dr", "point": "", **doc})


def test_json_shape() -> None:
    clock = FakeTime()
    doc = execute([Group(("db",), 2.0), Group(("app",))], plan.FAILOVER,
                  lambda p: {"point": {"id": 3, "time": "t", "last_seq": 1}},
                  now=clock.now, sleep=clock.sleep)
    out = json.loads(json.dumps({"plan": "dr", "point": "latest", **doc}))
    assert set(out) == {"plan", "point", "action", "ok", "start", "end", "seconds", "groups",
                        "steps"}
    assert set(out["groups"][0]) == {"group", "policies", "delay_s", "state", "waited_s"}
    assert set(out["steps"][0]) == {"group", "policy", "action", "state", "ok", "error",
                                    "start", "end", "seconds", "point", "images", "note"}
    assert out["steps"][1]["group"] == 2 and out["steps"][1]["action"] == "failover"
    assert out["start"].endswith("Z") and out["steps"][0]["seconds"] == 0.0


def test_text_table_says_what_happened_per_step() -> None:
    def runner(policy: str) -> dict[str, Any]:
        if policy == "app":
            raise CdpError("refused")
        return {"point": {"id": 12, "time": "2024-05-01T12:00:00.000Z", "last_seq": 40}}

    clock = FakeTime()
    doc = {"plan": "dr", "point": "latest",
           **execute(PLAN, plan.FAILOVER, runner, now=clock.now, sleep=clock.sleep)}
    text = plan.render_run(doc)
    lines = text.splitlines()
    assert lines[0].startswith("plan dr: failover of 4 policies in 3 group(s), point latest: "
                               "FAILED")
    assert lines[1].split()[:3] == ["GROUP", "POLICY", "ACTION"]
    db = next(ln for ln in lines if " db " in ln)
    assert "12 (2024-05-01T12:00:00.000Z, seq 40)" in db and db.rstrip().endswith("ok")
    assert "FAILED: refused" in next(ln for ln in lines if " app " in ln)
    assert "not started" in next(ln for ln in lines if " report " in ln)
    assert "after group 1: waited 30.0 s (delay 30 s)" in text
    assert "not started (a step failed before them): group(s) 3" in text
    assert "still failed over: db, web" in text


def test_plan_rendering() -> None:
    doc = {"name": "dr", "groups": [{"group": 1, "policies": ["db"], "delay_s": 30.0},
                                    {"group": 2, "policies": ["app", "web"], "delay_s": 0.0}]}
    assert plan.render_plan(doc) == ("plan dr: 3 policies in 2 group(s)\n"
                                      "  group 1: db, then wait 30 s\n"
                                      "  group 2: app, web")
    listed = plan.render_list([doc]).splitlines()
    assert listed[1].split() == ["dr", "2", "db", "|", "app,web", "30", "s"]
    assert plan.render_list([]) == "no failover plans"
    assert plan.groups_of(doc) == [Group(("db",), 30.0), Group(("app", "web"), 0.0)]
    assert plan.plan_test_name("x" * 64) == ("plan-" + "x" * 64)[:64]
