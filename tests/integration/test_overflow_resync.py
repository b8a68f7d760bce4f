"""Journal overflow → dirty-block tracking → resync, with five real daemons.

The filter runs with a small journal cap; the target is stopped (SIGSTOP)
while more than the cap is written. Writes never fail, the filter switches to
dirty tracking, and once the target continues it resyncs: the replica ends
byte-identical to the source and the target records a gap for the outage,
closed at a seq after which restore points are consistent again.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_eventually
from labwait import wait_caught_up
from workload import MiB, Workload, sha256_file

from cdp_common import rpc
from cdp_common.pb.cdp.v1 import replication_pb2 as rpb
from cdp_common.pb.cdp.v1 import replication_pb2_grpc as rgrpc

pytestmark = pytest.mark.timeout(300)

DISK = 256 * MiB
CAP = 8 * MiB


def target_state(handle: Any) -> rpb.PolicyState:
    async def call() -> rpb.PolicyStateReply:
        channel = rpc.channel(handle.process("target-1")["address"], handle.tls(), 8 * MiB)
        try:
            return await rgrpc.TargetStub(channel).GetPolicyState(rpb.PolicyStateRequest(),
                                                                  timeout=10)
        finally:
            await channel.close()
    reply = asyncio.run(call())
    assert reply.policies, "target knows no policy"
    return reply.policies[0]


def wait_identical(handle: Any, expected: str) -> None:
    """Resyncs are slow: up to 240 s until durable, applied and identical."""
    wait_caught_up(handle, expected, timeout_s=240.0, applied=True)


def test_target_down_past_journal_cap_resyncs_with_a_gap(lab: Any, tmp_path: Path) -> None:
    handle = lab(tmp_path / "lab", disk_size="256M")
    handle.set_config("filter-1", "filter", journal_cap_bytes=CAP, journal_segment_bytes=1 * MiB,
                      dirty_block_bytes=64 * 1024)
    work = Workload(handle.disk_path(), DISK, seed=5)
    work.write_bytes(4 * MiB)
    wait_identical(handle, work.oracle_sha256())
    assert not target_state(handle).gaps

    target_pid = handle.pid("target-1")
    os.kill(target_pid, signal.SIGSTOP)
    try:
        work.write_bytes(4 * CAP)  # never fails, never blocks for long
        log = handle.log("filter-1")
        assert "tracking dirty blocks" in log, "the filter did not switch to dirty tracking"
    finally:
        os.kill(target_pid, signal.SIGCONT)
    work.write_bytes(2 * MiB)  # writes during/after the resync are journaled and win
    expected = work.oracle_sha256()
    assert sha256_file(handle.disk_path()) == expected
    wait_identical(handle, expected)

    def gap_closed() -> None:
        gaps = target_state(handle).gaps
        assert len(gaps) == 1 and gaps[0].end_seq > gaps[0].begin_seq, gaps

    assert_eventually(gap_closed, 30, 0.5, "the target did not record a closed gap")
    gap = target_state(handle).gaps[0]
    assert gap.begin_time_ns and gap.end_time_ns >= gap.begin_time_ns
    assert "resync done" in handle.log("filter-1")


def test_journal_volume_full_tracks_instead_of_failing(lab: Any, tmp_path: Path) -> None:
    """The journal lives on a tiny tmpfs: ENOSPC switches to dirty tracking, writes succeed."""
    handle = lab(tmp_path / "lab", disk_size="256M")
    data_dir = Path(tomllib.loads(Path(handle.process("filter-1")["config"]).read_text())
                    ["filter"]["data_dir"])
    journal = data_dir / "journal"
    handle.kill("filter-1", signal.SIGTERM, wait_s=30)
    for p in journal.glob("*/*"):
        p.unlink()
    journal.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(journal)], check=True)
    try:
        handle.restart("filter-1")
        work = Workload(handle.disk_path(), DISK, seed=9)
        target_pid = handle.pid("target-1")
        os.kill(target_pid, signal.SIGSTOP)
        try:
            work.write_bytes(24 * MiB)
        finally:
            os.kill(target_pid, signal.SIGCONT)
        assert "journal volume full" in handle.log("filter-1")
        expected = work.oracle_sha256()
        wait_identical(handle, expected)
    finally:
        handle.kill("filter-1", signal.SIGTERM, wait_s=30)
        subprocess.run(["umount", "-l", str(journal)], check=False)
