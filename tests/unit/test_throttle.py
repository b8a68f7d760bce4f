"""The source proxy's token bucket (bandwidth limit), with an injected clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdp_proxy.throttle import TokenBucket, rate_bytes_per_s


def test_rate_of_limits() -> None:
    assert rate_bytes_per_s(8) == 1_000_000
    for bad in (0, -1, float("nan"), float("inf")):
        assert rate_bytes_per_s(bad) == 0
    with pytest.raises(ValueError):
        TokenBucket(0, 0)


def test_burst_then_paced() -> None:
    b = TokenBucket(1000, now=0, burst=500)
    assert b.reserve(500, 0) == 0
    assert b.reserve(250, 0) == pytest.approx(0.25)
    # a frame larger than the burst is allowed, its debt delays the next one
    assert b.reserve(2000, 0.25) == pytest.approx(2.0)
    assert b.reserve(0, 10) == 0 and b.tokens == 500   # refills to the burst, no more


@given(st.lists(st.tuples(st.integers(1, 200_000), st.floats(0, 0.5)), min_size=1,
                max_size=60))
def test_never_faster_than_rate_plus_burst(frames: list[tuple[int, float]]) -> None:
    rate, burst = 100_000.0, 25_000.0
    b = TokenBucket(rate, now=0, burst=burst)
    now = 0.0
    sent = 0
    for size, gap in frames:
        now += gap
        now += b.reserve(size, now)     # the sender sleeps, then sends
        sent += size
        assert sent <= burst + rate * now + 1e-6 * sent
