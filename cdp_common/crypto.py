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

    envelope (encrypted)  = 0x02 || key id u32 BE || counter u64 BE || AES-GCM(codec u8 || payload)
                            (the AES-GCM output includes its 16-byte tag)
    envelope (encrypted, v1, read only, key id 0) = 0x01 || counter u64 BE || AES-GCM(...)
    envelope (plaintext)  = 0x00 || counter u64 BE || crc32c u32 LE || codec u8 || payload

Key ring: a proxy holds one or more master keys, each under a key id (u32);
the first is the current one, which new sessions seal with; the others are
still accepted, so a rotation needs no downtime (docs/OPERATIONS.md). A session
uses one key for its whole life: the one its open names; every envelope
repeats that key id and a frame under any other is refused.

Key confirmation: the session open carries an HMAC-SHA256 over everything
the open claims (`OpenClaims`) under the open-MAC key, HKDF(policy key,
info = "cdp-open-mac-v1"): domain-separated from the session keys. A peer
without the master key cannot open a session (encrypted or not), and no claim
(epoch, session id, the encryption flag, disks, ...) can be changed or moved
to another session without failing the MAC.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cdp_common import fsutil
from cdp_common.errors import AuthenticationError, ConfigError, FormatError
from cdp_common.records import crc32c

ENVELOPE_ENCRYPTED_V2 = 2
ENVELOPE_ENCRYPTED = 1  # v1: no key id (key id 0); still opened, never sealed
ENVELOPE_PLAIN = 0
CODEC_NONE = 0
CODEC_ZSTD = 1
KEY_BYTES = 32
SESSION_ID_BYTES = 16
TAG_BYTES = 16
MAX_FRAME_PLAINTEXT = 8 * 1024 * 1024
KEY_ID_MAX = 2**32 - 1
OPEN_MAC_BYTES = 32
_COUNTER = struct.Struct(">Q")
_KEY_ID = struct.Struct(">I")
_AAD = struct.Struct("<QQIBQ")


@dataclass(frozen=True, slots=True)
class KeyRing:
    """Master keys by key id; the first is current (new sessions seal with it)."""

    keys: tuple[tuple[int, bytes], ...]

    def __post_init__(self) -> None:
        if not self.keys:
            raise ConfigError("a key ring needs at least one key")
        ids = [key_id for key_id, _ in self.keys]
        if len(set(ids)) != len(ids):
            raise ConfigError("a key ring lists a key id twice")
        for key_id, key in self.keys:
            if not 0 <= key_id <= KEY_ID_MAX or len(key) != KEY_BYTES:
                raise ConfigError(f"key id {key_id}: not a u32 id with a 32-byte key")

    @classmethod
    def single(cls, key: bytes, key_id: int = 0) -> KeyRing:
        return cls(((key_id, key),))

    @property
    def current_id(self) -> int:
        return self.keys[0][0]

    @property
    def current_key(self) -> bytes:
        return self.keys[0][1]

    def ids(self) -> list[int]:
        return [key_id for key_id, _ in self.keys]

    def key(self, key_id: int) -> bytes:
        """The key of `key_id`; AuthenticationError if this ring does not hold it."""
        for kid, key in self.keys:
            if kid == key_id:
                return key
        raise AuthenticationError(
            f"key id {key_id} is not in this proxy's key ring (it holds "
            f"{', '.join(map(str, self.ids()))}): give it the new ring and reload "
            "(docs/OPERATIONS.md, rotating the master key)")

    def rotated(self, new_key: bytes) -> KeyRing:
        """This ring with `new_key` in front under the next key id (highest + 1)."""
        next_id = max(self.ids()) + 1
        if next_id > KEY_ID_MAX:
            raise ConfigError(f"key id {next_id} would exceed {KEY_ID_MAX}")
        return KeyRing(((next_id, new_key), *self.keys))

    def retired(self, key_id: int) -> KeyRing:
        """This ring without `key_id` (never the current key)."""
        if key_id not in self.ids():
            raise ConfigError(f"key id {key_id} is not in the ring (it holds "
                              f"{', '.join(map(str, self.ids()))})")
        if key_id == self.current_id:
            raise ConfigError(f"key id {key_id} is the current key (new sessions seal "
                              "with it); rotate first, then retire the old one")
        return KeyRing(tuple(k for k in self.keys if k[0] != key_id))

    def encode(self) -> bytes:
        """The key-file text: one `<key id> <64 hex>` line per key, current first."""
        return b"".join(f"{key_id} {key.hex()}\n".encode() for key_id, key in self.keys)


_RING_LINE = "expected '<key id> <64 hex characters>' (or a file of one 64-hex-character key)"


