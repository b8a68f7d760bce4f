"""In-memory `RecordSink` (cdp_filter/sink.py): the downstream as a test twin.

`MemoryDownstream` is what the target would hold for one policy: the records
it received by seq, the durable seq, the newest epoch seen. `MemoryRecordSink`
opens sessions on it that follow the RecordSink contract exactly (duplicate
-> ack, gap -> ProtocolError, epoch fence, resume from the durable seq) and
lets a test inject what a real downstream does wrong: refuse the open, fail
after some batches, hold acks back, restart.

Acks: with `auto_ack` the durable seq follows every batch at once (a fast
target); otherwise it moves only on `make_durable(seq)`. A restart keeps
what was durable and forgets records received beyond it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import NoReturn

from cdp_common import records
from cdp_common.errors import CdpError, FencedError, ProtocolError, UnavailableError
from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
from cdp_common.pb.cdp.v1 import replication_pb2 as rpb
from cdp_filter.sink import Checkpoint


@dataclass
class MemoryDownstream:
    """The durable side of one policy, as a target would hold it."""

    durable_seq: int = 0
    epoch: int = 0
    received: dict[int, records.Record] = field(default_factory=dict)  # by seq
    applied: list[int] = field(default_factory=list)          # seqs in the order taken


_END = object()


def _fenced(hello: rpb.ShipHello, epoch: int) -> FencedError:
    return FencedError(f"policy {hello.policy!r}: epoch {hello.epoch} is older than {epoch}")


class MemoryRecordSession:
    def __init__(self, sink: MemoryRecordSink, hello: rpb.ShipHello, resume: int) -> None:
        self.sink = sink
        self.hello = hello
        self.resume_from_seq = resume
        self.last_received = resume
        self.batches = 0
        self.error: BaseException | None = None
        self._acks: asyncio.Queue[object] = asyncio.Queue()
        self._acked = resume
        self._first = True
        self.closed = False
        self.held: list[rpb.CheckpointHeld] = []
        """The filter's answers to `command` holds, in order."""

    # ------------------------------------------------------------ downstream side

    def end(self, error: BaseException | None = None) -> None:
        """The downstream ends the session (normally when `error` is None)."""
        if self.closed or self.error is not None:
            return
        self.error = error
        self.closed = error is None
        self._acks.put_nowait(_END if error is None else error)

    def ack(self, seq: int) -> None:
        if seq > self._acked and self.error is None and not self.closed:
            self._acked = seq
            self._acks.put_nowait(seq)

    def command(self, checkpoint: Checkpoint) -> None:
        """The downstream sends a checkpoint command (as a group's source proxy does)."""
        if self.error is None and not self.closed:
            self._acks.put_nowait(checkpoint)

    # ------------------------------------------------------------ RecordSession

    def _fail(self, error: CdpError) -> NoReturn:
        self.end(error)
        raise error

    def _check_open(self) -> None:
        if self.error is not None:
            raise self.error
        if self.closed:
            raise UnavailableError("the session is closed")
        if self.hello.epoch < self.sink.downstream.epoch:
            self._fail(_fenced(self.hello, self.sink.downstream.epoch))

    async def send(self, batch: rpb.RecordBatch) -> None:
        self._check_open()
        sink, down = self.sink, self.sink.downstream
        skip = batch.skips_lost_seqs and self._first
        self._first = False
        try:
            recs = list(records.decode_all(batch.records))
        except CdpError as exc:
            self._fail(ProtocolError(f"malformed record batch: {exc}"))
        for rec in recs:
            if rec.seq <= self.last_received:
                sink.duplicates += 1   # a resend: already taken, not applied again
                continue
            if rec.seq != self.last_received + 1 and not skip:
                self._fail(ProtocolError(f"record seq {rec.seq} out of order, expected "
                                         f"{self.last_received + 1}"))
            skip = False
            self.last_received = rec.seq
            if rec.seq not in down.received:
                down.received[rec.seq] = rec
                down.applied.append(rec.seq)
        self.batches += 1
        if sink.fail_after_batches is not None and self.batches >= sink.fail_after_batches:
            sink.fail_after_batches = None
            self.end(UnavailableError("injected failure"))
            return
        if sink.auto_ack:
            sink.make_durable(self.last_received)

    async def acks(self) -> AsyncIterator[int | Checkpoint]:
        while True:
            item = await self._acks.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, int | Checkpoint)
            yield item

    async def send_held(self, held: rpb.CheckpointHeld) -> None:
        self._check_open()
        self.held.append(held)

    async def close(self) -> None:
        self.closed = True
        if self in self.sink.sessions:
            self.sink.sessions.remove(self)


class MemoryRecordSink:
    """In-memory RecordSink over one `MemoryDownstream` (see the module docstring)."""

    def __init__(self, downstream: MemoryDownstream | None = None, auto_ack: bool = True) -> None:
        self.downstream = downstream if downstream is not None else MemoryDownstream()
        self.auto_ack = auto_ack
        self.hellos: list[rpb.ShipHello] = []
        self.addresses: list[str] = []
        self.sessions: list[MemoryRecordSession] = []
        self.duplicates = 0
        self.fail_open: CdpError | None = None       # raised by the next open, once
        self.fail_after_batches: int | None = None   # the session fails after this many

    async def open(self, assignment: cpb.Assignment,
                   hello: rpb.ShipHello) -> MemoryRecordSession:
        await asyncio.sleep(0)  # a real open yields to the loop too
        self.addresses.append(assignment.source_proxy.address)
        self.hellos.append(hello)
        if self.fail_open is not None:
            exc, self.fail_open = self.fail_open, None
            raise exc
        down = self.downstream
        if hello.epoch < down.epoch:
            raise _fenced(hello, down.epoch)
        down.epoch = hello.epoch
        for old in self.sessions:
            if old.hello.epoch < hello.epoch:
                old.end(_fenced(old.hello, hello.epoch))
        session = MemoryRecordSession(self, hello, down.durable_seq)
        self.sessions.append(session)
        return session

    def make_durable(self, seq: int) -> None:
        """The target made every received seq <= `seq` durable: ack it everywhere."""
        down = self.downstream
        seq = min(seq, max(down.received, default=down.durable_seq))
        if seq > down.durable_seq:
            down.durable_seq = seq
        for s in self.sessions:
            s.ack(min(down.durable_seq, s.last_received))

    @property
    def seqs(self) -> list[int]:
        """Seqs received so far, in the order the downstream took them."""
        return self.downstream.applied

    def restart(self) -> MemoryRecordSink:
        """The downstream process restarts: open sessions fail, what was durable stays."""
        for s in list(self.sessions):
            s.end(UnavailableError("downstream restarted"))
        down = self.downstream
        for seq in [s for s in down.received if s > down.durable_seq]:
            del down.received[seq]
        down.applied = [s for s in down.applied if s <= down.durable_seq]
        return MemoryRecordSink(down, self.auto_ack)
