"""Repair after journal corruption: what a cut journal tail held, marked for resync.

Theory of operation
-------------------
Journal recovery (cdp_filter.journal, J2) cuts the first record that fails
its CRC (or is out of sequence) and everything after it, and the seqs are
reused. The cut records were never acked, and the images hold their writes
(the image write follows the journal append), so the replica would silently
lack them. Before anything is truncated or unlinked the journal hands the
cut bytes to a `CutRepair`, which

1. decodes what can be decoded (`salvage`, pure): record by record, a header
   with the right magic, version, the expected seq and an extent inside a
   disk of the policy gives (disk, offset, length), even when the record's
   data is bad; once a header is unreadable, nothing after it can be
   trusted and the range is *unknown*;
2. marks the known extents in the dirty-block bitmaps (cdp_filter.dirty),
   fsyncs them, and puts the resync state (`resync.py` state.json) into
   tracking with a "corrupt" gap and no `settle_seq` (so an earlier resync's
   end cannot clear the new bits); the Tracker then resyncs those blocks from
   the image when the link is up, and its GAP_END ends the gap;
3. for an unknown range, persists a digest sync (cdp_filter.sync, reason
   "corrupt") of every disk of the policy: only differing regions move.

A tail that is merely *torn* (the first cut record ends past the end of the
file or its header is cut short: a kill or power loss during an append) is
not corruption: that append never returned, so its write never reached the
image, and nothing is marked. A CRC failure inside the file, an unreadable
header followed by more bytes, a record out of sequence, or a later segment
dropped as a whole are corruption.

Residual risk (documented in docs/OPERATIONS.md): the CRC covers header and
data, so a flipped bit inside a header field that still looks valid (an
offset inside the disk) cannot be told from a flipped data bit; the extent
it names is resynced, the real one not. The seq check catches flips in the
seq; disk and offset bounds catch most flips in the high bytes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from cdp_common import records, statefile
from cdp_common.clock import wall_ns
from cdp_common.errors import FormatError, StorageError
from cdp_common.fileio import OS_IO, FileIO
from cdp_filter import resync, sync
from cdp_filter.dirty import DirtyBitmap

log = logging.getLogger("filter.journal")


@dataclass
class Salvage:
    """What a cut journal part held (see `salvage`)."""

    first_seq: int                 # seq the first cut record should have had
    cut_bytes: int
    corrupt: bool = False          # False: only a torn last append (nothing to repair)
    unknown: bool = False          # some extent could not be decoded: digest sync needed
    records: int = 0               # records whose extent is known
    bad_records: int = 0           # of which failed their CRC or were out of sequence
    extents: list[tuple[int, int, int]] = field(default_factory=list)  # (disk, off, len)

    def describe(self) -> str:
        what = (f"{self.records} records with a known extent ({self.bad_records} failed "
                "their check)")
        if self.unknown:
            what += ", then bytes whose extent is unknown"
        return f"{self.cut_bytes} bytes from seq {self.first_seq}: {what}"


def salvage(buf: bytes | memoryview, expected_seq: int, disk_sizes: Sequence[int],
            whole_segment: bool = False) -> Salvage:
    """Decode a cut journal part; pure. `expected_seq` is the seq its first record
    should carry; `whole_segment`: a complete segment is dropped (always corrupt)."""
    view = memoryview(buf)
    s = Salvage(expected_seq, len(view), corrupt=whole_segment)
    pos, seq = 0, expected_seq
    while pos < len(view):
        left = len(view) - pos
        if left < records.HEADER_SIZE:
            if pos == 0 or not s.corrupt:
                break  # a torn last header: that append never returned
            s.unknown = True
            break
        magic, version, flags, disk_id, rseq, _t, offset, length, crc = \
            records.HEADER.unpack_from(view, pos)
        if magic != records.MAGIC or version != records.VERSION \
                or length > records.MAX_RECORD_DATA:
            s.corrupt = s.unknown = True
            break
        end = pos + records.HEADER_SIZE + length
        if end > len(view):
            if s.corrupt:
                s.unknown = True   # a "torn" record after corruption is not trustworthy
            break  # else: torn last append, never returned, never in the image
        data = view[pos + records.HEADER_SIZE:end]
        ok = records.crc32c(view[pos:pos + records.HEADER_SIZE - 4], data) == crc
        if not ok or rseq != seq:
            s.corrupt = True
            s.bad_records += 1
        if rseq != seq and not ok:
            s.unknown = True       # the header itself is suspect: its length too
            break
        if not flags & records.MARKER_FLAGS:
            if disk_id >= len(disk_sizes) or offset + length > disk_sizes[disk_id]:
                s.unknown = True
                break
            if length:
                s.extents.append((disk_id, offset, length))
        s.records += 1
        pos, seq = end, (rseq if ok else seq) + 1
    if not s.corrupt:
        s.extents.clear()
        s.records = 0
    return s


@dataclass
class _Disk:
    name: str
    size: int


class CutRepair:
    """The journal's `on_cut` hook for one policy (see the module docstring).

    `directory` is the policy's dirty-tracking directory (<data_dir>/dirty/<policy>);
    `enabled` is False when dirty tracking is off (then corruption is only reported).
    """

    def __init__(self, policy: str, directory: str, block_bytes: int,
                 disks: Sequence[tuple[str, int]], enabled: bool = True,
                 io: FileIO = OS_IO) -> None:
        self.policy = policy
        self.io = io
        self.directory = directory
        self.block_bytes = block_bytes
        self.disks = [_Disk(n, s) for n, s in disks]
        self.enabled = enabled
        self.events: list[Salvage] = []

    def _extra(self, **kw: object) -> dict[str, object]:
        return {"policy": self.policy, **kw}

    def __call__(self, data: memoryview, expected_seq: int, whole_segment: bool) -> None:
        s = salvage(data, expected_seq, [d.size for d in self.disks], whole_segment)
        if not s.corrupt:
            return
        self.events.append(s)
        log.error("journal corruption: cutting %s; these writes are in the images but were "
                  "never shipped", s.describe(), extra=self._extra(seq=expected_seq))
        if not self.enabled:
            log.error("dirty tracking is off: the cut writes cannot be resynced; run "
                      "`cdpctl sync %s` after enabling it", self.policy, extra=self._extra())
            return
        os.makedirs(self.directory, exist_ok=True)
        if s.extents:
            self._mark(s)
        if s.unknown:
            self._request_sync()

    def _mark(self, s: Salvage) -> None:
        marked = mark_for_resync(self.directory, self.block_bytes,
                                 [(d.name, d.size) for d in self.disks], s.extents,
                                 s.first_seq - 1, "corrupt", self.io)
        log.warning("marked %d blocks dirty for the cut records; they are resent from the "
                    "images", marked, extra=self._extra())

    def _request_sync(self) -> None:
        core = sync.load_core(self.directory)
        now = wall_ns()
        core.start(max(now, core.id + 1), "corrupt", sum(d.size for d in self.disks), now)
        sync.save_core(self.directory, core)
        log.warning("a cut record's extent is unknown: digest sync of every disk of the "
                    "policy planned", extra=self._extra())

    def summary(self) -> str:
        """Operator text for the heartbeat (empty when nothing was cut)."""
        if not self.events:
            return ""
        s = self.events[0]
        how = ("a digest resync of every disk" if any(e.unknown for e in self.events)
               else "a resync of the blocks they wrote")
        return (f"journal corruption at seq {s.first_seq}: "
                f"{sum(e.cut_bytes for e in self.events)} bytes cut, repaired from the source "
                f"image by {how}")


def mark_for_resync(directory: str, block_bytes: int, disks: Sequence[tuple[str, int]],
                    extents: Sequence[tuple[int, int, int]], lost_after_seq: int,
                    reason: str, io: FileIO = OS_IO) -> int:
    """Mark `extents` (disk_id, offset, length) in the policy's dirty-block bitmaps
    under `directory`, fsync them, then persist "tracking, gap `reason`, no
    settle_seq" in resync's state.json, so the Tracker resends those blocks from the
    images once the link is up (and an earlier resync's end cannot clear the new
    bits). Returns how many blocks were newly marked. Idempotent: a crash before the
    state is saved leaves bits that the next start resyncs anyway."""
    io.makedirs(directory)
    marked = 0
    for i, (name, size) in enumerate(disks):
        mine = [(off, n) for disk, off, n in extents if disk == i]
        if not mine:
            continue
        bm = DirtyBitmap.open(os.path.join(directory, f"{name}.bitmap"), block_bytes, size, io)
        try:
            for off, n in mine:
                marked += bm.mark(off, n)
            bm.sync()
        finally:
            bm.close()
    path = os.path.join(directory, resync.STATE_FILE)
    data: dict[str, object]
    try:
        data = statefile.load(path, resync.STATE_KIND, resync.STATE_VERSION, io) or {}
    except (FormatError, StorageError):
        data = {}   # unreadable: rewritten with tracking (the bits are what matters)
    data.pop("version", None)
    if data.get("mode", "journaling") == "journaling":
        data["mode"] = "tracking"
    data["settle_seq"] = 0
    data["target_ahead_ok"] = True   # the lost seqs' blocks are marked (resync.Tracker)
    if not isinstance(data.get("gap"), dict):
        data["gap"] = {"begin_time_ns": wall_ns(), "lost_after_seq": lost_after_seq,
                       "lost_through_seq": 0, "reason": reason}
    resync.save_state(directory, data, io)
    return marked
