"""Per-policy record of gaps: ranges of restore points that are not consistent.

Theory of operation
-------------------
When the filter's journal overflows it stops journaling, tracks dirty blocks
and later resyncs them (cdp_filter.overflow); an initial or operator sync
does the same from a digest comparison. Restore points cut while that goes
on hold a mix of old and new blocks: they are *not consistent*. The data
path carries the gap's bounds in every delta it touches (DeltaChunk gap_*
fields, docs/FORMAT.md "Gaps"); this book keeps them per policy:

    gap = (begin_seq, end_seq, begin_time_ns, end_time_ns, reason)

Restore points with ``begin_seq <= last_seq < end_seq`` are inconsistent;
``end_seq == 0`` means the gap is still open (every point from begin_seq on).
``begin_seq`` is ``gap_after_seq + 1``: the last point before it holds only
writes the filter had journaled and the target acked.

`note` is pure bookkeeping (idempotent: a resent delta changes nothing);
`save` writes ``<policy dir>/gaps.json`` atomically (tmp + fsync + rename +
dir fsync). The service notes and saves *before* it commits the delta, so a
gap is never missing for an acked delta (a crash between the two at worst
records a gap for a delta that is then resent and noted again).

File: ``{"version": 1, "gaps": [{"begin_seq", "end_seq", "begin_time_ns",
"end_time_ns", "reason"}]}``, oldest first. At most MAX_GAPS are kept (the
oldest are merged), so the file stays small (I4).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from cdp_common import statefile
from cdp_common.errors import CorruptStateError, StorageError
from cdp_common.timefmt import iso_utc

GAPS_FILE = "gaps.json"
KIND = "gaps"
VERSION = 1
MAX_GAPS = 256


@dataclass
class GapRecord:
    begin_seq: int
    end_seq: int = 0
    begin_time_ns: int = 0
    end_time_ns: int = 0
    reason: str = "overflow"

    @property
    def open(self) -> bool:
        return self.end_seq == 0

    def covers(self, last_seq: int) -> bool:
        """Is the restore point ending at last_seq inside this gap (inconsistent)?"""
        return self.begin_seq <= last_seq and (self.open or last_seq < self.end_seq)

    def describe(self) -> str:
        """The gap in words, for errors and replies."""
        span = (f"last seq {self.begin_seq} and later (still open)" if self.open
                else f"last seq {self.begin_seq}..{self.end_seq - 1}")
        since = f", since {iso_utc(self.begin_time_ns)}" if self.begin_time_ns else ""
        return f"{self.reason} gap: points with {span}{since}"


class GapBook:
    def __init__(self, directory: Path, gaps: list[GapRecord] | None = None) -> None:
        self.path = directory / GAPS_FILE
        self.gaps: list[GapRecord] = gaps or []

    @classmethod
    def load(cls, directory: Path) -> GapBook:
        path = directory / GAPS_FILE
        data = statefile.load(path, KIND, VERSION)
        if data is None:
            return cls(directory)
        try:
            gaps = [GapRecord(int(g["begin_seq"]), int(g["end_seq"]), int(g["begin_time_ns"]),
                              int(g["end_time_ns"]), str(g.get("reason", "overflow")))
                    for g in data["gaps"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptStateError(f"{path}: malformed gap file ({exc})") from None
        return cls(directory, gaps)

    @property
    def open_gap(self) -> GapRecord | None:
        return self.gaps[-1] if self.gaps and self.gaps[-1].open else None

    def note(self, first_seq: int, last_seq: int, begin_time_ns: int, after_seq: int,
             end_seq: int, end_time_ns: int, reason: str = "") -> bool:
        """Record what one delta [first_seq, last_seq] says about gaps; True if changed.
        `reason`: why the gap opened, as the filter said ("": an older filter, taken
        as "overflow")."""
        if not begin_time_ns and not end_seq:
            return False
        changed = False
        g = self.open_gap
        if g is None and begin_time_ns:
            begin = after_seq + 1 if after_seq else first_seq
            # A resent delta of a gap already closed must not open it again.
            if not any(x.begin_seq == begin and not x.open for x in self.gaps):
                g = GapRecord(begin, 0, begin_time_ns, 0, reason or "overflow")
                self.gaps.append(g)
                changed = True
        if end_seq and first_seq <= end_seq <= last_seq:
            if g is None:
                begin = after_seq + 1 if after_seq else first_seq
                if any(x.begin_seq == begin and x.end_seq == end_seq for x in self.gaps):
                    return changed
                g = GapRecord(begin, 0, begin_time_ns, 0, reason or "overflow")
                self.gaps.append(g)
            g.end_seq = end_seq
            g.end_time_ns = end_time_ns
            changed = True
        if len(self.gaps) > MAX_GAPS:
            a, b = self.gaps[0], self.gaps[1]
            self.gaps[:2] = [GapRecord(a.begin_seq, b.end_seq, a.begin_time_ns, b.end_time_ns,
                                       "merged")]
        return changed

    def hold_open(self, begin_seq: int, time_ns: int, reason: str = "corrupt") -> None:
        """Make every point from begin_seq on inconsistent until the next gap end
        (a corrupt delta, cdp_target.repair): widen the open gap or open one."""
        g = self.open_gap
        if g is not None:
            g.begin_seq = min(g.begin_seq, begin_seq)
            return
        self.gaps.append(GapRecord(begin_seq, 0, time_ns, 0, reason))

    def save(self) -> None:
        try:
            statefile.save(self.path, KIND, VERSION, {"gaps": [asdict(g) for g in self.gaps]})
        except OSError as exc:
            raise StorageError(f"{self.path}: cannot save gaps ({exc.strerror})") from None

    def inconsistent(self, last_seq: int) -> bool:
        return self.covering(last_seq) is not None

    def covering(self, last_seq: int) -> GapRecord | None:
        """The gap the point ending at last_seq lies in, or None: consistent."""
        return next((g for g in self.gaps if g.covers(last_seq)), None)
