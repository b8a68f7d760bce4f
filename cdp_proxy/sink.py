"""`DeltaSink`: what the source session (cdp_proxy/source.py) needs from its
downstream, and the wrappers that add throttling, metrics and unreachable
reports around any sink.

Implementations: `sink_grpc.GrpcDeltaSink` (the TargetProxy.Replicate stream,
production) and `sink_memory.MemoryDeltaSink` (a target proxy plus target in
memory, for tests). tests/unit/test_proxy_sink_conformance.py runs one suite
over both.

Contract of a DeltaSink (one sink = one session of one policy):

- `open(request)` opens the session and returns the downstream's durable
  seq D for the policy: every seq <= D is durable and stays so (restart: a
  new sink opened after any failure returns a D >= every seq acked before,
  so the source resends from D + 1 and nothing acked is lost). It fails if
  the request is invalid (ProtocolError family), if encryption is asked of a
  downstream without a key (FAILED_PRECONDITION), or if `request.epoch` is
  older than an epoch already opened for the policy (the epoch fence:
  FAILED_PRECONDITION, permanent). An open with an epoch >= the current one
  replaces an older open session, whose next `send`/`ack` fails with
  FAILED_PRECONDITION.
- `send(frame)` sends one sealed frame (frames.frame_of). Deltas go in seq
  order: frame 0 of a delta starts at D + 1 or just after the previous
  delta; its frames follow with consecutive indexes, the last `final`. A
  *duplicate* (a delta wholly <= the last one passed) is acked and changes
  nothing. A gap, an overlap or a frame out of order is a protocol error
  (INVALID_ARGUMENT, permanent), as is a frame that fails authentication
  (PERMISSION_DENIED) or does not decode (INVALID_ARGUMENT). A delta is
  durable only once its final frame was received; a session that ends
  before that leaves nothing of it (idempotent resend: the same delta sent
  again on a new session is accepted as if first sent).
- `ack()` waits for the next ack: the durable seq after a delta's final
  frame was made durable (non-decreasing, >= D); None when the downstream
  ended the session cleanly.
- A failure of `open`, `send` or `ack` is a `CdpError`; a failure reported by
  `send` may instead surface at the next `ack` (the transport buffers).
  `stream.upstream_status(exc)` is the status the source ends its own
  stream with: the code of a permanent answer, else UNAVAILABLE (retry).
- `close()` ends the session (idempotent, also after a failure); a delta
  without its final frame is dropped by the downstream.
- `peer` names the downstream in messages.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from cdp_common.errors import RemoteError
from cdp_common.pb.cdp.v1 import replication_pb2 as rpb
from cdp_proxy import metrics
from cdp_proxy.throttle import TokenBucket


class DeltaSink(Protocol):
    @property
    def peer(self) -> str: ...

    async def open(self, request: rpb.SessionOpen) -> int: ...

    async def send(self, frame: rpb.DeltaFrame) -> None: ...

    async def ack(self) -> int | None: ...

    def close(self) -> None: ...


SinkFactory = Callable[[rpb.ShipHello], DeltaSink]
"""Makes the sink of one session from the filter's hello (the hello names the
target proxy and target to use)."""


class SinkWrapper:
    """Passes everything to `inner`; a wrapper overrides what it adds to."""

    def __init__(self, inner: DeltaSink) -> None:
        self.inner = inner

    @property
    def peer(self) -> str:
        return self.inner.peer

    async def open(self, request: rpb.SessionOpen) -> int:
        return await self.inner.open(request)

    async def send(self, frame: rpb.DeltaFrame) -> None:
        await self.inner.send(frame)

    async def ack(self) -> int | None:
        return await self.inner.ack()

    def close(self) -> None:
        self.inner.close()


class ThrottledSink(SinkWrapper):
    """The policy's bandwidth limit: each frame waits for its envelope's tokens
    (throttle.py) before it is sent, so the backlog waits in the filter's
    journal, via back-pressure, instead of on the link."""

    def __init__(self, inner: DeltaSink, bucket: TokenBucket,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> None:
        super().__init__(inner)
        self.bucket = bucket
        self._clock = clock
        self._sleep = sleep

    async def send(self, frame: rpb.DeltaFrame) -> None:
        wait = self.bucket.reserve(len(frame.envelope), self._clock())
        if wait > 0:
            await self._sleep(wait)
        await self.inner.send(frame)


class MeteredSink(SinkWrapper):
    """cdp_proxy_bytes_out{role} counts every envelope the inner sink took."""

    def __init__(self, inner: DeltaSink, role: str = "source") -> None:
        super().__init__(inner)
        self._bytes_out = metrics.BYTES_OUT.labels(role)

    async def send(self, frame: rpb.DeltaFrame) -> None:
        await self.inner.send(frame)
        self._bytes_out.inc(len(frame.envelope))


class UnreachableReportingSink(SinkWrapper):
    """Calls `report(detail)` when the open fails because the downstream could
    not be reached at all (UNAVAILABLE that no node answered); the daemon
    passes that on to the coordinator, which probes and rebinds at once."""

    def __init__(self, inner: DeltaSink, report: Callable[[str], None]) -> None:
        super().__init__(inner)
        self._report = report

    async def open(self, request: rpb.SessionOpen) -> int:
        try:
            return await self.inner.open(request)
        except RemoteError as exc:
            if exc.code == "UNAVAILABLE" and not exc.answered:
                self._report(f"{exc.code}: {exc.details}")
            raise
