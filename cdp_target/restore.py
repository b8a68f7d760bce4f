"""Restore and failover on the target host: images of a restore point, on disk.

Theory of operation
-------------------
`restore_images` writes each disk's image at a point as a sparse file:

1. under `PolicyStore.paused()` (apply and retention hold still; receiving
   and acking deltas goes on), the undo segments above the point are read
   once, sequentially, and verified (CRC, framing, bounds), and resolved
   into one final map per disk (`UndoStore.resolve`, `undo.resolve`): for
   each byte the earliest later segment that holds it, else the replica;
2. each ``<out>/<disk>.img.partial`` is made from the replica: a reflink
   (FICLONE) when the file system has it, else a sparse file into which only
   the replica's data regions (SEEK_DATA/SEEK_HOLE) that the map does *not*
   cover are copied with `os.copy_file_range` (pread/pwrite across file
   systems that refuse it). Zero pieces stay holes (punched after a reflink);
3. the map's data pieces are written, segment by segment in file order,
   read in spans of up to READ_BLOCK bytes; so every byte of the image is
   written once, whatever the number of points behind it;
4. one fsync per image, then each ``.partial`` is linked as
   ``<disk>.img`` (a link never replaces a file), unlinked, and the directory
   fsynced. A crash or a corrupt segment leaves only ``.partial`` files
   (deleted), never a wrong ``.img``.

Files: a restore for an operator writes only under the target's
``restore_dir`` (realpath prefix check, repeated on the directory actually
opened); every file is made relative to that directory's fd with
``O_CREAT | O_EXCL | O_NOFOLLOW``, mode 0600, so a planted symlink is never
followed and an existing image never overwritten.

Failover (`Failover`) is a restore into ``<policy>/failover/`` plus a
persisted state file ``<policy>/failover.json`` (cdp_common.statefile):

    {"kind": "target-failover", "version": 1, "state": "active" | "committing" | "committed",
     "point_id", "last_seq", "time_ns", "disks": {"<name>": "<path>"},
     "checkpoint_id" (only when the point ends at a consistency-group checkpoint)}

- ``active``: Apply streams of the policy are refused (FAILED_PRECONDITION
  "policy X is failed over"); the images are writable. `undo` deletes the
  images, then the state file: replication resumes from durable_seq.
- `commit` persists ``committing``, renames each failover image over its
  replica (atomic per disk; redone on open if interrupted), resets the
  catalog (the old points describe the old replica), then persists
  ``committed``: the policy stays stopped, the replicas are production.

Every step is idempotent, so `recover_failover` at open finishes or undoes
whatever a crash interrupted: a failover directory without a state file is
deleted; ``committing`` is completed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdp_common import statefile
from cdp_common.errors import CdpError, FormatError, StorageError
from cdp_common.fsutil import fsync_dir, pwrite_all, zero_range
from cdp_target import undo
from cdp_target.points import Point
from cdp_target.store import PolicyStore
from cdp_target.undostore import READ_BLOCK

log = logging.getLogger("target.restore")

FICLONE = 0x40049409
FAILOVER_DIR = "failover"
FAILOVER_FILE = "failover.json"
FAILOVER_KIND = "target-failover"
FAILOVER_VERSION = 1
COPY_STEP = 64 << 20
SPAN_GAP = 256 << 10
"""Pieces of one segment this close in its file are read with one pread."""

Progress = Callable[[str, int, int], None]
"""progress(phase, bytes_done, bytes_total)."""


class PointNotFound(CdpError, grpc_status="NOT_FOUND"):
    """No restore point matches the request."""


class FailoverStateError(CdpError, grpc_status="FAILED_PRECONDITION"):
    """The request contradicts the policy's failover state."""


class InconsistentPointError(CdpError, grpc_status="FAILED_PRECONDITION"):
    """The chosen point lies in a gap and the caller did not allow that."""


# ---------------------------------------------------------------- copying

