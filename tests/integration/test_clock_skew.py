"""A node's skewed clock is seen, alarmed and taken out of the RPO lag.

The filter runs with its clock 30 s ahead (CDP_CLOCK_OFFSET_MS, the clock
seam of cdp_common.clock: the host clock is untouched). Its capture times
are then 30 s in the coordinator's future: without the correction the lag
of an undelivered write would read 0 for half a minute.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_eventually
from labwait import wait_caught_up
from workload import MiB, Workload

pytestmark = pytest.mark.timeout(240)

OFFSET_S = 30.0


def node(status: dict[str, Any], node_id: str) -> dict[str, Any]:
    return next(n for n in status["nodes"] if n["id"] == node_id)


def test_a_skewed_filter_clock_is_alarmed_and_corrected(lab: Any, tmp_path: Path) -> None:
    handle = lab(tmp_path / "lab", disk_size="64M")
    handle.kill("filter-1", signal.SIGTERM, wait_s=30)
    handle.restart("filter-1", env={"CDP_CLOCK_OFFSET_MS": str(int(OFFSET_S * 1000))})
    work = Workload(handle.disk_path(), 64 * MiB, seed=3)
    first_write = time.time()
    work.write_bytes(1 * MiB)
    wait_caught_up(handle, work.oracle_sha256())

    def offset_seen() -> dict[str, Any]:
        st = handle.status()
        off = node(st, "filter-1")["clock_offset_s"]
        assert off is not None and abs(off - OFFSET_S) < 0.5, off
        for n in st["nodes"]:
            if n["id"] != "filter-1" and n["role"] != "coordinator":
                assert n["clock_offset_s"] is not None and abs(n["clock_offset_s"]) < 0.5, n
        p = st["policies"][0]
        assert p["state"] == "degraded", p
        # the offset is estimated from heartbeats: 29.98s on a loaded machine is right
        said = re.search(r"clock of filter-1 is ([0-9.]+)s ahead of", p["reason"])
        assert said and abs(float(said.group(1)) - OFFSET_S) < 0.5, p
        return st
    assert_eventually(offset_seen, 30, 0.5, "the filter's clock offset was not reported")

    health = handle.cli("health", "--json")
    assert health.returncode == 1, health.stdout + health.stderr
    problems = json.loads(health.stdout)["problems"]
    assert any(x["kind"] == "clock" and x["id"] == "filter-1" for x in problems), problems
    alarms = handle.cli("alarms", "--json").stdout  # exits 1: a warning is active
    assert "clock of filter-1" in alarms, alarms

    # The lag counts from the capture of the newest durable write (before the stop,
    # after the first write), corrected: with the target stopped it is at least the
    # stop and at most the time since the first write; uncorrected it would read 0.
    target = handle.pid("target-1")
    stopped = time.time()
    os.kill(target, signal.SIGSTOP)
    try:
        for _ in range(5):
            work.write_bytes(256 * 1024)
            time.sleep(0.5)
        elapsed = time.time() - stopped
        lag = handle.status()["policies"][0]["rpo_lag_s"]
        since_first = time.time() - first_write
    finally:
        os.kill(target, signal.SIGCONT)
    assert elapsed - 1.0 <= lag <= since_first + 1.0, (lag, elapsed, since_first)
    wait_caught_up(handle, work.oracle_sha256(), timeout_s=90.0)
