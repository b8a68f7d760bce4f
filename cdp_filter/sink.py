"""What the shipper needs from its downstream: the `RecordSink` seam, and its gRPC adapter.

Theory of operation
-------------------
The shipper (cdp_filter/shipper.py) talks to a `RecordSink`, not to a gRPC
stub, so the same shipping logic runs against the source proxy over gRPC
(`GrpcRecordSink`, production) and against an in-memory twin
(cdp_filter/memsink.py, tests). One conformance suite
(tests/unit/test_recordsink_conformance.py) runs against both.

Contract of every implementation (the downstream is the source proxy and,
behind it, the target; "durable" means durable at the target):

- `open(assignment, hello)` starts one session for `hello.policy` and returns
  once the downstream answered: `session.resume_from_seq` is the highest seq
  it holds durably for the policy (0 when none). It raises when the
  downstream refuses or cannot be reached; an `hello.epoch` older than one
  the downstream has already seen for the policy is refused as fenced
  (status FAILED_PRECONDITION), and a newer epoch fences the older sessions
  still open (their next call fails the same way).
- `send(batch)` passes records (cdp_common.records, concatenated) in seq
  order. It may block while the downstream does not read (back-pressure,
  I4); it never buffers without bound. The first record after the welcome
  MUST be `resume_from_seq + 1`, except once, on the first batch, when
  `skips_lost_seqs` announces a jump over seqs the filter dropped.
- Duplicate -> ack: a record with a seq the session already received (a
  resend) is not applied again; the session goes on and acks as usual.
- Gap -> protocol error: a record after a missing seq ends the session with
  a protocol error (status INVALID_ARGUMENT), raised by `send` or by `acks`.
- `acks()` yields the durable seq, non-decreasing, each time it advances,
  and, in between, the `Checkpoint` commands of a source proxy that serves the
  policy as a member of a consistency group (the shipper answers a hold with
  `send_held`; a sink that drives no checkpoints never yields one). It ends
  when the downstream closed the session normally and raises the session's
  error otherwise (an injected or transport failure: status
  UNAVAILABLE; fenced; protocol). Errors are `CdpError`s whose `grpc_status`
  names the status, or, from the gRPC adapter, the `grpc.aio.AioRpcError`
  itself (the shipper reads its code and details; cdp_common.rpc maps it).
- Idempotent resend after reconnect: a new session after any failure
  welcomes with the durable seq; records resent from there are applied
  exactly once, so nothing acked is lost and nothing is applied twice (I3).
- Restart: a downstream that restarted keeps what it acked durable; the
  sessions open before it fail, and the next `open` resumes from there.
- `close()` ends the session from our side (cancels); it is idempotent and
  never raises.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import grpc

from cdp_common import rpc
from cdp_common.config import TlsConfig
from cdp_common.errors import ProtocolError, UnavailableError
from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
from cdp_common.pb.cdp.v1 import replication_pb2 as rpb
from cdp_common.pb.cdp.v1 import replication_pb2_grpc as rgrpc


@dataclass(frozen=True)
class Checkpoint:
    """A consistency-group checkpoint command of the source proxy (replication.proto)."""

    action: str          # "hold" | "mark" | "release"
    checkpoint_id: int
    timeout_s: float = 0.0


class RecordSession(Protocol):
    """One open session of a `RecordSink` (see the module docstring)."""

    resume_from_seq: int
    """The downstream's durable seq for the policy when the session opened."""

    async def send(self, batch: rpb.RecordBatch) -> None:
        """Pass one batch of records on (may block: back-pressure)."""

    def acks(self) -> AsyncIterator[int | Checkpoint]:
        """Durable seqs as they advance, and checkpoint commands; ends on a normal
        close, raises on an error."""

    async def send_held(self, held: rpb.CheckpointHeld) -> None:
        """Answer a checkpoint hold (held, or refused with a reason)."""

    async def close(self) -> None:
        """End the session from our side; idempotent, never raises."""


class RecordSink(Protocol):
    """Where the shipper sends one policy's records (see the module docstring)."""

    async def open(self, assignment: cpb.Assignment, hello: rpb.ShipHello) -> RecordSession:
        """Open a session per `assignment`; returns after the downstream's welcome."""


