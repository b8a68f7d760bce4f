"""Encryption cannot be downgraded, and the master key rotates without downtime,
against a real lab (issue 10, items 4 and 9).

Downgrade: with the lab's own source-proxy certificate (the rightful role: a
stolen certificate, without the master key), open `TargetProxy.Replicate` with
`encryption = false` and no MAC, a MAC under a wrong key, or an unknown key id,
and send plaintext frames: PERMISSION_DENIED every time, and nothing reached the
target (its durable seq and the replica bytes, the lab's snapshot). The real
source proxy, which holds the key, still replicates.

Rotation: rotate the lab's key ring (one file for both proxies), SIGHUP the
target proxy, then the source proxy, writing throughout; the replica equals the
source and the source proxy's new sessions use key id 1; retire key id 0, SIGHUP
both: replication still works.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import LabHandle, assert_eventually, cdpctl
from labwait import wait_caught_up
from securitylab import address_of, assert_unchanged, channel, node_tls, snapshot
from workload import MiB, Workload

from cdp_common import crypto, delta
from cdp_common.pb.cdp.v1 import replication_pb2 as rpb
from cdp_common.pb.cdp.v1 import replication_pb2_grpc as rgrpc
from cdp_proxy import frames

pytestmark = pytest.mark.timeout(300)

DISK = 64 * MiB


def target_state(lab: LabHandle) -> rpb.PolicyState:
    with channel(lab, address_of(lab, "target-1"), lab.tls()) as ch:
        reply = rgrpc.TargetStub(ch).GetPolicyState(rpb.PolicyStateRequest(), timeout=10)
    assert len(reply.policies) == 1, reply
    return reply.policies[0]


def attack_open(lab: LabHandle, state: rpb.PolicyState, *, encryption: bool,
                keys: crypto.KeyRing | None, key_id: int = 0) -> rpb.SessionOpen:
    """The one place an attack's session open is built: every claim as the real
    source proxy would make it, MAC'd under `keys` (None: no MAC at all).
    When signed assignments become required in the open, add them here."""
    o = rpb.SessionOpen(policy=state.policy, session_id=os.urandom(crypto.SESSION_ID_BYTES),
                        epoch=state.epoch, disks=list(state.disks),
                        source_proxy_id="source-proxy-1", captured_seq=state.durable_seq + 1,
                        encryption=encryption, target_address=address_of(lab, "target-1"))
    if keys is not None:
        frames.seal_open(o, keys)
    else:
        o.key_id = key_id
    return o


def plaintext_frames(o: rpb.SessionOpen, first_seq: int) -> Iterator[rpb.ReplicateRequest]:
    """The open, then one forged delta (0xEE over the first 8 KiB) as plaintext frames."""
    yield rpb.ReplicateRequest(open=o)
    sealer = crypto.FrameSealer(o.policy, o.session_id, None, 0, key_id=o.key_id)
    chunks = list(delta.encode_chunks([delta.Extent(0, 0, 8192, b"\xee" * 8192)], 4096))
    for i, chunk in enumerate(chunks):
        h = crypto.FrameHeader(first_seq, first_seq, i, i == len(chunks) - 1, 1)
        yield rpb.ReplicateRequest(frame=frames.frame_of(h, sealer.seal(h, chunk), first_seq))


def replicate(lab: LabHandle, o: rpb.SessionOpen, first_seq: int) -> grpc.RpcError:
    """Run the attack's stream to its end; the error it ended with."""
    # the lab's own source-proxy certificate: the right role, without the key
    with channel(lab, address_of(lab, "target-proxy-1"), node_tls(lab, "source-proxy-1")) as ch:
        responses = rgrpc.TargetProxyStub(ch).Replicate(plaintext_frames(o, first_seq),
                                                        timeout=20)
        with pytest.raises(grpc.RpcError) as info:
            for resp in responses:
                assert resp.WhichOneof("body") != "accepted", "the open was accepted"
    return info.value


