"""Sessions are bound to signed assignments, against a real lab (issue 10, item 3).

Every attack uses a certificate the CA really issued and, where it helps the
attacker, a real signed assignment fetched from the coordinator with the
filter's own certificate (any node can see its assignments), or even the
master key (a stolen source proxy). Each is refused with PERMISSION_DENIED,
and nothing changed: the target's durable seq and epoch, the replica bytes,
the policies and restore points (securitylab.snapshot). Then the lab's own
filter -> proxies -> target still replicates.

- Target.Apply straight at the target with the filter's certificate (refused by
  the authorization table) and with a target-proxy certificate the assignment
  does not name (refused by the assignment check): without an assignment, at
  epoch 2^63, and with the real signed assignment replayed.
- TargetProxy.Replicate with the source proxy's certificate AND the master key:
  the real assignment at a forged epoch 2^63, and claims re-written to 2^63
  under the original signature. The policy is not fenced.
- SourceProxy.Ship with the filter's certificate: the real assignment with its
  target proxy address changed (the proxy must dial only what the coordinator
  signed), and a hello without any assignment.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import LabHandle
from labwait import wait_caught_up
from securitylab import address_of, assert_unchanged, channel, issue, node_tls, snapshot
from workload import MiB, Workload

from cdp_common import crypto, delta
from cdp_common.config import TlsConfig
from cdp_common.pb.cdp.v1 import assignment_pb2 as apb
from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
from cdp_common.pb.cdp.v1 import coordinator_pb2_grpc as cgrpc
from cdp_common.pb.cdp.v1 import replication_pb2 as rpb
from cdp_common.pb.cdp.v1 import replication_pb2_grpc as rgrpc
from cdp_proxy import frames

pytestmark = pytest.mark.timeout(300)

DISK = 64 * MiB
HUGE_EPOCH = 2**63


def target_state(lab: LabHandle) -> rpb.PolicyState:
    with channel(lab, address_of(lab, "target-1"), lab.tls()) as ch:
        reply = rgrpc.TargetStub(ch).GetPolicyState(rpb.PolicyStateRequest(), timeout=10)
    assert len(reply.policies) == 1, reply
    return reply.policies[0]


def real_assignment(lab: LabHandle) -> cpb.Assignment:
    """The lab policy's assignment as the coordinator sends it to filter-1."""
    with channel(lab, lab.coordinator, node_tls(lab, "filter-1")) as ch:
        stream = cgrpc.CoordinatorStub(ch).WatchAssignments(
            cpb.WatchRequest(node_id="filter-1"), timeout=10)
        for update in stream:
            for a in update.assignments:
                if a.policy == "lab" and a.signed.signature:
                    stream.cancel()
                    return a
    raise AssertionError("no signed assignment for the lab policy")


def forged_chunk(first_seq: int) -> rpb.DeltaChunk:
    (extents,) = delta.encode_chunks([delta.Extent(0, 0, 8192, b"\xee" * 8192)], 1 << 20)
    return rpb.DeltaChunk(first_seq=first_seq, last_seq=first_seq, index=0, final=True,
                          newest_time_ns=1, extents=extents, captured_seq=first_seq)


def refused(call: Any, what: str) -> grpc.RpcError:
    """Drain a response stream; it must end with PERMISSION_DENIED before any reply."""
    with pytest.raises(grpc.RpcError) as info:
        for resp in call:
            raise AssertionError(f"{what}: the open was answered: {resp}")
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, (what, info.value)
    return info.value


def apply_attack(lab: LabHandle, tls: TlsConfig, state: rpb.PolicyState, epoch: int,
                 signed: apb.SignedAssignment | None, what: str) -> grpc.RpcError:
    def requests() -> Iterator[rpb.ApplyRequest]:
        yield rpb.ApplyRequest(open=rpb.ApplyOpen(
            policy=state.policy, epoch=epoch, disks=list(state.disks),
            captured_seq=state.durable_seq + 1, assignment=signed))
        yield rpb.ApplyRequest(chunk=forged_chunk(state.durable_seq + 1))
    with channel(lab, address_of(lab, "target-1"), tls) as ch:
        return refused(rgrpc.TargetStub(ch).Apply(requests(), timeout=20), what)


