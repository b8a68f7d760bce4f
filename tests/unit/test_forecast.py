"""cdp_common.forecast: a steady rise is forecast, anything else is not."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdp_common.forecast import Trend


def fed(values: list[float], step: float = 1.0, **kw: float) -> Trend:
    t = Trend(**kw)
    for i, v in enumerate(values):
        t.add(i * step, v)
    return t


def test_a_steady_rise_gives_the_time_to_the_limit() -> None:
    t = fed([5 + 0.5 * i for i in range(20)])       # 0.5 s/s, now at 14.5
    assert t.slope() == pytest.approx(0.5)
    assert t.eta(30) == pytest.approx((30 - 14.5) / 0.5)
    assert t.eta(10) == 0.0                          # past it already


@pytest.mark.parametrize("values", [
    [1.0] * 20,                                       # flat
    [20 - i for i in range(20)],                      # falling
    [0, 0, 30, 31, 0, 1, 2, 3, 4, 5, 6, 7],           # a jump that fell back (idle lag)
    [1, 2, 3],                                        # too few samples
])
def test_no_forecast_without_a_steady_rise(values: list[float]) -> None:
    t = fed(values)
    assert t.slope() is None
    assert t.eta(1000) is None


def test_the_window_forgets_and_a_short_span_is_not_enough() -> None:
    t = fed([0, 0, 0, 0, 0] + [i for i in range(40)])
    assert t.samples[0][0] >= 44 - 30
    assert t.slope() == pytest.approx(1.0)
    short = fed([0, 1, 2, 3, 4, 5], step=1.0, min_span_s=10.0)
    assert short.slope() is None
    assert fed([1, 2], step=1.0).eta(0.5) == 0.0


def test_samples_at_the_same_instant_or_back_in_time_are_ignored() -> None:
    t = Trend()
    t.add(10, 1)
    t.add(10, 99)
    t.add(9, 99)
    assert list(t.samples) == [(10, 1)]


@given(st.floats(0.01, 100), st.floats(0, 1000), st.floats(1, 5000))
def test_eta_is_exact_for_a_line(slope: float, start: float, above: float) -> None:
    values = [start + slope * i for i in range(15)]
    limit = values[-1] + above
    eta = fed(values).eta(limit)
    assert eta == pytest.approx(above / slope, rel=1e-6)


# ---------------------------------------------------------------- the coordinator's use

def run_lab(lag_of: list[float], error_s: float = 30.0) -> list[tuple[float, str, float]]:
    """Heartbeats once a second: the filter captures now, the target is durable
    through the capture of `lag` seconds ago. (lag, state, rpo_breach_in_s) each second."""
    from test_coordinator_state import lab, policy

    from cdp_coordinator.state import Report
    s = lab(policies=[policy("p1", rpo_warning_s=error_s * 2 / 3, rpo_error_s=error_s)])
    out = []
    for i, lag in enumerate(lag_of):
        now, wall = 1.0 + i, 1000.0 + i
        for nid in ("sp-1", "tp-1"):
            s.heartbeat(nid, [], now)
        s.heartbeat("filter-1", [Report("p1", captured_seq=10 + i,
                                        captured_time_ns=int(wall * 1e9))], now)
        s.heartbeat("target-1", [Report("p1", durable_seq=9 + i,
                                        newest_time_ns=int((wall - lag) * 1e9))], now)
        p = s.status(now, wall_now=wall).policies[0]
        out.append((p.rpo_lag_s, p.reason, p.rpo_breach_in_s))
    return out


def test_a_steadily_rising_lag_is_forecast_before_the_breach() -> None:
    rows = run_lab([1 + 0.5 * i for i in range(60)])      # a link at half the write rate
    first = next(i for i, (_, reason, _) in enumerate(rows) if "is rising" in reason)
    lag, reason, eta = rows[first]
    assert lag < 30.0, "the forecast came only after the breach"
    assert "reaches the error threshold 30s in ~" in reason
    assert eta == pytest.approx((30 - lag) / 0.5, rel=0.05)
    breach = next(i for i, (lag, _, _) in enumerate(rows) if lag >= 30)
    assert breach - first >= 5, (first, breach)            # a real warning ahead of it
    assert rows[breach][2] == 0.0                          # past it: no forecast, an error


def test_a_lag_that_jumps_and_falls_back_is_not_forecast() -> None:
    lags = ([0.0] * 5 + [12.0, 13.0, 0.0, 0.5] + [0.0] * 5) * 3   # idle spells' artefact
    assert all("is rising" not in reason and eta == 0 for _, reason, eta in run_lab(lags))


def test_the_filter_forecasts_its_journal_and_the_coordinator_says_so(tmp_path: Path) -> None:
    from test_coordinator_state import lab

    from cdp_coordinator.state import Report
    from cdp_filter.journal import Journal
    from cdp_filter.policy import PolicyRuntime
    j = Journal.open(str(tmp_path / "j"), 1 << 20, 1 << 24, policy="p1")
    rt = PolicyRuntime("p1", j, [])
    try:
        etas = []
        for second in range(20):                       # 64 KiB a second into a 16 MiB cap
            for _ in range(16):
                j.append(second, 0, 0, b"x" * 4096)
            etas.append(rt.journal_full_in(now=float(second)))
        assert etas[0] == 0.0                          # not enough history yet
        grown = j.size_bytes
        assert etas[-1] == pytest.approx(((1 << 24) - grown) / (grown / 20), rel=0.1)
    finally:
        j.close()
    s = lab()
    s.heartbeat("filter-1", [Report("p1", captured_seq=1, captured_time_ns=10**12,
                                    journal_full_in_s=120.0)], 1)
    p = s.status(1, wall_now=1000).policies[0]
    assert p.journal_full_in_s == 120.0
    assert "filter-1: the journal fills in ~120s at this pace" in p.reason
