"""The wall clock of this process: what capture times and heartbeats are stamped with.

One function so that a test can run a daemon with a skewed clock without
touching the host's: CDP_CLOCK_OFFSET_MS (a test hook, read once at import)
is added to every reading. Durations use time.monotonic(), never this.
"""

from __future__ import annotations

import os
import time

OFFSET_ENV = "CDP_CLOCK_OFFSET_MS"


def _offset_ns() -> int:
    raw = os.environ.get(OFFSET_ENV, "").strip()
    if not raw:
        return 0
    try:
        return int(float(raw) * 1_000_000)
    except ValueError:
        raise SystemExit(f"{OFFSET_ENV}={raw!r}: expected milliseconds, e.g. 1500") from None


OFFSET_NS = _offset_ns()


def wall_ns() -> int:
    """Nanoseconds since the epoch, as this process's clock says (plus the test offset)."""
    return time.time_ns() + OFFSET_NS


def describe_offset(node_id: str, offset_s: float) -> str:
    """A node's clock offset (node minus coordinator) in words, for status and health."""
    side = "ahead of" if offset_s > 0 else "behind"
    return f"clock of {node_id} is {abs(offset_s):.2f}s {side} the coordinator's"
