"""A minimal TOML writer for the configs `cdpctl lab` generates.

Covers what cdp configs use: tables, arrays of tables, strings, integers,
floats, booleans and lists of scalars. Output parses back with tomllib to the
same dict (the unit tests check the round trip).
"""

from __future__ import annotations

import math
import re
from typing import Any

_BARE = re.compile(r"[A-Za-z0-9_-]+")  # used with fullmatch: "$" would accept a trailing newline


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n",
            "\f": "\\f", "\r": "\\r"}


def _string(s: str) -> str:
    out = []
    for ch in s:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _key(k: str) -> str:
    return k if _BARE.fullmatch(k) else _string(k)


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"cannot write {v!r} to TOML")
        return repr(v)
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, list) and all(not isinstance(x, dict) for x in v):
        return "[" + ", ".join(_scalar(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _is_table_array(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def _emit(out: list[str], path: list[str], table: dict[str, Any], header: str | None) -> None:
    scalars = [(k, v) for k, v in table.items() if not isinstance(v, dict)
               and not _is_table_array(v)]
    if header is not None:
        if out:
            out.append("")
        out.append(header)
    for k, v in scalars:
        out.append(f"{_key(k)} = {_scalar(v)}")
    for k, v in table.items():
        name = ".".join(_key(p) for p in [*path, k])
        if isinstance(v, dict):
            _emit(out, [*path, k], v, f"[{name}]")
        elif _is_table_array(v):
            for item in v:
                _emit(out, [*path, k], item, f"[[{name}]]")


def dumps(data: dict[str, Any]) -> str:
    out: list[str] = []
    _emit(out, [], data, None)
    return "\n".join(out) + "\n"
