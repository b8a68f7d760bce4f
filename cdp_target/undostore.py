"""Undo segments and the restore-point catalog of one policy, on disk.

Theory of operation
-------------------
Layout, next to the store's files (`cdp_target.store`)::

    <policy>/points.log                       the catalog (cdp_target.points), an append-only
                                              log of patches (cdp_target.catalogfile)
    <policy>/points.log.tmp                   a compaction being written; deleted on open
    <policy>/points.json                      the catalog before version 2 (JSON); read,
                                              replaced by points.log at the first change
    <policy>/retention.json                   the policy's retention, as last heard
    <policy>/undo/<lo:020d>-<hi:020d>.undo     undo segment (lo, hi]
    <policy>/undo/<...>.tmp                   a segment being written; never referenced

An undo segment file uses the delta file framing (docs/FORMAT.md §4) with
``flags = 1`` (undo), ``first_seq = lo + 1``, ``last_seq = hi``; its extents
are the bytes the replica held before (lo, hi] was applied.

Crash safety, per step of apply (driven by `cdp_target.applier.Applier`):

1. `before_apply`: if the catalog's newest point is lo, the segment (lo, hi]
   is captured from the replica, written to a ``.tmp`` file, fsynced,
   renamed, and ``undo/`` fsynced — all before the replica is touched. If
   the file already exists (crash after this step), it is kept as it is:
   the replica may be half-written by now, so recapturing would be wrong.
2. the store writes the delta into the replicas and fsyncs them;
3. `after_apply`: the catalog gains point hi and segment (lo, hi], one
   record appended to the log and fdatasynced; only now is the point listed
   (the in-memory catalog changes after the record is durable, never before);
4. the applier persists applied_seq and deletes the delta; then `retain`.

`retain` executes a `points.Plan`: merged segments are written and fsynced
under new names first, then the catalog's change is appended (durable), then
the files it no longer references are deleted. Every change of the catalog
goes through `_save`: one appended patch, or a compaction (the whole catalog
rewritten atomically) when the log is past its bound (`CatalogLog.over_bound`),
on a reset, to upgrade an old ``points.json``, and after a failed write (the
log may end in a partial record then; a rename replaces it whole). A crash before the swap leaves
unreferenced new files, after it unreferenced old ones: `recover` deletes
both (but keeps the pending segment whose lo is the newest point: that is
step 1 of the delta being applied). So every listed point is restorable at
every instant.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

from cdp_common import statefile
from cdp_common.delta import KIND_ZERO, Extent, decode_chunk, encode_chunks, walk_extents
from cdp_common.errors import CorruptStateError, FormatError, StorageError
from cdp_common.fileio import OS_IO, FileIO
from cdp_common.fsutil import pread_full
from cdp_common.groups import split_member
from cdp_target import catalogfile as CF
from cdp_target import points as P
from cdp_target import undo
from cdp_target.deltafile import FLAG_UNDO, DeltaReader, write_delta_file

log = logging.getLogger("target.undo")

CATALOG_FILE = "points.log"
OLD_CATALOG_FILE = "points.json"  # catalog version 1 (JSON), read and upgraded
CATALOG_KIND = "target-catalog"
RETENTION_FILE = "retention.json"
RETENTION_KIND = "target-retention"
RETENTION_VERSION = 1
UNDO_DIR = "undo"
CHUNK_BYTES = 1 << 20
READ_BLOCK = 8 << 20
_SEG_NAME = re.compile(r"^(\d{20})-(\d{20})\.undo\Z")

RetentionOverride = Mapping[str, float]
"""Target-wide retention settings ([target] config) that win over the policy's own:
field name of `points.Retention` -> value; zero values are ignored (not set)."""


def save_retention(policy_dir: Path, r: P.Retention, io: FileIO = OS_IO) -> None:
    """Persist a policy's retention while its store is not open."""
    r.check()
    policy_dir.mkdir(parents=True, exist_ok=True)
    statefile.save(policy_dir / RETENTION_FILE, RETENTION_KIND, RETENTION_VERSION,
                   r.to_json(), io)


def write_segment(path: Path, lo: int, hi: int, extents: Iterable[Extent],
                  io: FileIO = OS_IO) -> int:
    """Write undo segment (lo, hi] durably under `path` (via a .tmp file); returns its size."""
    return write_delta_file(path, lo + 1, hi, encode_chunks(extents, CHUNK_BYTES),
                            flags=FLAG_UNDO, io=io)


def read_segment(path: Path, disk_sizes: Mapping[int, int],
                 io: FileIO = OS_IO) -> Iterator[Extent]:
    """The extents of a verified segment file, one chunk in memory at a time."""
    with DeltaReader(path, io) as reader:
        for chunk in reader.chunks():
            yield from decode_chunk(chunk, disk_sizes)