def _data_regions(fd: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of the data regions of a sparse file."""
    out = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            return [(0, size)]  # no SEEK_DATA: copy everything
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, min(end, size) - start))
        pos = end
    return out


def copy_range(src_fd: int, dst_fd: int, offset: int, length: int,
               progress: Callable[[int], None] | None = None) -> None:
    """Copy [offset, offset + length) between two files at the same offset.

    copy_file_range first (in-kernel); pread/pwrite where the kernel or the
    pair of file systems refuses it (EXDEV, EINVAL, EOPNOTSUPP, ENOSYS).
    """
    end = offset + length
    pos = offset
    kernel = True
    while pos < end:
        n = min(COPY_STEP, end - pos)
        if kernel:
            try:
                got = os.copy_file_range(src_fd, dst_fd, n, pos, pos)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP,
                                     errno.ENOSYS):
                    raise
                kernel = False
                continue
        else:
            data = os.pread(src_fd, min(n, READ_BLOCK), pos)
            pwrite_all(dst_fd, data, pos)
            got = len(data)
        if got <= 0:
            raise StorageError(f"copy stopped at byte {pos} of {end}: source too short")
        pos += got
        if progress is not None:
            progress(got)



def _pread_exact(fd: int, length: int, offset: int, what: Path) -> bytes:
    parts = []
    while length > 0:
        b = os.pread(fd, length, offset)
        if not b:
            raise FormatError(f"{what}: ends before byte {offset + length}")
        parts.append(b)
        length -= len(b)
        offset += len(b)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def write_pieces(seg_path: Path, items: list[tuple[int, int, int, int]], fds: dict[int, int],
                 progress: Callable[[int], None] | None = None) -> None:
    """Write data pieces of one segment file: items are (src, length, disk_id, offset).

    Sorted by src and read in spans (neighbours closer than SPAN_GAP, at most
    READ_BLOCK bytes), so the file is read sequentially in large blocks.
    """
    items.sort()
    fd = os.open(seg_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with contextlib.suppress(OSError, AttributeError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        i, n = 0, len(items)
        while i < n:
            start = items[i][0]
            stop = start + items[i][1]
            j = i + 1
            while j < n:
                src, length = items[j][0], items[j][1]
                if src - stop > SPAN_GAP or src + length - start > READ_BLOCK:
                    break
                stop = max(stop, src + length)
                j += 1
            view = memoryview(_pread_exact(fd, stop - start, start, seg_path))
            for src, length, disk_id, offset in items[i:j]:
                pwrite_all(fds[disk_id], view[src - start:src - start + length], offset)
            if progress is not None:
                progress(sum(it[1] for it in items[i:j]))
            i = j
    finally:
        os.close(fd)


def write_point(store: PolicyStore, point: Point, partial: dict[int, str],
                progress: Progress | None = None, *, dir_fd: int) -> tuple[str, int]:
    """Write the images at `point` into new files `partial[disk_id]` (names in the
    directory `dir_fd`, made by `create_image`), fsynced.

    Steps 1-4 of the module docstring; the caller holds `store.paused()`.
    Returns the copy method ('reflink' or 'sparse') and the bytes written.
    """
    sizes = store.disk_sizes
    chain, pieces = store.undo.resolve(point, sizes)
    fds: dict[int, int] = {}
    srcs: dict[int, int] = {}
    method = "sparse"
    try:
        copies: dict[int, list[tuple[int, int]]] = {}
        for disk_id in sorted(partial):
            srcs[disk_id] = os.open(store.replica_path(disk_id), os.O_RDONLY | os.O_CLOEXEC)
            fds[disk_id] = create_image(partial[disk_id], dir_fd)
            size = sizes[disk_id]
            try:
                fcntl.ioctl(fds[disk_id], FICLONE, srcs[disk_id])
                method = "reflink"
                copies[disk_id] = []
                os.ftruncate(fds[disk_id], size)
                for p in pieces.get(disk_id, []):
                    if p.src < 0:
                        zero_range(fds[disk_id], p.offset, p.length)
            except OSError:
                os.ftruncate(fds[disk_id], size)
                have = _data_regions(srcs[disk_id], min(size, os.fstat(srcs[disk_id]).st_size))
                copies[disk_id] = undo.intersect(undo.gaps(pieces.get(disk_id, []), size), have)
        by_seg: dict[int, list[tuple[int, int, int, int]]] = {}
        for disk_id, ps in pieces.items():
            for p in ps:
                if p.src < 0:
                    continue
                items = by_seg.setdefault(p.seg, [])
                for k in range(0, p.length, READ_BLOCK):
                    items.append((p.src + k, min(READ_BLOCK, p.length - k), disk_id,
                                  p.offset + k))
        total = (sum(n for c in copies.values() for _, n in c)
                 + sum(it[1] for items in by_seg.values() for it in items))
        done = 0

        def step(phase: str) -> Callable[[int], None]:
            def inner(n: int) -> None:
                nonlocal done
                done += n
                if progress is not None:
                    progress(phase, done, total)
            return inner
        copy_step = step("copy")
        for disk_id, ranges in sorted(copies.items()):
            with contextlib.suppress(OSError, AttributeError):
                os.posix_fadvise(srcs[disk_id], 0, 0, os.POSIX_FADV_SEQUENTIAL)
            for off, length in ranges:
                copy_range(srcs[disk_id], fds[disk_id], off, length, copy_step)
        undo_step = step("undo")
        for seg in sorted(by_seg):
            write_pieces(store.undo.seg_path(chain[seg]), by_seg[seg], fds, undo_step)
        for fd in fds.values():
            os.fsync(fd)
        return method, total
    finally:
        for fd in [*fds.values(), *srcs.values()]:
            with contextlib.suppress(OSError):
                os.close(fd)


# ---------------------------------------------------------------- choosing a point

def pick_point(store: PolicyStore, point_id: int = 0, time_ns: int = 0,
               latest: bool = False) -> Point:
    cat = store.undo.catalog
    if latest or (not point_id and not time_ns):
        p = cat.newest
        if p is None:
            raise PointNotFound(f"policy {store.dir.name} has no restore point yet")
        return p
    if point_id:
        p = cat.point(point_id)
        if p is None:
            raise PointNotFound(f"policy {store.dir.name} has no restore point {point_id}; "
                                f"`cdpctl restore-points {store.dir.name}` lists them")
        return p
    p = cat.at_or_before(time_ns)
    if p is None:
        raise PointNotFound(f"policy {store.dir.name} has no restore point at or before the "
                            f"requested time (the oldest is at "
                            f"{cat.points[0].time_ns if cat.points else 'none'} ns)")
    return p


# ---------------------------------------------------------------- restore

@dataclass(frozen=True)
class Restored:
    point: Point
    images: dict[str, Path]     # disk name -> image path
    method: str


def inside(path: Path, root: Path) -> bool:
    """True when `path`, symlinks resolved, is `root` or below it (realpath prefix)."""
    real, top = os.path.realpath(path), os.path.realpath(root)
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)


def restore_images(store: PolicyStore, select: Callable[[], Point], out_dir: Path,
                   progress: Progress | None = None, root: Path | None = None) -> Restored:
    """Write every disk's image at the selected point into out_dir (see module docstring).

    `root`: out_dir must be inside it (the target's restore_dir), checked on the
    directory actually opened. Every file is made relative to that directory's
    fd with O_EXCL | O_NOFOLLOW, mode 0600: a planted symlink is never followed
    (a leftover ``.partial``, link or not, is unlinked and made anew) and an
    existing image is never replaced."""
    if not out_dir.is_absolute():
        raise FormatError(f"{out_dir}: the output directory must be an absolute path")
    if root is not None and not inside(out_dir, root):
        raise FormatError(f"{out_dir} is outside the target's restore_dir ({root}); "
                          f"restore into a directory under it")
    try:
        out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        dfd = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise StorageError(f"{out_dir}: cannot create ({exc.strerror or exc})") from None
    try:
        if root is not None and not inside(Path(f"/proc/self/fd/{dfd}"), root):
            raise FormatError(f"{out_dir} is outside the target's restore_dir ({root})")
        return _restore_into(store, select, out_dir, dfd, progress)
    finally:
        os.close(dfd)


def _restore_into(store: PolicyStore, select: Callable[[], Point], out_dir: Path, dfd: int,
                  progress: Progress | None) -> Restored:
    disks = store.state.disks
    names = {d.name: f"{d.name}.img" for d in disks.values()}
    for name in names.values():
        if _lexists(name, dfd):
            raise StorageError(f"{out_dir / name} exists; restore into an empty directory")
    partial = {disk: f"{name}.partial" for disk, name in names.items()}
    try:
        with store.paused():
            point = select()
            method, total = write_point(store, point,
                                        {i: partial[d.name] for i, d in disks.items()},
                                        progress, dir_fd=dfd)
        for disk, name in names.items():
            os.link(partial[disk], name, src_dir_fd=dfd, dst_dir_fd=dfd,
                    follow_symlinks=False)   # never replaces: EEXIST if one appeared
        os.fsync(dfd)
        if progress is not None:
            progress("done", total, total)
    except OSError as exc:
        raise StorageError(f"restore into {out_dir}: {exc.strerror or exc}") from None
    finally:
        for p in partial.values():
            with contextlib.suppress(OSError):
                os.unlink(p, dir_fd=dfd)
    log.info("restored point %d into %s (%s copy)", point.id, out_dir, method,
             extra={"policy": store.dir.name, "seq": point.last_seq})
    return Restored(point, {d: out_dir / n for d, n in names.items()}, method)


def _lexists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def create_image(name: str, dir_fd: int) -> int:
    """A new image file `name` in `dir_fd`, 0600, never through a symlink: a leftover
    of that name (a crashed restore's, or a planted link) is unlinked first."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)
    return os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                   0o600, dir_fd=dir_fd)


# ---------------------------------------------------------------- failover

class Failover:
    """The failover state of one policy (see the module docstring)."""

    def __init__(self, store: PolicyStore) -> None:
        self.store = store
        self.dir = store.dir / FAILOVER_DIR
        self.file = store.dir / FAILOVER_FILE
        self.doc: dict[str, Any] | None = None

    @property
    def state(self) -> str:
        return str(self.doc["state"]) if self.doc else ""

    def refusal(self) -> str:
        name = self.store.dir.name
        if self.state == "active":
            return f"policy {name} is failed over (point {self.doc['point_id']})"  # type: ignore[index]
        if self.state in ("committing", "committed"):
            return (f"policy {name} is frozen: failover committed, production moved to "
                    f"DR; replication is stopped")
        return ""

    def recover(self) -> None:
        try:
            if self.file.exists():
                self.doc = statefile.load(self.file, FAILOVER_KIND, FAILOVER_VERSION)
                if self.state == "committing":
                    self._commit_steps()
                if self.state in ("committing", "committed"):
                    self.store.frozen = True
            elif self.dir.exists():
                shutil.rmtree(self.dir)  # a failover that never got its state file
                fsync_dir(self.store.dir)
        except OSError as exc:
            raise StorageError(f"{self.file}: {exc.strerror or exc}") from None

    def start(self, select: Callable[[], Point], progress: Progress | None = None) -> Restored:
        if self.state:
            raise FailoverStateError(f"policy {self.store.dir.name} is already failed over "
                                     f"({self.state}); `cdpctl failover undo` first")
        if self.dir.exists():
            shutil.rmtree(self.dir)
        restored = restore_images(self.store, select, self.dir, progress)
        doc: dict[str, Any] = {
            "version": 1, "state": "active", "point_id": restored.point.id,
            "last_seq": restored.point.last_seq, "time_ns": restored.point.time_ns,
            "disks": {n: str(p) for n, p in restored.images.items()}}
        if restored.point.checkpoint_id:   # a group member's: the group's state needs it
            doc["checkpoint_id"] = restored.point.checkpoint_id
        statefile.save(self.file, FAILOVER_KIND, FAILOVER_VERSION, doc)
        self.doc = doc
        return restored

    def undo(self) -> dict[str, Any]:
        if self.state != "active":
            raise FailoverStateError(self._not_active("undo"))
        doc = dict(self.doc or {})
        try:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.file.unlink()
            fsync_dir(self.store.dir)
        except OSError as exc:
            raise StorageError(f"{self.file}: {exc.strerror or exc}") from None
        self.doc = None
        return doc

    def commit(self) -> dict[str, Any]:
        if self.state != "active":
            raise FailoverStateError(self._not_active("commit"))
        assert self.doc is not None
        self.doc = {**self.doc, "state": "committing"}
        statefile.save(self.file, FAILOVER_KIND, FAILOVER_VERSION, self.doc)
        self.store.frozen = True
        self._commit_steps()
        return dict(self.doc)

    def _commit_steps(self) -> None:
        assert self.doc is not None
        st = self.store
        with st.paused():
            for disk_id in st.state.disks:
                src = self.dir / f"{st.state.disks[disk_id].name}.img"
                if src.exists():
                    os.rename(src, st.replica_path(disk_id))
            fsync_dir(st.replicas_dir)
            st.reopen_replicas()
            st.undo.reset(st.state.applied_seq, int(self.doc.get("time_ns", 0)))
        self.doc = {**self.doc, "state": "committed"}
        statefile.save(self.file, FAILOVER_KIND, FAILOVER_VERSION, self.doc)

    def _not_active(self, what: str) -> str:
        if not self.state:
            return f"policy {self.store.dir.name} is not failed over; nothing to {what}"
        return f"policy {self.store.dir.name}: failover is {self.state}; cannot {what} it"