def replicate_attack(lab: LabHandle, state: rpb.PolicyState, epoch: int,
                     signed: apb.SignedAssignment, encryption: bool,
                     what: str) -> grpc.RpcError:
    """A stolen source proxy: its certificate and the lab's master key."""
    keys = crypto.load_key_ring(lab.dir / "config" / "master.key")
    o = frames.seal_open(rpb.SessionOpen(
        policy=state.policy, session_id=os.urandom(crypto.SESSION_ID_BYTES), epoch=epoch,
        disks=list(state.disks), source_proxy_id="source-proxy-1",
        captured_seq=state.durable_seq + 1, encryption=encryption,
        target_address=address_of(lab, "target-1"), assignment=signed), keys)
    with channel(lab, address_of(lab, "target-proxy-1"), node_tls(lab, "source-proxy-1")) as ch:
        return refused(rgrpc.TargetProxyStub(ch).Replicate(
            iter([rpb.ReplicateRequest(open=o)]), timeout=20), what)


def ship_attack(lab: LabHandle, a: cpb.Assignment, signed: apb.SignedAssignment | None,
                what: str) -> grpc.RpcError:
    hello = rpb.ShipHello(
        policy=a.policy, filter_id="filter-1", epoch=a.epoch,
        disks=[rpb.DiskInfo(disk_id=d.disk_id, name=d.name, size_bytes=d.size_bytes)
               for d in a.disks],
        target_proxy_address=a.target_proxy.address, target_address=a.target.address,
        encryption=a.encryption, assignment=signed)
    with channel(lab, address_of(lab, "source-proxy-1"), node_tls(lab, "filter-1")) as ch:
        return refused(rgrpc.SourceProxyStub(ch).Ship(
            iter([rpb.ShipRequest(hello=hello)]), timeout=20), what)


def test_sessions_need_a_signed_assignment_that_names_both_ends(lab: Any,
                                                               tmp_path: Path) -> None:
    handle: LabHandle = lab(tmp_path / "lab", disk_size="64M")
    work = Workload(handle.disk_path(), DISK, seed=31)
    work.write_bytes(2 * MiB)
    wait_caught_up(handle, work.oracle_sha256())
    before, state = snapshot(handle), target_state(handle)
    a = real_assignment(handle)
    assert a.epoch == state.epoch and a.target_proxy.node_id == "target-proxy-1"
    claims = apb.AssignmentClaims.FromString(a.signed.claims)
    stranger = issue(handle, "target-proxy-9", "target-proxy")

    def unchanged(what: str) -> None:
        now = target_state(handle)
        assert (now.durable_seq, now.epoch) == (state.durable_seq, state.epoch), what

    # Target.Apply straight at the target
    for who, tls in (("filter-1", node_tls(handle, "filter-1")), ("target-proxy-9", stranger)):
        for what, epoch, signed in (
                ("no assignment", state.epoch, None),
                ("epoch 2^63, no assignment", HUGE_EPOCH, None),
                ("the real assignment replayed", state.epoch, a.signed)):
            err = apply_attack(handle, tls, state, epoch, signed, f"{who}: {what}")
            if who == "filter-1":   # the wrong role: the authorization table already
                assert "may not call Target.Apply" in (err.details() or ""), err
            elif signed is not None:  # the right role, but not the one assigned
                assert "is not the target-proxy of lab" in (err.details() or ""), err
            unchanged(f"{who}: {what}")

    # TargetProxy.Replicate by a stolen source proxy (certificate and master key)
    err = replicate_attack(handle, state, HUGE_EPOCH, a.signed, a.encryption,
                           "epoch 2^63 with the real assignment")
    assert "is not the signed assignment's" in (err.details() or ""), err
    forged = apb.AssignmentClaims()
    forged.CopyFrom(claims)
    forged.epoch = HUGE_EPOCH
    err = replicate_attack(handle, state, HUGE_EPOCH, apb.SignedAssignment(
        claims=forged.SerializeToString(), signature=a.signed.signature), a.encryption,
        "claims re-written to epoch 2^63")
    assert "signature does not verify" in (err.details() or ""), err
    err = replicate_attack(handle, state, state.epoch, a.signed, not a.encryption,
                           "the encryption flag flipped")
    assert "no downgrade" in (err.details() or ""), err
    unchanged("replicate attacks")

    # SourceProxy.Ship: the proxy dials only what the coordinator signed
    moved = apb.AssignmentClaims()
    moved.CopyFrom(claims)
    moved.target_proxy_address = "127.0.0.1:9"
    ship_attack(handle, a, apb.SignedAssignment(claims=moved.SerializeToString(),
                                                signature=a.signed.signature),
                "a re-pointed target proxy address")
    ship_attack(handle, a, None, "no assignment")
    unchanged("ship attacks")

    assert_unchanged(before, handle)
    # the rightful path still replicates, at the same epoch: nothing was fenced
    work.write_bytes(2 * MiB)
    wait_caught_up(handle, work.oracle_sha256())
    assert target_state(handle).epoch == state.epoch
