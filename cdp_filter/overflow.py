"""Journal overflow → dirty tracking → resync: the pure state machine of one policy.

Theory of operation
-------------------
A policy is in one of three modes:

    JOURNALING  every write is journaled (normal operation);
    TRACKING    the journal overflowed (cap reached, or an append failed with
                ENOSPC/EDQUOT): writes only mark dirty blocks, nothing is
                journaled; the time since the overflow is an open *gap*;
    RESYNCING   the link is back: writes are journaled again, and a scan
                reads every dirty block from the image and appends it to the
                journal as a RESYNC record; when the scan has passed every
                block, a GAP_END marker is appended and the mode returns to
                JOURNALING. The first restore point whose last seq is at or
                after that marker is consistent again.

Transitions (one table, `TRANSITIONS`):

    mode        event           -> mode        action
    JOURNALING  overflow        -> TRACKING    DROP  (mark what the journal held, drop it)
    RESYNCING   overflow        -> TRACKING    DROP  (pending resync records are dropped too)
    TRACKING    overflow        -> TRACKING    NONE  (nothing is journaled)
    TRACKING    link_ready      -> RESYNCING   SCAN  (start the scan at block 0)
    JOURNALING  sync_request    -> RESYNCING   PLAN  (initial/operator sync: mark by digest, scan)
    RESYNCING   scan_done       -> JOURNALING  GAP_END
    *           anything else   -> unchanged   NONE

Resync ordering: the shell reads a block and appends its record in one
event-loop step, so the record carries the image content at its seq and any
later write to that block gets a later seq (later wins at the target).

Clearing bits (invariant B1 of cdp_filter.dirty): a bit is cleared only when
the target acked the seq of that block's resync record durable, and only if
no untracked write hit the block after the record was made (`written` in
TRACKING forgets the pending record). Writes in RESYNCING are journaled, so
they never need the bit.

Progress: blocks planned at scan start, blocks sent, bytes sent, with an
injected `now` for the rate and ETA.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field


class Mode(enum.Enum):
    JOURNALING = "journaling"
    TRACKING = "tracking"
    RESYNCING = "resyncing"


class Event(enum.Enum):
    OVERFLOW = "overflow"
    LINK_READY = "link_ready"
    SYNC_REQUEST = "sync_request"
    SCAN_DONE = "scan_done"


class Action(enum.Enum):
    NONE = "none"
    DROP = "drop"
    SCAN = "scan"
    PLAN = "plan"
    GAP_END = "gap_end"


TRANSITIONS: dict[tuple[Mode, Event], tuple[Mode, Action]] = {
    (Mode.JOURNALING, Event.OVERFLOW): (Mode.TRACKING, Action.DROP),
    (Mode.RESYNCING, Event.OVERFLOW): (Mode.TRACKING, Action.DROP),
    (Mode.TRACKING, Event.OVERFLOW): (Mode.TRACKING, Action.NONE),
    (Mode.TRACKING, Event.LINK_READY): (Mode.RESYNCING, Action.SCAN),
    (Mode.JOURNALING, Event.SYNC_REQUEST): (Mode.RESYNCING, Action.PLAN),
    (Mode.RESYNCING, Event.SCAN_DONE): (Mode.JOURNALING, Action.GAP_END),
}


@dataclass
class Gap:
    """The open gap: restore points after `lost_after_seq` are not consistent."""

    begin_time_ns: int
    lost_after_seq: int      # highest seq the target had acked when the gap began
    lost_through_seq: int    # highest seq dropped from the journal (0: none dropped)
    reason: str = "overflow"  # "overflow" | "initial" | "operator"


@dataclass
class Progress:
    planned_blocks: int = 0
    sent_blocks: int = 0
    sent_bytes: int = 0
    started: float = 0.0

    def rate(self, now: float) -> float:
        dt = now - self.started
        return self.sent_bytes / dt if dt > 0 else 0.0

    def eta_s(self, now: float, block_bytes: int) -> float:
        r = self.rate(now)
        left = max(0, self.planned_blocks - self.sent_blocks) * block_bytes
        return left / r if r > 0 else 0.0


@dataclass
class OverflowMachine:
    """Mode, gap, pending resync records and scan cursor of one policy."""

    mode: Mode = Mode.JOURNALING
    gap: Gap | None = None
    # (lost_after_seq, lost_through_seq) of the latest overflow; outlives the gap,
    # since the target may see the hole only after the gap was closed here.
    loss: tuple[int, int] | None = None
    cursor: tuple[int, int] = (0, 0)   # (disk index, block) where the scan goes on
    progress: Progress = field(default_factory=Progress)
    _pending: dict[tuple[int, int], int] = field(default_factory=dict)
    _order: deque[tuple[int, int, int]] = field(default_factory=deque)

    def handle(self, event: Event) -> Action:
        mode, action = TRANSITIONS.get((self.mode, event), (self.mode, Action.NONE))
        self.mode = mode
        if action is Action.DROP:
            self._pending.clear()
            self._order.clear()
        if action in (Action.SCAN, Action.PLAN):
            self.cursor = (0, 0)
        if action is Action.GAP_END:
            self.gap = None
        return action

    # ------------------------------------------------------------ gap

    def open_gap(self, time_ns: int, lost_after_seq: int, lost_through_seq: int,
                 reason: str = "overflow") -> Gap:
        """Begin a gap, or widen the open one (its begin stays: it is the oldest loss)."""
        if self.gap is None:
            self.gap = Gap(time_ns, lost_after_seq, lost_through_seq, reason)
        else:
            self.gap.lost_after_seq = min(self.gap.lost_after_seq, lost_after_seq)
            self.gap.lost_through_seq = max(self.gap.lost_through_seq, lost_through_seq)
        if lost_through_seq:
            after = lost_after_seq if self.loss is None else min(self.loss[0], lost_after_seq)
            self.loss = (after, lost_through_seq)
        return self.gap

    # ------------------------------------------------------------ resync bookkeeping

    def start_scan(self, planned_blocks: int, now: float) -> None:
        self.cursor = (0, 0)
        self.progress = Progress(planned_blocks, 0, 0, now)

    def sent(self, disk: int, block: int, seq: int, nbytes: int) -> None:
        """A resync record with `seq` now carries (disk, block)."""
        self._pending[(disk, block)] = seq
        self._order.append((seq, disk, block))
        self.progress.sent_blocks += 1
        self.progress.sent_bytes += nbytes

    def is_pending(self, disk: int, block: int) -> bool:
        return (disk, block) in self._pending

    def written(self, disk: int, blocks: range) -> None:
        """An untracked (TRACKING-mode) write hit `blocks`: their pending records are stale."""
        if self._pending:
            for b in blocks:
                self._pending.pop((disk, b), None)

    def acked(self, durable_seq: int) -> list[tuple[int, int]]:
        """The target has every seq <= durable_seq: the blocks whose bits may be cleared."""
        out = []
        order, pending = self._order, self._pending
        while order and order[0][0] <= durable_seq:
            seq, disk, block = order.popleft()
            if pending.get((disk, block)) == seq:
                del pending[(disk, block)]
                out.append((disk, block))
        return out

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    def hole_ok(self, resume_from_seq: int, oldest_seq: int) -> bool:
        """May the stream jump from resume_from_seq to oldest_seq? Only across seqs this
        filter dropped at an overflow (the bitmap covers them), never across seqs the
        target may need that were acked and trimmed."""
        if self.loss is None:
            return False
        after, through = self.loss
        return resume_from_seq >= after and oldest_seq - 1 <= through
