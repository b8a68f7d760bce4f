"""Durable small-file primitives shared by the daemons' state files.

`write_file_atomic` is the one crash-safe "replace this file" sequence: write
a temporary file beside it, fsync it, rename it over the target, fsync the
directory. A crash at any step leaves either the old or the new content,
never a mix. Callers map OSError to their own error class and message.
"""

from __future__ import annotations

import os
from pathlib import Path

from cdp_common.fileio import OS_IO, FileIO, StrPath


def fsync_dir(path: StrPath, io: FileIO = OS_IO) -> None:
    """fsync a directory, so renames and unlinks in it are durable."""
    io.fsync_dir(path)


def pwrite_all(fd: int, data: bytes | memoryview, offset: int, io: FileIO = OS_IO) -> None:
    """pwrite until every byte is written (pwrite may write less than asked)."""
    io.pwrite(fd, data, offset)


def write_file_atomic(path: StrPath, data: bytes, mode: int = 0o600,
                      tmp: StrPath | None = None, io: FileIO = OS_IO) -> None:
    """Durably replace `path` with `data` (tmp + fsync + rename + directory fsync).

    `tmp` defaults to `<path>.tmp`. Raises OSError; the old content stays on failure.
    """
    target = Path(path)
    tmp_path = Path(tmp) if tmp is not None else target.with_name(target.name + ".tmp")
    fd = io.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        io.pwrite(fd, data, 0)
        io.fsync(fd)
    finally:
        io.close(fd)
    io.rename(tmp_path, target)
    io.fsync_dir(target.parent)


_ZERO_BLOCK = bytes(1 << 20)


def write_zeros(fd: int, offset: int, length: int, io: FileIO = OS_IO) -> None:
    """Write `length` zero bytes at `offset` (when a hole cannot be punched)."""
    end = offset + length
    while offset < end:
        n = min(len(_ZERO_BLOCK), end - offset)
        io.pwrite(fd, memoryview(_ZERO_BLOCK)[:n], offset)
        offset += n


def zero_range(fd: int, offset: int, length: int, io: FileIO = OS_IO) -> bool:
    """Make a range read as zeros: punch a hole, else write zeros.

    Returns True when a hole was punched: that changes the file's metadata,
    so the caller must fsync (not just fdatasync) to make it durable.
    """
    if io.punch_hole(fd, offset, length):
        return True
    write_zeros(fd, offset, length, io)
    return False


def pread_full(fd: int, length: int, offset: int, io: FileIO = OS_IO) -> bytes:
    """`length` bytes at `offset`; what lies beyond the end of the file reads as zeros."""
    parts = []
    while length > 0:
        b = io.pread(fd, length, offset)
        if not b:
            parts.append(bytes(length))  # beyond EOF of a sparse file: zeros
            break
        parts.append(b)
        length -= len(b)
        offset += len(b)
    return b"".join(parts)


def pread_upto(fd: int, limit: int | None = None, io: FileIO = OS_IO,
               chunk: int = 8 << 20) -> bytes:
    """The file's bytes from offset 0 up to `limit` (None: to the end), fewer if it
    is shorter; read in `chunk`-sized preads (one read: no extra copy)."""
    parts: list[bytes] = []
    got = 0
    while limit is None or got < limit:
        want = chunk if limit is None else min(limit - got, chunk)
        b = io.pread(fd, want, got)
        if not b:
            break
        parts.append(b)
        got += len(b)
    return parts[0] if len(parts) == 1 else b"".join(parts)
