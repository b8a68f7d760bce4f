"""Restore benchmark: time to write the image of a restore point of a 1 GiB disk
with many restore points behind it (goal: <= 1 s per GiB).

    .venv/bin/python bench/bench_restore.py [--dir /var/tmp] [--size-mib 1024] \
        [--fill-mib 768] [--points 200]

Builds a PolicyStore directly (no daemons): a first delta fills --fill-mib of
the disk with data, then --points deltas of 32 random 4 KiB..64 KiB writes
each; then restores the oldest, a middle and the newest point with
`cdp_target.restore.restore_images` (the code path of `cdpctl restore`) and
prints the seconds each took, the copy method and the per-GiB figure.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cdp_common.delta import Extent, encode_chunks
from cdp_target.restore import restore_images
from cdp_target.store import DiskSpec, PolicyStore

MiB = 1 << 20


def send(store: PolicyStore, first: int, last: int, extents: list[Extent]) -> None:
    store.begin(first, last)
    for chunk in encode_chunks(extents, 4 * MiB):
        store.add_chunk(chunk)
    store.commit(time.time_ns())
    store.apply_pending()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--fill-mib", type=int, default=768)
    ap.add_argument("--points", type=int, default=200)
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
            for blk in sorted(rng.sample(range(size // (64 * 1024)), 32)):
                n = rng.choice((4096, 16384, 65536))
                ext.append(Extent(0, blk * 65536, n, rng.randbytes(n)))
            seq += 1
            send(store, seq, seq, ext)
        built = time.monotonic() - t0
        cat = store.undo.catalog
        print(f"built {len(cat.points)} points, {cat.total_bytes() / MiB:.1f} MiB of undo, "
              f"in {built:.1f}s")
        print("| point | segments replayed | seconds | method | s per GiB of disk |")
        print("|---|---:|---:|---|---:|")
        for label, p in (("oldest", cat.points[0]), ("middle", cat.points[len(cat.points) // 2]),
                         ("newest", cat.points[-1])):
            out = root / f"out-{label}"
            t = time.monotonic()
            r = restore_images(store, lambda p=p: p, out)
            dt = time.monotonic() - t
            print(f"| {label} (seq {p.last_seq}) | {len(cat.segments_above(p))} | {dt:.3f} | "
                  f"{r.method} | {dt / (size / (1 << 30)):.3f} |")
            shutil.rmtree(out)
        store.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
