"""Issue 12's topology on two sites in network namespaces, through ext4.

Sites "src" (198.51.100.1: coordinator, filter-1, filter-2, source-proxy-1/2)
and "dr" (198.51.100.2: target-1/2, target-proxy-1/2), joined by one veth
(tests/netsites.py). Three policies: lab-1 (2 disks on filter-1 -> target-1),
lab-2 (2 disks on filter-2 -> target-2) and lab-3, a consistency group with
2 disks on each filter (-> target-1). Every disk carries ext4 on a loop device.

On lab-3, an application log is written across the hosts with the
dependent-write rule an application relies on: record i is appended to a log
on filter-1's disk and fsynced (acknowledged), only then appended to a log on
filter-2's disk and fsynced. Every group restore point taken during that run
is restored, each of its 4 images mounted (the ext4 journal replays, as after
a power cut) and checked: `e2fsck -fn` clean, both logs a prefix of their
records (k on filter-1, m on filter-2) with m <= k <= m + 1. Afterwards every
replica equals its source byte for byte.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_eventually
from netsites import TwoSites, netns_skip_reason
from test_ext4_workload import loop_device, mounted, run
from workload import sha256_file

from cdpctl import labplan

pytestmark = [pytest.mark.root, pytest.mark.timeout(600)]

MiB = 1 << 20
RECORD = 512
WRITE_S = 8.0
MAX_POINTS = 12
GROUP = "lab-3"
TOPOLOGY = labplan.Topology(filters=2, targets=2, policies=3, source_proxies=2,
                            target_proxies=2, disks_per_policy=2)


@pytest.fixture
def sites(tmp_path: Path) -> Any:
    reason = netns_skip_reason()
    if reason:
        pytest.skip(reason)
    if not shutil.which("mkfs.ext4") or not shutil.which("losetup"):
        pytest.skip("mkfs.ext4 and losetup are needed (e2fsprogs, util-linux)")
    s = TwoSites(tmp_path / "sites", 32 * MiB, topology=TOPOLOGY)
    try:
        s.up()
        yield s
    finally:
        s.down()


def record(tag: bytes, i: int) -> bytes:
    head = tag + i.to_bytes(4, "little")
    return (head * (RECORD // len(head) + 1))[:RECORD]


def log_prefix(path: Path, tag: bytes) -> int:
    """Records in a restored log; fails unless they are exactly records 0..k-1."""
    data = path.read_bytes() if path.exists() else b""
    k = len(data) // RECORD
    for i in range(k):
        assert data[i * RECORD:(i + 1) * RECORD] == record(tag, i), (
            f"{path}: record {i} of {k} is not what was written")
    return k


def policies(s: TwoSites) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in s.status()["policies"]}


def group_points(s: TwoSites) -> list[dict[str, Any]]:
    done = s.cli("restore-points", GROUP, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    return sorted(json.loads(done.stdout), key=lambda p: p["id"])


def test_two_sites_three_policies_one_group_through_ext4(sites: TwoSites,
                                                         tmp_path: Path) -> None:
    s = sites
    plan = s.plan
    assert plan is not None
    disks = plan.disks
    assert len(disks) == 8

    def assigned() -> None:
        ps = policies(s)
        assert sorted(ps) == ["lab-1", "lab-2", "lab-3", "lab-3..filter-1", "lab-3..filter-2"]
        for name in ("lab-1", "lab-2", "lab-3..filter-1", "lab-3..filter-2"):
            assert ps[name]["source_proxy"] and ps[name]["target_proxy"], ps[name]
        assert ps["lab-3..filter-1"]["source_proxy"] == ps["lab-3..filter-2"]["source_proxy"]
    assert_eventually(assigned, 60, 0.5, "the policies were not assigned")
    assert_eventually(lambda: len(group_points(s)) > 0, 60, 0.5, "no group point")

    group = [d for d in disks if d.policy == GROUP]
    log_a = next(d for d in group if d.filter == "filter-1")
    log_b = next(d for d in group if d.filter == "filter-2")
    with ExitStack() as stack:
        mounts: dict[str, Path] = {}
        for d in disks:
            dev = stack.enter_context(loop_device(Path(d.path)))
            run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev)
            mounts[d.name] = stack.enter_context(mounted(dev, tmp_path / "fs" / d.name))
        for d in disks:   # some data on every file system
            (mounts[d.name] / "data.bin").write_bytes(os.urandom(2 * MiB))
        run("sync")
        started_ns = time.time_ns()
        fa = os.open(mounts[log_a.name] / "app.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        fb = os.open(mounts[log_b.name] / "app.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        written = 0
        try:
            end = time.monotonic() + WRITE_S
            while time.monotonic() < end:
                os.write(fa, record(b"A", written))
                os.fsync(fa)           # acknowledged on filter-1 ...
                os.write(fb, record(b"B", written))
                os.fsync(fb)           # ... before this one was issued on filter-2
                written += 1
        finally:
            os.close(fa)
            os.close(fb)
        run("sync")
    print(f"{written} dependent record pairs in {WRITE_S:.0f} s")
    assert written > 50, written

    shas = {d.name: sha256_file(d.path) for d in disks}

    def replicas_equal() -> None:
        differ = [d.name for d in disks if sha256_file(d.replica_path) != shas[d.name]]
        assert differ == [], f"replicas differ from their sources: {differ}"
    assert_eventually(replicas_equal, 180, 1.0, "the replicas did not catch up")

    points = [p for p in group_points(s) if p["id"] > started_ns]
    assert len(points) >= 3, points
    step = max(1, len(points) // MAX_POINTS)
    chosen = [*points[::step][:MAX_POINTS - 1], points[-1]]
    seen = []
    restores = plan.root / "restores"   # the targets' restore_dir
    for p in chosen:
        out = restores / f"g{p['id']}"
        done = s.cli("restore", GROUP, "--point", str(p["id"]), "--out", str(out), "--json")
        assert done.returncode == 0, done.stdout + done.stderr
        images = {img["disk"]: Path(img["path"]) for img in json.loads(done.stdout)["images"]}
        assert sorted(images) == sorted(d.name for d in group), images
        counts = {}
        try:
            for name, image in images.items():
                where = tmp_path / "restored" / f"{p['id']}-{name}"
                with loop_device(image) as dev, mounted(dev, where):   # replays the journal
                    if name in (log_a.name, log_b.name):
                        counts[name] = log_prefix(where / "app.log",
                                                  b"A" if name == log_a.name else b"B")
                fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True,
                                      text=True, check=False, timeout=120)
                assert fsck.returncode == 0, f"point {p['id']} {name}: {fsck.stdout}"
        finally:
            shutil.rmtree(out, ignore_errors=True)
        k, m = counts[log_a.name], counts[log_b.name]
        assert m <= k <= m + 1, (f"group point {p['id']}: {k} records on filter-1, {m} on "
                                 "filter-2 break the dependent-write rule")
        seen.append((k, m))
    print("group points (records on filter-1, filter-2):", seen)
    assert seen[-1] == (written, written), seen
    assert len({k for k, _ in seen if 0 < k < written}) >= 2, seen
    assert_eventually(lambda: s.cli("health").returncode == 0, 60, 1.0, "health is not OK")
