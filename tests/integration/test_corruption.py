"""Corruption (issue 5, item 7): a flipped byte in a journal segment or in a
stored delta is detected by its checksum, reported, never shipped or applied,
and repaired from the source.

Journal segment (filter stopped). Recovery (cdp_filter.journal J2) cuts the
first record whose CRC fails and everything after it, and the seqs are
reused; the image still holds every one of those writes. Before cutting,
cdp_filter.salvage decodes the cut tail (a record whose header is intact
gives its extent even when its data is bad; an unreadable header makes the
rest unknown: digest sync of every disk), marks those blocks in the dirty
bitmap (fsynced) and puts the resync state into tracking with a "corrupt"
gap; the resync then sends the image's bytes for them as RESYNC records.
The filter reports "journal corruption at seq N ..." for a while.

Stored delta (target). A committed delta that fails its CRC at apply is
reported to cdp_target.repair (repair.json: resync_needed + seq range, an
open "corrupt" gap), moved to <policy>/quarantine/ and applied as an empty
delta, so apply goes on and durable_seq never goes back. The target reports
a resync_request_id in its heartbeat; the coordinator requests a digest sync
of the policy; the filter resends the differing regions; once the sync's
GAP_END is applied the target clears resync_needed and the gap is closed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_eventually, cdpctl
from labwait import policy
from workload import MiB, Workload, sha256_file

from cdp_common import records

pytestmark = pytest.mark.timeout(240)

DISK = 64 * MiB
CHUNK = 64 * 1024


def caught_up(handle: Any) -> dict[str, Any]:
    def done() -> dict[str, Any]:
        p = policy(handle)
        assert p["captured_seq"] > 0 and p["durable_seq"] == p["captured_seq"], p
        return p
    return assert_eventually(done, 60, 0.5, "replication did not catch up")


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))
        f.flush()
        os.fsync(f.fileno())


def write_chunks(path: Path, oracle: bytearray, n: int, base: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        for i in range(n):
            off = base + i * CHUNK
            data = hashlib.sha256(f"chunk {i}".encode()).digest() * (CHUNK // 32)
            os.pwrite(fd, data, off)
            oracle[off:off + CHUNK] = data
        os.fsync(fd)
    finally:
        os.close(fd)


def journal_case(lab: Any, tmp_path: Path) -> tuple[Any, bytearray, int]:
    """Records shipped, then records held in the journal, one of them flipped.

    Returns (handle, oracle, seq of the corrupt record).
    """
    handle = lab(tmp_path / "lab", disk_size="64M")
    work = Workload(handle.disk_path(), DISK, seed=4)
    work.write_bytes(2 * MiB)
    oracle = bytearray(work.oracle)
    shipped = caught_up(handle)["captured_seq"]
    # nothing is acked while the target proxy is down: the next records stay journaled
    cdpctl("lab", "kill", "--dir", str(handle.dir), "target-proxy-1", check=True)
    write_chunks(handle.disk_path(), oracle, 20, 40 * MiB)
    handle.kill("filter-1", signal.SIGTERM, wait_s=30)
    segs = sorted((handle.dir / "data" / "filter-1" / "journal" / "lab").glob("*.seg"))
    target_seq = shipped + 10
    for seg in segs:
        raw = seg.read_bytes()
        spans, _ = records.scan_valid_prefix(raw)
        for seq, start, _end in spans:
            if seq == target_seq:
                flip(seg, start + records.HEADER_SIZE + 100)   # in the data
                break
        else:
            continue
        break
    else:
        raise AssertionError(f"seq {target_seq} not found in {segs}")
    handle.restart("filter-1")
    handle.restart("target-proxy-1")
    return handle, oracle, target_seq


def test_flipped_journal_byte_is_detected_and_not_shipped(lab: Any, tmp_path: Path) -> None:
    handle, oracle, bad_seq = journal_case(lab, tmp_path)
    # the corrupt record and everything after it are cut at open, before the shipper
    # starts (J2); what the cut records wrote is resent from the image (RESYNC records
    # with new seqs), so the corrupt bytes themselves never travel
    log = handle.log("filter-1")
    assert "torn or corrupt tail" in log, log[-2000:]
    assert "journal corruption: cutting" in log and f"from seq {bad_seq}:" in log, log[-3000:]
    assert "marked 11 blocks dirty" in log, log[-3000:]   # the bad record + 10 after it

    def reported() -> dict[str, Any]:
        q = policy(handle)
        assert f"journal corruption at seq {bad_seq}" in q["reason"], q
        return q
    assert_eventually(reported, 30, 0.5, "the journal corruption was not reported")
    p = caught_up(handle)
    assert p["durable_seq"] > bad_seq - 1, (p, bad_seq)
    replica = Path(handle.disks[0]["replica_path"]).read_bytes()
    first_bad = 40 * MiB + 9 * CHUNK   # chunk i has seq shipped + 1 + i
    # every write before the corrupt record made it, byte for byte
    assert replica[:first_bad] == bytes(oracle[:first_bad])
    # the source still holds every write (the image is intact)
    assert sha256_file(handle.disk_path()) == hashlib.sha256(oracle).hexdigest()


def test_flipped_journal_byte_is_repaired_from_the_source(lab: Any, tmp_path: Path) -> None:
    handle, oracle, _bad_seq = journal_case(lab, tmp_path)
    expected = hashlib.sha256(oracle).hexdigest()
    replica = handle.disks[0]["replica_path"]
    assert_eventually(lambda: sha256_file(replica) == expected, 60, 1.0,
                      "the cut records were not resynced from the source")


@contextlib.contextmanager
def immutable(path: Path) -> Any:
    subprocess.run(["chattr", "+i", str(path)], check=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=False)


def delta_case(lab: Any, tmp_path: Path, stop_filter: bool = False,
               ) -> tuple[Any, bytearray, str, dict[str, Any]]:
    """A committed, not yet applied delta whose file gets one flipped byte.

    `stop_filter`: the filter is stopped first, so no resync can repair it."""
    handle = lab(tmp_path / "lab", disk_size="64M")
    oracle = bytearray(DISK)
    write_chunks(handle.disk_path(), oracle, 8, 0)
    caught_up(handle)
    replica = Path(handle.disks[0]["replica_path"])
    with immutable(replica):   # apply fails (EPERM), the delta stays committed
        write_chunks(handle.disk_path(), oracle, 16, 8 * MiB)

        def committed() -> dict[str, Any]:
            q = caught_up(handle)
            assert q["captured_seq"] == 24, q    # 8 + 16 writes, all durable
            return q
        p = assert_eventually(committed, 60, 0.5, "the second batch was not committed")
        assert_eventually(lambda: "Operation not permitted" in handle.log("target-1"), 30, 0.5)
        handle.kill("target-1", signal.SIGTERM, wait_s=30)
    before = sha256_file(replica)
    deltas = sorted((replica.parents[1] / "deltas").glob("*.delta"))
    assert deltas, "no committed delta is waiting"
    flip(deltas[-1], deltas[-1].stat().st_size // 2)
    if stop_filter:
        handle.kill("filter-1", signal.SIGTERM, wait_s=30)
    handle.restart("target-1")
    return handle, oracle, before, p


def test_flipped_delta_byte_is_detected_and_never_applied(lab: Any, tmp_path: Path) -> None:
    # the filter is down: nothing can repair the replica, so what apply did is visible
    handle, _oracle, before, p = delta_case(lab, tmp_path, stop_filter=True)

    def reported() -> dict[str, Any]:
        q = policy(handle)
        assert "corrupt" in q["reason"] and "quarantined" in q["reason"], q
        assert handle.cli("health").returncode != 0
        # apply goes on past it (as an empty delta); durable never goes back
        assert q["applied_seq"] == q["durable_seq"] == p["durable_seq"], q
        return q
    assert_eventually(reported, 30, 0.5, "the corrupt delta was not reported")
    assert "checksum mismatch" in handle.log("target-1")
    replica = Path(handle.disks[0]["replica_path"])
    assert sha256_file(replica) == before, "a corrupt delta changed the replica"
    policy_dir = replica.parents[1]
    assert list((policy_dir / "quarantine").glob("*.delta")), "the delta was not kept aside"
    assert not list((policy_dir / "deltas").glob("*.delta"))
    state = json.loads((policy_dir / "repair.json").read_text())
    assert state["resync_needed"] and state["ranges"], state
    # restore points from the corrupt delta on are flagged inconsistent (an open gap)
    gaps = json.loads((policy_dir / "gaps.json").read_text())["gaps"]
    assert gaps and gaps[-1]["end_seq"] == 0 and gaps[-1]["reason"] == "corrupt", gaps


def test_flipped_delta_byte_is_repaired_from_the_source(lab: Any, tmp_path: Path) -> None:
    handle, oracle, _before, p = delta_case(lab, tmp_path)
    expected = hashlib.sha256(oracle).hexdigest()
    replica = Path(handle.disks[0]["replica_path"])
    assert_eventually(lambda: sha256_file(replica) == expected, 60, 1.0,
                      "the corrupt delta was not repaired from the source")
    policy_dir = replica.parents[1]

    def cleared() -> dict[str, Any]:
        q = policy(handle)
        state = json.loads((policy_dir / "repair.json").read_text())
        assert not state["resync_needed"] and state["repaired"] == 1, state
        assert "corrupt" not in q["reason"], q
        assert q["durable_seq"] > p["durable_seq"], q     # the resync came as new seqs
        return q
    assert_eventually(cleared, 30, 0.5, "resync_needed was not cleared")
    assert list((policy_dir / "quarantine").glob("*.delta")), "the quarantined delta is kept"
    gaps = json.loads((policy_dir / "gaps.json").read_text())["gaps"]
    assert gaps and all(g["end_seq"] for g in gaps), gaps   # the gap closed at the resync
    assert sha256_file(replica) == expected
