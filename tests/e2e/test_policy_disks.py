"""The coordinator's policies drive protection (issue 11 item 1), in a real lab.

`cdpctl policy create` alone makes a new disk appear under the filter's mount
(no restart; the lab's own disk keeps replicating); ext4 on it replicates byte
for byte; a policy naming a disk the filter cannot attach makes health exit 2
with the filter's reason; growing it grows the file and the replica, a shrink
is refused; a kill -9 and a start attach it again; deleting the policy
detaches the disk once its last handle is closed and keeps its data (and the
replica) until `policy delete --purge`, which deletes both.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_eventually
from test_ext4_workload import loop_device, mounted, run
from workload import MiB, Workload, sha256_file

pytestmark = pytest.mark.timeout(300)

SIZE = 32 * MiB
BIG = 48 * MiB


def policy_row(handle: Any, name: str) -> dict[str, Any]:
    rows = [p for p in handle.status()["policies"] if p["name"] == name]
    assert rows, f"no policy {name} in status"
    return dict(rows[0])


def test_a_policy_creates_attaches_replicates_and_detaches_its_disk(
        lab: Any, tmp_path: Path) -> None:
    handle = lab(tmp_path / "lab", disk_size="64M")
    lab_disk = handle.disk_path()
    mnt = lab_disk.parent
    images = Path(handle.disks[0]["image"]).parent
    replicas = Path(handle.disks[0]["replica_path"]).parent.parent.parent
    disk9 = mnt / "disk9"
    assert not disk9.exists()
    with open(lab_disk, "rb") as held:   # the lab disk stays open and undisturbed throughout
        created = handle.cli("policy", "create", "p2", "--target", "target-1",
                             "--disk", f"filter-1:disk9:{SIZE // MiB}M")
        assert created.returncode == 0, created.stderr
        assert_eventually(lambda: disk9.exists() and disk9.stat().st_size == SIZE, 20, 0.2,
                          "the policy's disk did not appear under the filter's mount")
        assert (images / "disk9.img").stat().st_size == SIZE
        with loop_device(disk9) as dev:
            run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev)
            with mounted(dev, tmp_path / "fs") as fs:
                (fs / "data.bin").write_bytes(os.urandom(3 * MiB))
                (fs / "notes.txt").write_text("policy-driven protection\n" * 1000)
                run("sync")
        source = sha256_file(disk9)
        replica = replicas / "p2" / "replicas" / "disk9.img"

        def p2_caught_up() -> None:
            p = policy_row(handle, "p2")
            assert p["captured_seq"] > 0 and p["durable_seq"] == p["captured_seq"], p
            assert replica.exists() and sha256_file(replica) == source, "replica differs"
        assert_eventually(p2_caught_up, 120, 1.0, "p2 did not replicate its new disk")
        held.read(4096)

        # growing the disk: the file, the image and the replica grow; the bytes stay
        prefix = source
        grown = handle.cli("policy", "edit", "p2", "--disk", f"filter-1:disk9:{BIG // MiB}M")
        assert grown.returncode == 0, grown.stderr
        assert_eventually(lambda: disk9.stat().st_size == BIG, 20, 0.2,
                          "the disk did not grow under the mount")
        tail = os.urandom(MiB)
        fd = os.open(disk9, os.O_WRONLY)
        try:
            os.pwrite(fd, tail, BIG - MiB)    # past the old end
            os.fsync(fd)
        finally:
            os.close(fd)
        with open(disk9, "rb") as f:
            assert hashlib.sha256(f.read(SIZE)).hexdigest() == prefix, "the old bytes changed"
            f.seek(BIG - MiB)
            assert f.read() == tail
        source = sha256_file(disk9)
        assert_eventually(p2_caught_up, 120, 1.0, "p2 did not replicate the grown disk")
        assert replica.stat().st_size == BIG
        shrink = handle.cli("policy", "edit", "p2", "--disk", f"filter-1:disk9:{SIZE // MiB}M")
        if shrink.returncode == 0:   # refused by the filter if the coordinator let it by
            def shrink_refused() -> None:
                h = handle.cli("health")
                assert h.returncode == 2 and "shrinking is refused" in h.stdout, h.stdout
            assert_eventually(shrink_refused, 30, 0.5, "a shrink was not refused")
            assert disk9.stat().st_size == BIG
            assert handle.cli("policy", "edit", "p2", "--disk",
                              f"filter-1:disk9:{BIG // MiB}M").returncode == 0
        else:
            assert "shrink" in shrink.stderr, shrink.stderr

    # a kill -9 and a start: the managed disk is attached again from the manifest,
    # before and whatever the coordinator says, with its bytes
    handle.kill("filter-1")
    handle.restart("filter-1")
    assert_eventually(lambda: disk9.exists(), 20, 0.2, "disk9 was not attached at start")
    assert disk9.stat().st_size == BIG and sha256_file(disk9) == source

    # the lab's own disk kept working and replicating
    work = Workload(lab_disk, 64 * MiB, seed=3)
    work.write_bytes(2 * MiB)
    lab_replica = handle.disks[0]["replica_path"]
    assert_eventually(lambda: sha256_file(lab_replica) == work.oracle_sha256(), 90, 1.0,
                      "the lab disk stopped replicating")
    assert_eventually(lambda: handle.cli("health").returncode == 0, 60, 1.0,
                      "health is not OK with both policies protected")

    # a policy naming a disk the filter cannot attach: health says so, with the reason
    (images / "disk7.img").write_bytes(b"someone's file")
    bad = handle.cli("policy", "create", "p3", "--target", "target-1",
                     "--disk", "filter-1:disk7:1M")
    assert bad.returncode == 0, bad.stderr

    def p3_refused() -> None:
        h = handle.cli("health")
        assert h.returncode == 2 and "disk7.img already exists" in h.stdout, h.stdout
    assert_eventually(p3_refused, 30, 0.5, "health did not report the disk it cannot attach")
    assert not (mnt / "disk7").exists()
    assert (images / "disk7.img").read_bytes() == b"someone's file"   # never adopted
    assert handle.cli("policy", "delete", "p3").returncode == 0

    # deleting the policy while disk9 is open: it leaves the directory, the open
    # handle keeps working; created again meanwhile, it is attached once closed
    fd = os.open(disk9, os.O_RDWR)
    try:
        assert handle.cli("policy", "delete", "p2").returncode == 0
        assert_eventually(lambda: "disk9" not in os.listdir(mnt), 20, 0.2,
                          "disk9 stayed in the directory")
        assert os.pread(fd, 4096, BIG - MiB) == tail[:4096]
        again = handle.cli("policy", "create", "p2", "--target", "target-1",
                           "--disk", f"filter-1:disk9:{BIG // MiB}M")
        assert again.returncode == 0, again.stderr

        def still_detaching() -> None:
            h = handle.cli("health")
            assert h.returncode == 2 and "still detaching" in h.stdout, h.stdout
        assert_eventually(still_detaching, 30, 0.5, "the re-created policy was not held")
    finally:
        os.close(fd)
    assert_eventually(lambda: "disk9" in os.listdir(mnt), 20, 0.2,
                      "disk9 was not attached again once closed")
    assert sha256_file(disk9) == sha256_file(images / "disk9.img")
    assert_eventually(lambda: handle.cli("health").returncode == 0, 60, 1.0,
                      "the re-attached policy did not become healthy")

    # deleting the policy detaches the disk (once closed) and keeps its data
    kept = sha256_file(images / "disk9.img")
    assert handle.cli("policy", "delete", "p2").returncode == 0
    assert_eventually(lambda: not disk9.exists(), 20, 0.2, "disk9 was not detached")
    assert sorted(os.listdir(mnt)) == [lab_disk.name]
    assert sha256_file(images / "disk9.img") == kept
    manifest = json.loads((images.parent / "disks.json").read_text())
    assert manifest["policies"]["p2"]["state"] == "deleted", manifest
    assert_eventually(lambda: handle.cli("health").returncode == 0, 60, 1.0,
                      "health is not OK once the deleted policies are gone")
    assert replica.exists()   # the DR copy is kept too

    # purged: the filter's image and journal and the target's store are deleted
    purged = handle.cli("policy", "delete", "p2", "--purge")
    assert purged.returncode == 0 and "purged" in purged.stdout, purged

    def gone() -> None:
        assert not (images / "disk9.img").exists()
        assert not (images.parent / "journal" / "p2").exists()
        assert "p2" not in json.loads((images.parent / "disks.json").read_text())["policies"]
        assert not (replicas / "p2").exists()
    assert_eventually(gone, 30, 0.5, "p2 was not purged on its nodes")
    assert sha256_file(lab_replica) == work.oracle_sha256()   # nothing else touched
    assert handle.cli("health").returncode == 0
