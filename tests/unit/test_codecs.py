"""Hypothesis tests for the shared codecs: journal records, delta extents, frame envelope."""

from __future__ import annotations

import contextlib
import os
import struct

import pytest
import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdp_common import crypto, delta, records
from cdp_common.crypto import FrameHeader, FrameOpener, FrameSealer
from cdp_common.delta import Extent
from cdp_common.errors import AuthenticationError, FormatError, TornRecordError

SETTINGS = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

u64 = st.integers(0, 2**64 - 1)
record_st = st.builds(records.Record, seq=u64, time_ns=u64, disk_id=st.integers(0, 65535),
                      offset=u64, data=st.binary(max_size=300))


# ---------------------------------------------------------------- journal records

@SETTINGS
@given(st.lists(record_st, max_size=5))
def test_records_round_trip(recs: list[records.Record]) -> None:
    buf = b"".join(records.encode(r.seq, r.time_ns, r.disk_id, r.offset, r.data) for r in recs)
    assert list(records.decode_all(buf)) == recs
    spans, end = records.scan_valid_prefix(buf)
    assert end == len(buf) and [s[0] for s in spans] == [r.seq for r in recs]
    for r in recs:
        head = records.encode_header(r.seq, r.time_ns, r.disk_id, r.offset, r.data)
        assert head + r.data == records.encode(r.seq, r.time_ns, r.disk_id, r.offset, r.data)


@SETTINGS
@given(record_st, st.data())
def test_records_every_truncation_is_torn(r: records.Record, data: st.DataObject) -> None:
    buf = records.encode(r.seq, r.time_ns, r.disk_id, r.offset, r.data)
    cut = data.draw(st.integers(1, len(buf) - 1))
    with pytest.raises(TornRecordError):
        records.decode_one(buf[:cut])
    with pytest.raises(FormatError):
        list(records.decode_all(buf + buf[:cut]))
    assert records.scan_valid_prefix(buf + buf[:cut])[1] == len(buf)


