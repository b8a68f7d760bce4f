"""cdp against its peers, side by side in one run on the same data (issue 14).

    sudo .venv/bin/python bench/bench_peers.py [--rounds 3] [--json FILE] [--profile DIR]
        [--sync-mib 1024]

Absolute figures differ several-fold between machines of one kind, so what
this prints are **ratios** of figures measured in the same run, on the same
bytes (1 MiB blocks, half random and half text, 32 distinct blocks cycled),
rounds interleaved (the order of the subjects rotates from round to round),
medians of the per-round ratios. Before each timed step `sync(2)` flushes
what the previous step left dirty.

Per round:

1. capture: `--seq-mib` of sequential 1 MiB O_DIRECT writes (then fsync) and
   `--rand-seconds` of 4 KiB O_DIRECT random writes at queue depth 1 (IOPS,
   per-write latency p50 / p99) to (a) a raw file, (b) a bare pyfuse3
   passthrough of a file (bench/passthrough.py), (c) the cdp filter's disk in a
   full five-process lab (`cdpctl lab up`, mTLS, FUSE) with replication
   running; the lab drains (applied at the target) after the sequential
   writes and after the 4 KiB ones, so each figure is of replication keeping
   up with that workload, not catching up with the previous one.
2. end to end, `--e2e-mib` each, first fill (a region of the disk never
   written before) then overwrite (the same region again):
   - cdp: written as fast as the filter takes them; durable MB/s = bytes /
     (first write -> the target's durable seq reaches the filter's captured
     seq, both read from the daemons' own metrics, not the coordinator's
     heartbeat-old view); CPU = utime + stime of the five lab processes from
     the first write until the target has *applied* it (the replica updated,
     as the C pipeline's dd has when it exits); the writer's CPU apart;
   - the C pipeline: `zstd -1 | openssl enc -aes-256-ctr | socat` over TCP
     (127.0.0.1) `| openssl enc -d | zstd -d | dd conv=fsync`, reading the
     same bytes from a tmpfs file into a new file (first fill) or over it
     (overwrite, conv=notrunc); durable MB/s = bytes / wall time until dd has
     fsynced and exited; CPU from wait4() of its seven processes.
   - disk bytes written per replicated byte, per process: write_bytes minus
     cancelled_write_bytes of /proc/PID/io (wait4's ru_oublock for the
     pipeline's processes), over the bytes the application wrote.
3. RPO lag: `--paced-mbps` MB/s for `--paced-seconds` into the lab, the
   coordinator's RPO lag sampled every 200 ms, the first `--paced-warmup` s
   left out (bench_e2e.py explains why).

The environment is printed with the figures (bench/benchenv.py): commit,
the lock file's sha256 and the key package versions, kernel, CPU model, and
the raw-disk figure of this very run.

`--profile DIR`: after the measured rounds, one more cdp overwrite with
`py-spy record` on every lab process (a flame graph DIR/ID.svg and raw
collapsed stacks DIR/ID.txt each) and the hottest own-time frames printed;
it is not counted in any figure. `--pin ID=CPUS` as in bench_e2e.py.
`--sync-mib N`: after the rounds, once, bench/bench_sync.py on an N MiB disk
(cdp's digest resync of 25 % changed regions against `rsync --inplace
--no-whole-file` of the same images, and the rates at which unchanged and
zero regions are passed over); not interleaved, so one figure, not a median.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchenv
from bench_e2e import (
    MiB,
    Status,
    block_pool,
    cdpctl,
    cpu_seconds,
    mixed_block,
    paced_lag,
    pin,
    start_profiles,
    top_frames,
)
from bench_write import rand_write, wait_mount

ROOT = Path(__file__).resolve().parent.parent
SUBJECTS = ("raw file", "bare passthrough", "cdp filter")
LAB_PROCS = ("filter-1", "source-proxy-1", "target-proxy-1", "target-1", "coordinator")
POLL_S = 0.02


# ---------------------------------------------------------------- measuring


def seq_fill(path: str, offset: int, nbytes: int, pool: list[Any]) -> float:
    """`nbytes` of 1 MiB O_DIRECT writes from `offset` (pool blocks in order), fsync; MB/s."""
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        t0 = time.perf_counter()
        for i in range(nbytes // MiB):
            os.pwritev(fd, [pool[i % len(pool)]], offset + i * MiB)
        os.fsync(fd)
        return nbytes / (time.perf_counter() - t0) / 1e6
    finally:
        os.close(fd)


def capture(path: str, span: int, pool: list[Any], rand_seconds: float,
            settle: Any = None) -> dict[str, float]:
    """Sequential then 4 KiB QD1; `settle()` runs between the two (the lab drains the
    sequential backlog, so the 4 KiB figure is of replication keeping up, not catching up)."""
    os.sync()
    seq = seq_fill(path, 0, span, pool)
    if settle:
        settle()
    os.sync()
    iops, p50, p99 = rand_write(path, span, rand_seconds,
                                fill=mixed_block(4096, random.Random(7)))
    return {"seq_mb_s": seq, "iops": iops, "p50_us": p50, "p99_us": p99}


def proc_io(pid: int) -> int:
    """Bytes this process caused to be written to storage (write_bytes - cancelled)."""
    fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(fields["write_bytes"]) - int(fields["cancelled_write_bytes"])


def metric(address: str, name: str) -> float:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name):
                return float(line.rsplit(" ", 1)[1])
    raise KeyError(f"{name} not served at {address}")


class Lab:
    """A `cdpctl lab up` lab, stopped on every exit path by `down()`."""

    def __init__(self, directory: Path, size_mib: int) -> None:
        self.dir = directory
        self.info: dict[str, Any] = {}
        up = cdpctl("lab", "up", "--dir", str(directory), "--disk-size", f"{size_mib}M")
        if up.returncode != 0:
            self.down()
            raise SystemExit(f"lab up failed: {up.stderr}")
        self.info = json.loads((directory / "lab.json").read_text())
        self.procs = {p["id"]: p for p in self.info["processes"]}
        self.pids = {k: int(p["pid"]) for k, p in self.procs.items()}
        self.disk = self.info["disks"][0]["path"]
        self.status = Status(self.info)
        deadline = time.monotonic() + 30
        while not self.status.policy().get("source_proxy") and time.monotonic() < deadline:
            time.sleep(0.2)

    def captured(self) -> int:
        return int(metric(self.procs["filter-1"]["metrics_address"], "cdp_filter_captured_seq"))

    def wait_target(self, what: str, seq: int, timeout_s: float = 300) -> float:
        """perf_counter time once the target's `what` ("durable"/"applied") seq >= seq."""
        addr = self.procs["target-1"]["metrics_address"]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if metric(addr, f"cdp_target_{what}_seq") >= seq:
                return time.perf_counter()
            time.sleep(POLL_S)
        raise SystemExit(f"target not {what} through seq {seq} after {timeout_s:.0f} s")

    def drain(self) -> None:
        self.wait_target("applied", self.captured())

    def down(self) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run([sys.executable, "-m", "cdpctl", "lab", "down", "--dir",
                            str(self.dir)], cwd=ROOT, capture_output=True, timeout=90,
                           check=False)
        for p in self.info.get("processes", []):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(p["pid"]), signal.SIGKILL)
        for f in self.info.get("filters", []):
            unmount(Path(f["mountpoint"]))


