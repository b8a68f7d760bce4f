"""The two error mappers of cdp_common.rpc over a real loopback server, and Backoff."""

from __future__ import annotations

import random
import socket
from typing import Any

import grpc
import pytest

from cdp_common import errors, rpc
from cdp_common.backoff import Backoff, is_transient
from cdp_common.config import TlsConfig
from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
from cdp_common.pb.cdp.v1 import coordinator_pb2_grpc as cgrpc

pytestmark = pytest.mark.timeout(30)
TLS = TlsConfig(insecure=True)


class Raising(cgrpc.CoordinatorServicer):
    """GetStatus raises the error it is given, through rpc.abort."""

    def __init__(self) -> None:
        self.error: errors.CdpError = errors.CdpError("boom")

    async def GetStatus(self, request: Any, context: Any) -> Any:
        await rpc.abort(context, self.error)


@pytest.mark.parametrize(("error", "code", "transient", "cls"), [
    (errors.FencedError("policy p: epoch 3 < 4"), "FAILED_PRECONDITION", False,
     errors.RemoteProtocolError),
    (errors.AuthenticationError("bad tag"), "PERMISSION_DENIED", False, errors.RemoteProtocolError),
    (errors.FormatError("bad magic"), "INVALID_ARGUMENT", False, errors.RemoteProtocolError),
    (errors.ProtocolError("seq gap", grpc_status="ABORTED"), "ABORTED", True, errors.RemoteError),
    (errors.StorageError("disk full"), "UNAVAILABLE", True, errors.RemoteError),
    (errors.CdpError("unexpected"), "INTERNAL", True, errors.RemoteError),
])
async def test_abort_then_remote_error(error: errors.CdpError, code: str, transient: bool,
                                       cls: type[errors.RemoteError]) -> None:
    servicer = Raising()
    servicer.error = error
    server = rpc.Server("127.0.0.1:0", TLS, 1 << 20)
    cgrpc.add_CoordinatorServicer_to_server(servicer, server.grpc)
    await server.start()
    try:
        async with rpc.channel(server.address, TLS, 1 << 20) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await cgrpc.CoordinatorStub(ch).GetStatus(cpb.StatusRequest(), timeout=5)
    finally:
        await server.stop(0)
    remote = rpc.remote_error(info.value, "coordinator")
    assert type(remote) is cls
    assert (remote.code, remote.transient, remote.answered) == (code, transient, True)
    assert remote.details == str(error) and str(remote) == f"coordinator: {error}"
    assert rpc.code_of(remote) == getattr(grpc.StatusCode, code)


async def test_unreachable_peer_did_not_answer() -> None:
    with socket.socket() as s:      # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with rpc.channel(f"127.0.0.1:{port}", TLS, 1 << 20) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await cgrpc.CoordinatorStub(ch).GetStatus(cpb.StatusRequest(), timeout=2)
    remote = rpc.remote_error(info.value, "")
    assert type(remote) is errors.RemoteError
    assert remote.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
    assert remote.transient and not remote.answered


def test_backoff_doubles_caps_resets_and_holds_permanent() -> None:
    b = Backoff(first_s=0.2, max_s=2.0, hold_s=10.0, jitter=0.0)
    assert [b.delay() for _ in range(6)] == [0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    b.reset()
    assert b.delay() == 0.2
    assert b.delay(transient=False) == 10.0
    assert b.delay() == 0.4            # a permanent failure does not grow the transient ramp
    assert b.delay_for(errors.StorageError("x")) == 0.8 and b.delay_for(ValueError()) == 10.0
    j = Backoff(first_s=1.0, jitter=0.1, rand=random.Random(1))
    assert all(0.9 <= j.delay() / base <= 1.1 for base in (1.0, 2.0, 2.0))
    assert is_transient(errors.StorageError("x")) and not is_transient(errors.FencedError("x"))


def test_exit_codes_are_unique() -> None:
    codes = [code for code, _, _ in errors.EXIT_CODES]
    assert len(codes) == len(set(codes))
    assert codes[:4] == [0, 1, 2, 3]

