"""`MemoryDeltaSink`: the in-memory twin of the gRPC DeltaSink (contract in
sink.py), for tests of the source session without loopback servers.

A `MemoryTarget` stands for a target proxy and its target at once: per policy
the highest epoch opened, the durable seq and the committed deltas (their
checked plaintext chunks). A sink checks what the target proxy checks (the
session open, then every frame through the same `frames.FrameGate`, so a wrong
key fails as it would there) and commits what the target would: a delta once
its final frame arrived, a duplicate without storing it. It raises the errors
the real chain's servicers raise (ProtocolError, FencedError, ...), so
`stream.upstream_status` gives the same status for both.

Test knobs: `hold_acks()` / `release_acks()` delay the acks (a slow target:
deltas are durable but not yet acknowledged); `images()` applies the
committed deltas to zeroed disks, an oracle's counterpart.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from cdp_common import crypto, delta
from cdp_common.errors import CdpError, FencedError, UnavailableError
from cdp_common.pb.cdp.v1 import replication_pb2 as rpb
from cdp_proxy import frames


@dataclass
class MemoryPolicy:
    epoch: int = 0
    durable_seq: int = 0
    disk_sizes: dict[int, int] = field(default_factory=dict)
    deltas: list[tuple[int, int, list[bytes]]] = field(default_factory=list)
    """Committed deltas in seq order: (first_seq, last_seq, plaintext chunks)."""
    owner: MemoryDeltaSink | None = None
    """The open session of the newest epoch."""


class MemoryTarget:
    def __init__(self, keys: crypto.KeyRing | None = None) -> None:
        self.keys = keys
        self.policies: dict[str, MemoryPolicy] = {}
        self.opened = 0
        self._acks_free = asyncio.Event()
        self._acks_free.set()

    def sink(self, hello: rpb.ShipHello | None = None) -> MemoryDeltaSink:
        """A new session's sink (a `sink.SinkFactory`)."""
        return MemoryDeltaSink(self)

    def hold_acks(self) -> None:
        self._acks_free.clear()

    def release_acks(self) -> None:
        self._acks_free.set()

    def durable_seq(self, policy: str) -> int:
        p = self.policies.get(policy)
        return p.durable_seq if p is not None else 0

    def images(self, policy: str) -> dict[int, bytearray]:
        """The disks as the committed deltas leave them, from zeroes."""
        p = self.policies[policy]
        disks = {disk: bytearray(size) for disk, size in p.disk_sizes.items()}
        for _first, _last, chunks in p.deltas:
            for chunk in chunks:
                for e in delta.decode_chunk(chunk, p.disk_sizes):
                    disks[e.disk_id][e.offset:e.offset + e.length] = e.data or bytes(e.length)
        return disks


class MemoryDeltaSink:
    peer = "memory target"

    def __init__(self, target: MemoryTarget) -> None:
        self.target = target
        self.policy: MemoryPolicy | None = None
        self.gate: frames.FrameGate | None = None
        self.chunks: list[bytes] = []  # of the delta being received
        self.acks: asyncio.Queue[int | CdpError] = asyncio.Queue()
        self.failed: CdpError | None = None
        self.closed = False

    async def open(self, request: rpb.SessionOpen) -> int:
        t = self.target
        frames.check_open(request, t.keys)
        p = t.policies.setdefault(request.policy, MemoryPolicy())
        if request.epoch < p.epoch:
            raise FencedError(f"policy {request.policy}: epoch {request.epoch} is older than "
                              f"epoch {p.epoch} already seen")
        if p.owner is not None:
            p.owner._fail(FencedError(f"policy {request.policy}: replaced by a newer stream "
                                      f"(epoch {request.epoch})"))
        p.epoch, p.owner = request.epoch, self
        p.disk_sizes = {d.disk_id: d.size_bytes for d in request.disks}
        self.policy = p
        self.gate = frames.FrameGate(frames.opener_for(request, t.keys), p.disk_sizes,
                                     p.durable_seq)
        t.opened += 1
        return p.durable_seq

    async def send(self, frame: rpb.DeltaFrame) -> None:
        self._check()
        assert self.gate is not None and self.policy is not None
        try:
            self.chunks.append(self.gate.accept(frame))
        except CdpError as exc:
            self._fail(exc)
            raise
        if frame.final:
            p = self.policy
            if frame.last_seq > p.durable_seq:  # else a duplicate: acked, not stored
                p.deltas.append((frame.first_seq, frame.last_seq, self.chunks))
                p.durable_seq = frame.last_seq
            self.chunks = []
            self.acks.put_nowait(p.durable_seq)

    async def ack(self) -> int | None:
        self._check()
        item = await self.acks.get()
        if isinstance(item, CdpError):
            raise item
        await self.target._acks_free.wait()
        return item

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.chunks = []  # a delta without its final frame leaves nothing
        if self.policy is not None and self.policy.owner is self:
            self.policy.owner = None
        self.acks.put_nowait(UnavailableError(f"{self.peer}: the session was closed"))

    def _fail(self, exc: CdpError) -> None:
        if self.failed is None:
            self.failed = exc
            self.chunks = []
            if self.policy is not None and self.policy.owner is self:
                self.policy.owner = None
            self.acks.put_nowait(exc)

    def _check(self) -> None:
        if self.failed is not None:
            raise self.failed
        if self.closed:
            raise UnavailableError(f"{self.peer}: the session was closed")
