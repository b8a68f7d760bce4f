"""Source proxy + target proxy + the real target service, on loopback (insecure gRPC).

The test plays the filter: it opens `SourceProxy.Ship`, sends journal record
batches and checks the acks, then compares the target's replica images with
an oracle that applied the same writes in seq order.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from proxyfixtures import DISKS, Writer

from cdp_common import crypto, records, rpc
from cdp_common.config import NodeConfig, ProxyConfig, ProxySection, TlsConfig
from cdp_common.pb.cdp.v1 import replication_pb2 as rpb
from cdp_common.pb.cdp.v1 import replication_pb2_grpc as rgrpc
from cdp_proxy import frames, metrics
from cdp_proxy.daemon import ProxyDaemon
from cdp_target.service import TargetService

pytestmark = pytest.mark.timeout(60)

INSECURE = TlsConfig(insecure=True)
POLICY = "pol-a"


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


@dataclass
class Bed:
    target_addr: str
    target_dir: Path
    source: ProxyDaemon
    target_proxy: ProxyDaemon
    target_service: TargetService
    channel: grpc.aio.Channel

    async def policy_state(self) -> rpb.PolicyState | None:
        reply = await self.target_service.GetPolicyState(rpb.PolicyStateRequest(policy=POLICY),
                                                         None)  # type: ignore[arg-type]
        return reply.policies[0] if reply.policies else None

    def hello(self, captured: int = 0, encryption: bool = True) -> rpb.ShipRequest:
        return rpb.ShipRequest(hello=rpb.ShipHello(
            policy=POLICY, filter_id="f1", epoch=1, disks=DISKS,
            target_proxy_address=self.target_proxy.address, rpo_interval_s=0.2,
            compression_level=1, encryption=encryption, captured_seq=captured,
            target_address=self.target_addr))


def _proxy_config(tmp: Path, role: str, key: bytes, **kw: Any) -> ProxyConfig:
    key_file = tmp / f"{role}.key"
    key_file.write_text(key.hex() + "\n")
    section = ProxySection(role=role, key_file=str(key_file),
                           interval_max_bytes=kw.pop("interval_max_bytes", 256 << 10),
                           frame_bytes=kw.pop("frame_bytes", 64 << 10), **kw)
    return ProxyConfig(node=NodeConfig(id=f"proxy-{role}", listen="127.0.0.1:0"),
                       proxy=section, tls=INSECURE)


async def _start(d: ProxyDaemon) -> asyncio.Task[None]:
    task = asyncio.create_task(d.run())
    await asyncio.wait_for(d.ready.wait(), 10)
    return task


@pytest.fixture
async def bed_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Bed]]]:
    cleanups: list[Callable[[], Awaitable[None]]] = []

    async def make(source_key: bytes = b"k" * 32, target_key: bytes = b"k" * 32,
                   target_servicer: Any = None, **source_kw: Any) -> Bed:
        service = TargetService(tmp_path / "target")
        await service.open_existing()
        server = rpc.Server("127.0.0.1:0", INSECURE, 8 << 20)
        rgrpc.add_TargetServicer_to_server(target_servicer or service, server.grpc)
        await server.start()
        src = ProxyDaemon(_proxy_config(tmp_path, "source", source_key, **source_kw))
        tgt = ProxyDaemon(_proxy_config(tmp_path, "target", target_key))
        tasks = [await _start(src), await _start(tgt)]
        channel = rpc.channel(src.address, INSECURE, 8 << 20)

        async def cleanup() -> None:
            await channel.close()
            for d in (src, tgt):
                await d.shutdown()
            await asyncio.gather(*tasks)
            await server.stop(0)
            await service.close()

        cleanups.append(cleanup)
        return Bed(server.address, tmp_path / "target", src, tgt, service, channel)

    yield make
    for c in cleanups:
        await c()


async def open_ship(bed: Bed, **hello_kw: Any) -> tuple[Any, int]:
    call = rgrpc.SourceProxyStub(bed.channel).Ship()
    await call.write(bed.hello(**hello_kw))
    resp = await asyncio.wait_for(call.read(), 10)
    assert resp.WhichOneof("body") == "welcome"
    return call, resp.welcome.resume_from_seq


async def read_acks_until(call: Any, seq: int) -> list[int]:
    acks: list[int] = []
    while not acks or acks[-1] < seq:
        resp = await asyncio.wait_for(call.read(), 20)
        assert resp is not grpc.aio.EOF, "stream ended before the last ack"
        assert resp.WhichOneof("body") == "ack"
        acks.append(resp.ack.durable_seq)
    return acks


async def assert_replicas(bed: Bed, w: Writer) -> None:
    async def applied() -> bool:
        s = await bed.policy_state()
        return s is not None and s.applied_seq == w.seq
    await eventually(applied)
    for d in DISKS:
        img = (bed.target_dir / POLICY / "replicas" / f"{d.name}.img").read_bytes()
        assert img == bytes(w.oracle[d.disk_id]), f"replica {d.name} differs from the oracle"


@pytest.mark.parametrize("encryption", [True, False])
async def test_replicates_and_resumes(bed_factory: Any, encryption: bool) -> None:
    bed = await bed_factory()
    call, resume = await open_ship(bed, encryption=encryption)
    assert resume == 0
    w = Writer()
    for _ in range(8):
        await call.write(rpb.ShipRequest(batch=rpb.RecordBatch(records=w.random_batch(40),
                                                               captured_seq=w.seq)))
    acks = await read_acks_until(call, w.seq)
    assert acks == sorted(acks) and len(set(acks)) == len(acks)
    assert len(acks) > 1, "the size cap / timer should have cut several deltas"
    await assert_replicas(bed, w)
    call.cancel()

    # resume on a new stream: the welcome names the target's durable seq
    call, resume = await open_ship(bed, captured=w.seq, encryption=encryption)
    assert resume == w.seq
    await call.write(rpb.ShipRequest(batch=rpb.RecordBatch(records=w.random_batch(5))))
    await read_acks_until(call, w.seq)  # the 100 ms ticker cuts the idle interval
    await assert_replicas(bed, w)
    await call.done_writing()
    assert await asyncio.wait_for(call.read(), 10) is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK


async def ended(call: Any, timeout_s: float = 10) -> grpc.aio.AioRpcError:
    """The status the proxy ended `call` with (the next read must fail)."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await asyncio.wait_for(call.read(), timeout_s)
    return err.value


