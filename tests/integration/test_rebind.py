"""Control plane against the real daemons (issue 4): a killed source or target proxy
is replaced within 5 s under a continuous write load and the replica ends byte for
byte equal to the source; replication goes on without the coordinator; RPO alarms
are raised and cleared; health exit codes; policy CRUD through the CLI; /metrics."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_eventually
from workload import MiB, Workload, sha256_file

from cdpctl.resolve import Coordinator
from cdpctl.status import fetch_status

pytestmark = pytest.mark.timeout(300)

DISK = 64 * MiB
REBIND_BUDGET_S = 5.0


def metric(address: str, name: str, labels: str = "") -> float:
    """A sample from a daemon's /metrics (0 when absent)."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith(name + (labels if labels else "")) and not line.startswith("#"):
            head, _, value = line.rpartition(" ")
            if head.split("{")[0] == name:
                return float(value)
    return 0.0


class Load:
    """Continuous writes through the FUSE disk in a thread, with an oracle."""

    def __init__(self, handle: Any, seed: int) -> None:
        self.work = Workload(handle.disk_path(), DISK, seed=seed)
        self.stop = threading.Event()
        self.failure: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                self.work.write_bytes(256 * 1024, max_write=64 * 1024)
                time.sleep(0.02)
        except BaseException as exc:
            self.failure.append(exc)

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive() and not self.failure, self.failure


def coord(handle: Any) -> Coordinator:
    return Coordinator(handle.coordinator, handle.tls(), "lab")


def policy(handle: Any) -> dict[str, Any]:
    return dict(fetch_status(coord(handle), 5)["policies"][0])


def wait_replica(handle: Any, expected_sha: str, timeout_s: float = 90.0) -> None:
    replica = handle.disks[0]["replica_path"]

    def caught_up() -> None:
        p = policy(handle)
        assert p["captured_seq"] > 0 and p["durable_seq"] == p["captured_seq"], p
        assert sha256_file(replica) == expected_sha, "replica differs from the source"

    assert_eventually(caught_up, timeout_s, 0.5, "replica did not catch up with the source")


def kill_active_and_measure(handle: Any, slot: str) -> float:
    """SIGKILL the proxy in `slot` of the policy; seconds until a durable advance
    through its replacement."""
    target_metrics = handle.process("target-1")["metrics_address"]
    assert_eventually(lambda: metric(target_metrics, "cdp_target_durable_seq") > 0, 60, 0.2,
                      "nothing became durable before the kill")
    active = policy(handle)[slot]
    assert active
    durable = metric(target_metrics, "cdp_target_durable_seq")
    t0 = time.monotonic()
    handle.kill(active, signal.SIGKILL)
    durable = max(durable, metric(target_metrics, "cdp_target_durable_seq"))

    def advanced() -> None:
        assert metric(target_metrics, "cdp_target_durable_seq") > durable

    assert_eventually(advanced, 30, 0.05, "replication did not resume after the kill")
    elapsed = time.monotonic() - t0
    p = policy(handle)
    assert p[slot] and p[slot] != active, p
    print(f"\n{slot} {active} SIGKILLed: durable advanced through {p[slot]} "
          f"{elapsed:.2f}s later")
    return elapsed


@pytest.mark.parametrize("slot", ["source_proxy", "target_proxy"])
def test_proxy_sigkill_rebinds_within_5s(lab: Any, tmp_path: Path, slot: str) -> None:
    handle = lab(tmp_path / "lab", disk_size="64M", source_proxies=2, target_proxies=2)
    epoch = policy(handle)["epoch"]
    with Load(handle, seed=21) as load:
        elapsed = kill_active_and_measure(handle, slot)
        time.sleep(1.0)
    assert elapsed <= REBIND_BUDGET_S, f"rebind took {elapsed:.2f}s"
    assert policy(handle)["epoch"] > epoch
    wait_replica(handle, load.work.oracle_sha256())
    alarms = json.loads(handle.cli("alarms", "--json").stdout)
    assert isinstance(alarms["events"], list)


