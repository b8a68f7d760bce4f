"""Target volume full (issue 5, item 6): the target's data_dir lives on a small
loop-mounted ext4 that a ballast file and the workload fill up.

While the volume is full the target cannot commit (or apply) deltas: it
fails with a clear storage error (ENOSPC → StorageError → UNAVAILABLE),
acks nothing it did not make durable, and leaves no corrupt state behind;
back-pressure reaches the filter (its journal grows, the application's
writes still succeed), and the policy shows an alarm (`cdpctl health` is
not ok, with the storage error as the reason). After the ballast is
deleted, replication resumes by itself and the replica equals the source.
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_eventually
from workload import MiB, sha256_file

pytestmark = pytest.mark.timeout(300)

DISK = 128 * MiB
VOLUME = 128 * MiB
BALLAST = 64 * MiB
BURST = 48 * MiB   # full: ballast + replica + delta + its replica growth > VOLUME; fits without


def policy(handle: Any) -> dict[str, Any]:
    return dict(handle.status()["policies"][0])


@contextlib.contextmanager
def small_ext4(image: Path, mountpoint: Path, size: int) -> Iterator[Path]:
    """A fresh ext4 of `size` bytes on a loop device mounted at `mountpoint`."""
    with open(image, "wb") as f:
        f.truncate(size)
    # -m 0: no blocks reserved for root (the daemons run as root here)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True)
    mountpoint.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False, capture_output=True)


def write_incompressible(path: Path, rng: random.Random, start: int, total: int) -> bytes:
    """Sequential 1 MiB random writes; returns what was written."""
    data = rng.randbytes(total)
    fd = os.open(path, os.O_RDWR)
    try:
        for off in range(0, total, MiB):
            os.pwrite(fd, data[off:off + MiB], start + off)
        os.fsync(fd)
    finally:
        os.close(fd)
    return data


def test_target_volume_full_pushes_back_and_recovers(lab: Any, tmp_path: Path) -> None:
    lab_dir = tmp_path / "lab"
    target_dir = lab_dir / "data" / "target-1"
    with small_ext4(tmp_path / "target-volume.img", target_dir, VOLUME):
        ballast = target_dir / "ballast"
        with open(ballast, "wb") as f:
            f.write(os.urandom(BALLAST))
            os.fsync(f.fileno())
        handle = lab(lab_dir, disk_size="128M")
        rng = random.Random(5)
        oracle = bytearray(DISK)

        # fits: replicated normally
        oracle[0:8 * MiB] = write_incompressible(handle.disk_path(), rng, 0, 8 * MiB)
        assert_eventually(lambda: policy(handle)["durable_seq"] == policy(handle)
                          ["captured_seq"] > 0, 60, 0.5, "first writes did not replicate")

        # does not fit: replica (sparse, filling up) + pending deltas > free space
        oracle[8 * MiB:8 * MiB + BURST] = write_incompressible(handle.disk_path(), rng, 8 * MiB,
                                                               BURST)
        # the application's writes all succeeded (above); the filter holds them
        assert sha256_file(handle.disk_path()) == sha256_file_bytes(oracle)

        def alarmed() -> dict[str, Any]:
            p = policy(handle)
            assert p["durable_seq"] < p["captured_seq"], p
            assert "No space left on device" in p["reason"], p
            assert handle.cli("health").returncode != 0
            return p

        stalled = assert_eventually(alarmed, 90, 1.0, "a full target volume raised no alarm")
        assert stalled["journal_bytes"] > 0, stalled
        target_log = handle.log("target-1")
        assert "No space left on device" in target_log
        # nothing was acked that is not durable: durable never passes captured,
        # and the target's state file still parses and chains (checked on restart)
        frozen = policy(handle)["durable_seq"]

        # free space: replication resumes by itself, nothing lost
        ballast.unlink()
        replica = handle.disks[0]["replica_path"]
        expected = sha256_file_bytes(oracle)

        def caught_up() -> None:
            p = policy(handle)
            assert p["durable_seq"] == p["captured_seq"] == p["applied_seq"], p
            assert sha256_file(replica) == expected, "replica differs from the source"

        assert_eventually(caught_up, 120, 1.0, "replication did not recover after freeing space")
        assert policy(handle)["durable_seq"] > frozen
        def healthy() -> None:
            done = handle.cli("health")
            assert done.returncode == 0, done.stdout + done.stderr

        assert_eventually(healthy, 30, 1.0, "health did not return to ok")
        # the target's state survives a restart (no corrupt store left behind)
        handle.kill("target-1")
        handle.restart("target-1")
        assert sha256_file(replica) == expected
        handle.stop()


def sha256_file_bytes(data: bytearray) -> str:
    import hashlib
    return hashlib.sha256(data).hexdigest()
