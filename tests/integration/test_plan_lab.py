"""Failover plans (issue 16 item 7) in a real lab: 3 policies in 2 groups run in order
with the delay between them.

The plan is [lab-1], 2 s, [lab-2, lab-3]. `plan test` starts a test failover of each
(images under DIR/<policy>/, each equal to its source disk, which is caught up and
idle); the per-step times show group 2 starting at least the delay after group 1
ended (printed; the bound is generous). `plan test --stop` removes them all. `plan
run` fails every policy over for real (the target says "policy failover: active"),
again in order, and `failover undo` of each brings replication back. The plan is
kept by the coordinator: `plan list` / `show` see it, an unknown policy is refused.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
from pathlib import Path
from typing import Any

import pytest
from conftest import LabHandle, assert_eventually
from workload import MiB, sha256_file

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]

POLICIES = ["lab-1", "lab-2", "lab-3"]
DELAY_S = 2.0


def stamp(text: str) -> float:
    return dt.datetime.fromisoformat(text).timestamp()


def write(path: str, rng: random.Random, offset: int, size: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, rng.randbytes(size), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def check_order(doc: dict[str, Any], action: str) -> None:
    """Every step ok, in plan order, group 2 at least the delay after group 1."""
    assert doc["ok"], json.dumps(doc["steps"], indent=2)
    steps = {s["policy"]: s for s in doc["steps"]}
    assert [s["policy"] for s in doc["steps"]] == POLICIES
    assert [s["group"] for s in doc["steps"]] == [1, 2, 2]
    assert all(s["action"] == action and s["state"] == "ok" and s["point"] for s in
               doc["steps"])
    first_end = stamp(steps["lab-1"]["end"])
    gap = min(stamp(steps[p]["start"]) for p in ("lab-2", "lab-3")) - first_end
    print(f"plan {action}: group 2 started {gap:.3f} s after group 1 ended "
          f"(delay {DELAY_S} s; group 1 took {steps['lab-1']['seconds']:.2f} s)")
    assert DELAY_S - 0.05 <= gap < DELAY_S + 20, gap
    assert doc["groups"][0]["waited_s"] >= DELAY_S - 0.05


def test_a_plan_of_three_policies_in_two_groups(lab: Any, tmp_path: Path) -> None:
    handle: LabHandle = lab(tmp_path / "lab", disk_size="16M", extra=("--policies", "3"))
    disks = {d["policy"]: d for d in handle.disks}
    assert sorted(disks) == POLICIES
    restores = Path(handle.info["restore_dir"])
    rng = random.Random(7)
    for d in disks.values():
        write(d["path"], rng, MiB, 2 * MiB)

    def caught_up() -> bool:
        return all(sha256_file(d["path"]) == sha256_file(d["replica_path"])
                   for d in disks.values())
    assert_eventually(caught_up, 60, 0.5, "the replicas did not catch up")
    sha = {p: sha256_file(d["path"]) for p, d in disks.items()}

    # the plan is the coordinator's; an unknown policy is refused, naming it
    bad = handle.cli("plan", "create", "drill", "--group", "lab-1", "--group", "nosuch")
    assert bad.returncode == 2 and "nosuch" in bad.stderr, bad.stderr
    made = handle.cli("plan", "create", "drill", "--group", "lab-1", "--delay", str(DELAY_S),
                      "--group", "lab-2,lab-3", "--json")
    assert made.returncode == 0, made.stdout + made.stderr
    shown = json.loads(handle.cli("plan", "show", "drill", "--json", check=True).stdout)
    assert shown["groups"] == [{"group": 1, "policies": ["lab-1"], "delay_s": DELAY_S},
                               {"group": 2, "policies": ["lab-2", "lab-3"], "delay_s": 0.0}]
    assert "drill" in handle.cli("plan", "list", check=True).stdout

    # test failovers, in order, each image equal to its (idle, caught-up) source
    out = restores / "plan-drill"
    tested = handle.cli("plan", "test", "drill", "--out", str(out), "--json")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    doc = json.loads(tested.stdout)
    check_order(doc, "test failover")
    for s in doc["steps"]:
        (img,) = s["images"]
        assert Path(img["path"]).parent == out / s["policy"]
        assert sha256_file(img["path"]) == sha[s["policy"]], s["policy"]
    table = handle.cli("plan", "test", "drill", "--stop")   # the text table this time
    assert table.returncode == 0, table.stdout + table.stderr
    print(table.stdout)
    assert "test stop" in table.stdout and "image(s) deleted" in table.stdout
    for p in POLICIES:
        assert not (out / p).exists()
        listed = json.loads(handle.cli("failover", "test", "list", p, "--json",
                                       check=True).stdout)
        assert listed["tests"] == []
    again = json.loads(handle.cli("plan", "test", "drill", "--stop", "--json").stdout)
    assert again["ok"] and all("nothing to stop" in s["note"] for s in again["steps"])

    # the real thing: every policy failed over, in order; then undone
    ran = handle.cli("plan", "run", "drill", "--json")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    doc = json.loads(ran.stdout)
    check_order(doc, "failover")
    try:
        for s in doc["steps"]:
            (img,) = s["images"]
            assert sha256_file(img["path"]) == sha[s["policy"]], s["policy"]
            points = handle.cli("restore-points", s["policy"], check=True).stdout
            assert "policy failover: active" in points, points
    finally:
        for p in POLICIES:
            undone = handle.cli("failover", "undo", p)
            assert undone.returncode == 0, undone.stdout + undone.stderr
    write(disks["lab-3"]["path"], rng, 8 * MiB, MiB)   # replication is back
    assert_eventually(caught_up, 60, 0.5, "replication did not resume after the undo")
    assert handle.cli("plan", "delete", "drill").returncode == 0
    assert "no failover plans" in handle.cli("plan", "list", check=True).stdout
