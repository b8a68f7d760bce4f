"""Plain-text tables and the TOML writer of cdpctl."""

from __future__ import annotations

import tomllib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdpctl import table, tomlw


def test_table_aligns_columns() -> None:
    out = table.render(("NAME", "SEQ", "STATE"), [("lab", 7, "ok"), ("long-name", 12345, "error")],
                       right=("SEQ",))
    assert out.splitlines() == [
        "NAME         SEQ  STATE",
        "lab            7  ok",
        "long-name  12345  error",
    ]


def test_table_has_no_trailing_blanks_and_shows_none_as_empty() -> None:
    out = table.render(("A", "B"), [("x", None), ("yyyy", "")])
    assert all(line == line.rstrip() for line in out.splitlines())
    assert out.splitlines()[1] == "x"


def test_table_rejects_ragged_rows() -> None:
    with pytest.raises(ValueError, match="2 cells"):
        table.render(("A", "B", "C"), [("x", "y")])


def test_toml_round_trip_of_a_config_shape() -> None:
    doc = {
        "node": {"id": "filter-1", "listen": "127.0.0.1:1", "capacity": 0},
        "coordinator": {"db_path": "/tmp/a \"quoted\" \\ path\n", "lease_ms": 3000},
        "policies": [
            {"name": "lab", "rpo_interval_s": 2.0, "encryption": True,
             "disks": [{"filter": "f", "name": "d0", "size_bytes": 4096},
                       {"filter": "f", "name": "d1", "size_bytes": 8192}]},
            {"name": "two", "rpo_interval_s": 0.5, "encryption": False,
             "disks": [{"filter": "g", "name": "x", "size_bytes": 4096}]},
        ],
        "tls": {"insecure": True},
        "empty": [],
        "tags": ["a", "b"],
        "odd key": 1,
    }
    assert tomllib.loads(tomlw.dumps(doc)) == doc


scalars = st.one_of(st.booleans(), st.integers(-(2**63), 2**63 - 1),
                    st.floats(allow_nan=False, allow_infinity=False), st.text())
keys = st.text(min_size=1, max_size=10)
tables = st.recursive(
    st.dictionaries(keys, scalars, max_size=4),
    lambda children: st.dictionaries(keys, st.one_of(scalars, children,
                                                     st.lists(children, min_size=1, max_size=3)),
                                     max_size=4),
    max_leaves=12)


@given(tables)
def test_toml_round_trip_property(doc: dict[str, object]) -> None:
    assert tomllib.loads(tomlw.dumps(doc)) == doc


def test_toml_rejects_what_it_cannot_write() -> None:
    with pytest.raises(ValueError):
        tomlw.dumps({"x": float("nan")})
    with pytest.raises(TypeError):
        tomlw.dumps({"x": object()})


def test_table_on_a_terminal_is_coloured_but_aligns_like_plain() -> None:
    import re

    rows = [("lab", 7, "ok"), ("db", 12345, "error"), ("x", 1, "degraded"),
            ("y", 0, "unprotected")]
    plain = table.render(("NAME", "SEQ", "STATE"), rows, right=("SEQ",), color=False)
    tty = table.render(("NAME", "SEQ", "STATE"), rows, right=("SEQ",), color=True)
    assert table.BOLD + "NAME" in tty
    assert table.GREEN + "ok" + table.RESET in tty
    assert table.RED + "error" + table.RESET in tty
    assert table.YELLOW + "degraded" + table.RESET in tty
    assert table.YELLOW + "unprotected" + table.RESET in tty
    assert re.sub(r"\x1b\[[0-9;]*m", "", tty) == plain


def test_colour_only_on_a_terminal_without_no_color() -> None:
    import io

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert table.use_color(Tty(), {}) is True
    assert table.use_color(Tty(), {"NO_COLOR": "1"}) is False
    assert table.use_color(Tty(), {"TERM": "dumb"}) is False
    assert table.use_color(io.StringIO(), {}) is False
