"""Journal overflow → dirty-block tracking → resync, with five real daemons.

The filter runs with a small journal cap; the target is stopped (SIGSTOP)
while more than the cap is written. Writes never fail, the filter switches to
dirty tracking, and once the target continues it resyncs: the replica ends
byte-identical to the source and the target records a gap for the outage,
closed at a seq after which restore points are consistent again.
"""

from __future__ import annotations

import asyncio
import json
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

        def gap_shown() -> None:   # the open gap is a reason, whatever else is wrong
            p = handle.status()["policies"][0]
            assert p["state"] in ("degraded", "error"), p
            assert "overflow gap open: restore points since " in p["reason"], p
            assert "are not restorable until it closes" in p["reason"], p
        assert_eventually(gap_shown, 30, 0.5, "status did not show the open gap")
        assert handle.cli("health").returncode != 0
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

    def ok_again() -> None:
        p = handle.status()["policies"][0]
        assert (p["state"], p["reason"]) == ("ok", ""), p
    assert_eventually(ok_again, 30, 0.5, "the policy did not return to ok")
    restores_refuse_the_gap(handle, work, gap)


def restores_refuse_the_gap(handle: Any, work: Workload, gap: rpb.Gap) -> None:
    """A point inside the gap is refused (nothing written) unless allowed, and then
    says consistent: false; "latest" holds every write the target acked."""
    pts = json.loads(handle.cli("restore-points", "lab", "--json", check=True).stdout)
    inside = [p for p in pts if gap.begin_seq <= p["last_seq"] < gap.end_seq]
    assert inside, f"no restore point inside the gap {gap} to try: {pts}"
    assert all(not p["consistent"] for p in inside), inside
    point = inside[-1]
    out = Path(handle.info["restore_dir"]) / "into-the-gap"
    refused = handle.cli("restore", "lab", "--point", str(point["id"]), "--out", str(out))
    assert refused.returncode != 0, refused.stdout
    assert f"lies in a gap (overflow gap: points with last seq {gap.begin_seq}.." \
        in refused.stderr, refused.stderr
    assert not out.exists() or not any(out.iterdir()), "a refused restore wrote files"
    refused = handle.cli("failover", "lab", "--point", str(point["id"]))
    assert refused.returncode != 0 and "lies in a gap" in refused.stderr, refused.stderr
    points_doc = handle.cli("restore-points", "lab", check=True).stdout
    assert "failover" not in points_doc, points_doc      # no failover state was left
    allowed = handle.cli("restore", "lab", "--point", str(point["id"]), "--out", str(out),
                         "--allow-inconsistent", "--json", check=True)
    doc = json.loads(allowed.stdout)
    assert doc["point"]["consistent"] is False and "overflow gap" in doc["point"]["gap"]
    for img in doc["images"]:
        os.unlink(img["path"])

    work.write_bytes(1 * MiB)
    expected = work.oracle_sha256()

    def durable() -> None:  # acked by the target; applied or not does not matter
        p = handle.status()["policies"][0]
        assert p["captured_seq"] > gap.end_seq and p["durable_seq"] == p["captured_seq"], p
    assert_eventually(durable, 60, 0.2, "the last write was not made durable")
    latest = Path(handle.info["restore_dir"]) / "latest"
    doc = json.loads(handle.cli("restore", "lab", "--latest", "--out", str(latest), "--json",
                                check=True).stdout)
    assert doc["point"]["consistent"] is True, doc
    assert doc["point"]["last_seq"] >= gap.end_seq
    [img] = doc["images"]
    assert sha256_file(Path(img["path"])) == expected, "latest left out an acked write"
    os.unlink(img["path"])


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
