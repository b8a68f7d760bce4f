"""Bounds on what one peer can make a server hold: streams, waiting, bytes.

Theory of operation
-------------------
A server must not be pinned by a peer that opens streams and sends nothing,
nor by one that opens thousands of them. Three bounds, each small:

- `PeerStreamLimit`, a server interceptor installed by the node skeleton
  (cdp_common.node.server_interceptors): at most `node.max_streams_per_peer`
  RPCs open at once per peer, the peer being its certificate identity
  (`role/id`, cdp_common.identity) or, without TLS, its address (host, not
  port: a new connection does not buy new slots). One more is refused with
  RESOURCE_EXHAUSTED before its handler runs. The server-wide cap is
  grpc's own `maximum_concurrent_rpcs` (cdp_common.rpc.Server).
- `first_message(it, what)`: a bidi stream's first message must arrive
  within `node.first_message_timeout_s` (set once per process by
  `configure`), else the stream ends with DEADLINE_EXCEEDED
  (`FirstMessageTimeout`). Used by Target.Apply and the proxies' sessions.
- `ByteBudget`: one account of bytes in flight shared by many sessions (the
  source proxy's `proxy_inflight_max_bytes`); a session stops reading while
  the budget is full and is woken when any session frees bytes.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from cdp_common import identity, rpc
from cdp_common.config import NodeConfig
from cdp_common.errors import CdpError

log = logging.getLogger("common.limits")
T = TypeVar("T")

FIRST_MESSAGE_TIMEOUT_S = NodeConfig.__dataclass_fields__["first_message_timeout_s"].default
_first_message_timeout_s: float = float(FIRST_MESSAGE_TIMEOUT_S)  # type: ignore[arg-type]


class FirstMessageTimeout(CdpError, grpc_status="DEADLINE_EXCEEDED", transient=True):
    """A stream sent no first message in time; it is closed."""


class TooManyStreams(CdpError, grpc_status="RESOURCE_EXHAUSTED", transient=True):
    """A peer has as many RPCs open as it may; this one is refused."""


def configure(node: NodeConfig) -> None:
    """Take this process's first-message deadline from its [node] config."""
    global _first_message_timeout_s
    _first_message_timeout_s = node.first_message_timeout_s


def first_message_timeout_s() -> float:
    return _first_message_timeout_s


async def first_message(it: AsyncIterator[T], what: str,
                        timeout_s: float | None = None) -> T | None:
    """The first message of a stream (None if it ended first), or FirstMessageTimeout."""
    limit = _first_message_timeout_s if timeout_s is None else timeout_s
    try:
        return await asyncio.wait_for(anext(it, None), limit)
    except TimeoutError:
        raise FirstMessageTimeout(f"{what}: no first message within {limit:g} s; "
                                  f"closing the stream") from None


# ---------------------------------------------------------------- per-peer streams

def peer_key(context: Any) -> str:
    """Who a peer is for the limit: its certificate identity, else its host."""
    ident = identity.peer_identity(context)
    if ident is not None:
        return f"{ident.role}/{ident.id}"
    peer = str(context.peer() or "")
    kind, _, rest = peer.partition(":")       # "ipv4:127.0.0.1:5555", "ipv6:[::1]:5555"
    host = rest.rpartition(":")[0] if kind in ("ipv4", "ipv6") else peer
    return f"addr/{host or peer}"


class PeerStreamLimit(grpc.aio.ServerInterceptor):
    """Refuse an RPC (RESOURCE_EXHAUSTED) when its peer already has `limit` open."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open: dict[str, int] = {}

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        return _wrap(handler, self)

    def enter(self, key: str) -> bool:
        n = self.open.get(key, 0)
        if n >= self.limit:
            return False
        self.open[key] = n + 1
        return True

    def leave(self, key: str) -> None:
        n = self.open.get(key, 1) - 1
        if n <= 0:
            self.open.pop(key, None)
        else:
            self.open[key] = n


def _refusal(key: str, limit: int) -> TooManyStreams:
    return TooManyStreams(f"peer {key} has {limit} RPCs open, the most allowed "
                          f"(node.max_streams_per_peer)")


def _wrap(handler: Any, limit: PeerStreamLimit) -> Any:
    """The same handler, counted against its peer's limit while it runs."""
    async def refuse(context: Any, key: str) -> None:
        log.warning("refused an RPC: %s", _refusal(key, limit.limit), extra={"peer": key})
        await rpc.abort(context, _refusal(key, limit.limit))

    unary: Callable[..., Any]
    if handler.unary_unary or handler.stream_unary:
        unary = _counted_coroutine(handler.unary_unary or handler.stream_unary, limit, refuse)
        make = (grpc.unary_unary_rpc_method_handler if handler.unary_unary
                else grpc.stream_unary_rpc_method_handler)
    else:
        inner = handler.unary_stream or handler.stream_stream
        make = (grpc.unary_stream_rpc_method_handler if handler.unary_stream
                else grpc.stream_stream_rpc_method_handler)
        if not inspect.isasyncgenfunction(inner):  # writes with context.write: a coroutine
            unary = _counted_coroutine(inner, limit, refuse)
        else:
            async def streaming(request: Any, context: Any) -> Any:
                key = peer_key(context)
                if not limit.enter(key):
                    await refuse(context, key)
                try:
                    async for item in inner(request, context):
                        yield item
                finally:
                    limit.leave(key)
            unary = streaming
    return make(unary, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


def _counted_coroutine(inner: Callable[..., Awaitable[Any]], limit: PeerStreamLimit,
                       refuse: Callable[[Any, str], Awaitable[None]]) -> Callable[..., Any]:
    async def counted(request: Any, context: Any) -> Any:
        key = peer_key(context)
        if not limit.enter(key):
            await refuse(context, key)
        try:
            return await inner(request, context)
        finally:
            limit.leave(key)
    return counted


# ---------------------------------------------------------------- shared byte budget

class ByteBudget:
    """Bytes in flight across sessions, against one limit.

    `take`/`give` move the account; `full_for(own)` says whether a session
    holding `own` bytes should stop reading: only while the budget is full
    *and* it holds its fair share (`share()`: the limit over the sessions
    watching) or more, so a busy session cannot starve a quiet one. The
    budget is thus passed by at most one share per session under it, at most
    the limit again. `watch(wake)` registers a callback run after every
    `give` while the budget is not full, and when a session leaves (the
    others' shares grow); each session re-checks its own space."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._watchers: list[Callable[[], None]] = []

    def full(self) -> bool:
        return self.used >= self.limit

    def share(self) -> int:
        """What every watching session may hold even while the budget is full."""
        return self.limit // max(1, len(self._watchers))

    def full_for(self, own: int) -> bool:
        return self.full() and own >= self.share()

    def take(self, n: int) -> None:
        self.used += n

    def give(self, n: int) -> None:
        self.used = max(0, self.used - n)
        if not self.full():
            for wake in list(self._watchers):
                wake()

    def watch(self, wake: Callable[[], None]) -> None:
        self._watchers.append(wake)

    def unwatch(self, wake: Callable[[], None]) -> None:
        if wake in self._watchers:
            self._watchers.remove(wake)
            for other in list(self._watchers):
                other()   # one session fewer: every share grew
