"""Network faults between two sites in network namespaces (issue 5, item 5).

Source site (coordinator, filter, source proxy) and DR site (target proxy,
target) are joined by one veth pair on TEST-NET-2 (tests/netsites.py). One
set of daemons goes through three faults in turn, with writes during each:

1. a full partition (iptables DROP both ways) for three leases and more:
   the DR nodes' leases expire, `cdpctl health` reports an error, the filter
   keeps accepting writes into its journal, nothing becomes durable; when
   the link returns, everything recovers by itself;
2. 10 % random packet loss each way (iptables statistic): replication is
   slower but complete;
3. a 20 Mbit/s token-bucket cap on what the source site sends (tc tbf):
   the backlog drains at the capped rate.

After each fault: replica == source byte for byte, durable == captured,
and health back to ok.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest
from netsites import TwoSites, netns_skip_reason
from workload import MiB, sha256_file

pytestmark = pytest.mark.timeout(400)

DISK = 64 * MiB


class Writer:
    """Plain writes through the FUSE disk with an oracle (all acknowledged)."""

    def __init__(self, path: Path, seed: int) -> None:
        self.path = path
        self.rng = random.Random(seed)
        self.oracle = bytearray(DISK)

    def write(self, total: int, chunk: int = 256 * 1024) -> None:
        fd = os.open(self.path, os.O_RDWR)
        try:
            for _ in range(total // chunk):
                off = self.rng.randrange(0, DISK // chunk) * chunk
                data = self.rng.randbytes(chunk)  # incompressible: the link is the bottleneck
                os.pwrite(fd, data, off)
                self.oracle[off:off + chunk] = data
            os.fsync(fd)
        finally:
            os.close(fd)

    def sha(self) -> str:
        return hashlib.sha256(self.oracle).hexdigest()


def caught_up(sites: TwoSites, writer: Writer, timeout_s: float, what: str) -> dict[str, Any]:
    expected = writer.sha()
    assert sha256_file(sites.disk_path) == expected, "the source lost a write"
    last: dict[str, Any] = {}

    def done() -> bool:
        nonlocal last
        last = sites.policy()
        return bool(last["captured_seq"] > 0 and
                    last["durable_seq"] == last["captured_seq"] == last["applied_seq"] and
                    sha256_file(sites.replica_path) == expected)

    sites.wait(done, timeout_s, f"{what}: the replica did not catch up ({last})")
    sites.wait(lambda: sites.cli("health").returncode == 0, 30,
               f"{what}: health did not return to ok")
    return last


@pytest.fixture
def sites(tmp_path: Path) -> Any:
    reason = netns_skip_reason()
    if reason:
        pytest.skip(reason)
    s = TwoSites(tmp_path / "sites", DISK)
    try:
        s.up()
        yield s
    finally:
        s.down()


def test_partition_loss_and_bandwidth_cap(sites: TwoSites) -> None:
    w = Writer(sites.disk_path, seed=9)
    w.write(4 * MiB)
    caught_up(sites, w, 60, "before any fault")
    st = sites.status()
    assert {n["id"]: n["site"] for n in st["nodes"]}["target-1"] == "dr"

    # 1. full partition, longer than the lease (3 s): alarm, journal grows
    sites.partition(True)
    try:
        durable_before = sites.policy()["durable_seq"]
        w.write(4 * MiB)   # the application is not held up by the partition
        t0 = time.monotonic()

        def alarmed() -> bool:
            health = sites.cli("health")
            return health.returncode == 2
        sites.wait(alarmed, 30, "a partition raised no alarm")
        p = sites.policy()
        assert p["durable_seq"] == durable_before, p
        assert p["captured_seq"] > durable_before and p["journal_bytes"] > 0, p

        def dr_site_down() -> bool:
            # both DR nodes' leases run out, each a heartbeat period (1 s) apart at most
            down = {n["id"] for n in sites.status()["nodes"] if n["state"] != "up"}
            return {"target-1", "target-proxy-1"} <= down
        sites.wait(dr_site_down, 10, "the DR site's nodes were not marked down")
        time.sleep(max(0.0, 9.0 - (time.monotonic() - t0)))   # three leases and more
        w.write(2 * MiB)
    finally:
        sites.partition(False)
    caught_up(sites, w, 90, "after the partition")

    # 2. 10 % packet loss each way
    sites.loss(True)
    try:
        w.write(6 * MiB)
        caught_up(sites, w, 120, "under 10 % loss")
    finally:
        sites.loss(False)

    # 3. 20 Mbit/s cap from the source site: 12 MiB need about 5 s on the wire
    sites.bandwidth(True)
    try:
        t0 = time.monotonic()
        w.write(12 * MiB)
        caught_up(sites, w, 120, "under a 20 Mbit/s cap")
        elapsed = time.monotonic() - t0
    finally:
        sites.bandwidth(False)
    print(f"12 MiB through a 20 Mbit/s cap in {elapsed:.1f}s")
    assert sites.cli("health").returncode == 0