def test_downgrade_without_the_key_reaches_nothing(lab: Any, tmp_path: Path) -> None:
    handle: LabHandle = lab(tmp_path / "lab", disk_size="64M")
    work = Workload(handle.disk_path(), DISK, seed=21)
    work.write_bytes(2 * MiB)
    wait_caught_up(handle, work.oracle_sha256())
    before = snapshot(handle)
    state = target_state(handle)
    wrong = crypto.KeyRing.single(os.urandom(32))
    attacks = {
        "plaintext, no MAC": attack_open(handle, state, encryption=False, keys=None),
        "plaintext, MAC under a wrong key": attack_open(handle, state, encryption=False,
                                                        keys=wrong),
        "plaintext, an unknown key id": attack_open(handle, state, encryption=False,
                                                    keys=None, key_id=7),
        "encrypted, MAC under a wrong key": attack_open(handle, state, encryption=True,
                                                        keys=wrong),
    }
    for name, o in attacks.items():
        err = replicate(handle, o, state.durable_seq + 1)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, (name, err)
        after = target_state(handle)
        assert (after.durable_seq, after.epoch) == (state.durable_seq, state.epoch), name
    assert_unchanged(before, handle)
    log = handle.log("target-proxy-1")
    assert "failed key confirmation" in log and "key id 7 is not in this proxy's key ring" in log
    # the rightful source proxy, which holds the key, still replicates
    work.write_bytes(2 * MiB)
    wait_caught_up(handle, work.oracle_sha256())


def _sighup(handle: LabHandle, node_id: str, expect: str) -> None:
    handle.kill(node_id, signal.SIGHUP)
    assert_eventually(lambda: expect in handle.log(node_id), 15, 0.2,
                      f"{node_id} did not log {expect!r} after SIGHUP")


def test_key_rotation_without_downtime(lab: Any, tmp_path: Path) -> None:
    handle: LabHandle = lab(tmp_path / "lab", disk_size="64M")
    key_file = handle.dir / "config" / "master.key"
    work = Workload(handle.disk_path(), DISK, seed=23)
    work.write_bytes(1 * MiB)
    wait_caught_up(handle, work.oracle_sha256())
    assert "session open with key id 0" in handle.log("source-proxy-1")
    stop = threading.Event()
    failure: list[BaseException] = []

    def writer() -> None:
        try:
            while not stop.is_set():
                work.write_bytes(256 * 1024)
        except BaseException as exc:  # surfaced by the main thread
            failure.append(exc)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        done = cdpctl("keygen", "--rotate", str(key_file), check=True)
        assert "added key id 1" in done.stdout
        # the target proxies first (they then accept both keys), then the source proxies
        _sighup(handle, "target-proxy-1", "key ids 1, 0")
        _sighup(handle, "source-proxy-1", "new sessions seal with key id 1")
        assert_eventually(lambda: "session open with key id 1" in handle.log("source-proxy-1"),
                          30, 0.2, "the source proxy did not reopen under key id 1")
        assert_eventually(
            lambda: "with key id 1, target durable seq" in handle.log("target-proxy-1"),
            30, 0.2, "the target proxy saw no session under key id 1")
        # every proxy runs the new key: retire the old one
        done = cdpctl("keygen", "--retire", "0", str(key_file), check=True)
        assert crypto.load_key_ring(key_file).ids() == [1]
        _sighup(handle, "target-proxy-1", "key ids 1, new sessions")
        _sighup(handle, "source-proxy-1", "key ids 1, new sessions")
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive() and not failure, failure
    wait_caught_up(handle, work.oracle_sha256())
    work.write_bytes(1 * MiB)  # and replication still works after the retirement
    wait_caught_up(handle, work.oracle_sha256())
    assert "key ring was rotated" in handle.log("source-proxy-1")
    assert "failed key confirmation" not in handle.log("target-proxy-1")
