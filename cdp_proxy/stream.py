"""What the source and target roles' stream sessions share: the session
skeleton, the one way a session's failure becomes the upstream status, the
gRPC adapter of a downstream stream, the channel cache and the per-policy
last errors.

Theory of operation
-------------------
A session (one upstream stream, one policy) reads the upstream's first
message, checks it, opens its downstream, then runs a few tasks until one
fails or the upstream is done. Every failure is a `CdpError`: the session's
own checks raise ProtocolError / ConfigError / UnavailableError, the data's
decoders FormatError / AuthenticationError, and `Downstream` turns every
failure of the downstream call into `rpc.remote_error(...)` (or an
UnavailableError for a stream that ended or went quiet). `Session.serve`
ends the upstream call through `rpc.abort`, with the status from
`upstream_status`:

- a local error: its own `grpc_status`;
- a downstream that *answered* (the `cdp-answered` trailer) with a permanent
  code: that code, passed upstream (a bad key, a fenced epoch, an invalid
  stream are answers the filter must see as such);
- anything else (unreachable, crashed, deadline, a transient answer):
  UNAVAILABLE, so the filter reconnects with backoff and resends from the
  target's durable seq.

The message names the policy (`policy 'p': ...`) once the session knows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import grpc

from cdp_common import limits, rpc
from cdp_common.aio import cancel_and_wait
from cdp_common.config import TlsConfig
from cdp_common.errors import CdpError, ProtocolError, RemoteError, UnavailableError
from cdp_proxy import metrics

HANDSHAKE_TIMEOUT_S = 15.0

# `write` lives in cdp_common.rpc (shared with the filter's shipper).
write = rpc.stream_write


def upstream_status(exc: CdpError) -> str:
    """The status name the upstream call ends with for `exc` (rules above)."""
    if isinstance(exc, RemoteError):
        return exc.code if exc.answered and not exc.transient else "UNAVAILABLE"
    return exc.grpc_status


def upstream_error(exc: CdpError, policy: str) -> CdpError:
    """`exc` as the upstream sees it: the policy named, the status decided."""
    message = f"policy {policy!r}: {exc}" if policy else str(exc)
    return CdpError(message, grpc_status=upstream_status(exc), transient=exc.transient)


class Downstream:
    """A bidirectional call to the next hop; every failure comes out as a CdpError.

    `peer` names the next hop in messages ("target proxy 10.0.0.2:7001").
    """

    def __init__(self, call: Any, peer: str) -> None:
        self.call = call
        self.peer = peer

    async def open(self, request: Any, expect: str, what: str) -> Any:
        """Send the first message and return the reply, which must be `expect`."""
        try:
            await self.send(request)
            reply = await asyncio.wait_for(self.call.read(), HANDSHAKE_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            raise rpc.remote_error(exc, self.peer) from None
        except TimeoutError:
            raise UnavailableError(f"{self.peer}: no answer to the {what}") from None
        if reply is grpc.aio.EOF or reply.WhichOneof("body") != expect:
            raise UnavailableError(f"{self.peer}: expected {expect!r}, the stream ended or "
                                   "said something else")
        return reply

    async def send(self, request: Any) -> None:
        try:
            await write(self.call, request)
        except grpc.aio.AioRpcError as exc:
            raise rpc.remote_error(exc, self.peer) from None
        except asyncio.InvalidStateError:
            raise await self._ended() from None

    async def recv(self, expect: str) -> Any:
        """The next message, which must be `expect`; None when the peer ended with OK."""
        try:
            reply = await self.call.read()
        except grpc.aio.AioRpcError as exc:
            raise rpc.remote_error(exc, self.peer) from None
        if reply is grpc.aio.EOF:
            return None
        if reply.WhichOneof("body") != expect:
            raise UnavailableError(f"{self.peer} sent an unexpected message")
        return reply

    async def done_writing(self) -> None:
        try:
            await self.call.done_writing()
        except grpc.aio.AioRpcError as exc:
            raise rpc.remote_error(exc, self.peer) from None
        except asyncio.InvalidStateError:
            raise await self._ended() from None

    def close(self) -> None:
        """Cancel the call (idempotent)."""
        self.call.cancel()

    async def _ended(self) -> CdpError:
        """The error for a write to a call that had already ended."""
        code = await self.call.code()
        if code == grpc.StatusCode.OK:
            return UnavailableError(f"{self.peer} ended the stream")
        return rpc.remote_error(grpc.aio.AioRpcError(
            code, await self.call.initial_metadata(), await self.call.trailing_metadata(),
            await self.call.details()), self.peer)


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


@dataclass(frozen=True)
class StreamKind:
    """What tells one role's sessions from the other's."""

    role: str
    """"source" | "target": the metrics label."""
    first_body: str
    """The body the stream's first message must have ("hello", "open")."""
    first_name: str
    """That message in errors ("a hello")."""
    name: str
    """The RPC ("Ship")."""
    log: logging.Logger


class Session:
    """Skeleton of one upstream stream: first message, tasks, cleanup, the ending status.

    A subclass sets `kind` and implements `run(first, it)`: it sets
    `downstream` (anything with an idempotent `close()`) as soon as it opens
    one, and calls `tasks(...)` once it is open. The downstream is closed
    before the upstream call ends, whatever happened.
    """

    kind: ClassVar[StreamKind]

    def __init__(self, errors: PolicyErrors, context: grpc.aio.ServicerContext) -> None:
        self.errors = errors
        self.context = context
        self.policy = ""
        self.started = time.monotonic()
        self.peer = ""
        self.downstream: Any = None

    async def serve(self, request_iterator: AsyncIterator[Any]) -> None:
        """Run the session; end the upstream call for any CdpError it raised."""
        try:
            it = aiter(request_iterator)
            first = await limits.first_message(it, f"{self.kind.name} stream")
            if first is None:
                return
            kind = self.kind
            if first.WhichOneof("body") != kind.first_body:
                raise ProtocolError(f"the first message of a {kind.name} stream must "
                                    f"be {kind.first_name}")
            try:
                await self.run(getattr(first, kind.first_body), it)
            finally:
                if self.downstream is not None:
                    self.downstream.close()
        except CdpError as exc:
            upstream = upstream_error(exc, self.policy)
            if self.policy:
                self.errors.set(self.policy, str(upstream), self.started)
            self.kind.log.warning("%s stream ended: %s", self.kind.name.lower(), upstream,
                                  extra={"policy": self.policy, "peer": self.context.peer()})
            await rpc.abort(self.context, upstream)

    async def run(self, first: Any, it: AsyncIterator[Any]) -> None:
        """The session after its first message (`first`: that message's body)."""
        raise NotImplementedError

    async def tasks(self, tasks: list[asyncio.Task[None]], until: str
                    ) -> set[asyncio.Task[None]]:
        """Run `tasks` until the first completes or fails (`until`: an asyncio.wait
        condition); raise the first error. Always: the downstream is cancelled
        first (a target then drops any delta whose final chunk it lacks), then
        the tasks; the policy's error clears once the session has settled."""
        settle = asyncio.get_running_loop().call_later(
            SESSION_SETTLE_S, self.errors.clear, self.policy, self.started)
        try:
            done, _ = await asyncio.wait(tasks, return_when=until)
            errors = [t.exception() for t in done]
            for exc in errors:
                if exc is not None:
                    raise exc
            return done
        finally:
            settle.cancel()
            self.downstream.close()
            await cancel_and_wait(*tasks)

    @contextlib.contextmanager
    def counted(self) -> Iterator[None]:
        """Count the session in cdp_proxy_sessions while the block runs."""
        gauge = metrics.SESSIONS.labels(self.kind.role)
        gauge.inc()
        try:
            yield
        finally:
            gauge.dec()
