"""Target role: `TargetProxy.Replicate` — sealed frames in, checked plaintext chunks out.

One `_ReplicateSession` per source-proxy stream (one policy session):

    source proxy --SessionOpen--> proxy --ApplyOpen--> target
    source proxy <--accepted----- proxy <--opened----- target   (durable_seq)
    source proxy --DeltaFrame--> pump: order check, FrameOpener.open,
                                 delta.decode_chunk --queue--> writer --DeltaChunk-->
    source proxy <--ack---------------------- acker <-------------- ShipAck <--

Every frame is authenticated (AES-GCM tag over the header fields as AAD, and
the session counter) before any of its bytes are used, then its plaintext is
decoded with the session's disk sizes so nothing out of bounds is forwarded.

Design choice — forward as verified, never buffer a whole delta: a delta may
be as large as `interval_max_bytes`, so holding all of its chunks until its
final frame verifies would multiply memory per session. Instead each chunk is
forwarded as soon as its own frame verifies. If a later frame of the same
delta fails (wrong key, tampering, replay, malformed plaintext), the Apply
call to the target is cancelled *before* the upstream stream is aborted with
PERMISSION_DENIED / INVALID_ARGUMENT. The target commits a delta only when it
has received its `final` chunk and made it durable, and discards an
incomplete delta when its stream breaks, so nothing of a rejected delta ever
becomes durable or applied (FORMAT.md threat model).

Opening runs on the event loop: offloading it to a thread per frame
(`offload=True`) measured slower and costlier, as for the source role.

Bounded queues both ways: at most QUEUE_FRAMES decoded chunks wait between
the pump and the writer (the pump stops reading frames, so gRPC flow control
pushes back on the source proxy); acks are forwarded one at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from cdp_common import crypto, delta
from cdp_common.errors import AuthenticationError, FormatError
from cdp_common.pb.cdp.v1 import replication_pb2 as rpb
from cdp_common.pb.cdp.v1 import replication_pb2_grpc as rgrpc
from cdp_proxy import digests, metrics, stream
from cdp_proxy.stream import (
    SESSION_SETTLE_S,
    Channels,
    PolicyErrors,
    StreamAbort,
    downstream_abort,
    ended_call_abort,
    read_first,
)

log = logging.getLogger("proxy.target")

QUEUE_FRAMES = 4
DRAIN_TIMEOUT_S = 30.0


class TargetProxy(rgrpc.TargetProxyServicer):
    def __init__(self, node_id: str, channels: Channels, master_key: bytes | None,
                 errors: PolicyErrors | None = None, offload: bool = False) -> None:
        self.node_id = node_id
        self.channels = channels
        self.master_key = master_key
        self.errors = errors if errors is not None else PolicyErrors()
        self.offload = offload

    async def Replicate(self, request_iterator: AsyncIterator[rpb.ReplicateRequest],
                        context: grpc.aio.ServicerContext) -> None:
        session = _ReplicateSession(self, context)
        try:
            await session.run(request_iterator)
        except StreamAbort as exc:
            if session.policy:
                self.errors.set(session.policy, exc.message, session.started)
            log.warning("replicate stream ended: %s", exc.message,
                        extra={"policy": session.policy, "peer": context.peer()})
            await context.abort(exc.code, exc.message)

    async def GetDigests(self, request: rpb.DigestRequest,
                         context: grpc.aio.ServicerContext) -> AsyncIterator[rpb.DigestReply]:
        """Relay to the target (cdp_proxy/digests.py)."""
        async for reply in digests.relay(self.channels, request.target_address, "target",
                                         request, context):
            yield reply


class _ReplicateSession:
    def __init__(self, parent: TargetProxy, context: grpc.aio.ServicerContext) -> None:
        self.parent = parent
        self.context = context
        self.policy = ""
        self.started = time.monotonic()
        self.peer = ""
        self.call: Any = None
        self.queue: asyncio.Queue[rpb.ApplyRequest | None] = asyncio.Queue(QUEUE_FRAMES)
        # frame order: the next frame must continue the current delta or start
        # the one after it
        self.prev_last = 0
        self.cur: tuple[int, int] | None = None  # (first_seq, last_seq) of the open delta
        self.next_index = 0

    def _bad(self, what: str) -> StreamAbort:
        return StreamAbort(grpc.StatusCode.INVALID_ARGUMENT, f"policy {self.policy!r}: {what}")

    def _open_checks(self, o: rpb.SessionOpen) -> None:
        if not o.policy:
            raise StreamAbort(grpc.StatusCode.INVALID_ARGUMENT, "session open: policy is empty")
        if len(o.session_id) != crypto.SESSION_ID_BYTES:
            raise self._bad(f"session id must be {crypto.SESSION_ID_BYTES} bytes, "
                            f"got {len(o.session_id)}")
        if not o.target_address:
            raise self._bad("session open lacks target_address")
        if not o.disks or len({d.disk_id for d in o.disks}) != len(o.disks):
            raise self._bad("session open must list each disk once")
        if o.encryption and self.parent.master_key is None:
            raise StreamAbort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"policy {o.policy!r}: encryption requested but this proxy has "
                              "no key_file")

    async def run(self, request_iterator: AsyncIterator[rpb.ReplicateRequest]) -> None:
        it = request_iterator.__aiter__()
        try:
            first = await it.__anext__()
        except StopAsyncIteration:
            return
        if first.WhichOneof("body") != "open":
            raise StreamAbort(grpc.StatusCode.INVALID_ARGUMENT,
                              "the first message of a Replicate stream must be a session open")
        o = first.open
        self.policy = o.policy
        self._open_checks(o)
        self.peer = f"target {o.target_address}"
        key = None
        if o.encryption:
            assert self.parent.master_key is not None
            key = crypto.session_key(crypto.policy_key(self.parent.master_key, o.policy),
                                     o.session_id)
        self.opener = crypto.FrameOpener(o.policy, o.session_id, key)
        self.disk_sizes = {d.disk_id: d.size_bytes for d in o.disks}
        tasks: list[asyncio.Task[None]] = []
        settle: asyncio.TimerHandle | None = None
        metrics.SESSIONS.labels("target").inc()
        try:
            stub = rgrpc.TargetStub(self.parent.channels.get(o.target_address))
            self.call = stub.Apply()
            await stream.write(self.call, rpb.ApplyRequest(open=rpb.ApplyOpen(
                policy=o.policy, epoch=o.epoch, disks=list(o.disks),
                captured_seq=o.captured_seq)))
            try:
                reply = await read_first(self.call)
            except TimeoutError:
                raise StreamAbort(grpc.StatusCode.UNAVAILABLE,
                                  f"policy {self.policy!r}: {self.peer}: no answer to the "
                                  "apply open") from None
            if reply is grpc.aio.EOF or reply.WhichOneof("body") != "opened":
                raise StreamAbort(grpc.StatusCode.UNAVAILABLE,
                                  f"policy {self.policy!r}: {self.peer}: expected 'opened'")
            self.prev_last = reply.opened.durable_seq
            await self.context.write(rpb.ReplicateResponse(
                accepted=rpb.SessionAccepted(durable_seq=self.prev_last)))
            settle = asyncio.get_running_loop().call_later(
                SESSION_SETTLE_S, self.parent.errors.clear, self.policy, self.started)
            log.info("session open for source proxy %s, target durable seq %d",
                     o.source_proxy_id, self.prev_last,
                     extra={"policy": self.policy, "peer": self.peer, "epoch": o.epoch,
                            "seq": self.prev_last})
            tasks = [asyncio.create_task(self._pump(it), name="replicate-pump"),
                     asyncio.create_task(self._writer(), name="replicate-writer"),
                     asyncio.create_task(self._acker(), name="replicate-acker")]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                exc = t.exception()
                if exc is not None:
                    raise exc
            # all tasks ended normally: the source half-closed, everything was
            # forwarded and the target ended its stream after its last ack
        except grpc.aio.AioRpcError as exc:
            raise downstream_abort(exc, self.policy, self.peer) from None
        except asyncio.InvalidStateError:
            raise await ended_call_abort(self.call, self.policy, self.peer) from None
        finally:
            if settle is not None:
                settle.cancel()
            # Cancel the Apply call first: the target then drops any delta
            # whose final chunk it has not received.
            if self.call is not None:
                self.call.cancel()
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            metrics.SESSIONS.labels("target").dec()

    def _check_order(self, f: rpb.DeltaFrame) -> None:
        if self.cur is None:
            if f.index != 0:
                raise self._bad(f"frame {f.index} of delta {f.first_seq}..{f.last_seq} "
                                "arrived without its frame 0")
            if f.first_seq != self.prev_last + 1 or f.last_seq < f.first_seq:
                raise self._bad(f"delta {f.first_seq}..{f.last_seq} does not follow seq "
                                f"{self.prev_last}")
            self.cur = (f.first_seq, f.last_seq)
        elif (f.first_seq, f.last_seq) != self.cur or f.index != self.next_index:
            raise self._bad(f"frame {f.index} of delta {f.first_seq}..{f.last_seq} arrived "
                            f"where frame {self.next_index} of delta "
                            f"{self.cur[0]}..{self.cur[1]} was expected")
        if f.final:
            self.prev_last = f.last_seq
            self.cur = None
            self.next_index = 0
        else:
            self.next_index = f.index + 1

    def _open_frame(self, f: rpb.DeltaFrame) -> bytes:
        header = crypto.FrameHeader(f.first_seq, f.last_seq, f.index, f.final, f.newest_time_ns,
                                    f.gap_begin_time_ns, f.gap_after_seq, f.gap_end_seq,
                                    f.gap_end_time_ns)
        plain = self.opener.open(header, f.envelope)
        delta.check_chunk(plain, self.disk_sizes)  # bounds and format check, no copy
        self.parent.errors.clear(self.policy, self.started)
        return plain

    async def _pump(self, it: AsyncIterator[rpb.ReplicateRequest]) -> None:
        offload = self.parent.offload
        async for req in it:
            if req.WhichOneof("body") != "frame":
                raise self._bad("only delta frames may follow the session open")
            f = req.frame
            metrics.BYTES_IN.labels("target").inc(len(f.envelope))
            self._check_order(f)
            try:
                plain = (await asyncio.to_thread(self._open_frame, f) if offload
                         else self._open_frame(f))
            except AuthenticationError as exc:
                metrics.AUTH_FAILURES.inc()
                raise StreamAbort(grpc.StatusCode.PERMISSION_DENIED,
                                  f"policy {self.policy!r}: {exc}") from None
            except FormatError as exc:
                raise self._bad(f"frame {f.index} of delta {f.first_seq}..{f.last_seq}: "
                                f"{exc}") from None
            await self.queue.put(rpb.ApplyRequest(chunk=rpb.DeltaChunk(
                first_seq=f.first_seq, last_seq=f.last_seq, index=f.index, final=f.final,
                newest_time_ns=f.newest_time_ns, extents=plain, captured_seq=f.captured_seq,
                gap_begin_time_ns=f.gap_begin_time_ns, gap_after_seq=f.gap_after_seq,
                gap_end_seq=f.gap_end_seq, gap_end_time_ns=f.gap_end_time_ns)))
        await self.queue.put(None)

    async def _writer(self) -> None:
        while True:
            req = await self.queue.get()
            if req is None:
                await self.call.done_writing()
                return
            await stream.write(self.call, req)
            metrics.BYTES_OUT.labels("target").inc(len(req.chunk.extents))
            if req.chunk.final:
                metrics.DELTAS.labels("target").inc()

    async def _acker(self) -> None:
        while True:
            resp = await self.call.read()
            if resp is grpc.aio.EOF:
                return
            if resp.WhichOneof("body") != "ack":
                raise StreamAbort(grpc.StatusCode.UNAVAILABLE,
                                  f"policy {self.policy!r}: {self.peer} sent an unexpected "
                                  "message")
            await self.context.write(rpb.ReplicateResponse(ack=resp.ack))
