"""Write benchmark: raw file vs bare FUSE passthrough vs the cdp filter, and
end-to-end replication throughput until durable at the target.

    sudo .venv/bin/python bench/bench_write.py [--size-mib 512] [--rand-seconds 10]

Prints one table; copy it into docs/PERFORMANCE.md with the command line.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


def aligned(size: int, fill: bytes | None = None) -> mmap.mmap:
    buf = mmap.mmap(-1, size)
    data = fill if fill is not None else random.randbytes(size)
    buf.write(data)
    return buf


def mixed_block(size: int) -> bytes:
    """Compressible-ish data: half random, half text (zstd ratio ~2-3)."""
    text = (b"cdp continuous data protection benchmark line %08d\n" * (size // 64 + 1))[: size // 2]
    return random.randbytes(size - len(text)) + text


def seq_write(path: str, total: int, block: int = MiB) -> float:
    buf = aligned(block, mixed_block(block))
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        start = time.perf_counter()
        for off in range(0, total, block):
            os.pwritev(fd, [buf], off)
        os.fsync(fd)
        return total / (time.perf_counter() - start) / 1e6
    finally:
        os.close(fd)


def rand_write(path: str, span: int, seconds: float, block: int = 4096,
               fill: bytes | None = None) -> tuple[float, float, float]:
    """4 KiB O_DIRECT writes at QD1 over [0, span) for `seconds`, of `fill` (default
    random bytes): (IOPS, p50 µs, p99 µs)."""
    buf = aligned(block, fill)
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    lat: list[float] = []
    blocks = span // block
    rng = random.Random(1)
    try:
        end = time.perf_counter() + seconds
        while True:
            off = rng.randrange(blocks) * block
            t0 = time.perf_counter()
            os.pwritev(fd, [buf], off)
            t1 = time.perf_counter()
            lat.append(t1 - t0)
            if t1 > end:
                break
    finally:
        os.close(fd)
    lat.sort()
    iops = len(lat) / sum(lat)
    return iops, statistics.median(lat) * 1e6, lat[int(len(lat) * 0.99)] * 1e6


def wait_mount(path: Path, timeout: float = 20) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if path.exists():
            return
        time.sleep(0.1)
    raise RuntimeError(f"{path} did not appear")


def cdpctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cdpctl", *args], capture_output=True,
                          text=True, check=False)


def policy_status(lab: Path) -> dict:
    out = cdpctl("status", "--lab-dir", str(lab), "--json")
    return json.loads(out.stdout)["policies"][0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=512, help="sequential bytes per target")
    ap.add_argument("--rand-seconds", type=float, default=10, help="duration of the 4 KiB run")
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir)")
    args = ap.parse_args()
    total = args.size_mib * MiB
    disk = max(total, 256 * MiB)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cdp-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, float]] = {}

    # 1. raw file
    raw = work / "raw.img"
    with open(raw, "wb") as f:
        f.truncate(disk)
    results["raw file"] = {"seq": seq_write(str(raw), total)}
    results["raw file"].update(zip(("iops", "p50", "p99"),
                                   rand_write(str(raw), disk, args.rand_seconds), strict=True))

    # 2. bare passthrough
    img = work / "pt.img"
    with open(img, "wb") as f:
        f.truncate(disk)
    mnt = work / "pt-mnt"
    mnt.mkdir(exist_ok=True)
    pt = subprocess.Popen([sys.executable, str(ROOT / "bench" / "passthrough.py"), str(img),
                           str(mnt)])
    try:
        wait_mount(mnt / "disk")
        target = str(mnt / "disk")
        results["bare pyfuse3 passthrough"] = {"seq": seq_write(target, total)}
        results["bare pyfuse3 passthrough"].update(
            zip(("iops", "p50", "p99"), rand_write(target, disk, args.rand_seconds), strict=True))
    finally:
        pt.terminate()
        pt.wait(10)

    # 3. the cdp filter in a full lab, and end-to-end until durable
    lab = work / "lab"
    size = f"{disk // MiB}M"
    up = cdpctl("lab", "up", "--dir", str(lab), "--disk-size", size)
    if up.returncode != 0:
        raise SystemExit(f"lab up failed: {up.stderr}")
    try:
        info = json.loads((lab / "lab.json").read_text())
        target = info["disks"][0]["path"]
        t0 = time.perf_counter()
        seq_mbs = seq_write(target, total)
        while True:
            st = policy_status(lab)
            if st["durable_seq"] >= st.get("captured_seq", 0) and st["durable_seq"] > 0:
                break
            time.sleep(0.05)
        e2e = total / (time.perf_counter() - t0) / 1e6
        results["cdp filter"] = {"seq": seq_mbs}
        results["cdp filter"].update(
            zip(("iops", "p50", "p99"), rand_write(target, disk, args.rand_seconds), strict=True))
        results["end-to-end durable"] = {"seq": e2e}
    finally:
        cdpctl("lab", "down", "--dir", str(lab))

    print(f"{'target':28} {'seq 1MiB MB/s':>14} {'4K IOPS':>9} {'p50 µs':>8} {'p99 µs':>8}")
    for name, r in results.items():
        print(f"{name:28} {r.get('seq', 0):14.1f} {r.get('iops', 0):9.0f} "
              f"{r.get('p50', 0):8.0f} {r.get('p99', 0):8.0f}")


if __name__ == "__main__":
    main()