def test_data_plane_runs_without_coordinator(lab: Any, tmp_path: Path) -> None:
    handle = lab(tmp_path / "lab", disk_size="64M")
    target_metrics = handle.process("target-1")["metrics_address"]
    with Load(handle, seed=5) as load:
        assert_eventually(lambda: metric(target_metrics, "cdp_target_durable_seq") > 0, 60, 0.2)
        handle.kill("coordinator", signal.SIGKILL)
        down = handle.cli("health")
        assert down.returncode == 3 and "unreachable" in down.stderr, down
        before = metric(target_metrics, "cdp_target_durable_seq")
        assert_eventually(lambda: metric(target_metrics, "cdp_target_durable_seq") > before,
                          20, 0.2, "replication stopped with the coordinator")
    filter_metrics = handle.process("filter-1")["metrics_address"]
    captured = metric(filter_metrics, "cdp_filter_captured_seq")
    assert_eventually(lambda: metric(target_metrics, "cdp_target_durable_seq") == captured,
                      60, 0.2, "replica did not catch up without the coordinator")
    # durable is acked before apply: wait for the replica itself to catch up
    assert_eventually(lambda: metric(target_metrics, "cdp_target_applied_seq") == captured,
                      30, 0.2, "the target did not apply what it made durable")
    assert sha256_file(handle.disks[0]["replica_path"]) == load.work.oracle_sha256()
    handle.restart("coordinator")

    def full_status() -> None:
        st = fetch_status(coord(handle), 5)
        assert all(n["state"] == "up" for n in st["nodes"]), st["nodes"]
        assert len(st["nodes"]) == 4   # the coordinator is not a node
        p = st["policies"][0]
        assert p["state"] == "ok" and p["durable_seq"] == captured, p

    assert_eventually(full_status, 30, 0.3, "status did not come back after the restart")
    # a proxy whose lease the restarted coordinator lets run out before its next
    # heartbeat unassigns the policy for a moment: health must come back by itself
    assert_eventually(lambda: handle.cli("health").returncode == 0, 30, 0.5,
                      "health did not return to ok after the coordinator restart")


def test_rpo_alarm_raised_and_cleared(lab: Any, tmp_path: Path) -> None:
    handle = lab(tmp_path / "lab", disk_size="64M")
    edit = handle.cli("policy", "edit", "lab", "--set", "rpo_warning_s=2",
                      "--set", "rpo_error_s=4", "--set", "rpo_interval_s=1")
    assert edit.returncode == 0, edit.stderr
    work = Workload(handle.disk_path(), DISK, seed=3)
    work.write_bytes(2 * MiB)
    assert_eventually(lambda: policy(handle)["durable_seq"] == policy(handle)["captured_seq"]
                      > 0, 60, 0.3)
    handle.kill("target-1", signal.SIGSTOP)
    try:
        work.write_bytes(1 * MiB)

        def in_error() -> str:
            h = handle.cli("health")
            assert h.returncode == 2, h.stdout
            return h.stdout

        out = assert_eventually(in_error, 30, 0.5, "health did not report the RPO error")
        assert "policy lab is error" in out or "target-1" in out, out
        alarms = json.loads(handle.cli("alarms", "--json").stdout)
        assert alarms["active"] == {"lab": "error"}, alarms
        assert handle.cli("alarms").returncode == 1
    finally:
        handle.kill("target-1", signal.SIGCONT)

    def recovered() -> None:
        h = handle.cli("health")
        assert h.returncode == 0, h.stdout + h.stderr

    assert_eventually(recovered, 60, 0.5, "health did not recover")
    events = json.loads(handle.cli("alarms", "--json").stdout)["events"]
    kinds = [(e["kind"], e["level"]) for e in events]
    assert ("raised", "warning") in kinds and ("raised", "error") in kinds
    assert kinds[-1] == ("cleared", "ok"), kinds
    assert json.loads(handle.cli("alarms", "--json").stdout)["active"] == {}


