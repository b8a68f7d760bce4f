"""Journal record codec (docs/FORMAT.md, "Journal record").

Theory of operation: a record is a fixed 40-byte little-endian header followed
by `length` data bytes; a CRC32C over header-without-crc and data makes a torn
or flipped record detectable. The same bytes are stored in journal segments
and shipped to the source proxy, so decoding is the only parsing anyone does.

    magic u32 "CDPJ" || version u8 || flags u8 || disk_id u16 || seq u64 ||
    time_ns u64 || offset u64 || length u32 || crc32c u32 || data[length]
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import cast

import crc32c as _crc32c

from cdp_common.errors import FormatError, TornRecordError

MAGIC = 0x4A504443  # b"CDPJ" little-endian
VERSION = 1
HEADER = struct.Struct("<IBBHQQQII")
HEADER_SIZE = HEADER.size  # 40
MAX_RECORD_DATA = 16 * 1024 * 1024  # a single FUSE write is at most 1 MiB; be generous

# Record flags (docs/FORMAT.md "Journal record"). Unknown bits are carried, not rejected.
FLAG_RESYNC = 0x01   # data read back from the image by a dirty-block resync or initial sync
FLAG_GAP_END = 0x02  # marker, no disk write: the gap that began at an overflow ends here;
                     # data = GAP_END payload (below), disk_id = offset = 0
GAP_END_PAYLOAD = struct.Struct("<QQ")  # gap_begin_time_ns || lost_after_seq
FLAG_CHECKPOINT = 0x04  # marker, no disk write: a consistency-group checkpoint; the
                        # checkpoint id is in the offset field, disk_id = 0, no data
MARKER_FLAGS = FLAG_GAP_END | FLAG_CHECKPOINT


@dataclass(frozen=True, slots=True)
class Record:
    seq: int
    time_ns: int
    disk_id: int
    offset: int
    data: bytes
    flags: int = 0

    @property
    def length(self) -> int:
        return len(self.data)

    @property
    def is_marker(self) -> bool:
        """A marker record carries metadata for the stream, never bytes for a disk."""
        return bool(self.flags & MARKER_FLAGS)

    @property
    def checkpoint_id(self) -> int:
        """The checkpoint a CHECKPOINT marker carries (0 for any other record)."""
        return self.offset if self.flags & FLAG_CHECKPOINT else 0


def crc32c(*parts: bytes | memoryview) -> int:
    value = 0
    for part in parts:
        value = _crc32c.crc32c(part, value)
    return value


def encode(seq: int, time_ns: int, disk_id: int, offset: int, data: bytes | memoryview,
           flags: int = 0) -> bytes:
    """Encode one record; returns header || data as one bytes object."""
    head = HEADER.pack(MAGIC, VERSION, flags, disk_id, seq, time_ns, offset, len(data), 0)
    crc = crc32c(memoryview(head)[: HEADER_SIZE - 4], data)
    return head[: HEADER_SIZE - 4] + crc.to_bytes(4, "little") + bytes(data)


def encode_header(seq: int, time_ns: int, disk_id: int, offset: int,
                  data: bytes | memoryview, flags: int = 0) -> bytes:
    """Header only (with the CRC over data), for writev-style appends."""
    head = HEADER.pack(MAGIC, VERSION, flags, disk_id, seq, time_ns, offset, len(data), 0)
    crc = crc32c(memoryview(head)[: HEADER_SIZE - 4], data)
    return head[: HEADER_SIZE - 4] + crc.to_bytes(4, "little")


def decode_one(buf: bytes | memoryview, pos: int = 0, copy: bool = True) -> tuple[Record, int]:
    """Decode the record at `pos`; returns it and the position after it.

    Raises TornRecordError when the buffer ends inside the record and
    FormatError when the record is malformed or its checksum is wrong.
    `copy=False`: the record's data is a read-only memoryview into `buf`
    instead of a copy (it keeps `buf` alive; for consumers that copy or drop
    the data before `buf` changes, such as the source proxy's cutter).
    """
    view = memoryview(buf)
    if len(view) - pos < HEADER_SIZE:
        raise TornRecordError(f"record at byte {pos}: header cut short "
                              f"({len(view) - pos} of {HEADER_SIZE} bytes)")
    magic, version, flags, disk_id, seq, time_ns, offset, length, crc = HEADER.unpack_from(
        view, pos)
    if magic != MAGIC:
        raise FormatError(f"record at byte {pos}: bad magic {magic:#010x}")
    if version != VERSION:
        raise FormatError(f"record at byte {pos}: unsupported version {version}")
    if length > MAX_RECORD_DATA:
        raise FormatError(f"record at byte {pos}: length {length} exceeds {MAX_RECORD_DATA}")
    end = pos + HEADER_SIZE + length
    if end > len(view):
        raise TornRecordError(f"record at byte {pos}: data cut short "
                              f"({len(view) - pos - HEADER_SIZE} of {length} bytes)")
    data = view[pos + HEADER_SIZE:end]
    if crc32c(view[pos:pos + HEADER_SIZE - 4], data) != crc:
        raise FormatError(f"record at byte {pos} (seq {seq}): checksum mismatch")
    return Record(seq, time_ns, disk_id, offset,
                  bytes(data) if copy else cast(bytes, data.toreadonly()), flags), end


def decode_all(buf: bytes | memoryview, copy: bool = True) -> Iterator[Record]:
    """Decode a batch of concatenated records; any defect raises FormatError.

    `copy=False` as for `decode_one` (no per-record copy of the data)."""
    view = buf if copy else memoryview(buf)  # one view for the batch, not one per record
    pos = 0
    while pos < len(view):
        record, pos = decode_one(view, pos, copy)
        yield record


def scan_valid_prefix(buf: bytes | memoryview) -> tuple[list[tuple[int, int, int]], int]:
    """Find the longest prefix of valid records (journal recovery).

    Returns ([(seq, start, end)], valid_end): everything from valid_end on is a
    torn or corrupt tail that must be cut, never shipped.
    """
    spans: list[tuple[int, int, int]] = []
    pos = 0
    while pos < len(buf):
        try:
            record, end = decode_one(buf, pos)
        except FormatError:
            break
        spans.append((record.seq, pos, end))
        pos = end
    return spans, pos
