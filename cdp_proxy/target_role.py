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

Frame checks (order, authenticity, bounds) are `frames.FrameGate`'s; the
session skeleton and how failures become the upstream status (a downstream's
permanent answer passed on, anything else UNAVAILABLE) are `stream.Session`'s.

Bounded queues both ways: at most QUEUE_FRAMES decoded chunks wait between
the pump and the writer (the pump stops reading frames, so gRPC flow control
pushes back on the source proxy); acks are forwarded one at a time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from cdp_common import crypto, identity, rpc
from cdp_common.assignsig import Verifier
from cdp_common.errors import AuthenticationError, CdpError, FormatError, ProtocolError
from cdp_common.pb.cdp.v1 import replication_pb2 as rpb
from cdp_common.pb.cdp.v1 import replication_pb2_grpc as rgrpc
from cdp_proxy import binding, digests, frames, metrics
from cdp_proxy.stream import Channels, Downstream, PolicyErrors, Session, StreamKind

log = logging.getLogger("proxy.target")

QUEUE_FRAMES = 4


class TargetProxy(rgrpc.TargetProxyServicer):
    def __init__(self, node_id: str, channels: Channels, keys: crypto.KeyRing | None,
                 errors: PolicyErrors | None = None, offload: bool = False,
                 verifier: Verifier | None = None) -> None:
        self.node_id = node_id
        self.verifier = verifier
        self.epochs = binding.EpochFloor()
        """Checks session opens against their signed assignments (None: insecure)."""
        self.channels = channels
        self.keys = keys
        """The master-key ring: a session uses the key its open names (SIGHUP swaps it)."""
        self.errors = errors if errors is not None else PolicyErrors()
        self.offload = offload

    async def Replicate(self, request_iterator: AsyncIterator[rpb.ReplicateRequest],
                        context: grpc.aio.ServicerContext) -> None:
        await _ReplicateSession(self, context).serve(request_iterator)

    async def GetDigests(self, request: rpb.DigestRequest,
                         context: grpc.aio.ServicerContext) -> AsyncIterator[rpb.DigestReply]:
        """Relay to the target (cdp_proxy/digests.py)."""
        try:
            binding.bind_digests(self.verifier, self.node_id, request, context,
                                 identity.TARGET_PROXY)
        except CdpError as exc:
            await rpc.abort(context, exc)
        async for reply in digests.relay(self.channels, request.target_address, "target",
                                         request, context):
            yield reply


class _ReplicateSession(Session):
    kind = StreamKind("target", "open", "a session open", "Replicate", log)

    def __init__(self, parent: TargetProxy, context: grpc.aio.ServicerContext) -> None:
        super().__init__(parent.errors, context)
        self.parent = parent
        self.queue: asyncio.Queue[rpb.ApplyRequest | None] = asyncio.Queue(QUEUE_FRAMES)

    async def run(self, o: rpb.SessionOpen, it: AsyncIterator[rpb.ReplicateRequest]) -> None:
        self.policy = o.policy
        keys = self.parent.keys
        try:
            frames.check_open(o, keys)  # key confirmation: before anything downstream
        except AuthenticationError:
            metrics.AUTH_FAILURES.inc()
            raise
        binding.bind_open(self.parent.verifier, self.parent.node_id, o, self.context,
                          self.parent.epochs)
        self.peer = f"target {o.target_address}"
        opener = frames.opener_for(o, keys)
        with self.counted():
            self.downstream = call = Downstream(
                rgrpc.TargetStub(self.parent.channels.get(o.target_address)).Apply(), self.peer)
            reply = await call.open(rpb.ApplyRequest(open=rpb.ApplyOpen(
                policy=o.policy, epoch=o.epoch, disks=list(o.disks),
                captured_seq=o.captured_seq, assignment=o.assignment)), "opened", "apply open")
            durable = reply.opened.durable_seq
            self.gate = frames.FrameGate(opener, {d.disk_id: d.size_bytes for d in o.disks},
                                         durable)
            await self.context.write(rpb.ReplicateResponse(
                accepted=rpb.SessionAccepted(durable_seq=durable)))
            log.info("session open for source proxy %s with key id %d, target durable seq %d",
                     o.source_proxy_id, o.key_id, durable,
                     extra={"policy": self.policy, "peer": self.peer, "epoch": o.epoch,
                            "seq": durable})
            # all tasks ending normally: the source half-closed, everything was
            # forwarded and the target ended its stream after its last ack
            await self.tasks([asyncio.create_task(self._pump(it), name="replicate-pump"),
                              asyncio.create_task(self._writer(call), name="replicate-writer"),
                              asyncio.create_task(self._acker(call), name="replicate-acker")],
                             asyncio.FIRST_EXCEPTION)

    def _open_frame(self, f: rpb.DeltaFrame) -> bytes:
        plain = self.gate.open(f)
        self.errors.clear(self.policy, self.started)
        return plain

    async def _pump(self, it: AsyncIterator[rpb.ReplicateRequest]) -> None:
        offload = self.parent.offload
        async for req in it:
            if req.WhichOneof("body") != "frame":
                raise ProtocolError("only delta frames may follow the session open")
            f = req.frame
            metrics.BYTES_IN.labels("target").inc(len(f.envelope))
            metrics.POLICY_BYTES_IN.labels("target", self.policy).inc(len(f.envelope))
            self.gate.check_order(f)
            try:
                plain = (await asyncio.to_thread(self._open_frame, f) if offload
                         else self._open_frame(f))
            except AuthenticationError:
                metrics.AUTH_FAILURES.inc()
                raise
            except FormatError as exc:
                raise FormatError(f"frame {f.index} of delta {f.first_seq}..{f.last_seq}: "
                                  f"{exc}") from None
            await self.queue.put(rpb.ApplyRequest(chunk=frames.chunk_of(f, plain)))
        await self.queue.put(None)

    async def _writer(self, call: Downstream) -> None:
        while True:
            req = await self.queue.get()
            if req is None:
                await call.done_writing()
                return
            await call.send(req)
            metrics.BYTES_OUT.labels("target").inc(len(req.chunk.extents))
            if req.chunk.final:
                metrics.DELTAS.labels("target").inc()

    async def _acker(self, call: Downstream) -> None:
        while (reply := await call.recv("ack")) is not None:
            await self.context.write(rpb.ReplicateResponse(ack=reply.ack))
