"""Bare pyfuse3 passthrough of one image file: the baseline the filter is
measured against (same mount style, same loop, no journal).

    python bench/passthrough.py IMAGE MOUNTPOINT
exposes IMAGE as MOUNTPOINT/disk until SIGTERM.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import stat
import sys

import pyfuse3
import pyfuse3.asyncio
import uvloop

pyfuse3.asyncio.enable()
FILE_INODE = pyfuse3.ROOT_INODE + 1
NAME = b"disk"


class Passthrough(pyfuse3.Operations):
    def __init__(self, image: str) -> None:
        super().__init__()
        self.fd = os.open(image, os.O_RDWR)
        self.size = os.fstat(self.fd).st_size

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
        else:
            a.st_mode = stat.S_IFREG | 0o600
            a.st_nlink = 1
            a.st_size = self.size
        a.st_blksize = 4096
        a.attr_timeout = a.entry_timeout = 300
        return a

    async def getattr(self, inode, ctx=None):  # type: ignore[no-untyped-def]
        return self._attr(inode)

    async def lookup(self, parent_inode, name, ctx=None):  # type: ignore[no-untyped-def]
        if parent_inode == pyfuse3.ROOT_INODE and name == NAME:
            return self._attr(FILE_INODE)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def opendir(self, inode, ctx):  # type: ignore[no-untyped-def]
        return inode

    async def readdir(self, fh, start_id, token):  # type: ignore[no-untyped-def]
        if start_id == 0:
            pyfuse3.readdir_reply(token, NAME, self._attr(FILE_INODE), 1)

    async def open(self, inode, flags, ctx):  # type: ignore[no-untyped-def]
        return pyfuse3.FileInfo(fh=inode, direct_io=True)

    async def read(self, fh, off, size):  # type: ignore[no-untyped-def]
        return os.pread(self.fd, size, off)

    async def write(self, fh, off, buf):  # type: ignore[no-untyped-def]
        return os.pwrite(self.fd, buf, off)

    async def fsync(self, fh, datasync):  # type: ignore[no-untyped-def]
        os.fsync(self.fd)

    async def flush(self, fh):  # type: ignore[no-untyped-def]
        pass

    async def release(self, fh):  # type: ignore[no-untyped-def]
        pass


async def serve(image: str, mountpoint: str) -> None:
    ops = Passthrough(image)
    options = set(pyfuse3.default_options)
    options.add("fsname=cdp-bench")
    pyfuse3.init(ops, mountpoint, options)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, pyfuse3.terminate)
    try:
        await pyfuse3.main()
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    uvloop.run(serve(sys.argv[1], sys.argv[2]))
