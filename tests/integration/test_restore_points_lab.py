"""Restore points through the real lab (five daemons, FUSE, two disks, mutual TLS).

A writer issues random overlapping O_DIRECT writes to both disks of one
policy; one pwrite is one FUSE write, so the filter gives it the next seq and
the oracle is the list of (seq, disk, offset, data). Every restore point the
target lists must restore, through `cdpctl restore`, to the oracle's prefix
image at its last_seq: base + every write with seq <= last_seq (I2), on both
disks at once (one consistency group). Then a short retention is switched on:
expired points disappear, their undo space returns, long-term points are
compacted and still restore exactly. Failover, undo and commit run from the
CLI against the running lab.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import mmap
import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_eventually
from workload import MiB, sha256_file

pytestmark = pytest.mark.timeout(120)

DISK = 16 * MiB
BLOCK = 4096


class Oracle:
    """Writes in seq order; prefix images on demand."""

    def __init__(self, disks: int) -> None:
        self.writes: list[tuple[int, int, int, bytes]] = []   # (seq, disk, offset, data)
        self.disks = disks

    def images_at(self, last_seq: int) -> list[bytearray]:
        imgs = [bytearray(DISK) for _ in range(self.disks)]
        for seq, disk, off, data in self.writes:
            if seq > last_seq:
                break
            imgs[disk][off:off + len(data)] = data
        return imgs

    def shas_at(self, seqs: list[int]) -> dict[int, list[str]]:
        """sha256 of every disk at each seq, in one pass over the writes."""
        imgs = [bytearray(DISK) for _ in range(self.disks)]
        out: dict[int, list[str]] = {}
        i = 0
        for target in sorted(seqs):
            while i < len(self.writes) and self.writes[i][0] <= target:
                _, disk, off, data = self.writes[i]
                imgs[disk][off:off + len(data)] = data
                i += 1
            out[target] = [hashlib.sha256(img).hexdigest() for img in imgs]
        return out


class Writer(threading.Thread):
    """Random overlapping O_DIRECT writes over every disk, one seq each."""

    def __init__(self, paths: list[Path], oracle: Oracle, seconds: float, seed: int = 5,
                 pause_s: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.paths, self.oracle, self.seconds = paths, oracle, seconds
        self.rng = random.Random(seed)
        self.pause_s = pause_s
        self.error: BaseException | None = None
        self.seq = oracle.writes[-1][0] if oracle.writes else 0
        self.stop = threading.Event()

    def run(self) -> None:
        fds = [os.open(p, os.O_RDWR | os.O_DIRECT) for p in self.paths]
        buf = mmap.mmap(-1, 64 * 1024)
        try:
            end = time.monotonic() + self.seconds
            while time.monotonic() < end and not self.stop.is_set():
                disk = self.rng.randrange(len(fds))
                blocks = self.rng.choice((1, 1, 2, 4, 16))
                # a small hot region makes writes overlap across points
                off = self.rng.randrange(0, 512 - blocks) * BLOCK
                if self.rng.random() < 0.3:
                    off = self.rng.randrange(0, DISK // BLOCK - blocks) * BLOCK
                data = (self.rng.randbytes(blocks * BLOCK) if self.rng.random() < 0.8
                        else bytes(blocks * BLOCK))
                buf[:len(data)] = data
                n = os.pwrite(fds[disk], memoryview(buf)[:len(data)], off)
                assert n == len(data)
                self.seq += 1
                self.oracle.writes.append((self.seq, disk, off, data))
                time.sleep(self.pause_s)
            for fd in fds:
                os.fsync(fd)
        except BaseException as exc:  # surfaced by the test
            self.error = exc
        finally:
            for fd in fds:
                os.close(fd)
            buf.close()


def points(handle: Any) -> list[dict[str, Any]]:
    done = handle.cli("restore-points", "lab", "--json", check=True)
    return list(json.loads(done.stdout))


def caught_up(handle: Any, seq: int) -> None:
    def check() -> None:
        p = handle.status()["policies"][0]
        assert p["captured_seq"] == seq, p
        assert p["durable_seq"] == p["applied_seq"] == seq, p
    assert_eventually(check, 60, 0.5, f"seq {seq} was not applied at the target")


def restore_and_compare(handle: Any, tmp: Path, pts: list[dict[str, Any]],
                        oracle: Oracle) -> None:
    """`cdpctl restore` of every point (a few CLI processes at a time), each image
    compared byte for byte with the oracle's prefix image at its last_seq."""
    def restore(p: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        out = Path(handle.info["restore_dir"]) / f"restore-{p['id']}-{time.monotonic_ns()}"
        done = handle.cli("restore", "lab", "--point", str(p["id"]), "--out", str(out),
                          "--json", check=True)
        return p, json.loads(done.stdout)

    ordered = sorted(pts, key=lambda p: p["last_seq"])
    imgs = [bytearray(DISK) for _ in range(oracle.disks)]
    i = 0
    with ThreadPoolExecutor(max_workers=3) as pool:
        for p, doc in pool.map(restore, ordered):
            assert doc["point"]["last_seq"] == p["last_seq"]
            while i < len(oracle.writes) and oracle.writes[i][0] <= p["last_seq"]:
                _, disk, off, data = oracle.writes[i]
                imgs[disk][off:off + len(data)] = data
                i += 1
            for disk, img in enumerate(sorted(doc["images"], key=lambda i: i["disk"])):
                got = Path(img["path"]).read_bytes()
                assert got == imgs[disk], (
                    f"point {p['id']} (seq {p['last_seq']}), disk {img['disk']} differs from "
                    f"the oracle prefix image")
                os.unlink(img["path"])


def undo_segments(handle: Any) -> list[tuple[int, int]]:
    """(lo, hi] of every undo segment file (docs/FORMAT.md 4a names)."""
    d = Path(handle.disks[0]["replica_path"]).parent.parent / "undo"
    out = []
    for p in d.glob("*.undo"):
        lo, hi = p.stem.split("-")
        out.append((int(lo), int(hi)))
    return sorted(out)


def undo_bytes(handle: Any) -> int:
    d = Path(handle.disks[0]["replica_path"]).parent.parent / "undo"
    return sum(p.stat().st_blocks * 512 for p in d.iterdir())


def set_target_retention(handle: Any, **values: float) -> None:
    proc = handle.process("target-1")
    config = Path(proc["config"])
    handle.kill("target-1", signal.SIGTERM)
    text = config.read_text()
    extra = "".join(f"{k} = {v}\n" for k, v in values.items())
    config.write_text(text.replace("[target]\n", "[target]\n" + extra, 1))
    handle.restart("target-1")


RPO_S = 0.3
"""The policy's RPO interval in this test: 20+ points from ~7 s of writes."""


class Clock:
    """Phase timings, printed at the end (pytest -s) to keep the test's budget visible."""

    def __init__(self) -> None:
        self.t0 = self.last = time.monotonic()
        self.phases: list[tuple[str, float]] = []

    def lap(self, what: str) -> None:
        now = time.monotonic()
        self.phases.append((what, now - self.last))
        self.last = now

    def report(self) -> str:
        return ", ".join(f"{w} {dt:.1f}s" for w, dt in self.phases) + (
            f"; total {time.monotonic() - self.t0:.1f}s")


def shorten_rpo(handle: Any, seconds: float) -> None:
    """`cdpctl policy edit` pushes the new interval to the nodes at once."""
    handle.cli("policy", "edit", "lab", "--set", f"rpo_interval_s={seconds}", "--json",
               check=True)

    def pushed() -> None:
        p = handle.status()["policies"][0]
        assert p["rpo_interval_s"] == seconds, p
    assert_eventually(pushed, 30, 0.2, "the shorter RPO interval was not taken up")


def test_points_restore_to_the_oracle_and_retention_frees_space(lab: Any,
                                                                tmp_path: Path) -> None:
    clock = Clock()
    handle = lab(tmp_path / "lab", disks=2, disk_size="16M")
    shorten_rpo(handle, RPO_S)
    clock.lap("lab up")
    oracle = Oracle(2)
    writer = Writer([handle.disk_path(0), handle.disk_path(1)], oracle, seconds=60)
    writer.start()

    def enough() -> None:
        assert writer.is_alive() and len(points(handle)) >= 22
    try:
        assert_eventually(enough, 50, 0.5, "fewer than 22 restore points after 50 s of writes")
    finally:
        writer.stop.set()
        writer.join(60)
    assert writer.error is None, writer.error
    caught_up(handle, writer.seq)
    clock.lap("writes")
    pts = points(handle)
    assert len(pts) >= 20, pts
    assert [p["last_seq"] for p in pts] == sorted(p["last_seq"] for p in pts)
    assert pts[-1]["last_seq"] == writer.seq
    assert {"id", "kind", "time", "last_seq", "size_bytes"} <= set(pts[0])
    gaps = [b["time"] > a["time"] for a, b in itertools.pairwise(pts)]
    assert all(gaps)
    restore_and_compare(handle, tmp_path, pts, oracle)
    clock.lap(f"{len(pts)} restores")

    # short retention: expired points go, their space returns; long-term points
    # survive with compacted undo and still restore exactly
    before = undo_bytes(handle)
    set_target_retention(handle, short_term_retention_s=4.0, long_term_interval_s=3.0,
                         long_term_retention_s=3600.0)

    def trimmed() -> list[dict[str, Any]]:
        now = points(handle)
        assert len(now) < len(pts), now
        assert {p["kind"] for p in now[:-1]} == {"long"}, now   # short ones expired
        return now
    kept = assert_eventually(trimmed, 30, 0.5, "retention did not drop the short-term points")
    assert len(kept) >= 3, kept
    assert undo_bytes(handle) < before
    assert {p["id"] for p in kept} <= {p["id"] for p in pts}
    # compacted: some segment now spans dropped points (oldest data won the merge)
    dropped = {p["last_seq"] for p in pts} - {p["last_seq"] for p in kept}
    assert any(lo < seq < hi for lo, hi in undo_segments(handle) for seq in dropped), (
        undo_segments(handle), kept)
    restore_and_compare(handle, tmp_path, kept, oracle)
    clock.lap(f"retention + {len(kept)} restores")

    # new writes after the compaction: old long-term points still restore exactly
    writer2 = Writer([handle.disk_path(0), handle.disk_path(1)], oracle, seconds=4 * RPO_S,
                     seed=9)
    writer2.start()
    writer2.join(60)
    assert writer2.error is None, writer2.error
    caught_up(handle, writer2.seq)
    now = points(handle)
    old = [p for p in now if p["last_seq"] <= kept[-1]["last_seq"]]
    assert old, now
    restore_and_compare(handle, tmp_path, [*old, now[-1]], oracle)
    clock.lap(f"more writes + {len(old) + 1} restores")

    # on demand: a long-term point that survives the short retention
    done = handle.cli("restore-points", "create", "lab", "--json", check=True)
    created = json.loads(done.stdout)
    assert created["last_seq"] == writer2.seq
    latest = [p for p in points(handle) if p["id"] == created["id"]]
    assert latest and latest[0]["kind"] == "long"
    clock.lap("on-demand point")
    print(f"\ntiming: {clock.report()}")


def test_failover_undo_and_commit_from_the_cli(lab: Any, tmp_path: Path) -> None:
    handle = lab(tmp_path / "lab", disks=2, disk_size="16M")
    shorten_rpo(handle, RPO_S)
    oracle = Oracle(2)
    disks = [handle.disk_path(0), handle.disk_path(1)]
    w = Writer(disks, oracle, seconds=8 * RPO_S)
    w.start()
    w.join(60)
    assert w.error is None, w.error
    caught_up(handle, w.seq)
    pts = points(handle)
    assert len(pts) >= 3, pts
    chosen = pts[len(pts) // 2]

    done = handle.cli("failover", "lab", "--point", str(chosen["id"]), "--json", check=True)
    doc = json.loads(done.stdout)
    assert doc["state"] == "active" and doc["point"]["id"] == chosen["id"]
    assert doc["point"]["consistent"] is True, doc   # computed by the target: no gap here
    shas = oracle.shas_at([chosen["last_seq"]])[chosen["last_seq"]]
    images = sorted(doc["images"], key=lambda i: i["disk"])
    for disk, img in enumerate(images):
        assert sha256_file(img["path"]) == shas[disk]
    # replication is stopped: the source keeps capturing, the target refuses
    w2 = Writer(disks, oracle, seconds=3, seed=21)
    w2.start()
    w2.join(60)
    assert w2.error is None

    def refused() -> None:
        p = handle.status()["policies"][0]
        assert p["captured_seq"] == w2.seq, p
        assert p["durable_seq"] == w.seq, p
        assert "failed over" in p["reason"], p
    assert_eventually(refused, 30, 0.5, "the failed-over policy was not refused")
    again = handle.cli("failover", "lab")
    assert again.returncode == 2 and "already failed over" in again.stderr

    # undo: images gone, replication resumes from the durable seq
    done = handle.cli("failover", "undo", "lab", "--json", check=True)
    assert json.loads(done.stdout)["state"] == "none"
    assert not any(Path(i["path"]).exists() for i in images)
    caught_up(handle, w2.seq)
    replica = [Path(d["replica_path"]) for d in handle.disks]
    final = oracle.shas_at([w2.seq])[w2.seq]
    assert [sha256_file(r) for r in replica] == final

    # failover again, write on the failover disk, commit: that is the replica now
    done = handle.cli("failover", "lab", "--latest", "--json")
    assert done.returncode == 64   # --latest is the default of failover, not an option
    done = handle.cli("failover", "lab", "--json", check=True)
    doc = json.loads(done.stdout)
    img0 = Path(sorted(doc["images"], key=lambda i: i["disk"])[0]["path"])
    with open(img0, "r+b") as f:
        f.write(b"production moved to DR")
    done = handle.cli("failover", "commit", "lab", "--json", check=True)
    assert json.loads(done.stdout)["state"] == "committed"
    assert replica[0].read_bytes()[:22] == b"production moved to DR"
    listed = handle.cli("restore-points", "lab")
    assert "committed" in listed.stdout
    undo = handle.cli("failover", "undo", "lab")
    assert undo.returncode == 2 and "committed" in undo.stderr
