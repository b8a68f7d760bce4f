"""Which coordinator and which TLS credentials a cdpctl command uses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cdp_common.config import TlsConfig
from cdpctl.resolve import resolve
from cdpctl.state import UsageError

LAB_TLS: dict[str, Any] = {"ca_file": "/lab/pki/ca.pem", "cert_file": "/lab/pki/cdpctl.pem",
           "key_file": "/lab/pki/cdpctl.key"}


def write_lab(directory: Path, coordinator: str = "127.0.0.1:7000",
              tls: dict[str, object] | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "lab.json").write_text(json.dumps(
        {"coordinator": coordinator, "tls": tls or LAB_TLS, "processes": [], "disks": []}))


def call(cwd: Path, env: dict[str, str] | None = None, **kw: object):  # type: ignore[no-untyped-def]
    args: dict[str, object] = {"coordinator": None, "lab_dir_arg": None, "ca": None,
                               "cert": None, "key": None, "insecure": False}
    args.update(kw)
    return resolve(env=env or {}, cwd=cwd, **args)  # type: ignore[arg-type]


def test_default_lab_dir_is_dot_lab(tmp_path: Path) -> None:
    write_lab(tmp_path / "lab")
    c = call(tmp_path)
    assert c.address == "127.0.0.1:7000"
    assert c.tls == TlsConfig(**LAB_TLS)
    assert "lab" in c.source


def test_flag_beats_env_beats_lab(tmp_path: Path) -> None:
    write_lab(tmp_path / "lab")
    env = {"CDP_COORDINATOR": "192.0.2.1:7001"}
    assert call(tmp_path, env).address == "192.0.2.1:7001"
    assert call(tmp_path, env).source == "CDP_COORDINATOR"
    c = call(tmp_path, env, coordinator="192.0.2.2:7002")
    assert (c.address, c.source) == ("192.0.2.2:7002", "--coordinator")
    # The lab's client certificate still serves as credentials.
    assert c.tls == TlsConfig(**LAB_TLS)


def test_lab_dir_flag_and_env(tmp_path: Path) -> None:
    write_lab(tmp_path / "a", "127.0.0.1:1111")
    write_lab(tmp_path / "b", "127.0.0.1:2222")
    write_lab(tmp_path / "lab", "127.0.0.1:3333")
    assert call(tmp_path, lab_dir_arg="a").address == "127.0.0.1:1111"
    assert call(tmp_path, {"CDP_LAB_DIR": "b"}).address == "127.0.0.1:2222"
    assert call(tmp_path, {"CDP_LAB_DIR": "b"}, lab_dir_arg="a").address == "127.0.0.1:1111"
    assert call(tmp_path, {"CDP_LAB_DIR": str(tmp_path / "b")}).address == "127.0.0.1:2222"


def test_insecure_lab(tmp_path: Path) -> None:
    write_lab(tmp_path / "lab", tls={"insecure": True})
    assert call(tmp_path).tls.insecure


def test_explicit_tls_and_insecure(tmp_path: Path) -> None:
    c = call(tmp_path, coordinator="h:1", ca="ca.pem", cert="me.pem", key="me.key")
    assert c.tls == TlsConfig(ca_file=str(tmp_path / "ca.pem"),
                              cert_file=str(tmp_path / "me.pem"),
                              key_file=str(tmp_path / "me.key"))
    assert call(tmp_path, coordinator="h:1", insecure=True).tls.insecure


@pytest.mark.parametrize(("env", "kw", "message"), [
    ({}, {}, "no coordinator address"),
    ({}, {"lab_dir_arg": "missing"}, "no lab in"),
    ({"CDP_LAB_DIR": "missing"}, {}, "no lab in"),
    ({}, {"coordinator": "h:1"}, "no TLS credentials for h:1"),
    ({"CDP_COORDINATOR": "h:1"}, {}, "no TLS credentials"),
    ({}, {"coordinator": "h:1", "ca": "x"}, "--cert, --key missing"),
    ({}, {"coordinator": "h:1", "insecure": True, "key": "k"}, "contradicts --key"),
    ({}, {"coordinator": "nohostport", "insecure": True}, "expected HOST:PORT"),
    ({}, {"coordinator": "h:99999", "insecure": True}, "expected HOST:PORT"),
    ({"CDP_COORDINATOR": ":5"}, {"insecure": True}, "CDP_COORDINATOR: expected HOST:PORT"),
])
def test_usage_errors(tmp_path: Path, env: dict[str, str], kw: dict[str, object],
                      message: str) -> None:
    with pytest.raises(UsageError, match=message) as info:
        call(tmp_path, env, **kw)
    assert info.value.exit_code == 64


def test_broken_lab_json_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "lab").mkdir()
    (tmp_path / "lab" / "lab.json").write_text("{not json")
    with pytest.raises(Exception, match="not valid JSON"):
        call(tmp_path)
    # Not consulted when everything is given on the command line.
    assert call(tmp_path, coordinator="h:1", insecure=True).address == "h:1"
