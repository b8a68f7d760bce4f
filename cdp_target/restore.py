"""Restore and failover on the target host: images of a restore point, on disk.

Theory of operation
-------------------
`restore_images` writes each disk's image at a point as a sparse file:

1. under `PolicyStore.paused()` (apply and retention hold still; receiving
   and acking deltas goes on), each replica is copied to
   ``<out>/<disk>.img.partial``: a reflink (FICLONE) when the file system
   has it, else a sparse copy that visits only the data regions
   (SEEK_DATA/SEEK_HOLE) with `os.copy_file_range`;
2. the undo segments above the point are replayed over the copies, newest
   first (`UndoStore.replay`), the copies fsynced;
3. each ``.partial`` is renamed to ``<disk>.img`` and the directory fsynced.
   A crash leaves only ``.partial`` files, never a wrong ``.img``.

Failover (`Failover`) is a restore into ``<policy>/failover/`` plus a
persisted state file ``<policy>/failover.json``:

    {"version": 1, "state": "active" | "committing" | "committed",
     "point_id", "last_seq", "time_ns", "disks": {"<name>": "<path>"}}

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
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdp_common.errors import CdpError, FormatError, StorageError
from cdp_target.points import Point
from cdp_target.store import PolicyStore, fsync_dir
from cdp_target.undostore import write_json_atomic

log = logging.getLogger("target.restore")

FICLONE = 0x40049409
FAILOVER_DIR = "failover"
FAILOVER_FILE = "failover.json"
COPY_STEP = 64 << 20

Progress = Callable[[str, int, int], None]
"""progress(phase, bytes_done, bytes_total)."""


class PointNotFound(CdpError):
    """No restore point matches the request."""

    exit_code = 2


class FailoverStateError(CdpError):
    """The request contradicts the policy's failover state."""

    exit_code = 2


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


def copy_sparse(src: Path, dst: Path, progress: Callable[[int], None] | None = None) -> str:
    """Copy src to a new file dst keeping holes; returns the method ('reflink' or 'sparse')."""
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        size = os.fstat(fi.fileno()).st_size
        try:
            fcntl.ioctl(fo.fileno(), FICLONE, fi.fileno())
            if progress is not None:
                progress(size)
            return "reflink"
        except OSError:
            pass
        fo.truncate(size)
        for off, length in _data_regions(fi.fileno(), size):
            done = 0
            while done < length:
                n = os.copy_file_range(fi.fileno(), fo.fileno(), min(COPY_STEP, length - done),
                                       off + done, off + done)
                if n <= 0:
                    raise StorageError(f"{src}: copy stopped at byte {off + done}")
                done += n
                if progress is not None:
                    progress(n)
        return "sparse"


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


def restore_images(store: PolicyStore, select: Callable[[], Point], out_dir: Path,
                   progress: Progress | None = None) -> Restored:
    """Write every disk's image at the selected point into out_dir (see module docstring)."""
    if not out_dir.is_absolute():
        raise FormatError(f"{out_dir}: the output directory must be an absolute path")
    disks = store.state.disks
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"{out_dir}: cannot create ({exc.strerror or exc})") from None
    targets = {d.name: out_dir / f"{d.name}.img" for d in disks.values()}
    exists = [str(p) for p in targets.values() if p.exists()]
    if exists:
        raise StorageError(f"{exists[0]} exists; restore into an empty directory")
    partial = {name: p.with_name(p.name + ".partial") for name, p in targets.items()}
    method = "sparse"
    fds: dict[int, int] = {}
    try:
        with store.paused():
            point = select()
            segs = store.undo.catalog.segments_above(point)
            total = sum(store.replica_path(i).stat().st_blocks * 512 for i in disks)
            total += sum(s.size_bytes for s in segs)
            done = 0

            def step(phase: str) -> Callable[[int], None]:
                def inner(n: int) -> None:
                    nonlocal done
                    done += n
                    if progress is not None:
                        progress(phase, done, total)
                return inner
            for disk_id, spec in sorted(disks.items()):
                method = copy_sparse(store.replica_path(disk_id), partial[spec.name],
                                     step("copy"))
            for disk_id, spec in disks.items():
                fds[disk_id] = os.open(partial[spec.name], os.O_RDWR | os.O_CLOEXEC)
            store.undo.replay(point, fds, store.disk_sizes, step("undo"))
            for fd in fds.values():
                os.fsync(fd)
        for name, p in partial.items():
            os.rename(p, targets[name])
        fsync_dir(out_dir)
        if progress is not None:
            progress("done", total, total)
    except OSError as exc:
        raise StorageError(f"restore into {out_dir}: {exc.strerror or exc}") from None
    finally:
        for fd in fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        for p in partial.values():
            with contextlib.suppress(OSError):
                p.unlink()
    log.info("restored point %d into %s (%s copy)", point.id, out_dir, method,
             extra={"policy": store.dir.name, "seq": point.last_seq})
    return Restored(point, targets, method)


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
            return (f"policy {name}: failover committed, production moved to DR; "
                    f"replication is stopped")
        return ""

    def recover(self) -> None:
        try:
            if self.file.exists():
                try:
                    self.doc = json.loads(self.file.read_text())
                except ValueError as exc:
                    raise FormatError(f"{self.file}: not valid JSON ({exc})") from None
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
        doc = {"version": 1, "state": "active", "point_id": restored.point.id,
               "last_seq": restored.point.last_seq, "time_ns": restored.point.time_ns,
               "disks": {n: str(p) for n, p in restored.images.items()}}
        write_json_atomic(self.file, doc)
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
        write_json_atomic(self.file, self.doc)
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
        write_json_atomic(self.file, self.doc)

    def _not_active(self, what: str) -> str:
        if not self.state:
            return f"policy {self.store.dir.name} is not failed over; nothing to {what}"
        return f"policy {self.store.dir.name}: failover is {self.state}; cannot {what} it"
