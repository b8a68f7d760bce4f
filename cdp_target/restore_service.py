"""gRPC shell of restore points: the `RestorePoints` service of cdp-target.

Theory of operation: a thin layer over `cdp_target.restore` and each
policy's `UndoStore`. Blocking work (copies, undo replay, renames) runs in
threads through `in_thread`; progress of a restore is handed from its thread
to the stream through an asyncio queue, at most every PROGRESS_EVERY_S.
Failover state is kept per policy (`Failover`) and mirrored into the
runtime's `refusal`, which the `Target` servicer checks when an Apply stream
opens and which ends the running stream.

Consistency groups: a name with no store of its own whose members
``<name>..<filter>`` are here (`TargetService.group_members`) is a group.
List gives its group points (`cdp_target.grouppoints`: the checkpoint ids
that every member has as a point; a point's id is the checkpoint id);
Create marks the newest group point long-term in every member; Restore and
TestStart write every member's disks, each at its point of the chosen
checkpoint, into the one out_dir (disk names are unique across a group; a
clash fails the restore), one member after the other, each under its own
`paused()`: every member's point is fixed by the checkpoint, so the members
need not hold still together. A failure removes the images of the members
already written. A member of the group without a store here (assigned, no
data yet, or quarantined) is FAILED_PRECONDITION naming it.

Failover of a group fails every member over at its point of the chosen
checkpoint (`cdp_target.grouppoints`, "Failover of a group"): every
member's point is checked first (a gap, retention), then every member
refuses deltas, then the members fail over one by one in name order, each
persisted as a single policy's failover is; a failure rolls back the
members this call failed over. A SIGKILL between two members leaves a
"partial" group (List's failover_state; logged at start-up): the same
failover again finishes it, `FailoverUndo` of the group undoes it. Undo and
commit of a group act on every member failed over, one by one, and say in
the error which members they did when one fails. One lock serialises every
failover, undo and commit at this target, of groups and policies alike.

Status codes: NOT_FOUND (unknown policy or point), INVALID_ARGUMENT (bad
request), FAILED_PRECONDITION (failover state forbids it, no point yet, a
group member missing), UNAVAILABLE (storage failure).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import grpc

from cdp_common import assignsig, groups, rpc
from cdp_common.aio import in_thread
from cdp_common.errors import CdpError, FormatError, NotFoundError
from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
from cdp_common.pb.cdp.v1 import restore_pb2 as pb
from cdp_common.pb.cdp.v1 import restore_pb2_grpc as pgrpc
from cdp_target import metrics as M
from cdp_target import points as P
from cdp_target.failtest import FailoverTest, FailoverTests, remove_images
from cdp_target.grouppoints import (
    GroupPoint,
    MemberFailover,
    describe_members,
    failover_state,
    group_points,
    pick,
    plan_failover,
    plan_finish,
)
from cdp_target.restore import (
    Failover,
    FailoverStateError,
    InconsistentPointError,
    PointNotFound,
    Restored,
    pick_point,
    restore_images,
)
from cdp_target.service import PolicyRuntime, TargetService
from cdp_target.store import POLICY_NAME
from cdp_target.undostore import save_retention
from cdp_target.verifylog import Verification, VerifyLog

log = logging.getLogger("target.restore")

PolicyFailover = Failover
"""`Failover` by a name the servicer's own `Failover` method does not hide."""

PROGRESS_EVERY_S = 0.25
RETENTION_TICK_S = 5.0


class GroupMemberMissing(CdpError, grpc_status="FAILED_PRECONDITION"):
    """A member of a consistency group has no (usable) store at this target."""


def point_pb(cat: P.Catalog, p: P.Point, v: Verification | None = None) -> pb.PointInfo:
    info = pb.PointInfo(id=p.id, kind=p.kind, time_ns=p.time_ns, last_seq=p.last_seq,
                        size_bytes=cat.size_of(p), on_demand=p.on_demand,
                        checkpoint_id=p.checkpoint_id)
    if v is not None and v.last_seq == p.last_seq:
        info.verified = "ok" if v.ok else "failed"
        info.verify_rto_s, info.verified_ns = v.rto_s, v.time_ns
    return info


def group_point_pb(cats: dict[str, P.Catalog], gp: GroupPoint) -> pb.PointInfo:
    """A group point: id = its checkpoint id, the newest member time, the sum of the
    members' undo bytes, no last seq of its own (each member has its own)."""
    return pb.PointInfo(
        id=gp.id, kind=gp.kind, time_ns=gp.time_ns, last_seq=0,
        size_bytes=sum(cats[n].size_of(p) for n, p in gp.members),
        on_demand=all(p.on_demand for _, p in gp.members), checkpoint_id=gp.checkpoint_id,
        members=[pb.MemberPoint(policy=n, point_id=p.id, last_seq=p.last_seq,
                                time_ns=p.time_ns) for n, p in gp.members])


Book = TypeVar("Book", FailoverTests, VerifyLog)


async def _loaded(cache: dict[str, tuple[object, Book]], rt: PolicyRuntime,
                  make: Callable[[Path], Book]) -> Book:
    """The policy's registry, loaded once per store (a purged and re-created
    policy has a new store: its registry is read again, as `_failover` does)."""
    hit = cache.get(rt.local.name)
    if hit is not None and hit[0] is rt.local:
        return hit[1]
    book = make(rt.local.dir)
    await in_thread(book.load)
    cache[rt.local.name] = (rt.local, book)
    return book