async def test_wrong_key_is_permission_denied_and_nothing_committed(bed_factory: Any) -> None:
    """The session open fails key confirmation: no welcome, nothing reaches the target."""
    bed = await bed_factory(source_key=b"a" * 32, target_key=b"b" * 32)
    failures = metrics.AUTH_FAILURES._value.get()
    call = rgrpc.SourceProxyStub(bed.channel).Ship()
    await call.write(bed.hello())
    err = await ended(call)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "failed key confirmation" in (err.details() or "")
    assert "wrong key or tampered open" in (err.details() or "")
    assert POLICY in (err.details() or "")
    assert metrics.AUTH_FAILURES._value.get() > failures
    assert await bed.policy_state() is None, "the target saw an open it should never have"
    assert [p for p, _ in bed.source.errors.items()] == [POLICY]
    assert bed.source.reports()[0].error


async def test_malformed_batch_is_invalid_argument(bed_factory: Any) -> None:
    bed = await bed_factory()
    call, _ = await open_ship(bed)
    good = records.encode(1, 1, 0, 0, b"x" * 100)
    bad = bytearray(good)
    bad[50] ^= 1
    await call.write(rpb.ShipRequest(batch=rpb.RecordBatch(records=bytes(bad))))
    err = await ended(call)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed record batch" in (err.details() or "")
    # a seq gap is a protocol error too
    call, _ = await open_ship(bed)
    await call.write(rpb.ShipRequest(batch=rpb.RecordBatch(
        records=records.encode(5, 1, 0, 0, b"x"))))
    err = await ended(call)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "out of order" in (err.details() or "")


async def test_target_down_is_unavailable(bed_factory: Any) -> None:
    bed = await bed_factory()
    call = rgrpc.SourceProxyStub(bed.channel).Ship()
    hello = bed.hello()
    hello.hello.target_address = "127.0.0.1:1"  # nothing listens there
    await call.write(hello)
    err = await ended(call, 20)
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "127.0.0.1:1" in (err.details() or "")
    assert POLICY in (err.details() or "")


