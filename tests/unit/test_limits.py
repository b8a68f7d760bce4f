"""cdp_common.limits over a real loopback gRPC server: the per-peer stream limit refuses
one stream too many with RESOURCE_EXHAUSTED and frees the slot when a stream ends;
the server-wide cap; the shared byte budget."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest

from cdp_common import limits, rpc
from cdp_common.config import NodeConfig, TargetConfig, TargetSection, TlsConfig
from cdp_common.node import server_interceptors
from cdp_common.pb.cdp.v1 import replication_pb2 as rpb
from cdp_common.pb.cdp.v1 import replication_pb2_grpc as rgrpc
from cdp_target.memstore import MemoryStores
from cdp_target.service import TargetService

pytestmark = pytest.mark.timeout(30)

TLS = TlsConfig(insecure=True)
MSG = 4 << 20


def open_req(policy: str) -> rpb.ApplyRequest:
    return rpb.ApplyRequest(open=rpb.ApplyOpen(policy=policy, epoch=1, disks=[
        rpb.DiskInfo(disk_id=0, name="vda", size_bytes=65536)]))


async def opened(stub: Any, policy: str) -> Any:
    call = stub.Apply()
    await call.write(open_req(policy))
    assert (await call.read()).opened.durable_seq == 0
    return call


async def test_per_peer_stream_limit(tmp_path: Path) -> None:
    service = TargetService(tmp_path / "unused", stores=MemoryStores(tmp_path / "side"))
    await service.open_existing()
    server = rpc.Server("127.0.0.1:0", TLS, MSG, interceptors=[limits.PeerStreamLimit(2)])
    rgrpc.add_TargetServicer_to_server(service, server.grpc)
    await server.start()
    try:
        async with rpc.channel(server.address, TLS, MSG) as ch:
            stub = rgrpc.TargetStub(ch)
            a = await opened(stub, "p1")
            b = await opened(stub, "p2")
            third = stub.Apply()
            await third.write(open_req("p3"))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await third.read()
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_streams_per_peer" in (refused.value.details() or "")
            assert "p3" not in service.policies          # its handler never ran
            # a unary call counts too, and is refused alike while two streams are open
            with pytest.raises(grpc.aio.AioRpcError) as unary:
                await stub.GetPolicyState(rpb.PolicyStateRequest())
            assert unary.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            await a.done_writing()
            assert await a.code() == grpc.StatusCode.OK
            c = await opened(stub, "p3")                  # the slot is free again
            assert sorted(service.policies) == ["p1", "p2", "p3"]
            for call in (b, c):
                await call.done_writing()
                assert await call.code() == grpc.StatusCode.OK
            reply = await stub.GetPolicyState(rpb.PolicyStateRequest())
            assert len(reply.policies) == 3
    finally:
        await server.stop(0)
        await service.close()


class FakeContext:
    def __init__(self, peer: str) -> None:
        self._peer = peer

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}


def test_peer_key_without_tls_is_the_host() -> None:
    assert limits.peer_key(FakeContext("ipv4:10.0.0.5:40000")) == "addr/10.0.0.5"
    assert limits.peer_key(FakeContext("ipv4:10.0.0.5:40001")) == "addr/10.0.0.5"
    assert limits.peer_key(FakeContext("ipv6:[::1]:5")) == "addr/[::1]"
    assert limits.peer_key(FakeContext("unix:/run/x")) == "addr/unix:/run/x"


def test_node_installs_the_limit_and_the_deadline() -> None:
    saved = limits.first_message_timeout_s()
    try:
        config = TargetConfig(node=NodeConfig(id="t", max_streams_per_peer=7,
                                              first_message_timeout_s=3.5),
                              target=TargetSection(data_dir="/tmp/x"), tls=TLS)
        found = [i for i in server_interceptors(config, None)
                 if isinstance(i, limits.PeerStreamLimit)]
        assert len(found) == 1 and found[0].limit == 7
        assert limits.first_message_timeout_s() == 3.5
    finally:
        limits.configure(NodeConfig(id="t", first_message_timeout_s=saved))


async def test_server_wide_cap(tmp_path: Path) -> None:
    service = TargetService(tmp_path / "unused", stores=MemoryStores(tmp_path / "side"))
    await service.open_existing()
    server = rpc.Server("127.0.0.1:0", TLS, MSG, max_concurrent_rpcs=1)
    rgrpc.add_TargetServicer_to_server(service, server.grpc)
    await server.start()
    try:
        async with rpc.channel(server.address, TLS, MSG) as ch:
            stub = rgrpc.TargetStub(ch)
            a = await opened(stub, "p1")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.GetPolicyState(rpb.PolicyStateRequest())
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            await a.done_writing()
            assert await a.code() == grpc.StatusCode.OK
            await asyncio.sleep(0.05)
            assert len((await stub.GetPolicyState(rpb.PolicyStateRequest())).policies) == 1
    finally:
        await server.stop(0)
        await service.close()


def test_byte_budget_wakes_every_session_when_it_has_room() -> None:
    budget = limits.ByteBudget(100)
    woken: list[str] = []
    budget.watch(lambda: woken.append("a"))
    budget.watch(lambda: woken.append("b"))
    budget.take(60)
    budget.take(50)
    assert budget.full() and budget.used == 110
    budget.give(5)                      # 105: still full, nobody woken
    assert woken == []
    budget.give(10)                     # 95: room
    assert not budget.full() and woken == ["a", "b"]
    budget.give(1000)
    assert budget.used == 0


def test_byte_budget_keeps_a_fair_share_for_every_session() -> None:
    """A busy session that filled the budget does not starve a quiet one: under its
    share (limit / sessions) a session may read on while the budget is full."""
    budget = limits.ByteBudget(100)
    woken: list[str] = []
    busy, quiet = (lambda: woken.append("busy")), (lambda: woken.append("quiet"))
    budget.watch(busy)
    budget.watch(quiet)
    assert budget.share() == 50
    budget.take(100)                          # all of it the busy session's
    assert budget.full()
    assert budget.full_for(100)               # busy: stops reading
    assert not budget.full_for(0)             # quiet: reads on
    assert not budget.full_for(49) and budget.full_for(50)
    budget.unwatch(busy)                      # the busy one leaves: the quiet one's share
    assert woken == ["quiet"] and budget.share() == 100
    assert not budget.full_for(60)
