"""Which coordinator a command talks to, and with which TLS credentials.

Address, first match wins:
  1. --coordinator HOST:PORT
  2. environment CDP_COORDINATOR
  3. the lab.json of a local lab: --lab-dir DIR, else environment CDP_LAB_DIR,
     else ./lab (where `make lab` puts it)

TLS, first match wins:
  1. --insecure (plaintext; only for coordinators configured with tls.insecure)
  2. --ca, --cert and --key (all three)
  3. the client certificate of the local lab, when a lab.json was found
Everything is passed in (args, environment, working directory), so this is
tested without a shell.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdpctl import lazy
from cdpctl.state import UsageError, load_state

if TYPE_CHECKING:
    from cdp_common import config
    from cdp_common.config import TlsConfig
else:   # only a command that connects needs it
    config = lazy.module("cdp_common.config")

DEFAULT_LAB_DIR = "lab"


@dataclass(frozen=True)
class Coordinator:
    address: str
    tls: TlsConfig
    source: str          # where the address came from, for error messages


def lab_dir(arg: str | None, env: Mapping[str, str], cwd: Path) -> tuple[Path, bool]:
    """The lab directory and whether the operator named it explicitly."""
    if arg:
        return cwd / arg, True
    if env.get("CDP_LAB_DIR"):
        return cwd / env["CDP_LAB_DIR"], True
    return cwd / DEFAULT_LAB_DIR, False


def _check_address(value: str, where: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"{where}: expected HOST:PORT, got {value!r}")
    return value


def _lab_tls(state: dict[str, Any], where: Path) -> TlsConfig:
    tls = state.get("tls") or {}
    if tls.get("insecure"):
        return config.TlsConfig(insecure=True)
    try:
        return config.TlsConfig(ca_file=tls["ca_file"], cert_file=tls["cert_file"],
                         key_file=tls["key_file"])
    except KeyError as exc:
        raise UsageError(f"{where}: tls.{exc.args[0]} missing") from None


def resolve(*, coordinator: str | None, lab_dir_arg: str | None, ca: str | None,
            cert: str | None, key: str | None, insecure: bool,
            env: Mapping[str, str], cwd: Path) -> Coordinator:
    directory, explicit = lab_dir(lab_dir_arg, env, cwd)
    loaded: list[dict[str, Any] | None] = []

    def lab_state() -> dict[str, Any] | None:
        if not loaded:
            loaded.append(load_state(directory))
        return loaded[0]

    if coordinator:
        address, source = _check_address(coordinator, "--coordinator"), "--coordinator"
    elif env.get("CDP_COORDINATOR"):
        address = _check_address(env["CDP_COORDINATOR"], "CDP_COORDINATOR")
        source = "CDP_COORDINATOR"
    elif (state := lab_state()) is not None:
        address = _check_address(str(state.get("coordinator", "")),
                                 f"{directory}/lab.json coordinator")
        source = f"lab {directory}"
    elif explicit:
        raise UsageError(f"no lab in {directory} (no lab.json); start one with "
                         f"`cdpctl lab up --dir {directory}` or pass --coordinator")
    else:
        raise UsageError("no coordinator address: pass --coordinator HOST:PORT, set "
                         "CDP_COORDINATOR, or start a local lab with `cdpctl lab up --dir ./lab`")

    given = [name for name, v in (("--ca", ca), ("--cert", cert), ("--key", key)) if v]
    if insecure:
        if given:
            raise UsageError(f"--insecure contradicts {', '.join(given)}")
        tls = config.TlsConfig(insecure=True)
    elif given:
        if len(given) != 3:
            missing = [n for n in ("--ca", "--cert", "--key") if n not in given]
            raise UsageError(f"{', '.join(missing)} missing: TLS needs --ca, --cert and --key")
        assert ca and cert and key
        tls = config.TlsConfig(ca_file=str(cwd / ca), cert_file=str(cwd / cert),
                               key_file=str(cwd / key))
    elif (state := lab_state()) is not None:
        tls = _lab_tls(state, directory / "lab.json")
    else:
        raise UsageError(f"no TLS credentials for {address}: pass --ca, --cert and --key "
                         "(or --insecure for a plaintext coordinator)")
    return Coordinator(address=address, tls=tls, source=source)
