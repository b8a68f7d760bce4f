"""The delta-file framing: one writer and one verifier, for deltas and undo segments.

Theory of operation
-------------------
A committed delta (``deltas/<first>-<last>.delta``) and an undo segment
(``undo/<lo>-<hi>.undo``) are the same file format (docs/FORMAT.md §4),
version 1 or 2, little-endian::

    header  = magic u32 0x44504443 ("CDPD") || version u8 (1 | 2) || flags u8 ||
              reserved u16 0 || first_seq u64 || last_seq u64                 (24 bytes)
    chunk   = length u32 (<= 256 MiB) || extents[length]
              (extents = cdp_common.delta chunk: "Delta extents" in docs/FORMAT.md)
    trailer = magic u32 0x54504443 ("CDPT") || chunk_count u32 ||
              payload_bytes u64 || newest_time_ns u64 ||
              [checkpoint_id u64, version 2 only] || crc32c u32         (28 | 36 bytes)

    file    = header || chunk* || trailer

Version 2 is written exactly for a delta (flags 0) that ends at a
consistency-group CHECKPOINT marker: its trailer carries the checkpoint id
(nonzero), so the id is durable with the delta, before the ack, and the
applier gives it to the point (DeltaChunk.checkpoint_id, replication.proto).
Every other file is version 1, as before; a version 2 file with flags 1 or a
zero checkpoint id is malformed (one encoding per content).

``flags`` is 0 for a delta, 1 (FLAG_UNDO) for an undo segment. ``payload_bytes``
is the sum of the chunk lengths; ``crc32c`` (Castagnoli) covers every byte of
the file before it.

Writing (`DeltaWriter`): header at create, each chunk as one pwritev, the
trailer at `finish`, which then fsyncs the file, renames it from its temporary
name to its final one and fsyncs the directory -- so a file under its final
name is always complete and durable, and a temporary file is never read.
Every call goes through the injected FileIO (crash points, power loss).

Reading (`scan`, `DeltaReader`): one sequential pass checks the size, the
header (magic, version, and the flags / seq range the caller expects), each
chunk length against the bytes left before the trailer, the trailer (magic,
chunk count, payload bytes) and the CRC. Only then are chunks handed out
(`DeltaReader.chunks`), so nothing from a corrupt file is ever applied; an
optional `on_chunk` sees each chunk during the pass (undo indexing uses it to
avoid a second pass; it must not act on the data before `scan` returns).
Anything that does not decode raises FormatError; an I/O failure OSError.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import crc32c as _crc32c

from cdp_common.errors import FormatError
from cdp_common.fileio import OS_IO, FileIO

DELTA_MAGIC = 0x44504443  # b"CDPD" little-endian
TRAILER_MAGIC = 0x54504443  # b"CDPT" little-endian
DELTA_VERSION = 1
DELTA_VERSION_CHECKPOINT = 2
FLAG_DELTA = 0
FLAG_UNDO = 1
HEADER = struct.Struct("<IBBHQQ")
HEADER_SIZE = HEADER.size  # 24
CHUNK_LEN = struct.Struct("<I")
TRAILER = struct.Struct("<IIQQI")
TRAILER_SIZE = TRAILER.size  # 28
TRAILER_V2 = struct.Struct("<IIQQQI")
TRAILER_V2_SIZE = TRAILER_V2.size  # 36
MAX_CHUNK_BYTES = 256 * 1024 * 1024

DELTA_SUFFIX = ".delta"
_DELTA_NAME = re.compile(r"^(\d{20})-(\d{20})\.delta\Z")


def delta_name(first_seq: int, last_seq: int) -> str:
    return f"{first_seq:020d}-{last_seq:020d}{DELTA_SUFFIX}"


def parse_delta_name(name: str) -> tuple[int, int] | None:
    """(first_seq, last_seq) of a committed delta's file name, else None."""
    m = _DELTA_NAME.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def delta_files(directory: Path) -> list[tuple[int, int, Path]]:
    """The committed delta files in `directory`, in seq order."""
    out = []
    for p in directory.iterdir():
        span = parse_delta_name(p.name)
        if span is not None:
            out.append((*span, p))
    out.sort()
    return out


def crc_continue(crc: int, block: bytes | memoryview) -> int:
    return int(_crc32c.crc32c(block, crc))


@dataclass(frozen=True, slots=True)
class DeltaInfo:
    """What a delta file's header and trailer say."""

    first_seq: int
    last_seq: int
    chunk_count: int
    payload_bytes: int
    newest_time_ns: int
    flags: int = FLAG_DELTA
    checkpoint_id: int = 0


# ---------------------------------------------------------------- writing

