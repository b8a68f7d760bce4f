"""Persisted dirty-block bitmap of one disk (docs/FORMAT.md "Dirty-block bitmap").

Theory of operation
-------------------
While a policy's journal is overflowed (or a sync is planned) the filter does
not journal writes; it marks the blocks they touch in a bitmap per disk, one
bit per `block_bytes` block (default 64 KiB). The resync later reads exactly
those blocks back from the image.

The file is `header || bits`; the header is written once when the file is
created (and the file preallocated, so updating it never needs free space:
a full journal volume must not stop the tracking). Bits are updated *in
place*: `mark` and `clear` pwrite the bytes they changed at once, before the
image write they stand for, without fsync. A kill -9 of the filter therefore
never loses a mark (the page cache keeps both writes); `sync()` (called on an
application flush and before the journal is dropped) makes them durable
against power loss. A bit set too many only costs a block of resync; a bit
missing would lose data, so bits are only cleared once the block's content
is durable at the target.

Invariant B1: every block of the image whose bytes may differ from what the
target has (or will get from records still in the journal) has its bit set.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct

from cdp_common.errors import StorageError
from cdp_common.fileio import OS_IO, FileIO

MAGIC = 0x42504443  # b"CDPB" little-endian
VERSION = 1
HEADER = struct.Struct("<IBBHIIQQ")  # magic, version, 0, 0, block_bytes, 0, disk_size, 0
HEADER_SIZE = HEADER.size  # 32
_NONZERO = re.compile(rb"[^\x00]")
_POPCOUNT = bytes(bin(i).count("1") for i in range(256))


class DirtyBitmap:
    """One disk's bitmap; use `DirtyBitmap.open`. All methods are synchronous."""

    def __init__(self, path: str, fd: int, block_bytes: int, disk_size: int,
                 bits: bytearray, io: FileIO = OS_IO) -> None:
        self.path = path
        self.fd = fd
        self.io = io
        self.block_bytes = block_bytes
        self.disk_size = disk_size
        self.blocks = -(-disk_size // block_bytes)
        self.bits = bits
        self.count = sum(bits.translate(_POPCOUNT))
        self._unsynced = False

    @classmethod
    def open(cls, path: str, block_bytes: int, disk_size: int,
             io: FileIO = OS_IO) -> DirtyBitmap:
        """Open or create the bitmap at `path`.

        An existing bitmap with another block size or disk size is converted:
        every byte range it marks stays marked (coarser or finer), so a config
        change never loses a dirty block.
        """
        if block_bytes <= 0 or block_bytes % 4096:
            raise StorageError(f"dirty bitmap {path}: block size {block_bytes} is not a "
                               "positive multiple of 4096")
        nbytes = _nbytes(disk_size, block_bytes)
        old: tuple[int, int, bytes] | None = None
        try:
            with open(path, "rb") as f:
                raw = f.read()
            old = cls._parse(path, raw)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StorageError(f"dirty bitmap {path}: cannot read ({exc.strerror})") from None
        if old is not None and old[0] == block_bytes and old[1] == disk_size:
            try:
                fd = io.open(path, os.O_RDWR)
            except OSError as exc:
                raise StorageError(f"dirty bitmap {path}: cannot open ({exc.strerror})") \
                    from None
            return cls(path, fd, block_bytes, disk_size, bytearray(old[2][:nbytes]), io)
        bm = cls._create(path, block_bytes, disk_size, nbytes, io)
        if old is not None:
            o_block, o_size, o_bits = old
            for b in _iter_set(o_bits, -(-o_size // o_block)):
                start = b * o_block
                bm.mark(start, min(o_block, max(0, disk_size - start)))
            bm.sync()
        return bm

    @staticmethod
    def _parse(path: str, raw: bytes) -> tuple[int, int, bytes] | None:
        if len(raw) < HEADER_SIZE:
            return None  # torn creation: nothing was ever marked in it
        magic, version, _a, _b, block, _c, size, _d = HEADER.unpack_from(raw)
        if magic != MAGIC or version != VERSION or block <= 0 or size <= 0:
            raise StorageError(f"dirty bitmap {path}: bad header (magic {magic:#x}, "
                               f"version {version}); refusing to guess which blocks are dirty")
        need = _nbytes(size, block)
        bits = raw[HEADER_SIZE:HEADER_SIZE + need]
        return block, size, bits + bytes(need - len(bits))

    @classmethod
    def _create(cls, path: str, block_bytes: int, disk_size: int, nbytes: int,
                io: FileIO) -> DirtyBitmap:
        tmp = path + ".tmp"
        directory = os.path.dirname(os.path.abspath(path))
        try:
            io.makedirs(directory)
            fd = io.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                io.allocate(fd, 0, HEADER_SIZE + nbytes)
                io.pwrite(fd, HEADER.pack(MAGIC, VERSION, 0, 0, block_bytes, 0, disk_size, 0), 0)
                io.fsync(fd)
                io.rename(tmp, path)
                io.fsync_dir(directory)
            except BaseException:
                io.close(fd)
                raise
        except OSError as exc:
            raise StorageError(f"dirty bitmap {path}: cannot create ({exc.strerror})") from None
        return cls(path, fd, block_bytes, disk_size, bytearray(nbytes), io)

    def grow(self, disk_size: int) -> None:
        """The disk grew: bits for its new blocks (clear), in place and durable.

        The new bytes are allocated first, then the header names the new size
        (fsync): a crash before the header leaves the old bitmap, which open()
        converts; nothing is ever unmarked."""
        if disk_size <= self.disk_size:
            return
        nbytes = _nbytes(disk_size, self.block_bytes)
        try:
            if nbytes > len(self.bits):
                self.io.allocate(self.fd, HEADER_SIZE + len(self.bits), nbytes - len(self.bits))
            self.io.pwrite(self.fd, HEADER.pack(MAGIC, VERSION, 0, 0, self.block_bytes, 0,
                                                disk_size, 0), 0)
            self.io.fsync(self.fd)
        except OSError as exc:
            raise StorageError(f"dirty bitmap {self.path}: cannot grow ({exc.strerror})") \
                from None
        self.bits.extend(bytes(nbytes - len(self.bits)))
        self.disk_size = disk_size
        self.blocks = -(-disk_size // self.block_bytes)

    # ------------------------------------------------------------ bits

    def block_range(self, offset: int, length: int) -> range:
        return range(offset // self.block_bytes,
                     min(self.blocks, -(-(offset + length) // self.block_bytes)))

    def is_set(self, block: int) -> bool:
        return bool(self.bits[block >> 3] & (1 << (block & 7)))

    def mark(self, offset: int, length: int) -> int:
        """Set the bits of every block [offset, offset+length) touches; returns how many
        were newly set. Changed bytes are written to the file at once (no fsync)."""
        if length <= 0:
            return 0
        blocks = self.block_range(offset, length)
        bits = self.bits
        lo = hi = -1
        new = 0
        for b in blocks:
            i, m = b >> 3, 1 << (b & 7)
            if not bits[i] & m:
                bits[i] |= m
                new += 1
                if lo < 0:
                    lo = i
                hi = i
        if new:
            self.count += new
            self._write(lo, hi + 1)
        return new

    def clear(self, block: int) -> bool:
        i, m = block >> 3, 1 << (block & 7)
        if not self.bits[i] & m:
            return False
        self.bits[i] &= ~m & 0xFF
        self.count -= 1
        self._write(i, i + 1)
        return True

    def clear_all(self) -> None:
        if self.count:
            self.bits[:] = bytes(len(self.bits))
            self.count = 0
            self._write(0, len(self.bits))

    def next_set(self, block: int) -> int:
        """Lowest set block >= `block`, or -1."""
        if block >= self.blocks:
            return -1
        i = block >> 3
        byte = self.bits[i] >> (block & 7) if i < len(self.bits) else 0
        if byte:
            return block + ((byte & -byte).bit_length() - 1)
        m = _NONZERO.search(self.bits, i + 1)
        if m is None:
            return -1
        j = m.start()
        v = self.bits[j]
        b = j * 8 + (v & -v).bit_length() - 1
        return b if b < self.blocks else -1

    def _write(self, lo: int, hi: int) -> None:
        try:
            self.io.pwrite(self.fd, self.bits[lo:hi], HEADER_SIZE + lo)
        except OSError as exc:
            raise StorageError(f"dirty bitmap {self.path}: write failed ({exc.strerror})") \
                from None
        self._unsynced = True

    def sync(self) -> None:
        if not self._unsynced:
            return
        # Cleared first: sync() runs in a worker thread while the loop marks, and a
        # mark landing during the fsync must leave the flag set for the next sync.
        self._unsynced = False
        try:
            self.io.fsync(self.fd)
        except OSError as exc:
            self._unsynced = True
            raise StorageError(f"dirty bitmap {self.path}: fsync failed ({exc.strerror})") \
                from None

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                self.io.close(self.fd)
            self.fd = -1


def _nbytes(disk_size: int, block_bytes: int) -> int:
    blocks = (disk_size + block_bytes - 1) // block_bytes
    return (blocks + 7) // 8


def _iter_set(bits: bytes, nblocks: int) -> list[int]:
    out = []
    for i, v in enumerate(bits):
        while v:
            low = v & -v
            b = i * 8 + low.bit_length() - 1
            if b < nblocks:
                out.append(b)
            v ^= low
    return out
