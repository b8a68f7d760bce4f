"""The one place that builds gRPC servers and channels.

Mutual TLS unless the config says `insecure = true`; explicit message size
limits; keepalive so a dead peer is noticed within seconds; grpc.health.v1 on
every server.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cdp_common.config import TlsConfig
from cdp_common.errors import ConfigError

KEEPALIVE_MS = 2000


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

    def __init__(self, listen: str, tls: TlsConfig, max_message_bytes: int) -> None:
        self.grpc = grpc.aio.server(options=_options(max_message_bytes))
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
