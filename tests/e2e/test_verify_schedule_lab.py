"""Scheduled verification through the real lab (issue 16 item 5): with
`verify_every_s` set on the policy (the coordinator's lower bound lowered for the
test), the target itself verifies the newest restore point of a replicated ext4
(restore to scratch, loop device, journal replay, `e2fsck -fn`): `cdpctl status`
shows it verified ok and the policy ok. Then the file system is damaged on the
source (its superblock overwritten, as a bad write would) and replicates: the next
scheduled verification fails, the policy turns degraded with "restore point N
failed verification", an alarm is raised, `cdpctl health` warns, `restore-points`
shows the point failed. No copy or loop device is left behind.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_eventually
from test_ext4_workload import loop_device, mounted, run
from test_verify_lab import loops_under, points

pytestmark = pytest.mark.timeout(180)


def lab_policy(handle: Any) -> dict[str, Any]:
    return dict(handle.status()["policies"][0])


def replicated(handle: Any) -> int:
    p = lab_policy(handle)
    assert p["captured_seq"] > 0 and p["applied_seq"] == p["captured_seq"], p
    return int(p["applied_seq"])


def test_scheduled_verification_passes_then_flags_a_damaged_file_system(
        lab: Any, tmp_path: Path) -> None:
    handle = lab(tmp_path / "lab", disk_size="64M")
    restores = Path(handle.info["restore_dir"])
    handle.set_config("coordinator", "coordinator", verify_min_interval_s=1.0)
    with loop_device(handle.disk_path()) as dev:
        run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev)
        with mounted(dev, tmp_path / "fs") as mnt:
            (Path(mnt) / "hello.txt").write_text("hello from the source")
            run("sync")
    assert_eventually(lambda: replicated(handle), 60, 0.5, "the file system did not replicate")

    done = handle.cli("policy", "edit", "lab", "--set", "verify_every_s=1")
    assert done.returncode == 0, done.stdout + done.stderr
    started = time.monotonic()

    def verified_ok() -> dict[str, Any]:
        p = lab_policy(handle)
        v = p["verified"]
        assert v and v["time_ns"] and v["ok"], p
        assert v["every_s"] == 1.0 and p["state"] == "ok", p
        return dict(v)
    good = assert_eventually(verified_ok, 60, 0.5, "no scheduled verification passed")
    print(f"first scheduled verification after {time.monotonic() - started:.1f}s: {good}")
    assert "VERIFIED" in handle.cli("status", check=True).stdout
    assert points(handle)[good["point_id"]]["verified"] == "ok"

    # a bad write over the primary superblock, replicated like any other write
    seq_before = replicated(handle)
    fd = os.open(handle.disk_path(), os.O_RDWR)
    try:
        os.pwrite(fd, os.urandom(1024), 1024)
        os.fsync(fd)
    finally:
        os.close(fd)

    def after() -> int:
        seq = replicated(handle)
        assert seq > seq_before, seq
        return seq
    bad_seq = assert_eventually(after, 60, 0.5, "the damage did not replicate")

    def degraded() -> dict[str, Any]:
        p = lab_policy(handle)
        v = p["verified"]
        assert v and not v["ok"], p
        assert p["state"] == "degraded", p
        assert f"restore point {v['point_id']} failed verification: " in p["reason"], p
        return p
    p = assert_eventually(degraded, 60, 0.5, "the damaged point was not flagged")
    print("flagged:", p["reason"])
    assert "e2fsck" in p["verified"]["detail"], p
    failed = points(handle)[p["verified"]["point_id"]]
    assert failed["verified"] == "failed" and failed["last_seq"] >= bad_seq, failed

    def alarmed() -> dict[str, Any]:
        doc = json.loads(handle.cli("alarms", "--json").stdout)
        assert doc["active"].get("lab") == "warning", doc
        assert any("failed verification" in e["message"] for e in doc["events"]), doc
        return dict(doc)
    assert_eventually(alarmed, 10, 0.5, "no alarm was raised")
    health = handle.cli("health")
    assert health.returncode == 1 and "failed verification" in health.stdout, health.stdout

    handle.cli("policy", "edit", "lab", "--set", "verify_every_s=0", check=True)
    time.sleep(2)   # a verification in progress ends and deletes its copy
    assert loops_under(restores) == []
    assert not any((restores / ".verify").iterdir())
