"""Size parsing and human formatting of cdpctl."""

from __future__ import annotations

import pytest

from cdp_common.errors import ConfigError
from cdpctl.units import format_bytes, format_seconds, parse_size


@pytest.mark.parametrize(("text", "expected"), [
    ("256M", 256 << 20), ("1G", 1 << 30), ("1g", 1 << 30), ("1GiB", 1 << 30), ("1GB", 1 << 30),
    ("4096", 4096), ("64K", 64 << 10), ("1.5G", 3 << 29), (" 2 T ", 2 << 40), ("8k", 8192),
])
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(("text", "why"), [
    ("", "expected a number"), ("G", "expected a number"), ("-1G", "expected a number"),
    ("1X", "expected a number"), ("0", "greater than 0"), ("100", "multiple of 4096"),
    ("1.0000001K", "whole number"), ("1e9", "expected a number"),
])
def test_parse_size_rejects(text: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        parse_size(text)


def test_parse_size_without_block_rule() -> None:
    assert parse_size("100", multiple_of=1) == 100


def test_format_bytes() -> None:
    assert format_bytes(0) == "0 B"
    assert format_bytes(1023) == "1023 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(256 << 20) == "256.0 MiB"
    assert format_bytes(3 << 40) == "3.0 TiB"
    assert format_bytes(5 << 50) == "5120.0 TiB"


def test_format_seconds() -> None:
    assert format_seconds(0) == "0.0s"
    assert format_seconds(2.46) == "2.5s"
    assert format_seconds(75) == "1m15s"
    assert format_seconds(4000) == "1h06m"
