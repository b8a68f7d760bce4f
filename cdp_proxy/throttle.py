"""Token bucket for the per-policy bandwidth limit (pure: injected clock).

Theory of operation
-------------------
A policy's `bandwidth_limit_mbps` (Mbit/s, 0 = unlimited) reaches the source
proxy in the filter's ShipHello. The sender asks `TokenBucket.reserve(n, now)`
before writing a frame of `n` bytes and sleeps for the returned number of
seconds. Tokens accrue at `rate` bytes/s up to `burst` bytes; a reservation
always succeeds and may drive the balance negative (a frame can be larger
than the burst), so the delay of the *next* reservation pays the debt.
Over any window of T seconds at most `burst + rate * T` bytes leave,
whatever the frame sizes; with no traffic the bucket refills to `burst`,
never more, so an idle policy cannot save up for a long spike.
"""

from __future__ import annotations

import math

BITS_PER_MBIT = 1_000_000
DEFAULT_BURST_S = 0.25
"""Burst size as seconds at the limit (a quarter second keeps the line busy
without letting a 1 MiB frame overshoot much)."""


def rate_bytes_per_s(limit_mbps: float) -> float:
    """Bytes/s of a Mbit/s limit; 0 (unlimited) for 0, negative or non-finite input."""
    if not math.isfinite(limit_mbps) or limit_mbps <= 0:
        return 0.0
    return limit_mbps * BITS_PER_MBIT / 8


class TokenBucket:
    def __init__(self, rate: float, now: float, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive (use no bucket for unlimited)")
        self.rate = rate
        self.burst = burst if burst is not None else max(rate * DEFAULT_BURST_S, 1.0)
        self.tokens = self.burst
        self.last = now

    def reserve(self, n: int, now: float) -> float:
        """Take `n` bytes' worth of tokens; returns how long to wait before sending."""
        if now > self.last:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate
