#!/usr/bin/env python3
"""Print the config reference (Markdown) from the config dataclasses' field docs.

    .venv/bin/python scripts/gen_config_docs.py            # to stdout
    .venv/bin/python scripts/gen_config_docs.py --write    # into docs/OPERATIONS.md

`--write` replaces the text between the markers
`<!-- config-reference:begin -->` and `<!-- config-reference:end -->`.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cdp_common import config as c

DAEMONS = [("cdp-coordinator", c.CoordinatorConfig), ("cdp-filter", c.FilterConfig),
           ("cdp-proxy", c.ProxyConfig), ("cdp-target", c.TargetConfig)]
BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"
DOC = Path(__file__).resolve().parents[1] / "docs" / "OPERATIONS.md"


def _type(tp: Any) -> str:
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        return "list of strings" if item is str else "list of tables"
    return {int: "integer", float: "number", str: "string", bool: "boolean"}.get(tp, "table")


def _default(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            return f'`"{value}"`'
        if isinstance(value, int) and value >= 1 << 20 and value % (1 << 20) == 0:
            return f"`{value}` ({value >> 20} MiB)"
        return f"`{value}`"
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return "(empty)" if f.default_factory is list else "(defaults)"  # type: ignore[misc]
    return "**required**"


def _section(cls: type, prefix: str, out: list[str], seen: set[str]) -> None:
    hints = typing.get_type_hints(cls)
    rows, nested = [], []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner = typing.get_args(tp)[0] if typing.get_origin(tp) is list else tp
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(inner):
            nested.append((inner, f"[[{name}]]" if typing.get_origin(tp) is list else f"[{name}]",
                           f.metadata.get("doc", "")))
            continue
        rows.append(f"| `{f.name}` | {_type(tp)} | {_default(f)} | {f.metadata.get('doc', '')} |")
    if rows:
        out += ["| key | type | default | meaning |", "|---|---|---|---|", *rows, ""]
    for inner, header, doc in nested:
        out += [f"`{header}` {doc}".rstrip(), ""]
        _section(inner, header.strip("[]") + ".", out, seen)


def reference() -> str:
    out: list[str] = []
    for name, cls in DAEMONS:
        out += [f"#### {name}", ""]
        _section(cls, "", out, set())
    return "\n".join(out).rstrip() + "\n"


def main() -> int:
    text = reference()
    if "--write" not in sys.argv[1:]:
        print(text, end="")
        return 0
    doc = DOC.read_text()
    start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
    DOC.write_text(doc[:start] + "\n" + text + doc[end:])
    print(f"updated {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
