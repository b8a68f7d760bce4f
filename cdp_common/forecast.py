"""When will a rising figure reach its limit? The pure core of cdp's forecasts.

The filter forecasts when a policy's journal reaches its cap (then it
overflows into dirty tracking and a gap opens); the coordinator when a
policy's RPO lag reaches rpo_error_s. Both feed a `Trend` one sample per
report (time injected) and ask `eta(limit)`.

A forecast is made only from a steady rise: at least MIN_SAMPLES samples
spanning at least `min_span_s` of the last `window_s`, a least-squares slope
above `min_slope`, and no sample more than `tolerance` below the one before
it. A figure that jumps and falls back (the RPO lag after an idle spell, a
journal trimmed by a burst of acks) gives no forecast rather than a false
alarm; a link too slow for the writes makes the lag rise steadily and is
forecast well before the threshold.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

MIN_SAMPLES = 5


@dataclass
class Trend:
    window_s: float = 30.0
    min_span_s: float = 10.0
    min_slope: float = 0.0
    tolerance: float = 0.0
    min_interval_s: float = 0.0
    samples: deque[tuple[float, float]] = field(default_factory=deque)

    def add(self, t: float, value: float) -> None:
        """One sample at time `t` (seconds, monotonic); older than the window are dropped,
        one closer than `min_interval_s` to the last kept is ignored."""
        if self.samples and t < self.samples[-1][0] + max(self.min_interval_s, 1e-9):
            return   # the same instant, too soon, or a clock step back: keep the first
        self.samples.append((t, value))
        while self.samples and self.samples[0][0] < t - self.window_s:
            self.samples.popleft()

    def reset(self) -> None:
        self.samples.clear()

    def slope(self) -> float | None:
        """Units per second over the window when the rise is steady, else None."""
        s = self.samples
        if len(s) < MIN_SAMPLES or s[-1][0] - s[0][0] < self.min_span_s:
            return None
        if any(b[1] < a[1] - self.tolerance for a, b in zip(s, list(s)[1:], strict=False)):
            return None
        n = len(s)
        mt = sum(t for t, _ in s) / n
        mv = sum(v for _, v in s) / n
        var = sum((t - mt) ** 2 for t, _ in s)
        if var <= 0:
            return None
        k = sum((t - mt) * (v - mv) for t, v in s) / var
        return k if k > self.min_slope else None

    def eta(self, limit: float) -> float | None:
        """Seconds from the last sample until the figure reaches `limit` at the
        current slope; 0 when it is there already; None when no steady rise."""
        if not self.samples:
            return None
        last = self.samples[-1][1]
        if last >= limit:
            return 0.0
        k = self.slope()
        if k is None:
            return None
        return (limit - last) / k
