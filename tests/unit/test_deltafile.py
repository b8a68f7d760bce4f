"""cdp_target.deltafile and the undo-segment decoder: round trips, and hostile bytes.

Property: arbitrary bytes, every truncation and every bit flip of a valid file
decode to FormatError and nothing else (never IndexError, struct.error,
MemoryError, ...); encode -> decode gives back what was written.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdp_common.delta import Extent, decode_chunk, encode_chunks
from cdp_common.errors import FormatError
from cdp_common.fileio_sim import SimIO
from cdp_target import undo
from cdp_target.deltafile import (
    FLAG_UNDO,
    HEADER_SIZE,
    TRAILER_SIZE,
    DeltaReader,
    decode_delta_file,
    encode_delta_file,
    write_delta_file,
)
from cdp_target.undostore import index_segment, read_segment, write_segment

pytestmark = pytest.mark.timeout(120)

DISK_SIZES = {0: 1 << 16, 3: 1 << 12}


@st.composite
def extent_lists(draw: st.DrawFn) -> list[Extent]:
    out = []
    for _ in range(draw(st.integers(0, 5))):
        disk = draw(st.sampled_from(sorted(DISK_SIZES)))
        length = draw(st.integers(1, 700))
        offset = draw(st.integers(0, DISK_SIZES[disk] - length))
        data = None if draw(st.booleans()) else draw(st.binary(min_size=length,
                                                               max_size=length))
        out.append(Extent(disk, offset, length, data))
    return out


chunk_lists = st.lists(st.binary(max_size=300), max_size=5)
seq_ranges = st.tuples(st.integers(1, 1 << 40), st.integers(0, 50)).map(
    lambda t: (t[0], t[0] + t[1]))


@settings(max_examples=150, deadline=None)
@given(chunks=chunk_lists, seqs=seq_ranges, newest=st.integers(0, 1 << 63),
       flags=st.sampled_from([0, FLAG_UNDO]))
def test_encode_decode_round_trip(chunks: list[bytes], seqs: tuple[int, int], newest: int,
                                  flags: int) -> None:
    raw = encode_delta_file(*seqs, chunks, flags, newest)
    info, got = decode_delta_file(raw, flags=flags)
    assert got == chunks
    assert (info.first_seq, info.last_seq, info.newest_time_ns, info.flags) == (*seqs, newest,
                                                                               flags)
    assert (info.chunk_count, info.payload_bytes) == (len(chunks), sum(map(len, chunks)))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_are_a_format_error_or_a_file(raw: bytes) -> None:
    try:
        info, chunks = decode_delta_file(raw)
    except FormatError:
        return
    assert encode_delta_file(info.first_seq, info.last_seq, chunks, info.flags,
                             info.newest_time_ns) == raw


@settings(max_examples=100, deadline=None)
@given(chunks=chunk_lists.filter(lambda c: sum(map(len, c)) > 0), seqs=seq_ranges,
       data=st.data())
def test_every_truncation_and_bit_flip_is_rejected(chunks: list[bytes], seqs: tuple[int, int],
                                                   data: st.DataObject) -> None:
    raw = encode_delta_file(*seqs, chunks)
    cut = data.draw(st.integers(0, len(raw) - 1), label="cut")
    with pytest.raises(FormatError):
        decode_delta_file(raw[:cut])
    bit = data.draw(st.integers(0, len(raw) * 8 - 1), label="bit")
    flipped = bytearray(raw)
    flipped[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(FormatError):
        decode_delta_file(bytes(flipped))


def test_a_flip_anywhere_including_flags_fails_the_crc() -> None:
    raw = encode_delta_file(5, 9, [b"abc", b"defg"], 0, 77)
    for i in range(len(raw)):
        for bit in range(8):
            flipped = bytearray(raw)
            flipped[i] ^= 1 << bit
            with pytest.raises(FormatError):
                decode_delta_file(bytes(flipped))


def test_header_expectations(tmp_path: Path) -> None:
    path = tmp_path / "x.delta"
    path.write_bytes(encode_delta_file(3, 4, [b"ab"], flags=0))
    with pytest.raises(FormatError, match="flags"):
        DeltaReader(path, flags=FLAG_UNDO)
    with pytest.raises(FormatError, match="holds seqs"):
        DeltaReader(path, seqs=(1, 4))
    with DeltaReader(path, flags=0, seqs=(3, 4)) as r:
        assert list(r.chunks()) == [b"ab"]


def test_writer_and_file_reader_agree_with_the_pure_codec(tmp_path: Path) -> None:
    chunks = [b"one", b"", b"three" * 100]
    io = SimIO([tmp_path])
    final = tmp_path / "00000000000000000001-00000000000000000002.delta"
    size = write_delta_file(final, 1, 2, iter(chunks), newest_time_ns=42, io=io)
    assert [s.split()[0] for s in io.steps] == (["open", "pwrite"] + ["pwritev"] * 3
                                                + ["pwrite", "fsync", "rename", "fsync_dir"])
    raw = final.read_bytes()
    assert size == len(raw) == HEADER_SIZE + sum(4 + len(c) for c in chunks) + TRAILER_SIZE
    assert raw == encode_delta_file(1, 2, chunks, newest_time_ns=42)
    with DeltaReader(final, io) as r:
        assert list(r.chunks()) == chunks
    assert not (tmp_path / (final.name + ".tmp")).exists()


# ---------------------------------------------------------------- undo segments

@settings(max_examples=60, deadline=None)
@given(ext=extent_lists(), lo=st.integers(0, 1000), span=st.integers(1, 9))
def test_undo_segment_round_trip(tmp_path_factory: pytest.TempPathFactory, ext: list[Extent],
                                 lo: int, span: int) -> None:
    path = tmp_path_factory.mktemp("seg") / "s.undo"
    size = write_segment(path, lo, lo + span, ext)
    assert size == path.stat().st_size
    assert list(read_segment(path, DISK_SIZES)) == [
        e for c in encode_chunks(ext, 1 << 20) for e in _decode(c)]
    raw = path.read_bytes()
    refs = index_segment(path, lo, lo + span, DISK_SIZES)
    assert [(r.disk_id, r.offset, r.length) for r in refs] == [
        (e.disk_id, e.offset, e.length) for e in ext]
    for r, e in zip(refs, ext, strict=True):
        if e.data is None:
            assert r.src == -1
        else:
            assert raw[r.src:r.src + r.length] == e.data
    with pytest.raises(FormatError):
        index_segment(path, lo + 1, lo + span, DISK_SIZES)  # another range


def _decode(chunk: bytes) -> list[Extent]:
    return decode_chunk(chunk, DISK_SIZES)


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=300), lo=st.integers(0, 5))
def test_undo_decoder_on_arbitrary_bytes(tmp_path_factory: pytest.TempPathFactory, raw: bytes,
                                         lo: int) -> None:
    path = tmp_path_factory.mktemp("junk") / "s.undo"
    path.write_bytes(raw)
    try:
        refs = index_segment(path, lo, lo + 1, DISK_SIZES)
    except FormatError:
        return
    assert all(isinstance(r, undo.Ref) for r in refs)


@settings(max_examples=60, deadline=None)
@given(ext=extent_lists().filter(bool), data=st.data())
def test_undo_segment_truncation_and_flip_are_rejected(
        tmp_path_factory: pytest.TempPathFactory, ext: list[Extent], data: st.DataObject) -> None:
    d = tmp_path_factory.mktemp("bad")
    good = d / "good.undo"
    write_segment(good, 4, 7, ext)
    raw = good.read_bytes()
    bad = d / "bad.undo"
    bad.write_bytes(raw[:data.draw(st.integers(0, len(raw) - 1), label="cut")])
    with pytest.raises(FormatError):
        index_segment(bad, 4, 7, DISK_SIZES)
    bit = data.draw(st.integers(0, len(raw) * 8 - 1), label="bit")
    flipped = bytearray(raw)
    flipped[bit // 8] ^= 1 << (bit % 8)
    bad.write_bytes(bytes(flipped))
    with pytest.raises(FormatError):
        index_segment(bad, 4, 7, DISK_SIZES)
    os.unlink(bad)
