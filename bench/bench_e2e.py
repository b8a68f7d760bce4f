"""End-to-end replication benchmark: durable MB/s, CPU per MB, RPO lag.

    sudo .venv/bin/python bench/bench_e2e.py [--seconds 30] [--paced-seconds 30]
        [--paced-mbps 50] [--pin bench=0 --pin filter-1=1 ...] [--profile DIR]

Starts a five-process lab (`cdpctl lab up`, mutual TLS, FUSE) and runs two
phases against its disk (DESIGN.md section 7):

1. throughput: 1 MiB O_DIRECT writes of mixed compressible data (half
   random, half text; 32 distinct blocks cycled, so no frame repeats another
   inside zstd's window) as fast as the filter takes them, for `--seconds`,
   wrapping around the disk. Durable MB/s = bytes written / (time from the
   first write until the target reports the last captured seq durable). CPU
   per MB = utime + stime (from /proc/PID/stat) of the five lab processes,
   summed, over the same span, divided by the MB written. The writer's own
   CPU (mostly kernel time in the FUSE round trips) is shown separately.
2. paced: `--paced-mbps` MB/s in 1 MiB writes on a fixed schedule, for
   `--paced-seconds`; the coordinator's `GetStatus` is sampled every 200 ms
   (in process, no cdpctl fork per sample) and the RPO lag it reports
   (DESIGN section 4: now - capture time of the newest write in the newest
   durable restore point, 0 when caught up) gives p50 / p99 / max. The lag
   is the coordinator's view, so it includes up to one heartbeat (1 s) of
   report staleness, as an operator would see it. The first
   `--paced-warmup` seconds are reported apart: when writes resume after an
   idle spell, the coordinator's lag starts from the capture time of the
   last write *before* the idle spell (cdp_coordinator/state.py `rpo_lag`),
   a transient that says nothing about the sustained lag.

`--pin ID=CPUS` (repeatable) pins a lab process (its id in lab.json, all its
threads, `taskset -a -p`) or the benchmark writer (`bench`) to a CPU list.
`--profile DIR` runs `py-spy record` (raw collapsed stacks, 100 Hz) on every
lab process during the first `--profile-seconds` of phase 1 and prints the
hottest own-time frames per process; profiling costs CPU, so the throughput
of a profiled run is not a figure to record. `--json` prints the results as
one JSON document.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import mmap
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cdp_common.config import TlsConfig  # noqa: E402
from cdpctl.resolve import Coordinator  # noqa: E402
from cdpctl.status import fetch_status  # noqa: E402

MiB = 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")
SAMPLE_S = 0.2


def mixed_block(size: int, rng: random.Random) -> bytes:
    """Half random, half text (zstd level 1 ratio ~2 on the whole)."""
    line = b"cdp continuous data protection benchmark line %08d\n"
    text = b"".join(line % (rng.randrange(10**8)) for _ in range(size // 2 // 54 + 1))
    return rng.randbytes(size - size // 2) + text[: size // 2]


def block_pool(count: int, size: int = MiB) -> list[mmap.mmap]:
    rng = random.Random(42)
    pool = []
    for _ in range(count):
        buf = mmap.mmap(-1, size)  # page aligned, as O_DIRECT wants
        buf.write(mixed_block(size, rng))
        pool.append(buf)
    return pool


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5)


def cdpctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cdpctl", *args], capture_output=True,
                          text=True, check=False, cwd=ROOT)


class Status:
    """GetStatus of the lab's coordinator, in process."""

    def __init__(self, info: dict[str, Any]) -> None:
        coord = next(p for p in info["processes"] if p["id"] == "coordinator")
        tls = info["tls"]
        self.coord = Coordinator(coord["address"], TlsConfig(
            ca_file=tls["ca_file"], cert_file=tls["cert_file"], key_file=tls["key_file"]),
            "lab.json")

    def policy(self) -> dict[str, Any]:
        return fetch_status(self.coord)["policies"][0]


