"""Parsing and printing of sizes and durations for the command line."""

from __future__ import annotations

import re

from cdp_common.errors import ConfigError

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)
BLOCK = 4096


def parse_size(text: str, multiple_of: int = BLOCK) -> int:
    """'256M' -> 268435456. Units are binary (K = 1024); 'MiB', 'MB', 'm' all mean MiB.

    The result must be positive and a multiple of `multiple_of` (disks are
    made of 4 KiB blocks).
    """
    m = _SIZE.match(text)
    if not m:
        raise ConfigError(f"size {text!r}: expected a number with an optional unit "
                          "K, M, G or T (e.g. 256M, 1G)")
    number, unit = m.groups()
    value = float(number) * _UNITS[unit.upper()]
    if value != int(value):
        raise ConfigError(f"size {text!r}: not a whole number of bytes")
    size = int(value)
    if size <= 0:
        raise ConfigError(f"size {text!r}: must be greater than 0")
    if multiple_of > 1 and size % multiple_of:
        raise ConfigError(f"size {text!r}: must be a multiple of {multiple_of} bytes")
    return size


def format_bytes(n: int | float) -> str:
    """1536 -> '1.5 KiB'; exact byte counts below 1 KiB."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{int(value)} B"
            return f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_seconds(s: float) -> str:
    """0.25 -> '0.2s', 75 -> '1m15s', 4000 -> '1h06m'."""
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"
