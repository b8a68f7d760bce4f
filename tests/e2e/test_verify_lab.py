"""`cdpctl verify` through the real lab (issue 16 item 5): a point of a live ext4
(taken while it is mounted, so its journal needs replaying) restores, passes
`e2fsck -fn` after the replay and the operator's script, and `restore-points`
shows it verified with its time to usable; a point whose undo data was damaged
on purpose is flagged, recorded as failed, and the command exits 2. No copy,
loop device or scratch directory is left behind.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_eventually
from test_ext4_workload import loop_device, mounted, run

pytestmark = pytest.mark.timeout(300)

SCRIPT = """#!/bin/sh
set -e
test "$CDP_VERIFY_POLICY" = lab
test -n "$CDP_VERIFY_POINT"
test "$(cat "$CDP_VERIFY_MOUNTS/hello.txt")" = "hello from the source"
"""


def points(handle: Any) -> dict[int, dict[str, Any]]:
    done = handle.cli("restore-points", "lab", "--json", check=True)
    return {p["id"]: p for p in json.loads(done.stdout)}


def loops_under(directory: Path) -> list[str]:
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=False).stdout
    return [line for line in out.splitlines() if str(directory) in line]


def test_verify_passes_a_good_point_and_flags_damaged_undo(lab: Any, tmp_path: Path) -> None:
    handle = lab(tmp_path / "lab", disk_size="64M")
    restores = Path(handle.info["restore_dir"])
    script = tmp_path / "check.sh"
    script.write_text(SCRIPT)
    script.chmod(0o755)
    fs_mnt = tmp_path / "fs"
    with loop_device(handle.disk_path()) as dev:
        run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev)
        with mounted(dev, fs_mnt):
            (fs_mnt / "hello.txt").write_text("hello from the source")
            (fs_mnt / "base.bin").write_bytes(os.urandom(4 << 20))
            run("sync")

            def replicated() -> int:
                p = handle.status()["policies"][0]
                assert p["captured_seq"] > 0 and p["applied_seq"] == p["captured_seq"], p
                return int(p["applied_seq"])
            assert_eventually(replicated, 60, 0.5, "the file system did not replicate")
            good = json.loads(handle.cli("restore-points", "create", "lab", "--json",
                                         check=True).stdout)["id"]
            # overwrites in place, still mounted: undo segments above the good point
            for _ in range(3):
                with open(fs_mnt / "base.bin", "r+b") as f:
                    f.write(os.urandom(4 << 20))
                    f.flush()
                    os.fsync(f.fileno())
            good_seq = points(handle)[good]["last_seq"]
            undo_dir = handle.dir / "data" / "target-1" / "lab" / "undo"

            def undo_above() -> list[Path]:
                # the status' captured seq is a heartbeat old: wait for the undo itself
                above = [u for u in sorted(undo_dir.glob("*.undo"))
                         if int(u.name.split("-")[0]) >= good_seq]   # (lo, hi]
                assert above, f"no undo segment above point {good} yet"
                return above
            assert_eventually(undo_above, 60, 0.5, "the overwrites left no undo data")
            assert_eventually(replicated, 60, 0.5, "the later writes did not replicate")

            ok = handle.cli("verify", "lab", "--point", str(good), "--fsck", "--script",
                            str(script), "--scratch", str(restores / "verify-good"), "--json")
            assert ok.returncode == 0, ok.stdout + ok.stderr
            doc = json.loads(ok.stdout)
            assert doc["ok"] and doc["checks"] == ["restore", "fsck", "script"], doc
            assert doc["recorded"] and doc["rto_s"] > 0, doc
            listed = points(handle)[good]
            assert listed["verified"] == "ok" and listed["verify_rto_s"] > 0, listed
            assert not (restores / "verify-good").exists()
            assert loops_under(restores) == []

            # damage the undo data the good point is restored through
            victim = max(undo_above(), key=lambda u: u.stat().st_size)
            data = bytearray(victim.read_bytes())
            middle = len(data) // 2
            data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
            victim.write_bytes(bytes(data))

            bad = handle.cli("verify", "lab", "--point", str(good), "--fsck",
                             "--scratch", str(restores / "verify-bad"), "--json")
            assert bad.returncode == 2, bad.stdout + bad.stderr
            doc = json.loads(bad.stdout)
            print("damaged point:", doc["detail"])
            assert not doc["ok"] and doc["recorded"], doc
            assert any("restore failed" in d or "e2fsck" in d for d in doc["detail"]), doc
            assert points(handle)[good]["verified"] == "failed"
            assert loops_under(restores) == [] and not (restores / "verify-bad" /
                                                        "disk0.img").exists()
