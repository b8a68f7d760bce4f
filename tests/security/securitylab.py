"""Helpers of the attack suite (tests/security): act as someone else against a real lab,
and check afterwards that nothing changed.

- `issue(lab, name, role, scope="")`: a certificate from the lab's own CA naming
  `role`/`name` (cdp_common.identity), as a `TlsConfig`. Every attack uses only
  such a certificate: one that should not allow what it tries.
- `node_tls(lab, node_id)`: the lab's own certificate of a node (a stolen one).
- `channel(lab, address, tls)`: a blocking gRPC channel to one of the lab's daemons.
- `snapshot(lab)`: everything an attack must not change: the replica bytes
  (sha256 per disk), the coordinator's policies, epochs and restore points as the
  admin operator sees them, and the journal files of the filter (names, sizes and
  hashes). `assert_unchanged(before, lab)` compares a fresh snapshot with `before`,
  after the lab's own replication has settled.
Attacks that need more (files outside a restore dir, a target's store) add their own
checks next to these.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from conftest import LabHandle, assert_eventually

from cdp_common import pki, rpc
from cdp_common.config import TlsConfig


def issue(lab: LabHandle, name: str, role: str, scope: str = "",
          hosts: tuple[str, ...] = ("127.0.0.1",)) -> TlsConfig:
    """A certificate of the lab's CA for `role`/`name` (kept in <lab>/attack-pki)."""
    src, out = lab.dir / "pki", lab.dir / "attack-pki"
    out.mkdir(exist_ok=True)
    pem, key = pki.create_node_cert(src / "ca.pem", src / "ca.key", out, name, list(hosts),
                                    role=role, scope=scope)
    return TlsConfig(ca_file=str(src / "ca.pem"), cert_file=str(pem), key_file=str(key))


def node_tls(lab: LabHandle, node_id: str) -> TlsConfig:
    """The lab's own certificate of `node_id` (a stolen one, for an attack)."""
    pki = lab.dir / "pki"
    return TlsConfig(ca_file=str(pki / "ca.pem"), cert_file=str(pki / f"{node_id}.pem"),
                     key_file=str(pki / f"{node_id}.key"))


def channel(lab: LabHandle, address: str, tls: TlsConfig) -> grpc.Channel:
    return rpc.sync_channel(address, tls)


def address_of(lab: LabHandle, node_id: str) -> str:
    return str(lab.process(node_id)["address"])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _files(directory: Path) -> dict[str, str]:
    if not directory.exists():
        return {}
    return {str(p.relative_to(directory)): _sha256(p)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _cli_json(lab: LabHandle, *args: str) -> Any:
    return json.loads(lab.cli(*args, "--json", check=True).stdout)


def snapshot(lab: LabHandle) -> dict[str, Any]:
    """What an attack must leave as it was (see the module doc)."""
    status = lab.status()
    return {
        "replicas": {d["name"]: _sha256(Path(d["replica_path"])) for d in lab.disks},
        "policies": _cli_json(lab, "policy", "list"),
        "epochs": {p["name"]: p.get("epoch") for p in status.get("policies", [])},
        "restore_points": _cli_json(lab, "restore-points", "lab"),
        "journal": _files(lab.dir / "data" / "filter-1" / "journal"),
    }


def assert_unchanged(before: dict[str, Any], lab: LabHandle,
                     settle: Callable[[], object] | None = None,
                     timeout_s: float = 15.0) -> None:
    """A fresh snapshot equals `before` (polled, so in-flight work can settle first)."""
    def same() -> None:
        if settle is not None:
            settle()
        now = snapshot(lab)
        for key, value in before.items():
            assert now[key] == value, f"{key} changed:\n before {value}\n after  {now[key]}"
    assert_eventually(same, timeout_s, 0.5, "the lab's state changed after the attack")
