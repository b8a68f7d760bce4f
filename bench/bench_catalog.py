"""Restore-point catalog benchmark: listing and per-delta cost at 7,200 points
(4 h of short-term retention at a 2 s RPO; issue 13 item 4; goal: List < 200 ms).

    .venv/bin/python bench/bench_catalog.py [--dir /var/tmp] [--points 7200] \
        [--repeat 5] [--appends 200] [--no-grpc]

Builds a catalog of --points points (one undo segment between each two, random
sizes, on-demand points and merged runs as retention leaves them) in a policy
directory under --dir, then times, median of --repeat:

- List in-process: the PointInfo list as `RestoreService.List` builds it, with
  the old per-point `size_of` (a scan of every point and segment per point) and
  with the one-pass size table (a fresh catalog object each run: no cache);
- List through the real gRPC RestorePoints service (TargetService +
  RestoreService on a loopback port, a real client), old and new sizes;
- the catalog write of one applied delta: the old full rewrite of points.json
  (statefile: tmp + fsync + rename + dir fsync) against one appended record
  (pwrite + fdatasync), --appends times each, and the in-memory part of the old
  `after_apply` (its quadratic "segment not in tuple" scan) against the new one;
- a retention pass dropping three points (plan + diff + one appended record);
- opening the catalog: loading the log with --appends records behind its snapshot,
  and a compaction of it.

Prints each figure and the old/new ratios. Nothing else runs against the files.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import benchargs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cdp_common import statefile
from cdp_common.pb.cdp.v1 import restore_pb2 as pb
from cdp_target import catalogfile as CF
from cdp_target import points as P
from cdp_target import restore_service
from cdp_target.store import DiskSpec, PolicyStore
from cdp_target.undostore import CATALOG_KIND, UndoStore

S = 1_000_000_000
POLICY = "bench"
NO_RETENTION = {"short_term_retention_s": 1e9, "long_term_retention_s": 1e9}


def old_size_of(cat: P.Catalog, point: P.Point) -> int:
    """`Catalog.size_of` as it was: every point and segment scanned, per point."""
    newer = [p.last_seq for p in cat.points if p.last_seq > point.last_seq]
    if not newer:
        return 0
    return sum(s.size_bytes for s in cat.segments
               if s.lo >= point.last_seq and s.hi <= newer[0])


def old_point_pb(cat: P.Catalog, p: P.Point) -> pb.PointInfo:
    return pb.PointInfo(id=p.id, kind=p.kind, time_ns=p.time_ns, last_seq=p.last_seq,
                        size_bytes=old_size_of(cat, p), on_demand=p.on_demand)


def build(n: int, now_ns: int) -> P.Catalog:
    rng = random.Random(13)
    cat, seq = P.Catalog(), 0
    for i in range(n):
        hi = seq + rng.randint(1, 40)
        cat = cat.with_applied(seq, hi, now_ns - (n - 1 - i) * 2 * S, rng.randrange(4096, 1 << 22))
        seq = hi
        if rng.random() < 0.002:
            cat = cat.mark_long(cat.points[-1].id)
    return cat


def median_s(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fresh(cat: P.Catalog) -> P.Catalog:
    return P.Catalog(cat.points, cat.segments)  # no cached size table


def ms(s: float) -> str:
    return f"{s * 1e3:9.2f} ms"


async def grpc_list(data_dir: Path, repeat: int, old_repeat: int) -> tuple[float, float, int]:
    import grpc

    from cdp_common.pb.cdp.v1 import restore_pb2_grpc as pgrpc
    from cdp_target.service import TargetService

    target = TargetService(data_dir, retention_override=NO_RETENTION)
    await target.open_existing()
    service = restore_service.RestoreService(target)
    server = grpc.aio.server(options=[("grpc.max_send_message_length", 64 << 20)])
    pgrpc.add_RestorePointsServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(
                f"127.0.0.1:{port}",
                options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
            stub = pgrpc.RestorePointsStub(ch)
            req = pb.ListPointsRequest(policy=POLICY)
            reply = await stub.List(req)  # warm up (opens the failover state once)
            count = len(reply.points)
            undo = target.policies[POLICY].local.undo

            async def timed(n: int) -> float:
                times = []
                for _ in range(n):
                    undo.catalog = fresh(undo.catalog)  # as after a delta: sizes not cached
                    t0 = time.perf_counter()
                    await stub.List(req)
                    times.append(time.perf_counter() - t0)
                return statistics.median(times)
            new = await timed(repeat)
            saved = restore_service.point_pb
            restore_service.point_pb = old_point_pb  # type: ignore[assignment]
            try:
                old = await timed(old_repeat)
            finally:
                restore_service.point_pb = saved
    finally:
        await server.stop(None)
        await target.close()
    return old, new, count


def main() -> None:
    ap = benchargs.parser(__doc__, 0)
    ap.add_argument("--points", type=int, default=7200)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--appends", type=int, default=200)
    ap.add_argument("--no-grpc", action="store_true")
    args = ap.parse_args()
    old_repeat = max(1, min(args.repeat, 3))  # the old listing takes seconds
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-catalog-") as tmp:
        data_dir = Path(tmp)
        pdir = data_dir / POLICY
        store = PolicyStore.open(pdir, {0: DiskSpec("vda", 1 << 30)}, apply=False)
        cat = build(args.points, time.time_ns())
        store.undo._save(cat, compact=True)
        store.close()
        n = len(cat.points)
        print(f"catalog: {n} points, {len(cat.segments)} segments, "
              f"{(pdir / 'points.log').stat().st_size} bytes of log, under {tmp}")

        # ---- List, in-process
        old_list = median_s(lambda: [old_point_pb(cat, p) for p in cat.points], old_repeat)
        new_list = median_s(lambda: (lambda c: [restore_service.point_pb(c, p)
                                                for p in c.points])(fresh(cat)), args.repeat)
        print(f"List in-process       old {ms(old_list)}   new {ms(new_list)}   "
              f"old/new {old_list / new_list:8.1f}x")

        # ---- List, through gRPC
        if not args.no_grpc:
            g_old, g_new, count = asyncio.run(grpc_list(data_dir, args.repeat, old_repeat))
            assert count == n, (count, n)
            print(f"List over gRPC        old {ms(g_old)}   new {ms(g_new)}   "
                  f"old/new {g_old / g_new:8.1f}x")

        # ---- one delta's catalog write
        undo = UndoStore(pdir, override=NO_RETENTION)
        undo.recover(0, 0)
        json_path = data_dir / "old-points.json"
        doc = undo.catalog.to_json()

        def rewrite() -> None:
            statefile.save(json_path, CATALOG_KIND, P.CATALOG_VERSION, doc)
        old_write = median_s(rewrite, args.appends)
        newest = undo.catalog.newest
        assert newest is not None
        seq, t = newest.last_seq, newest.time_ns
        times = []
        for _ in range(args.appends):
            t0 = time.perf_counter()
            undo.after_apply(seq, seq + 1, t + S, 12345)
            times.append(time.perf_counter() - t0)
            seq, t = seq + 1, t + S
        new_write = statistics.median(times)
        print(f"catalog write/delta   old {ms(old_write)}   new {ms(new_write)}   "
              f"old/new {old_write / new_write:8.1f}x   (full rewrite + 2 fsyncs vs "
              f"append + fdatasync, incl. the new after_apply)")

        before = undo.catalog
        after = before.with_applied(seq, seq + 1, t + S, 1)
        old_mem = median_s(lambda: [s for s in before.segments if s not in after.segments],
                           old_repeat)
        print(f"after_apply in memory old {ms(old_mem)}   (the old dropped-segment scan; "
              f"the new after_apply builds a 1-point patch)")

        # ---- a retention pass that drops the oldest short-term points (every delta,
        # in steady state): plan + diff + one appended record (no merge falls due)
        pts = undo.catalog.points
        undo.now_ns = lambda: pts[-1].time_ns
        keep_s = (pts[-1].time_ns - pts[4].time_ns) / S  # drops points 1..3 (0 is long-term)
        undo.override = {**NO_RETENTION, "short_term_retention_s": keep_s}
        records = undo.log.records
        t0 = time.perf_counter()
        plan = undo.retain({0: 1 << 30})
        retain_s = time.perf_counter() - t0
        assert len(undo.catalog.points) == len(pts) - 3 and not plan.merges
        print(f"retention pass        {ms(retain_s)}   (3 points dropped, "
              f"{undo.log.records - records} record appended)")

        # ---- opening: replay of the log
        log = CF.CatalogLog(pdir / "points.log")
        load = median_s(log.load, args.repeat)
        print(f"catalog load          {ms(load)}   ({log.records} records, "
              f"{log.size} bytes)")
        compact = median_s(lambda: log.compact(undo.catalog), args.repeat)
        print(f"compaction            {ms(compact)}   (tmp + fsync + rename + dir fsync)")


if __name__ == "__main__":
    main()