def index_segment(path: Path, lo: int, hi: int, disk_sizes: Mapping[int, int],
                  io: FileIO = OS_IO) -> list[undo.Ref]:
    """The extents of undo segment (lo, hi] by reference to their data in `path`.

    One sequential pass (`deltafile.scan`) checks everything a replay would:
    header (magic, version, undo flag, seq range), chunk framing, every
    extent's kind, length and disk bounds, the trailer's counts and the
    file's CRC. Raises FormatError for a file that fails any of them.
    """
    refs: list[undo.Ref] = []

    def index(chunk: bytes, base: int) -> None:
        try:
            for disk_id, kind, offset, length, pos in walk_extents(memoryview(chunk),
                                                                   disk_sizes):
                refs.append(undo.Ref(disk_id, offset, length,
                                     -1 if kind == KIND_ZERO else base + pos))
        except FormatError as exc:
            raise FormatError(f"{path}: undo segment: {exc}") from None

    DeltaReader(path, io, flags=FLAG_UNDO, seqs=(lo + 1, hi), on_chunk=index).close()
    return refs


class UndoStore:
    """Catalog + undo segments of one policy directory. Not thread-safe: the
    store calls it under its apply lock.

    `override` is the target-wide retention ([target] config; `RetentionOverride`);
    it wins over the policy's own retention. Every file write goes through `io`.
    """

    def __init__(self, directory: Path, now_ns: Callable[[], int] = time.time_ns,
                 io: FileIO = OS_IO, override: RetentionOverride | None = None) -> None:
        self.dir = directory
        self.undo_dir = directory / UNDO_DIR
        self.catalog = P.Catalog()
        """The listed restore points; replaced (never mutated) only once its change is durable."""
        self.log = CF.CatalogLog(directory / CATALOG_FILE, io)
        self._compact_next = True  # no log yet, or one whose end is not trusted
        self.retention = P.Retention()
        self.now_ns = now_ns
        self.io = io
        self.override: dict[str, float] = {k: float(v) for k, v in (override or {}).items()
                                           if v}
        self.group_member = split_member(directory.name) is not None
        """A consistency-group member (``<group>..<filter>``, cdp_common.groups): its
        long-term points are checkpoint points (`points.plan_retention`)."""

    def seg_path(self, s: P.Segment | tuple[int, int]) -> Path:
        lo, hi = (s.lo, s.hi) if isinstance(s, P.Segment) else s
        return self.undo_dir / P.Segment(lo, hi, 0).name

    # ------------------------------------------------------------ open / recover

    def recover(self, applied_seq: int, newest_time_ns: int) -> None:
        """Load the catalog and retention, delete leftovers of a crash."""
        try:
            self.io.makedirs(self.undo_dir)
            with contextlib.suppress(FileNotFoundError):
                self.io.unlink(self.log.tmp_path)  # a compaction cut before its rename
            torn = self._load_catalog()
            ret_path = self.dir / RETENTION_FILE
            try:
                ret = statefile.load(ret_path, RETENTION_KIND, RETENTION_VERSION, self.io)
                if ret is not None:
                    self.retention = P.Retention.from_json(ret, str(ret_path))
            except FormatError as exc:  # the coordinator sends it again
                log.warning("ignoring %s", exc, extra={"policy": self.dir.name})
            newest = self.catalog.newest
            if newest is None or newest.last_seq < applied_seq:
                if torn:
                    # A torn tail is at most the last append, which was not durable,
                    # so applied_seq (persisted after it) cannot be past it.
                    raise CorruptStateError(
                        f"{self.log.path}: the record dropped as torn held restore point "
                        f"{applied_seq} or later, already applied: the catalog is corrupt")
                # No catalog yet (or one that lost track): the replica is the only point.
                self._save(P.Catalog((P.Point(applied_seq, newest_time_ns),), ())
                           if applied_seq > 0 else P.Catalog(), compact=True)
            referenced = {s.name for s in self.catalog.segments}
            top = self.catalog.newest.last_seq if self.catalog.newest else 0
            removed = False
            for p in self.undo_dir.iterdir():
                m = _SEG_NAME.match(p.name)
                keep = p.name in referenced or (m is not None and int(m.group(1)) == top)
                if not keep:
                    self.io.unlink(p)
                    removed = True
            if removed:
                self.io.fsync_dir(self.undo_dir)
        except OSError as exc:
            raise StorageError(f"{self.dir}: cannot open restore points "
                               f"({exc.strerror or exc})") from None

    def _load_catalog(self) -> bool:
        """The catalog from points.log, else from an old points.json; True when a
        torn tail was dropped from the log."""
        old_path = self.dir / OLD_CATALOG_FILE
        if self.log.exists():
            self.catalog = self.log.load()
            self._compact_next = self.log.version != CF.VERSION  # upgraded at the first change
            if old_path.exists():  # an upgrade cut between its rename and this unlink
                self.io.unlink(old_path)
                self.io.fsync_dir(self.dir)
            if self.log.torn_bytes:
                log.warning("%s: dropped a torn last record (%d bytes): a crash cut its "
                            "append, before its restore point was listed", self.log.path,
                            self.log.torn_bytes, extra={"policy": self.dir.name})
            return bool(self.log.torn_bytes)
        data = statefile.load(old_path, CATALOG_KIND, P.CATALOG_VERSION, self.io)
        if data is not None:
            self.catalog = P.Catalog.from_json(data, str(old_path))
        self._compact_next = True  # the first change writes points.log
        return False

    def _save(self, new: P.Catalog, patch: CF.Patch | None = None,
              compact: bool = False) -> None:
        """Make `new` the catalog: durable first, then listed.

        Appends `patch` (default: the diff from the current catalog) with one
        fdatasync, or compacts (see the module docstring). Raises OSError with
        the old catalog still listed; the next save then compacts.
        """
        try:
            if compact or self._compact_next or self.log.over_bound(new):
                self.log.compact(new)
                old_path = self.dir / OLD_CATALOG_FILE
                if old_path.exists():  # upgraded: the JSON catalog goes
                    self.io.unlink(old_path)
                    self.io.fsync_dir(self.dir)
            else:
                if patch is None:
                    patch = CF.diff(self.catalog, new)
                if not patch.empty:
                    self.log.append(patch)
        except BaseException:  # OSError, or a test's simulated crash
            self._compact_next = True
            raise
        self._compact_next = False
        self.catalog = new

    def set_retention(self, r: P.Retention) -> bool:
        """Persist the policy's retention (as the coordinator says); True if it changed."""
        r.check()
        if r == self.retention:
            return False
        statefile.save(self.dir / RETENTION_FILE, RETENTION_KIND, RETENTION_VERSION,
                       r.to_json(), self.io)
        self.retention = r
        return True

    def effective_retention(self) -> P.Retention:
        r = self.retention
        if self.override:
            r = P.Retention(**{**r.to_json(), **self.override})
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
        extents = undo.capture(delta(), lambda d, off, n: pread_full(fds[d], n, off, self.io))
        return write_segment(path, lo, hi, extents, self.io)

    def after_apply(self, lo: int, hi: int, time_ns: int, size: int | None,
                    checkpoint_id: int = 0) -> None:
        """Step 3: list the point hi (and the segment (lo, hi]); `checkpoint_id`: the
        delta ended at that consistency-group checkpoint (0: a normal point)."""
        old = self.catalog
        new = old.with_applied(lo, hi, time_ns, size, checkpoint_id)
        if new is old:
            return
        if len(new.segments) == len(old.segments) + 1:  # appended: the common case
            self._save(new, CF.Patch(put_points=new.points[-1:],
                                     put_segments=new.segments[-1:]))
        else:  # no undo kept: the new point alone, older ones are unreachable
            self._save(new, CF.snapshot(new))
            self._delete(old.segments)

    def retain(self, disk_sizes: Mapping[int, int]) -> P.Plan:
        """Apply retention now: merge, swap the catalog, delete what it no longer needs."""
        plan = P.plan_retention(self.catalog, self.now_ns(), self.effective_retention(),
                                group=self.group_member)
        if not plan.changed and plan.catalog == self.catalog:
            return plan
        sizes: dict[tuple[int, int], int] = {}
        for m in plan.merges:
            merged = undo.merge_oldest_wins(read_segment(self.seg_path(s), disk_sizes, self.io)
                                            for s in m.old)
            sizes[(m.new.lo, m.new.hi)] = write_segment(self.seg_path(m.new), m.new.lo,
                                                        m.new.hi, merged, self.io)
        old = self.catalog
        self._save(P.finish_merge(plan, sizes))
        self._delete(old.segments)  # those the new catalog still names are kept
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
            try:
                self.io.unlink(self.seg_path(s))
                removed = True
            except FileNotFoundError:
                pass
        if removed:
            self.io.fsync_dir(self.undo_dir)

    def mark_long(self, point_id: int) -> P.Point:
        if self.catalog.point(point_id) is None:
            raise StorageError(f"no restore point {point_id}")
        new = self.catalog.mark_long(point_id)
        p = new.point(point_id)
        assert p is not None
        self._save(new, CF.Patch(put_points=(p,)))
        return p

    def reset(self, applied_seq: int, time_ns: int) -> None:
        """Forget every point (after a committed failover): only the replica remains."""
        old = self.catalog
        self._save(P.Catalog((P.Point(applied_seq, time_ns),), ()) if applied_seq else
                   P.Catalog(), compact=True)
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
        refs = [index_segment(self.seg_path(s), s.lo, s.hi, disk_sizes, self.io) for s in chain]
        return chain, undo.resolve(refs)

