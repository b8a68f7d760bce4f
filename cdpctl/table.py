"""Aligned tables for human output (scripts use --json).

On a terminal the header is bold and state words are coloured (ok/up/alive
green, warning/degraded/unprotected yellow, error/down/dead red); piped or
redirected output, a TERM of "dumb" or a set NO_COLOR (https://no-color.org
convention) gives plain text, byte for byte what scripts and tests have
always seen. Padding is computed on the plain text, so colours never break
the alignment. No third-party dependency: a table of a few columns does not
need one.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import TextIO

BOLD, RESET = "\x1b[1m", "\x1b[0m"
GREEN, YELLOW, RED = "\x1b[32m", "\x1b[33m", "\x1b[31m"
STATE_COLORS = {"ok": GREEN, "up": GREEN, "alive": GREEN, "serving": GREEN,
                "warning": YELLOW, "degraded": YELLOW, "unprotected": YELLOW,
                "error": RED, "down": RED, "dead": RED}


def use_color(stream: TextIO | None = None, env: Mapping[str, str] | None = None) -> bool:
    """Colour only on a terminal, and never with NO_COLOR set or TERM=dumb."""
    stream = sys.stdout if stream is None else stream
    env = os.environ if env is None else env
    if env.get("NO_COLOR") or env.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def render(headers: Sequence[str], rows: Sequence[Sequence[object]],
           right: Sequence[str] = (), color: bool | None = None) -> str:
    """A table with a header line, columns two spaces apart.

    Columns named in `right` (numbers) are right-aligned; the last column is
    not padded, so lines carry no trailing blanks. `color` None means "if
    stdout is a terminal" (see use_color).
    """
    if color is None:
        color = use_color()
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    for r in cells:
        if len(r) != len(headers):
            raise ValueError(f"row has {len(r)} cells, expected {len(headers)}: {r!r}")
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for row_no, r in enumerate(cells):
        parts = []
        for i, cell in enumerate(r):
            last = i == len(r) - 1
            if headers[i] in right:
                text = cell.rjust(widths[i])
            else:
                text = cell if last else cell.ljust(widths[i])
            if color:
                text = _paint(text, cell, header=row_no == 0)
            parts.append(text)
        line = "  ".join(parts)
        lines.append(line if color else line.rstrip())
    return "\n".join(lines)


def _paint(padded: str, cell: str, header: bool) -> str:
    code = BOLD if header else STATE_COLORS.get(cell.strip().lower(), "")
    if not code or not cell:
        return padded
    start = padded.index(cell)
    return padded[:start] + code + cell + RESET + padded[start + len(cell):]
