"""Delta extent codec (docs/FORMAT.md, "Delta extents").

Theory of operation: a delta is the coalesced effect of one interval of
writes, a list of non-overlapping extents per disk. On the wire it is cut into
chunks of whole extents; each chunk is a concatenation of

    disk_id u16 || kind u8 || reserved u8 || offset u64 || length u32 || data

little-endian, where kind 1 = data (followed by `length` bytes) and kind 2 =
zero (no data bytes: the range reads as zeros). Decoding checks every length
and bound before it slices, so a hostile chunk cannot make us allocate or
write outside the disk.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from cdp_common.errors import FormatError

EXTENT = struct.Struct("<HBBQI")
EXTENT_HEADER_SIZE = EXTENT.size  # 16
KIND_DATA = 1
KIND_ZERO = 2
MAX_EXTENT_LENGTH = 1 << 31


@dataclass(frozen=True, slots=True)
class Extent:
    disk_id: int
    offset: int
    length: int
    data: bytes | None  # None = zero extent

    @property
    def is_zero(self) -> bool:
        return self.data is None


def encode_extent(extent: Extent) -> bytes:
    if extent.data is None:
        return EXTENT.pack(extent.disk_id, KIND_ZERO, 0, extent.offset, extent.length)
    if len(extent.data) != extent.length:
        raise ValueError("extent data length does not match its length field")
    return EXTENT.pack(extent.disk_id, KIND_DATA, 0, extent.offset, extent.length) + extent.data


def encoded_size(extent: Extent) -> int:
    return EXTENT_HEADER_SIZE + (0 if extent.data is None else extent.length)


def encode_chunks(extents: Iterable[Extent], chunk_bytes: int) -> Iterator[bytes]:
    """Pack extents into chunks of about `chunk_bytes`, splitting big data extents.

    Every chunk holds whole extents (a big extent is split into several), so a
    receiver can decode and check each chunk on its own. Yields at least one
    chunk (possibly empty) so that an empty delta still travels and gets acked.
    """
    parts: list[bytes] = []
    size = 0
    emitted = False
    for extent in extents:
        pieces: Iterable[Extent]
        if extent.data is not None and extent.length > chunk_bytes:
            pieces = (Extent(extent.disk_id, extent.offset + i, min(chunk_bytes, extent.length - i),
                             extent.data[i:i + chunk_bytes])
                      for i in range(0, extent.length, chunk_bytes))
        else:
            pieces = (extent,)
        for piece in pieces:
            n = encoded_size(piece)
            if parts and size + n > chunk_bytes:
                yield b"".join(parts)
                emitted = True
                parts, size = [], 0
            parts.append(encode_extent(piece))
            size += n
    if parts or not emitted:
        yield b"".join(parts)


def walk_extents(view: memoryview, disk_sizes: Mapping[int, int]
                 ) -> Iterator[tuple[int, int, int, int, int]]:
    """Yield (disk_id, kind, offset, length, data_pos) of each extent, checking
    kinds, lengths and disk bounds before anything is sliced."""
    pos = 0
    while pos < len(view):
        if len(view) - pos < EXTENT_HEADER_SIZE:
            raise FormatError(f"delta extent at byte {pos}: header cut short")
        disk_id, kind, _reserved, offset, length = EXTENT.unpack_from(view, pos)
        pos += EXTENT_HEADER_SIZE
        if disk_id not in disk_sizes:
            raise FormatError(f"delta extent: unknown disk id {disk_id}")
        if length == 0 or length > MAX_EXTENT_LENGTH:
            raise FormatError(f"delta extent: bad length {length}")
        if offset + length > disk_sizes[disk_id]:
            raise FormatError(f"delta extent: [{offset}, {offset + length}) is outside disk "
                              f"{disk_id} of {disk_sizes[disk_id]} bytes")
        if kind == KIND_ZERO:
            yield disk_id, kind, offset, length, pos
        elif kind == KIND_DATA:
            if len(view) - pos < length:
                raise FormatError(f"delta extent at offset {offset}: data cut short")
            yield disk_id, kind, offset, length, pos
            pos += length
        else:
            raise FormatError(f"delta extent: unknown kind {kind}")


def decode_chunk(buf: bytes | memoryview, disk_sizes: Mapping[int, int]) -> list[Extent]:
    """Decode one chunk, checking kinds, lengths and disk bounds."""
    view = memoryview(buf)
    return [Extent(disk_id, offset, length,
                   bytes(view[pos:pos + length]) if kind == KIND_DATA else None)
            for disk_id, kind, offset, length, pos in walk_extents(view, disk_sizes)]


def check_chunk(buf: bytes | memoryview, disk_sizes: Mapping[int, int]) -> int:
    """Check one chunk exactly as `decode_chunk` does, without copying any data;
    returns the number of extents (FormatError on the same defects)."""
    return sum(1 for _ in walk_extents(memoryview(buf), disk_sizes))
