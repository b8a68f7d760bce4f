"""Initial-sync benchmark: digest sync of a 2 GiB image with 25 % changed regions,
against `rsync --inplace --no-whole-file` of the same images on the same machine,
plus the rate at which unchanged and all-zero regions are skipped.

    .venv/bin/python bench/bench_sync.py [--dir /var/tmp] [--size-mib 2048] \
        [--changed 0.25] [--skip-rsync]

Runs a real lab (`cdpctl lab up`: five daemons, mTLS, FUSE) with one disk:

1. seeding: the filter's image is filled with data (half random, half
   compressible text), copied to the target's replica, then 25 % of its 1 MiB
   regions are overwritten with new random data; the filter starts as if new
   (its first welcome decides an initial sync). Timed from the filter's start
   to the sync being done (GAP_END durable at the target), with the bytes the
   target made durable;
2. unchanged: `cdpctl sync` on the now-equal disks (every region read and
   hashed on both sides, nothing sent): the comparison's rate;
3. all-zero: a second lab whose disk and replica are empty (sparse), synced
   by `cdpctl sync`: the rate at which hole regions are skipped;
4. rsync: the same old replica and new image as plain files,
   `rsync --inplace --no-whole-file NEW OLD` (local copy, delta algorithm on),
   timed, then checked equal.

Figures: seconds, MB/s of disk covered, bytes sent. Caches are dropped
(`echo 3 > /proc/sys/vm/drop_caches`) before each timed step.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import benchargs

ROOT = Path(__file__).resolve().parent.parent
PY = str(ROOT / ".venv" / "bin" / "python")
MiB = 1 << 20
REGION = MiB


def cdpctl(*args: str, check: bool = True,
           timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "cdpctl", *args], cwd=ROOT, capture_output=True, text=True,
                          check=check, timeout=timeout)


def drop_caches() -> None:
    os.sync()
    with contextlib.suppress(OSError), open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


class Lab:
    def __init__(self, directory: Path, size_mib: int) -> None:
        self.dir = directory
        cdpctl("lab", "up", "--dir", str(directory), "--disk-size", f"{size_mib}M", timeout=180)
        self.info = json.loads((directory / "lab.json").read_text())

    def proc(self, node: str) -> dict[str, Any]:
        return next(p for p in self.info["processes"] if p["id"] == node)

    def stop(self, node: str) -> None:
        pid = int(self.proc(node)["pid"])
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        raise SystemExit(f"{node} did not stop")

    def start(self, node: str) -> None:
        cdpctl("lab", "restart", "--dir", str(self.dir), node, timeout=180)
        self.info = json.loads((self.dir / "lab.json").read_text())

    def policy(self) -> dict[str, Any]:
        out = cdpctl("status", "--json", "--lab-dir", str(self.dir))
        return dict(json.loads(out.stdout)["policies"][0])

    def filter_data(self) -> Path:
        text = Path(self.proc("filter-1")["config"]).read_text()
        m = re.search(r'data_dir = "([^"]+)"', text.split("[filter]")[1])
        assert m is not None
        return Path(m.group(1))

    def wait_done(self, done_id: int = 0, timeout_s: float = 1800) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            p = self.policy()
            ok = p["sync_done_id"] >= done_id if done_id else p["sync_done_id"] > 0
            if ok and not p["sync_phase"] and p["durable_seq"] == p["captured_seq"]:
                return p
            time.sleep(0.1)
        raise SystemExit("sync did not finish")

    def down(self) -> None:
        cdpctl("lab", "down", "--dir", str(self.dir), check=False, timeout=120)


def fill(path: Path, size: int, rng: random.Random) -> None:
    line = b"cdp bench line lorem ipsum dolor sit amet 0123456789\n"
    text = (line * (REGION // len(line) + 1))[:REGION]
    with open(path, "r+b") as f:
        for r in range(size // REGION):
            f.seek(r * REGION)
            f.write(rng.randbytes(REGION) if r % 2 else text)


def change(path: Path, size: int, share: float, rng: random.Random) -> int:
    regions = rng.sample(range(size // REGION), int(size // REGION * share))
    with open(path, "r+b") as f:
        for r in regions:
            f.seek(r * REGION)
            f.write(rng.randbytes(REGION))
    return len(regions) * REGION


def log_span(log: str, start: str, end: str) -> float:
    """Seconds between the last line containing `start` and the next containing `end`."""
    def ts(line: str) -> float:
        t = time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")
        return time.mktime(t) + int(line[20:23]) / 1000
    lines = log.splitlines()
    i = max(k for k, line in enumerate(lines) if start in line)
    j = next(k for k in range(i, len(lines)) if end in lines[k])
    return ts(lines[j]) - ts(lines[i])


def operator_sync(lab: Lab) -> tuple[float, dict[str, Any]]:
    drop_caches()
    out = cdpctl("sync", "lab", "--json", "--lab-dir", str(lab.dir))
    rid = int(json.loads(out.stdout)["sync_request_id"])
    p = lab.wait_done(rid)
    log = Path(lab.proc("filter-1")["log"]).read_text()
    return log_span(log, f"sync {rid} requested", "digest comparison done"), p


def main() -> None:
    ap = benchargs.parser(__doc__, size_mib=2048)
    ap.add_argument("--changed", type=float, default=0.25)
    ap.add_argument("--skip-rsync", action="store_true")
    args = ap.parse_args()
    size = args.size_mib * MiB
    rng = random.Random(1)
    work = Path(tempfile.mkdtemp(prefix="bench-sync-", dir=args.dir))
    results: dict[str, Any] = {"size_bytes": size, "changed_share": args.changed}
    lab = Lab(work / "lab", args.size_mib)
    try:
        image = Path(lab.info["disks"][0]["image"])
        replica = Path(lab.info["disks"][0]["replica_path"])
        lab.stop("filter-1")
        lab.stop("target-1")
        fill(image, size, rng)
        shutil.copyfile(image, replica)
        old = work / "old.img"
        shutil.copyfile(replica, old)
        changed = change(image, size, args.changed, rng)
        (lab.filter_data() / "dirty" / "lab" / "sync.json").unlink()
        lab.start("target-1")
        drop_caches()
        t0 = time.monotonic()
        lab.start("filter-1")
        p = lab.wait_done()
        seeding_s = time.monotonic() - t0
        assert sha(image) == sha(replica), "replica differs after the sync"
        log = Path(lab.proc("filter-1")["log"]).read_text()
        sync_s = log_span(log, "initial sync by digests", ") done:")
        cmp_only = log_span(log, "initial sync by digests", "digest comparison done")
        results["seeding"] = {"seconds_from_filter_start": round(seeding_s, 2),
                              "sync_seconds": round(sync_s, 2),
                              "compare_seconds": round(cmp_only, 2),
                              "disk_MBps": round(size / sync_s / 1e6, 1),
                              "changed_bytes": changed,
                              "changed_MBps": round(changed / (sync_s - cmp_only) / 1e6, 1),
                              "bytes_replicated": p["bytes_replicated"]}
        print("seeding:", results["seeding"], flush=True)
        cmp_s, p = operator_sync(lab)
        results["unchanged"] = {"compare_seconds": round(cmp_s, 2),
                                "MBps": round(size / cmp_s / 1e6, 1)}
        print("unchanged:", results["unchanged"], flush=True)
        if not args.skip_rsync:
            new = work / "new.img"
            shutil.copyfile(image, new)
            drop_caches()
            t0 = time.monotonic()
            done = subprocess.run(["rsync", "--inplace", "--no-whole-file", "--stats",
                                   str(new), str(old)], capture_output=True, text=True,
                                  check=True)
            rsync_s = time.monotonic() - t0
            assert sha(new) == sha(old)
            m = re.search(r"Literal data: ([\d,]+)", done.stdout)
            results["rsync"] = {"seconds": round(rsync_s, 2),
                                "disk_MBps": round(size / rsync_s / 1e6, 1),
                                "literal_bytes": int(m.group(1).replace(",", "")) if m else -1}
            print("rsync:", results["rsync"], flush=True)
            new.unlink()
        old.unlink()
    finally:
        lab.down()
    zlab = Lab(work / "zlab", args.size_mib)
    try:
        cmp_s, _ = operator_sync(zlab)
        results["all_zero"] = {"compare_seconds": round(cmp_s, 3),
                               "MBps": round(size / max(cmp_s, 1e-3) / 1e6, 1)}
        print("all-zero:", results["all_zero"], flush=True)
    finally:
        zlab.down()
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
