"""Restore benchmark: time to write the image of a restore point of a 1 GiB disk
with many restore points behind it (goal: <= 1 s per GiB).

    .venv/bin/python bench/bench_restore.py [--dir /var/tmp] [--size-mib 1024] \
        [--fill-mib 768] [--points 200] [--hot-mib 0] [--repeat 3] [--cold]

Builds a PolicyStore directly (no daemons): first deltas fill --fill-mib of
the disk with data, then --points deltas of 32 random 4 KiB..64 KiB writes
each (inside the first --hot-mib MiB when given: the same blocks are
overwritten again and again, so the undo behind an old point holds many
copies of them); then restores the oldest, a middle and the newest point with
`cdp_target.restore.restore_images` (the code path of `cdpctl restore`),
--repeat times each, and prints the median seconds, the copy method, the
bytes copied from the replica and written from undo, and the per-GiB figure.
--cold drops the store's own files (replica, undo segments) from the page
cache before each run (fsync + POSIX_FADV_DONTNEED), so every byte is read
from the disk.
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import benchargs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cdp_common.delta import Extent, encode_chunks
from cdp_target.points import Point
from cdp_target.restore import restore_images
from cdp_target.store import DiskSpec, PolicyStore

MiB = 1 << 20


def send(store: PolicyStore, first: int, last: int, extents: list[Extent]) -> None:
    store.begin(first, last)
    for chunk in encode_chunks(extents, 4 * MiB):
        store.add_chunk(chunk)
    store.commit(time.time_ns())
    store.apply_pending()


def drop_cache(directory: Path) -> None:
    """Write back and drop the page cache of the files under `directory` (ours only)."""
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def main() -> None:
    ap = benchargs.parser(__doc__, size_mib=1024)
    ap.add_argument("--fill-mib", type=int, default=768)
    ap.add_argument("--points", type=int, default=200)
    ap.add_argument("--hot-mib", type=int, default=0,
                    help="confine the random writes to the first N MiB (0: the whole disk)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cold", action="store_true",
                    help="drop the store's files from the page cache before each run")
    args = ap.parse_args()
    size = args.size_mib * MiB
    rng = random.Random(1)
    root = Path(tempfile.mkdtemp(prefix="cdp-bench-restore-", dir=args.dir))
    try:
        store = PolicyStore.open(root / "pol", {0: DiskSpec("disk0", size)}, apply=False)
        t0 = time.monotonic()
        block = rng.randbytes(4 * MiB)
        seq = 0
        for off in range(0, args.fill_mib * MiB, 64 * MiB):
            seq += 1
            send(store, seq, seq, [Extent(0, off + i, 4 * MiB, block)
                                   for i in range(0, 64 * MiB, 4 * MiB)])
        for _ in range(args.points):
            ext = []
            for blk in sorted(rng.sample(range((args.hot_mib * MiB or size) // (64 * 1024)), 32)):
                n = rng.choice((4096, 16384, 65536))
                ext.append(Extent(0, blk * 65536, n, rng.randbytes(n)))
            seq += 1
            send(store, seq, seq, ext)
        built = time.monotonic() - t0
        cat = store.undo.catalog
        print(f"built {len(cat.points)} points, {cat.total_bytes() / MiB:.1f} MiB of undo, "
              f"in {built:.1f}s")
        print(f"page cache: {'cold (dropped before each run)' if args.cold else 'warm'}; "
              f"median of {args.repeat} runs")
        print("| point | segments behind | seconds (median) | method | MiB copied from replica "
              "| MiB written from undo | s per GiB of disk |")
        print("|---|---:|---:|---|---:|---:|---:|")
        for label, p in (("oldest", cat.points[0]), ("middle", cat.points[len(cat.points) // 2]),
                         ("newest", cat.points[-1])):
            times = []
            for i in range(args.repeat):
                if args.cold:
                    drop_cache(root / "pol")
                out = root / f"out-{label}-{i}"
                phases: dict[str, int] = {}

                def note(phase: str, done: int, _total: int,
                         phases: dict[str, int] = phases) -> None:
                    phases[phase] = done

                def pick(p: Point = p) -> Point:
                    return p
                t = time.monotonic()
                r = restore_images(store, pick, out, note)
                times.append(time.monotonic() - t)
                shutil.rmtree(out)
            copied = phases.get("copy", 0)
            from_undo = phases.get("undo", copied) - copied
            dt = statistics.median(times)
            print(f"| {label} (seq {p.last_seq}) | {len(cat.segments_above(p))} | {dt:.3f} | "
                  f"{r.method} | {copied / MiB:.1f} | {from_undo / MiB:.1f} | "
                  f"{dt / (size / (1 << 30)):.3f} |")
        store.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
