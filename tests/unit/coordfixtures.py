"""Shared helpers of the coordinator tests (a plain module, no fixtures): policies,
nodes, configs, an injected clock, and two ways to reach a `CoordinatorService`:

- `serve(svc, "grpc")`: a real gRPC server on loopback and a stub;
- `serve(svc, "direct")`: a `DirectStub` that calls the servicer's methods in
  process with a `FakeContext`; an abort reaches the caller as the same
  `grpc.aio.AioRpcError` (code, details) a gRPC client would see.

Both yield something that answers like a `CoordinatorStub`, so one test body
asserts the same things over both.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn

import grpc

from cdp_common import rpc
from cdp_common.config import (
    CoordinatorConfig,
    CoordinatorSection,
    NodeConfig,
    PolicyConfig,
    PolicyDiskConfig,
    TlsConfig,
)
from cdp_common.pb.cdp.v1 import coordinator_pb2_grpc as cgrpc
from cdp_coordinator.memstore import MemoryBacking, MemoryStore
from cdp_coordinator.model import NodeInfo, Role
from cdp_coordinator.service import CoordinatorService, Probe

TLS = TlsConfig(insecure=True)


class Clock:
    """An injected clock: call it for the time, set `t` to move it."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def pol(name: str, **kw: object) -> PolicyConfig:
    """A policy of two disks on filter-1, replicated to target-1."""
    return PolicyConfig(name=name, disks=[PolicyDiskConfig("filter-1", "disk0", 1 << 20),
                                          PolicyDiskConfig("filter-1", "disk1", 2 << 20)],
                        target="target-1", **kw)  # type: ignore[arg-type]


def config(db: Path | str, policies: list[PolicyConfig], lease_ms: int = 300,
           listen: str = "127.0.0.1:0") -> CoordinatorConfig:
    return CoordinatorConfig(node=NodeConfig(id="coordinator", listen=listen),
                             coordinator=CoordinatorSection(db_path=str(db), heartbeat_ms=100,
                                                            lease_ms=lease_ms),
                             policies=policies, tls=TLS)


NODES = [NodeInfo("filter-1", int(Role.FILTER), "default", "127.0.0.1:1"),
         NodeInfo("sp-1", int(Role.SOURCE_PROXY), "default", "127.0.0.1:2"),
         NodeInfo("sp-2", int(Role.SOURCE_PROXY), "default", "127.0.0.1:5"),
         NodeInfo("tp-1", int(Role.TARGET_PROXY), "default", "127.0.0.1:3"),
         NodeInfo("target-1", int(Role.TARGET), "default", "127.0.0.1:4")]
"""A filter, two source proxies, a target proxy and a target, all on site "default"."""


def memory_service(policies: list[PolicyConfig], backing: MemoryBacking | None = None,
                   clock: Callable[[], float] | None = None,
                   wall: Callable[[], float] | None = None, probe: Probe | None = None,
                   lease_ms: int = 300) -> CoordinatorService:
    """A service on a `MemoryStore`; pass the `backing` of a closed one to restart it."""
    kw: dict[str, Any] = {k: v for k, v in (("clock", clock), ("wall", wall),
                                            ("probe", probe)) if v is not None}
    return CoordinatorService(config("unused.db", policies, lease_ms=lease_ms),
                              MemoryStore(backing), **kw)


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    def as_rpc_error(self) -> grpc.aio.AioRpcError:
        """What a gRPC client would have seen."""
        return grpc.aio.AioRpcError(self.code, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                    self.details)


class FakeContext:
    """The part of `grpc.aio.ServicerContext` the servicer uses."""

    async def abort(self, code: grpc.StatusCode, details: str = "",
                    trailing_metadata: object = ()) -> NoReturn:
        raise Aborted(code, details)

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}   # plaintext: no certificate identity

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"


class DirectStub:
    """`CoordinatorStub` look-alike calling the servicer in process (unary RPCs)."""

    def __init__(self, svc: CoordinatorService) -> None:
        self.svc = svc

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        method = getattr(self.svc, name)

        async def call(request: object, timeout: float | None = None) -> Any:
            try:
                return await method(request, FakeContext())
            except Aborted as exc:
                raise exc.as_rpc_error() from None
        return call


TRANSPORTS = ["grpc", "direct"]


@contextlib.asynccontextmanager
async def serve(svc: CoordinatorService, transport: str) -> AsyncIterator[Any]:
    """A stub for `svc`: over loopback gRPC, or direct (see the module docstring)."""
    if transport == "direct":
        yield DirectStub(svc)
        return
    server = rpc.Server("127.0.0.1:0", TLS, 1 << 20)
    cgrpc.add_CoordinatorServicer_to_server(svc, server.grpc)
    await server.start()
    channel = rpc.channel(server.address, TLS, 1 << 20)
    try:
        yield cgrpc.CoordinatorStub(channel)
    finally:
        await channel.close()
        await server.stop(0)
