"""TargetService logic over the in-memory ReplicaStore: no loopback server, no files
for the replica (tests/unit/test_target_service.py runs the real thing over gRPC)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from cdp_common.delta import Extent, encode_chunks, encode_extent
from cdp_common.pb.cdp.v1 import replication_pb2 as rpb
from cdp_target.memstore import MemoryStore, MemoryStores
from cdp_target.service import TargetService

pytestmark = pytest.mark.timeout(30)

SIZE = 64 * 1024
DISKS = [rpb.DiskInfo(disk_id=0, name="vda", size_bytes=SIZE),
         rpb.DiskInfo(disk_id=1, name="vdb", size_bytes=SIZE)]


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


class FakeContext:
    """The part of grpc.aio.ServicerContext the service uses."""

    def peer(self) -> str:
        return "ipv4:192.0.2.1:5000"

    async def abort(self, code: grpc.StatusCode, details: str,
                    trailing_metadata: object = ()) -> None:
        raise Aborted(code, details)


class Stream:
    """One Apply call driven in memory, as grpc.aio drives it: a task runs the
    handler and queues its responses; the call ends with OK or an abort code."""

    def __init__(self, service: TargetService) -> None:
        self.requests: asyncio.Queue[rpb.ApplyRequest | None] = asyncio.Queue()
        self.responses: asyncio.Queue[rpb.ApplyResponse | Aborted | None] = asyncio.Queue()
        ctx: Any = FakeContext()
        self.task = asyncio.create_task(self._run(service.Apply(self._iter(), ctx)))

    async def _iter(self) -> AsyncIterator[rpb.ApplyRequest]:
        while (req := await self.requests.get()) is not None:
            yield req

    async def _run(self, handler: AsyncIterator[rpb.ApplyResponse]) -> None:
        try:
            async for resp in handler:
                await self.responses.put(resp)
        except Aborted as exc:
            await self.responses.put(exc)
            return
        await self.responses.put(None)

    async def write(self, *reqs: rpb.ApplyRequest) -> None:
        for r in reqs:
            await self.requests.put(r)

    async def read(self) -> rpb.ApplyResponse:
        got = await asyncio.wait_for(self.responses.get(), 5)
        if isinstance(got, Aborted):
            raise got
        assert got is not None, "the call ended"
        return got

    async def end(self) -> grpc.StatusCode:
        """Half-close and wait for the end: OK, or the code the call was aborted with."""
        await self.requests.put(None)
        while True:
            got = await asyncio.wait_for(self.responses.get(), 5)
            if got is None:
                return grpc.StatusCode.OK
            if isinstance(got, Aborted):
                return got.code

    async def aborted(self) -> Aborted:
        with pytest.raises(Aborted) as info:
            await self.read()
        return info.value


def open_req(epoch: int = 1, policy: str = "p1") -> rpb.ApplyRequest:
    return rpb.ApplyRequest(open=rpb.ApplyOpen(policy=policy, epoch=epoch, disks=DISKS))


def chunks(first: int, last: int, extents: list[Extent]) -> list[rpb.ApplyRequest]:
    parts = list(encode_chunks(extents, 8192))
    return [rpb.ApplyRequest(chunk=rpb.DeltaChunk(
        first_seq=first, last_seq=last, index=i, final=i == len(parts) - 1,
        newest_time_ns=last * 10, extents=p, captured_seq=last + 1))
        for i, p in enumerate(parts)]


def partial(seq: int, fill: bytes) -> rpb.ApplyRequest:
    """The first chunk of delta [seq, seq], not final: a delta left half-received."""
    return rpb.ApplyRequest(chunk=rpb.DeltaChunk(
        first_seq=seq, last_seq=seq, index=0, final=False,
        extents=encode_extent(Extent(0, 0, 512, fill * 512))))


async def eventually(cond: Callable[[], bool | Awaitable[bool]], timeout: float = 5) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


@pytest.fixture
async def svc(tmp_path: Path) -> AsyncIterator[tuple[TargetService, MemoryStores]]:
    stores = MemoryStores(tmp_path / "side")
    service = TargetService(tmp_path / "unused", stores=stores)
    await service.open_existing()
    yield service, stores
    await service.close()


async def opened(service: TargetService, epoch: int = 1) -> tuple[Stream, int]:
    s = Stream(service)
    await s.write(open_req(epoch))
    resp = await s.read()
    assert resp.WhichOneof("body") == "opened"
    return s, resp.opened.durable_seq


async def ack(s: Stream, reqs: list[rpb.ApplyRequest]) -> int:
    await s.write(*reqs)
    resp = await s.read()
    assert resp.WhichOneof("body") == "ack"
    return int(resp.ack.durable_seq)


def mem(service: TargetService, policy: str = "p1") -> MemoryStore:
    store = service.policies[policy].store
    assert isinstance(store, MemoryStore)
    return store


async def test_acks_applies_and_reports(svc: tuple[TargetService, MemoryStores]) -> None:
    service, _ = svc
    s, durable = await opened(service)
    assert durable == 0
    data = bytes(range(256)) * 64
    assert await ack(s, chunks(1, 3, [Extent(0, 0, len(data), data)])) == 3
    assert await ack(s, chunks(4, 4, [Extent(1, 512, 512, b"z" * 512),
                                      Extent(0, 0, 512, None)])) == 4
    assert await ack(s, chunks(1, 3, [Extent(0, 0, 512, b"!" * 512)])) == 4  # duplicate
    await eventually(lambda: mem(service).snapshot().applied_seq == 4)
    img = mem(service).image(0)
    assert img[:512] == bytes(512) and img[512:len(data)] == data[512:]
    assert mem(service).image(1)[512:1024] == b"z" * 512
    reply = await service.GetPolicyState(rpb.PolicyStateRequest(policy="p1"), FakeContext())  # type: ignore[arg-type]
    st = reply.policies[0]
    assert (st.durable_seq, st.applied_seq, st.newest_time_ns, st.epoch) == (4, 4, 40, 1)
    assert st.captured_seq == 5
    assert await s.end() == grpc.StatusCode.OK


async def test_gap_is_aborted_and_nothing_is_stored(svc: tuple[TargetService, MemoryStores]
                                                    ) -> None:
    service, _ = svc
    s, _ = await opened(service)
    assert await ack(s, chunks(1, 1, [])) == 1
    await s.write(*chunks(3, 4, [Extent(0, 0, 512, b"a" * 512)]))
    err = await s.aborted()
    assert err.code == grpc.StatusCode.ABORTED
    assert "does not follow durable seq 1" in err.details
    assert mem(service).durable_seq == 1


async def test_bad_chunk_is_invalid_argument(svc: tuple[TargetService, MemoryStores]) -> None:
    service, _ = svc
    s, _ = await opened(service)
    bad = rpb.ApplyRequest(chunk=rpb.DeltaChunk(
        first_seq=1, last_seq=1, index=0, final=True,
        extents=encode_extent(Extent(7, 0, 512, b"a" * 512))))
    await s.write(bad)
    err = await s.aborted()
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert mem(service).durable_seq == 0


async def test_stale_epoch_is_fenced_and_newer_stream_replaces(
        svc: tuple[TargetService, MemoryStores]) -> None:
    service, _ = svc
    s5, _ = await opened(service, epoch=5)
    assert await ack(s5, chunks(1, 1, [])) == 1
    stale = Stream(service)
    await stale.write(open_req(epoch=4))
    err = await stale.aborted()
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "epoch 4 is older than epoch 5" in err.details
    assert await ack(s5, chunks(2, 2, [])) == 2  # the current stream is unaffected
    # half a delta on the old stream, then a newer one takes over
    await s5.write(partial(3, b"b"))
    await asyncio.sleep(0.05)
    s6, durable = await opened(service, epoch=6)
    assert durable == 2
    assert await s5.end() == grpc.StatusCode.FAILED_PRECONDITION
    assert await ack(s6, chunks(3, 3, [Extent(0, 0, 512, b"c" * 512)])) == 3
    await eventually(lambda: mem(service).snapshot().applied_seq == 3)
    assert mem(service).image(0)[:512] == b"c" * 512
    assert mem(service).epoch == 6


async def test_restart_resumes_from_durable_seq(tmp_path: Path) -> None:
    stores = MemoryStores(tmp_path / "side")
    first = TargetService(tmp_path / "unused", stores=stores)
    await first.open_existing()
    s, _ = await opened(first, epoch=2)
    assert await ack(s, chunks(1, 2, [Extent(0, 0, 512, b"a" * 512)])) == 2
    await s.write(partial(3, b"x"))
    await asyncio.sleep(0.05)
    await first.close()  # the stream ends; its partial delta is dropped
    assert await s.end() == grpc.StatusCode.UNAVAILABLE
    again = TargetService(tmp_path / "unused", stores=stores)
    await again.open_existing()
    try:
        assert sorted(again.policies) == ["p1"]
        await eventually(lambda: mem(again).snapshot().applied_seq == 2)
        s2, durable = await opened(again, epoch=2)
        assert durable == 2
        assert await ack(s2, chunks(3, 3, [Extent(0, 0, 512, b"y" * 512)])) == 3
        await eventually(lambda: mem(again).snapshot().applied_seq == 3)
        assert mem(again).image(0)[:512] == b"y" * 512
        assert await s2.end() == grpc.StatusCode.OK
    finally:
        await again.close()
