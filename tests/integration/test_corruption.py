"""Corruption (issue 5, item 7): a flipped byte in a journal segment or in a
stored delta is detected by its checksum, reported, and never shipped or
applied.

Repair from the source is designed below; the tests that demand it are
marked xfail (not run) until it exists.

Journal segment (filter stopped). Recovery (cdp_filter.journal J2) cuts the
first record whose CRC fails and everything after it, logs it, and the seqs
are reused. The image still holds every one of those writes, the target
none, so the replica silently lacks them. Repair: before cutting, parse the
cut tail record by record; a record whose header is intact gives (disk,
offset, length) even when its data is bad, a later record that passes its
CRC gives its extent; mark those blocks in the dirty-block bitmap (part A,
cdp_filter/dirty.py) so the resync sends them from the image. When a
header itself is unreadable the range is unknown: mark every disk of the
policy for a digest resync (part A item 2: only differing regions move).

Stored delta (target). Today a corrupt committed delta is detected on apply
(DeltaReader CRC), reported as the policy's error (health not ok), left in
place and retried, so apply stops at it and later deltas wait behind it;
the replica is never touched by it. The source cannot resend it: it is
acked, so the filter trimmed it. Repair: move the file aside
(deltas/corrupt-<first>-<last>.delta, kept for forensics), persist in
state.json a `resync_needed` mark with the seq range, let apply go on past
it (later deltas are whole), record a restore-point gap from its first seq
to the end of the resync, and ask the source for a digest resync of the
policy's disks (a field in ApplyOpened or the heartbeat reply); the mark is
cleared when that resync is durable. Acked data is never rolled back:
durable_seq does not go back.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_eventually, cdpctl
from workload import MiB, Workload, sha256_file

from cdp_common import records

pytestmark = pytest.mark.timeout(240)

DISK = 64 * MiB
CHUNK = 64 * 1024


def policy(handle: Any) -> dict[str, Any]:
    return dict(handle.status()["policies"][0])


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


def delta_case(lab: Any, tmp_path: Path) -> tuple[Any, bytearray, str, dict[str, Any]]:
    """A committed, not yet applied delta whose file gets one flipped byte."""
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
    handle.restart("target-1")
    return handle, oracle, before, p


def test_flipped_delta_byte_is_detected_and_never_applied(lab: Any, tmp_path: Path) -> None:
    handle, _oracle, before, p = delta_case(lab, tmp_path)

    def reported() -> dict[str, Any]:
        q = policy(handle)
        assert "corrupt" in q["reason"], q
        assert handle.cli("health").returncode != 0
        return q
    q = assert_eventually(reported, 30, 0.5, "the corrupt delta was not reported")
    assert "checksum mismatch" in handle.log("target-1")
    assert q["applied_seq"] < q["durable_seq"] == p["durable_seq"], q
    replica = handle.disks[0]["replica_path"]
    assert sha256_file(replica) == before, "a corrupt delta changed the replica"


@pytest.mark.xfail(reason="repair needs the target to quarantine the delta and a digest "
                          "resync of the disk from the source (module docstring)",
                   strict=False, run=False)
def test_flipped_delta_byte_is_repaired_from_the_source(lab: Any, tmp_path: Path) -> None:
    handle, oracle, _before, _p = delta_case(lab, tmp_path)
    expected = hashlib.sha256(oracle).hexdigest()
    replica = handle.disks[0]["replica_path"]
    assert_eventually(lambda: sha256_file(replica) == expected, 30, 1.0,
                      "the corrupt delta was not repaired from the source")