class SlowTarget(rgrpc.TargetServicer):
    """A target that makes deltas durable only when the test says so."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.frames = 0

    async def Apply(self, request_iterator: Any, context: Any) -> AsyncIterator[rpb.ApplyResponse]:
        it = aiter(request_iterator)
        await anext(it)
        yield rpb.ApplyResponse(opened=rpb.ApplyOpened(durable_seq=0))
        async for req in it:
            self.frames += 1
            if req.chunk.final:
                await self.release.wait()
                yield rpb.ApplyResponse(ack=rpb.ShipAck(durable_seq=req.chunk.last_seq))


async def test_backpressure_stops_reading_the_filter(bed_factory: Any) -> None:
    slow = SlowTarget()
    bed = await bed_factory(target_servicer=slow, inflight_max_bytes=512 << 10,
                            interval_max_bytes=256 << 10)
    records_before = metrics.RECORDS._value.get()
    call, _ = await open_ship(bed)
    w = Writer()
    total = 0

    async def writer() -> None:
        nonlocal total
        for _ in range(400):  # 400 x 64 KiB of incompressible data = 25 MiB
            batch = w.record(0, (total % 16) * 65536, os.urandom(65536))
            await call.write(rpb.ShipRequest(batch=rpb.RecordBatch(records=batch)))
            total += 1

    task = asyncio.create_task(writer())
    await asyncio.sleep(1.5)
    consumed = metrics.RECORDS._value.get() - records_before
    # the proxy stopped reading after ~inflight_max + one interval; gRPC buffers
    # a few MiB more in flow-control windows, but not the whole 25 MiB
    assert consumed < 200, consumed
    assert not task.done()
    assert metrics.INFLIGHT._value.get() <= (512 + 256 + 64) << 10
    slow.release.set()
    await asyncio.wait_for(task, 30)
    await read_acks_until(call, w.seq)
    call.cancel()


async def test_tampered_frame_rejected_by_target_proxy(bed_factory: Any) -> None:
    """Talk to the target proxy directly: a flipped bit in a frame ends the stream."""
    bed = await bed_factory()
    stub = rgrpc.TargetProxyStub(rpc.channel(bed.target_proxy.address, INSECURE, 8 << 20))
    sid = os.urandom(16)
    ring = crypto.KeyRing.single(b"k" * 32)
    opening = frames.seal_open(rpb.SessionOpen(
        policy=POLICY, session_id=sid, epoch=1, disks=DISKS, encryption=True,
        target_address=bed.target_addr), ring)
    sealer = frames.sealer_for(opening, ring, 1)
    call = stub.Replicate()
    await call.write(rpb.ReplicateRequest(open=opening))
    resp = await asyncio.wait_for(call.read(), 10)
    assert resp.accepted.durable_seq == 0
    from cdp_common.delta import Extent, encode_chunks
    chunks = list(encode_chunks([Extent(0, 0, 8192, os.urandom(8192))], 4096))
    assert len(chunks) == 2
    for i, chunk in enumerate(chunks):
        h = crypto.FrameHeader(1, 1, i, i == 1, 5)
        env = bytearray(sealer.seal(h, chunk))
        if i == 1:
            env[-1] ^= 1
        await call.write(rpb.ReplicateRequest(frame=rpb.DeltaFrame(
            first_seq=1, last_seq=1, index=i, final=i == 1, newest_time_ns=5,
            envelope=bytes(env))))
    err = await ended(call)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    s = await bed.policy_state()
    assert s is not None and s.durable_seq == 0


async def test_fenced_epoch_is_failed_precondition(bed_factory: Any) -> None:
    bed = await bed_factory()
    hello = bed.hello()
    hello.hello.epoch = 5
    call = rgrpc.SourceProxyStub(bed.channel).Ship()
    await call.write(hello)
    assert (await asyncio.wait_for(call.read(), 10)).WhichOneof("body") == "welcome"
    call.cancel()
    stale = bed.hello()
    stale.hello.epoch = 4
    call = rgrpc.SourceProxyStub(bed.channel).Ship()
    await call.write(stale)
    err = await ended(call)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "epoch" in (err.details() or "")


async def test_filter_disconnect_ends_the_downstream_streams(bed_factory: Any) -> None:
    bed = await bed_factory()
    call, _ = await open_ship(bed)

    async def target_stream_open() -> bool:
        rt = bed.target_service.policies.get(POLICY)
        return rt is not None and rt.stream is not None
    await eventually(target_stream_open)
    call.cancel()

    async def target_stream_closed() -> bool:
        return not await target_stream_open()
    await eventually(target_stream_closed, 10)

    async def no_sessions() -> bool:
        return (metrics.SESSIONS.labels("source")._value.get() == 0
                and metrics.SESSIONS.labels("target")._value.get() == 0)
    await eventually(no_sessions, 10)
