"""The restore-point catalog on disk: an append-only log of patches (docs/FORMAT.md §4a).

Theory of operation
-------------------
The catalog (`cdp_target.points.Catalog`) changes at every applied delta (one
point and one segment more) and at every retention pass (a few points and
segments less). Writing it whole each time cost a full rewrite and two fsyncs
per change, O(points) bytes, at 7,200 points (4 h at a 2 s RPO) hundreds of
kilobytes per delta. So the file is a log: each change is appended as one
*patch* record and made durable with one fdatasync; the catalog is the replay
of the records in order. Little-endian::

    file    = header || record*
    header  = magic u32 0x52504443 ("CDPR") || version u8 3 || 0 u8 || 0 u16   (8 bytes)
    record  = length u32 || length_crc u32 || crc u32 || body[length]
              length_crc = crc32c(length bytes), crc = crc32c(length bytes || body)
              (Castagnoli); the length has its own check so that a flipped length
              in the middle of the log is never mistaken for a torn tail
    body    = op u8 1 (patch) || flags u8 (bit 0 CLEAR) || 0 u16 ||
              n_drop_points u32 || n_put_points u32 || n_drop_segs u32 || n_put_segs u32 ||
              drop_points[n] (last_seq u64) ||
              put_points[n]  (last_seq u64 || time_ns u64 || kind u8 (0 short, 1 long) ||
                              on_demand u8 || checkpoint_id u64) ||
              drop_segs[n]   (lo u64 || hi u64) ||
              put_segs[n]    (lo u64 || hi u64 || size_bytes u64)

Version 2 (before consistency groups) is the same but for its points, which
have no ``checkpoint_id`` (18 bytes each); it is still read (every point a
normal one, checkpoint 0), and the undo store rewrites it as version 3 (a
compaction) at its first change, as it upgrades a ``points.json``.

Replay (`replay`): CLEAR empties the catalog first; drops remove points by id
and segments by (lo, hi); puts add or replace them. The result is sorted
(points by last_seq, segments by lo) and must pass `Catalog.check`. A file
always starts with a CLEAR record holding the whole catalog (a *snapshot*),
because the file is only ever created by a compaction.

Compaction (`CatalogLog.compact`) writes header + snapshot to ``<name>.tmp``,
fsyncs, renames over the log, fsyncs the directory: a crash leaves the old or
the new file. `cdp_target.undostore` compacts when the log has grown past
twice a snapshot's size plus `COMPACT_SLACK_BYTES` (so appends stay amortized
O(1) per change and a load replays a bounded log), on a reset, after a failed
append, and to upgrade a catalog of the old format (``points.json``).

Torn or corrupt (`scan`). Each append is one record at the end of the file,
durable before the caller goes on, so only the *last* record can be torn by
a crash, and tearing leaves a prefix of it, possibly with a size extended
over bytes never written (zeros). A defect at byte `pos` is therefore a
**torn tail**, dropped (and cut from the file before the next append), when

- fewer than 12 bytes (the frame) are left, or
- the length passes its check and the record ends past the end of the file
  (cut short), or ends exactly there with a wrong `crc` (not all written), or
- the length fails its check and every byte after the 12 bytes of the frame,
  to the end of the file, is zero (only a part of the frame was written).

Any other defect -- a length failing its check with data after the frame, a
complete record failing its CRC with bytes after it, a CRC-valid body that
does not decode, a replay that breaks a catalog invariant, a bad file header
-- is corruption: CorruptStateError naming the file and the byte, never a
guess, never a silent skip (a dropped middle record would list points whose
undo is gone, or lose points that exist).

This module is pure bytes plus one small file shell (`CatalogLog`, every call
through the injected FileIO, so tests can crash or cut power at every step).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cdp_common.errors import CorruptStateError, FormatError
from cdp_common.fileio import OS_IO, FileIO
from cdp_common.fsutil import pread_upto, write_file_atomic
from cdp_common.records import crc32c
from cdp_target import points as P

MAGIC = 0x52504443  # b"CDPR" little-endian
VERSION = 3  # version 1 is the JSON catalog (points.json), 2 a log without checkpoint ids
READ_VERSIONS = (2, 3)
HEADER = struct.Struct("<IBBH")
HEADER_SIZE = HEADER.size  # 8
FRAME = struct.Struct("<III")  # length, crc32c(length), crc32c(length || body)
FRAME_SIZE = FRAME.size  # 12
BODY_HEAD = struct.Struct("<BBHIIII")
BODY_HEAD_SIZE = BODY_HEAD.size  # 20
OP_PATCH = 1
FLAG_CLEAR = 0x01
DROP_POINT = struct.Struct("<Q")
PUT_POINT = struct.Struct("<QQBBQ")
PUT_POINT_V2 = struct.Struct("<QQBB")
DROP_SEG = struct.Struct("<QQ")
PUT_SEG = struct.Struct("<QQQ")
COMPACT_SLACK_BYTES = 256 * 1024
_KINDS = (P.SHORT, P.LONG)


@dataclass(frozen=True)
class Patch:
    """One change of a catalog; `clear` first empties it (a snapshot)."""

    drop_points: tuple[int, ...] = ()
    put_points: tuple[P.Point, ...] = ()
    drop_segments: tuple[tuple[int, int], ...] = ()
    put_segments: tuple[P.Segment, ...] = ()
    clear: bool = False

    @property
    def empty(self) -> bool:
        return not (self.clear or self.drop_points or self.put_points or self.drop_segments
                    or self.put_segments)


def snapshot(cat: P.Catalog) -> Patch:
    return Patch(put_points=cat.points, put_segments=cat.segments, clear=True)


def diff(old: P.Catalog, new: P.Catalog) -> Patch:
    """The patch that takes `old` to `new` (O(points + segments), dicts, no sorting)."""
    old_p = {p.last_seq: p for p in old.points}
    new_p = {p.last_seq: p for p in new.points}
    old_s = {(s.lo, s.hi): s for s in old.segments}
    new_s = {(s.lo, s.hi): s for s in new.segments}
    return Patch(tuple(k for k in old_p if k not in new_p),
                 tuple(p for k, p in new_p.items() if old_p.get(k) != p),
                 tuple(k for k in old_s if k not in new_s),
                 tuple(s for k, s in new_s.items() if old_s.get(k) != s))


class Replay:
    """Patches applied in order; `catalog()` sorts once and checks the invariants."""

    def __init__(self) -> None:
        self.points: dict[int, P.Point] = {}
        self.segments: dict[tuple[int, int], P.Segment] = {}

    def apply(self, patch: Patch) -> None:
        if patch.clear:
            self.points.clear()
            self.segments.clear()
        for k in patch.drop_points:
            self.points.pop(k, None)
        for p in patch.put_points:
            self.points[p.last_seq] = p
        for ks in patch.drop_segments:
            self.segments.pop(ks, None)
        for s in patch.put_segments:
            self.segments[(s.lo, s.hi)] = s

    def catalog(self, where: str) -> P.Catalog:
        # dicts keep insertion order, which is sorted order but after a replaced
        # entry: timsort of an (almost) sorted list is linear
        cat = P.Catalog(tuple(sorted(self.points.values(), key=lambda p: p.last_seq)),
                        tuple(sorted(self.segments.values(), key=lambda s: s.lo)))
        cat.check(where)
        return cat


def replay(patches: Iterable[Patch], where: str = "catalog") -> P.Catalog:
    r = Replay()
    for patch in patches:
        r.apply(patch)
    return r.catalog(where)


# ---------------------------------------------------------------- bytes

def encode_header() -> bytes:
    return HEADER.pack(MAGIC, VERSION, 0, 0)


def encode_record(patch: Patch) -> bytes:
    parts = [BODY_HEAD.pack(OP_PATCH, FLAG_CLEAR if patch.clear else 0, 0,
                            len(patch.drop_points), len(patch.put_points),
                            len(patch.drop_segments), len(patch.put_segments))]
    parts.extend(DROP_POINT.pack(k) for k in patch.drop_points)
    parts.extend(PUT_POINT.pack(p.last_seq, p.time_ns, _KINDS.index(p.kind), int(p.on_demand),
                                p.checkpoint_id)
                 for p in patch.put_points)
    parts.extend(DROP_SEG.pack(lo, hi) for lo, hi in patch.drop_segments)
    parts.extend(PUT_SEG.pack(s.lo, s.hi, s.size_bytes) for s in patch.put_segments)
    body = b"".join(parts)
    length = len(body).to_bytes(4, "little")
    return (length + crc32c(length).to_bytes(4, "little")
            + crc32c(length, body).to_bytes(4, "little") + body)


def record_size(n_points: int, n_segments: int) -> int:
    """Bytes of a snapshot record of a catalog this big (the compaction bound)."""
    return FRAME_SIZE + BODY_HEAD_SIZE + n_points * PUT_POINT.size + n_segments * PUT_SEG.size


def decode_body(body: memoryview, where: str, version: int = VERSION) -> Patch:
    """One record body (its CRC already checked) of a log of `version`; FormatError
    when it does not decode."""
    put_point = PUT_POINT if version >= 3 else PUT_POINT_V2
    if len(body) < BODY_HEAD_SIZE:
        raise FormatError(f"{where}: body of {len(body)} bytes, shorter than its "
                          f"{BODY_HEAD_SIZE}-byte head")
    op, flags, reserved, n_dp, n_pp, n_ds, n_ps = BODY_HEAD.unpack_from(body, 0)
    if op != OP_PATCH:
        raise FormatError(f"{where}: unknown record op {op}")
    if flags & ~FLAG_CLEAR or reserved:
        raise FormatError(f"{where}: unknown flags {flags:#x} / reserved {reserved}")
    want = (BODY_HEAD_SIZE + n_dp * DROP_POINT.size + n_pp * put_point.size
            + n_ds * DROP_SEG.size + n_ps * PUT_SEG.size)
    if want != len(body):  # checked before anything is allocated from the counts
        raise FormatError(f"{where}: counts ({n_dp}, {n_pp}, {n_ds}, {n_ps}) need "
                          f"{want} bytes, body has {len(body)}")
    pos = BODY_HEAD_SIZE

    def take(st: struct.Struct, n: int) -> Iterator[tuple[int, ...]]:
        nonlocal pos
        end = pos + n * st.size
        out = st.iter_unpack(body[pos:end])
        pos = end
        return out

    drop_p = tuple(k for (k,) in take(DROP_POINT, n_dp))
    put_p = []
    for seq, t, kind, on_demand, *rest in take(put_point, n_pp):
        if kind >= len(_KINDS) or on_demand > 1:
            raise FormatError(f"{where}: point {seq} has unknown kind {kind} or "
                              f"on_demand {on_demand}")
        put_p.append(P.Point(seq, t, _KINDS[kind], bool(on_demand), rest[0] if rest else 0))
    drop_s = tuple((lo, hi) for lo, hi in take(DROP_SEG, n_ds))
    put_s = tuple(P.Segment(lo, hi, size) for lo, hi, size in take(PUT_SEG, n_ps))
    return Patch(drop_p, tuple(put_p), drop_s, put_s, bool(flags & FLAG_CLEAR))


@dataclass(frozen=True)
class Scan:
    patches: list[Patch]
    valid_end: int      # bytes of header + complete, valid records
    torn_bytes: int     # bytes after valid_end that were dropped as a torn tail
    version: int = VERSION


def scan(buf: bytes | memoryview, where: str) -> Scan:
    """Decode a whole log (rules in the module docstring); CorruptStateError on corruption."""
    view = memoryview(buf)
    size = len(view)
    if size < HEADER_SIZE:
        raise CorruptStateError(f"{where}: {size} bytes, shorter than the catalog header "
                                f"(the file is only made whole, by a rename)")
    magic, version, zero1, zero2 = HEADER.unpack_from(view, 0)
    if magic != MAGIC:
        raise CorruptStateError(f"{where}: bad magic {magic:#010x}, not a catalog log")
    if version not in READ_VERSIONS:
        raise CorruptStateError(f"{where}: catalog log version {version} is not one this "
                                f"build understands ({', '.join(map(str, READ_VERSIONS))})")
    if zero1 or zero2:
        raise CorruptStateError(f"{where}: reserved header bytes are not zero")
    patches: list[Patch] = []
    pos = HEADER_SIZE
    while pos < size:
        rec = f"{where}: catalog record {len(patches)} at byte {pos}"
        if size - pos < FRAME_SIZE:
            break  # torn: the frame itself is cut
        length, length_crc, crc = FRAME.unpack_from(view, pos)
        end = pos + FRAME_SIZE + length
        length_ok = crc32c(view[pos:pos + 4]) == length_crc
        if length_ok and end <= size and crc32c(view[pos:pos + 4],
                                                view[pos + FRAME_SIZE:end]) == crc:
            pass
        elif (length_ok and end >= size) or not view[pos + FRAME_SIZE:].tobytes().strip(b"\0"):
            break  # torn: the last append, cut short, not all written or zero-filled
        else:
            what = "checksum mismatch" if length_ok else "its length fails its check"
            raise CorruptStateError(
                f"{rec}: {what}, and bytes follow it, so it is no torn append: the "
                f"restore-point catalog is corrupt (points are never guessed; restore "
                f"the file from a copy, or move it away to keep only the replica as a "
                f"point)")
        try:
            patches.append(decode_body(view[pos + FRAME_SIZE:end], rec, version))
        except FormatError as exc:
            raise CorruptStateError(f"{exc} (its checksum is right: written so by a bug, "
                                    f"or corrupt)") from None
        pos = end
    if not patches or not patches[0].clear:
        raise CorruptStateError(f"{where}: the log does not start with a snapshot record")
    return Scan(patches, pos, size - pos, version)


# ---------------------------------------------------------------- the file

class CatalogLog:
    """The log file at `path`; not thread-safe (the undo store's caller serializes).

    Every method raises OSError for I/O failures (the caller maps it) and
    CorruptStateError (`load`) for a log that does not decode.
    """

    def __init__(self, path: Path, io: FileIO = OS_IO) -> None:
        self.path = path
        self.tmp_path = path.with_name(path.name + ".tmp")
        self.io = io
        self.size = 0
        """Bytes of the log as written (header + records); 0 before load/compact."""
        self.records = 0
        self.torn_bytes = 0
        """Bytes the last `load` dropped as a torn tail (and cut from the file)."""
        self.version = VERSION
        """The format of the file as loaded; an older one must be compacted before
        the next append (`append` writes this build's records only)."""

    def exists(self) -> bool:
        return self.path.exists()

    def load(self) -> P.Catalog:
        """Replay the log; a torn tail is dropped and cut from the file (fsynced)."""
        fd = self.io.open(self.path, os.O_RDONLY)
        try:
            raw = pread_upto(fd, None, self.io, 1 << 20)
        finally:
            self.io.close(fd)
        where = os.fspath(self.path)
        found = scan(raw, where)
        try:
            cat = replay(found.patches, where)
        except FormatError as exc:
            raise CorruptStateError(f"{exc} (after replaying {len(found.patches)} "
                                    f"records: the catalog log is corrupt)") from None
        if found.torn_bytes:
            fd = self.io.open(self.path, os.O_WRONLY)
            try:
                self.io.ftruncate(fd, found.valid_end)
                self.io.fsync(fd)
            finally:
                self.io.close(fd)
        self.size, self.records = found.valid_end, len(found.patches)
        self.torn_bytes, self.version = found.torn_bytes, found.version
        return cat

    def append(self, patch: Patch) -> None:
        """Append one record and fdatasync it: durable when this returns.

        On failure the record may be partly there (or written but not durable);
        the caller must `compact` before the next append (`UndoStore` does).
        """
        if self.version != VERSION:
            raise FormatError(f"{self.path}: a version {self.version} log is compacted "
                              f"before it is appended to")
        data = encode_record(patch)
        fd = self.io.open(self.path, os.O_WRONLY)
        try:
            self.io.pwrite(fd, data, self.size)
            self.io.fdatasync(fd)
        finally:
            self.io.close(fd)
        self.size += len(data)
        self.records += 1

    def compact(self, cat: P.Catalog) -> None:
        """Replace the log with a snapshot of `cat` (tmp + fsync + rename + dir fsync)."""
        data = encode_header() + encode_record(snapshot(cat))
        write_file_atomic(self.path, data, tmp=self.tmp_path, io=self.io)
        self.size, self.records, self.version = len(data), 1, VERSION

    def over_bound(self, cat: P.Catalog) -> bool:
        """True when the log is worth compacting: more than twice a snapshot, plus slack."""
        snap = HEADER_SIZE + record_size(len(cat.points), len(cat.segments))
        return self.size > 2 * snap + COMPACT_SLACK_BYTES
