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


# `write` lives in cdp_common.rpc (shared with the filter's shipper).
write = rpc.stream_write


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


# A session counts as healthy, and clears its policy's last error, once data
# has gone through it (a verified frame, an ack) or it has stayed up this long.
# Clearing at the handshake alone would let a stream that fails on its first
# frame (wrong key) make the error flap in and out of the reports.
SESSION_SETTLE_S = 5.0


class PolicyErrors:
    """Last error per policy, reported with heartbeats (and cleared on success)."""

    def __init__(self) -> None:
        self._errors: dict[str, tuple[str, float]] = {}
        # start time of the newest session that opened successfully, per policy
        self._owner_started: dict[str, float] = {}

    def set(self, policy: str, message: str, session_started: float | None = None) -> None:
        """Record `message`, unless a session newer than the failing one already
        succeeded: an old stream ending late must not mask a healthy new one."""
        if (session_started is not None
                and session_started < self._owner_started.get(policy, float("-inf"))):
            return
        self._errors[policy] = (message, time.monotonic())

    def clear(self, policy: str, session_started: float | None = None) -> None:
        if session_started is not None:
            self._owner_started[policy] = max(session_started,
                                              self._owner_started.get(policy, float("-inf")))
        self._errors.pop(policy, None)

    def items(self, max_age_s: float = 300.0) -> list[tuple[str, str]]:
        now = time.monotonic()
        return [(p, m) for p, (m, t) in self._errors.items() if now - t <= max_age_s]


async def read_first(call: Any, timeout_s: float = HANDSHAKE_TIMEOUT_S) -> Any:
    """Read the first response of a stream-stream call, with a handshake deadline."""
    return await asyncio.wait_for(call.read(), timeout_s)