# ---------------------------------------------------------------- gRPC adapter

ANSWER_TIMEOUT_S = 1.0  # a checkpoint answer later than the hold's timeout is moot


class GrpcRecordSession:
    """`SourceProxy.Ship` after its welcome."""

    def __init__(self, channel: grpc.aio.Channel, call: grpc.aio.StreamStreamCall,
                 resume_from_seq: int, policy: str = "", epoch: int = 0) -> None:
        self._channel = channel
        self._call = call
        self.resume_from_seq = resume_from_seq
        self.policy, self.epoch = policy, epoch
        self._closed = False
        self._writing = asyncio.Lock()  # batches and held answers share the stream
        self._answer_on_stream = False
        """The proxy has no AnswerCheckpoint (older): answers go on the stream."""

    async def send(self, batch: rpb.RecordBatch) -> None:
        await self._write(rpb.ShipRequest(batch=batch))

    async def send_held(self, held: rpb.CheckpointHeld) -> None:
        """Out of band (AnswerCheckpoint), so the answer does not queue behind record
        batches the back-pressured proxy is not reading; on the stream for an older
        proxy."""
        if not self._answer_on_stream:
            try:
                await rgrpc.SourceProxyStub(self._channel).AnswerCheckpoint(
                    rpb.CheckpointAnswer(policy=self.policy, epoch=self.epoch, held=held),
                    timeout=ANSWER_TIMEOUT_S)
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                    return   # the round is abandoned; the stream's own state tells the rest
                self._answer_on_stream = True
        await self._write(rpb.ShipRequest(held=held))

    async def _write(self, request: rpb.ShipRequest) -> None:
        try:
            async with self._writing:
                await rpc.stream_write(self._call, request)
        except asyncio.InvalidStateError:
            raise await self._ended() from None

    async def _ended(self) -> BaseException:
        """The error for a write to a call that already ended: its own status."""
        call = self._call
        code = await call.code()
        if code == grpc.StatusCode.OK:
            return UnavailableError("source proxy ended the stream")
        return grpc.aio.AioRpcError(code, await call.initial_metadata(),
                                    await call.trailing_metadata(), await call.details())

    async def acks(self) -> AsyncIterator[int | Checkpoint]:
        while True:
            resp = await self._call.read()
            if resp is grpc.aio.EOF:
                return
            assert isinstance(resp, rpb.ShipResponse)
            body = resp.WhichOneof("body")
            if body == "ack":
                yield resp.ack.durable_seq
            elif body == "hold":
                yield Checkpoint("hold", resp.hold.checkpoint_id, resp.hold.timeout_s)
            elif body == "mark":
                yield Checkpoint("mark", resp.mark.checkpoint_id)
            elif body == "release":
                yield Checkpoint("release", resp.release.checkpoint_id)
            else:
                raise ProtocolError(f"source proxy sent {body} after its welcome")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._call.cancel()
        await self._channel.close(grace=None)


class GrpcRecordSink:
    """The source proxy named by the assignment, over `SourceProxy.Ship`."""

    def __init__(self, tls: TlsConfig, max_message_bytes: int) -> None:
        self.tls = tls
        self.max_message_bytes = max_message_bytes

    async def open(self, assignment: cpb.Assignment, hello: rpb.ShipHello) -> GrpcRecordSession:
        channel = rpc.channel(assignment.source_proxy.address, self.tls, self.max_message_bytes)
        call = rgrpc.SourceProxyStub(channel).Ship()
        session = GrpcRecordSession(channel, call, 0, hello.policy, hello.epoch)
        try:
            await rpc.stream_write(call, rpb.ShipRequest(hello=hello))
            resp = await call.read()
            if resp is grpc.aio.EOF:
                raise UnavailableError("source proxy closed the stream before its welcome")
            assert isinstance(resp, rpb.ShipResponse)
            if resp.WhichOneof("body") != "welcome":
                raise ProtocolError(f"source proxy sent {resp.WhichOneof('body')} "
                                    "before its welcome")
        except BaseException:
            await session.close()
            raise
        session.resume_from_seq = resp.welcome.resume_from_seq
        return session
