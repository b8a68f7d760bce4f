"""Crash and power-loss simulation over the FileIO seam (cdp_common/fileio.py).

`SimIO` wraps a real `FileIO` over real files under one or more root
directories and does two things, both driven by tests:

Crash points. Every mutating call (open with O_CREAT/O_TRUNC, pwrite,
pwritev, ftruncate, punch_hole, fsync, fdatasync, fsync_dir, rename, unlink)
is a *step*, named `"<op> <file name>"` and appended to `steps`. With
`crash_at = N` the N-th step (0-based) raises `SimulatedCrash` *instead of*
happening; so does every later call, as if the process were gone. A test
first runs a workload with no crash to learn its steps, then once per step
with `crash_at` set to it.

Power loss. The durable state of the tree is modelled the way POSIX promises
it (and ALICE checks it), per file and per directory:
- a file's content is durable as of its last fsync/fdatasync through the seam
  (files that existed when the simulation started are durable as they were);
- a directory's entries (creations, renames, unlinks) are durable as of the
  last `fsync_dir` of that directory, except that an fsync of a newly created
  file also makes its own entry durable (ext4 and xfs commit the creation with
  the file; POSIX leaves it open, Linux file systems in use do it).
`power_cut()` closes every descriptor opened through the seam and rewrites the
tree under the roots to that durable state: un-fsynced writes vanish, files
whose entry was never made durable disappear, renames not followed by a
directory fsync are undone. Directories themselves are assumed to survive.

Files written outside the seam are invisible to the model, so a power cut
rewrites them to what the seam last saw: a test that loses data there has
found a durable write that bypasses the seam.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cdp_common.fileio import OS_IO, Buffer, FileIO, StrPath


class SimulatedCrash(BaseException):
    """The process 'died' at a crash point (BaseException: nothing may catch it)."""


@dataclass
class _Inode:
    durable: bytes | None = None  # None: created through the seam, never fsynced


@dataclass
class SimIO:
    roots: Sequence[StrPath]
    inner: FileIO = OS_IO
    crash_at: int | None = None
    steps: list[str] = field(default_factory=list)
    crashed: bool = False
    # Files are known by an id of our own, not by st_ino: the file system
    # reuses the inode number of an unlinked file for the next one created,
    # while a directory entry not yet made durable still names the old file.
    _inodes: dict[int, _Inode] = field(default_factory=dict)   # file id -> durable state
    _dirs: dict[str, dict[str, int]] = field(default_factory=dict)  # dir -> name -> file id
    _fds: dict[int, str] = field(default_factory=dict)
    _ids: dict[int, int] = field(default_factory=dict)  # st_ino -> id of the file living there
    _last_id: int = 0

    def __post_init__(self) -> None:
        self._roots = [os.path.abspath(r) for r in self.roots]
        for root in self._roots:
            os.makedirs(root, exist_ok=True)
            self._snapshot(root)

    # ------------------------------------------------------------ model

    def _snapshot(self, root: str) -> None:
        """Everything under `root` as it is now counts as durable."""
        for dirpath, _dirs, files in os.walk(root):
            entries: dict[str, int] = {}
            for name in files:
                path = os.path.join(dirpath, name)
                fid = self._id_of(os.lstat(path).st_ino)
                entries[name] = fid
                self._inodes[fid] = _Inode(Path(path).read_bytes())
            self._dirs[os.path.abspath(dirpath)] = entries

    def _id_of(self, ino: int) -> int:
        """The id of the file now at inode `ino` (a new one for a file not seen yet)."""
        fid = self._ids.get(ino)
        if fid is None:
            self._last_id += 1
            fid = self._ids[ino] = self._last_id
            self._inodes[fid] = _Inode()
        return fid

    def _new_file(self, ino: int) -> None:
        """`ino` now holds a file just created: a new file, whatever lived there before."""
        self._ids.pop(ino, None)
        self._id_of(ino)

    def _inside(self, path: str) -> bool:
        return any(path == r or path.startswith(r + os.sep) for r in self._roots)

    def _step(self, op: str, path: StrPath) -> None:
        name = f"{op} {os.path.basename(os.fspath(path))}"
        if self.crashed:
            raise SimulatedCrash(f"after the crash: {name}")
        if self.crash_at is not None and len(self.steps) == self.crash_at:
            self.crashed = True
            self.steps.append(name)
            raise SimulatedCrash(f"crash point {self.crash_at}: {name}")
        self.steps.append(name)

    def _read_all(self, fd: int) -> bytes:
        # through /proc: `fd` itself may be write-only
        return Path(f"/proc/self/fd/{fd}").read_bytes()

    def _entry_durable(self, path: str, fid: int) -> None:
        parent = self._dirs.setdefault(os.path.dirname(path), {})
        parent[os.path.basename(path)] = fid

    # ------------------------------------------------------------ FileIO

    def open(self, path: StrPath, flags: int, mode: int = 0o600) -> int:
        apath = os.path.abspath(path)
        if flags & (os.O_CREAT | os.O_TRUNC):
            self._step("open", apath)
        existed = os.path.lexists(apath)
        fd = self.inner.open(apath, flags, mode)
        self._fds[fd] = apath
        if self._inside(apath):
            ino = os.fstat(fd).st_ino
            if existed:
                self._id_of(ino)
            else:
                self._new_file(ino)
        return fd

    def close(self, fd: int) -> None:
        self._fds.pop(fd, None)
        self.inner.close(fd)

    def pread(self, fd: int, length: int, offset: int) -> bytes:
        if self.crashed:
            raise SimulatedCrash("after the crash: pread")
        return self.inner.pread(fd, length, offset)

    def pwrite(self, fd: int, data: Buffer, offset: int) -> None:
        self._step("pwrite", self._fds.get(fd, "?"))
        self.inner.pwrite(fd, data, offset)

    def pwritev(self, fd: int, buffers: Sequence[Buffer], offset: int) -> None:
        self._step("pwritev", self._fds.get(fd, "?"))
        self.inner.pwritev(fd, buffers, offset)

    def ftruncate(self, fd: int, length: int) -> None:
        self._step("ftruncate", self._fds.get(fd, "?"))
        self.inner.ftruncate(fd, length)

    def punch_hole(self, fd: int, offset: int, length: int) -> bool:
        self._step("punch_hole", self._fds.get(fd, "?"))
        return self.inner.punch_hole(fd, offset, length)

    def allocate(self, fd: int, offset: int, length: int) -> None:
        self._step("allocate", self._fds.get(fd, "?"))
        self.inner.allocate(fd, offset, length)

    def _sync(self, op: str, fd: int) -> None:
        path = self._fds.get(fd, "?")
        self._step(op, path)
        if op == "fsync":
            self.inner.fsync(fd)
        else:
            self.inner.fdatasync(fd)
        if path != "?" and self._inside(path):
            fid = self._id_of(os.fstat(fd).st_ino)
            node = self._inodes[fid]
            if node.durable is None and os.path.exists(path):
                self._entry_durable(path, fid)  # a new file's fsync commits its entry
            node.durable = self._read_all(fd)

    def fsync(self, fd: int) -> None:
        self._sync("fsync", fd)

    def fdatasync(self, fd: int) -> None:
        self._sync("fdatasync", fd)

    def fsync_dir(self, path: StrPath) -> None:
        apath = os.path.abspath(path)
        self._step("fsync_dir", apath)
        self.inner.fsync_dir(apath)
        if not self._inside(apath):
            return
        entries: dict[str, int] = {}
        for entry in os.scandir(apath):
            if entry.is_file(follow_symlinks=False):
                entries[entry.name] = self._id_of(entry.inode())
        self._dirs[apath] = entries

    def rename(self, src: StrPath, dst: StrPath) -> None:
        self._step("rename", dst)
        self.inner.rename(src, dst)

    def unlink(self, path: StrPath) -> None:
        self._step("unlink", path)
        self.inner.unlink(path)

    def makedirs(self, path: StrPath, mode: int = 0o700) -> None:
        if self.crashed:
            raise SimulatedCrash("after the crash: makedirs")
        self.inner.makedirs(path, mode)

    # ------------------------------------------------------------ the cut

    def close_all(self) -> None:
        """Close what the 'dead' process left open (its kernel would)."""
        for fd in list(self._fds):
            self._fds.pop(fd)
            with contextlib.suppress(OSError):
                os.close(fd)

    def power_cut(self) -> list[str]:
        """Rewrite the tree to its durable state; returns what changed, for messages."""
        self.close_all()
        changed: list[str] = []
        contents = {}
        for dirpath, entries in self._dirs.items():
            for name, fid in entries.items():
                node = self._inodes.get(fid)
                contents[os.path.join(dirpath, name)] = (
                    node.durable if node is not None and node.durable is not None else b"")
        for root in self._roots:
            for dirpath, _dirs, files in os.walk(root):
                for name in files:
                    path = os.path.join(os.path.abspath(dirpath), name)
                    if path not in contents:
                        os.unlink(path)
                        changed.append(f"lost {path}")
        for path, data in contents.items():
            try:
                now = Path(path).read_bytes()
            except FileNotFoundError:
                now = None
            if now != data:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                Path(path).write_bytes(data)
                changed.append(f"{'rolled back' if now is not None else 'restored'} {path}")
        # the rewritten tree is the new durable baseline
        self._inodes.clear()
        self._dirs.clear()
        self._ids.clear()
        for root in self._roots:
            self._snapshot(root)
        self.crashed = False
        self.crash_at = None
        return changed


def steps_of(run: Iterable[str]) -> list[str]:
    """A readable numbered list of steps, for assertion messages."""
    return [f"{i}: {s}" for i, s in enumerate(run)]


def kill(io: SimIO) -> None:
    """The process using `io` dies now (kill -9): every later call through `io`
    raises SimulatedCrash and its descriptors are closed, as its kernel would;
    what it wrote stays (the page cache has it; `power_cut` is the other fault)."""
    io.crashed = True
    io.close_all()