def parse_key_ring(raw: bytes, source: str = "key_file") -> KeyRing:
    """A key file: 32 raw bytes or one line of 64 hex characters (key id 0), or
    `<key id> <64 hex>` lines, current first (blank lines and # comments allowed).
    Messages name the file and line, never key material."""
    if len(raw) == KEY_BYTES:
        return KeyRing.single(raw)
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: expected 32 raw bytes or text key lines, found "
                          f"{len(raw)} bytes that are not ASCII text") from None
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)
             if line.strip() and not line.strip().startswith("#")]
    if len(lines) == 1 and _is_hex_key(lines[0][1]):
        return KeyRing.single(bytes.fromhex(lines[0][1]))
    if not lines:
        raise ConfigError(f"{source}: holds no key")
    keys: list[tuple[int, bytes]] = []
    for n, line in lines:
        fields = line.split()
        if len(fields) != 2 or not fields[0].isdigit() or not _is_hex_key(fields[1]):
            raise ConfigError(f"{source}: line {n}: {_RING_LINE}")
        key_id = int(fields[0])
        if key_id > KEY_ID_MAX:
            raise ConfigError(f"{source}: line {n}: key id {key_id} exceeds {KEY_ID_MAX}")
        if key_id in (k for k, _ in keys):
            raise ConfigError(f"{source}: line {n}: key id {key_id} appears twice")
        keys.append((key_id, bytes.fromhex(fields[1])))
    return KeyRing(tuple(keys))


def _is_hex_key(word: str) -> bool:
    return len(word) == 2 * KEY_BYTES and all(c in "0123456789abcdefABCDEF" for c in word)


def load_key_ring(path: str | Path) -> KeyRing:
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"key_file {path}: cannot read ({exc.strerror})") from None
    return parse_key_ring(raw, f"key_file {path}")


def load_master_key(path: str | Path) -> bytes:
    """The current key of a key file (see parse_key_ring)."""
    return load_key_ring(path).current_key


def write_key_ring(path: str | Path, ring: KeyRing) -> None:
    """Replace a key file atomically (tmp + fsync + rename), mode 0600."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)  # a stale tmp could carry another mode
    try:
        fsutil.write_file_atomic(target, ring.encode(), 0o600, tmp)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"key_file {path}: cannot write ({exc.strerror})") from None


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


def open_mac_key(master_key: bytes, policy: str) -> bytes:
    """The key of session-open MACs: its own HKDF label, never a session key."""
    return _hkdf(policy_key(master_key, policy), None, b"cdp-open-mac-v1")


@dataclass(frozen=True, slots=True)
class OpenClaims:
    """Everything a session open claims, as the open MAC covers it."""

    policy: str
    session_id: bytes
    epoch: int
    key_id: int
    encryption: bool
    source_proxy_id: str
    target_address: str
    captured_seq: int
    disks: tuple[tuple[int, int, str], ...]
    """(disk id, size in bytes, name) in the open's order."""


_U32 = struct.Struct("<I")
_OPEN_FIXED = struct.Struct("<QIBQI")


