"""Retention planner (pure) and the CLI's time helpers."""

from __future__ import annotations

import pytest

from cdp_common.errors import FormatError
from cdp_target import points as P
from cdpctl.state import UsageError
from cdpctl.targetcall import iso, parse_time

S = P.NS


def chain(n: int, dt_s: int = 2) -> P.Catalog:
    cat = P.Catalog()
    for i in range(1, n + 1):
        cat = cat.with_applied(i - 1, i, i * dt_s * S, None if i == 1 else 10)
    return cat


def test_with_applied_is_idempotent_and_chains() -> None:
    cat = chain(5)
    assert cat.with_applied(4, 5, 99, 10) is cat
    assert [p.id for p in cat.points] == [1, 2, 3, 4, 5]
    cat.check()
    assert cat.size_of(cat.points[0]) == 10 and cat.size_of(cat.points[-1]) == 0


def test_expiry_deletes_old_segments_and_keeps_the_newest() -> None:
    cat = chain(10)
    r = P.Retention(short_term_retention_s=5, long_term_interval_s=1e9,
                    long_term_retention_s=1e9)
    plan = P.plan_retention(cat, 10 * 2 * S, r)
    kept = [p.id for p in plan.catalog.points]
    assert kept[0] == 1 and kept[-1] == 10          # first point is long-term
    assert all(p.kind == P.LONG or 20 * S - p.time_ns <= 5 * S for p in plan.catalog.points)
    plan.catalog.check()
    # everything expires: only the newest remains, every segment deleted
    plan = P.plan_retention(cat, 10**6 * S, P.Retention(1, 1, 1))
    assert [p.id for p in plan.catalog.points] == [10]
    assert len(plan.delete) == 9 and not plan.catalog.segments


def test_runs_merge_between_long_points() -> None:
    cat = chain(30)
    r = P.Retention(short_term_retention_s=10, long_term_interval_s=20,
                    long_term_retention_s=1e9)
    plan = P.plan_retention(cat, 60 * S, r)
    assert plan.merges
    for m in plan.merges:
        assert next(s.lo for s in m.old) == m.new.lo and m.old[-1].hi == m.new.hi
    final = P.finish_merge(plan, {(m.new.lo, m.new.hi): 1 for m in plan.merges})
    final.check()


def test_compact_run_bounds_segments_in_a_run() -> None:
    cat = chain(40)
    r = P.Retention(short_term_retention_s=1e9, long_term_interval_s=1e9,
                    long_term_retention_s=1e9, compact_run=4)
    plan = P.plan_retention(cat, 80 * S, r)
    assert not plan.merges            # nothing dropped: every boundary is a point


def test_catalog_json_round_trip_and_errors() -> None:
    cat = chain(4).mark_long(3)
    assert P.Catalog.from_json(cat.to_json(), "x") == cat
    bad = cat.to_json()
    bad["segments"] = bad["segments"][1:]
    with pytest.raises(FormatError, match="chain"):
        P.Catalog.from_json(bad, "x")
    with pytest.raises(FormatError, match="greater than 0"):
        P.Retention(0, 1, 1).check()


def test_time_parsing() -> None:
    assert parse_time("1970-01-01T00:00:01Z") == S
    assert parse_time("1970-01-01T01:00:00+01:00") == 0
    assert parse_time("1970-01-01T00:00:02") == 2 * S
    assert iso(1500 * 1_000_000) == "1970-01-01T00:00:01.500Z"
    with pytest.raises(UsageError, match="ISO 8601"):
        parse_time("yesterday")
