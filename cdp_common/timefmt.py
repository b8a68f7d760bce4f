"""Times for people: ns since the epoch as ISO 8601 UTC (one format for every message)."""

from __future__ import annotations

import datetime as dt


def iso_utc(time_ns: int) -> str:
    """ns since the epoch -> ISO 8601 UTC with milliseconds, e.g. 2024-05-01T12:30:00.123Z."""
    t = dt.datetime.fromtimestamp(time_ns / 1e9, tz=dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"
