"""Undo segments and the restore-point catalog of one policy, on disk.

Theory of operation
-------------------
Layout, next to the store's files (`cdp_target.store`)::

    <policy>/points.json                      the catalog (cdp_target.points), replaced atomically
    <policy>/retention.json                   the policy's retention, as last heard
    <policy>/undo/<lo:020d>-<hi:020d>.undo     undo segment (lo, hi]
    <policy>/undo/<...>.tmp                   a segment being written; never referenced

An undo segment file uses the delta file framing (docs/FORMAT.md §4) with
``flags = 1`` (undo), ``first_seq = lo + 1``, ``last_seq = hi``; its extents
are the bytes the replica held before (lo, hi] was applied.

Crash safety, per step of apply (driven by `PolicyStore._apply_one`):

1. `before_apply`: if the catalog's newest point is lo, the segment (lo, hi]
   is captured from the replica, written to a ``.tmp`` file, fsynced,
   renamed, and ``undo/`` fsynced — all before the replica is touched. If
   the file already exists (crash after this step), it is kept as it is:
   the replica may be half-written by now, so recapturing would be wrong.
2. the store writes the delta into the replicas and fsyncs them;
3. `after_apply`: the catalog gains point hi and segment (lo, hi]
   (tmp + fsync + rename + dir fsync); only now is the point listed;
4. the store persists applied_seq and deletes the delta; then `retain`.

`retain` executes a `points.Plan`: merged segments are written and fsynced
under new names first, then the catalog is swapped atomically, then the
files it no longer references are deleted. A crash before the swap leaves
unreferenced new files, after it unreferenced old ones: `recover` deletes
both (but keeps the pending segment whose lo is the newest point: that is
step 1 of the delta being applied). So every listed point is restorable at
every instant.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from cdp_common.delta import (
    EXTENT,
    EXTENT_HEADER_SIZE,
    KIND_DATA,
    KIND_ZERO,
    MAX_EXTENT_LENGTH,
    Extent,
    decode_chunk,
    encode_chunks,
)
from cdp_common.errors import FormatError, StorageError
from cdp_common.fsutil import fsync_dir, write_file_atomic
from cdp_common.records import crc32c
from cdp_target import points as P
from cdp_target import undo
from cdp_target.store import (
    CHUNK_LEN,
    DELTA_MAGIC,
    DELTA_VERSION,
    HEADER,
    HEADER_SIZE,
    MAX_CHUNK_BYTES,
    TRAILER,
    TRAILER_MAGIC,
    TRAILER_SIZE,
    DeltaReader,
    _crc_continue,
)

log = logging.getLogger("target.undo")

CATALOG_FILE = "points.json"
RETENTION_FILE = "retention.json"
UNDO_DIR = "undo"
FLAG_UNDO = 1
CHUNK_BYTES = 1 << 20
_SEG_NAME = re.compile(r"^(\d{20})-(\d{20})\.undo\Z")

_GLOBAL_OVERRIDE: dict[str, float] = {}


def set_global_override(values: Mapping[str, float]) -> None:
    """Target-wide retention overrides from the [target] config (non-zero values only)."""
    _GLOBAL_OVERRIDE.clear()
    _GLOBAL_OVERRIDE.update({k: float(v) for k, v in values.items() if v})


def save_retention(policy_dir: Path, r: P.Retention) -> None:
    """Persist a policy's retention while its store is not open."""
    r.check()
    policy_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(policy_dir / RETENTION_FILE, r.to_json())


def write_json_atomic(path: Path, doc: Any) -> None:
    write_file_atomic(path, json.dumps(doc, separators=(",", ":")).encode())


def write_segment(path: Path, lo: int, hi: int, extents: Iterable[Extent]) -> int:
    """Write an undo segment durably under `path` (via a .tmp file); returns its size."""
    tmp = path.with_name(path.name + ".tmp")
    header = HEADER.pack(DELTA_MAGIC, DELTA_VERSION, FLAG_UNDO, 0, lo + 1, hi)
    crc = crc32c(header)
    chunks = payload = 0
    with open(tmp, "wb", buffering=1 << 20) as f:
        f.write(header)
        for chunk in encode_chunks(extents, CHUNK_BYTES):
            head = CHUNK_LEN.pack(len(chunk))
            f.write(head)
            f.write(chunk)
            crc = _crc_continue(_crc_continue(crc, head), chunk)
            chunks += 1
            payload += len(chunk)
        trailer = TRAILER.pack(TRAILER_MAGIC, chunks, payload, 0, 0)
        crc = _crc_continue(crc, trailer[:-4])
        f.write(trailer[:-4] + crc.to_bytes(4, "little"))
        f.flush()
        os.fsync(f.fileno())
        size = f.tell()
    os.rename(tmp, path)
    fsync_dir(path.parent)
    return size


