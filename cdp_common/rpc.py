"""The one place that builds gRPC servers and channels, and maps errors to and from gRPC.

Mutual TLS unless the config says `insecure = true`; explicit message size
limits; keepalive so a dead peer is noticed within seconds; a cap on the
RPCs a server runs at once (`maximum_concurrent_rpcs`); grpc.health.v1 on
every server; server interceptors passed in by the node skeleton
(cdp_common.node), the one place that installs them.

The only two error mappers:

- `abort(context, exc)`: a servicer ends a call for a `CdpError` with the
  error's `grpc_status` and its message, plus the trailer `cdp-answered`, which
  says that this node's own code ended the call (not the transport, a crash or
  a proxy that lost its peer);
- `remote_error(exc, peer)`: a caller turns a `grpc.RpcError` into a
  `RemoteError` whose `transient` follows the status code (TRANSIENT_CODES)
  and whose `answered` is that trailer; a permanent answer from the peer
  itself is a `RemoteProtocolError`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import grpc

from cdp_common.config import TlsConfig
from cdp_common.errors import CdpError, ConfigError, RemoteError, RemoteProtocolError

KEEPALIVE_MS = 2000
DEFAULT_MAX_CONCURRENT_RPCS = 4096
"""As the [node] max_concurrent_rpcs default (cdp_common.config.NodeConfig)."""


def _options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", 1000),
        ("grpc.http2.min_time_between_pings_ms", 1000),
    ]


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"tls.{what}: cannot read {path} ({exc.strerror})") from None


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(_read(tls.key_file, "key_file"), _read(tls.cert_file, "cert_file"))],
        root_certificates=_read(tls.ca_file, "ca_file"),
        require_client_auth=True,
    )


def channel_credentials(tls: TlsConfig) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca_file, "ca_file"),
        private_key=_read(tls.key_file, "key_file"),
        certificate_chain=_read(tls.cert_file, "cert_file"),
    )


class Server:
    """A grpc.aio server with health checking, bound to one address."""

    def __init__(self, listen: str, tls: TlsConfig, max_message_bytes: int,
                 interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
                 max_concurrent_rpcs: int | None = DEFAULT_MAX_CONCURRENT_RPCS) -> None:
        """`max_concurrent_rpcs`: RPCs beyond it are refused by grpc with
        RESOURCE_EXHAUSTED (node.max_concurrent_rpcs)."""
        self.grpc = grpc.aio.server(options=_options(max_message_bytes),
                                    interceptors=list(interceptors) or None,
                                    maximum_concurrent_rpcs=max_concurrent_rpcs)
        # here, not at the top: clients (cdpctl) need no health server
        from grpc_health.v1 import health, health_pb2_grpc
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        if tls.insecure:
            port = self.grpc.add_insecure_port(listen)
        else:
            # reloadable on SIGHUP for new connections (cdp_common/tlsreload.py)
            from cdp_common.tlsreload import ReloadableServerTls
            self.tls_reloader = ReloadableServerTls(tls)
            port = self.grpc.add_secure_port(listen, self.tls_reloader.credentials())
        if port == 0:
            raise ConfigError(f"node.listen: cannot bind {listen}")
        host = listen.rpartition(":")[0]
        self.address = f"{host}:{port}"

    async def start(self) -> None:
        from grpc_health.v1 import health_pb2
        await self.grpc.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace_s: float = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.grpc.stop(grace_s)


def channel(address: str, tls: TlsConfig, max_message_bytes: int) -> grpc.aio.Channel:
    """An aio channel to `address` with the same TLS and limits as our servers."""
    options = _options(max_message_bytes)
    if tls.insecure:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, channel_credentials(tls), options=options)


def sync_channel(address: str, tls: TlsConfig, max_message_bytes: int = 16 << 20) -> grpc.Channel:
    """A blocking channel, for the CLI."""
    options = _options(max_message_bytes)
    if tls.insecure:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, channel_credentials(tls), options=options)


# ---------------------------------------------------------------- error mappers

ANSWERED_KEY = "cdp-answered"
"""Trailer set by `abort`: the node called ended the call on purpose."""

TRANSIENT_CODES = frozenset({
    grpc.StatusCode.UNAVAILABLE,          # unreachable, restarting, shutting down, disk full
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,              # a seq gap: reconnect and resend from durable_seq
    grpc.StatusCode.RESOURCE_EXHAUSTED,   # busy (memory cap)
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,              # a crash in the peer's handler
    grpc.StatusCode.INTERNAL,
})
"""Codes a retry may cure; every other code is a permanent answer (bad key, fenced, invalid)."""


def status_of(exc: CdpError) -> grpc.StatusCode:
    """The status a server ends a call with for `exc` (its `grpc_status`)."""
    code = getattr(grpc.StatusCode, exc.grpc_status, None)
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.INTERNAL


def answered_trailer() -> tuple[tuple[str, str], ...]:
    return ((ANSWERED_KEY, "1"),)


async def abort(context: grpc.aio.ServicerContext[Any, Any], exc: CdpError,
                code: grpc.StatusCode | None = None) -> NoReturn:
    """End the call for `exc` (status from the error unless `code` is given)."""
    await context.abort(code or status_of(exc), str(exc),
                        trailing_metadata=answered_trailer())
    raise AssertionError("context.abort returned")  # pragma: no cover


def _answered(metadata: Iterable[Any] | None) -> bool:
    for item in metadata or ():
        key = item[0] if isinstance(item, tuple) else getattr(item, "key", "")
        if key == ANSWERED_KEY:
            return True
    return False


def remote_error(exc: grpc.RpcError, peer: str) -> RemoteError:
    """The `RemoteError` for a call to `peer` that failed with `exc`."""
    code: grpc.StatusCode = exc.code()
    details: str = exc.details() or code.name
    try:
        answered = _answered(exc.trailing_metadata())
    except Exception:  # a locally built RpcError may have none
        answered = False
    transient = code in TRANSIENT_CODES
    cls = RemoteProtocolError if answered and not transient else RemoteError
    return cls(f"{peer}: {details}" if peer else details, code=code.name, details=details,
               answered=answered, transient=transient)


def code_of(exc: RemoteError) -> grpc.StatusCode:
    """The `grpc.StatusCode` a `RemoteError` carries."""
    return getattr(grpc.StatusCode, exc.code, grpc.StatusCode.UNKNOWN)


# ---------------------------------------------------------------- write, keeping the status
#
# grpc.aio bug (grpc/grpc#36066, fix proposed in grpc/grpc#43486): when the
# server ends a stream (e.g. aborts with PERMISSION_DENIED) while a client
# write is in progress, `_StreamRequestMixin._write` overwrites the status the
# server delivered with INTERNAL "Internal error from Core". We would then
# report a bad key as a transient error. `stream_write` below does what
# `call.write` does but, when the send fails, first waits briefly for the
# peer's status, which Core does deliver; only if none comes does it fall
# back to grpc's INTERNAL. It uses grpc.aio internals, checked once here; if
# they ever change it falls back to plain `call.write`.

STATUS_WAIT_S = 1.0

try:
    from grpc._cython import cygrpc as _cygrpc

    _CORE_ERROR: type[BaseException] | None = _cygrpc.InternalError
except (ImportError, AttributeError):  # pragma: no cover - other grpc versions
    _CORE_ERROR = None


async def stream_write(call: Any, request: Any) -> None:
    """`await call.write(request)`, keeping the peer's status if the stream ends meanwhile."""
    cy = getattr(call, "_cython_call", None)
    serializer = getattr(call, "_request_serializer", None)
    sent = getattr(call, "_metadata_sent", None)
    if (_CORE_ERROR is None or cy is None or serializer is None
            or sent is None or not sent.is_set() or call.done()
            or getattr(call, "_done_writing_flag", True)):
        await call.write(request)
        return
    data = serializer(request)
    try:
        await cy.send_serialized_message(data)
    except asyncio.CancelledError:
        if not call.cancelled():
            call.cancel()
        raise
    except Exception as exc:
        if not isinstance(exc, _CORE_ERROR):
            raise
        try:
            code = await asyncio.wait_for(asyncio.shield(call.code()), STATUS_WAIT_S)
        except TimeoutError:
            cy.set_internal_error(str(exc))
            code = await call.code()
        if code == grpc.StatusCode.OK:
            raise asyncio.InvalidStateError("the RPC already finished") from None
        raise grpc.aio.AioRpcError(code, await call.initial_metadata(),
                                   await call.trailing_metadata(), await call.details(),
                                   await call.debug_error_string()) from None
