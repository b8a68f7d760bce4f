"""Source role: `SourceProxy.Ship` — filter records in, sealed delta frames out.

One `_ShipSession` per filter stream (one policy):

    filter --hello--> proxy --SessionOpen--> target proxy
    filter <-welcome- proxy <--accepted----- target proxy   resume_from_seq = durable_seq
    filter --batch--> reader --cutter--> deltas --sender--> DeltaFrames ----->
    filter <--ack---- acker  <------------------------------ ShipAck (durable) <--

The downstream is a `sink.DeltaSink` (the contract is in cdp_proxy/sink.py):
by default a `sink_grpc.GrpcDeltaSink` over TargetProxy.Replicate, in tests a
`sink_memory.MemoryDeltaSink`; throttling, metrics and unreachable reports
are wrappers around it (`_sink`), not code in this session.

Tasks: `reader` decodes batches and feeds the cutter; `ticker` closes
intervals on time (every 100 ms); `sender` encodes each delta into chunks and
seals them (zstd + AES-GCM) one frame at a time, yielding to the event loop at
every frame write; `acker` forwards the target's acks to the filter.

Sealing runs on the event loop by default. Offloading it to a worker thread
per frame (`offload=True`) was measured with 1 MiB frames of mixed data,
source and target proxy in separate processes on the 2-core machine: inline
245-339 MiB/s at 2.6-3.2 ms CPU per MiB, offloaded 183-206 MiB/s at
4.4-4.8 ms/MiB — the thread hand-offs cost more than the overlap gains.

Bandwidth limit: when the hello carries `bandwidth_limit_mbps` > 0, the
sink is wrapped in a `sink.ThrottledSink`, whose `throttle.TokenBucket`
makes every frame wait for its tokens, so the policy never sends faster
than its limit to the target proxy (the backlog then waits in the filter's
journal, via back-pressure).

A target proxy that cannot be reached at all (UNAVAILABLE that no node
answered, during the session open) is reported to the coordinator through
`on_unreachable` (`sink.UnreachableReportingSink`), which probes it and
rebinds at once if the probe fails.

Back-pressure (I4): each cut delta's encoded size enters the in-flight
account until the target acks its last seq; while the account is at or above
`proxy.inflight_max_bytes` the reader stops reading from the filter, so gRPC
flow control pushes back to the filter, whose journal absorbs the burst.
Memory held by a session is thus bounded by inflight_max_bytes plus one open
interval (interval_max_bytes) plus one batch. Every session's bytes also
count against one proxy-wide budget (`proxy.proxy_inflight_max_bytes`,
cdp_common.limits.ByteBudget): while it is full every session that holds its
fair share of it (the budget over the sessions) stops reading, so many
policies cannot add up to much more than it (at most twice, plus one
interval each), and a busy policy cannot starve a quiet one.

Consistency groups: a hello whose signed claims name a group joins that
group's `groups.Group` on this proxy, which sends checkpoint hold/mark
commands down the members' streams (interleaved with acks under one write
lock) and hears the filters' HELD answers through the reader; the session's
cutter then ends deltas at the CHECKPOINT markers (cutter.py).

Any failure ends the filter's stream with a gRPC status naming the policy and
the peer; a downstream's permanent answer is passed on, anything else is
UNAVAILABLE (stream.upstream_status). The filter reconnects and resends from
the target's durable seq, so the proxy keeps nothing across streams. When the
filter goes away the handler is cancelled and so is the downstream call.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc

from cdp_common import assignsig, crypto, delta, identity, limits, records, rpc
from cdp_common.assignsig import Verifier
from cdp_common.config import ProxySection
from cdp_common.errors import (
    CdpError,
    FormatError,
    NotAuthorizedError,
    NotFoundError,
    ProtocolError,
    UnavailableError,
)
from cdp_common.pb.cdp.v1 import replication_pb2 as rpb
from cdp_common.pb.cdp.v1 import replication_pb2_grpc as rgrpc
from cdp_proxy import binding, digests, frames, groups, metrics, throttle
from cdp_proxy.cutter import Delta, IntervalCutter
from cdp_proxy.sink import (
    DeltaSink,
    MeteredSink,
    SinkFactory,
    ThrottledSink,
    UnreachableReportingSink,
)
from cdp_proxy.sink_grpc import grpc_sinks
from cdp_proxy.stream import Channels, PolicyErrors, Session, StreamKind

log = logging.getLogger("proxy.source")

TICK_S = 0.1
DEFAULT_RPO_S = 2.0


class SourceProxy(rgrpc.SourceProxyServicer):
    def __init__(self, node_id: str, proxy: ProxySection, channels: Channels,
                 keys: crypto.KeyRing | None, errors: PolicyErrors | None = None,
                 offload: bool = False, sinks: SinkFactory | None = None,
                 verifier: Verifier | None = None) -> None:
        self.node_id = node_id
        self.proxy = proxy
        self.channels = channels
        self.keys = keys
        """The master-key ring; new sessions seal with its current key (SIGHUP swaps it)."""
        self.errors = errors if errors is not None else PolicyErrors()
        self.verifier = verifier
        self.epochs = binding.EpochFloor()
        """Checks hellos against their signed assignments (None: insecure, unchecked)."""
        self.budget = limits.ByteBudget(proxy.proxy_inflight_max_bytes)
        """In-flight bytes of all sessions (the proxy-wide back-pressure)."""
        self.offload = offload
        self.sinks = sinks if sinks is not None else grpc_sinks(channels)
        """Makes each session's downstream (tests pass a MemoryTarget's)."""
        self.groups = groups.Groups()
        """The consistency groups whose members this proxy serves."""
        self.on_unreachable: Any = None
        """async on_unreachable(node_id, address, policy, detail), set by the daemon."""
        self._reports: set[asyncio.Task[object]] = set()

    def report_unreachable(self, node_id: str, address: str, policy: str, detail: str) -> None:
        if self.on_unreachable is None:
            return
        task = asyncio.ensure_future(self.on_unreachable(node_id, address, policy, detail))
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    def _sink(self, hello: rpb.ShipHello) -> DeltaSink:
        """The session's downstream with what wraps it: unreachable reports, the
        bandwidth limit, the bytes-out metric."""
        sink: DeltaSink = UnreachableReportingSink(
            self.sinks(hello), lambda detail: self.report_unreachable(
                hello.target_proxy_id, hello.target_proxy_address, hello.policy, detail))
        rate = throttle.rate_bytes_per_s(hello.bandwidth_limit_mbps)
        if rate:
            sink = ThrottledSink(sink, throttle.TokenBucket(rate, time.monotonic()))
        return MeteredSink(sink, "source")

    async def Ship(self, request_iterator: AsyncIterator[rpb.ShipRequest],
                   context: grpc.aio.ServicerContext) -> None:
        await _ShipSession(self, context).serve(request_iterator)

    async def AnswerCheckpoint(self, request: rpb.CheckpointAnswer,
                               context: grpc.aio.ServicerContext) -> rpb.CheckpointAnswerReply:
        """A filter's answer to a checkpoint hold, out of band (replication.proto)."""
        found = self.groups.member(request.policy)
        if found is None or found[1].epoch != request.epoch:
            await rpc.abort(context, NotFoundError(
                f"no open session of policy {request.policy} at epoch {request.epoch} "
                "in a consistency group on this proxy"))
        assert found is not None
        group, link = found
        try:
            peer = assignsig.peer_of(context)
        except CdpError as exc:
            await rpc.abort(context, exc)
        if peer is not None and (peer.role != identity.FILTER or peer.id != link.filter_id):
            await rpc.abort(context, NotAuthorizedError(
                f"a checkpoint answer for {request.policy} from {peer.role} {peer.id}: only "
                f"its filter {link.filter_id} may answer"))
        group.on_held(request.policy, request.held)
        return rpb.CheckpointAnswerReply()

    async def GetDigests(self, request: rpb.DigestRequest,
                         context: grpc.aio.ServicerContext) -> AsyncIterator[rpb.DigestReply]:
        """Relay to the target proxy (cdp_proxy/digests.py)."""
        try:
            binding.bind_digests(self.verifier, self.node_id, request, context,
                                 identity.SOURCE_PROXY)
        except CdpError as exc:
            await rpc.abort(context, exc)
        async for reply in digests.relay(self.channels, request.target_proxy_address,
                                         "target proxy", request, context):
            yield reply