def read_segment(path: Path, disk_sizes: Mapping[int, int]) -> Iterator[Extent]:
    """The extents of a verified segment file, one chunk in memory at a time."""
    with DeltaReader(path) as reader:
        for chunk in reader.chunks():
            yield from decode_chunk(chunk, disk_sizes)


READ_BLOCK = 8 << 20


def index_segment(path: Path, lo: int, hi: int,
                  disk_sizes: Mapping[int, int]) -> list[undo.Ref]:
    """The extents of undo segment (lo, hi] by reference to their data in `path`.

    One sequential pass (large buffered reads) checks everything a replay
    would: header (magic, version, undo flag, seq range), chunk framing,
    every extent's kind, length and disk bounds, the trailer's counts and the
    file's CRC. Raises FormatError for a file that fails any of them.
    """
    with open(path, "rb", buffering=READ_BLOCK) as f:
        size = os.fstat(f.fileno()).st_size
        if size < HEADER_SIZE + TRAILER_SIZE:
            raise FormatError(f"{path}: undo segment cut short ({size} bytes)")
        head = f.read(HEADER_SIZE)
        magic, version, flags, _res, first, last = HEADER.unpack(head)
        if magic != DELTA_MAGIC:
            raise FormatError(f"{path}: not an undo segment (bad magic)")
        if version != DELTA_VERSION or flags != FLAG_UNDO:
            raise FormatError(f"{path}: unsupported undo segment (version {version}, "
                              f"flags {flags})")
        if (first, last) != (lo + 1, hi):
            raise FormatError(f"{path}: holds seqs [{first}, {last}], expected "
                              f"[{lo + 1}, {hi}]")
        crc = crc32c(head)
        refs: list[undo.Ref] = []
        pos, end = HEADER_SIZE, size - TRAILER_SIZE
        chunks = payload = 0
        while pos < end:
            raw = f.read(CHUNK_LEN.size)
            if end - pos < CHUNK_LEN.size or len(raw) != CHUNK_LEN.size:
                raise FormatError(f"{path}: chunk length cut short at byte {pos}")
            (length,) = CHUNK_LEN.unpack(raw)
            if length > MAX_CHUNK_BYTES or pos + CHUNK_LEN.size + length > end:
                raise FormatError(f"{path}: bad chunk length {length} at byte {pos}")
            chunk = f.read(length)
            if len(chunk) != length:
                raise FormatError(f"{path}: chunk cut short at byte {pos}")
            crc = _crc_continue(_crc_continue(crc, raw), chunk)
            _index_chunk(chunk, pos + CHUNK_LEN.size, disk_sizes, refs, path)
            pos += CHUNK_LEN.size + length
            chunks += 1
            payload += length
        tail = f.read(TRAILER_SIZE)
        if len(tail) != TRAILER_SIZE:
            raise FormatError(f"{path}: undo segment shrank while reading")
        tmagic, count, tpayload, _newest, stored = TRAILER.unpack(tail)
        crc = _crc_continue(crc, tail[:-4])
        if tmagic != TRAILER_MAGIC:
            raise FormatError(f"{path}: not an undo segment (bad trailer magic)")
        if crc != stored:
            raise FormatError(f"{path}: undo segment checksum mismatch")
        if (count, tpayload) != (chunks, payload):
            raise FormatError(f"{path}: trailer says {count} chunks / {tpayload} bytes, "
                              f"file holds {chunks} / {payload}")
    return refs


