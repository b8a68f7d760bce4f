"""No certificate is trusted for more than its role, against a real lab (issue 10,
items 1 and 2).

With nothing but the filter's own certificate and key: every policy change,
RequestSync, reading status, registering as `target-1` at another address and
heartbeating for it are refused (PERMISSION_DENIED), and nothing changed:
policies, restore points, epochs, the replica, the journal; target-1 still
serves at its address and the lab still replicates. A node id with a newline
is refused. A viewer operator reads status, health and policies but changing
anything exits 5 with a one-line error. A revoked admin certificate is refused
after SIGHUP. The lab's own admin cdpctl still does everything.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import LabHandle, assert_eventually, cdpctl
from cryptography import x509
from labwait import wait_caught_up
from securitylab import assert_unchanged, channel, issue, node_tls, snapshot
from workload import MiB, Workload

from cdp_common.config import TlsConfig
from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
from cdp_common.pb.cdp.v1 import coordinator_pb2_grpc as cgrpc

pytestmark = pytest.mark.timeout(300)

DISK = 64 * MiB


def tls_args(tls: TlsConfig) -> list[str]:
    return ["--ca", tls.ca_file, "--cert", tls.cert_file, "--key", tls.key_file]


def denied(fn: Any, what: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, (what, info.value)
    return info.value.details() or ""


def test_a_filter_certificate_cannot_act_as_anyone_else(lab: Any, tmp_path: Path) -> None:
    handle: LabHandle = lab(tmp_path / "lab", disk_size="64M")
    work = Workload(handle.disk_path(), DISK, seed=41)
    work.write_bytes(2 * MiB)
    wait_caught_up(handle, work.oracle_sha256())
    before = snapshot(handle)
    target = next(n for n in handle.status()["nodes"] if n["id"] == "target-1")

    with channel(handle, handle.coordinator, node_tls(handle, "filter-1")) as ch:
        stub = cgrpc.CoordinatorStub(ch)
        policy = json.dumps({"name": "evil", "target": "target-1",
                             "disks": [{"filter": "filter-1", "name": "disk9",
                                        "size_bytes": 64 * MiB}]})
        attacks = {
            "CreatePolicy": lambda: stub.CreatePolicy(
                cpb.CreatePolicyRequest(policy_json=policy), timeout=10),
            "UpdatePolicy (retention of seconds)": lambda: stub.UpdatePolicy(
                cpb.UpdatePolicyRequest(name="lab", patch_json=json.dumps(
                    {"short_term_retention_s": 2, "long_term_retention_s": 2})), timeout=10),
            "DeletePolicy": lambda: stub.DeletePolicy(cpb.PolicyName(name="lab"), timeout=10),
            "SetPolicyEnabled": lambda: stub.SetPolicyEnabled(
                cpb.SetPolicyEnabledRequest(name="lab", enabled=False), timeout=10),
            "RequestSync": lambda: stub.RequestSync(cpb.PolicyName(name="lab"), timeout=10),
            "GetStatus": lambda: stub.GetStatus(cpb.StatusRequest(), timeout=10),
            "Register as target-1": lambda: stub.Register(cpb.RegisterRequest(node=cpb.NodeInfo(
                id="target-1", role=cpb.ROLE_TARGET, address="127.0.0.1:9")), timeout=10),
            "Heartbeat as target-1": lambda: stub.Heartbeat(cpb.HeartbeatRequest(
                node_id="target-1", policies=[cpb.PolicyReport(
                    policy="lab", durable_seq=10**9, resync_request_id=99)]), timeout=10),
            "Register as a target": lambda: stub.Register(cpb.RegisterRequest(node=cpb.NodeInfo(
                id="filter-1", role=cpb.ROLE_TARGET, address="127.0.0.1:9")), timeout=10),
        }
        for what, attack in attacks.items():
            details = denied(attack, what)
            assert "filter filter-1" in details, (what, details)
        with pytest.raises(grpc.RpcError) as info:
            stub.Register(cpb.RegisterRequest(node=cpb.NodeInfo(
                id="filter-1\ntarget-1 up", role=cpb.ROLE_FILTER, address="127.0.0.1:9")),
                timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
        assert "not a valid name" in (info.value.details() or "")

    assert_unchanged(before, handle)
    now = next(n for n in handle.status()["nodes"] if n["id"] == "target-1")
    assert (now["address"], now["state"]) == (target["address"], target["state"])
    assert "filter filter-1 may not call Coordinator.CreatePolicy" in handle.log("coordinator")
    # the lab still replicates, and its admin cdpctl still changes policies
    work.write_bytes(2 * MiB)
    wait_caught_up(handle, work.oracle_sha256())
    handle.cli("policy", "edit", "lab", "--set", "rpo_warning_s=30", check=True)


def test_operator_scopes_and_revocation(lab: Any, tmp_path: Path) -> None:
    handle: LabHandle = lab(tmp_path / "lab", disk_size="64M")
    viewer = tls_args(issue(handle, "noc", "operator", "viewer"))
    coord = ["--coordinator", handle.coordinator]
    for command in (["status"], ["health"], ["policy", "list"], ["alarms"]):
        done = cdpctl(*command, *coord, *viewer)
        assert done.returncode in (0, 1), (command, done.stdout, done.stderr)
    before = snapshot(handle)
    for command in (["policy", "create", "p2", "--target", "target-1", "--disk",
                     "filter-1:disk9:64M"],
                    ["policy", "delete", "lab"],
                    ["sync", "lab"]):
        done = cdpctl(*command, *coord, *viewer)
        assert done.returncode == 5, (command, done.returncode, done.stdout, done.stderr)
        assert "operator noc (viewer) may not call" in done.stderr and "Traceback" not in \
            done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert_unchanged(before, handle)

    # a second admin works until its serial is revoked (file + SIGHUP)
    admin2 = issue(handle, "ops2", "operator", "admin")
    assert cdpctl("status", *coord, *tls_args(admin2)).returncode in (0, 1)
    revoked = handle.dir / "config" / "revoked"
    revoked.write_text("# revoked certificates\n")
    handle.set_config("coordinator", "tls", revoked_file=str(revoked))
    assert cdpctl("status", *coord, *tls_args(admin2)).returncode in (0, 1)
    done = cdpctl("pki", "revoke", "--dir", str(Path(admin2.cert_file).parent), "ops2",
                  "--file", str(revoked), check=True)
    serial = x509.load_pem_x509_certificate(Path(admin2.cert_file).read_bytes()).serial_number
    assert f"serial {serial:x}" in done.stdout
    handle.kill("coordinator", signal.SIGHUP)

    def refused() -> None:
        done = cdpctl("status", *coord, *tls_args(admin2))
        assert done.returncode == 5 and "is revoked" in done.stderr, done.stderr
    assert_eventually(refused, 20, 0.5, "the revoked certificate is still accepted")
    # the lab's own admin is not revoked
    assert handle.cli("status").returncode in (0, 1)
