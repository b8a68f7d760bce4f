"""Relay of `GetDigests` (digest sync) through the proxies.

Theory of operation: the filter only talks to its source proxy, so a digest
request travels filter -> source proxy -> target proxy -> target, and the
replies (server streams) travel back unchanged. Each hop picks the next one
from the request itself (`target_proxy_address` at the source proxy,
`target_address` at the target proxy, both from the filter's assignment), over
the proxy's cached mTLS channel to that peer. Digests are not secret data but
do reveal which regions are equal; the hops are mTLS like every channel.
A downstream failure ends the upstream call with the same status as the data
path would (stream.upstream_status); nothing is kept between calls.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from cdp_common import rpc
from cdp_common.errors import ProtocolError
from cdp_common.pb.cdp.v1 import replication_pb2 as rpb
from cdp_common.pb.cdp.v1 import replication_pb2_grpc as rgrpc
from cdp_proxy.stream import Channels, upstream_error

CALL_TIMEOUT_S = 3600.0


async def relay(channels: Channels, address: str, which: str, req: rpb.DigestRequest,
                context: grpc.aio.ServicerContext) -> AsyncIterator[rpb.DigestReply]:
    """Forward `req` to the `which` ("target proxy" | "target") at `address`."""
    if not req.policy or not address:
        await rpc.abort(context, ProtocolError(
            f"digest request for policy {req.policy!r} names no {which} address"))
    channel = channels.get(address)
    stub: rgrpc.TargetProxyStub | rgrpc.TargetStub = (
        rgrpc.TargetProxyStub(channel) if which == "target proxy" else rgrpc.TargetStub(channel))
    call = stub.GetDigests(req, timeout=CALL_TIMEOUT_S)
    try:
        async for reply in call:
            yield reply
    except grpc.aio.AioRpcError as exc:
        await rpc.abort(context, upstream_error(rpc.remote_error(exc, f"{which} {address}"),
                                                req.policy))
    finally:
        call.cancel()