def unmount(mnt: Path) -> None:
    if any(line.split()[1] == str(mnt) for line in
           Path("/proc/self/mounts").read_text().splitlines()):
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, check=False)


def cdp_e2e(lab: Lab, offset: int, nbytes: int, pool: list[Any]) -> dict[str, Any]:
    os.sync()
    cpu0 = {k: cpu_seconds(p) for k, p in lab.pids.items()}
    io0 = {k: proc_io(p) for k, p in lab.pids.items()}
    me0 = os.times()
    t0 = time.perf_counter()
    capture_mb_s = seq_fill(lab.disk, offset, nbytes, pool)
    me1 = os.times()
    seq = lab.captured()
    t_durable = lab.wait_target("durable", seq)
    t_applied = lab.wait_target("applied", seq)
    cpu = {k: cpu_seconds(p) - cpu0[k] for k, p in lab.pids.items()}
    io = {k: (proc_io(p) - io0[k]) / nbytes for k, p in lab.pids.items()}
    mb = nbytes / 1e6
    return {
        "durable_mb_s": mb / (t_durable - t0),
        "applied_mb_s": mb / (t_applied - t0),
        "capture_mb_s": capture_mb_s,
        "cpu_ms_per_mb": 1000 * sum(cpu.values()) / mb,
        "cpu_ms_per_mb_by_process": {k: 1000 * v / mb for k, v in cpu.items()},
        "writer_cpu_ms_per_mb": 1000 * (me1.user + me1.system - me0.user - me0.system) / mb,
        "disk_bytes_per_byte_by_process": io,
        "disk_bytes_per_byte": sum(io.values()),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def chain(cmds: list[list[str]], stdin: Any = subprocess.DEVNULL) -> list[subprocess.Popen[bytes]]:
    """cmds[0] | cmds[1] | ..., each process's stdout the next one's stdin."""
    procs: list[subprocess.Popen[bytes]] = []
    for i, cmd in enumerate(cmds):
        last = i == len(cmds) - 1
        p = subprocess.Popen(cmd, stdin=procs[-1].stdout if procs else stdin,
                             stdout=subprocess.DEVNULL if last else subprocess.PIPE)
        if procs and procs[-1].stdout:
            procs[-1].stdout.close()  # the pipe now belongs to the two children
        procs.append(p)
    return procs


def c_pipeline(src: Path, dst: Path, overwrite: bool) -> dict[str, Any]:
    """The C pipeline of DESIGN §7 moving src to dst over TCP; rusage per process."""
    key, iv = secrets.token_hex(32), secrets.token_hex(16)
    port = free_port()
    if not overwrite:
        dst.unlink(missing_ok=True)
    conv = "fsync,notrunc" if overwrite else "fsync"
    receiver = [["socat", "-u", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr", "STDOUT"],
                ["openssl", "enc", "-d", "-aes-256-ctr", "-K", key, "-iv", iv],
                ["zstd", "-d", "-q", "-c"],
                ["dd", f"of={dst}", "bs=1M", "iflag=fullblock", f"conv={conv}", "status=none"]]
    sender = [["zstd", "-1", "-q", "-c", str(src)],
              ["openssl", "enc", "-aes-256-ctr", "-K", key, "-iv", iv],
              ["socat", "-u", "STDIN", f"TCP:127.0.0.1:{port},retry=200,interval=0.01"]]
    os.sync()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs += chain(receiver)
        t0 = time.perf_counter()
        procs += chain(sender)
        usage = {}
        for p, cmd in zip(procs, receiver + sender, strict=True):
            _, status, ru = os.wait4(p.pid, 0)
            p.returncode = os.waitstatus_to_exitcode(status)
            name = cmd[0] + (" -d" if "-d" in cmd else "")
            usage[f"{name} ({'recv' if cmd in receiver else 'send'})"] = ru
        t1 = time.perf_counter()
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                p.wait()
    bad = [f"{n}: {p.returncode}" for n, p in zip(usage, procs, strict=True) if p.returncode]
    nbytes = src.stat().st_size
    if bad or dst.stat().st_size != nbytes:
        raise SystemExit(f"C pipeline failed ({', '.join(bad)}; {dst.stat().st_size} bytes)")
    mb = nbytes / 1e6
    cpu = {k: ru.ru_utime + ru.ru_stime for k, ru in usage.items()}
    io = {k: ru.ru_oublock * 512 / nbytes for k, ru in usage.items()}  # oublock = write_bytes/512
    return {
        "durable_mb_s": mb / (t1 - t0),
        "cpu_ms_per_mb": 1000 * sum(cpu.values()) / mb,
        "cpu_ms_per_mb_by_process": {k: 1000 * v / mb for k, v in cpu.items()},
        "disk_bytes_per_byte_by_process": io,
        "disk_bytes_per_byte": sum(io.values()),
    }


# ---------------------------------------------------------------- the run


def rotate(seq: tuple[str, ...], r: int) -> list[str]:
    return list(seq[r % len(seq):] + seq[:r % len(seq)])


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    span = args.seq_mib * MiB
    e2e = args.e2e_mib * MiB
    pool = block_pool(32)
    src = Path(tempfile.mkdtemp(prefix="cdp-bench-peers-", dir="/dev/shm")) / "src.bin"
    with open(src, "wb") as f:
        for i in range(e2e // MiB):
            f.write(pool[i % len(pool)])
    raw = work / "raw.img"
    pt_img = work / "pt.img"
    for path in (raw, pt_img):
        with open(path, "wb") as f:
            f.truncate(span)
    pt_mnt = work / "pt-mnt"
    pt_mnt.mkdir()
    results: dict[str, Any] = {"rounds": []}
    pt = subprocess.Popen([sys.executable, str(ROOT / "bench" / "passthrough.py"), str(pt_img),
                           str(pt_mnt)])
    lab: Lab | None = None
    try:
        wait_mount(pt_mnt / "disk")
        # region [0, span) for capture and pacing, then one fresh e2e region per round
        lab = Lab(work / "lab", (span + args.rounds * e2e) // MiB)
        pin(lab.info, args.pin)
        paths = {"raw file": str(raw), "bare passthrough": str(pt_mnt / "disk"),
                 "cdp filter": lab.disk}
        for r in range(args.rounds):
            rd: dict[str, Any] = {"capture": {}, "e2e": {}}
            for subject in rotate(SUBJECTS, r):
                rd["capture"][subject] = capture(
                    paths[subject], span, pool, args.rand_seconds,
                    settle=lab.drain if subject == "cdp filter" else None)
                if subject == "cdp filter":
                    lab.drain()
                say(f"round {r + 1} capture {subject}: {fmt(rd['capture'][subject])}")
            offset = span + r * e2e
            steps = [("cdp", False), ("C pipeline", False), ("cdp", True), ("C pipeline", True)]
            if r % 2:
                steps = [steps[1], steps[0], steps[3], steps[2]]
            for who, over in steps:
                kind = "overwrite" if over else "first fill"
                res = (cdp_e2e(lab, offset, e2e, pool) if who == "cdp"
                       else c_pipeline(src, work / "pipe-dst.img", over))
                rd["e2e"][f"{who} {kind}"] = res
                say(f"round {r + 1} e2e {who} {kind}: {fmt(res)}")
            os.sync()
            rd["paced"] = paced_lag(lab.status, lab.disk, span, pool, args.paced_seconds,
                                    args.paced_mbps, args.paced_warmup)
            lab.drain()
            say(f"round {r + 1} paced: {fmt(rd['paced'])}")
            results["rounds"].append(rd)
        if args.profile:
            try:
                results["profile"] = profile_round(lab, Path(args.profile), span, e2e, pool,
                                                   args.profile_seconds)
            except Exception as e:  # a failed profile leaves the measured rounds standing
                say(f"profile failed: {e!r}")
    finally:
        if lab is not None:
            lab.down()
        pt.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            pt.wait(10)
        if pt.returncode is None:
            pt.kill()
        unmount(pt_mnt)
        src.unlink(missing_ok=True)
        src.parent.rmdir()
    return results


def profile_round(lab: Lab, out: Path, offset: int, nbytes: int, pool: list[Any],
                  seconds: int) -> dict[str, Any]:
    spies = (start_profiles(lab.info, out, seconds, "raw")
             + start_profiles(lab.info, out, seconds, "flamegraph"))
    time.sleep(0.5)  # py-spy attached before the first write
    res = cdp_e2e(lab, offset, nbytes, pool)
    for s in spies:
        s.wait(seconds + 60)
    say(f"profiled overwrite (not a figure): {fmt(res)}")
    return {k: [(f, round(share, 3)) for f, share in top_frames(out / f"{k}.txt")]
            for k in lab.pids if (out / f"{k}.txt").exists()}


def sync_vs_rsync(directory: str, size_mib: int) -> dict[str, Any]:
    """bench/bench_sync.py (its own labs; rsync on the same images), its JSON result."""
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_sync.py"), "--dir",
                           directory, "--size-mib", str(size_mib)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1200, check=False)
    text = done.stdout
    if done.returncode != 0 or "\n{\n" not in text:
        raise SystemExit(f"bench_sync.py failed ({done.returncode}): {done.stderr[-2000:]}")
    res: dict[str, Any] = json.loads(text[text.rindex("\n{\n") + 1:])
    say(f"sync vs rsync: {res}")
    return res


# ---------------------------------------------------------------- reporting


def med(values: list[float]) -> float:
    return statistics.median(values)


def span_of(values: list[float], spec: str) -> str:
    lo, hi = min(values), max(values)
    return f"{med(values):{spec}} ({lo:{spec}}..{hi:{spec}})"


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    rounds = results["rounds"]

    def cap(subject: str, key: str) -> list[float]:
        return [rd["capture"][subject][key] for rd in rounds]

    def e2e(step: str, key: str) -> list[float]:
        return [rd["e2e"][step][key] for rd in rounds]

    def per_round(f: Any) -> list[float]:
        return [f(rd) for rd in rounds]

    pt, cdp = "bare passthrough", "cdp filter"
    s: dict[str, Any] = {"ratios": {}}
    ratios = s["ratios"]
    ratios["capture seq / bare passthrough"] = per_round(
        lambda rd: rd["capture"][cdp]["seq_mb_s"] / rd["capture"][pt]["seq_mb_s"])
    ratios["capture 4 KiB QD1 IOPS / bare passthrough"] = per_round(
        lambda rd: rd["capture"][cdp]["iops"] / rd["capture"][pt]["iops"])
    ratios["added write latency p50, µs"] = per_round(
        lambda rd: rd["capture"][cdp]["p50_us"] - rd["capture"][pt]["p50_us"])
    ratios["added write latency p99, µs"] = per_round(
        lambda rd: rd["capture"][cdp]["p99_us"] - rd["capture"][pt]["p99_us"])
    for kind in ("first fill", "overwrite"):
        ratios[f"end-to-end durable MB/s / C pipeline, {kind}"] = per_round(
            lambda rd, k=kind: rd["e2e"][f"cdp {k}"]["durable_mb_s"]
            / rd["e2e"][f"C pipeline {k}"]["durable_mb_s"])
    for kind in ("first fill", "overwrite"):
        ratios[f"CPU per MB / C pipeline, {kind}"] = per_round(
            lambda rd, k=kind: rd["e2e"][f"cdp {k}"]["cpu_ms_per_mb"]
            / rd["e2e"][f"C pipeline {k}"]["cpu_ms_per_mb"])
    for kind in ("first fill", "overwrite"):
        ratios[f"target disk bytes written per replicated byte, {kind}"] = per_round(
            lambda rd, k=kind: rd["e2e"][f"cdp {k}"]["disk_bytes_per_byte_by_process"]
            ["target-1"])
    ratios["RPO lag p99 at paced rate, s"] = [rd["paced"]["rpo_lag_p99_s"] for rd in rounds]
    if "sync" in results:  # one run of bench_sync, not interleaved rounds
        sy = results["sync"]
        ratios["resync of 25 % changed regions, cdp s / rsync s (once)"] = [
            sy["seeding"]["sync_seconds"] / sy["rsync"]["seconds"]]
        ratios["unchanged regions compared, GB/s of disk (once)"] = [
            sy["unchanged"]["MBps"] / 1000]
        ratios["zero regions skipped, GB/s of disk (once)"] = [sy["all_zero"]["MBps"] / 1000]
    s["capture"] = {subj: {k: cap(subj, k) for k in ("seq_mb_s", "iops", "p50_us", "p99_us")}
                    for subj in SUBJECTS}
    steps = list(rounds[0]["e2e"])
    s["e2e"] = {st: {k: e2e(st, k) for k in ("durable_mb_s", "cpu_ms_per_mb",
                                            "disk_bytes_per_byte")} for st in steps}
    s["e2e_by_process"] = {
        st: {"cpu": {p: med([rd["e2e"][st]["cpu_ms_per_mb_by_process"][p] for rd in rounds])
                     for p in rounds[0]["e2e"][st]["cpu_ms_per_mb_by_process"]},
             "disk": {p: med([rd["e2e"][st]["disk_bytes_per_byte_by_process"][p]
                              for rd in rounds])
                      for p in rounds[0]["e2e"][st]["disk_bytes_per_byte_by_process"]}}
        for st in steps}
    s["raw disk seq MB/s"] = med(cap("raw file", "seq_mb_s"))
    return s


GOALS = {  # figure -> (the "now" at 01ea287, goal text, test on the median)
    "capture seq / bare passthrough": ("0.17", "≥ 0.6", lambda v: v >= 0.6),
    "capture 4 KiB QD1 IOPS / bare passthrough": ("0.28", "≥ 0.8", lambda v: v >= 0.8),
    "added write latency p50, µs": ("+198", "≤ +50", lambda v: v <= 50),
    "added write latency p99, µs": ("+953", "≤ +500", lambda v: v <= 500),
    "end-to-end durable MB/s / C pipeline, first fill": ("0.48-0.54", "≥ 1.0",
                                                         lambda v: v >= 1.0),
    "end-to-end durable MB/s / C pipeline, overwrite": ("0.48-0.54", "≥ 1.0",
                                                        lambda v: v >= 1.0),
    "CPU per MB / C pipeline, first fill": ("2.1-2.2x", "≤ 1.3x", lambda v: v <= 1.3),
    "CPU per MB / C pipeline, overwrite": ("2.1-2.2x", "≤ 1.3x", lambda v: v <= 1.3),
    "target disk bytes written per replicated byte, first fill": ("2.0", "-", None),
    "target disk bytes written per replicated byte, overwrite": ("3.0", "≤ 2.0",
                                                                 lambda v: v <= 2.0),
    "RPO lag p99 at paced rate, s": ("2.8-3.0", "≤ 2.5", lambda v: v <= 2.5),
    "resync of 25 % changed regions, cdp s / rsync s (once)": ("-", "< 1.0",
                                                               lambda v: v < 1.0),
    "unchanged regions compared, GB/s of disk (once)": ("-", "≥ 1.0", lambda v: v >= 1.0),
    "zero regions skipped, GB/s of disk (once)": ("-", "≥ 1.0", lambda v: v >= 1.0),
}


def report(env: dict[str, Any], s: dict[str, Any], args: argparse.Namespace,
           profile: dict[str, Any] | None) -> str:
    n = args.rounds
    out = [benchenv.markdown({**env, "raw disk, this run": f"{s['raw disk seq MB/s']:.0f} MB/s "
                              "seq 1 MiB O_DIRECT (median)"}), ""]
    out += [f"Ratios (median of {n} interleaved rounds, range in brackets):", "",
            "| figure | issue 14 at 01ea287 | this run | goal | met |",
            "|---|---:|---:|---:|---|"]
    for name, vals in s["ratios"].items():
        before, goal, test = GOALS[name]
        spec = ".0f" if "µs" in name else ".2f"
        sign = "+" if "µs" in name else ""
        met = "-" if test is None else ("yes" if test(med(vals)) else "**no**")
        out.append(f"| {name} | {before} | {sign}{span_of(vals, spec)} | {goal} | {met} |")
    out += ["", "On this machine, this day (medians; absolute figures only for scale):", "",
            "| capture | seq 1 MiB MB/s | 4 KiB QD1 IOPS | p50 µs | p99 µs |",
            "|---|---:|---:|---:|---:|"]
    for subj, c in s["capture"].items():
        out.append(f"| {subj} | {med(c['seq_mb_s']):.0f} | {med(c['iops']):,.0f} | "
                   f"{med(c['p50_us']):.0f} | {med(c['p99_us']):.0f} |")
    out += ["", f"| end to end, {args.e2e_mib} MiB | durable MB/s | CPU ms/MB | "
            "disk bytes written / byte |", "|---|---:|---:|---:|"]
    for st, e in s["e2e"].items():
        out.append(f"| {st} | {med(e['durable_mb_s']):.0f} | {med(e['cpu_ms_per_mb']):.1f} | "
                   f"{med(e['disk_bytes_per_byte']):.2f} |")
    out += ["", "Per process (medians), CPU ms/MB and disk bytes written per replicated byte:",
            ""]
    for st, e in s["e2e_by_process"].items():
        out.append(f"- {st}: " + ", ".join(
            f"{p} {e['cpu'][p]:.1f} ms / {e['disk'][p]:.2f}" for p in e["cpu"]))
    if profile:
        out += ["", "Profile (py-spy, own time, the profiled overwrite):"]
        for proc, frames in profile.items():
            out.append(f"- {proc}: " + "; ".join(f"{f} {share * 100:.0f}%"
                                                  for f, share in frames[:6]))
    return "\n".join(out)


def fmt(d: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in d.items() if isinstance(v, float | int))


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    ap.add_argument("--seq-mib", type=int, default=256,
                    help="sequential capture bytes, also the 4 KiB and paced span (default: 256)")
    ap.add_argument("--rand-seconds", type=float, default=4, help="4 KiB QD1 run (default: 4)")
    ap.add_argument("--e2e-mib", type=int, default=400, help="end-to-end bytes (default: 400)")
    ap.add_argument("--paced-seconds", type=float, default=20)
    ap.add_argument("--paced-mbps", type=float, default=50)
    ap.add_argument("--paced-warmup", type=float, default=5)
    ap.add_argument("--pin", action="append", default=[], metavar="ID=CPUS",
                    help="pin a lab process (id from lab.json) or 'bench' to CPUs")
    ap.add_argument("--profile", metavar="DIR",
                    help="after the rounds, py-spy one cdp overwrite into DIR (svg + raw)")
    ap.add_argument("--profile-seconds", type=int, default=12)
    ap.add_argument("--sync-mib", type=int, default=0, metavar="N",
                    help="after the rounds, bench_sync.py on an N MiB disk: cdp's resync of "
                         "25 %% changed regions against rsync (default 0: skipped)")
    ap.add_argument("--dir", default="/var/tmp", help="scratch directory (default: /var/tmp)")
    ap.add_argument("--json", metavar="FILE", help="also write every round's figures here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_peers needs root (FUSE mounts, /proc/PID/io of the daemons)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    env = benchenv.environment()
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="cdp-bench-peers-", dir=args.dir))
    try:
        results = run(args, work)
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)
    env["load average at end"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    env["runtime"] = f"{time.monotonic() - started:.0f} s"
    if args.sync_mib:
        results["sync"] = sync_vs_rsync(args.dir, args.sync_mib)
        env["runtime"] = f"{time.monotonic() - started:.0f} s"
    s = summarize(results)
    text = report(env, s, args, results.get("profile"))
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "args": vars(args), **results,
                                               "summary": s}, indent=1, default=str))


if __name__ == "__main__":
    main()
