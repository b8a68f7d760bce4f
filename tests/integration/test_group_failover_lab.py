"""Failover of a consistency group across two filters, in a lab of real processes:
`cdpctl failover GROUP --point ID` brings both members' disks up at the group
point, each image equal to what was written to its disk before it; `failover
undo GROUP` deletes them and replication of both members resumes (a new write
on each disk reaches a newer group point)."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import LabHandle, assert_eventually

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

DISK = "16M"
GROUP = "grp"
MEMBERS = [f"{GROUP}..filter-1", f"{GROUP}..filter-2"]


def group_points(handle: LabHandle) -> list[dict[str, Any]]:
    done = handle.cli("restore-points", GROUP, "--json")
    assert done.returncode == 0, done.stderr
    return sorted(json.loads(done.stdout), key=lambda p: p["id"])


def newest_after(handle: LabHandle, t_ns: int) -> dict[str, Any]:
    """The newest group point, once one was made after `t_ns` (its id is the
    source proxy's clock at the checkpoint's hold)."""
    got: list[dict[str, Any]] = []

    def made() -> None:
        pts = group_points(handle)
        assert pts and pts[-1]["id"] > t_ns, pts[-1:] or "no group point"
        got.append(pts[-1])
    assert_eventually(made, timeout_s=30, interval_s=0.25,
                      message="no group point after the writes")
    return got[-1]


def write(path: Path, rng: random.Random, n: int = 8) -> None:
    """`n` random 64 KiB pieces at random 4 KiB-aligned offsets, made durable."""
    fd = os.open(path, os.O_WRONLY)
    try:
        size = os.fstat(fd).st_size
        for _ in range(n):
            off = rng.randrange(0, size - 65536) // 4096 * 4096
            assert os.pwrite(fd, rng.randbytes(65536), off) == 65536
        os.fsync(fd)
    finally:
        os.close(fd)


def test_failover_of_a_group_and_undo(lab: Any, tmp_path: Path) -> None:
    t0 = time.monotonic()
    handle = lab(tmp_path / "lab", disks=1, disk_size=DISK, extra=("--filters", "2"))
    handle.cli("policy", "create", GROUP, "--target", "target-1",
               "--disk", f"filter-1:ga:{DISK}", "--disk", f"filter-2:gb:{DISK}",
               "--set", "rpo_interval_s=0.5", check=True)
    mounts = {f["id"]: Path(f["mountpoint"]) for f in handle.info["filters"]}
    disks = {"ga": mounts["filter-1"] / "ga", "gb": mounts["filter-2"] / "gb"}
    assert_eventually(lambda: all(p.exists() for p in disks.values()), timeout_s=30,
                      message="the group's disks did not appear on the filters' mounts")
    rng = random.Random(12)
    for path in disks.values():   # distinct data on each disk
        write(path, rng)
    written = {d: p.read_bytes() for d, p in disks.items()}
    point = newest_after(handle, time.time_ns())
    assert len(point["members"]) == 2 and point["consistent"], point

    done = handle.cli("failover", GROUP, "--point", str(point["id"]), "--json", check=True)
    doc = json.loads(done.stdout)
    assert doc["state"] == "active" and doc["point"]["checkpoint_id"] == point["id"], doc
    assert [m["policy"] for m in doc["point"]["members"]] == MEMBERS, doc
    assert [(m["policy"], m["state"]) for m in doc["members"]] == [
        (n, "active") for n in MEMBERS], doc
    images = {i["disk"]: Path(i["path"]) for i in doc["images"]}
    assert set(images) == {"ga", "gb"}, doc
    assert {i["disk"]: i["member"] for i in doc["images"]} == {
        "ga": MEMBERS[0], "gb": MEMBERS[1]}, doc
    for d, img in images.items():
        assert img.read_bytes() == written[d], f"failover image of {d} is not what was written"
    listed = handle.cli("restore-points", GROUP, check=True)
    assert "group failover: active" in listed.stdout, listed.stdout
    again = handle.cli("failover", GROUP)
    assert again.returncode != 0 and "already failed over" in again.stderr, again.stderr

    done = handle.cli("failover", "undo", GROUP, "--json", check=True)
    doc = json.loads(done.stdout)
    assert doc["state"] == "none" and [m["state"] for m in doc["members"]] == ["none"] * 2
    assert not any(p.exists() for p in images.values())

    # replication resumes for both members: new writes reach a newer group point
    for path in disks.values():
        write(path, rng, 4)
    now = {d: p.read_bytes() for d, p in disks.items()}
    assert now != written
    point = newest_after(handle, time.time_ns())
    out = Path(handle.info["restore_dir"]) / "after-undo"
    done = handle.cli("restore", GROUP, "--point", str(point["id"]), "--out", str(out),
                      "--json", check=True)
    for img in json.loads(done.stdout)["images"]:
        assert Path(img["path"]).read_bytes() == now[img["disk"]], img["disk"]
    print(f"group failover lab test: {time.monotonic() - t0:.1f} s")
