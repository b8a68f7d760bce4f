"""Scheduled verification of restore points on the target (issue 16 item 5).

Theory of operation
-------------------
A policy whose assignment has `verify_every_s` > 0 gets its newest restore
point verified by the target itself, as `cdpctl verify --fsck` would: the
point is restored into a scratch directory under `[target] verify_dir`
(inside restore_dir), each image is attached as a loop device, the file
system journal is replayed on the scratch copy and `e2fsck -fn` must find it
clean (cdp_common.verifycheck), the time from the start to the attached
copies is the point's time to usable, and the result is recorded in the
policy's verify log (cdp_target.verifylog, the one `cdpctl verify` records
into). The copy is deleted and the devices detached whatever happened.

The core is pure: `due_at(candidate)` says when a policy is next due,
`pick(candidates, now_ns)` which one to verify now, from facts gathered by
the shell. The rules:

    not scheduled   verify_every_s is 0, or the policy has no point yet, its
                    newest point lies in a gap (inconsistent: e2fsck would
                    fail for no fault of the data), or it is failed over
    due at          max(newest verification recorded, last scheduled
                    attempt) + verify_every_s; at once when there is neither
    order           the earliest due first, then by name

The last attempt counts as well as the last result, so a verification that
could not be recorded (the point went in the meantime) is not retried in a
loop; a recorded one of `cdpctl verify` counts too (it is as good).

The shell (`VerifyScheduler`) runs one verification at a time per target, in
a thread (`in_thread`), so it never holds up receiving and acking deltas;
the restore holds apply still only while it writes the copy
(cdp_target.restore). A host that cannot run the checks (not root, no
losetup or e2fsck: `verifycheck.cannot_verify`) records a *failed*
verification saying why, never a passed one. A restore that fails (a
damaged undo segment) is a failed verification too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cdp_common import verifycheck
from cdp_common.aio import in_thread
from cdp_common.errors import CdpError
from cdp_target.points import Point
from cdp_target.restore import pick_point, restore_images
from cdp_target.service import PolicyRuntime, TargetService
from cdp_target.verifylog import Verification, VerifyLog

log = logging.getLogger("target.verify")

TICK_S = 1.0
"""How often the schedule is looked at (cheap: in-memory catalogs)."""


# ---------------------------------------------------------------- pure core

@dataclass(frozen=True)
class Candidate:
    """What the schedule needs to know of one policy."""

    policy: str
    every_s: float           # verify_every_s of its assignment (0: not scheduled)
    newest_point: int = 0    # id of its newest restore point (0: none yet)
    in_gap: bool = False     # that point lies in a gap (not consistent)
    refused: bool = False    # failed over (or frozen): not verified on schedule
    last_ns: int = 0         # newest verification recorded (0: none)
    tried_ns: int = 0        # last scheduled attempt started (0: none)


def due_at(c: Candidate) -> int | None:
    """Wall time (ns) the policy is due at; None when not scheduled (module docstring)."""
    if c.every_s <= 0 or not c.newest_point or c.in_gap or c.refused:
        return None
    base = max(c.last_ns, c.tried_ns)
    return 0 if base == 0 else base + int(c.every_s * 1e9)


def pick(candidates: Iterable[Candidate], now_ns: int) -> Candidate | None:
    """The policy to verify now: due, the earliest due first, then by name."""
    due = [(at, c.policy, c) for c in candidates
           if (at := due_at(c)) is not None and at <= now_ns]
    return min(due, key=lambda t: (t[0], t[1]))[2] if due else None


# ---------------------------------------------------------------- one verification

@dataclass
class Result:
    point: Point | None
    outcome: verifycheck.Outcome
    rto_s: float


def verify_newest(rt: PolicyRuntime, scratch: Path, root: Path | None,
                  runner: verifycheck.Runner = verifycheck.run_command,
                  why_not: str = "") -> Result:
    """Restore rt's newest point under `scratch`, attach and fsck it, clean up (blocking).
    `why_not`: this host cannot run the checks: the result is a failure saying so."""
    store = rt.local
    out = verifycheck.Outcome(checks=["restore"])
    chosen: list[Point] = []

    def select() -> Point:
        p = pick_point(store, latest=True)
        chosen.append(p)
        return p
    if why_not:
        point = pick_point(store, latest=True)
        out.checks = []
        out.fail(f"cannot verify on this target: {why_not}")
        return Result(point, out, 0.0)
    started = time.monotonic()
    work = scratch / f"{rt.name}-{time.time_ns()}"
    devices: list[str] = []
    rto = 0.0
    try:
        try:
            restored = restore_images(store, select, work, None, root)
        except CdpError as exc:
            out.fail(f"restore failed: {exc}")
            return Result(chosen[-1] if chosen else None, out, 0.0)
        images = [str(p) for _, p in sorted(restored.images.items())]
        try:
            devices = verifycheck.attach_loops(images, runner)
        except CdpError as exc:
            out.fail(str(exc))
            return Result(restored.point, out, 0.0)
        rto = time.monotonic() - started
        verifycheck.run_checks(devices, work, True, None, 0.0, {}, out, runner)
        return Result(restored.point, out, rto)
    finally:
        verifycheck.detach_loops(devices, runner)
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------- shell

Logs = Callable[[PolicyRuntime], Awaitable[VerifyLog]]
Record = Callable[[str, PolicyRuntime, Verification], Awaitable[None]]


class VerifyScheduler:
    """Runs the schedule over `target`'s policies (see the module docstring).

    `logs(rt)`: the policy's verify log, loaded (the one the RestorePoints
    service lists from); `record(policy, rt, v)`: keep `v` in it and export it; `scratch`: where the
    copies go (inside `root`, the restore_dir)."""

    def __init__(self, target: TargetService, logs: Logs, record: Record, scratch: Path,
                 root: Path | None, runner: verifycheck.Runner = verifycheck.run_command,
                 why_not: Callable[[], str] = verifycheck.cannot_verify,
                 now_ns: Callable[[], int] = time.time_ns, tick_s: float = TICK_S) -> None:
        self.target = target
        self.logs = logs
        self.record = record
        self.scratch = scratch
        self.root = root
        self.runner = runner
        self.why_not = why_not
        self.now_ns = now_ns
        self.tick_s = tick_s
        self.every: dict[str, float] = {}
        self.tried: dict[str, int] = {}
        self.running = ""
        self._task: asyncio.Task[None] | None = None

    def set_schedule(self, every: Mapping[str, float]) -> None:
        """verify_every_s per policy assigned here (each assignment set)."""
        new = {p: s for p, s in every.items() if s > 0}
        for p in sorted(set(new) - set(self.every)):
            log.info("scheduled verification every %gs", new[p], extra={"policy": p})
        for p in sorted(set(self.every) - set(new)):
            log.info("scheduled verification off", extra={"policy": p})
        self.every = new

    def start(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)   # a crashed run's leftovers
        self._task = asyncio.create_task(self._loop(), name="verify-schedule")

    async def close(self) -> None:
        """Stop; a verification in progress finishes first (its thread is not killed)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            try:
                await self.tick()
            except CdpError as exc:
                log.error("scheduled verification: %s", exc)
            await asyncio.sleep(self.tick_s)

    async def candidates(self) -> list[Candidate]:
        out = []
        for name, rt in sorted(self.target.policies.items()):
            if getattr(rt.store, "undo", None) is None:
                continue   # not a file store: no restore points
            book = await self.logs(rt)   # loaded for every policy: heartbeats report it
            every = self.every.get(name, 0.0)
            if every <= 0:
                continue
            newest = rt.local.undo.catalog.newest
            in_gap = False
            if newest is not None:
                with rt.gap_lock:
                    in_gap = rt.gaps.covering(newest.last_seq) is not None
            last = book.newest()
            out.append(Candidate(name, every, newest.id if newest else 0, in_gap,
                                 bool(rt.refusal), last.time_ns if last else 0,
                                 self.tried.get(name, 0)))
        return out

    async def tick(self) -> Verification | None:
        """Verify the policy due now, if any; returns what was recorded."""
        c = pick(await self.candidates(), self.now_ns())
        if c is None:
            return None
        rt = self.target.policies.get(c.policy)
        if rt is None:
            return None
        self.tried[c.policy] = self.now_ns()
        self.running = c.policy
        try:
            res = await in_thread(verify_newest, rt, self.scratch, self.root, self.runner,
                                  self.why_not())
        finally:
            self.running = ""
        if res.point is None:
            log.error("scheduled verification: %s", "; ".join(res.outcome.detail),
                      extra={"policy": c.policy})
            return None
        o = res.outcome
        v = Verification(res.point.id, res.point.last_seq, o.ok, res.rto_s,
                         ",".join(o.checks), "; ".join(o.detail) or "scheduled: e2fsck clean",
                         self.now_ns())
        await self.record(c.policy, rt, v)   # kept and exported as RecordVerification does
        (log.info if v.ok else log.error)(
            "scheduled verification of restore point %d: %s (%s; usable in %.2fs)%s",
            v.point_id, "ok" if v.ok else "FAILED", v.checks, v.rto_s,
            "" if v.ok else f": {v.detail}", extra={"policy": c.policy})
        return v
