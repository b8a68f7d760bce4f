"""Frame compression and encryption envelope (docs/FORMAT.md, "Frame envelope").

Theory of operation: each delta frame's plaintext (a chunk of delta extents)
is compressed first (zstd; a codec byte says which), then sealed with
AES-256-GCM under a per-session key. The session key is
HKDF-SHA256(policy key, salt = session id), the policy key is
HKDF-SHA256(master key, info = policy name). The nonce is the session's frame
counter (4 zero bytes || u64 big-endian), starting at 1, so it is never reused
under one key. The frame header (policy, session, seq range, frame index, final
flag, newest capture time) is the associated data, and the opener demands the
exact next counter: a replayed, reordered, spliced or altered frame fails.

    envelope (encrypted)  = 0x01 || counter u64 BE || AES-GCM(codec u8 || payload)
                            (the AES-GCM output includes its 16-byte tag)
    envelope (plaintext)  = 0x00 || counter u64 BE || crc32c u32 LE || codec u8 || payload
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cdp_common.errors import AuthenticationError, ConfigError, FormatError
from cdp_common.records import crc32c

ENVELOPE_ENCRYPTED = 1
ENVELOPE_PLAIN = 0
CODEC_NONE = 0
CODEC_ZSTD = 1
KEY_BYTES = 32
SESSION_ID_BYTES = 16
TAG_BYTES = 16
MAX_FRAME_PLAINTEXT = 8 * 1024 * 1024
_COUNTER = struct.Struct(">Q")
_AAD = struct.Struct("<QQIBQ")


def load_master_key(path: str | Path) -> bytes:
    """Read a 32-byte key: raw bytes, or 64 hex characters (newline allowed)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"key_file {path}: cannot read ({exc.strerror})") from None
    text = raw.strip()
    if len(text) == 2 * KEY_BYTES:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            pass
    if len(raw) == KEY_BYTES:
        return raw
    raise ConfigError(f"key_file {path}: expected 32 raw bytes or 64 hex characters, "
                      f"found {len(raw)} bytes")


