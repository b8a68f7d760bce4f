"""Delta frames on the proxy-to-proxy hop: building them, and the receiver's gate.

Theory of operation
-------------------
A delta travels as frames 0..n of one seq range, the last with `final`; each
frame carries the delta's header fields (`crypto.FrameHeader`: seq range,
index, final, newest write time, gap bookkeeping) in the clear, bound into
the AEAD's associated data, and the sealed chunk of extents as `envelope`.
The fields exist three times over (the header, the DeltaFrame proto, the
DeltaChunk proto the target proxy forwards); the helpers below copy them in
one place each way.

`FrameGate` is what a receiver of frames (the target proxy's session, and the
in-memory DeltaSink that stands in for it in tests) does with every frame
before any of its bytes are used. Rules:

- order: frame 0 of a delta starts at `prev_last + 1` (the target's durable
  seq at the session open, then the last seq of the previous delta), or lies
  wholly at or below `prev_last` (a duplicate: passed on, the target acks it
  without storing it); the next frames continue the same delta with
  consecutive indexes. Anything else is a `ProtocolError` (INVALID_ARGUMENT).
- authenticity: `crypto.FrameOpener` checks the tag and the session counter
  (AuthenticationError: wrong key, tampering, replay, reordering).
- bounds: the plaintext decodes as a delta chunk within the session's disks
  (FormatError), checked without copying.

Invariant: a frame that `accept` returned plaintext for was in order, genuine
and in bounds; a frame it raised for changed nothing but the gate's refusal.

Session opens (key confirmation): the sender names the key of its ring it uses
(`key_id`) and MACs the open's claims under it (`seal_open`); the receiver's
`check_open` verifies that MAC with the key its own ring holds under that id
before anything is opened downstream, for every session, encrypted or not. So
a peer without the master key reaches nothing, and no claim of the open (the
encryption flag above all) can be flipped, nor an open moved to another
session id or epoch. `encryption = false` therefore means: the payload travels
in the clear with a CRC (TLS still protects the link), but the session proved
the key like any other.
"""

from __future__ import annotations

from collections.abc import Mapping

from cdp_common import crypto, delta
from cdp_common.errors import ConfigError, ProtocolError
from cdp_common.pb.cdp.v1 import replication_pb2 as rpb


def header_of(f: rpb.DeltaFrame) -> crypto.FrameHeader:
    """The authenticated header fields of a frame."""
    return crypto.FrameHeader(f.first_seq, f.last_seq, f.index, f.final, f.newest_time_ns,
                              f.gap_begin_time_ns, f.gap_after_seq, f.gap_end_seq,
                              f.gap_end_time_ns, f.checkpoint_id, f.gap_reason)


def frame_of(h: crypto.FrameHeader, envelope: bytes, captured_seq: int) -> rpb.DeltaFrame:
    """The DeltaFrame that carries `envelope` sealed under header `h`."""
    return rpb.DeltaFrame(
        first_seq=h.first_seq, last_seq=h.last_seq, index=h.index, final=h.final,
        newest_time_ns=h.newest_time_ns, envelope=envelope, captured_seq=captured_seq,
        gap_begin_time_ns=h.gap_begin_time_ns, gap_after_seq=h.gap_after_seq,
        gap_end_seq=h.gap_end_seq, gap_end_time_ns=h.gap_end_time_ns,
        checkpoint_id=h.checkpoint_id, gap_reason=h.gap_reason)


def chunk_of(f: rpb.DeltaFrame, plain: bytes) -> rpb.DeltaChunk:
    """The DeltaChunk the target receives for frame `f` whose plaintext is `plain`."""
    return rpb.DeltaChunk(
        first_seq=f.first_seq, last_seq=f.last_seq, index=f.index, final=f.final,
        newest_time_ns=f.newest_time_ns, extents=plain, captured_seq=f.captured_seq,
        gap_begin_time_ns=f.gap_begin_time_ns, gap_after_seq=f.gap_after_seq,
        gap_end_seq=f.gap_end_seq, gap_end_time_ns=f.gap_end_time_ns,
        checkpoint_id=f.checkpoint_id, gap_reason=f.gap_reason)


def require_key(keys: crypto.KeyRing | None) -> crypto.KeyRing:
    """Every session proves the master key, so a proxy without one serves none."""
    if keys is None:
        raise ConfigError("this proxy has no key_file: every session proves the master key, "
                          "with encryption on or off", grpc_status="FAILED_PRECONDITION")
    return keys