class DeltaWriter:
    """One delta file being written under a temporary name (module doc: Writing)."""

    def __init__(self, tmp: Path, first_seq: int, last_seq: int, flags: int = FLAG_DELTA,
                 io: FileIO = OS_IO, checkpoint_id: int = 0) -> None:
        self.tmp = tmp
        self.io = io
        self.chunks = 0
        self.payload = 0
        if checkpoint_id and flags != FLAG_DELTA:
            raise FormatError("only a delta ends at a checkpoint")
        self.checkpoint_id = checkpoint_id
        header = HEADER.pack(DELTA_MAGIC, _version(checkpoint_id), flags, 0, first_seq,
                             last_seq)
        self._fd: int | None = io.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            io.pwrite(self._fd, header, 0)
        except BaseException:
            self._close()
            raise
        self._pos = HEADER_SIZE
        self._crc = crc_continue(0, header)

    def add(self, chunk: bytes | memoryview) -> None:
        """Append one chunk of extents (checked by the caller)."""
        if len(chunk) > MAX_CHUNK_BYTES:
            raise FormatError(f"delta chunk of {len(chunk)} bytes is too large")
        assert self._fd is not None, "writer is finished"
        head = CHUNK_LEN.pack(len(chunk))
        self.io.pwritev(self._fd, [head, chunk], self._pos)
        self._pos += CHUNK_LEN.size + len(chunk)
        self._crc = crc_continue(crc_continue(self._crc, head), chunk)
        self.chunks += 1
        self.payload += len(chunk)

    def finish(self, final: Path, newest_time_ns: int = 0) -> int:
        """Trailer, fsync, rename to `final`, fsync its directory; returns the file size."""
        assert self._fd is not None, "writer is finished"
        body = _trailer(self.chunks, self.payload, newest_time_ns, self.checkpoint_id)
        crc = crc_continue(self._crc, body)
        self.io.pwrite(self._fd, body + crc.to_bytes(4, "little"), self._pos)
        self.io.fsync(self._fd)
        self._close()
        self.io.rename(self.tmp, final)
        self.io.fsync_dir(final.parent)
        return self._pos + len(body) + 4

    def discard(self) -> None:
        """Give the file up (close and unlink; errors ignored: open() cleans up)."""
        self._close()
        with contextlib.suppress(OSError):
            self.io.unlink(self.tmp)

    def _close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                self.io.close(fd)


def _version(checkpoint_id: int) -> int:
    return DELTA_VERSION_CHECKPOINT if checkpoint_id else DELTA_VERSION


def _trailer(chunks: int, payload: int, newest_time_ns: int, checkpoint_id: int) -> bytes:
    """The trailer without its CRC."""
    if checkpoint_id:
        return TRAILER_V2.pack(TRAILER_MAGIC, chunks, payload, newest_time_ns, checkpoint_id,
                               0)[:-4]
    return TRAILER.pack(TRAILER_MAGIC, chunks, payload, newest_time_ns, 0)[:-4]


def write_delta_file(final: Path, first_seq: int, last_seq: int, chunks: Iterator[bytes],
                     flags: int = FLAG_DELTA, newest_time_ns: int = 0,
                     io: FileIO = OS_IO) -> int:
    """Write a whole delta file durably under `final` (via `<final>.tmp`); returns its size."""
    w = DeltaWriter(final.with_name(final.name + ".tmp"), first_seq, last_seq, flags, io)
    try:
        for chunk in chunks:
            w.add(chunk)
        return w.finish(final, newest_time_ns)
    except Exception:
        w.discard()
        raise


def encode_delta_file(first_seq: int, last_seq: int, chunks: Sequence[bytes],
                      flags: int = FLAG_DELTA, newest_time_ns: int = 0,
                      checkpoint_id: int = 0) -> bytes:
    """The bytes of a delta file (for tests and tools; `DeltaWriter` streams the same)."""
    parts = [HEADER.pack(DELTA_MAGIC, _version(checkpoint_id), flags, 0, first_seq,
                         last_seq)]
    for c in chunks:
        parts += [CHUNK_LEN.pack(len(c)), bytes(c)]
    parts.append(_trailer(len(chunks), sum(len(c) for c in chunks), newest_time_ns,
                          checkpoint_id))
    body = b"".join(parts)
    return body + crc_continue(0, body).to_bytes(4, "little")


# ---------------------------------------------------------------- reading

ReadAt = Callable[[int, int], bytes]
"""read(offset, length) -> up to `length` bytes at `offset` (fewer only at end of file)."""


