"""Helpers shared by the source and target roles: channel cache, stream
errors and how a downstream failure becomes the upstream stream's status."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import grpc

from cdp_common import rpc
from cdp_common.config import TlsConfig

HANDSHAKE_TIMEOUT_S = 15.0

# Downstream statuses passed upstream unchanged; everything else (a dropped
# connection, a crash, a deadline) is reported as UNAVAILABLE so the filter
# reconnects with backoff and resends from the target's durable seq.
_KEEP = {
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
}


class StreamAbort(Exception):
    """End the upstream stream with `code` and `message`."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def downstream_abort(exc: grpc.aio.AioRpcError, policy: str, peer: str) -> StreamAbort:
    """The upstream status for a failed downstream call."""
    code = exc.code()
    if code not in _KEEP:
        code = grpc.StatusCode.UNAVAILABLE
    return StreamAbort(code, f"policy {policy!r}: {peer}: {exc.details() or exc.code().name}")


# ---------------------------------------------------------------- write, keeping the status
#
# grpc.aio bug (grpc/grpc#36066, fix proposed in grpc/grpc#43486): when the
# server ends a stream (e.g. aborts with PERMISSION_DENIED) while a client
# write is in progress, `_StreamRequestMixin._write` overwrites the status the
# server delivered with INTERNAL "Internal error from Core". We would then
# report a bad key as a transient error. `write` below does what
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


async def write(call: Any, request: Any) -> None:
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


async def ended_call_abort(call: Any, policy: str, peer: str) -> StreamAbort:
    """The status to report when writing to `call` failed because it had already ended."""
    code = await call.code()
    details = await call.details()
    if code == grpc.StatusCode.OK:
        return StreamAbort(grpc.StatusCode.UNAVAILABLE,
                           f"policy {policy!r}: {peer} ended the stream")
    if code not in _KEEP:
        code = grpc.StatusCode.UNAVAILABLE
    return StreamAbort(code, f"policy {policy!r}: {peer}: {details or code.name}")


class Channels:
    """One aio channel per peer address, reused by every stream to that peer."""

    def __init__(self, tls: TlsConfig, max_message_bytes: int) -> None:
        self._tls = tls
        self._max = max_message_bytes
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = rpc.channel(address, self._tls, self._max)
        return ch

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for ch in channels:
            with contextlib.suppress(Exception):
                await ch.close(grace=None)


class PolicyErrors:
    """Last error per policy, reported with heartbeats (and cleared on success)."""

    def __init__(self) -> None:
        self._errors: dict[str, tuple[str, float]] = {}

    def set(self, policy: str, message: str) -> None:
        self._errors[policy] = (message, time.monotonic())

    def clear(self, policy: str) -> None:
        self._errors.pop(policy, None)

    def items(self, max_age_s: float = 300.0) -> list[tuple[str, str]]:
        now = time.monotonic()
        return [(p, m) for p, (m, t) in self._errors.items() if now - t <= max_age_s]


async def read_first(call: Any, timeout_s: float = HANDSHAKE_TIMEOUT_S) -> Any:
    """Read the first response of a stream-stream call, with a handshake deadline."""
    return await asyncio.wait_for(call.read(), timeout_s)