def _index_chunk(chunk: bytes, base: int, disk_sizes: Mapping[int, int],
                 out: list[undo.Ref], path: Path) -> None:
    """Append the extents of one chunk (at file offset `base`), checked as decode_chunk does."""
    pos, n = 0, len(chunk)
    while pos < n:
        if n - pos < EXTENT_HEADER_SIZE:
            raise FormatError(f"{path}: extent header cut short at byte {base + pos}")
        disk_id, kind, _res, offset, length = EXTENT.unpack_from(chunk, pos)
        pos += EXTENT_HEADER_SIZE
        size = disk_sizes.get(disk_id)
        if size is None:
            raise FormatError(f"{path}: unknown disk id {disk_id}")
        if length == 0 or length > MAX_EXTENT_LENGTH:
            raise FormatError(f"{path}: bad extent length {length}")
        if offset + length > size:
            raise FormatError(f"{path}: extent [{offset}, {offset + length}) is outside "
                              f"disk {disk_id} of {size} bytes")
        if kind == KIND_ZERO:
            out.append(undo.Ref(disk_id, offset, length, -1))
        elif kind == KIND_DATA:
            if n - pos < length:
                raise FormatError(f"{path}: extent data cut short at byte {base + pos}")
            out.append(undo.Ref(disk_id, offset, length, base + pos))
            pos += length
        else:
            raise FormatError(f"{path}: unknown extent kind {kind}")


def pread_all(fd: int, length: int, offset: int) -> bytes:
    parts = []
    while length > 0:
        b = os.pread(fd, length, offset)
        if not b:
            b = bytes(length)  # beyond EOF of a sparse file: zeros
        parts.append(b)
        length -= len(b)
        offset += len(b)
    return b"".join(parts)


