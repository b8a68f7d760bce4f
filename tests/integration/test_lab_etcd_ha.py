"""A control plane that survives its own loss (issue 13, done-when), in a lab of
real processes: `cdpctl lab up --store etcd --coordinators 3` (a 3-member etcd
cluster on loopback, three coordinators), 2 source proxies, 2 policies,
writes going on all the time.

A standby asked directly shows the nodes the leader hears as up (its view
reads the leader's liveness entries). SIGKILL of the leader coordinator: a
standby leads (the time is printed, not asserted: tests never fail on
timing), `cdpctl status` through the address list answers, no assignment
changes its epoch; the source proxy serving lab-1, killed right after, is
rebound by the new leader, and only the policies it
served get a new epoch. SIGKILL of one etcd member: no assignment changes, a
policy update still goes through, and every replica equals its source.
Restarted, every killed process rejoins and health is OK.
"""

from __future__ import annotations

import os
import random
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import LabHandle, assert_eventually
from etcdfixture import etcd_skip_reason
from workload import sha256_file

pytestmark = [pytest.mark.root, pytest.mark.timeout(420)]

MiB = 1 << 20


def leader(handle: LabHandle) -> str:
    """The coordinator whose cdp_coordinator_leader gauge is 1 (fails unless one is)."""
    leaders = []
    for p in handle.processes:
        if p["role"] != "coordinator":
            continue
        try:
            with urllib.request.urlopen(f"http://{p['metrics_address']}/metrics",
                                        timeout=2) as reply:
                text = reply.read().decode()
        except OSError:
            continue
        if "cdp_coordinator_leader 1.0" in text:
            leaders.append(p["id"])
    assert len(leaders) == 1, f"leaders: {leaders}"
    return leaders[0]


def standby_view(handle: LabHandle, coordinator: str) -> dict[str, str]:
    """Node id -> state in `coordinator`'s own GetStatus answer (asked directly, so a
    standby's view is not replaced by its leader's as cdpctl would)."""
    from cdp_common import rpc
    from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
    from cdp_common.pb.cdp.v1 import coordinator_pb2_grpc as cgrpc
    channel = rpc.sync_channel(handle.process(coordinator)["address"], handle.tls())
    try:
        reply = cgrpc.CoordinatorStub(channel).GetStatus(cpb.StatusRequest(), timeout=5)
    finally:
        channel.close()
    return {n.info.id: n.state for n in reply.nodes}


def policies(handle: LabHandle) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in handle.status()["policies"]}


