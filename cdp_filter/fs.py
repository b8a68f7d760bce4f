"""The FUSE shim: one regular file per protected disk in a flat directory.

Theory of operation
-------------------
Each disk is `<mountpoint>/<name>`, a fixed-size file backed by a sparse image.
Files are opened with direct_io, so the kernel page cache is bypassed and every
application (or loop device) write reaches `write()` here, in order of arrival.

`write()` is the capture point (`PolicyRuntime.write`). It runs on the event
loop and does, without yielding in between: journal append (the record gets the
policy's next seq), then pwrite to the image. Because nothing else runs between
the two, the image always equals "base + journal records applied in seq order" (the journal is a
redo log for the image, replayed at startup), and concurrent writes get seqs in
the order they reach the image. The only awaits in the write path, the
back-pressure wait when the journal is over its cap and the fsync of a new
write-intent bit (cdp_filter.intent), come *before* the seq is taken.

flush/fsync make journal and image durable in worker threads. No handler ever
touches the mount itself (that would deadlock the loop serving it).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import subprocess
from collections.abc import Callable
from typing import Any

import pyfuse3

from cdp_common.clock import wall_ns
from cdp_common.errors import CdpError, StorageError
from cdp_filter.policy import Disk, WritesFrozenError

log = logging.getLogger("filter.fuse")

ROOT = pyfuse3.ROOT_INODE
FILE_MODE = 0o660
ATTR_TIMEOUT_S = 300.0


class FilterFs(pyfuse3.Operations):
    """pyfuse3 operations over the attached disks (inodes ROOT+1, ROOT+2, ... in the
    order attached; never reused while mounted).

    Disks come and go at run time (cdp_filter.diskset): `add` attaches a policy's
    disks, `hide` takes them out of the directory at once and calls `on_gone`
    for the policy once no open handle of its disks is left (until then writes
    through those handles still work)."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, disks: list[Disk]) -> None:
        super().__init__()
        self._by_inode: dict[int, Disk] = {}
        self._by_name: dict[bytes, Disk] = {}
        self._open: dict[int, int] = {}           # inode -> open handles
        self._hidden: dict[str, Callable[[], None]] = {}   # policy -> on_gone
        self._next_inode = ROOT + 1
        self._uid = os.getuid()
        self._gid = os.getgid()
        self._start_ns = wall_ns()
        # Each disk's PolicyRuntime; set by the daemon (disk.policy is a name).
        self.runtimes: dict[str, Any] = {}
        for d in disks:
            self._attach(d)

    def _attach(self, d: Disk) -> None:
        d.inode = self._next_inode
        self._next_inode += 1
        self._by_inode[d.inode] = d
        self._by_name[d.name.encode()] = d

    @property
    def _disks(self) -> list[Disk]:
        """The disks listed in the directory, in inode order."""
        return sorted(self._by_name.values(), key=lambda d: d.inode)

    def add(self, disks: list[Disk], runtime: Any) -> None:
        """Attach a policy's disks (names not in use: cdp_filter.diskset checked)."""
        for d in disks:
            self._attach(d)
        if disks:
            self.runtimes[disks[0].policy] = runtime

    def hide(self, policy: str, on_gone: Callable[[], None]) -> list[str]:
        """Take the policy's disks out of the directory; `on_gone()` once none is open.
        Returns the names hidden (for the kernel's dentry cache: `invalidate`)."""
        names = [n for n, d in self._by_name.items() if d.policy == policy]
        for n in names:
            del self._by_name[n]
        self._hidden[policy] = on_gone
        self._maybe_gone(policy)
        return [n.decode() for n in names]

    def _maybe_gone(self, policy: str) -> None:
        if policy not in self._hidden:
            return
        mine = [i for i, d in self._by_inode.items() if d.policy == policy]
        if any(self._open.get(i, 0) for i in mine):
            return
        for i in mine:
            del self._by_inode[i]
            self._open.pop(i, None)
        self.runtimes.pop(policy, None)
        self._hidden.pop(policy)()

    def open_handles(self, policy: str) -> int:
        return sum(n for i, n in self._open.items()
                   if i in self._by_inode and self._by_inode[i].policy == policy)

    # ------------------------------------------------------------ attributes

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.st_uid = self._uid
        a.st_gid = self._gid
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self._start_ns
        a.st_blksize = 4096
        a.attr_timeout = a.entry_timeout = ATTR_TIMEOUT_S
        if inode == ROOT:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
            return a
        d = self._by_inode.get(inode)
        if d is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        a.st_mode = stat.S_IFREG | FILE_MODE
        a.st_nlink = 1
        a.st_size = d.size
        a.st_blocks = d.size // 512
        return a

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: Any = None) -> pyfuse3.EntryAttributes:
        if parent_inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if name in (b".", b".."):
            return self._attr(ROOT)
        d = self._by_name.get(name)
        if d is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(d.inode)

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: Any) -> pyfuse3.EntryAttributes:
        current = self._attr(inode)
        if fields.update_size and attr.st_size != current.st_size:
            # A protected disk has a fixed size; growing or shrinking it would
            # not be replicated.
            raise pyfuse3.FUSEError(errno.EPERM)
        return current

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = sum(d.size for d in self._disks) // 4096
        s.f_bfree = s.f_bavail = 0
        s.f_files = len(self._disks) + 1
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # ------------------------------------------------------------ directory

    async def opendir(self, inode: int, ctx: Any) -> int:
        if inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        # The offset of an entry is its inode: stable while disks come and go.
        for d in self._disks:
            if d.inode <= start_id:
                continue
            if not pyfuse3.readdir_reply(token, d.name.encode(), self._attr(d.inode), d.inode):
                return

    async def releasedir(self, fh: int) -> None:
        return None

    # ------------------------------------------------------------ files

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        d = self._by_inode.get(inode)
        if d is None or d.policy in self._hidden:
            raise pyfuse3.FUSEError(errno.EISDIR if inode == ROOT else errno.ENOENT)
        if flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EPERM)
        self._open[inode] = self._open.get(inode, 0) + 1
        return pyfuse3.FileInfo(fh=inode, direct_io=True, keep_cache=False)

    def _disk(self, fh: int) -> Disk:
        d = self._by_inode.get(fh)
        if d is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return d

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        d = self._disk(fh)
        if off >= d.size:
            return b""
        try:
            return os.pread(d.fd, min(size, d.size - off), off)
        except OSError as exc:
            log.error("read of %s at %d failed: %s", d.name, off, exc.strerror,
                      extra={"disk": d.name})
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        d = self._disk(fh)
        n = len(buf)
        if off + n > d.size:
            if off >= d.size:
                raise pyfuse3.FUSEError(errno.ENOSPC)
            n = d.size - off
            buf = buf[:n]
        try:
            await self.runtimes[d.policy].write(d, off, buf)   # the capture (policy.py)
        except WritesFrozenError:
            raise pyfuse3.FUSEError(errno.EROFS) from None   # logged once, by set_frozen
        except CdpError as exc:
            log.error("write to %s at %d failed: %s", d.name, off, exc,
                      extra={"disk": d.name, "policy": d.policy})
            raise pyfuse3.FUSEError(errno.EIO) from None
        except OSError as exc:
            log.error("write to image of %s at %d failed: %s", d.name, off, exc.strerror,
                      extra={"disk": d.name, "policy": d.policy})
            raise pyfuse3.FUSEError(errno.EIO) from None
        return n

    async def _flush(self, fh: int) -> None:
        d = self._disk(fh)
        try:
            await self.runtimes[d.policy].flush(d)
        except (CdpError, OSError) as exc:
            log.error("flush of %s failed: %s", d.name, exc, extra={"disk": d.name})
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def flush(self, fh: int) -> None:
        await self._flush(fh)

    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._flush(fh)

    async def release(self, fh: int) -> None:
        left = self._open.get(fh, 0) - 1
        if left > 0:
            self._open[fh] = left
            return
        self._open.pop(fh, None)
        d = self._by_inode.get(fh)
        if d is not None:
            self._maybe_gone(d.policy)

    async def forget(self, inode_list: Any) -> None:
        return None