class UndoStore:
    """Catalog + undo segments of one policy directory. Not thread-safe: the
    store calls it under its apply lock."""

    def __init__(self, directory: Path, now_ns: Callable[[], int] = time.time_ns) -> None:
        self.dir = directory
        self.undo_dir = directory / UNDO_DIR
        self.catalog = P.Catalog()
        self.retention = P.Retention()
        self.now_ns = now_ns
        self.override: dict[str, float] = {}

    def seg_path(self, s: P.Segment | tuple[int, int]) -> Path:
        lo, hi = (s.lo, s.hi) if isinstance(s, P.Segment) else s
        return self.undo_dir / P.Segment(lo, hi, 0).name

    # ------------------------------------------------------------ open / recover

    def recover(self, applied_seq: int, newest_time_ns: int) -> None:
        """Load the catalog and retention, delete leftovers of a crash."""
        try:
            self.undo_dir.mkdir(parents=True, exist_ok=True)
            cat_path = self.dir / CATALOG_FILE
            if cat_path.exists():
                try:
                    self.catalog = P.Catalog.from_json(json.loads(cat_path.read_text()),
                                                       str(cat_path))
                except ValueError as exc:
                    raise FormatError(f"{cat_path}: not valid JSON ({exc})") from None
            ret_path = self.dir / RETENTION_FILE
            if ret_path.exists():
                with contextlib.suppress(ValueError, FormatError):
                    self.retention = P.Retention.from_json(json.loads(ret_path.read_text()),
                                                           str(ret_path))
            newest = self.catalog.newest
            if newest is None or newest.last_seq < applied_seq:
                # No catalog yet (or one that lost track): the replica is the only point.
                self.catalog = (P.Catalog((P.Point(applied_seq, newest_time_ns),), ())
                                if applied_seq > 0 else P.Catalog())
                self._write_catalog()
            referenced = {s.name for s in self.catalog.segments}
            top = self.catalog.newest.last_seq if self.catalog.newest else 0
            removed = False
            for p in self.undo_dir.iterdir():
                m = _SEG_NAME.match(p.name)
                keep = p.name in referenced or (m is not None and int(m.group(1)) == top)
                if not keep:
                    p.unlink()
                    removed = True
            if removed:
                fsync_dir(self.undo_dir)
        except OSError as exc:
            raise StorageError(f"{self.dir}: cannot open restore points "
                               f"({exc.strerror or exc})") from None

    def _write_catalog(self) -> None:
        write_json_atomic(self.dir / CATALOG_FILE, self.catalog.to_json())

    def set_retention(self, r: P.Retention) -> bool:
        """Persist the policy's retention (as the coordinator says); True if it changed."""
        r.check()
        if r == self.retention:
            return False
        write_json_atomic(self.dir / RETENTION_FILE, r.to_json())
        self.retention = r
        return True

    def effective_retention(self) -> P.Retention:
        r = self.retention
        if self.override or _GLOBAL_OVERRIDE:
            r = P.Retention(**{**r.to_json(), **_GLOBAL_OVERRIDE, **self.override})
        return r

    # ------------------------------------------------------------ apply steps

    def before_apply(self, lo: int, hi: int, delta: Callable[[], Iterator[Extent]],
                     fds: Mapping[int, int]) -> int | None:
        """Step 1: make the undo of (lo, hi] durable; its size, or None when not kept."""
        newest = self.catalog.newest
        if newest is None or newest.last_seq != lo:
            return None
        path = self.seg_path((lo, hi))
        if path.exists():
            return path.stat().st_size  # captured before a crash: keep the first capture
        extents = undo.capture(delta(), lambda d, off, n: pread_all(fds[d], n, off))
        return write_segment(path, lo, hi, extents)

    def after_apply(self, lo: int, hi: int, time_ns: int, size: int | None) -> None:
        """Step 3: list the point hi (and the segment (lo, hi])."""
        new = self.catalog.with_applied(lo, hi, time_ns, size)
        if new is self.catalog:
            return
        dropped = [s for s in self.catalog.segments if s not in new.segments]
        self.catalog = new
        self._write_catalog()
        self._delete(dropped)

    def retain(self, disk_sizes: Mapping[int, int]) -> P.Plan:
        """Apply retention now: merge, swap the catalog, delete what it no longer needs."""
        plan = P.plan_retention(self.catalog, self.now_ns(), self.effective_retention())
        if not plan.changed and plan.catalog == self.catalog:
            return plan
        sizes: dict[tuple[int, int], int] = {}
        for m in plan.merges:
            merged = undo.merge_oldest_wins(read_segment(self.seg_path(s), disk_sizes)
                                            for s in m.old)
            sizes[(m.new.lo, m.new.hi)] = write_segment(self.seg_path(m.new), m.new.lo,
                                                        m.new.hi, merged)
        old = self.catalog
        self.catalog = P.finish_merge(plan, sizes)
        self._write_catalog()
        self._delete([s for s in old.segments if s not in self.catalog.segments])
        if plan.changed:
            log.info("retention: %d points kept, %d segments merged, %d deleted",
                     len(self.catalog.points), sum(len(m.old) for m in plan.merges),
                     len(plan.delete), extra={"policy": self.dir.name})
        return plan

    def _delete(self, segments: Iterable[P.Segment]) -> None:
        keep = {s.name for s in self.catalog.segments}
        removed = False
        for s in segments:
            if s.name in keep:
                continue
            with contextlib.suppress(FileNotFoundError):
                self.seg_path(s).unlink()
                removed = True
        if removed:
            fsync_dir(self.undo_dir)

    def mark_long(self, point_id: int) -> P.Point:
        if self.catalog.point(point_id) is None:
            raise StorageError(f"no restore point {point_id}")
        self.catalog = self.catalog.mark_long(point_id)
        self._write_catalog()
        p = self.catalog.point(point_id)
        assert p is not None
        return p

    def reset(self, applied_seq: int, time_ns: int) -> None:
        """Forget every point (after a committed failover): only the replica remains."""
        old = self.catalog
        self.catalog = P.Catalog((P.Point(applied_seq, time_ns),), ()) if applied_seq else \
            P.Catalog()
        self._write_catalog()
        self._delete(old.segments)

    # ------------------------------------------------------------ replay

    def pending(self) -> list[P.Segment]:
        """The undo of a delta whose apply a crash interrupted (not listed yet).

        It was made durable before the replica was touched, so replaying it
        first takes a half-written replica back to the newest listed point.
        """
        newest = self.catalog.newest
        if newest is None:
            return []
        listed = {s.name for s in self.catalog.segments}
        out = []
        for p in self.undo_dir.glob(f"{newest.last_seq:020d}-*.undo"):
            m = _SEG_NAME.match(p.name)
            if m and p.name not in listed and int(m.group(2)) > newest.last_seq:
                out.append(P.Segment(newest.last_seq, int(m.group(2)), p.stat().st_size))
        return out

    def chain_above(self, point: P.Point) -> list[P.Segment]:
        """The segments between `point` and the replica, OLDEST first.

        A pending segment (`pending`) is the newest: it is last.
        """
        return [*reversed(self.catalog.segments_above(point)),
                *sorted(self.pending(), key=lambda s: s.hi)]

    def resolve(self, point: P.Point,
                disk_sizes: Mapping[int, int]) -> tuple[list[P.Segment],
                                                        dict[int, list[undo.Piece]]]:
        """The final map of the images at `point` (`undo.resolve`), every segment verified.

        Returns the segments (oldest first; `Piece.seg` indexes this list)
        and, per disk, the sorted pieces that do not come from the replica.
        """
        chain = self.chain_above(point)
        refs = [index_segment(self.seg_path(s), s.lo, s.hi, disk_sizes) for s in chain]
        return chain, undo.resolve(refs)