def test_policy_crud_via_cli_and_metrics_everywhere(lab: Any, tmp_path: Path) -> None:
    handle = lab(tmp_path / "lab", disk_size="64M")
    bad = handle.cli("policy", "create", "p2", "--target", "target-1",
                     "--disk", "filter-1:diskX:1M", "--set", "compression_level=40")
    assert bad.returncode == 64 and "compression_level" in bad.stderr, bad
    bad = handle.cli("policy", "edit", "lab", "--set", "bandwidth_limit_mbps=-3")
    assert bad.returncode == 64 and bad.stderr.startswith(
        "cdpctl: error: bandwidth_limit_mbps:"), bad.stderr
    ok = handle.cli("policy", "create", "p2", "--target", "target-1",
                    "--disk", "filter-1:diskX:1M", "--disabled", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["enabled"] is False
    assert handle.cli("policy", "create", "p2", "--target", "target-1",
                      "--disk", "filter-1:diskX:1M").returncode == 2
    listed = json.loads(handle.cli("policy", "list", "--json").stdout)["policies"]
    assert [p["name"] for p in listed] == ["lab", "p2"]
    shown = json.loads(handle.cli("policy", "show", "lab", "--json").stdout)
    assert shown["target"] == "target-1" and shown["enabled"] is True
    # a disabled policy is no health problem; the lab policy keeps replicating
    assert handle.cli("health").returncode == 0
    # enabled, p2's new disk is created and attached by filter-1 (issue 11 item 1): ok
    # only once the filter reports it and the target holds its store (a disk that
    # cannot be attached: tests/e2e/test_policy_disks.py; not reported: unit tests)
    assert handle.cli("policy", "enable", "p2").returncode == 0

    def p2_protected() -> None:
        p2 = {p["name"]: p for p in handle.status()["policies"]}["p2"]
        assert (p2["state"], p2["reason"]) == ("ok", ""), p2
        assert handle.cli("health").returncode == 0
    assert_eventually(p2_protected, 30, 0.5, "p2 did not become protected")
    assert handle.cli("policy", "disable", "p2").returncode == 0
    assert handle.cli("health").returncode == 0
    assert handle.cli("policy", "edit", "lab", "--set", "bandwidth_limit_mbps=400").returncode == 0
    assert handle.cli("policy", "disable", "lab").returncode == 0
    st = handle.status()
    assert st["policies"][0]["state"] == "unprotected" and not st["policies"][0]["source_proxy"]
    assert st["policies"][0]["reason"].startswith("disabled by the operator"), st
    assert handle.cli("policy", "enable", "lab").returncode == 0
    assert handle.cli("policy", "delete", "p2").returncode == 0
    assert handle.cli("policy", "show", "p2").returncode == 2
    work = Workload(handle.disk_path(), DISK, seed=9)
    work.write_bytes(2 * MiB)
    wait_replica(handle, work.oracle_sha256())
    watch = handle.cli("status", "--watch", "--json")
    assert watch.returncode == 64
    expected = {
        "coordinator": ["cdp_coordinator_rpo_lag_seconds", "cdp_coordinator_rebinds_total",
                        "cdp_coordinator_policy_epoch", "cdp_coordinator_node_up",
                        "cdp_coordinator_policy_rpo_error_seconds",
                        "cdp_coordinator_policy_alarm_level",
                        "cdp_coordinator_policy_capture_mode"],
        "filter-1": ["cdp_filter_write_bytes_total", "cdp_filter_shipped_bytes_total",
                     "cdp_filter_writes_total", "cdp_filter_journal_bytes",
                     "cdp_filter_durable_seq", "cdp_filter_journal_cap_bytes"],
        "source-proxy-1": ["cdp_proxy_bytes_in_total", "cdp_proxy_bytes_out_total",
                           "cdp_proxy_records_total", "cdp_proxy_deltas_total",
                           "cdp_proxy_policy_bytes_in_total"],
        "target-proxy-1": ["cdp_proxy_bytes_in_total", "cdp_proxy_bytes_out_total",
                           "cdp_proxy_deltas_total"],
        "target-1": ["cdp_target_durable_seq", "cdp_target_applied_seq",
                     "cdp_target_bytes_total", "cdp_target_deltas_total",
                     "cdp_target_apply_seconds_count", "cdp_target_restore_points",
                     "cdp_target_undo_bytes"],
    }
    promtool = shutil.which("promtool")
    for p in handle.processes:
        with urllib.request.urlopen(f"http://{p['metrics_address']}/metrics", timeout=5) as r:
            text = r.read().decode()
        for name in expected[p["id"]]:
            assert any(line.startswith(name) for line in text.splitlines()), (p["id"], name)
        if promtool:   # the exposition lints clean (installed by scripts/bootstrap.sh)
            lint = subprocess.run([promtool, "check", "metrics"], input=text,
                                  capture_output=True, text=True, timeout=30, check=False)
            assert lint.returncode == 0, (p["id"], lint.stdout + lint.stderr)
    lag = metric(handle.process("coordinator")["metrics_address"],
                 "cdp_coordinator_rpo_lag_seconds")
    assert lag >= 0
