"""The key-ring file (cdp_common.crypto.parse_key_ring / KeyRing) and
`cdpctl keygen --rotate / --retire`: round trips, legacy files, every bad file a
ConfigError naming the file (never key material, never another exception), and
the CLI refusing bad files without changing them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdp_common import crypto
from cdp_common.crypto import KeyRing
from cdp_common.errors import AuthenticationError, ConfigError
from cdpctl import cli

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

ring_st = st.lists(st.tuples(st.integers(0, 2**32 - 1), st.binary(min_size=32, max_size=32)),
                   min_size=1, max_size=4, unique_by=lambda k: k[0]).map(
                       lambda keys: KeyRing(tuple(keys)))


@SETTINGS
@given(ring_st)
def test_ring_round_trip(ring: KeyRing) -> None:
    parsed = crypto.parse_key_ring(ring.encode())
    assert parsed == ring
    assert parsed.current_id == ring.keys[0][0]


@SETTINGS
@given(st.binary(min_size=32, max_size=32))
def test_legacy_files_are_key_id_0(key: bytes) -> None:
    for raw in (key, key.hex().encode(), key.hex().encode() + b"\n",
                b"# a comment\n\n" + key.hex().upper().encode() + b"\n"):
        assert crypto.parse_key_ring(raw) == KeyRing.single(key)


def test_comments_and_blank_lines_are_allowed() -> None:
    a, b = b"a" * 32, b"b" * 32
    raw = f"# rotated 2024-05-01\n\n2 {a.hex()}\n  # old\n0 {b.hex()}\n".encode()
    assert crypto.parse_key_ring(raw) == KeyRing(((2, a), (0, b)))


@pytest.mark.parametrize(("raw", "text"), [
    (b"", "holds no key"),
    (b"# only a comment\n", "holds no key"),
    (b"nope\n", "line 1: expected"),
    (b"1 " + b"ab" * 31 + b"\n", "line 1: expected"),              # short key
    (b"-1 " + b"ab" * 32 + b"\n", "line 1: expected"),             # negative id
    (b"x " + b"ab" * 32 + b"\n", "line 1: expected"),
    (b"1 " + b"ab" * 32 + b" extra\n", "line 1: expected"),
    (b"4294967296 " + b"ab" * 32 + b"\n", "exceeds"),
    (b"1 " + b"ab" * 32 + b"\n1 " + b"cd" * 32 + b"\n", "line 2: key id 1 appears twice"),
    (b"1 " + b"ab" * 32 + b"\n" + b"cd" * 32 + b"\n", "line 2: expected"),  # legacy line mixed in
    (b"\xff" * 40, "not ASCII"),
])
def test_bad_files_are_config_errors(raw: bytes, text: str) -> None:
    with pytest.raises(ConfigError, match=text) as info:
        crypto.parse_key_ring(raw, "key_file /k")
    assert str(info.value).startswith("key_file /k: ")
    assert "abab" not in str(info.value) and "cdcd" not in str(info.value)


@SETTINGS
@given(st.binary(max_size=300))
def test_any_bytes_parse_or_are_a_config_error(raw: bytes) -> None:
    try:
        ring = crypto.parse_key_ring(raw)
    except ConfigError:
        return
    assert ring.keys and all(len(k) == 32 for _, k in ring.keys)


@SETTINGS
@given(ring_st, st.binary(min_size=32, max_size=32))
def test_rotate_and_retire(ring: KeyRing, new_key: bytes) -> None:
    if max(ring.ids()) == 2**32 - 1:
        with pytest.raises(ConfigError):
            ring.rotated(new_key)
        return
    rotated = ring.rotated(new_key)
    assert rotated.current_id == max(ring.ids()) + 1 and rotated.current_key == new_key
    assert rotated.keys[1:] == ring.keys  # the older keys stay, in order
    with pytest.raises(ConfigError, match="is the current key"):
        rotated.retired(rotated.current_id)
    old = ring.current_id
    assert rotated.retired(old).ids() == [i for i in rotated.ids() if i != old]
    with pytest.raises(ConfigError, match="not in the ring"):
        rotated.retired(rotated.current_id + 1)


def test_unknown_key_id_lookup_says_what_to_do() -> None:
    with pytest.raises(AuthenticationError,
                       match=r"key id 7 is not in this proxy's key ring \(it holds 0\)"):
        KeyRing.single(b"k" * 32).key(7)


# ---------------------------------------------------------------- cdpctl keygen

def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.run(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_keygen_rotate_then_retire(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "master.key"
    assert run(capsys, "keygen", str(key))[0] == 0
    first = crypto.load_key_ring(key)
    assert first.ids() == [0]
    code, out, _ = run(capsys, "keygen", "--rotate", str(key))
    assert code == 0 and "added key id 1" in out and "key ids now 1, 0" in out
    ring = crypto.load_key_ring(key)
    assert ring.ids() == [1, 0] and ring.key(0) == first.current_key
    assert key.stat().st_mode & 0o777 == 0o600
    assert not list(tmp_path.glob(".*tmp*")), "a temporary file was left behind"
    code, _, err = run(capsys, "keygen", "--retire", "1", str(key))
    assert code == 2 and "is the current key" in err
    code, _, err = run(capsys, "keygen", "--retire", "5", str(key))
    assert code == 2 and "key id 5 is not in the ring" in err
    assert crypto.load_key_ring(key) == ring  # refusals changed nothing
    code, out, _ = run(capsys, "keygen", "--retire", "0", str(key))
    assert code == 0 and "retired key id 0" in out
    assert crypto.load_key_ring(key) == KeyRing(ring.keys[:1])
    assert key.stat().st_mode & 0o777 == 0o600


def test_keygen_refuses_bad_files_without_changing_them(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.key"
    bad.write_bytes(b"1 " + b"ab" * 32 + b"\n1 " + b"cd" * 32 + b"\n")
    for args in (["--rotate"], ["--retire", "1"]):
        code, _, err = run(capsys, "keygen", *args, str(bad))
        assert code == 2 and "appears twice" in err and "Traceback" not in err
        assert bad.read_bytes() == b"1 " + b"ab" * 32 + b"\n1 " + b"cd" * 32 + b"\n"
    code, _, err = run(capsys, "keygen", "--rotate", str(tmp_path / "missing"))
    assert code == 2 and "does not exist" in err
    assert not (tmp_path / "missing").exists()
    code, _, err = run(capsys, "keygen", "--rotate", "--retire", "0", str(bad))
    assert code == 64  # one or the other


def test_rotating_a_raw_key_file_keeps_the_key(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    raw = os.urandom(32)
    key = tmp_path / "raw.key"
    key.write_bytes(raw)
    assert run(capsys, "keygen", "--rotate", str(key))[0] == 0
    assert crypto.load_key_ring(key).key(0) == raw