def wait_durable(status: Status, timeout_s: float = 300) -> float:
    """Wait until durable_seq >= captured_seq (> 0); returns the perf_counter time."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        st = status.policy()
        if st["durable_seq"] > 0 and st["durable_seq"] >= st["captured_seq"]:
            return time.perf_counter()
        time.sleep(0.05)
    raise SystemExit(f"not durable after {timeout_s:.0f}s: {status.policy()}")


def write_phase(path: str, disk_bytes: int, seconds: float, pool: list[mmap.mmap],
                mbps: float = 0.0, start_block: int = 0) -> tuple[int, float, int]:
    """1 MiB O_DIRECT writes for `seconds` (paced at `mbps` MB/s if > 0).

    Returns (bytes written, first-write perf_counter, next block index).
    fsync at the end, so the filter has captured (journaled) everything."""
    blocks = disk_bytes // MiB
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    n = start_block
    written = 0
    period = MiB / (mbps * 1e6) if mbps > 0 else 0.0
    try:
        t0 = time.perf_counter()
        end = t0 + seconds
        while True:
            now = time.perf_counter()
            if now >= end:
                break
            if period:
                due = t0 + (n - start_block) * period
                if due > now:
                    time.sleep(due - now)
            os.pwritev(fd, [pool[n % len(pool)]], (n % blocks) * MiB)
            n += 1
            written += MiB
        os.fsync(fd)
    finally:
        os.close(fd)
    return written, t0, n


def pin(info: dict[str, Any], specs: list[str]) -> None:
    pids = {p["id"]: int(p["pid"]) for p in info["processes"]}
    for spec in specs:
        who, _, cpus = spec.partition("=")
        if who == "bench":
            os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
            continue
        if who not in pids:
            raise SystemExit(f"--pin {spec}: no process {who!r} (have {', '.join(pids)})")
        subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(pids[who])], check=True,
                       capture_output=True)


PROFILE_SUFFIX = {"raw": ".txt", "flamegraph": ".svg"}


def start_profiles(info: dict[str, Any], out: Path, seconds: int,
                   fmt: str = "raw") -> list[subprocess.Popen[bytes]]:
    """`py-spy record` every lab process for `seconds` into OUT/ID.txt (raw collapsed
    stacks) or OUT/ID.svg (`fmt="flamegraph"`); both may run at once."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out.mkdir(parents=True, exist_ok=True)
    procs = []
    for p in info["processes"]:
        procs.append(subprocess.Popen(
            [spy, "record", "-p", str(p["pid"]), "-d", str(seconds), "-r", "100", "-f", fmt,
             "-o", str(out / f"{p['id']}{PROFILE_SUFFIX[fmt]}"), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


def top_frames(path: Path, n: int = 12) -> list[tuple[str, float]]:
    """Own-time share of the hottest leaf frames in a py-spy raw profile."""
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        leaf = stack.rsplit(";", 1)[-1]
        own[leaf] += int(count)
        total += int(count)
    return [(f, c / total) for f, c in own.most_common(n)] if total else []


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * q))] if s else 0.0


