"""Initial sync (seeding) and operator digest resync, with five real daemons.

Seeding: the filter's image already holds 192 MiB of data when the policy
starts replicating, and the target's replica already holds most of it (a
copy of the image taken before 10 % of its regions were changed). Only the
differing regions travel: the bytes the target made durable stay near the
changed bytes, far below the image's data, and the replica ends equal to the
image, with a closed gap for the sync.

Operator resync: a replica that diverged behind the target's back (regions
overwritten while the target was stopped) is repaired by `cdpctl sync POLICY
--watch`, which exits 0 once the sync is done; a filter killed in the middle
of the comparison resumes it after its restart.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_eventually
from labwait import policy
from workload import MiB, Workload, sha256_file

pytestmark = pytest.mark.timeout(300)

DISK = 256 * MiB
REGION = 1 * MiB


def filter_data_dir(handle: Any) -> Path:
    cfg = tomllib.loads(Path(handle.process("filter-1")["config"]).read_text())
    return Path(cfg["filter"]["data_dir"])


def fill_image(path: Path, rng: random.Random, regions: list[int]) -> None:
    """Random data in the given 1 MiB regions (the rest stays a hole)."""
    with open(path, "r+b") as f:
        for r in regions:
            f.seek(r * REGION)
            f.write(rng.randbytes(REGION))


def wait_synced(handle: Any, image: Path, timeout_s: float = 240.0) -> dict[str, Any]:
    replica = handle.disks[0]["replica_path"]
    expected = sha256_file(image)

    def same() -> dict[str, Any]:
        p = policy(handle)
        assert p["sync_phase"] == "" and p["sync_done_id"], p
        assert p["durable_seq"] == p["captured_seq"] == p["applied_seq"], p
        assert sha256_file(replica) == expected, "replica differs from the image"
        return p

    return assert_eventually(same, timeout_s, 1.0, "the sync did not converge")


def test_seeding_sends_only_the_differing_regions(lab: Any, tmp_path: Path) -> None:
    handle = lab(tmp_path / "lab", disk_size="256M")
    image = Path(handle.disks[0]["image"])
    replica = Path(handle.disks[0]["replica_path"])
    handle.kill("filter-1", signal.SIGTERM, wait_s=30)
    handle.kill("target-1", signal.SIGTERM, wait_s=30)
    # A disk that already holds data, and a replica with an older copy of it.
    rng = random.Random(7)
    used = sorted(rng.sample(range(DISK // REGION), 192))
    fill_image(image, rng, used)
    shutil.copyfile(image, replica)
    changed = sorted(rng.sample(used, len(used) // 10))
    fill_image(image, rng, changed)
    # A filter that never met a target (its first welcome is still to come).
    (filter_data_dir(handle) / "dirty" / handle.disks[0]["policy"] / "sync.json").unlink()
    handle.restart("target-1")
    handle.restart("filter-1")

    p = wait_synced(handle, image)
    changed_bytes = len(changed) * REGION
    assert changed_bytes <= p["bytes_replicated"] < 2 * changed_bytes, \
        f"{p['bytes_replicated']} bytes replicated for {changed_bytes} changed bytes"
    assert "initial sync by digests" in handle.log("filter-1")
    gaps = p["gaps"]
    assert len(gaps) == 1 and gaps[0]["end_seq"] > gaps[0]["begin_seq"], gaps
    assert gaps[0]["reason"] == "initial", gaps   # the filter's reason, carried to the target
    # Restore points cut during the sync are flagged; the newest one is consistent.
    listed = handle.cli("restore-points", handle.disks[0]["policy"], "--json", check=True)
    points = json.loads(listed.stdout)
    assert points and points[-1]["consistent"] and points[-1]["last_seq"] >= gaps[0]["end_seq"]
    for pt in points:
        inside = gaps[0]["begin_seq"] <= pt["last_seq"] < gaps[0]["end_seq"]
        assert pt["consistent"] is not inside, (pt, gaps)
    human = handle.cli("restore-points", handle.disks[0]["policy"], check=True).stdout
    assert "are not consistent" in human, human


def test_operator_sync_repairs_a_diverged_replica(lab: Any, tmp_path: Path) -> None:
    handle = lab(tmp_path / "lab", disk_size="256M")
    work = Workload(handle.disk_path(), DISK, seed=11)
    work.write_bytes(16 * MiB)
    image = Path(handle.disks[0]["image"])
    replica = Path(handle.disks[0]["replica_path"])
    expected = work.oracle_sha256()

    def caught_up() -> None:
        assert sha256_file(replica) == expected

    assert_eventually(caught_up, 120, 1.0, "replica did not catch up")
    # The replica diverges behind the target's back.
    handle.kill("target-1", signal.SIGTERM, wait_s=30)
    rng = random.Random(3)
    bad = sorted(rng.sample(range(DISK // REGION), 24))
    fill_image(replica, rng, bad)
    handle.restart("target-1")
    assert sha256_file(replica) != expected
    before = int(policy(handle)["bytes_replicated"])
    done = handle.cli("sync", handle.disks[0]["policy"], "--json", check=True)
    rid = int(json.loads(done.stdout)["sync_request_id"])
    assert rid > 0
    sync_file = filter_data_dir(handle) / "dirty" / handle.disks[0]["policy"] / "sync.json"

    def midway() -> dict[str, Any]:
        st = dict(json.loads(sync_file.read_text()))
        assert st["seen_request"] == rid and st["compared_bytes"] > 0, st
        return st

    # Kill the filter once part of the comparison is persisted (or, if the
    # comparison outran us, after it).
    st = assert_eventually(midway, 30, 0.002, "the filter did not start comparing")
    handle.kill("filter-1", signal.SIGKILL)
    st = json.loads(sync_file.read_text())
    interrupted = st["phase"] == "compare"
    mnt = handle.info.get("mountpoint") or str(handle.dir / "mnt")
    subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True, check=False)
    handle.restart("filter-1")
    watch = handle.cli("sync", handle.disks[0]["policy"], "--watch", "--attach",
                       "--timeout", "200", check=False)
    assert watch.returncode == 0, watch.stdout + watch.stderr
    p = wait_synced(handle, image)
    assert p["sync_done_id"] == rid, p
    final = json.loads(sync_file.read_text())
    if interrupted:
        # resumed at its cursor: every byte compared once, not from the start again
        assert final["compared_bytes"] == DISK, (st, final)
    resent = int(p["bytes_replicated"]) - before
    assert resent < 4 * len(bad) * REGION, f"{resent} bytes resent for {len(bad)} bad regions"
    assert os.path.getsize(replica) == DISK
