"""Durable small-file primitives shared by the daemons' state files.

`write_file_atomic` is the one crash-safe "replace this file" sequence: write
a temporary file beside it, fsync it, rename it over the target, fsync the
directory. A crash at any step leaves either the old or the new content,
never a mix. Callers map OSError to their own error class and message.
"""

from __future__ import annotations

import os
from pathlib import Path

StrPath = str | os.PathLike[str]


def fsync_dir(path: StrPath) -> None:
    """fsync a directory, so renames and unlinks in it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """pwrite until every byte is written (pwrite may write less than asked)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def write_file_atomic(path: StrPath, data: bytes, mode: int = 0o600,
                      tmp: StrPath | None = None) -> None:
    """Durably replace `path` with `data` (tmp + fsync + rename + directory fsync).

    `tmp` defaults to `<path>.tmp`. Raises OSError; the old content stays on failure.
    """
    target = Path(path)
    tmp_path = Path(tmp) if tmp is not None else target.with_name(target.name + ".tmp")
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        pwrite_all(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp_path, target)
    fsync_dir(target.parent)