def check_hello(hello: rpb.ShipHello, keys: crypto.KeyRing | None) -> None:
    if not hello.policy:
        raise ProtocolError("hello: policy is empty")
    if not hello.target_proxy_address or not hello.target_address:
        raise ProtocolError("hello lacks target_proxy_address or target_address")
    if not hello.disks:
        raise ProtocolError("hello lists no disks")
    if len({d.disk_id for d in hello.disks}) != len(hello.disks):
        raise ProtocolError("hello lists a disk id twice")
    rpo = hello.rpo_interval_s
    if math.isnan(rpo) or rpo < 0 or math.isinf(rpo):
        raise ProtocolError(f"bad rpo_interval_s {rpo}")
    frames.require_key(keys)


class _ShipSession(Session):
    kind = StreamKind("source", "hello", "a hello", "Ship", log)

    def __init__(self, parent: SourceProxy, context: grpc.aio.ServicerContext) -> None:
        super().__init__(parent.errors, context)
        self.parent = parent
        self.cutter: IntervalCutter | None = None
        self.captured_seq = 0
        self.acked_seq = 0
        self.emitted_seq = 0
        """Last seq of the newest delta sent downstream: no honest ack is above it."""
        self.inflight = 0
        self.unacked: deque[tuple[int, int]] = deque()  # (last_seq, bytes)
        self.queue: asyncio.Queue[Delta] = asyncio.Queue()
        self.space = asyncio.Event()
        self.space.set()
        self.all_acked = asyncio.Event()
        self.all_acked.set()
        self.skipped = False
        self.group: groups.Group | None = None
        self._writing = asyncio.Lock()  # acks and checkpoint commands share the stream
        self.epoch = 0
        self.filter_id = ""

    # ------------------------------------------------------------ main

    async def run(self, hello: rpb.ShipHello, it: AsyncIterator[rpb.ShipRequest]) -> None:
        parent = self.parent
        self.policy = hello.policy
        keys = parent.keys  # one ring for the whole session, even across a SIGHUP
        check_hello(hello, keys)
        claims = binding.bind_hello(parent.verifier, parent.node_id, hello, self.context,
                                    parent.epochs)
        self.epoch, self.filter_id = hello.epoch, claims.filter_id or hello.filter_id
        self.captured_seq = hello.captured_seq
        opening = frames.seal_open(rpb.SessionOpen(
            policy=hello.policy, session_id=os.urandom(crypto.SESSION_ID_BYTES),
            epoch=hello.epoch, disks=list(hello.disks), source_proxy_id=parent.node_id,
            captured_seq=hello.captured_seq, encryption=hello.encryption,
            target_address=hello.target_address, assignment=hello.assignment), keys)
        self.sealer = frames.sealer_for(opening, keys, max(0, min(22, hello.compression_level)))
        parent.budget.watch(self._recheck_space)
        with self.counted():
            try:
                self.downstream = sink = parent._sink(hello)
                self.peer = sink.peer
                durable = await sink.open(opening)
                self.acked_seq = self.emitted_seq = durable
                self.cutter = IntervalCutter(
                    hello.rpo_interval_s or DEFAULT_RPO_S, parent.proxy.interval_max_bytes,
                    start_after_seq=durable,
                    disk_sizes={d.disk_id: d.size_bytes for d in hello.disks},
                    checkpoints=bool(claims.group))
                await self.context.write(rpb.ShipResponse(
                    welcome=rpb.ShipWelcome(resume_from_seq=durable)))
                if claims.group:
                    self.group = parent.groups.join(
                        claims.group, tuple(claims.group_members),
                        hello.rpo_interval_s or DEFAULT_RPO_S, self)
                log.info("session open with key id %d, resuming after seq %d",
                         opening.key_id, durable,
                         extra={"policy": self.policy, "peer": self.peer, "epoch": hello.epoch,
                                "seq": durable})
                reader = asyncio.create_task(self._reader(it), name="ship-reader")
                done = await self.tasks(
                    [reader, asyncio.create_task(self._ticker(), name="ship-ticker"),
                     asyncio.create_task(self._sender(sink), name="ship-sender"),
                     asyncio.create_task(self._acker(sink), name="ship-acker")],
                    asyncio.FIRST_COMPLETED)
                if reader not in done:
                    raise UnavailableError(f"{self.peer} closed the stream")
            finally:
                if self.group is not None:
                    parent.groups.leave(self.group, self)
                parent.budget.unwatch(self._recheck_space)
                parent.budget.give(self.inflight)
                metrics.INFLIGHT.dec(self.inflight)
                self.inflight = 0

    # ------------------------------------------------------------ tasks

    def _emit(self, d: Delta | None) -> None:
        if d is None:
            return
        size = d.encoded_bytes
        self.inflight += size
        self.parent.budget.take(size)
        metrics.INFLIGHT.inc(size)
        metrics.DELTAS.labels("source").inc()
        self.unacked.append((d.last_seq, size))
        self.emitted_seq = max(self.emitted_seq, d.last_seq)
        self.all_acked.clear()
        if self.inflight >= self.parent.proxy.inflight_max_bytes \
                or self.parent.budget.full_for(self.inflight):
            self.space.clear()
        self.queue.put_nowait(d)  # bounded by the in-flight account, not by the queue
        log.debug("cut delta %d..%d: %d records, %d bytes, %d extents", d.first_seq,
                  d.last_seq, d.record_count, d.record_bytes, len(d.extents),
                  extra={"policy": self.policy, "seq": d.last_seq})

    async def _reader(self, it: AsyncIterator[rpb.ShipRequest]) -> None:
        assert self.cutter is not None
        cutter = self.cutter
        while True:
            await self.space.wait()
            try:
                req = await it.__anext__()
            except StopAsyncIteration:
                break
            body = req.WhichOneof("body")
            if body == "held" and self.group is not None:
                self.group.on_held(self.policy, req.held)
                continue
            if body != "batch":
                raise ProtocolError("only record batches and checkpoint answers may follow "
                                    "the hello")
            batch = req.batch
            metrics.BYTES_IN.labels("source").inc(len(batch.records))
            metrics.POLICY_BYTES_IN.labels("source", self.policy).inc(len(batch.records))
            self.captured_seq = max(self.captured_seq, batch.captured_seq)
            try:
                # views into the batch, no copy: the cutter copies what it keeps
                recs = list(records.decode_all(batch.records, copy=False))
            except FormatError as exc:
                raise FormatError(f"malformed record batch: {exc}") from None
            metrics.RECORDS.inc(len(recs))
            now = time.monotonic()
            skip = batch.skips_lost_seqs and not self.skipped
            if skip:
                self.skipped = True  # one jump per stream (replication.proto)
            for rec in recs:
                if batch.gap_begin_time_ns:
                    cutter.note_gap(batch.gap_begin_time_ns, batch.gap_after_seq,
                                    batch.gap_reason)
                self._emit(cutter.feed(rec, now, skip))
                skip = False
        # The filter half-closed: ship what is left and wait for its acks.
        self._emit(cutter.cut())
        await self.all_acked.wait()

    async def _ticker(self) -> None:
        assert self.cutter is not None
        while True:
            await asyncio.sleep(TICK_S)
            self._emit(self.cutter.tick(time.monotonic()))
            self._check_key()

    def _check_key(self) -> None:
        """After a SIGHUP made another key current, end the session (transient: the
        filter reconnects at once and resumes from the durable seq) so it reopens
        under the new key and the old one can be retired (docs/OPERATIONS.md)."""
        keys = self.parent.keys
        if keys is not None and keys.current_id != self.sealer.key_id:
            raise UnavailableError(f"the key ring was rotated: reopening the session under "
                                   f"key id {keys.current_id} (was {self.sealer.key_id})")

    def _frames(self, d: Delta) -> Iterator[rpb.DeltaFrame]:
        """Seal one delta's chunks, one frame per step (in a worker thread if offloaded)."""
        chunks = delta.encode_chunks(d.extents, self.parent.proxy.frame_bytes)
        cur = next(chunks)
        index = 0
        while True:
            nxt = next(chunks, None)
            header = crypto.FrameHeader(d.first_seq, d.last_seq, index, nxt is None,
                                        d.newest_time_ns, d.gap_begin_time_ns, d.gap_after_seq,
                                        d.gap_end_seq, d.gap_end_time_ns, d.checkpoint_id,
                                        d.gap_reason)
            yield frames.frame_of(header, self.sealer.seal(header, cur), self.captured_seq)
            if nxt is None:
                return
            cur = nxt
            index += 1

    async def _sender(self, sink: DeltaSink) -> None:
        offload = self.parent.offload
        while True:
            d = await self.queue.get()
            sealed = self._frames(d)
            while True:
                frame = (await asyncio.to_thread(next, sealed, None) if offload
                         else next(sealed, None))
                if frame is None:
                    break
                await sink.send(frame)

    async def _acker(self, sink: DeltaSink) -> None:
        # None: the target proxy ended the stream with OK; run() reports it
        while (durable := await sink.ack()) is not None:
            if durable > self.emitted_seq:
                # passing it on would make the filter trim records the target lacks
                raise ProtocolError(f"target proxy acked seq {durable}, above the last seq "
                                    f"sent ({self.emitted_seq})")
            self.errors.clear(self.policy, self.started)
            self._release(durable)
            if durable > self.acked_seq:
                self.acked_seq = durable
                await self.send_control(rpb.ShipResponse(ack=rpb.ShipAck(durable_seq=durable)))

    async def send_control(self, response: rpb.ShipResponse) -> None:
        """Write an ack or a checkpoint command to the filter (groups.MemberLink)."""
        async with self._writing:
            await self.context.write(response)

    def _release(self, durable: int) -> None:
        freed = 0
        while self.unacked and self.unacked[0][0] <= durable:
            freed += self.unacked.popleft()[1]
        if freed:
            self.inflight -= freed
            metrics.INFLIGHT.dec(freed)
            self.parent.budget.give(freed)   # wakes every session, this one too
            self._recheck_space()
        if not self.unacked:
            self.all_acked.set()

    def _recheck_space(self) -> None:
        """Read again when both this session's and the proxy's account have room."""
        if self.inflight < self.parent.proxy.inflight_max_bytes \
                and not self.parent.budget.full_for(self.inflight):
            self.space.set()