def claims_of(o: rpb.SessionOpen) -> crypto.OpenClaims:
    """What the open MAC covers (everything the open claims but the MAC itself)."""
    return crypto.OpenClaims(
        policy=o.policy, session_id=o.session_id, epoch=o.epoch, key_id=o.key_id,
        encryption=o.encryption, source_proxy_id=o.source_proxy_id,
        target_address=o.target_address, captured_seq=o.captured_seq,
        disks=tuple((d.disk_id, d.size_bytes, d.name) for d in o.disks))


def seal_open(o: rpb.SessionOpen, keys: crypto.KeyRing | None) -> rpb.SessionOpen:
    """Name the ring's current key in `o` and set its open MAC (the sender's side)."""
    ring = require_key(keys)
    o.key_id = ring.current_id
    o.open_mac = crypto.open_mac(ring.current_key, claims_of(o))
    return o


def check_open(o: rpb.SessionOpen, keys: crypto.KeyRing | None) -> None:
    """The receiver's checks of a session open (before anything is forwarded): the
    shape (ProtocolError), then key confirmation (AuthenticationError)."""
    if not o.policy:
        raise ProtocolError("session open: policy is empty")
    if len(o.session_id) != crypto.SESSION_ID_BYTES:
        raise ProtocolError(f"session id must be {crypto.SESSION_ID_BYTES} bytes, "
                            f"got {len(o.session_id)}")
    if not o.target_address:
        raise ProtocolError("session open lacks target_address")
    if not o.disks or len({d.disk_id for d in o.disks}) != len(o.disks):
        raise ProtocolError("session open must list each disk once")
    ring = require_key(keys)
    crypto.verify_open_mac(ring.key(o.key_id), claims_of(o), o.open_mac)


def session_key(keys: crypto.KeyRing | None, o: rpb.SessionOpen) -> bytes | None:
    """The AES key of the session `o` opens (None for a plaintext session), from the
    ring's key of `o.key_id`."""
    if not o.encryption:
        return None
    return crypto.session_key(crypto.policy_key(require_key(keys).key(o.key_id), o.policy),
                              o.session_id)


def sealer_for(o: rpb.SessionOpen, keys: crypto.KeyRing | None,
               compression_level: int) -> crypto.FrameSealer:
    """The frame sealer of the session `o` (sealed with `seal_open`) opens."""
    return crypto.FrameSealer(o.policy, o.session_id, session_key(keys, o), compression_level,
                              key_id=o.key_id)


def opener_for(o: rpb.SessionOpen, keys: crypto.KeyRing | None) -> crypto.FrameOpener:
    """The frame opener of the session `o` (checked with `check_open`) opens."""
    return crypto.FrameOpener(o.policy, o.session_id, session_key(keys, o), key_id=o.key_id)


class FrameGate:
    """Order, authenticity and bounds checks of one session's incoming frames."""

    def __init__(self, opener: crypto.FrameOpener, disk_sizes: Mapping[int, int],
                 prev_last: int) -> None:
        self.opener = opener
        self.disk_sizes = dict(disk_sizes)
        self.prev_last = prev_last
        """Last seq of the newest delta passed whole (at first: the target's durable seq)."""
        self.cur: tuple[int, int] | None = None  # (first_seq, last_seq) of the open delta
        self.next_index = 0

    def check_order(self, f: rpb.DeltaFrame) -> None:
        if self.cur is None:
            if f.index != 0:
                raise ProtocolError(f"frame {f.index} of delta {f.first_seq}..{f.last_seq} "
                                    "arrived without its frame 0")
            duplicate = 1 <= f.first_seq <= f.last_seq <= self.prev_last
            if not duplicate and (f.first_seq != self.prev_last + 1
                                  or f.last_seq < f.first_seq):
                raise ProtocolError(f"delta {f.first_seq}..{f.last_seq} does not follow seq "
                                    f"{self.prev_last}")
            self.cur = (f.first_seq, f.last_seq)
        elif (f.first_seq, f.last_seq) != self.cur or f.index != self.next_index:
            raise ProtocolError(f"frame {f.index} of delta {f.first_seq}..{f.last_seq} arrived "
                                f"where frame {self.next_index} of delta "
                                f"{self.cur[0]}..{self.cur[1]} was expected")
        if f.final:
            self.prev_last = max(self.prev_last, f.last_seq)
            self.cur = None
            self.next_index = 0
        else:
            self.next_index = f.index + 1

    def open(self, f: rpb.DeltaFrame) -> bytes:
        """The checked plaintext chunk of an in-order frame (may run in a worker thread)."""
        plain = self.opener.open(header_of(f), f.envelope)
        delta.check_chunk(plain, self.disk_sizes)  # bounds and format check, no copy
        return plain

    def accept(self, f: rpb.DeltaFrame) -> bytes:
        self.check_order(f)
        return self.open(f)
