"""Aligned plain-text tables for human output (scripts use --json)."""

from __future__ import annotations

from collections.abc import Sequence


def render(headers: Sequence[str], rows: Sequence[Sequence[object]],
           right: Sequence[str] = ()) -> str:
    """A table with a header line, columns two spaces apart.

    Columns named in `right` (numbers) are right-aligned; the last column is
    not padded, so lines carry no trailing blanks.
    """
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    for r in cells:
        if len(r) != len(headers):
            raise ValueError(f"row has {len(r)} cells, expected {len(headers)}: {r!r}")
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        parts = []
        for i, cell in enumerate(r):
            last = i == len(r) - 1
            if headers[i] in right:
                parts.append(cell.rjust(widths[i]))
            else:
                parts.append(cell if last else cell.ljust(widths[i]))
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)
