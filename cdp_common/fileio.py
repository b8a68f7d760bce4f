"""The one I/O seam for durable files: journal, target store, undo store.

Theory of operation
-------------------
Every write, fsync, rename, truncate, hole punch and unlink of a file whose durability an
invariant depends on (I1-I3) goes through a `FileIO`. Production code uses
`OS_IO`, a thin pass-through to `os`. Tests wrap it (cdp_common/fileio_sim.py):

- `CrashingIO` stops the caller at a chosen *step* (every mutating call is one
  step, named `"<op> <file name>"`) by raising `SimulatedCrash`, a
  BaseException, so no `except Exception` in the code under test swallows it.
- `PowerLossIO` records what was made durable (file contents at their last
  fsync, directory entries at their parent's last fsync) and `power_cut()`
  puts the tree back to exactly that: every write that was not fsynced before
  the cut is dropped, per file, as after a power failure (the ALICE /
  CrashMonkey idea).

Contract of every implementation: the calls behave as their `os` namesakes
(same arguments, same OSError on failure) with two differences that remove
short-write handling from callers: `pwrite`/`pwritev` write every byte or
raise, and `fsync_dir` takes a directory path. Reads are in the seam too
(`pread`) so fault injection can shorten them.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from typing import Any, Protocol

StrPath = str | os.PathLike[str]
Buffer = bytes | bytearray | memoryview


class FileIO(Protocol):
    def open(self, path: StrPath, flags: int, mode: int = 0o600) -> int:
        """os.open; `mode` applies when O_CREAT creates the file."""

    def close(self, fd: int) -> None:
        """os.close."""

    def pread(self, fd: int, length: int, offset: int) -> bytes:
        """os.pread (may return fewer bytes at end of file)."""

    def pwrite(self, fd: int, data: Buffer, offset: int) -> None:
        """Write all of `data` at `offset`, or raise OSError."""

    def pwritev(self, fd: int, buffers: Sequence[Buffer], offset: int) -> None:
        """Write all `buffers` back to back at `offset`, or raise OSError."""

    def ftruncate(self, fd: int, length: int) -> None:
        """os.ftruncate."""

    def punch_hole(self, fd: int, offset: int, length: int) -> bool:
        """Deallocate a range (reads as zeros, size kept); False when the file
        system cannot, in which case nothing changed."""

    def allocate(self, fd: int, offset: int, length: int) -> None:
        """os.posix_fallocate: reserve the range (grows the file, zeros), or ENOSPC now."""

    def fsync(self, fd: int) -> None:
        """os.fsync: the file's data and metadata are durable on return."""

    def fdatasync(self, fd: int) -> None:
        """os.fdatasync: the file's data (and its size) are durable on return."""

    def fsync_dir(self, path: StrPath) -> None:
        """fsync a directory: creations, renames and unlinks in it are durable."""

    def rename(self, src: StrPath, dst: StrPath) -> None:
        """os.replace (atomic; replaces `dst`)."""

    def unlink(self, path: StrPath) -> None:
        """os.unlink."""

    def makedirs(self, path: StrPath, mode: int = 0o700) -> None:
        """os.makedirs(exist_ok=True)."""


class OsFileIO:
    """The real thing: straight to `os`."""

    def open(self, path: StrPath, flags: int, mode: int = 0o600) -> int:
        return os.open(path, flags | os.O_CLOEXEC, mode)

    def close(self, fd: int) -> None:
        os.close(fd)

    def pread(self, fd: int, length: int, offset: int) -> bytes:
        return os.pread(fd, length, offset)

    def pwrite(self, fd: int, data: Buffer, offset: int) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = os.pwrite(fd, view, offset)
            view = view[n:]
            offset += n

    def pwritev(self, fd: int, buffers: Sequence[Buffer], offset: int) -> None:
        total = sum(memoryview(b).nbytes for b in buffers)
        n = os.pwritev(fd, buffers, offset)
        if n < total:  # rare (a signal, a nearly full disk): write the rest in one go
            rest = memoryview(b"".join(buffers))[n:]
            self.pwrite(fd, rest, offset + n)

    def ftruncate(self, fd: int, length: int) -> None:
        os.ftruncate(fd, length)

    def punch_hole(self, fd: int, offset: int, length: int) -> bool:
        return _punch_hole(fd, offset, length)

    def allocate(self, fd: int, offset: int, length: int) -> None:
        os.posix_fallocate(fd, offset, length)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def fsync_dir(self, path: StrPath) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def rename(self, src: StrPath, dst: StrPath) -> None:
        os.replace(src, dst)

    def unlink(self, path: StrPath) -> None:
        os.unlink(path)

    def makedirs(self, path: StrPath, mode: int = 0o700) -> None:
        os.makedirs(path, mode=mode, exist_ok=True)


FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_libc: Any = None


def _punch_hole(fd: int, offset: int, length: int) -> bool:
    """fallocate(PUNCH_HOLE|KEEP_SIZE) through libc (os has no fallocate with a mode)."""
    global _libc
    import ctypes  # here: most processes never punch a hole
    import ctypes.util
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int,
                                        ctypes.c_longlong, ctypes.c_longlong]
        except (OSError, AttributeError):
            _libc = False
    if _libc is False:
        return False
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


OS_IO: FileIO = OsFileIO()
"""The production FileIO; components take `io: FileIO = OS_IO`."""