@SETTINGS
@given(record_st, st.data())
def test_records_every_bit_flip_rejected(r: records.Record, data: st.DataObject) -> None:
    buf = bytearray(records.encode(r.seq, r.time_ns, r.disk_id, r.offset, r.data))
    bit = data.draw(st.integers(0, 8 * len(buf) - 1))
    buf[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(FormatError):
        list(records.decode_all(bytes(buf)))
    assert records.scan_valid_prefix(bytes(buf)) == ([], 0)


def test_records_exhaustive_flips_small() -> None:
    buf = records.encode(7, 8, 1, 4096, b"hello world")
    for bit in range(8 * len(buf)):
        bad = bytearray(buf)
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(FormatError):
            records.decode_one(bytes(bad))


def test_records_oversize_length_rejected_before_reading() -> None:
    head = records.HEADER.pack(records.MAGIC, records.VERSION, 0, 0, 1, 1, 0,
                               records.MAX_RECORD_DATA + 1, 0)
    with pytest.raises(FormatError, match="exceeds"):
        records.decode_one(head)


@SETTINGS
@given(st.binary(max_size=200))
def test_records_garbage_never_crashes(buf: bytes) -> None:
    with contextlib.suppress(FormatError):
        list(records.decode_all(buf))


# ---------------------------------------------------------------- delta extents

SIZES = {0: 1 << 20, 1: 1 << 16}


@st.composite
def extents_st(draw: st.DrawFn) -> list[Extent]:
    out = []
    for _ in range(draw(st.integers(0, 6))):
        disk = draw(st.sampled_from([0, 1]))
        length = draw(st.integers(1, 5000))
        offset = draw(st.integers(0, SIZES[disk] - length))
        zero = draw(st.booleans())
        out.append(Extent(disk, offset, length, None if zero else os.urandom(length)))
    return out


def _flatten(extents: list[Extent]) -> dict[int, bytearray]:
    disks = {d: bytearray(n) for d, n in SIZES.items()}
    marks = {d: bytearray(n) for d, n in SIZES.items()}  # which bytes were written
    for e in extents:
        disks[e.disk_id][e.offset:e.offset + e.length] = (
            bytes(e.length) if e.data is None else e.data)
        marks[e.disk_id][e.offset:e.offset + e.length] = b"\1" * e.length
    return {**disks, **{d + 100: m for d, m in marks.items()}}


@SETTINGS
@given(extents_st(), st.integers(16, 6000))
def test_delta_round_trip(extents: list[Extent], chunk_bytes: int) -> None:
    chunks = list(delta.encode_chunks(extents, chunk_bytes))
    assert chunks, "an empty delta still yields one chunk"
    decoded = [e for c in chunks for e in delta.decode_chunk(c, SIZES)]
    for c in chunks[:-1]:
        assert len(c) <= chunk_bytes + delta.EXTENT_HEADER_SIZE
    assert _flatten(decoded) == _flatten(extents)
    # splitting only ever cuts data extents; zero extents stay whole
    assert sum(e.length for e in decoded) == sum(e.length for e in extents)


@SETTINGS
@given(extents_st().filter(bool), st.data())
def test_delta_truncation_inside_an_extent_rejected(extents: list[Extent],
                                                   data: st.DataObject) -> None:
    buf = b"".join(delta.encode_extent(e) for e in extents)
    boundaries = set()
    pos = 0
    for e in extents:
        pos += delta.encoded_size(e)
        boundaries.add(pos)
    cut = data.draw(st.integers(1, len(buf) - 1))
    if cut in boundaries:
        # a cut between extents is a valid, shorter chunk: the frame envelope
        # (AEAD tag or CRC) is what protects the chunk's length
        assert len(delta.decode_chunk(buf[:cut], SIZES)) < len(extents)
    else:
        with pytest.raises(FormatError):
            delta.decode_chunk(buf[:cut], SIZES)


@SETTINGS
@given(st.binary(max_size=400))
def test_delta_garbage_stays_in_bounds(buf: bytes) -> None:
    try:
        out = delta.decode_chunk(buf, SIZES)
    except FormatError:
        return
    for e in out:
        assert e.disk_id in SIZES and e.length > 0 and e.offset + e.length <= SIZES[e.disk_id]
        assert e.data is None or len(e.data) == e.length


@pytest.mark.parametrize("head,match", [
    (delta.EXTENT.pack(5, 1, 0, 0, 1) + b"x", "unknown disk"),
    (delta.EXTENT.pack(0, 3, 0, 0, 1) + b"x", "unknown kind"),
    (delta.EXTENT.pack(0, 1, 0, 0, 0), "bad length"),
    (delta.EXTENT.pack(0, 2, 0, (1 << 20) - 10, 11), "outside disk"),
    (delta.EXTENT.pack(0, 2, 0, 2**64 - 1, 1), "outside disk"),
    (delta.EXTENT.pack(0, 1, 0, 0, 100) + b"x" * 99, "cut short"),
    (delta.EXTENT.pack(0, 1, 0, 0, 100)[:10], "cut short"),
])
def test_delta_rejects(head: bytes, match: str) -> None:
    with pytest.raises(FormatError, match=match):
        delta.decode_chunk(head, SIZES)


# ---------------------------------------------------------------- frame envelope

POLICY = "pol-1"
MASTER = bytes(range(32))
SID = bytes(16)
KEY = crypto.session_key(crypto.policy_key(MASTER, POLICY), SID)


def _headers(n: int) -> list[FrameHeader]:
    return [FrameHeader(10, 20, i, i == n - 1, 12345) for i in range(n)]


@SETTINGS
@given(st.lists(st.binary(max_size=3000), min_size=1, max_size=4),
       st.sampled_from([0, 1, 3]), st.booleans())
def test_frames_round_trip(payloads: list[bytes], level: int, encrypted: bool) -> None:
    key = KEY if encrypted else None
    sealer = FrameSealer(POLICY, SID, key, level)
    opener = FrameOpener(POLICY, SID, key)
    for h, p in zip(_headers(len(payloads)), payloads, strict=True):
        env = sealer.seal(h, p)
        assert env[0] == (2 if encrypted else 0)
        if encrypted and len(p) > 16:
            assert p not in env
        assert opener.open(h, env) == p


def _one_frame(encrypted: bool, payload: bytes) -> tuple[FrameHeader, bytes]:
    h = FrameHeader(1, 5, 0, True, 99)
    return h, FrameSealer(POLICY, SID, KEY if encrypted else None, 1).seal(h, payload)


@SETTINGS
@given(st.booleans(), st.binary(max_size=500), st.data())
def test_frames_every_truncation_rejected(encrypted: bool, payload: bytes,
                                          data: st.DataObject) -> None:
    h, env = _one_frame(encrypted, payload)
    cut = data.draw(st.integers(0, len(env) - 1))
    opener = FrameOpener(POLICY, SID, KEY if encrypted else None)
    with pytest.raises((FormatError, AuthenticationError)):
        opener.open(h, env[:cut])
    assert opener.open(h, env) == payload  # the failure consumed nothing


@SETTINGS
@given(st.booleans(), st.binary(max_size=500), st.data())
def test_frames_every_bit_flip_rejected(encrypted: bool, payload: bytes,
                                        data: st.DataObject) -> None:
    h, env = _one_frame(encrypted, payload)
    bit = data.draw(st.integers(0, 8 * len(env) - 1))
    bad = bytearray(env)
    bad[bit // 8] ^= 1 << (bit % 8)
    opener = FrameOpener(POLICY, SID, KEY if encrypted else None)
    expected = AuthenticationError if encrypted else FormatError
    with pytest.raises(expected):
        opener.open(h, bytes(bad))


def test_frames_exhaustive_flips_encrypted() -> None:
    h, env = _one_frame(True, b"some payload bytes" * 3)
    for bit in range(8 * len(env)):
        bad = bytearray(env)
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(AuthenticationError):
            FrameOpener(POLICY, SID, KEY).open(h, bytes(bad))


def test_frames_wrong_key_policy_or_session() -> None:
    h, env = _one_frame(True, b"payload")
    other_master = crypto.session_key(crypto.policy_key(bytes(32), POLICY), SID)
    other_policy = crypto.session_key(crypto.policy_key(MASTER, "pol-2"), SID)
    other_sid = crypto.session_key(crypto.policy_key(MASTER, POLICY), b"\1" * 16)
    for opener in (FrameOpener(POLICY, SID, other_master),
                   FrameOpener(POLICY, SID, other_policy),
                   FrameOpener(POLICY, b"\1" * 16, other_sid),
                   FrameOpener(POLICY, b"\1" * 16, KEY),   # right key, other session id in AAD
                   FrameOpener("pol-2", SID, KEY)):         # right key, other policy in AAD
        with pytest.raises(AuthenticationError, match="wrong key or tampered"):
            opener.open(h, env)
    # an encrypted session never accepts a plaintext frame and vice versa
    _, plain = _one_frame(False, b"payload")
    with pytest.raises(AuthenticationError):
        FrameOpener(POLICY, SID, KEY).open(h, plain)
    with pytest.raises(FormatError):
        FrameOpener(POLICY, SID, None).open(h, env)


def test_frames_replay_and_reorder_rejected() -> None:
    sealer = FrameSealer(POLICY, SID, KEY)
    hs = _headers(3)
    envs = [sealer.seal(h, b"frame %d" % h.index) for h in hs]
    opener = FrameOpener(POLICY, SID, KEY)
    with pytest.raises(AuthenticationError, match="replayed or reordered"):
        opener.open(hs[1], envs[1])  # skipping frame 0
    assert opener.open(hs[0], envs[0]) == b"frame 0"
    with pytest.raises(AuthenticationError):
        opener.open(hs[0], envs[0])  # replay
    assert opener.open(hs[1], envs[1]) == b"frame 1"
    assert opener.open(hs[2], envs[2]) == b"frame 2"
    # a frame from another session (same key!) replayed into this one
    other = FrameSealer(POLICY, SID, KEY).seal(hs[0], b"x")
    with pytest.raises(AuthenticationError):
        FrameOpener(POLICY, SID, KEY).open(hs[1], other)


@SETTINGS
@given(st.sampled_from(["first_seq", "last_seq", "index", "final", "newest_time_ns"]),
       st.integers(1, 1000))
def test_frames_spliced_header_rejected(field: str, delta_v: int) -> None:
    h, env = _one_frame(True, b"payload")
    value = getattr(h, field)
    changed = (not value) if field == "final" else value + delta_v
    spliced = FrameHeader(**{**{f: getattr(h, f) for f in h.__slots__}, field: changed})
    with pytest.raises(AuthenticationError):
        FrameOpener(POLICY, SID, KEY).open(spliced, env)


def _seal_raw(body: bytes, h: FrameHeader, counter: int = 1) -> bytes:
    """An encrypted envelope around an arbitrary body (a malicious but keyed sender)."""
    c = struct.pack(">Q", counter)
    return b"\x01" + c + AESGCM(KEY).encrypt(b"\0\0\0\0" + c, body,
                                              crypto._aad(POLICY, SID, h))


def test_oversize_zstd_rejected() -> None:
    h = FrameHeader(1, 1, 0, True, 0)
    bomb = zstandard.ZstdCompressor(level=3).compress(bytes(crypto.MAX_FRAME_PLAINTEXT + 1))
    with pytest.raises(FormatError, match="content size"):
        FrameOpener(POLICY, SID, KEY).open(h, _seal_raw(b"\x01" + bomb, h))
    # a zstd stream without a declared content size
    cobj = zstandard.ZstdCompressor().compressobj()
    streamed = cobj.compress(b"a" * 1000) + cobj.flush()
    assert zstandard.get_frame_parameters(streamed).content_size == \
        zstandard.CONTENTSIZE_UNKNOWN
    with pytest.raises(FormatError):
        FrameOpener(POLICY, SID, KEY).open(h, _seal_raw(b"\x01" + streamed, h))
    # a frame that lies about its content size (declares 500, holds 5000)
    lying = bytearray(zstandard.ZstdCompressor(level=1).compress(b"a" * 5000))
    assert lying[4] == 0x60  # single segment, 2-byte content size (value - 256)
    lying[5:7] = (500 - 256).to_bytes(2, "little")
    with pytest.raises(FormatError):
        FrameOpener(POLICY, SID, KEY, max_plaintext=1000).open(h, _seal_raw(b"\x01" + lying, h))
    # uncompressed oversize, unknown codec, empty body
    with pytest.raises(FormatError, match="exceeds"):
        FrameOpener(POLICY, SID, KEY, max_plaintext=10).open(h, _seal_raw(b"\x00" + b"x" * 11, h))
    with pytest.raises(FormatError, match="codec"):
        FrameOpener(POLICY, SID, KEY).open(h, _seal_raw(b"\x07abc", h))
    with pytest.raises(FormatError, match="empty"):
        FrameOpener(POLICY, SID, KEY).open(h, _seal_raw(b"", h))
    with pytest.raises(FormatError, match="bad zstd"):
        FrameOpener(POLICY, SID, KEY).open(h, _seal_raw(b"\x01garbage", h))


def test_session_id_length_and_key_file(tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(FormatError):
        crypto.session_key(KEY, b"short")
    p = os.path.join(tmp_path, "k")
    crypto.write_new_key(p)
    assert len(crypto.load_master_key(p)) == 32
    assert os.stat(p).st_mode & 0o777 == 0o600
    raw = os.path.join(tmp_path, "raw")
    with open(raw, "wb") as f:
        f.write(MASTER)
    assert crypto.load_master_key(raw) == MASTER
    bad = os.path.join(tmp_path, "bad")
    with open(bad, "w") as f:
        f.write("too short\n")
    from cdp_common.errors import ConfigError
    with pytest.raises(ConfigError):
        crypto.load_master_key(bad)
    with pytest.raises(ConfigError):
        crypto.load_master_key(os.path.join(tmp_path, "missing"))
