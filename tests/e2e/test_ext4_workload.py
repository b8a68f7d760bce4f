"""ext4 on a loop device over the protected disk, a real directory tree and a
SQLite database written into it: the replica is byte-identical, fsck-clean,
and holds the same files and a sound database."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_eventually
from workload import sha256_file

pytestmark = pytest.mark.timeout(420)


def run(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr}")
    return done.stdout.strip()


@contextlib.contextmanager
def loop_device(path: Path, read_only: bool = False) -> Iterator[str]:
    args = ["losetup", "--find", "--show", "--direct-io=on"]
    if read_only:
        args.append("--read-only")
    dev = run(*args, str(path))
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)


@contextlib.contextmanager
def mounted(dev: str, where: Path, *options: str) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    run("mount", *(["-o", ",".join(options)] if options else []), dev, str(where))
    try:
        yield where
    finally:
        if os.path.ismount(where):
            subprocess.run(["umount", str(where)], capture_output=True, check=False)


def tree_source() -> Path:
    """A real directory tree: the Python standard library's email + json + asyncio + ..."""
    return Path(os.__file__).parent


def copy_tree(dst: Path) -> list[str]:
    src = tree_source()
    picked = ["email", "json", "asyncio", "http", "xml", "unittest", "logging", "concurrent"]
    for name in picked:
        shutil.copytree(src / name, dst / "tree" / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    return picked


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under root (byte comparison, not stat)."""
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        if "__pycache__" in path.parts or not path.is_file():
            continue
        out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def write_database(path: Path) -> int:
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE readings (id INTEGER PRIMARY KEY, sensor TEXT, value REAL, "
               "payload BLOB)")
    rows = 0
    for batch in range(20):
        with db:
            db.executemany("INSERT INTO readings (sensor, value, payload) VALUES (?, ?, ?)",
                           [(f"s{i % 17}", i * 0.5, os.urandom(200)) for i in range(1000)])
        rows += 1000
        if batch % 5 == 0:
            with db:
                db.execute("DELETE FROM readings WHERE id % 7 = ?", (batch % 7,))
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    (count,) = db.execute("SELECT count(*) FROM readings").fetchone()
    db.close()
    return int(count)


def test_ext4_tree_and_sqlite_replicate(lab: Any, tmp_path: Path) -> None:
    handle = lab(tmp_path / "lab", disk_size="256M")
    disk = handle.disk_path()
    fs_mnt = tmp_path / "fs"
    with loop_device(disk) as dev:
        run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev)
        with mounted(dev, fs_mnt):
            picked = copy_tree(fs_mnt)
            rows = write_database(fs_mnt / "app.db")
            run("sync")
    source_sha = sha256_file(disk)
    replica = Path(handle.disks[0]["replica_path"])

    def caught_up() -> None:
        p = handle.status()["policies"][0]
        assert p["durable_seq"] == p["captured_seq"] > 0, p
        assert sha256_file(replica) == source_sha, "replica differs from the source"
    assert_eventually(caught_up, 120, 1.0, "the replica did not catch up")

    copy = tmp_path / "replica-copy.img"
    shutil.copyfile(replica, copy)
    fsck = subprocess.run(["e2fsck", "-fn", str(copy)], capture_output=True, text=True,
                          check=False, timeout=120)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr

    with loop_device(copy, read_only=True) as dev, \
            mounted(dev, tmp_path / "replica-fs", "ro", "noload") as where:
        for name in picked:
            assert tree_digest(tree_source() / name) == tree_digest(where / "tree" / name), name
        db = sqlite3.connect(f"file:{where / 'app.db'}?mode=ro&immutable=1", uri=True)
        try:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert db.execute("SELECT count(*) FROM readings").fetchone()[0] == rows
        finally:
            db.close()