class RestoreService(pgrpc.RestorePointsServicer):
    def __init__(self, target: TargetService, restore_dir: Path | None = None) -> None:
        """`restore_dir`: the only directory Restore writes under (None: anywhere, for
        tests of the service alone; the daemon passes [target] restore_dir)."""
        self.target = target
        self.restore_dir = restore_dir
        self.failovers: dict[str, Failover] = {}
        self.tests: dict[str, tuple[object, FailoverTests]] = {}
        self._tests_lock = asyncio.Lock()   # the registries are not thread-safe
        self.verified: dict[str, tuple[object, VerifyLog]] = {}
        self._ticker: asyncio.Task[None] | None = None
        self._failover_lock = asyncio.Lock()
        """Held by every Failover, FailoverUndo and FailoverCommit (groups and policies):
        a group's members change one by one, nothing may interleave."""

    async def attach(self) -> None:
        """Load the failover state of every open policy (after `open_existing`) and
        start the retention tick (expired points go even while a policy is idle)."""
        for name, rt in self.target.policies.items():
            await self._failover(name, rt)
        await self._report_groups()
        self._ticker = asyncio.create_task(self._tick(), name="retention-tick")

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(RETENTION_TICK_S)
            for rt in list(self.target.policies.values()):
                rt.kick.set()

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker

    async def _failover(self, name: str, rt: PolicyRuntime) -> Failover:
        fo = self.failovers.get(name)
        if fo is None or fo.store is not rt.local:
            fo = Failover(rt.local)
            await in_thread(fo.recover)
            self.failovers[name] = fo
            self._mirror(rt, fo)
        return fo

    async def _report_groups(self) -> None:
        """Log every consistency group here whose failover is not whole (a target killed
        between two members, say): the operator must finish or undo it."""
        found: dict[str, list[str]] = {}
        for name in self.target.policies:
            sm = groups.split_member(name)
            if sm is not None:
                found.setdefault(sm[0], []).append(name)
        for group in sorted(found):
            try:
                members = self._members(group, self.target.group_members(group))
                states = await self._member_failovers(members)
            except CdpError:
                continue
            state = failover_state({n: m for n, (_, _, m) in states.items()})
            if state in ("partial", "committing"):
                log.error("consistency group failover is %s (members: %s): `cdpctl failover "
                          "%s --point ID` or `cdpctl failover commit %s` finishes it, "
                          "`cdpctl failover undo %s` undoes it", state,
                          describe_members({n: m for n, (_, _, m) in states.items()}),
                          group, group, group, extra={"policy": group})

    def _mirror(self, rt: PolicyRuntime, fo: Failover) -> None:
        rt.refusal = fo.refusal()
        if rt.refusal and rt.stream is not None:
            rt.stream.replaced.set()   # ends the running Apply stream with the refusal
        if not rt.refusal:
            rt.kick.set()

    async def _runtime(self, policy: str, context: grpc.aio.ServicerContext) -> PolicyRuntime:
        rt = self.target.policies.get(policy)
        if rt is None:
            await rpc.abort(context, NotFoundError(
                f"policy {policy!r} is not known to this target"))
        assert rt is not None
        return rt

    # ------------------------------------------------------------ groups

    def _group_of(self, policy: str) -> list[str] | None:
        """The members of `policy` when it is a consistency group here (no store of its
        own, members here or assigned here), else None."""
        if policy in self.target.policies or policy in self.target.quarantined:
            return None
        return self.target.group_members(policy) or None

    def _members(self, group: str, names: list[str]) -> list[tuple[str, PolicyRuntime]]:
        """Each member's runtime; GroupMemberMissing names those without a store."""
        out, missing = [], []
        for n in names:
            rt = self.target.policies.get(n)
            if rt is None:
                why = self.target.quarantine_reason(n)
                missing.append(f"{n} ({'quarantined: ' + why if why else 'no data yet'})")
            else:
                out.append((n, rt))
        if missing:
            raise GroupMemberMissing(f"consistency group {group}: member(s) "
                                     f"{', '.join(missing)} have no store at this target; "
                                     f"a group point needs every member")
        return out

    def _group_point(self, group: str, members: list[tuple[str, PolicyRuntime]],
                     req: pb.RestoreRequest) -> GroupPoint:
        given = sum((bool(req.point_id), bool(req.time_ns), req.latest))
        if given != 1:
            raise FormatError("give exactly one of point_id, time_ns, latest")
        cats = {n: rt.local.undo.catalog for n, rt in members}
        return pick(group, group_points(cats), req.point_id, req.time_ns, req.latest)

    def _member_selector(self, group: str, name: str, rt: PolicyRuntime, checkpoint_id: int,
                         allow_inconsistent: bool, gaps: dict[str, str]
                         ) -> Callable[[], P.Point]:
        """The member's point of the checkpoint, looked up again under its `paused()`
        (retention may have dropped it since the group point was chosen)."""
        def select() -> P.Point:
            p = rt.local.undo.catalog.by_checkpoint.get(checkpoint_id)
            if p is None:
                raise PointNotFound(f"consistency group {group}: member {name} no longer "
                                    f"has the point of checkpoint {checkpoint_id} (retention "
                                    f"dropped it); choose a newer point")
            gaps[name] = self._gap_check(rt, name, p, allow_inconsistent)
            return p
        return select

    def _group_run(self, group: str, members: list[tuple[str, PolicyRuntime]],
                   gp: GroupPoint, req: pb.RestoreRequest, out: Path,
                   gaps: dict[str, str]) -> Callable[[Callable[[str, int, int], None]],
                                                     Restored]:
        """Restore every member at its point of `gp` into `out`, one after the other;
        on any failure the members' images written so far are removed."""
        root = self.restore_dir

        def run(progress: Callable[[str, int, int], None]) -> Restored:
            done: list[tuple[tuple[str, ...], Restored]] = []
            try:
                for name, rt in members:
                    select = self._member_selector(group, name, rt, gp.checkpoint_id,
                                                   req.allow_inconsistent, gaps)
                    r = restore_images(rt.local, select, out, progress, root)
                    done.append((tuple(r.images), r))
            except BaseException:
                for disks, _ in done:
                    with contextlib.suppress(CdpError):
                        remove_images(out, disks)
                raise
            images = {d: p for _, r in done for d, p in r.images.items()}
            methods = sorted({r.method for _, r in done})
            return Restored(P.Point(0, gp.time_ns), images, "+".join(methods))
        return run

    def _group_done(self, members: list[tuple[str, PolicyRuntime]],
                    gp: GroupPoint) -> Callable[[Restored], pb.PointInfo]:
        def info(_: Restored) -> pb.PointInfo:
            cats = {n: rt.local.undo.catalog for n, rt in members}
            return pb.PointInfo(id=gp.id, kind=gp.kind, time_ns=gp.time_ns,
                                checkpoint_id=gp.checkpoint_id,
                                members=[pb.MemberPoint(policy=n, point_id=p.id,
                                                        last_seq=p.last_seq,
                                                        time_ns=p.time_ns)
                                         for n, p in gp.members if n in cats])
        return info

    @staticmethod
    def _gaps_text(gaps: dict[str, str]) -> str:
        return "; ".join(f"{n}: {g}" for n, g in sorted(gaps.items()) if g)

    async def _drain_all(self, members: list[tuple[str, PolicyRuntime]],
                         req: pb.RestoreRequest) -> None:
        for _, rt in members:
            await self._drain(rt, req)

    # ------------------------------------------------------------ retention

    def on_assignments(self, node_id: str) -> Callable[[cpb.AssignmentSet], Awaitable[None]]:
        """The CoordinatorClient callback: which policies are assigned here (only they
        get a new store: TargetService.set_assigned), and each one's retention."""
        gate = assignsig.AssignmentGate(self.target.verifier, node_id, assignsig.TARGET, log)

        async def update(aset: cpb.AssignmentSet) -> None:
            # only the coordinator's own may create a store or change a retention here
            mine = [a for a in aset.assignments if a.target.node_id == node_id and gate.admits(a)]
            self.target.set_assigned({a.policy for a in mine})
            self.target.set_groups({a.group: a.group_members for a in mine if a.group})
            for name in aset.purge_policies:   # never one assigned here (TargetService)
                try:
                    await self.purge(name)
                except CdpError as exc:
                    log.error("purge failed: %s", exc, extra={"policy": name})
            for a in mine:
                if a.target.node_id != node_id or not a.short_term_retention_s:
                    continue
                r = P.Retention(a.short_term_retention_s, a.long_term_interval_s,
                                a.long_term_retention_s)
                try:
                    await in_thread(self._set_retention, a.policy, r)
                except (CdpError, OSError) as exc:
                    log.warning("cannot record retention: %s", exc, extra={"policy": a.policy})
        return update

    def _set_retention(self, policy: str, r: P.Retention) -> None:
        rt = self.target.policies.get(policy)
        if rt is None:
            if POLICY_NAME.match(policy):
                save_retention(self.target.data_dir / policy, r)
            return
        with rt.local.paused():
            if rt.local.undo.set_retention(r):
                log.info("retention: short-term %.0f s, long-term every %.0f s for %.0f s",
                         r.short_term_retention_s, r.long_term_interval_s,
                         r.long_term_retention_s, extra={"policy": policy})
        rt.kick.set()

    # ------------------------------------------------------------ List / Create

    async def List(self, request: pb.ListPointsRequest,
                   context: grpc.aio.ServicerContext) -> pb.ListPointsReply:
        names = self._group_of(request.policy)
        if names is not None:
            try:
                members = self._members(request.policy, names)
                cats = {n: rt.local.undo.catalog for n, rt in members}
                states = await self._member_failovers(members)
            except CdpError as exc:
                await rpc.abort(context, exc)
            return pb.ListPointsReply(
                points=[group_point_pb(cats, gp) for gp in group_points(cats)],
                failover_state=failover_state({n: m for n, (_, _, m) in states.items()}),
                total_bytes=sum(c.total_bytes() for c in cats.values()))
        rt = await self._runtime(request.policy, context)
        fo = await self._failover(request.policy, rt)
        cat = rt.local.undo.catalog
        try:
            results = (await self._verify_log(rt)).results
        except CdpError as exc:
            await rpc.abort(context, exc)
        return pb.ListPointsReply(points=[point_pb(cat, p, results.get(p.id))
                                          for p in cat.points],
                                  failover_state=fo.state, total_bytes=cat.total_bytes())

    async def _verify_log(self, rt: PolicyRuntime) -> VerifyLog:
        return await _loaded(self.verified, rt, VerifyLog)

    async def verification_log(self, rt: PolicyRuntime) -> VerifyLog:
        """The policy's verification log (verified.json), loaded once per store."""
        return await self._verify_log(rt)

    async def record_verification(self, policy: str, rt: PolicyRuntime,
                                  v: Verification) -> None:
        """Keep `v` (from `cdpctl verify` or the target's schedule) with its point and
        export it; List shows it from then on. CdpError when it cannot be kept."""
        book = await self._verify_log(rt)
        await self._book(book.record, v, [q.id for q in rt.local.undo.catalog.points])
        M.VERIFY_OK.labels(policy=policy).set(int(v.ok))
        M.VERIFY_RTO.labels(policy=policy).set(v.rto_s)
        M.VERIFY_AGE.labels(policy=policy).set(v.time_ns / 1e9)

    async def RecordVerification(self, request: pb.Verification,
                                 context: grpc.aio.ServicerContext) -> pb.Verification:
        rt = await self._runtime(request.policy, context)
        cat = rt.local.undo.catalog
        p = cat.point(request.point_id)
        if p is None:
            await rpc.abort(context, NotFoundError(
                f"policy {request.policy} has no restore point {request.point_id} (any more)"))
        assert p is not None
        v = Verification(p.id, p.last_seq, request.ok, max(0.0, request.rto_s),
                         request.checks, request.detail, time.time_ns())
        try:
            await self.record_verification(request.policy, rt, v)
        except CdpError as exc:
            await rpc.abort(context, exc)
        (log.info if v.ok else log.error)(
            "restore point %d verified: %s (%s; usable in %.2fs)%s", p.id,
            "ok" if v.ok else "FAILED", v.checks, v.rto_s, "" if v.ok else f": {v.detail}",
            extra={"policy": request.policy})
        return pb.Verification(policy=request.policy, point_id=p.id, ok=v.ok, rto_s=v.rto_s,
                               checks=v.checks, detail=v.detail, time_ns=v.time_ns)

    async def Create(self, request: pb.CreatePointRequest,
                     context: grpc.aio.ServicerContext) -> pb.PointInfo:
        names = self._group_of(request.policy)
        if names is not None:
            try:
                return await self._create_group(request.policy, names)
            except CdpError as exc:
                await rpc.abort(context, exc)
        rt = await self._runtime(request.policy, context)
        store = rt.local

        def create() -> P.Point:
            store.apply_pending()
            with store.paused():
                newest = store.undo.catalog.newest
                if newest is None:
                    raise FailoverStateError(f"policy {request.policy} has no restore point "
                                             f"yet (nothing replicated)")
                return store.undo.mark_long(newest.id)
        try:
            p = await in_thread(create)
        except CdpError as exc:
            await rpc.abort(context, exc)
        log.info("on-demand long-term point %d", p.id, extra={"policy": request.policy})
        return point_pb(store.undo.catalog, p)

    async def _create_group(self, group: str, names: list[str]) -> pb.PointInfo:
        """Mark the newest group point long-term (on demand) in every member, after each
        member applied what it has: the newest point the members all share."""
        members = self._members(group, names)
        for _, rt in members:
            await in_thread(rt.local.apply_pending)
        gp = pick(group, group_points({n: rt.local.undo.catalog for n, rt in members}))

        def mark(rt: PolicyRuntime, point_id: int) -> None:
            with rt.local.paused():
                rt.local.undo.mark_long(point_id)
        for n, rt in members:
            await in_thread(mark, rt, gp.point_of(n).id)
        cats = {n: rt.local.undo.catalog for n, rt in members}
        gp = pick(group, group_points(cats), point_id=gp.checkpoint_id)
        log.info("on-demand long-term group point %d", gp.id, extra={"policy": group})
        return group_point_pb(cats, gp)

    # ------------------------------------------------------------ Restore / Failover

    def _selector(self, rt: PolicyRuntime, req: pb.RestoreRequest,
                  chosen: dict[str, Any]) -> Callable[[], P.Point]:
        """The point picker run under `store.paused()`: it refuses a point inside a
        gap unless req.allow_inconsistent, and leaves its consistency in `chosen`
        (computed from the gap book at that instant, never assumed)."""
        given = sum((bool(req.point_id), bool(req.time_ns), req.latest))
        if given != 1:
            raise FormatError("give exactly one of point_id, time_ns, latest")

        def select() -> P.Point:
            p = pick_point(rt.local, req.point_id, req.time_ns, req.latest)
            chosen["gap"] = self._gap_check(rt, req.policy, p, req.allow_inconsistent)
            return p
        return select

    @staticmethod
    def _gap_check(rt: PolicyRuntime, policy: str, p: P.Point, allow: bool) -> str:
        """The gap `p` lies in, in words ("" for none); InconsistentPointError when it
        lies in one and `allow` is False."""
        with rt.gap_lock:
            gap = rt.gaps.covering(p.last_seq)
        if gap is not None and not allow:
            raise InconsistentPointError(
                f"policy {policy}: restore point {p.id} (last seq {p.last_seq}) lies "
                f"in a gap ({gap.describe()}): its blocks mix old and new data. Choose a "
                f"point before the gap (`cdpctl restore-points {policy}`), wait for "
                f"the gap to close, or allow an inconsistent point explicitly")
        return gap.describe() if gap is not None else ""

    async def _drain(self, rt: PolicyRuntime, req: pb.RestoreRequest) -> None:
        """The "latest" point holds every delta the target committed (acked), not
        only the ones applied so far: apply them first, as `Create` does."""
        if req.latest:
            await in_thread(rt.local.apply_pending)

    async def _stream(self, run: Callable[[Callable[[str, int, int], None]], Restored],
                      chosen: dict[str, Any],
                      point_info: Callable[[Restored], pb.PointInfo] | None = None
                      ) -> AsyncIterator[pb.RestoreProgress]:
        """Run `run` in a thread, stream its progress, end with `done`; `chosen["gap"]`
        says whether the point was consistent (read after the run); `point_info`
        builds the done message's point (default: the restored point's own)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[pb.RestoreProgress] = asyncio.Queue()
        last = [0.0]

        def progress(phase: str, done: int, total: int) -> None:
            now = time.monotonic()
            if phase != "done" and now - last[0] < PROGRESS_EVERY_S:
                return
            last[0] = now
            msg = pb.RestoreProgress(phase=phase, bytes_done=done, bytes_total=total)
            loop.call_soon_threadsafe(queue.put_nowait, msg)

        started = time.monotonic()
        task = asyncio.ensure_future(in_thread(run, progress))
        while not task.done() or not queue.empty():
            getter = asyncio.ensure_future(queue.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                msg = getter.result()
                if msg.phase != "done":
                    yield msg
            else:
                getter.cancel()
        restored = task.result()
        seconds = time.monotonic() - started
        point = point_info(restored) if point_info is not None else pb.PointInfo(
            id=restored.point.id, kind=restored.point.kind, time_ns=restored.point.time_ns,
            last_seq=restored.point.last_seq, checkpoint_id=restored.point.checkpoint_id)
        yield pb.RestoreProgress(phase="done", done=pb.RestoreDone(
            point=point,
            images=[pb.RestoredImage(disk=n, path=str(p), size_bytes=p.stat().st_size)
                    for n, p in sorted(restored.images.items())],
            method=restored.method, seconds=seconds,
            consistent=not chosen["gap"], gap=chosen["gap"]))

    def _out_dir(self, request: pb.RestoreRequest) -> Path:
        out = Path(request.out_dir)
        if not request.out_dir or not out.is_absolute():
            raise FormatError(f"out_dir {request.out_dir!r}: an absolute path on the target "
                              f"host is needed")
        return out

    async def Restore(self, request: pb.RestoreRequest,
                      context: grpc.aio.ServicerContext) -> AsyncIterator[pb.RestoreProgress]:
        names = self._group_of(request.policy)
        if names is not None:
            try:
                async for msg in self._restore_group(request, names):
                    yield msg
            except CdpError as exc:
                await rpc.abort(context, exc)
            return
        rt = await self._runtime(request.policy, context)
        try:
            chosen: dict[str, Any] = {}
            select = self._selector(rt, request, chosen)
            out, root = self._out_dir(request), self.restore_dir
            await self._drain(rt, request)
            async for msg in self._stream(lambda prog: restore_images(rt.local, select, out,
                                                                      prog, root), chosen):
                yield msg
        except CdpError as exc:
            await rpc.abort(context, exc)

    async def _restore_group(self, req: pb.RestoreRequest, names: list[str],
                             on_done: Callable[[GroupPoint, list[tuple[str, PolicyRuntime]]],
                                               Awaitable[None]] | None = None
                             ) -> AsyncIterator[pb.RestoreProgress]:
        """Restore (or a test's images) of a group: every member at its point of the
        chosen checkpoint, into req.out_dir; `on_done` runs before `done` is sent."""
        group = req.policy
        members = self._members(group, names)
        out = self._out_dir(req)
        await self._drain_all(members, req)
        gp = self._group_point(group, members, req)
        gaps: dict[str, str] = {}
        chosen: dict[str, Any] = {}
        run = self._group_run(group, members, gp, req, out, gaps)

        def run_and_note(progress: Callable[[str, int, int], None]) -> Restored:
            r = run(progress)
            chosen["gap"] = self._gaps_text(gaps)
            return r
        async for msg in self._stream(run_and_note, chosen, self._group_done(members, gp)):
            if msg.phase == "done" and on_done is not None:
                await on_done(gp, members)
            yield msg

    # ------------------------------------------------------------ test failover

    async def _tests(self, rt: PolicyRuntime) -> FailoverTests:
        return await _loaded(self.tests, rt, FailoverTests)

    async def purge(self, policy: str) -> bool:
        """TargetService.purge, after stopping the policy's test failovers: their images
        lie under restore_dir, outside the store, and would outlive it."""
        rt = self.target.policies.get(policy)
        if rt is not None and policy not in (self.target.assigned or ()):
            book = await self._tests(rt)
            for name in sorted(book.tests):
                await self._book(book.stop, name)
                log.warning("test failover %s stopped: the policy is purged", name,
                            extra={"policy": policy})
        return await self.target.purge(policy)

    async def _book(self, fn: Callable[..., Any], *args: Any) -> Any:
        async with self._tests_lock:
            return await in_thread(fn, *args)

    @staticmethod
    def _test_pb(t: FailoverTest) -> pb.TestInfo:
        return pb.TestInfo(name=t.name, state=t.state, out_dir=t.out_dir,
                           started_ns=t.started_ns,
                           point=pb.PointInfo(id=t.point_id, last_seq=t.last_seq,
                                              time_ns=t.time_ns),
                           images=[pb.RestoredImage(disk=d, path=str(p))
                                   for d, p in sorted(t.images().items())])

    async def TestStart(self, request: pb.TestStartRequest,
                        context: grpc.aio.ServicerContext) -> AsyncIterator[pb.RestoreProgress]:
        req = request.restore
        names = self._group_of(req.policy)
        if names is not None:
            async for msg in self._test_start_group(request, names, context):
                yield msg
            return
        rt = await self._runtime(req.policy, context)
        pending = False   # recorded, images not all written yet
        try:
            book = await self._tests(rt)
            chosen: dict[str, Any] = {}
            select = self._selector(rt, req, chosen)
            out, root = self._out_dir(req), self.restore_dir
            disks = [d.name for d in rt.local.state.disks.values()]
            await self._book(book.begin, request.name, out, disks)
            pending = True
            await self._drain(rt, req)
            async for msg in self._stream(lambda prog: restore_images(rt.local, select, out,
                                                                      prog, root), chosen):
                if msg.phase == "done":
                    p = msg.done.point
                    await self._book(book.ready, request.name, p.id, p.last_seq, p.time_ns)
                    pending = False
                    log.warning("test failover %s started at point %d in %s", request.name,
                                p.id, out, extra={"policy": req.policy})
                yield msg
        except CdpError as exc:
            if pending:
                await self._book(book.abandon, request.name)
            await rpc.abort(context, exc)
        except BaseException:
            if pending:   # the caller went away mid-copy: leave no half test behind
                await self._book(book.abandon, request.name)
            raise

    async def _test_start_group(self, request: pb.TestStartRequest, names: list[str],
                                context: grpc.aio.ServicerContext
                                ) -> AsyncIterator[pb.RestoreProgress]:
        """A group's test: recorded in every member's registry (its own disks, the one
        out_dir) before any image is written, made ready in each with its own point."""
        req = request.restore
        begun: list[FailoverTests] = []
        try:
            members = self._members(req.policy, names)
            out = self._out_dir(req)
            books = [(n, rt, await self._tests(rt)) for n, rt in members]
            for _, rt, book in books:
                disks = [d.name for d in rt.local.state.disks.values()]
                await self._book(book.begin, request.name, out, disks)
                begun.append(book)

            async def ready(gp: GroupPoint, _: list[tuple[str, PolicyRuntime]]) -> None:
                for n, _rt, book in books:
                    p = gp.point_of(n)
                    await self._book(book.ready, request.name, p.id, p.last_seq, p.time_ns)
                begun.clear()
                log.warning("test failover %s started at group point %d in %s", request.name,
                            gp.id, out, extra={"policy": req.policy})
            async for msg in self._restore_group(req, names, ready):
                yield msg
        except CdpError as exc:
            for book in begun:
                await self._book(book.abandon, request.name)
            await rpc.abort(context, exc)
        except BaseException:
            for book in begun:   # the caller went away mid-copy: leave no half test behind
                await self._book(book.abandon, request.name)
            raise

    async def _group_tests(self, group: str, names: list[str]
                           ) -> list[tuple[str, PolicyRuntime, FailoverTests]]:
        return [(n, rt, await self._tests(rt)) for n, rt in self._members(group, names)]

    def _group_test_pb(self, name: str,
                       parts: list[tuple[str, PolicyRuntime, FailoverTest]]) -> pb.TestInfo:
        """One group test from its members' records: every member's images, the group
        point it was started at (id = the checkpoint id, when the members' points
        still say it)."""
        first = parts[0][2]
        states = {t.state for _, _, t in parts}
        ids = set()
        for _, rt, t in parts:
            p = rt.local.undo.catalog.point(t.point_id)
            ids.add(p.checkpoint_id if p is not None else 0)
        cid = ids.pop() if len(ids) == 1 else 0   # 0: the members' points no longer say
        return pb.TestInfo(
            name=name, state="ready" if states == {"ready"} else "starting",
            out_dir=first.out_dir, started_ns=min(t.started_ns for _, _, t in parts),
            point=pb.PointInfo(id=cid, checkpoint_id=cid,
                               time_ns=max(t.time_ns for _, _, t in parts),
                               members=[pb.MemberPoint(policy=n, point_id=t.point_id,
                                                       last_seq=t.last_seq, time_ns=t.time_ns)
                                        for n, _, t in parts]),
            images=[pb.RestoredImage(disk=d, path=str(p))
                    for d, p in sorted({d: p for _, _, t in parts
                                        for d, p in t.images().items()}.items())])

    async def TestList(self, request: pb.FailoverRequest,
                       context: grpc.aio.ServicerContext) -> pb.TestListReply:
        names = self._group_of(request.policy)
        if names is not None:
            try:
                books = await self._group_tests(request.policy, names)
            except CdpError as exc:
                await rpc.abort(context, exc)
            by_name: dict[str, list[tuple[str, PolicyRuntime, FailoverTest]]] = {}
            for n, rt, book in books:
                for tname, t in book.tests.items():
                    by_name.setdefault(tname, []).append((n, rt, t))
            return pb.TestListReply(tests=[self._group_test_pb(tname, parts)
                                           for tname, parts in sorted(by_name.items())])
        rt = await self._runtime(request.policy, context)
        try:
            book = await self._tests(rt)
        except CdpError as exc:
            await rpc.abort(context, exc)
        return pb.TestListReply(tests=[self._test_pb(t) for _, t in sorted(book.tests.items())])

    async def TestStop(self, request: pb.TestStopRequest,
                       context: grpc.aio.ServicerContext) -> pb.TestInfo:
        names = self._group_of(request.policy)
        if names is not None:
            try:
                books = await self._group_tests(request.policy, names)
                having = [(n, rt, book) for n, rt, book in books if request.name in book.tests]
                if not having:   # the registry's own NOT_FOUND, naming the running ones
                    await self._book(books[0][2].stop, request.name)
                parts = [(n, rt, await self._book(book.stop, request.name))
                         for n, rt, book in having]
            except CdpError as exc:
                await rpc.abort(context, exc)
            log.warning("test failover %s stopped: its images are deleted", request.name,
                        extra={"policy": request.policy})
            return self._group_test_pb(request.name, parts)
        rt = await self._runtime(request.policy, context)
        try:
            book = await self._tests(rt)
            t = await self._book(book.stop, request.name)
        except CdpError as exc:
            await rpc.abort(context, exc)
        log.warning("test failover %s stopped: its images are deleted", request.name,
                    extra={"policy": request.policy})
        return self._test_pb(t)

    # ------------------------------------------------------------ failover

    async def Failover(self, request: pb.RestoreRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.RestoreProgress]:
        names = self._group_of(request.policy)
        async with self._failover_lock:
            if names is not None:
                try:
                    async for msg in self._failover_group(request, names):
                        yield msg
                except CdpError as exc:
                    await rpc.abort(context, exc)
                return
            async for msg in self._failover_one(request, context):
                yield msg

    async def _failover_one(self, request: pb.RestoreRequest, context: grpc.aio.ServicerContext
                            ) -> AsyncIterator[pb.RestoreProgress]:
        rt = await self._runtime(request.policy, context)
        fo = await self._failover(request.policy, rt)
        try:
            chosen: dict[str, Any] = {}
            select = self._selector(rt, request, chosen)
            if fo.state:
                raise FailoverStateError(f"policy {request.policy} is already failed over "
                                         f"({fo.state})")
            # a point that will be refused (in a gap) must not cost the stream
            await self._drain(rt, request)
            await in_thread(select)
            # refuse new deltas first, so the failover is a clean cut of the stream
            self._stop(request.policy, rt)
            try:
                await self._drain(rt, request)
                async for msg in self._stream(lambda prog: fo.start(select, prog), chosen):
                    yield msg
            finally:
                self._mirror(rt, fo)
            log.warning("failed over to point %s", fo.doc and fo.doc.get("point_id"),
                        extra={"policy": request.policy})
        except CdpError as exc:
            await rpc.abort(context, exc)

    @staticmethod
    def _stop(name: str, rt: PolicyRuntime) -> None:
        """Refuse the policy's deltas from now on (a failover of it is starting)."""
        rt.refusal = f"policy {name} is failed over"
        if rt.stream is not None:
            rt.stream.replaced.set()

    @staticmethod
    def _member_failover(rt: PolicyRuntime, fo: PolicyFailover) -> MemberFailover:
        """A member's failover state and the checkpoint of its point (failover.json says,
        or, in a file from before it did, the catalog's point of that id)."""
        doc = fo.doc or {}
        cid = int(doc.get("checkpoint_id", 0))
        if fo.state and not cid:
            p = rt.local.undo.catalog.point(int(doc.get("point_id", 0)))
            cid = p.checkpoint_id if p is not None else 0
        return MemberFailover(fo.state, cid)

    async def _member_failovers(self, members: list[tuple[str, PolicyRuntime]]
                                ) -> dict[str, tuple[PolicyRuntime, PolicyFailover,
                                                     MemberFailover]]:
        out = {}
        for n, rt in members:
            fo = await self._failover(n, rt)
            out[n] = (rt, fo, self._member_failover(rt, fo))
        return out

    async def _failover_group(self, req: pb.RestoreRequest, names: list[str]
                              ) -> AsyncIterator[pb.RestoreProgress]:
        """Fail every member of the group over at its point of the chosen checkpoint
        (module docstring); members already failed over there are kept."""
        group = req.policy
        members = self._members(group, names)
        await self._drain_all(members, req)
        gp = self._group_point(group, members, req)
        states = await self._member_failovers(members)
        todo = plan_failover(group, {n: m for n, (_, _, m) in states.items()},
                             gp.checkpoint_id)
        gaps: dict[str, str] = {}
        selects = {n: self._member_selector(group, n, rt, gp.checkpoint_id,
                                            req.allow_inconsistent, gaps)
                   for n, rt in members}
        for n in todo:   # a point in a gap, or gone, is refused before anything stops
            await in_thread(selects[n])
        for n in todo:   # the group stops as one, then its members fail over one by one
            self._stop(n, states[n][0])
        loop = asyncio.get_running_loop()

        def mirror_all() -> None:
            for n in todo:
                rt, fo, _ = states[n]
                self._mirror(rt, fo)

        def run(progress: Callable[[str, int, int], None]) -> Restored:
            started: list[str] = []
            methods: set[str] = set()
            try:
                for n in todo:
                    fo = states[n][1]
                    methods.add(fo.start(selects[n], progress).method)
                    started.append(n)
                    log.warning("failed over to point %s (group %s, checkpoint %d)",
                                fo.doc and fo.doc.get("point_id"), group, gp.checkpoint_id,
                                extra={"policy": n})
            except BaseException:
                for n in reversed(started):   # this call changes all of its members or none
                    try:
                        states[n][1].undo()
                    except CdpError as exc:
                        log.error("failover of the group failed, and so did undoing this "
                                  "member's: %s", exc, extra={"policy": n})
                raise
            finally:   # the refusals follow the members' states, even if the caller left
                loop.call_soon_threadsafe(mirror_all)
            images = {d: Path(p) for n, (_, fo, _) in sorted(states.items())
                      for d, p in (fo.doc or {}).get("disks", {}).items()}
            return Restored(P.Point(0, gp.time_ns), images, "+".join(sorted(methods)))

        chosen: dict[str, Any] = {}

        def run_and_note(progress: Callable[[str, int, int], None]) -> Restored:
            r = run(progress)
            chosen["gap"] = self._gaps_text(gaps)
            return r
        try:
            async for msg in self._stream(run_and_note, chosen, self._group_done(members, gp)):
                yield msg
        finally:
            mirror_all()
        log.warning("consistency group failed over to checkpoint %d (members: %s)",
                    gp.checkpoint_id, ", ".join(f"{n} point {p.id}" for n, p in gp.members),
                    extra={"policy": group})

    async def _finish(self, request: pb.FailoverRequest, context: grpc.aio.ServicerContext,
                      what: str) -> pb.FailoverReply:
        names = self._group_of(request.policy)
        async with self._failover_lock:
            if names is not None:
                try:
                    return await self._finish_group(request.policy, names,
                                                    "undo" if what == "undo" else "commit")
                except CdpError as exc:
                    await rpc.abort(context, exc)
            rt = await self._runtime(request.policy, context)
            fo = await self._failover(request.policy, rt)
            try:
                doc: dict[str, Any] = await in_thread(fo.undo if what == "undo" else fo.commit)
            except CdpError as exc:
                await rpc.abort(context, exc)
            self._mirror(rt, fo)
        log.warning("failover %s", "undone: replication resumes" if what == "undo"
                    else "committed: production moved to DR", extra={"policy": request.policy})
        return pb.FailoverReply(
            state=fo.state,
            point=pb.PointInfo(id=int(doc.get("point_id", 0)),
                               last_seq=int(doc.get("last_seq", 0)),
                               time_ns=int(doc.get("time_ns", 0))),
            images=[pb.RestoredImage(disk=n, path=p)
                    for n, p in sorted(doc.get("disks", {}).items())])

    async def _finish_group(self, group: str, names: list[str],
                            what: Literal["undo", "commit"]) -> pb.FailoverReply:
        """Undo or commit every member of the group that is failed over (grouppoints'
        `plan_finish`), one by one in name order. The reply: the group's state after,
        the point (the checkpoint, each member's point) and every image acted on
        (a commit: also those of members committed before)."""
        members = self._members(group, names)
        states = await self._member_failovers(members)
        todo = plan_finish(group, {n: m for n, (_, _, m) in states.items()}, what)
        docs: dict[str, dict[str, Any]] = {}
        if what == "commit":
            docs = {n: dict(fo.doc or {}) for n, (_, fo, m) in states.items()
                    if m.state == "committed"}
        for n in todo:
            rt, fo, _ = states[n]
            try:
                docs[n] = await in_thread(fo.undo if what == "undo" else fo.commit)
            except CdpError as exc:
                did = ", ".join(d for d in todo if d in docs) or "none"
                raise type(exc)(f"consistency group {group}: {what} of member {n} failed "
                                f"({exc}); members done: {did}") from None
            finally:
                self._mirror(rt, fo)
            log.warning("failover %s (group %s)", "undone: replication resumes"
                        if what == "undo" else "committed: production moved to DR", group,
                        extra={"policy": n})
        after = {n: self._member_failover(rt, fo) for n, (rt, fo, _) in states.items()}
        state = failover_state(after)
        log.warning("consistency group failover %s (members: %s)",
                    "undone" if what == "undo" else "committed", ", ".join(todo),
                    extra={"policy": group})
        cids = {int(d.get("checkpoint_id", 0)) or states[n][2].checkpoint_id
                for n, d in docs.items()}
        cid = cids.pop() if len(cids) == 1 else 0
        return pb.FailoverReply(
            state=state,
            point=pb.PointInfo(
                id=cid, checkpoint_id=cid,
                time_ns=max((int(d.get("time_ns", 0)) for d in docs.values()), default=0),
                members=[pb.MemberPoint(policy=n, point_id=int(d.get("point_id", 0)),
                                        last_seq=int(d.get("last_seq", 0)),
                                        time_ns=int(d.get("time_ns", 0)))
                         for n, d in sorted(docs.items())]),
            images=[pb.RestoredImage(disk=disk, path=path)
                    for _, d in sorted(docs.items())
                    for disk, path in sorted(d.get("disks", {}).items())])

    async def FailoverUndo(self, request: pb.FailoverRequest,
                           context: grpc.aio.ServicerContext) -> pb.FailoverReply:
        return await self._finish(request, context, "undo")

    async def FailoverCommit(self, request: pb.FailoverRequest,
                             context: grpc.aio.ServicerContext) -> pb.FailoverReply:
        return await self._finish(request, context, "commit")