# ---------------------------------------------------------------- mounting

def _mount_entry(path: str) -> str | None:
    """File system type mounted exactly at `path`, or None."""
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    found = None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) > 4:
            mnt = fields[4].encode().decode("unicode_escape")
            if mnt == real:
                found = right.split()[0] if right else "?"
    return found


def prepare_mountpoint(path: str) -> None:
    """Create the mountpoint; lazily unmount a stale FUSE mount left by a killed filter."""
    stale = False
    try:
        os.stat(path)
    except FileNotFoundError:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"filter.mountpoint: cannot create {path}: "
                               f"{exc.strerror}") from None
    except OSError as exc:
        if exc.errno not in (errno.ENOTCONN, errno.EIO):
            raise StorageError(f"filter.mountpoint: {path}: {exc.strerror}") from None
        stale = True
    fstype = _mount_entry(path)
    if not stale and fstype is not None and fstype.startswith("fuse"):
        # Mounted and answering: is it ours from a previous life (dead
        # process but connection still up cannot happen) or a live filter?
        raise StorageError(f"filter.mountpoint: {path} is already mounted ({fstype}); "
                           "is another cdp-filter running?")
    if stale:
        log.warning("unmounting stale FUSE mount at %s", path)
        res = subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True, text=True,
                             check=False)
        if res.returncode != 0:
            with contextlib.suppress(OSError):
                subprocess.run(["umount", "-l", path], capture_output=True, check=False)
        try:
            os.stat(path)
        except OSError as exc:
            raise StorageError(f"filter.mountpoint: cannot clear stale mount at {path}: "
                               f"{res.stderr.strip() or exc.strerror}") from None
    if not os.path.isdir(path):
        raise StorageError(f"filter.mountpoint: {path} is not a directory")


def _allow_other_permitted() -> bool:
    if os.getuid() == 0:
        return True
    try:
        with open("/etc/fuse.conf", encoding="utf-8") as f:
            return any(line.strip() == "user_allow_other" for line in f)
    except OSError:
        return False


def mount_options() -> set[str]:
    # libfuse 3 negotiates max_write up to its buffer size (1 MiB with
    # FUSE_MAX_PAGES); there is no mount option for it any more.
    opts = set(pyfuse3.default_options)  # default_permissions
    opts.add("fsname=cdp")
    opts.add("subtype=cdp")
    if _allow_other_permitted():
        opts.add("allow_other")
    return opts
