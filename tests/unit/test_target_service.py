"""The Target gRPC servicer and daemon, driven over real loopback gRPC (insecure)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from cdp_common import rpc
from cdp_common.config import NodeConfig, TargetConfig, TargetSection, TlsConfig
from cdp_common.delta import Extent, encode_chunks, encode_extent
from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
from cdp_common.pb.cdp.v1 import coordinator_pb2_grpc as cgrpc
from cdp_common.pb.cdp.v1 import replication_pb2 as rpb
from cdp_common.pb.cdp.v1 import replication_pb2_grpc as rgrpc
from cdp_target.daemon import TargetDaemon
from cdp_target.service import TargetService

pytestmark = pytest.mark.timeout(30)

TLS = TlsConfig(insecure=True)
MSG = 8 << 20
SIZE = 1 << 20
DISKS = [rpb.DiskInfo(disk_id=0, name="vda", size_bytes=SIZE),
         rpb.DiskInfo(disk_id=1, name="vdb", size_bytes=SIZE)]


async def eventually(cond: Callable[[], bool | Awaitable[bool]], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = cond()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


class Harness:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.service = TargetService(data_dir)
        self.server = rpc.Server("127.0.0.1:0", TLS, MSG)
        rgrpc.add_TargetServicer_to_server(self.service, self.server.grpc)
        self.channel = rpc.channel(self.server.address, TLS, MSG)
        self.stub = rgrpc.TargetStub(self.channel)

    async def start(self) -> None:
        await self.service.open_existing()
        await self.server.start()

    async def stop(self) -> None:
        await self.channel.close()
        await self.server.stop(0.5)
        await self.service.close()

    async def state(self, policy: str = "p1") -> rpb.PolicyState:
        reply = await self.stub.GetPolicyState(rpb.PolicyStateRequest(policy=policy))
        assert len(reply.policies) == 1
        return reply.policies[0]


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    harness = Harness(tmp_path / "target")
    await harness.start()
    yield harness
    await harness.stop()


def open_req(policy: str = "p1", epoch: int = 1,
             disks: list[rpb.DiskInfo] | None = None) -> rpb.ApplyRequest:
    return rpb.ApplyRequest(open=rpb.ApplyOpen(policy=policy, epoch=epoch,
                                               disks=DISKS if disks is None else disks,
                                               captured_seq=0))


def chunks(first: int, last: int, extents: list[Extent], chunk_bytes: int = 64 * 1024,
           newest: int = 0) -> list[rpb.ApplyRequest]:
    parts = list(encode_chunks(extents, chunk_bytes))
    return [rpb.ApplyRequest(chunk=rpb.DeltaChunk(
        first_seq=first, last_seq=last, index=i, final=i == len(parts) - 1,
        newest_time_ns=newest or last, extents=p, captured_seq=last + 10))
        for i, p in enumerate(parts)]


async def opened(h: Harness, **kw: object) -> tuple[grpc.aio.StreamStreamCall, int]:
    call = h.stub.Apply()
    await call.write(open_req(**kw))  # type: ignore[arg-type]
    resp = await call.read()
    assert resp.WhichOneof("body") == "opened"
    return call, resp.opened.durable_seq


async def send_delta(call: grpc.aio.StreamStreamCall, reqs: list[rpb.ApplyRequest]) -> int:
    for r in reqs:
        await call.write(r)
    resp = await call.read()
    assert resp.WhichOneof("body") == "ack"
    return int(resp.ack.durable_seq)


async def status_of(call: grpc.aio.StreamStreamCall) -> tuple[grpc.StatusCode, str]:
    with contextlib.suppress(grpc.aio.AioRpcError):
        while await call.read() is not grpc.aio.EOF:
            pass
    return await call.code(), await call.details()


def image(h: Harness, name: str, policy: str = "p1") -> bytes:
    return (h.data_dir / policy / "replicas" / f"{name}.img").read_bytes()


async def test_apply_stream_acks_and_applies(h: Harness) -> None:
    call, durable = await opened(h)
    assert durable == 0
    data = bytes(range(256)) * 1024  # 256 KiB -> several chunks
    assert await send_delta(call, chunks(1, 3, [Extent(0, 0, len(data), data)],
                                         chunk_bytes=64 * 1024)) == 3
    assert await send_delta(call, chunks(4, 4, [Extent(1, 4096, 4096, b"z" * 4096),
                                                Extent(0, 0, 4096, None)])) == 4
    # A duplicate (resent after a reconnect) is acked with the durable seq.
    assert await send_delta(call, chunks(1, 3, [Extent(0, 0, 4096, b"!" * 4096)])) == 4
    await eventually(lambda: h.service.policies["p1"].store.state.applied_seq == 4)
    img = image(h, "vda")
    assert img[:4096] == bytes(4096) and img[4096:len(data)] == data[4096:]
    assert image(h, "vdb")[4096:8192] == b"z" * 4096
    st = await h.state()
    assert (st.durable_seq, st.applied_seq, st.newest_time_ns, st.epoch) == (4, 4, 4, 1)
    assert st.captured_seq == 14
    assert st.bytes_replicated > len(data)
    assert [d.name for d in st.disks] == ["vda", "vdb"]
    await call.done_writing()
    assert (await status_of(call))[0] == grpc.StatusCode.OK
    all_ = await h.stub.GetPolicyState(rpb.PolicyStateRequest())
    assert [p.policy for p in all_.policies] == ["p1"]
    none = await h.stub.GetPolicyState(rpb.PolicyStateRequest(policy="nope"))
    assert list(none.policies) == []


async def test_first_message_must_be_open(h: Harness) -> None:
    call = h.stub.Apply()
    await call.write(chunks(1, 1, [])[0])
    code, details = await status_of(call)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "first message" in details


async def test_bad_open(h: Harness) -> None:
    for req, text in [(open_req(policy="../x"), "not a valid policy name"),
                      (open_req(disks=[]), "no disks"),
                      (open_req(disks=DISKS + DISKS[:1]), "listed twice")]:
        call = h.stub.Apply()
        await call.write(req)
        code, details = await status_of(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert text in details


async def test_disk_mismatch_is_failed_precondition(h: Harness) -> None:
    call, _ = await opened(h)
    await call.done_writing()
    await status_of(call)
    call = h.stub.Apply()
    await call.write(open_req(disks=[rpb.DiskInfo(disk_id=0, name="vda", size_bytes=SIZE // 2)]))
    code, details = await status_of(call)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "disk 0 was 'vda'" in details


async def test_fencing(h: Harness) -> None:
    call, _ = await opened(h, epoch=5)
    assert await send_delta(call, chunks(1, 1, [])) == 1
    stale = h.stub.Apply()
    await stale.write(open_req(epoch=4))
    code, details = await status_of(stale)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "epoch 4 is older than epoch 5" in details
    # The current stream is unaffected.
    assert await send_delta(call, chunks(2, 2, [])) == 2
    await call.done_writing()
    await status_of(call)


async def test_newer_stream_replaces_older(h: Harness) -> None:
    old, _ = await opened(h, epoch=1)
    assert await send_delta(old, chunks(1, 2, [Extent(0, 0, 4096, b"a" * 4096)])) == 2
    # Half a delta on the old stream, then a new stream takes over.
    await old.write(rpb.ApplyRequest(chunk=rpb.DeltaChunk(
        first_seq=3, last_seq=3, index=0, final=False,
        extents=encode_extent(Extent(0, 0, 4096, b"b" * 4096)))))
    await asyncio.sleep(0.1)
    new, durable = await opened(h, epoch=2)
    assert durable == 2
    code, details = await status_of(old)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "replaced by a newer stream (epoch 2)" in details
    assert await send_delta(new, chunks(3, 3, [Extent(0, 0, 4096, b"c" * 4096)])) == 3
    await eventually(lambda: h.service.policies["p1"].store.state.applied_seq == 3)
    assert image(h, "vda")[:4096] == b"c" * 4096
    # Same epoch again (a reconnect of the current proxy) also replaces.
    again, durable = await opened(h, epoch=2)
    assert durable == 3
    assert (await status_of(new))[0] == grpc.StatusCode.FAILED_PRECONDITION
    await again.done_writing()
    await status_of(again)


async def test_bad_chunk_discards_partial_delta(h: Harness) -> None:
    call, _ = await opened(h)
    await call.write(rpb.ApplyRequest(chunk=rpb.DeltaChunk(
        first_seq=1, last_seq=2, index=0, final=False,
        extents=encode_extent(Extent(0, 0, 4096, b"a" * 4096)))))
    await call.write(rpb.ApplyRequest(chunk=rpb.DeltaChunk(
        first_seq=1, last_seq=2, index=1, final=True,
        extents=encode_extent(Extent(0, SIZE - 512, 4096, b"b" * 4096)))))
    code, details = await status_of(call)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "outside disk 0" in details
    await eventually(lambda: not any((h.data_dir / "p1" / "deltas").iterdir()))
    call, durable = await opened(h)
    assert durable == 0
    assert await send_delta(call, chunks(1, 2, [Extent(0, 0, 4096, b"c" * 4096)])) == 2
    await call.done_writing()
    await status_of(call)


async def test_client_cancel_discards_partial_delta(h: Harness) -> None:
    call, _ = await opened(h)
    reqs = chunks(1, 1, [Extent(0, 0, 8192, b"x" * 8192)], chunk_bytes=4096)
    await call.write(reqs[0])
    deltas = h.data_dir / "p1" / "deltas"
    await eventually(lambda: any(deltas.iterdir()))
    call.cancel()
    await eventually(lambda: not any(deltas.iterdir()))
    await eventually(lambda: h.service.policies["p1"].stream is None)
    call, durable = await opened(h)
    assert durable == 0
    assert await send_delta(call, reqs) == 1
    await call.done_writing()
    await status_of(call)


async def test_chunk_order_is_checked(h: Harness) -> None:
    call, _ = await opened(h)
    reqs = chunks(1, 1, [Extent(0, 0, 8192, b"x" * 8192)], chunk_bytes=4096)
    assert len(reqs) == 2
    await call.write(reqs[1])
    code, details = await status_of(call)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "starts at chunk 1" in details
    call, _ = await opened(h)
    await call.write(reqs[0])
    await call.write(chunks(2, 2, [])[0])
    code, details = await status_of(call)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not continue" in details


async def test_gap_aborts_stream(h: Harness) -> None:
    call, _ = await opened(h)
    await call.write(chunks(5, 6, [])[0])
    code, details = await status_of(call)
    assert code == grpc.StatusCode.ABORTED
    assert "does not follow durable seq 0" in details


async def test_restart_keeps_state_and_applies(tmp_path: Path) -> None:
    h1 = Harness(tmp_path / "t")
    await h1.start()
    call, _ = await opened(h1, epoch=3)
    assert await send_delta(call, chunks(1, 7, [Extent(1, 0, 4096, b"q" * 4096)])) == 7
    await call.done_writing()
    await status_of(call)
    await h1.stop()
    h2 = Harness(tmp_path / "t")
    await h2.start()
    try:
        st = await h2.state()
        assert (st.durable_seq, st.epoch) == (7, 3)
        await eventually(lambda: h2.service.policies["p1"].store.state.applied_seq == 7)
        assert image(h2, "vdb")[:4096] == b"q" * 4096
        call, durable = await opened(h2, epoch=3, disks=[])  # disks known from the store
        assert durable == 7
        await call.done_writing()
        await status_of(call)
    finally:
        await h2.stop()


# ---------------------------------------------------------------- daemon

class FakeCoordinator(cgrpc.CoordinatorServicer):
    def __init__(self) -> None:
        self.nodes: list[cpb.NodeInfo] = []
        self.reports: list[cpb.PolicyReport] = []

    async def Register(self, request: cpb.RegisterRequest,
                       context: grpc.aio.ServicerContext) -> cpb.RegisterReply:
        self.nodes.append(request.node)
        return cpb.RegisterReply(heartbeat_ms=50, lease_ms=500)

    async def Heartbeat(self, request: cpb.HeartbeatRequest,
                        context: grpc.aio.ServicerContext) -> cpb.HeartbeatReply:
        self.reports = list(request.policies)
        return cpb.HeartbeatReply(known=True)

    async def WatchAssignments(self, request: cpb.WatchRequest,
                               context: grpc.aio.ServicerContext,
                               ) -> AsyncIterator[cpb.AssignmentSet]:
        yield cpb.AssignmentSet(assignments=[cpb.Assignment(
            policy="p1", epoch=1, target=cpb.Endpoint(node_id="target-1"))])
        await asyncio.Event().wait()   # the set stays current


async def test_daemon_serves_and_reports(tmp_path: Path) -> None:
    coord = FakeCoordinator()
    coord_server = rpc.Server("127.0.0.1:0", TLS, MSG)
    cgrpc.add_CoordinatorServicer_to_server(coord, coord_server.grpc)
    await coord_server.start()
    config = TargetConfig(node=NodeConfig(id="target-1", listen="127.0.0.1:0",
                                          coordinator=coord_server.address),
                          target=TargetSection(data_dir=str(tmp_path / "data")), tls=TLS)
    daemon = TargetDaemon(config)
    task = asyncio.create_task(daemon.run())
    try:
        await asyncio.wait_for(daemon.ready.wait(), 10)
        await eventually(lambda: daemon.service.assigned == {"p1"})
        # assigned, no stream yet: reported with no_store, so the coordinator can tell
        # "waiting for the first data" from "does not report it"
        await eventually(lambda: [(r.policy, r.no_store) for r in coord.reports]
                         == [("p1", True)])
        async with rpc.channel(daemon.address, TLS, MSG) as ch:
            stub = rgrpc.TargetStub(ch)
            stray = stub.Apply()   # only assigned policies get a store
            await stray.write(open_req(policy="p2"))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stray.read()
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "not assigned to this target" in (refused.value.details() or "")
            assert not (tmp_path / "data" / "p2").exists()
            call = stub.Apply()
            await call.write(open_req())
            assert (await call.read()).opened.durable_seq == 0
            for r in chunks(1, 2, [Extent(0, 0, 4096, b"d" * 4096)], newest=123):
                await call.write(r)
            assert (await call.read()).ack.durable_seq == 2
            await call.done_writing()
        await eventually(lambda: bool(coord.reports) and coord.reports[0].applied_seq == 2)
        rep = coord.reports[0]
        assert (rep.policy, rep.durable_seq, rep.newest_time_ns) == ("p1", 2, 123)
        assert len(coord.reports) == 1 and not rep.no_store
        assert rep.bytes_replicated == 16 + 4096
        assert coord.nodes[0].role == cpb.ROLE_TARGET
        assert coord.nodes[0].address == daemon.address
    finally:
        await daemon.shutdown()
        await asyncio.wait_for(task, 10)
        await coord_server.stop(0)
    assert (tmp_path / "data" / "p1" / "replicas" / "vda.img").read_bytes()[:4096] == b"d" * 4096
