"""One conformance suite for every DeltaSink (contract: cdp_proxy/sink.py).

`memory`: sink_memory.MemoryDeltaSink over a MemoryTarget.
`grpc`: sink_grpc.GrpcDeltaSink to the real TargetProxy servicer on loopback,
with the real TargetService (in a tmp dir) behind it.

Each case drives a sink as the source session would (open, sealed frames,
acks) and checks what it answers; `upstream_status` is the status the source
would end the filter's stream with.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from cdp_common import crypto, rpc
from cdp_common.config import TlsConfig
from cdp_common.delta import Extent, encode_chunks
from cdp_common.errors import CdpError
from cdp_common.pb.cdp.v1 import replication_pb2 as rpb
from cdp_common.pb.cdp.v1 import replication_pb2_grpc as rgrpc
from cdp_proxy import frames
from cdp_proxy.sink import DeltaSink
from cdp_proxy.sink_grpc import GrpcDeltaSink
from cdp_proxy.sink_memory import MemoryTarget
from cdp_proxy.stream import Channels, upstream_status
from cdp_proxy.target_role import TargetProxy
from cdp_target.service import TargetService

pytestmark = pytest.mark.timeout(60)

INSECURE = TlsConfig(insecure=True)
KEY = b"k" * 32
RING = crypto.KeyRing.single(KEY)
POLICY = "pol-c"
DISKS = [rpb.DiskInfo(disk_id=0, name="d0", size_bytes=1 << 20)]
WAIT_S = 10.0


@dataclass
class Env:
    make: Callable[[], DeltaSink]
    target_address: str


@pytest.fixture(params=["memory", "grpc"])
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    if request.param == "memory":
        yield Env(MemoryTarget(RING).sink, "memory")
        return
    service = TargetService(tmp_path / "target")
    await service.open_existing()
    target = rpc.Server("127.0.0.1:0", INSECURE, 8 << 20)
    rgrpc.add_TargetServicer_to_server(service, target.grpc)
    await target.start()
    channels = Channels(INSECURE, 8 << 20)
    proxy = rpc.Server("127.0.0.1:0", INSECURE, 8 << 20)
    rgrpc.add_TargetProxyServicer_to_server(TargetProxy("tp", channels, RING), proxy.grpc)
    await proxy.start()
    sinks: list[GrpcDeltaSink] = []

    def make() -> DeltaSink:
        sinks.append(GrpcDeltaSink(channels.get(proxy.address), proxy.address))
        return sinks[-1]

    try:
        yield Env(make, target.address)
    finally:
        for s in sinks:
            s.close()
        await proxy.stop(0)
        await channels.close()
        await target.stop(0)
        await service.close()


class Session:
    """One sink plus the sealer of its session."""

    def __init__(self, env: Env, key: bytes = KEY) -> None:
        self.env = env
        self.sink = env.make()
        self.session_id = os.urandom(crypto.SESSION_ID_BYTES)
        self.ring = crypto.KeyRing.single(key)
        self.sealer: crypto.FrameSealer | None = None

    async def open(self, epoch: int = 1) -> int:
        opening = frames.seal_open(rpb.SessionOpen(
            policy=POLICY, session_id=self.session_id, epoch=epoch, disks=DISKS,
            source_proxy_id="sp", encryption=True, target_address=self.env.target_address),
            self.ring)
        self.sealer = frames.sealer_for(opening, self.ring, 1)
        return await asyncio.wait_for(self.sink.open(opening), WAIT_S)

    def frames(self, first: int, last: int, nbytes: int = 8192,
               frame_bytes: int = 4096) -> list[rpb.DeltaFrame]:
        """A delta [first, last] of one data extent, sealed into frames of `frame_bytes`."""
        chunks = list(encode_chunks([Extent(0, first * 4096, nbytes, os.urandom(nbytes))],
                                    frame_bytes))
        out = []
        assert self.sealer is not None, "open the session first"
        for i, chunk in enumerate(chunks):
            h = crypto.FrameHeader(first, last, i, i == len(chunks) - 1, 1000 + last)
            out.append(frames.frame_of(h, self.sealer.seal(h, chunk), last))
        return out

    async def send(self, fs: list[rpb.DeltaFrame]) -> None:
        for f in fs:
            await asyncio.wait_for(self.sink.send(f), WAIT_S)

    async def ack(self) -> int | None:
        return await asyncio.wait_for(self.sink.ack(), WAIT_S)

    async def delta(self, first: int, last: int) -> int | None:
        await self.send(self.frames(first, last))
        return await self.ack()

    async def failure(self, fs: list[rpb.DeltaFrame]) -> CdpError:
        """Send `fs` and read an ack: the error they end in (send or ack)."""
        with pytest.raises(CdpError) as info:
            await self.send(fs)
            await self.ack()
        return info.value

    async def refused(self, fs: list[rpb.DeltaFrame], status: str, text: str) -> None:
        """Sending `fs` ends the session with a permanent `status` that names `text`."""
        exc = await self.failure(fs)
        assert upstream_status(exc) == status, exc
        assert not exc.transient
        assert text in str(exc)
        self.sink.close()


async def reopened(env: Env, epoch: int = 1) -> int:
    """The durable seq a new session sees (restart)."""
    s = Session(env)
    try:
        return await s.open(epoch)
    finally:
        s.sink.close()


async def test_acks_follow_deltas_and_a_new_session_resumes(env: Env) -> None:
    s = Session(env)
    assert await s.open() == 0
    await s.send(s.frames(1, 3))
    assert await s.ack() == 3
    assert await s.delta(4, 4) == 4
    s.sink.close()
    # restart: the new session starts after everything acked
    s2 = Session(env)
    assert await s2.open() == 4
    assert await s2.delta(5, 6) == 6
    s2.sink.close()
    assert await reopened(env) == 6


async def test_duplicate_delta_is_acked_and_changes_nothing(env: Env) -> None:
    s = Session(env)
    assert await s.open() == 0
    assert await s.delta(1, 2) == 2
    assert await s.delta(1, 2) == 2      # the same delta again
    assert await s.delta(3, 3) == 3      # and the stream goes on
    s.sink.close()
    s2 = Session(env)
    assert await s2.open() == 3
    assert await s2.delta(2, 3) == 3     # wholly below durable: a duplicate too
    assert await s2.delta(4, 5) == 5
    s2.sink.close()


@pytest.mark.parametrize(("first", "last"), [(2, 3), (1, 0)])
async def test_gap_is_a_protocol_error(env: Env, first: int, last: int) -> None:
    s = Session(env)
    assert await s.open() == 0
    fs = s.frames(max(first, 1), max(last, 1))
    for f in fs:
        f.first_seq, f.last_seq = first, last  # bad range; header no longer matches either
    await s.refused(fs, "INVALID_ARGUMENT", "does not follow seq 0")
    assert await reopened(env) == 0


async def test_overlap_is_a_protocol_error(env: Env) -> None:
    s = Session(env)
    assert await s.open() == 0
    assert await s.delta(1, 2) == 2
    await s.refused(s.frames(2, 3), "INVALID_ARGUMENT", "does not follow seq 2")
    assert await reopened(env) == 2


async def test_frame_out_of_order_is_a_protocol_error(env: Env) -> None:
    s = Session(env)
    assert await s.open() == 0
    fs = s.frames(1, 1)
    await s.refused([fs[1], fs[0]], "INVALID_ARGUMENT", "without its frame 0")
    assert await reopened(env) == 0


async def test_wrong_key_is_permission_denied_and_nothing_is_durable(env: Env) -> None:
    s = Session(env, key=b"x" * 32)
    with pytest.raises(CdpError) as info:
        await s.open()  # key confirmation fails before anything is opened downstream
    assert upstream_status(info.value) == "PERMISSION_DENIED", info.value
    assert not info.value.transient
    assert "wrong key or tampered open" in str(info.value)
    s.sink.close()
    assert await reopened(env) == 0


async def test_older_epoch_is_fenced(env: Env) -> None:
    s = Session(env)
    assert await s.open(epoch=5) == 0
    assert await s.delta(1, 1) == 1
    s.sink.close()
    stale = Session(env)
    with pytest.raises(CdpError) as info:
        await stale.open(epoch=4)
    assert upstream_status(info.value) == "FAILED_PRECONDITION", info.value
    assert not info.value.transient
    assert "epoch" in str(info.value)
    stale.sink.close()
    assert await reopened(env, epoch=5) == 1


async def test_newer_epoch_replaces_the_open_session(env: Env) -> None:
    old = Session(env)
    assert await old.open(epoch=1) == 0
    new = Session(env)
    assert await new.open(epoch=2) == 0
    with pytest.raises(CdpError) as info:
        await old.ack()
    assert upstream_status(info.value) == "FAILED_PRECONDITION", info.value
    assert "replaced by a newer stream" in str(info.value)
    assert await new.delta(1, 1) == 1
    old.sink.close()
    new.sink.close()


async def test_delta_without_final_frame_is_dropped_and_resent_whole(env: Env) -> None:
    s = Session(env)
    assert await s.open() == 0
    fs = s.frames(1, 2)
    await s.send(fs[:-1])     # the session ends before the final frame
    s.sink.close()
    s2 = Session(env)
    assert await s2.open() == 0
    assert await s2.delta(1, 2) == 2   # idempotent resend: accepted as if first sent
    s2.sink.close()
    assert await reopened(env) == 2


async def test_close_is_idempotent(env: Env) -> None:
    s = Session(env)
    assert await s.open() == 0
    s.sink.close()
    s.sink.close()
    with pytest.raises(CdpError) as info:
        await s.send(s.frames(1, 1))
        await s.ack()
    assert upstream_status(info.value) == "UNAVAILABLE", info.value
