"""One conformance suite for every `RecordSink` (the contract in cdp_filter/sink.py).

Implementations: the in-memory twin (cdp_filter/memsink.py) and the gRPC
adapter (GrpcRecordSink) against a loopback SourceProxy servicer that serves
the same in-memory downstream over the wire, so what is checked for the
adapter is that the contract survives the wire: welcome, batches, acks, and
each error as its status. Errors are compared by status name: a CdpError's
`grpc_status`, an AioRpcError's code.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc
import pytest

from cdp_common import records, rpc
from cdp_common.config import TlsConfig
from cdp_common.errors import CdpError, UnavailableError
from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
from cdp_common.pb.cdp.v1 import replication_pb2 as rpb
from cdp_common.pb.cdp.v1 import replication_pb2_grpc as rgrpc
from cdp_filter.memsink import MemoryRecordSink
from cdp_filter.sink import GrpcRecordSink, RecordSession, RecordSink

pytestmark = pytest.mark.timeout(30)
TLS = TlsConfig(insecure=True)


class MemorySourceProxy(rgrpc.SourceProxyServicer):
    """SourceProxy.Ship over a MemoryRecordSink: the wire adapter's counterpart."""

    def __init__(self, sink: MemoryRecordSink) -> None:
        self.sink = sink

    async def Ship(self, request_iterator: AsyncIterator[rpb.ShipRequest],
                   context: grpc.aio.ServicerContext) -> AsyncIterator[rpb.ShipResponse]:
        it = request_iterator.__aiter__()
        first = await it.__anext__()
        try:
            session = await self.sink.open(cpb.Assignment(), first.hello)
        except CdpError as exc:
            await context.abort(grpc.StatusCode[exc.grpc_status], f"policy: {exc}")
        yield rpb.ShipResponse(welcome=rpb.ShipWelcome(
            resume_from_seq=session.resume_from_seq))

        async def reader() -> None:
            async for req in it:
                await session.send(req.batch)

        task = asyncio.create_task(reader())
        try:
            async for seq in session.acks():
                yield rpb.ShipResponse(ack=rpb.ShipAck(durable_seq=seq))
        except CdpError as exc:
            await context.abort(grpc.StatusCode[exc.grpc_status], f"policy: {exc}")
        finally:
            await session.close()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


@dataclass
class Harness:
    """One implementation: the sink under test and the in-memory downstream behind it."""

    sink: RecordSink
    memory: MemoryRecordSink
    address: str
    _restart: Callable[[], Awaitable[None]]
    _stop: Callable[[], Awaitable[None]]

    def assignment(self, epoch: int = 1) -> cpb.Assignment:
        return cpb.Assignment(policy="p", epoch=epoch,
                              source_proxy=cpb.Endpoint(node_id="sp", address=self.address))

    async def open(self, epoch: int = 1) -> RecordSession:
        return await self.sink.open(self.assignment(epoch), rpb.ShipHello(policy="p",
                                                                          epoch=epoch))

    async def restart(self) -> None:
        """The downstream restarts: keeps what it made durable."""
        await self._restart()


async def memory_harness() -> Harness:
    h: Harness

    async def restart() -> None:
        h.memory = h.memory.restart()
        h.sink = h.memory

    async def stop() -> None:
        pass

    mem = MemoryRecordSink()
    h = Harness(mem, mem, "memory", restart, stop)
    return h


async def grpc_harness() -> Harness:
    h: Harness
    servers: list[rpc.Server] = []

    async def serve(memory: MemoryRecordSink, listen: str) -> str:
        server = rpc.Server(listen, TLS, 8 << 20)
        rgrpc.add_SourceProxyServicer_to_server(MemorySourceProxy(memory), server.grpc)
        await server.start()
        servers.append(server)
        return server.address

    async def restart() -> None:
        # The downstream's sessions end first (as its process dying ends
        # them), so each call ends with a status; then the server goes.
        old, h.memory = h.memory, h.memory.restart()
        async with asyncio.timeout(10):
            while old.sessions:  # each handler aborted its call and closed its session
                await asyncio.sleep(0.005)
        await servers.pop().stop(0)
        h.address = await serve(h.memory, "127.0.0.1:0")

    async def stop() -> None:
        for s in servers:
            await s.stop(0)

    mem = MemoryRecordSink()
    address = await serve(mem, "127.0.0.1:0")
    h = Harness(GrpcRecordSink(TLS, 8 << 20), mem, address, restart, stop)
    return h


