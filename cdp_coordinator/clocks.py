"""Each node's clock offset from the coordinator's, from its heartbeats (pure).

A heartbeat carries the node's wall clock when it was sent (`sent_ns`); the
coordinator notes its own wall clock on receipt. One sample is
``sent - received`` = offset - one-way delay, so it never overstates a node
that is ahead and never understates one that is behind by more than the
delay. The estimate is the sample of the last WINDOW with the smallest delay
under the assumption that the offset held still: the largest one. Heartbeats
come every second or so, so a clock step shows within WINDOW of them.

The offset is node clock minus coordinator clock, in seconds: positive when
the node's clock is ahead. Capture times are the filter's clock, so the RPO
lag subtracts the filter's offset (cdp_coordinator.status).
"""

from __future__ import annotations

from collections import deque

WINDOW = 8


class ClockBook:
    def __init__(self) -> None:
        self._samples: dict[str, deque[float]] = {}

    def note(self, node_id: str, sent_ns: int, received_wall_s: float) -> None:
        """One heartbeat; sent_ns 0 (a node too old to say) is ignored."""
        if sent_ns <= 0:
            return
        self._samples.setdefault(node_id, deque(maxlen=WINDOW)).append(
            sent_ns / 1e9 - received_wall_s)

    def offset_s(self, node_id: str) -> float | None:
        """The estimate, or None when the node never said its clock."""
        s = self._samples.get(node_id)
        return max(s) if s else None

    def offsets(self) -> dict[str, float]:
        return {n: max(s) for n, s in self._samples.items() if s}

    def forget(self, node_id: str) -> None:
        self._samples.pop(node_id, None)
