"""Repair of a corrupt committed delta from the source (issue 5, item 7).

Theory of operation
-------------------
A committed delta whose CRC fails at apply cannot be resent: it was acked, so
the filter trimmed it. The store (cdp_target.store, `on_corrupt`) then

1. calls `Repairer.corrupt(first, last)`: `repair.json` records
   `resync_needed` with the seq range and a new `request_id`, and the gap
   book gains an open gap from `first` (reason "corrupt"): restore points
   from there on lack the delta's unknown extents;
2. moves the file to ``<policy>/quarantine/`` (kept for forensics, never
   deleted by cdp) and applies it as an *empty* delta, so applied_seq, the
   restore-point chain and later deltas go on (durable_seq never goes back).

The target reports `request_id` in its heartbeat while `resync_needed`
holds; the coordinator turns every new id into a `RequestSync` of the policy
(a new `sync_request_id` in the assignment), and the filter runs a digest
sync: every region that differs from the replica is resent, then a GAP_END
marker ends the sync's gap. When a delta carrying that GAP_END is committed
(`gap_end`) the repair is *done once applied* (`clear_at_seq`); `applied`
clears `resync_needed` when applied_seq reaches it. The gap closes there.

Which GAP_END counts: only one of a gap that began after the corruption was
found (`begin_time_ns > mark_time_ns`, or `after_seq > mark_durable_seq`: the
filter had seen an ack sent after the mark). An older gap's end (an
overflow resync that was running) does not: the corrupt gap is held open
again from its end, and the request is sent again with a new id, so the
repair converges even across clock skew (the next sync's after_seq is past
the mark).

Pure core `RepairCore` (no I/O, injected `now_ns`); `Repairer` is the file
shell, thread-safe (the apply thread and the receive path both call it).
File: ``{"version": 1, "resync_needed", "ranges": [[first, last], ...],
"request_id", "mark_time_ns", "mark_durable_seq", "clear_at_seq",
"repaired"}``, replaced atomically.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdp_common import statefile
from cdp_common.errors import CorruptStateError, StorageError
from cdp_target.gaps import GapBook

log = logging.getLogger("target.repair")

REPAIR_FILE = "repair.json"
KIND = "repair"
VERSION = 1
QUARANTINE_DIR = "quarantine"


@dataclass
class RepairCore:
    resync_needed: bool = False
    ranges: list[list[int]] = field(default_factory=list)   # corrupt deltas not yet repaired
    request_id: int = 0
    mark_time_ns: int = 0
    mark_durable_seq: int = 0
    clear_at_seq: int = 0
    repaired: int = 0                                        # ranges repaired so far

    def corrupt(self, first: int, last: int, now_ns: int, durable_seq: int) -> None:
        """A committed delta [first, last] failed its check: ask for a resync."""
        if [first, last] not in self.ranges:
            self.ranges.append([first, last])
        self._ask(now_ns, durable_seq)

    def _ask(self, now_ns: int, durable_seq: int) -> None:
        self.resync_needed = True
        self.request_id = max(now_ns, self.request_id + 1)
        self.mark_time_ns = now_ns
        self.mark_durable_seq = durable_seq
        self.clear_at_seq = 0

    def gap_end(self, begin_time_ns: int, after_seq: int, end_seq: int, now_ns: int,
                durable_seq: int) -> str:
        """A committed delta ends a gap at end_seq. Returns "done" (this resync repairs
        it: cleared once applied), "again" (too old: asked again) or ""."""
        if not self.resync_needed or self.clear_at_seq:
            return ""
        if begin_time_ns > self.mark_time_ns or after_seq > self.mark_durable_seq:
            self.clear_at_seq = end_seq
            return "done"
        self._ask(now_ns, durable_seq)
        return "again"

    def applied(self, applied_seq: int) -> bool:
        """applied_seq advanced; True when this clears resync_needed."""
        if self.resync_needed and self.clear_at_seq and applied_seq >= self.clear_at_seq:
            self.resync_needed = False
            self.repaired += len(self.ranges)
            self.ranges = []
            self.clear_at_seq = 0
            return True
        return False

    def text(self) -> str:
        if not self.resync_needed:
            return ""
        spans = ", ".join(f"{a}..{b}" for a, b in self.ranges)
        return (f"committed delta for seqs {spans} was corrupt (checksum mismatch): "
                f"quarantined, never applied; replica inconsistent until a digest resync "
                f"from the source ends")

    def to_json(self) -> dict[str, Any]:
        return {"version": VERSION, "resync_needed": self.resync_needed, "ranges": self.ranges,
                "request_id": self.request_id, "mark_time_ns": self.mark_time_ns,
                "mark_durable_seq": self.mark_durable_seq, "clear_at_seq": self.clear_at_seq,
                "repaired": self.repaired}

    @classmethod
    def from_json(cls, data: Any) -> RepairCore:
        if not isinstance(data, dict) or data.get("version") != VERSION:
            raise ValueError("unsupported version")
        ranges = [[int(a), int(b)] for a, b in data.get("ranges", [])]
        return cls(bool(data["resync_needed"]), ranges, int(data["request_id"]),
                   int(data["mark_time_ns"]), int(data["mark_durable_seq"]),
                   int(data["clear_at_seq"]), int(data.get("repaired", 0)))


class Repairer:
    """repair.json of one policy, plus the corrupt gap in its GapBook."""

    def __init__(self, directory: Path, gaps: Callable[[], GapBook], gap_lock: threading.Lock,
                 durable_seq: Callable[[], int], now_ns: Callable[[], int] = time.time_ns,
                 ) -> None:
        self.dir = directory
        self.path = directory / REPAIR_FILE
        self.gaps = gaps
        self.gap_lock = gap_lock
        self.durable_seq = durable_seq
        self.now_ns = now_ns
        self.lock = threading.Lock()
        self.core = self._load()

    def _load(self) -> RepairCore:
        data = statefile.load(self.path, KIND, VERSION)
        if data is None:
            return RepairCore()
        try:
            return RepairCore.from_json(data)
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptStateError(f"{self.path}: malformed repair state ({exc})") from None

    def _save(self) -> None:
        try:
            statefile.save(self.path, KIND, VERSION, self.core.to_json())
        except OSError as exc:
            raise StorageError(f"{self.path}: cannot save repair state ({exc.strerror})") \
                from None

    @property
    def request_id(self) -> int:
        """Nonzero while a resync from the source is needed (heartbeat field)."""
        return self.core.request_id if self.core.resync_needed else 0

    def text(self) -> str:
        return self.core.text()

    # ------------------------------------------------------------ events

    def corrupt(self, first: int, last: int, why: str) -> None:
        """Store hook, before the delta is moved aside: persist the need and the gap."""
        with self.lock:
            self.core.corrupt(first, last, self.now_ns(), self.durable_seq())
            self._save()
        with self.gap_lock:
            book = self.gaps()
            book.hold_open(first, self.now_ns(), "corrupt")
            book.save()
        log.error("committed delta for seqs %d..%d is corrupt (%s): quarantined, never "
                  "applied; asking the source for a digest resync", first, last, why,
                  extra={"policy": self.dir.name, "seq": first})

    def gap_end(self, begin_time_ns: int, after_seq: int, end_seq: int) -> bool:
        """Receive path, under the gap lock, after the gap book noted the delta
        (before it is saved and the delta committed). True if the book changed."""
        with self.lock:
            verdict = self.core.gap_end(begin_time_ns, after_seq, end_seq, self.now_ns(),
                                        self.durable_seq())
            if not verdict:
                return False
            self._save()
        if verdict == "again":
            # an older resync ended: the corrupt range is still not covered
            self.gaps().hold_open(end_seq, self.now_ns(), "corrupt")
            log.warning("a gap that began before the corruption ended at seq %d; asking "
                        "for a digest resync again", end_seq, extra={"policy": self.dir.name})
            return True
        log.info("the digest resync ends at seq %d; the repair is done once it is "
                 "applied", end_seq, extra={"policy": self.dir.name, "seq": end_seq})
        return False

    def applied(self, applied_seq: int) -> None:
        with self.lock:
            if not self.core.applied(applied_seq):
                return
            self._save()
        log.info("repaired from the source: the replica holds the resynced regions "
                 "(applied through seq %d)", applied_seq,
                 extra={"policy": self.dir.name, "seq": applied_seq})
