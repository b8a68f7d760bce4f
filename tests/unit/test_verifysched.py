"""Scheduled verification on the target (cdp_target.verifysched): the pure "what is
due" core, and the shell over a real PolicyStore with the commands faked: a clean
check is recorded ok, a failing e2fsck or a host that cannot run the checks is
recorded failed (never ok), nothing is left in the scratch directory, and a
policy is not verified again before its interval has passed.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from test_restore_points import Run, S

from cdp_common.config import (
    NodeConfig,
    TargetConfig,
    TargetSection,
    TlsConfig,
    build_policy,
    validate,
    verify_dir_of,
)
from cdp_common.errors import ConfigError
from cdp_target.service import PolicyRuntime
from cdp_target.verifylog import Verification, VerifyLog
from cdp_target.verifysched import Candidate, VerifyScheduler, due_at, pick

pytestmark = pytest.mark.timeout(60)

NOW = 10_000 * S


@pytest.mark.parametrize(("c", "due"), [
    (Candidate("a", 0, newest_point=5), None),                        # not scheduled
    (Candidate("a", 60, newest_point=0), None),                       # no point yet
    (Candidate("a", 60, newest_point=5, in_gap=True), None),          # inconsistent
    (Candidate("a", 60, newest_point=5, refused=True), None),         # failed over
    (Candidate("a", 60, newest_point=5), 0),                          # never verified
    (Candidate("a", 60, newest_point=5, last_ns=NOW), NOW + 60 * S),
    (Candidate("a", 60, newest_point=5, tried_ns=NOW), NOW + 60 * S),  # tried, unrecorded
    (Candidate("a", 60, newest_point=5, last_ns=NOW, tried_ns=NOW - S), NOW + 60 * S),
    (Candidate("a", 60, newest_point=5, last_ns=NOW - S, tried_ns=NOW), NOW + 60 * S),
])
def test_due_at(c: Candidate, due: int | None) -> None:
    assert due_at(c) == due


def test_pick_takes_the_earliest_due_then_the_name() -> None:
    cs = [Candidate("b", 60, 1, last_ns=NOW - 70 * S),
          Candidate("a", 60, 1, last_ns=NOW - 70 * S),
          Candidate("c", 60, 1, last_ns=NOW - 90 * S),
          Candidate("d", 60, 1, last_ns=NOW - 10 * S),   # not due yet
          Candidate("e", 0, 1)]                          # not scheduled
    assert pick(cs, NOW) == cs[2]
    assert pick(cs[:2], NOW) == cs[1]
    assert pick(cs[3:], NOW) is None
    assert pick(cs[3:], NOW + 50 * S) == cs[3]


class FakeRunner:
    """Records every command; losetup attaches /dev/loopN, e2fsck -fn exits `fsck`."""

    def __init__(self, fsck: int = 0) -> None:
        self.fsck = fsck
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str], timeout_s: float,
                 env: dict[str, str] | None) -> tuple[int, str]:
        self.calls.append(argv)
        if argv[:2] == ["losetup", "--find"]:
            assert Path(argv[-1]).is_file(), argv   # the copy exists while it is attached
            return 0, f"/dev/loop{len(self.calls)}"
        if argv[:3] == ["e2fsck", "-f", "-n"]:
            return self.fsck, "" if self.fsck == 0 else "Inode 12 has illegal blocks"
        return 0, ""

    def ran(self, *prefix: str) -> list[list[str]]:
        return [c for c in self.calls if c[:len(prefix)] == list(prefix)]


def scheduler(run: Run, tmp_path: Path, runner: FakeRunner, why_not: str = "",
              every_s: float = 60.0) -> tuple[VerifyScheduler, VerifyLog, dict[str, Any]]:
    rt = PolicyRuntime("db", run.store)
    book = VerifyLog(run.store.dir)
    book.load()
    clock = {"now": NOW}

    async def logs(_: PolicyRuntime) -> VerifyLog:
        return book

    async def record(_policy: str, rt: PolicyRuntime, v: Verification) -> None:
        book.record(v, [p.id for p in rt.local.undo.catalog.points])

    root = tmp_path / "restores"
    sched = VerifyScheduler(SimpleNamespace(policies={"db": rt}),  # type: ignore[arg-type]
                            logs, record, root / ".verify", root, runner,
                            why_not=lambda: why_not, now_ns=lambda: clock["now"])
    sched.set_schedule({"db": every_s, "idle": 0.0})
    return sched, book, clock


async def test_a_clean_point_is_recorded_ok_and_not_verified_again_too_soon(
        tmp_path: Path) -> None:
    run = Run(tmp_path / "db")
    run.step(3)
    runner = FakeRunner()
    sched, book, clock = scheduler(run, tmp_path, runner)
    v = await sched.tick()
    newest = run.store.undo.catalog.newest
    assert v is not None and newest is not None
    assert (v.point_id, v.last_seq, v.ok, v.checks) == (newest.id, newest.last_seq, True,
                                                        "restore,fsck")
    assert v.rto_s > 0 and book.results[v.point_id] == v
    devices = [c[-1] for c in runner.ran("e2fsck", "-f", "-n")]
    assert len(devices) == 2                                   # one per disk
    assert sorted(c[-1] for c in runner.ran("losetup", "-d")) == sorted(devices)
    assert list((tmp_path / "restores" / ".verify").iterdir()) == []   # copies deleted
    clock["now"] += 59 * S
    assert await sched.tick() is None                          # not due yet
    clock["now"] += 2 * S
    again = await sched.tick()
    assert again is not None and again.ok and again.time_ns == clock["now"]


async def test_a_failing_fsck_is_recorded_failed(tmp_path: Path) -> None:
    run = Run(tmp_path / "db")
    run.step(2)
    sched, book, _ = scheduler(run, tmp_path, FakeRunner(fsck=4))
    v = await sched.tick()
    assert v is not None and not v.ok
    assert "e2fsck -fn" in v.detail and "illegal blocks" in v.detail
    assert book.newest() == v
    assert list((tmp_path / "restores" / ".verify").iterdir()) == []


async def test_a_host_that_cannot_verify_records_a_failure_saying_why(tmp_path: Path) -> None:
    run = Run(tmp_path / "db")
    run.step(2)
    runner = FakeRunner()
    sched, _, _ = scheduler(run, tmp_path, runner, why_not="not root: loop devices cannot "
                            "be attached")
    v = await sched.tick()
    assert v is not None and not v.ok and v.checks == ""
    assert "cannot verify on this target: not root" in v.detail
    assert runner.calls == []                                  # nothing ran, nothing restored


async def test_nothing_is_due_without_a_point_or_a_schedule(tmp_path: Path) -> None:
    run = Run(tmp_path / "db")
    runner = FakeRunner()
    sched, _, _ = scheduler(run, tmp_path, runner)
    assert await sched.tick() is None                          # no point yet
    run.step(1)
    sched.set_schedule({"db": 0.0})
    assert await sched.tick() is None                          # scheduled off
    assert runner.calls == []


def test_verify_every_s_bounds() -> None:
    base = {"name": "db", "target": "target-1",
            "disks": [{"filter": "filter-1", "name": "db0", "size_bytes": 4096}]}
    assert build_policy(base).verify_every_s == 0.0
    assert build_policy({**base, "verify_every_s": 60}).verify_every_s == 60.0
    for bad in (-1, 10):
        with pytest.raises(ConfigError, match="verify_every_s: must be 0"):
            build_policy({**base, "verify_every_s": bad})
    assert build_policy({**base, "verify_every_s": 1}, verify_min_interval_s=1.0
                        ).verify_every_s == 1.0


def test_verify_dir_defaults_under_restore_dir_and_must_stay_inside() -> None:
    t = TargetSection(data_dir="/srv/cdp")
    assert verify_dir_of(t) == Path("/srv/cdp/_restores/.verify")
    assert verify_dir_of(TargetSection(data_dir="/d", restore_dir="/r", verify_dir="/r/v")
                         ) == Path("/r/v")
    for bad in ("/elsewhere", "relative/v", "/r", "/r/../x"):
        with pytest.raises(ConfigError, match=r"target\.verify_dir"):
            validate(TargetConfig(node=NodeConfig(id="target-1", coordinator="127.0.0.1:1"),
                                  target=TargetSection(data_dir="/d", restore_dir="/r",
                                                       verify_dir=bad),
                                  tls=TlsConfig(insecure=True)))
