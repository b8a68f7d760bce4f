"""Five real daemons on loopback (mutual TLS): writes through the FUSE disk
end up byte-identical in the target's replica, across a target crash, and a
wrong key on the target proxy is refused without touching the replica."""

from __future__ import annotations

import os
import re
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_eventually, cdpctl
from labwait import policy, wait_caught_up
from workload import MiB, Workload, sha256_file

pytestmark = pytest.mark.timeout(300)

DISK = 256 * MiB


def test_mixed_writes_replicate_byte_identical(lab: Any, tmp_path: Path) -> None:
    handle = lab(tmp_path / "lab", disk_size="256M")
    work = Workload(handle.disk_path(), DISK, seed=7)
    work.write_bytes(64 * MiB)
    expected = work.oracle_sha256()
    # the source image, read back through FUSE, is what the workload wrote
    assert sha256_file(handle.disk_path()) == expected
    wait_caught_up(handle, expected)
    p = policy(handle)
    assert p["bytes_replicated"] > 0
    assert p["source_proxy"] == "source-proxy-1" and p["target_proxy"] == "target-proxy-1"
    assert p["rpo_lag_s"] == 0
    health = handle.cli("health")
    assert health.returncode == 0, health.stdout + health.stderr


def test_target_sigkill_midstream_loses_nothing(lab: Any, tmp_path: Path) -> None:
    handle = lab(tmp_path / "lab", disk_size="256M")
    work = Workload(handle.disk_path(), DISK, seed=11)
    failure: list[BaseException] = []

    def writer() -> None:
        try:
            for _ in range(12):
                work.write_bytes(4 * MiB)
        except BaseException as exc:  # surfaced by the main thread
            failure.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    # kill the target while deltas are flowing, i.e. once something is durable
    assert_eventually(lambda: policy(handle)["durable_seq"] > 0, 60, 0.2,
                      "nothing became durable before the kill")
    handle.kill("target-1", signal.SIGKILL)
    thread.join(timeout=120)
    assert not thread.is_alive() and not failure, failure
    handle.restart("target-1")
    wait_caught_up(handle, work.oracle_sha256())


def test_wrong_key_on_target_proxy_is_refused(lab: Any, tmp_path: Path) -> None:
    handle = lab(tmp_path / "lab", disk_size="256M")
    proxy = handle.process("target-proxy-1")
    config = Path(proxy["config"])
    text = config.read_text()
    key_path = Path(re.search(r'key_file = "([^"]+)"', text.split("[proxy]")[1]).group(1))
    wrong = key_path.with_name("wrong.key")
    wrong.write_text(os.urandom(32).hex() + "\n")
    handle.kill("target-proxy-1", signal.SIGTERM)
    config.write_text(text.replace(f'key_file = "{key_path}"', f'key_file = "{wrong}"'))
    handle.restart("target-proxy-1")

    replica = handle.disks[0]["replica_path"]
    before = sha256_file(replica)
    work = Workload(handle.disk_path(), DISK, seed=3)
    work.write_bytes(8 * MiB)

    def refused() -> None:
        p = policy(handle)
        assert "wrong key or tampered open" in p.get("reason", ""), p
    assert_eventually(refused, 30, 0.5, "the wrong key was not reported")
    assert "failed key confirmation" in handle.log("target-proxy-1")
    assert policy(handle)["durable_seq"] == 0
    assert sha256_file(replica) == before, "the replica changed under a wrong key"
    health = handle.cli("health")
    assert health.returncode != 0, health.stdout

    # with the right key back, everything written meanwhile arrives
    handle.kill("target-proxy-1", signal.SIGTERM)
    config.write_text(text)
    handle.restart("target-proxy-1")
    wait_caught_up(handle, work.oracle_sha256())


def test_lab_status_and_down(lab: Any, tmp_path: Path) -> None:
    handle = lab(tmp_path / "lab", disk_size="64M", disks=2)
    st = handle.status()
    roles = {n["id"]: n["state"] for n in st["nodes"]}
    assert set(roles) >= {"coordinator", "filter-1", "source-proxy-1", "target-proxy-1",
                          "target-1"} - {"coordinator"}
    assert all(state == "up" for state in roles.values()), roles
    assert len(handle.disks) == 2
    out = cdpctl("lab", "status", "--dir", str(handle.dir))
    assert out.returncode == 0, out.stderr
    assert "filter-1" in out.stdout
