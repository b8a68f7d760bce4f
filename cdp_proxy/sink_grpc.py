"""`GrpcDeltaSink`: the production DeltaSink (sink.py), one TargetProxy.Replicate
stream to the target proxy the filter's hello names, over the proxy's cached
mTLS channel. Every failure comes out as a CdpError (stream.Downstream)."""

from __future__ import annotations

import grpc

from cdp_common.pb.cdp.v1 import replication_pb2 as rpb
from cdp_common.pb.cdp.v1 import replication_pb2_grpc as rgrpc
from cdp_proxy.sink import SinkFactory
from cdp_proxy.stream import Channels, Downstream


class GrpcDeltaSink:
    def __init__(self, channel: grpc.aio.Channel, address: str) -> None:
        self._call = Downstream(rgrpc.TargetProxyStub(channel).Replicate(),
                                f"target proxy {address}")

    @property
    def peer(self) -> str:
        return self._call.peer

    async def open(self, request: rpb.SessionOpen) -> int:
        reply = await self._call.open(rpb.ReplicateRequest(open=request), "accepted",
                                      "session open")
        return int(reply.accepted.durable_seq)

    async def send(self, frame: rpb.DeltaFrame) -> None:
        await self._call.send(rpb.ReplicateRequest(frame=frame))

    async def ack(self) -> int | None:
        reply = await self._call.recv("ack")
        return None if reply is None else int(reply.ack.durable_seq)

    def close(self) -> None:
        self._call.close()


def grpc_sinks(channels: Channels) -> SinkFactory:
    """The sink factory of a source proxy: a Replicate stream per session."""
    def connect(hello: rpb.ShipHello) -> GrpcDeltaSink:
        address = hello.target_proxy_address
        return GrpcDeltaSink(channels.get(address), address)
    return connect