def _text(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return _U32.pack(len(raw)) + raw


def encode_claims(c: OpenClaims) -> bytes:
    """The MAC's input: every field length-prefixed or fixed-size, so no two
    different claims encode alike (docs/FORMAT.md "Session open MAC")."""
    out = [b"cdp-open-v1", _text(c.policy), _text(c.session_id),
           _OPEN_FIXED.pack(c.epoch, c.key_id, int(c.encryption), c.captured_seq, len(c.disks)),
           _text(c.source_proxy_id), _text(c.target_address)]
    for disk_id, size, name in c.disks:
        out.append(struct.pack("<IQ", disk_id, size) + _text(name))
    return b"".join(out)


def open_mac(master_key: bytes, claims: OpenClaims) -> bytes:
    return hmac.new(open_mac_key(master_key, claims.policy), encode_claims(claims),
                    hashlib.sha256).digest()


def verify_open_mac(master_key: bytes, claims: OpenClaims, mac: bytes) -> None:
    """AuthenticationError unless `mac` is the open MAC of `claims` under `master_key`."""
    if not hmac.compare_digest(open_mac(master_key, claims), mac):
        raise AuthenticationError(
            f"session open of policy {claims.policy!r} failed key confirmation under key id "
            f"{claims.key_id}: wrong key or tampered open")


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
    # Consistency-group checkpoint the delta ends at; in the AAD only when nonzero.
    checkpoint_id: int = 0
    # Why the gap opened (with gap_begin_time_ns); in the AAD only when not empty.
    gap_reason: str = ""


_AAD_GAP = struct.Struct("<QQQQ")
_AAD_CHECKPOINT = struct.Struct("<Q")


def _aad(policy: str, session_id: bytes, header: FrameHeader) -> bytes:
    name = policy.encode()
    aad = (b"cdp-frame-v1" + len(name).to_bytes(2, "little") + name + session_id
           + _AAD.pack(header.first_seq, header.last_seq, header.index, int(header.final),
                       header.newest_time_ns))
    gap = (header.gap_begin_time_ns, header.gap_after_seq, header.gap_end_seq,
           header.gap_end_time_ns)
    if any(gap):
        aad += b"gap" + _AAD_GAP.pack(*gap)
    if header.checkpoint_id:
        aad += b"checkpoint" + _AAD_CHECKPOINT.pack(header.checkpoint_id)
    if header.gap_reason:
        reason = header.gap_reason.encode()
        aad += b"gapreason" + len(reason).to_bytes(2, "little") + reason
    return aad


class _Session:
    def __init__(self, policy: str, session_id: bytes, key: bytes | None,
                 key_id: int = 0) -> None:
        self.policy = policy
        self.session_id = session_id
        self.key_id = key_id
        self._aead = AESGCM(key) if key is not None else None


class FrameSealer(_Session):
    """Sender side: compress + seal frames with consecutive counters."""

    def __init__(self, policy: str, session_id: bytes, key: bytes | None,
                 compression_level: int = 1, key_id: int = 0) -> None:
        super().__init__(policy, session_id, key, key_id)
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
        return (bytes([ENVELOPE_ENCRYPTED_V2]) + _KEY_ID.pack(self.key_id) + counter
                + self._aead.encrypt(nonce, body, _aad(self.policy, self.session_id, header)))


class FrameOpener(_Session):
    """Receiver side: verify, decrypt and decompress frames, in order."""

    def __init__(self, policy: str, session_id: bytes, key: bytes | None,
                 max_plaintext: int = MAX_FRAME_PLAINTEXT, key_id: int = 0) -> None:
        super().__init__(policy, session_id, key, key_id)
        self._expected = 1
        self._max = max_plaintext
        self._zstd = zstandard.ZstdDecompressor()

    def open(self, header: FrameHeader, envelope: bytes) -> bytes:
        if len(envelope) < 9:
            raise FormatError(f"frame {header.index} of seq {header.last_seq}: envelope too short")
        kind = envelope[0]
        if self._aead is not None:
            counter_bytes, sealed = self._encrypted_fields(envelope)
            (counter,) = _COUNTER.unpack(counter_bytes)
            if counter != self._expected:
                raise AuthenticationError(f"frame counter {counter}, expected {self._expected} "
                                          "(replayed or reordered frame)")
            body: bytes | memoryview
            try:
                body = self._aead.decrypt(b"\0\0\0\0" + counter_bytes, sealed,
                                          _aad(self.policy, self.session_id, header))
            except InvalidTag:
                raise AuthenticationError(
                    f"frame authentication failed for policy {self.policy!r} seq "
                    f"{header.first_seq}..{header.last_seq}: wrong key or tampered frame") from None
        else:
            if kind != ENVELOPE_PLAIN:
                raise FormatError("encrypted frame on a plaintext session")
            counter_bytes = envelope[1:9]
            (counter,) = _COUNTER.unpack(counter_bytes)
            if counter != self._expected:
                raise FormatError(f"frame counter {counter}, expected {self._expected}")
            if len(envelope) < 14:
                raise FormatError("plaintext envelope too short")
            body = memoryview(envelope)[13:]
            if crc32c(counter_bytes, body) != int.from_bytes(envelope[9:13], "little"):
                raise FormatError("plaintext frame checksum mismatch")
        self._expected += 1
        return self._decode_body(body)

    def _encrypted_fields(self, envelope: bytes) -> tuple[bytes, memoryview]:
        """(counter bytes, AES-GCM output) of an encrypted envelope of this session's key."""
        kind = envelope[0]
        if kind == ENVELOPE_ENCRYPTED_V2:
            if len(envelope) < 13:
                raise AuthenticationError("encrypted envelope too short")
            (key_id,) = _KEY_ID.unpack(envelope[1:5])
            if key_id != self.key_id:
                raise AuthenticationError(f"frame sealed under key id {key_id} on a session "
                                          f"opened with key id {self.key_id}")
            return envelope[5:13], memoryview(envelope)[13:]  # a view: no copy
        if kind == ENVELOPE_ENCRYPTED and self.key_id == 0:
            return envelope[1:9], memoryview(envelope)[9:]
        raise AuthenticationError("unencrypted frame on an encrypted session"
                                  if kind == ENVELOPE_PLAIN else
                                  f"envelope version {kind} not allowed on this session")

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