class Writer(threading.Thread):
    """Random 64 KiB writes to every disk until stopped (the load)."""

    def __init__(self, disks: list[dict[str, Any]]) -> None:
        super().__init__(daemon=True)
        self.disks = disks
        self.stop = threading.Event()
        self.writes = 0

    def run(self) -> None:
        rng = random.Random(3)
        fds = [os.open(d["path"], os.O_WRONLY) for d in self.disks]
        try:
            while not self.stop.is_set():
                for fd, d in zip(fds, self.disks, strict=True):
                    off = rng.randrange(0, d["size_bytes"] // (64 << 10)) * (64 << 10)
                    os.pwrite(fd, rng.randbytes(64 << 10), off)
                    self.writes += 1
                time.sleep(0.005)
        finally:
            for fd in fds:
                os.close(fd)


def replicas_equal(disks: list[dict[str, Any]]) -> None:
    differ = [d["name"] for d in disks
              if sha256_file(d["replica_path"]) != sha256_file(d["path"])]
    assert differ == [], f"replicas differ from their sources: {differ}"


def test_leader_loss_and_an_etcd_member_loss_under_load(lab: Any, tmp_path: Path) -> None:
    reason = etcd_skip_reason()
    if reason:
        pytest.skip(reason)
    handle = lab(tmp_path / "lab", disk_size="32M", source_proxies=2,
                 extra=("--store", "etcd", "--coordinators", "3", "--policies", "2"))
    assert "," in handle.coordinator, handle.coordinator   # every coordinator is listed
    disks = handle.disks
    assert_eventually(lambda: all(p["state"] == "ok" for p in policies(handle).values()),
                      60, 0.5, "the lab did not become healthy")
    writer = Writer(disks)
    writer.start()
    try:
        assert_eventually(lambda: writer.writes > 50, 30, 0.1, "the writer did not start")
        old_leader = leader(handle)
        before = policies(handle)
        # A standby's own status shows the nodes up (the leader's liveness entries).
        up = {n["id"] for n in handle.status()["nodes"] if n["state"] == "up"}
        standbys = [p["id"] for p in handle.processes
                    if p["role"] == "coordinator" and p["id"] != old_leader]

        def standbys_see_them_up() -> None:
            for sb in standbys:
                view = standby_view(handle, sb)
                assert all(view.get(n) == "up" for n in up), (sb, view)
        assert_eventually(standbys_see_them_up, 15, 0.5,
                          "a standby's status does not show the nodes the leader hears")

        handle.kill(old_leader)
        t0 = time.monotonic()
        assert_eventually(lambda: leader(handle) != old_leader, 60, 0.1,
                          "no standby took over")
        took_over = time.monotonic() - t0
        new_leader = leader(handle)
        assert_eventually(lambda: handle.cli("status", "--json").returncode == 0, 30, 0.2,
                          "status through the address list did not answer")
        print(f"{new_leader} leads {took_over:.2f} s after {old_leader} was killed")
        now = policies(handle)
        assert {n: p["epoch"] for n, p in now.items()} == \
            {n: p["epoch"] for n, p in before.items()}, "a takeover changed an epoch"

        # A source proxy killed right after: the new leader rebinds its policies.
        victim = now["lab-1"]["source_proxy"]
        served = {n for n, p in now.items() if p["source_proxy"] == victim}
        handle.kill(victim)
        t1 = time.monotonic()

        def rebound() -> None:
            ps = policies(handle)
            for n in served:
                assert ps[n]["source_proxy"] not in ("", victim), ps[n]
        assert_eventually(rebound, 60, 0.2, "the new leader did not rebind the policies")
        print(f"{sorted(served)} rebound {time.monotonic() - t1:.2f} s after {victim} died")
        after = policies(handle)
        for n, p in after.items():
            if n in served:
                assert p["epoch"] > now[n]["epoch"], (n, p, now[n])
            else:
                assert p["epoch"] == now[n]["epoch"], f"{n} changed epoch without a cause"

        # One etcd member of three lost: no assignment changes, the store still takes
        # writes. (When the lost member was etcd's raft leader, the election after it
        # can outlast a coordinator's lease on a loaded machine, so which coordinator
        # leads may change; nothing a node or a policy sees does.)
        handle.kill("etcd-2")
        t2 = time.monotonic()

        def edited() -> None:   # idempotent: retried while a leader is being elected
            done = handle.cli("policy", "edit", "lab-2", "--set", "rpo_warning_s=20",
                              "--timeout", "10")
            assert done.returncode == 0, done.stdout + done.stderr
        assert_eventually(edited, 60, 1.0, "the store took no write with etcd-2 lost")
        took = time.monotonic() - t2
        who = assert_eventually(lambda: leader(handle), 30, 0.2, "no coordinator leads")
        print(f"a policy edit went through {took:.1f} s after etcd-2 was lost; {who} leads")
        assert {n: p["epoch"] for n, p in policies(handle).items()} == \
            {n: p["epoch"] for n, p in after.items()}
    finally:
        writer.stop.set()
        writer.join(10)
    assert_eventually(lambda: replicas_equal(disks), 120, 1.0,
                      "the replicas did not catch up with their sources")
    # Everything killed comes back (the etcd member on its own data): health is OK.
    for node_id in ("etcd-2", old_leader, victim):
        handle.restart(node_id)
    assert_eventually(lambda: leader(handle), 30, 0.2, "no coordinator leads")
    assert_eventually(lambda: handle.cli("health").returncode == 0, 60, 1.0,
                      "health is not OK once everything is back")