def write_new_key(path: str | Path) -> None:
    """Create a fresh random key file (hex), readable by the owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(os.urandom(KEY_BYTES).hex() + "\n")


def _hkdf(key: bytes, salt: bytes | None, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=info).derive(key)


def policy_key(master_key: bytes, policy: str) -> bytes:
    return _hkdf(master_key, b"cdp-policy-key-v1", policy.encode())


def session_key(policy_key_bytes: bytes, session_id: bytes) -> bytes:
    if len(session_id) != SESSION_ID_BYTES:
        raise FormatError(f"session id must be {SESSION_ID_BYTES} bytes, got {len(session_id)}")
    return _hkdf(policy_key_bytes, session_id, b"cdp-session-v1")


@dataclass(frozen=True, slots=True)
class FrameHeader:
    first_seq: int
    last_seq: int
    index: int
    final: bool
    newest_time_ns: int
    # Gap bookkeeping (docs/FORMAT.md "Gaps"); appended to the AAD only when nonzero,
    # so frames without a gap authenticate exactly as before.
    gap_begin_time_ns: int = 0
    gap_after_seq: int = 0
    gap_end_seq: int = 0
    gap_end_time_ns: int = 0


_AAD_GAP = struct.Struct("<QQQQ")


def _aad(policy: str, session_id: bytes, header: FrameHeader) -> bytes:
    name = policy.encode()
    aad = (b"cdp-frame-v1" + len(name).to_bytes(2, "little") + name + session_id
           + _AAD.pack(header.first_seq, header.last_seq, header.index, int(header.final),
                       header.newest_time_ns))
    gap = (header.gap_begin_time_ns, header.gap_after_seq, header.gap_end_seq,
           header.gap_end_time_ns)
    if any(gap):
        aad += b"gap" + _AAD_GAP.pack(*gap)
    return aad


class _Session:
    def __init__(self, policy: str, session_id: bytes, key: bytes | None) -> None:
        self.policy = policy
        self.session_id = session_id
        self._aead = AESGCM(key) if key is not None else None


class FrameSealer(_Session):
    """Sender side: compress + seal frames with consecutive counters."""

    def __init__(self, policy: str, session_id: bytes, key: bytes | None,
                 compression_level: int = 1) -> None:
        super().__init__(policy, session_id, key)
        self._counter = 0
        self._level = compression_level
        self._zstd = zstandard.ZstdCompressor(level=compression_level) if compression_level > 0 \
            else None

    def seal(self, header: FrameHeader, plaintext: bytes) -> bytes:
        if self._zstd is not None and plaintext:
            body = bytes([CODEC_ZSTD]) + self._zstd.compress(plaintext)
        else:
            body = bytes([CODEC_NONE]) + plaintext
        self._counter += 1
        counter = _COUNTER.pack(self._counter)
        if self._aead is None:
            return (bytes([ENVELOPE_PLAIN]) + counter
                    + crc32c(counter, body).to_bytes(4, "little") + body)
        nonce = b"\0\0\0\0" + counter
        return (bytes([ENVELOPE_ENCRYPTED]) + counter
                + self._aead.encrypt(nonce, body, _aad(self.policy, self.session_id, header)))


class FrameOpener(_Session):
    """Receiver side: verify, decrypt and decompress frames, in order."""

    def __init__(self, policy: str, session_id: bytes, key: bytes | None,
                 max_plaintext: int = MAX_FRAME_PLAINTEXT) -> None:
        super().__init__(policy, session_id, key)
        self._expected = 1
        self._max = max_plaintext
        self._zstd = zstandard.ZstdDecompressor()

    def open(self, header: FrameHeader, envelope: bytes) -> bytes:
        if len(envelope) < 9:
            raise FormatError(f"frame {header.index} of seq {header.last_seq}: envelope too short")
        kind = envelope[0]
        counter_bytes = envelope[1:9]
        (counter,) = _COUNTER.unpack(counter_bytes)
        if self._aead is not None:
            if kind != ENVELOPE_ENCRYPTED:
                raise AuthenticationError("unencrypted frame on an encrypted session")
            if counter != self._expected:
                raise AuthenticationError(f"frame counter {counter}, expected {self._expected} "
                                          "(replayed or reordered frame)")
            body: bytes | memoryview
            try:
                body = self._aead.decrypt(b"\0\0\0\0" + counter_bytes,
                                          memoryview(envelope)[9:],  # no copy
                                          _aad(self.policy, self.session_id, header))
            except InvalidTag:
                raise AuthenticationError(
                    f"frame authentication failed for policy {self.policy!r} seq "
                    f"{header.first_seq}..{header.last_seq}: wrong key or tampered frame") from None
        else:
            if kind != ENVELOPE_PLAIN:
                raise FormatError("encrypted frame on a plaintext session")
            if counter != self._expected:
                raise FormatError(f"frame counter {counter}, expected {self._expected}")
            if len(envelope) < 14:
                raise FormatError("plaintext envelope too short")
            body = memoryview(envelope)[13:]
            if crc32c(counter_bytes, body) != int.from_bytes(envelope[9:13], "little"):
                raise FormatError("plaintext frame checksum mismatch")
        self._expected += 1
        return self._decode_body(body)

    def _decode_body(self, body: bytes | memoryview) -> bytes:
        if not body:
            raise FormatError("frame body empty")
        codec, payload = body[0], memoryview(body)[1:]  # a view: no copy of the payload
        if codec == CODEC_NONE:
            if len(payload) > self._max:
                raise FormatError(f"frame of {len(payload)} bytes exceeds {self._max}")
            return bytes(payload)
        if codec == CODEC_ZSTD:
            try:
                params = zstandard.get_frame_parameters(payload)
            except zstandard.ZstdError as exc:
                raise FormatError(f"bad zstd frame: {exc}") from None
            if (params.content_size in (zstandard.CONTENTSIZE_UNKNOWN, zstandard.CONTENTSIZE_ERROR)
                    or params.content_size > self._max):
                raise FormatError(f"zstd frame content size {params.content_size} not allowed")
            try:
                return self._zstd.decompress(payload, max_output_size=self._max)
            except zstandard.ZstdError as exc:
                raise FormatError(f"bad zstd frame: {exc}") from None
        raise FormatError(f"unknown frame codec {codec}")
