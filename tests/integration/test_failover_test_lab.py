"""Test failover through the real lab (issue 16 item 4): `cdpctl failover test
start|list|stop`.

A test copy at an earlier point equals the disk as it was then (sha256 oracle);
writes into it (through a writable loop device, and directly) reach neither the
replica nor the restore points: the replica still equals the source, and a
restore of the same point still equals the oracle. Replication goes on during
the tests (a write made meanwhile arrives). Two tests run at once; `stop`
detaches the loop device and leaves no file, directory or registry entry.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import LabHandle, assert_eventually
from workload import MiB, sha256_file

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]


def write(path: str, rng: random.Random, offset: int, size: int = MiB) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, rng.randbytes(size), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def loops_of(path: str) -> list[str]:
    done = subprocess.run(["losetup", "-j", path], capture_output=True, text=True,
                          check=False)
    return [line.split(":", 1)[0] for line in done.stdout.splitlines() if line]


def test_test_failovers_are_isolated_and_leave_no_trace(lab: Callable[..., LabHandle],
                                                        tmp_path: Path) -> None:
    handle = lab(tmp_path / "lab", disk_size="32M")
    disk = handle.disks[0]
    src, replica = disk["path"], disk["replica_path"]
    restores = Path(handle.info["restore_dir"])
    rng = random.Random(16)

    def caught_up() -> str:
        want = sha256_file(src)
        assert sha256_file(replica) == want, "replica differs from the source"
        return want

    write(src, rng, 2 * MiB, 4 * MiB)
    sha_a = assert_eventually(caught_up, 90, 1.0, "no first replication")
    point = json.loads(handle.cli("restore-points", "create", "lab", "--json",
                                  check=True).stdout)["id"]
    write(src, rng, 10 * MiB, 2 * MiB)
    assert_eventually(caught_up, 90, 1.0, "second write not replicated")

    started = handle.cli("failover", "test", "start", "lab", "--point", str(point),
                         "--out", str(restores / "drill-a"), "--name", "drill-a", "--loop",
                         "--json")
    assert started.returncode == 0, started.stdout + started.stderr
    doc = json.loads(started.stdout)
    (img,) = doc["images"]
    assert doc["point"]["id"] == point and sha256_file(img["path"]) == sha_a
    loop = img["loop"]
    assert loops_of(img["path"]) == [loop]
    # writes into the test: through its writable loop device, and to the file itself
    write(loop, rng, 0, MiB)
    write(img["path"], rng, 20 * MiB, MiB)
    assert sha256_file(img["path"]) != sha_a

    second = handle.cli("failover", "test", "start", "lab", "--out",
                        str(restores / "drill-b"), "--name", "drill-b", "--json")
    assert second.returncode == 0, second.stdout + second.stderr
    dup = handle.cli("failover", "test", "start", "lab", "--out",
                     str(restores / "drill-c"), "--name", "drill-a")
    assert dup.returncode == 2 and "runs already" in dup.stderr, dup.stderr
    assert not (restores / "drill-c" / "disk0.img").exists()
    listed = json.loads(handle.cli("failover", "test", "list", "lab", "--json",
                                   check=True).stdout)["tests"]
    assert [(t["name"], t["state"]) for t in listed] == [("drill-a", "ready"),
                                                         ("drill-b", "ready")]

    # replication goes on during the tests, and their writes reached nothing
    write(src, rng, 14 * MiB, 2 * MiB)
    assert_eventually(caught_up, 90, 1.0, "replication stopped during a test failover")
    again = handle.cli("restore", "lab", "--point", str(point), "--out",
                       str(restores / "check"), "--json")
    assert again.returncode == 0, again.stderr
    (check,) = json.loads(again.stdout)["images"]
    assert sha256_file(check["path"]) == sha_a   # the point is as it was
    os.unlink(check["path"])
    os.rmdir(restores / "check")

    stopped = handle.cli("failover", "test", "stop", "lab", "drill-a", "--json")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert json.loads(stopped.stdout)["stopped"][0]["detached"] == [loop]
    assert loops_of(img["path"]) == [] and not (restores / "drill-a").exists()
    unknown = handle.cli("failover", "test", "stop", "lab", "drill-a")
    assert unknown.returncode == 2 and "no test failover named" in unknown.stderr
    assert handle.cli("failover", "test", "stop", "lab", "--all").returncode == 0
    assert not (restores / "drill-b").exists()
    listed = json.loads(handle.cli("failover", "test", "list", "lab", "--json",
                                   check=True).stdout)["tests"]
    assert listed == []
    assert sorted(p.name for p in restores.iterdir()) == []
    assert handle.cli("health").returncode == 0