def paced_lag(status: Status, disk: str, disk_bytes: int, pool: list[mmap.mmap],
              seconds: float, mbps: float, warmup_s: float, start_block: int = 0,
              series: bool = False) -> dict[str, Any]:
    """`mbps` MB/s of 1 MiB writes for `seconds` while the coordinator's RPO lag is
    sampled every SAMPLE_S; the first `warmup_s` are reported apart (see the module
    docstring)."""
    lags: list[float] = []
    warm: list[float] = []
    stop = threading.Event()

    def sampler() -> None:
        nxt_t = time.monotonic()
        steady = nxt_t + warmup_s
        while not stop.is_set():
            with contextlib.suppress(Exception):  # a missed sample is not a result
                lag = float(status.policy()["rpo_lag_s"])
                (lags if time.monotonic() >= steady else warm).append(lag)
            nxt_t += SAMPLE_S
            stop.wait(max(0.0, nxt_t - time.monotonic()))

    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    try:
        pwritten, p0, _ = write_phase(disk, disk_bytes, seconds, pool, mbps=mbps,
                                      start_block=start_block)
        p1 = time.perf_counter()
    finally:
        stop.set()
        th.join()
    return {
        "target_mb_s": mbps,
        "achieved_mb_s": round(pwritten / 1e6 / (p1 - p0), 1),
        "samples": len(lags),
        "rpo_lag_p50_s": round(statistics.median(lags), 2) if lags else None,
        "rpo_lag_p99_s": round(percentile(lags, 0.99), 2),
        "rpo_lag_max_s": round(max(lags, default=0.0), 2),
        "warmup_s": warmup_s,
        "warmup_lag_max_s": round(max(warm, default=0.0), 2),
        "rpo_lag_series_s": [round(x, 2) for x in lags] if series else [],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=30, help="throughput phase length")
    ap.add_argument("--paced-seconds", type=float, default=30, help="paced phase length")
    ap.add_argument("--paced-mbps", type=float, default=50, help="paced write rate, MB/s")
    ap.add_argument("--paced-warmup", type=float, default=5,
                    help="seconds of the paced phase left out of the lag percentiles")
    ap.add_argument("--disk-mib", type=int, default=2048, help="lab disk size (writes wrap)")
    ap.add_argument("--pin", action="append", default=[], metavar="ID=CPUS",
                    help="pin a lab process (id from lab.json) or 'bench' to CPUs")
    ap.add_argument("--profile", metavar="DIR", help="py-spy every lab process into DIR")
    ap.add_argument("--profile-seconds", type=int, default=10)
    ap.add_argument("--workdir", help="scratch directory (default: a temp dir under /var/tmp)")
    ap.add_argument("--keep", action="store_true", help="leave the lab directory in place")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="cdp-bench-e2e-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    lab = work / "lab"
    pool = block_pool(32)
    up = cdpctl("lab", "up", "--dir", str(lab), "--disk-size", f"{args.disk_mib}M")
    if up.returncode != 0:
        raise SystemExit(f"lab up failed: {up.stderr}")
    results: dict[str, Any] = {"commit": subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
        text=True).stdout.strip()}
    try:
        info = json.loads((lab / "lab.json").read_text())
        pin(info, args.pin)
        status = Status(info)
        disk = info["disks"][0]["path"]
        disk_bytes = args.disk_mib * MiB
        pids = {p["id"]: int(p["pid"]) for p in info["processes"]}
        wait_durable_idle = time.monotonic() + 30
        while status.policy().get("source_proxy") == "" and time.monotonic() < wait_durable_idle:
            time.sleep(0.2)

        # ---- phase 1: throughput
        spies = (start_profiles(info, Path(args.profile), args.profile_seconds)
                 if args.profile else [])
        cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
        me0 = os.times()
        written, t0, nxt = write_phase(disk, disk_bytes, args.seconds, pool)
        t_written = time.perf_counter()
        me1 = os.times()
        t_durable = wait_durable(status)
        cpu1 = {k: cpu_seconds(p) for k, p in pids.items()}
        for s in spies:
            s.wait(60)
        mb = written / 1e6
        per = {k: cpu1[k] - cpu0[k] for k in pids}
        results["throughput"] = {
            "seconds_writing": round(t_written - t0, 2),
            "bytes": written,
            "capture_mb_s": round(mb / (t_written - t0), 1),
            "durable_mb_s": round(mb / (t_durable - t0), 1),
            "drain_s": round(t_durable - t_written, 2),
            "cpu_ms_per_mb": round(1000 * sum(per.values()) / mb, 2),
            "cpu_ms_per_mb_by_process": {k: round(1000 * v / mb, 2) for k, v in per.items()},
            "writer_cpu_ms_per_mb": round(
                1000 * (me1.user + me1.system - me0.user - me0.system) / mb, 2),
        }
        if args.profile:
            results["profile"] = {
                k: [(f, round(s, 3)) for f, s in top_frames(Path(args.profile) / f"{k}.txt")]
                for k in pids if (Path(args.profile) / f"{k}.txt").exists()}

        # ---- phase 2: paced, RPO lag
        results["paced"] = paced_lag(status, disk, disk_bytes, pool, args.paced_seconds,
                                     args.paced_mbps, args.paced_warmup, start_block=nxt,
                                     series=args.json)
        results["pinned"] = args.pin
    finally:
        cdpctl("lab", "down", "--dir", str(lab))
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    if args.json:
        print(json.dumps(results, indent=2))
        return
    t = results["throughput"]
    print(f"commit {results['commit']}  pinned {args.pin or 'no'}")
    print(f"throughput: {t['bytes'] / MiB:.0f} MiB in {t['seconds_writing']} s, capture "
          f"{t['capture_mb_s']} MB/s, durable {t['durable_mb_s']} MB/s "
          f"(drain {t['drain_s']} s)")
    print(f"CPU per MB, five processes: {t['cpu_ms_per_mb']} ms  "
          + "  ".join(f"{k} {v}" for k, v in t["cpu_ms_per_mb_by_process"].items())
          + f"  (writer {t['writer_cpu_ms_per_mb']})")
    p = results["paced"]
    print(f"paced {p['target_mb_s']} MB/s (achieved {p['achieved_mb_s']}): RPO lag p50 "
          f"{p['rpo_lag_p50_s']} s, p99 {p['rpo_lag_p99_s']} s, max {p['rpo_lag_max_s']} s "
          f"({p['samples']} samples after a {p['warmup_s']:g} s warm-up, whose max was "
          f"{p['warmup_lag_max_s']} s)")
    for proc, frames in results.get("profile", {}).items():
        print(f"profile {proc}:")
        for f, share in frames:
            print(f"  {share * 100:5.1f}%  {f}")


if __name__ == "__main__":
    main()
