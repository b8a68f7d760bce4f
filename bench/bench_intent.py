"""What power-loss protection (the write-intent bitmap, cdp_filter/intent.py) costs
the filter: the same lab, the filter restarted with `power_loss_protection` on
and off, rounds interleaved, medians and ratios.

    sudo .venv/bin/python bench/bench_intent.py [--size-mib 256] [--rounds 3]

Each round writes `--size-mib` sequentially in 1 MiB O_DIRECT writes to a
region never written before (every intent region is new: the worst case, one
bitmap fsync per region) and then runs 4 KiB QD1 random writes over the whole
disk for `--rand-seconds` (a fresh region per write at first).
"""

from __future__ import annotations

import json
import mmap
import os
import statistics
import sys
import tempfile
import time
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_write import MiB, cdpctl, mixed_block, rand_write
from benchargs import parser

from cdpctl import tomlw


def set_protection(lab: Path, on: bool) -> None:
    info = json.loads((lab / "lab.json").read_text())
    proc = next(p for p in info["processes"] if p["id"] == "filter-1")
    os.kill(int(proc["pid"]), 15)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(int(proc["pid"]), 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    path = Path(proc["config"])
    doc = tomllib.loads(path.read_text())
    doc["filter"]["power_loss_protection"] = on
    path.write_text(tomlw.dumps(doc))
    done = cdpctl("lab", "restart", "--dir", str(lab), "filter-1")
    if done.returncode != 0:
        raise SystemExit(f"lab restart failed: {done.stderr}")


def main() -> None:
    ap = parser(__doc__, 256)
    ap.add_argument("--rounds", type=int, default=3, help="rounds per setting (default: 3)")
    ap.add_argument("--rand-seconds", type=float, default=5.0,
                    help="duration of each 4 KiB run (default: 5)")
    args = ap.parse_args()
    size = args.size_mib * MiB
    rounds = args.rounds
    work = Path(tempfile.mkdtemp(prefix="cdp-bench-intent-", dir=args.dir))
    lab = work / "lab"
    disk = 2 * rounds * size + 64 * MiB
    up = cdpctl("lab", "up", "--dir", str(lab), "--disk-size", f"{disk // MiB}M")
    if up.returncode != 0:
        raise SystemExit(f"lab up failed: {up.stderr}")
    results: dict[bool, dict[str, list[float]]] = {
        True: {"seq": [], "iops": [], "p50": [], "p99": []},
        False: {"seq": [], "iops": [], "p50": [], "p99": []}}
    try:
        path = json.loads((lab / "lab.json").read_text())["disks"][0]["path"]
        offset = 0
        for r in range(rounds):
            for on in ((True, False) if r % 2 == 0 else (False, True)):
                set_protection(lab, on)
                time.sleep(1)
                res = results[on]
                # a fresh range each time: every region new, as on a first fill
                res["seq"].append(seq_write_at(path, offset, size))
                offset += size
                iops, p50, p99 = rand_write(path, disk, args.rand_seconds)
                res["iops"].append(iops)
                res["p50"].append(p50)
                res["p99"].append(p99)
    finally:
        cdpctl("lab", "down", "--dir", str(lab))
    med = {on: {k: statistics.median(v) for k, v in r.items()} for on, r in results.items()}
    print(f"{'filter':34} {'seq 1MiB MB/s':>14} {'4K IOPS':>9} {'p50 µs':>8} {'p99 µs':>8}")
    for on, label in ((False, "power_loss_protection = false"),
                      (True, "power_loss_protection = true")):
        m = med[on]
        print(f"{label:34} {m['seq']:14.1f} {m['iops']:9.0f} {m['p50']:8.0f} {m['p99']:8.0f}")
    on, off = med[True], med[False]
    print(f"{'ratio on/off':34} {on['seq'] / off['seq']:14.2f} {on['iops'] / off['iops']:9.2f} "
          f"{on['p50'] / off['p50']:8.2f} {on['p99'] / off['p99']:8.2f}")
    print(f"({rounds} rounds per setting, interleaved; medians; {args.size_mib} MiB "
          f"sequential per round, {args.rand_seconds:g} s of 4 KiB writes)")


def seq_write_at(path: str, offset: int, total: int) -> float:
    """bench_write.seq_write from `offset` on (a range not written before)."""
    block = MiB
    buf = mmap.mmap(-1, block)
    buf.write(mixed_block(block))
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        start = time.perf_counter()
        for off in range(offset, offset + total, block):
            os.pwritev(fd, [buf], off)
        os.fsync(fd)
        return total / (time.perf_counter() - start) / 1e6
    finally:
        os.close(fd)


if __name__ == "__main__":
    main()
