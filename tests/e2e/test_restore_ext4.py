"""Every restore point of a live ext4 + SQLite workload is crash-consistent.

ext4 on a loop device over the protected disk; a SQLite database (WAL) in it
takes committed transactions while restore points accumulate. Each restored
point (taken after the file system and the database existed) is a crash
image: mounting it replays the ext4 journal, after which `e2fsck -fn` is
clean, and opening a copy of the database recovers its WAL, after which
`PRAGMA integrity_check` says ok and the rows are a prefix of what was
committed.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_eventually
from test_ext4_workload import loop_device, mounted, run

pytestmark = pytest.mark.timeout(300)

MAX_POINTS = 6


def test_every_restored_point_of_ext4_and_sqlite_checks_clean(lab: Any, tmp_path: Path) -> None:
    handle = lab(tmp_path / "lab", disk_size="64M")
    fs_mnt = tmp_path / "fs"
    committed = 0
    with loop_device(handle.disk_path()) as dev:
        run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev)
        with mounted(dev, fs_mnt):
            db = sqlite3.connect(fs_mnt / "app.db")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, batch INTEGER, payload BLOB)")
            db.commit()
            run("sync")
            ready = handle.status()["policies"][0]["captured_seq"]
            end = time.monotonic() + 14
            batch = 0
            while time.monotonic() < end:
                with db:
                    db.executemany("INSERT INTO t (batch, payload) VALUES (?, ?)",
                                   [(batch, bytes([batch % 256]) * 300) for _ in range(200)])
                    if batch % 4 == 3:
                        db.execute("DELETE FROM t WHERE id % 5 = 0")
                batch += 1
                committed = batch
                time.sleep(0.05)
            db.close()
            run("sync")
    # the filter reports captured_seq with its heartbeat, so the unmount's last
    # writes show up a beat later: require the figure to hold still as well
    seen: list[int] = []

    def caught_up() -> None:
        p = handle.status()["policies"][0]
        seen.append(p["captured_seq"])
        assert p["applied_seq"] == p["captured_seq"], p
        assert len(seen) >= 3 and seen[-3] == seen[-1], seen
    assert_eventually(caught_up, 120, 1.0, "the target did not catch up")

    pts = [p for p in json.loads(handle.cli("restore-points", "lab", "--json",
                                            check=True).stdout) if p["last_seq"] > ready]
    assert len(pts) >= 4, pts
    step = max(1, len(pts) // MAX_POINTS)
    chosen = [*pts[::step][:MAX_POINTS - 1], pts[-1]]
    for p in chosen:
        out = Path(handle.info["restore_dir"]) / f"r{p['id']}"  # the target's restore_dir
        doc = json.loads(handle.cli("restore", "lab", "--point", str(p["id"]), "--out",
                                    str(out), "--json", check=True).stdout)
        image = Path(doc["images"][0]["path"])
        where = tmp_path / f"m{p['id']}"
        # a crash image: mounting replays the ext4 journal, as after a power cut
        with loop_device(image) as dev, mounted(dev, where):
            shutil.copy(where / "app.db", out / "app.db")
            for suffix in ("-wal", "-shm"):
                if (where / f"app.db{suffix}").exists():
                    shutil.copy(where / f"app.db{suffix}", out / f"app.db{suffix}")
        fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True,
                              check=False, timeout=120)
        assert fsck.returncode == 0, f"point {p['id']}: {fsck.stdout}{fsck.stderr}"
        db = sqlite3.connect(out / "app.db")
        try:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok", p
            batches = [b for (b,) in db.execute("SELECT DISTINCT batch FROM t ORDER BY batch")]
            # whole transactions only: the batches present are 0..k-1 for some k
            assert batches == list(range(len(batches))), (p, batches[-5:])
            assert len(batches) <= committed
        finally:
            db.close()
        shutil.rmtree(out)