@pytest.fixture(params=["memory", "grpc"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    h = await (memory_harness() if request.param == "memory" else grpc_harness())
    yield h
    await h._stop()


def batch(first: int, last: int, skip: bool = False) -> rpb.RecordBatch:
    data = b"".join(records.encode(s, s * 10, 0, s * 4096, bytes([s % 256]) * 32)
                    for s in range(first, last + 1))
    return rpb.RecordBatch(records=data, captured_seq=last, skips_lost_seqs=skip)


async def received(h: Harness, seq: int) -> None:
    """Wait until the downstream took `seq` (a send returns before it is read)."""
    async with asyncio.timeout(10):
        while seq not in h.memory.downstream.received:
            await asyncio.sleep(0.005)


async def acked_through(session: RecordSession, seq: int) -> int:
    """Read acks until one reaches `seq`; returns it."""
    async def read() -> int:
        async for durable in session.acks():
            if durable >= seq:
                return durable
        raise AssertionError(f"session ended before acking {seq}")
    return await asyncio.wait_for(read(), 10)


async def failure_of(session: RecordSession, *batches: rpb.RecordBatch) -> str:
    """Send `batches`, then read acks until the session fails; returns the status name."""
    try:
        for b in batches:
            await session.send(b)
        async with asyncio.timeout(10):
            async for _ in session.acks():
                pass
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    except CdpError as exc:
        return exc.grpc_status
    raise AssertionError("the session did not fail")


async def open_refusal(h: Harness, epoch: int = 1) -> str:
    """Open a session that must be refused; returns the refusal's status name."""
    try:
        await h.open(epoch=epoch)
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    except CdpError as exc:
        return exc.grpc_status
    raise AssertionError(f"the open at epoch {epoch} was welcomed")


async def durable_prefix(h: Harness, sent: int, durable: int) -> RecordSession:
    """With manual acks: a session that sent 1..sent, all received downstream,
    of which 1..durable were made durable and acked."""
    h.memory.auto_ack = False
    s = await h.open()
    await s.send(batch(1, sent))
    await received(h, sent)
    h.memory.make_durable(durable)
    assert await acked_through(s, durable) == durable
    return s


def assert_applied_once(h: Harness, through: int) -> None:
    down = h.memory.downstream
    assert h.memory.seqs == list(range(1, through + 1))
    for s in range(1, through + 1):
        assert down.received[s].data == bytes([s % 256]) * 32


async def test_welcome_reports_durable_seq_and_acks_advance(harness: Harness) -> None:
    s = await harness.open()
    assert s.resume_from_seq == 0
    await s.send(batch(1, 3))
    await s.send(batch(4, 5))
    assert await acked_through(s, 5) == 5
    await s.close()
    await s.close()  # idempotent
    again = await harness.open()
    assert again.resume_from_seq == 5
    assert_applied_once(harness, 5)
    await again.close()


async def test_duplicate_is_acked_not_applied_again(harness: Harness) -> None:
    s = await harness.open()
    await s.send(batch(1, 3))
    await s.send(batch(2, 4))  # 2, 3 again
    assert await acked_through(s, 4) == 4
    assert_applied_once(harness, 4)
    assert harness.memory.duplicates == 2
    await s.close()


async def test_gap_is_a_protocol_error(harness: Harness) -> None:
    s = await harness.open()
    await s.send(batch(1, 2))
    assert await failure_of(s, batch(4, 5)) == "INVALID_ARGUMENT"
    assert harness.memory.seqs == [1, 2]
    await s.close()


async def test_announced_jump_is_accepted_once(harness: Harness) -> None:
    s = await harness.open()
    await s.send(batch(4, 5, skip=True))   # seqs 1..3 dropped at an overflow
    assert await acked_through(s, 5) == 5
    assert await failure_of(s, batch(8, 8, skip=True)) == "INVALID_ARGUMENT"
    await s.close()


async def test_epoch_fence(harness: Harness) -> None:
    old = await harness.open(epoch=1)
    new = await harness.open(epoch=2)
    assert await failure_of(old, batch(1, 1)) == "FAILED_PRECONDITION"
    assert await open_refusal(harness, epoch=1) == "FAILED_PRECONDITION"  # a stale epoch
    await new.send(batch(1, 2))
    assert await acked_through(new, 2) == 2
    await old.close()
    await new.close()


async def test_idempotent_resend_after_reconnect(harness: Harness) -> None:
    s = await durable_prefix(harness, sent=6, durable=3)
    harness.memory.fail_after_batches = 1
    assert await failure_of(s, batch(7, 8)) == "UNAVAILABLE"
    await s.close()
    harness.memory.auto_ack = True
    again = await harness.open()
    assert again.resume_from_seq == 3
    await again.send(batch(4, 8))       # resent from the durable seq: 4..6 again, 7, 8
    assert await acked_through(again, 8) == 8
    assert_applied_once(harness, 8)
    await again.close()


async def test_restart_keeps_durable_and_fails_open_sessions(harness: Harness) -> None:
    s = await durable_prefix(harness, sent=5, durable=4)
    await harness.restart()
    assert await failure_of(s) == "UNAVAILABLE"
    await s.close()
    again = await harness.open()
    assert again.resume_from_seq == 4
    await again.send(batch(5, 6))
    await received(harness, 6)
    harness.memory.make_durable(6)
    assert await acked_through(again, 6) == 6
    assert_applied_once(harness, 6)
    await again.close()


async def test_refused_open_raises(harness: Harness) -> None:
    harness.memory.fail_open = UnavailableError("policy 'p': target proxy unreachable")
    assert await open_refusal(harness) == "UNAVAILABLE"
    s = await harness.open()  # the next one goes through
    assert s.resume_from_seq == 0
    await s.close()
