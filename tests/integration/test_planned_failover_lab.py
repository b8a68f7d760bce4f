"""Planned failover (issue 16 item 1) in a real lab: RPO 0, for a policy and for
a consistency group.

Writers write without pause to every disk of lab-1 (on filter-1) and of lab-2
(a group over filter-1 and filter-2) while `cdpctl failover POLICY --planned`
runs. Each writer must be refused with EROFS at some point (the freeze) and
not before; once frozen, a source disk holds exactly the writes it accepted,
so every failover image must equal its source disk byte for byte: no accepted
write is missing (RPO 0). `failover undo` unfreezes the policy: a write is
accepted again and reaches the replica.
"""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import LabHandle, assert_eventually
from workload import sha256_file

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

BLOCK = 4096
SLOTS = 1024


class Writer(threading.Thread):
    """Writes block after block until the disk refuses with EROFS."""

    def __init__(self, path: str) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.accepted = 0
        self.refusal: OSError | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        fd = os.open(self.path, os.O_WRONLY)
        try:
            while not self.stop.is_set():
                data = self.accepted.to_bytes(8, "little") * (BLOCK // 8)
                try:
                    os.pwrite(fd, data, self.accepted % SLOTS * BLOCK)
                except OSError as exc:
                    self.refusal = exc
                    return
                self.accepted += 1
        finally:
            os.close(fd)


def planned_failover(handle: LabHandle, policy: str, disks: list[dict[str, Any]]) -> None:
    writers = [Writer(d["path"]) for d in disks]
    for w in writers:
        w.start()
    assert_eventually(lambda: all(w.accepted > 100 for w in writers), 30, 0.1,
                      f"{policy}: the writers did not get going")
    done = handle.cli("failover", policy, "--planned", "--json")
    for w in writers:
        w.stop.set()
        w.join(10)
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(done.stdout)
    refused = {d["name"]: (w.refusal.errno if w.refusal else None)
               for d, w in zip(disks, writers, strict=True)}
    assert set(refused.values()) == {errno.EROFS}, (
        f"{policy}: the writers were not all refused with EROFS by the freeze: {refused}")
    assert doc["state"] == "active" and doc["planned"]["rpo_s"] == 0, doc
    images = {img["disk"]: img["path"] for img in doc["images"]}
    assert sorted(images) == sorted(d["name"] for d in disks), images
    for d in disks:   # frozen: the source holds exactly the accepted writes
        assert sha256_file(images[d["name"]]) == sha256_file(d["path"]), (
            f"{policy}: the failover image of {d['name']} misses writes the source "
            "accepted (RPO > 0)")
    row = {p["name"]: p for p in handle.status()["policies"]}[policy]
    assert row["frozen"], row

    undone = handle.cli("failover", "undo", policy, "--json")
    assert undone.returncode == 0, undone.stdout + undone.stderr
    assert json.loads(undone.stdout).get("unfrozen") is True, undone.stdout

    def writes_again() -> None:
        fd = os.open(disks[0]["path"], os.O_WRONLY)
        try:
            os.pwrite(fd, b"\xab" * BLOCK, (SLOTS + 1) * BLOCK)
        except OSError as exc:
            raise AssertionError(f"{policy}: still refused after the undo: {exc}") from None
        finally:
            os.close(fd)
    assert_eventually(writes_again, 30, 0.3, f"{policy}: not unfrozen")
    want = sha256_file(disks[0]["path"])
    assert_eventually(lambda: sha256_file(disks[0]["replica_path"]) == want, 60, 0.5,
                      f"{policy}: replication did not resume after the undo")


def test_planned_failover_loses_no_write_for_a_policy_and_a_group(lab: Any,
                                                                   tmp_path: Path) -> None:
    handle = lab(tmp_path / "lab", disk_size="16M",
                 extra=("--filters", "2", "--policies", "2"))
    by_policy: dict[str, list[dict[str, Any]]] = {}
    for d in handle.disks:
        by_policy.setdefault(d["policy"], []).append(d)
    assert sorted(by_policy) == ["lab-1", "lab-2"]
    assert {d["filter"] for d in by_policy["lab-2"]} == {"filter-1", "filter-2"}
    assert_eventually(lambda: all(p["state"] == "ok" for p in handle.status()["policies"]),
                      60, 0.5, "the lab did not become healthy")
    planned_failover(handle, "lab-1", by_policy["lab-1"])
    planned_failover(handle, "lab-2", by_policy["lab-2"])