def scan(read: ReadAt, size: int, where: str, flags: int | None = None,
         seqs: tuple[int, int] | None = None,
         on_chunk: Callable[[bytes, int], None] | None = None) -> DeltaInfo:
    """Verify a whole delta file of `size` bytes (module doc: Reading).

    `flags` / `seqs` (first, last), when given, must match the header.
    `on_chunk(chunk, file_offset_of_chunk_data)` is called for each chunk
    during the pass. Raises FormatError naming `where`.
    """
    if size < HEADER_SIZE + TRAILER_SIZE:
        raise FormatError(f"{where}: delta file cut short ({size} bytes)")
    head = _exact(read, 0, HEADER_SIZE, where)
    magic, version, found_flags, _res, first, last = HEADER.unpack(head)
    if magic != DELTA_MAGIC:
        raise FormatError(f"{where}: not a delta file (bad magic)")
    if version not in (DELTA_VERSION, DELTA_VERSION_CHECKPOINT):
        raise FormatError(f"{where}: unsupported delta version {version}")
    trailer = TRAILER if version == DELTA_VERSION else TRAILER_V2
    if version == DELTA_VERSION_CHECKPOINT and found_flags != FLAG_DELTA:
        raise FormatError(f"{where}: a version 2 file (checkpoint) must be a delta")
    if size < HEADER_SIZE + trailer.size:
        raise FormatError(f"{where}: delta file cut short ({size} bytes)")
    if flags is not None and found_flags != flags:
        raise FormatError(f"{where}: unexpected flags {found_flags} (expected {flags})")
    if seqs is not None and (first, last) != seqs:
        raise FormatError(f"{where}: holds seqs [{first}, {last}], expected "
                          f"[{seqs[0]}, {seqs[1]}]")
    if first < 1 or last < first:
        raise FormatError(f"{where}: bad seq range [{first}, {last}]")
    crc = crc_continue(0, head)
    pos, end = HEADER_SIZE, size - trailer.size
    chunks = payload = 0
    while pos < end:
        if end - pos < CHUNK_LEN.size:
            raise FormatError(f"{where}: chunk length cut short at byte {pos}")
        raw = _exact(read, pos, CHUNK_LEN.size, where)
        (length,) = CHUNK_LEN.unpack(raw)
        if length > MAX_CHUNK_BYTES or pos + CHUNK_LEN.size + length > end:
            raise FormatError(f"{where}: bad chunk length {length} at byte {pos}")
        chunk = _exact(read, pos + CHUNK_LEN.size, length, where)
        crc = crc_continue(crc_continue(crc, raw), chunk)
        if on_chunk is not None:
            on_chunk(chunk, pos + CHUNK_LEN.size)
        pos += CHUNK_LEN.size + length
        chunks += 1
        payload += length
    tail = _exact(read, end, trailer.size, where)
    if trailer is TRAILER:
        tmagic, count, tpayload, newest, stored = TRAILER.unpack(tail)
        checkpoint = 0
    else:
        tmagic, count, tpayload, newest, checkpoint, stored = TRAILER_V2.unpack(tail)
    crc = crc_continue(crc, tail[:-4])
    if tmagic != TRAILER_MAGIC:
        raise FormatError(f"{where}: not a delta file (bad trailer magic)")
    if crc != stored:
        raise FormatError(f"{where}: delta checksum mismatch")
    if (count, tpayload) != (chunks, payload):
        raise FormatError(f"{where}: trailer says {count} chunks / {tpayload} bytes, "
                          f"file holds {chunks} / {payload}")
    if trailer is TRAILER_V2 and not checkpoint:
        raise FormatError(f"{where}: a version 2 delta names no checkpoint")
    return DeltaInfo(first, last, count, payload, newest, found_flags, checkpoint)


def decode_delta_file(buf: bytes, where: str = "delta", flags: int | None = None
                      ) -> tuple[DeltaInfo, list[bytes]]:
    """Verify a delta file held in memory; returns its info and chunks (FormatError)."""
    chunks: list[bytes] = []
    info = scan(lambda off, n: buf[off:off + n], len(buf), where, flags,
                on_chunk=lambda c, _off: chunks.append(c))
    return info, chunks


def _exact(read: ReadAt, offset: int, length: int, where: str) -> bytes:
    parts: list[bytes] = []
    while length > 0:
        b = read(offset, length)
        if not b:
            raise FormatError(f"{where}: delta file shrank while reading")
        parts.append(b)
        offset += len(b)
        length -= len(b)
    return parts[0] if len(parts) == 1 else b"".join(parts)


class DeltaReader:
    """A verified delta file, read back one chunk at a time.

    Opening verifies the whole file (`scan`), so nothing is handed out from
    a corrupt file; chunks are then read one by one, so memory stays bounded
    by the largest chunk. Raises FormatError for a corrupt file, OSError when
    it cannot be read.
    """

    def __init__(self, path: Path, io: FileIO = OS_IO, flags: int | None = None,
                 seqs: tuple[int, int] | None = None,
                 on_chunk: Callable[[bytes, int], None] | None = None) -> None:
        self.path = path
        self.io = io
        self._fd: int | None = io.open(path, os.O_RDONLY)
        try:
            size = os.fstat(self._fd).st_size
            self.info = scan(self._read, size, str(path), flags, seqs, on_chunk)
        except BaseException:
            self.close()
            raise

    def _read(self, offset: int, length: int) -> bytes:
        assert self._fd is not None
        return self.io.pread(self._fd, length, offset)

    def chunks(self) -> Iterator[bytes]:
        pos = HEADER_SIZE
        where = str(self.path)
        for _ in range(self.info.chunk_count):
            (length,) = CHUNK_LEN.unpack(_exact(self._read, pos, CHUNK_LEN.size, where))
            yield _exact(self._read, pos + CHUNK_LEN.size, length, where)
            pos += CHUNK_LEN.size + length

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            self.io.close(fd)

    def __enter__(self) -> DeltaReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
