"""cdpctl commands end to end, minus the daemons: parser, exit codes, PKI, keys,
health/status against a real gRPC server with a canned GetStatus, lab process
handling with stand-in processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from cdp_common import crypto, identity
from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
from cdp_common.pb.cdp.v1 import coordinator_pb2_grpc as cgrpc
from cdp_common.revocation import load_revoked
from cdpctl import cli, lab
from cdpctl.labplan import NodePlan
from cdpctl.state import save_state


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.run(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- parser

def test_help_documents_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0
    assert "exit codes:" in out and "64  usage error" in out
    assert "3   coordinator unreachable" in out
    for command in (["health"], ["status"], ["lab", "up"], ["lab", "down"], ["pki", "issue"],
                    ["keygen"]):
        code, out, _ = run(capsys, *command, "--help")
        assert code == 0 and "examples:" in out and "exit codes:" in out, command


@pytest.mark.parametrize("argv", [[], ["bogus"], ["lab"], ["lab", "up"],
                                  ["lab", "up", "--dir", "x", "--disks", "many"],
                                  ["pki", "issue", "--dir", "x"]])
def test_usage_errors_exit_64(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, _, err = run(capsys, *argv)
    assert code == 64
    assert "error:" in err and "Traceback" not in err


def test_lab_up_rejects_bad_sizes_before_doing_anything(capsys: pytest.CaptureFixture[str],
                                                        tmp_path: Path) -> None:
    code, _, err = run(capsys, "lab", "up", "--dir", str(tmp_path / "lab"), "--disk-size", "1000")
    assert code == 2 and "multiple of 4096" in err
    code, _, err = run(capsys, "lab", "up", "--dir", str(tmp_path / "lab"), "--disks", "0")
    assert code == 64 and "--disks" in err
    assert not (tmp_path / "lab").exists()


# ---------------------------------------------------------------- pki, keygen

def test_pki_and_keygen(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pki_dir = tmp_path / "pki"
    code, _, err = run(capsys, "pki", "issue", "--dir", str(pki_dir), "node-1", "--role", "filter")
    assert code == 2 and "no CA" in err
    assert run(capsys, "pki", "init", "--dir", str(pki_dir))[0] == 0
    assert (pki_dir / "ca.key").stat().st_mode & 0o777 == 0o600
    code, _, err = run(capsys, "pki", "init", "--dir", str(pki_dir))
    assert code == 2 and "already holds a CA" in err
    code, _, err = run(capsys, "pki", "issue", "--dir", str(pki_dir), "node-1")
    assert code == 64 and "--role" in err
    code, out, _ = run(capsys, "pki", "issue", "--dir", str(pki_dir), "node-1", "--role",
                       "filter", "--host", "192.0.2.7", "--host", "node1.example")
    assert code == 0 and "node-1.pem" in out and "cdp://filter/node-1" in out
    from cryptography import x509
    cert = x509.load_pem_x509_certificate((pki_dir / "node-1.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "node1.example" in sans.get_values_for_type(x509.DNSName)
    assert identity.from_certificate(cert) == identity.Identity(
        "filter", "node-1", "", cert.serial_number)
    assert (pki_dir / "node-1.key").stat().st_mode & 0o777 == 0o600
    code, _, err = run(capsys, "pki", "issue", "--dir", str(pki_dir), "bad/id", "--role",
                       "filter")
    assert code == 64 and "bad/id" in err
    # an existing key is never overwritten silently; --force renews both files
    before = (pki_dir / "node-1.key").read_bytes(), (pki_dir / "node-1.pem").read_bytes()
    code, _, err = run(capsys, "pki", "issue", "--dir", str(pki_dir), "node-1", "--role",
                       "filter")
    assert code == 2 and "not overwriting" in err and "--force" in err
    assert ((pki_dir / "node-1.key").read_bytes(), (pki_dir / "node-1.pem").read_bytes()) \
        == before
    assert run(capsys, "pki", "issue", "--dir", str(pki_dir), "node-1", "--role", "filter",
               "--force")[0] == 0
    assert (pki_dir / "node-1.key").read_bytes() != before[0]
    # revocation: the serial of NAME.pem is appended once; the list parses
    revoked = tmp_path / "revoked"
    code, out, _ = run(capsys, "pki", "revoke", "--dir", str(pki_dir), "node-1", "--file",
                       str(revoked))
    serial = x509.load_pem_x509_certificate((pki_dir / "node-1.pem").read_bytes()).serial_number
    assert code == 0 and f"serial {serial:x}" in out
    assert run(capsys, "pki", "revoke", "--dir", str(pki_dir), "node-1", "--file",
               str(revoked))[0] == 0
    assert load_revoked(str(revoked)) == {serial} and len(revoked.read_text().splitlines()) == 1
    code, _, err = run(capsys, "pki", "revoke", "--dir", str(pki_dir), "nobody", "--file",
                       str(revoked))
    assert code == 2 and "cannot read" in err
    # operators: a scope is required; the certificate names it
    code, _, err = run(capsys, "pki", "issue-operator", "--dir", str(pki_dir), "alice",
                       "--scope", "root")
    assert code == 64 and "--scope" in err and not (pki_dir / "alice.pem").exists()
    code, out, _ = run(capsys, "pki", "issue-operator", "--dir", str(pki_dir), "alice",
                       "--scope", "viewer")
    assert code == 0 and "cdp://operator/alice?scope=viewer" in out
    cert = x509.load_pem_x509_certificate((pki_dir / "alice.pem").read_bytes())
    assert identity.from_certificate(cert) == identity.Identity(
        "operator", "alice", "viewer", cert.serial_number)

    key = tmp_path / "master.key"
    assert run(capsys, "keygen", str(key))[0] == 0
    assert len(crypto.load_master_key(key)) == 32
    assert key.stat().st_mode & 0o777 == 0o600
    code, _, err = run(capsys, "keygen", str(key))
    assert code == 2 and "not overwriting" in err
    code, _, err = run(capsys, "keygen", str(tmp_path / "no" / "such" / "dir" / "k"))
    assert code == 2 and "Traceback" not in err


# ---------------------------------------------------------------- health / status

class CannedCoordinator(cgrpc.CoordinatorServicer):
    def __init__(self) -> None:
        self.reply = cpb.StatusReply()

    def GetStatus(self, request: cpb.StatusRequest, context: Any) -> cpb.StatusReply:
        return self.reply


@pytest.fixture
def coordinator() -> Iterator[tuple[str, CannedCoordinator]]:
    servicer = CannedCoordinator()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    cgrpc.add_CoordinatorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


def healthy_reply(policy_state: str = "ok", node_state: str = "up") -> cpb.StatusReply:
    return cpb.StatusReply(
        nodes=[cpb.NodeStatus(info=cpb.NodeInfo(id="filter-1", role=cpb.ROLE_FILTER),
                              state=node_state)],
        policies=[cpb.PolicyStatus(name="lab", state=policy_state, durable_seq=5, enabled=True,
                                   source_proxy="source-proxy-1", target_proxy="target-proxy-1")])


@pytest.mark.parametrize(("policy_state", "node_state", "verdict", "exit_code"), [
    ("ok", "up", "ok", 0), ("degraded", "up", "warning", 1), ("error", "up", "error", 2),
    ("unprotected", "up", "warning", 1), ("ok", "down", "error", 2),
    # an older coordinator's names
    ("warning", "up", "warning", 1), ("unassigned", "up", "error", 2),
])
def test_health_exit_codes(capsys: pytest.CaptureFixture[str],
                           coordinator: tuple[str, CannedCoordinator], policy_state: str,
                           node_state: str, verdict: str, exit_code: int) -> None:
    address, servicer = coordinator
    servicer.reply = healthy_reply(policy_state, node_state)
    code, out, _ = run(capsys, "health", "--coordinator", address, "--insecure", "--json")
    assert code == exit_code
    doc = json.loads(out)
    assert doc["status"] == verdict and (doc["problems"] == []) == (verdict == "ok")
    code, out, _ = run(capsys, "health", "--coordinator", address, "--insecure")
    assert code == exit_code and out.rstrip().endswith(f"health: {verdict.upper()}")


def test_status_json_and_table(capsys: pytest.CaptureFixture[str],
                               coordinator: tuple[str, CannedCoordinator]) -> None:
    address, servicer = coordinator
    servicer.reply = healthy_reply()
    code, out, _ = run(capsys, "status", "--coordinator", address, "--insecure", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["nodes"][0]["id"] == "filter-1" and doc["nodes"][0]["state"] == "up"
    assert doc["policies"][0]["source_proxy"] == "source-proxy-1"
    code, out, _ = run(capsys, "status", "--coordinator", address, "--insecure")
    assert code == 0 and "source-proxy-1" in out and out.startswith("NODE")


def test_env_coordinator(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                         coordinator: tuple[str, CannedCoordinator]) -> None:
    monkeypatch.setenv("CDP_COORDINATOR", coordinator[0])
    assert run(capsys, "status", "--insecure")[0] == 0


def test_unreachable_coordinator_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    port = lab.free_ports(1)[0]
    code, _, err = run(capsys, "health", "--coordinator", f"127.0.0.1:{port}", "--insecure",
                       "--timeout", "2")
    assert code == 3
    assert f"coordinator at 127.0.0.1:{port}" in err and "unreachable" in err
    assert "Traceback" not in err


def test_tls_to_plaintext_server_exits_3(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                         coordinator: tuple[str, CannedCoordinator]) -> None:
    assert run(capsys, "pki", "init", "--dir", str(tmp_path))[0] == 0
    assert run(capsys, "pki", "issue-operator", "--dir", str(tmp_path), "ops",
               "--scope", "admin")[0] == 0
    code, _, err = run(capsys, "health", "--coordinator", coordinator[0], "--timeout", "2",
                       "--ca", str(tmp_path / "ca.pem"), "--cert", str(tmp_path / "ops.pem"),
                       "--key", str(tmp_path / "ops.key"))
    assert code == 3 and "unreachable" in err


def test_missing_tls_file_is_an_error_not_a_traceback(capsys: pytest.CaptureFixture[str],
                                                      tmp_path: Path) -> None:
    code, _, err = run(capsys, "health", "--coordinator", "127.0.0.1:1", "--ca", "nope.pem",
                       "--cert", "c.pem", "--key", "k.key")
    assert code == 2 and "ca_file" in err and "Traceback" not in err


def test_subprocess_entry_point(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "cdpctl", "health"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=60,
                          env={k: v for k, v in os.environ.items()
                               if k not in ("CDP_COORDINATOR", "CDP_LAB_DIR")})
    assert done.returncode == 64
    assert "no coordinator address" in done.stderr and "Traceback" not in done.stderr


# ---------------------------------------------------------------- lab processes

def sleeper(config: Path) -> subprocess.Popen[bytes]:
    """A stand-in daemon: has `--config <config>` on its command line, ignores nothing."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "run",
                             "--config", str(config)], start_new_session=True)


def stubborn(config: Path) -> subprocess.Popen[bytes]:
    """A stand-in daemon that ignores SIGTERM."""
    code = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "sys.stdout.write('ready\\n'); sys.stdout.flush(); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, "--config", str(config)],
                            stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    return proc


def fake_state(tmp_path: Path, procs: dict[str, subprocess.Popen[bytes]]) -> dict[str, Any]:
    return {"dir": str(tmp_path), "coordinator": "127.0.0.1:1", "tls": {"insecure": True},
            "mountpoint": str(tmp_path / "mnt"),
            "processes": [{"id": nid, "role": "filter" if nid == "filter-1" else "coordinator",
                           "pid": p.pid, "address": "127.0.0.1:1", "metrics_address": "",
                           "config": str(tmp_path / f"{nid}.toml"),
                           "log": str(tmp_path / f"{nid}.log")} for nid, p in procs.items()],
            "disks": []}


def test_process_alive_checks_the_config(tmp_path: Path) -> None:
    proc = sleeper(tmp_path / "a.toml")
    try:
        assert lab.process_alive(proc.pid)
        assert lab.process_alive(proc.pid, str(tmp_path / "a.toml"))
        assert not lab.process_alive(proc.pid, str(tmp_path / "b.toml"))   # reused pid
    finally:
        proc.kill()
        proc.wait()
    assert not lab.process_alive(proc.pid)
    assert not lab.process_alive(0) and not lab.process_alive(-5)


def test_lab_status_down_and_refusal(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    procs = {"coordinator": sleeper(tmp_path / "coordinator.toml"),
             "filter-1": sleeper(tmp_path / "filter-1.toml")}
    try:
        save_state(tmp_path, fake_state(tmp_path, procs))
        code, out, _ = run(capsys, "lab", "status", "--dir", str(tmp_path), "--json")
        assert code == 0 and all(p["alive"] for p in json.loads(out)["processes"])

        code, _, err = run(capsys, "lab", "up", "--dir", str(tmp_path))
        assert code == 2 and "already running" in err

        procs["filter-1"].kill()
        procs["filter-1"].wait()
        code, out, _ = run(capsys, "lab", "status", "--dir", str(tmp_path))
        assert code == 2 and "dead" in out and "alive" in out

        code, out, _ = run(capsys, "lab", "down", "--dir", str(tmp_path))
        assert code == 0 and "stopping coordinator" in out
        assert procs["coordinator"].wait(timeout=5) is not None
        assert not (tmp_path / "lab.json").exists()
        code, out, _ = run(capsys, "lab", "down", "--dir", str(tmp_path))
        assert code == 0 and "nothing to stop" in out
        code, out, _ = run(capsys, "lab", "status", "--dir", str(tmp_path))
        assert code == 2 and "no lab" in out
    finally:
        for p in procs.values():
            p.kill()
            p.wait()


def test_stop_processes_kills_stragglers(tmp_path: Path) -> None:
    proc = stubborn(tmp_path / "filter-1.toml")
    try:
        state = fake_state(tmp_path, {"filter-1": proc})
        messages: list[str] = []
        t0 = time.monotonic()
        stopped = lab.stop_processes(state["processes"], timeout_s=0.5, say=messages.append)
        assert stopped == ["filter-1"]
        assert not lab.process_alive(proc.pid)   # killed (and reaped by stop_processes)
        assert time.monotonic() - t0 < 5
        assert any("SIGKILL" in m for m in messages)
    finally:
        proc.kill()
        proc.wait()


def test_wait_ready_reports_a_dying_daemon_with_its_log(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    node = NodePlan(id="x-1", role="target", module="cdpctl_no_such_module",
                    address="127.0.0.1:1", metrics_address="", config=tmp_path / "x.toml",
                    log=log, config_text="")
    pid = lab.launch(node.module, node.config, node.log)
    with pytest.raises(lab.LabError, match=r"x-1 .* exited during start-up") as info:
        lab._wait_ready(node, pid, crypto_free_tls(), timeout_s=10)
    assert "No module named cdpctl_no_such_module" in str(info.value)


def crypto_free_tls() -> Any:
    from cdp_common.config import TlsConfig
    return TlsConfig(insecure=True)


def test_free_ports_are_distinct() -> None:
    ports = lab.free_ports(10)
    assert len(set(ports)) == 10 and all(0 < p < 65536 for p in ports)


# ---------------------------------------------------------------- exit codes of errors

def test_error_exit_codes_come_from_the_one_table(capsys: pytest.CaptureFixture[str],
                                                  tmp_path: Path) -> None:
    """A corrupt lab.json is a format error (4), an unknown lab a usage error (64);
    nothing is written."""
    (tmp_path / "lab.json").write_text("{nope")
    code, _, err = run(capsys, "status", "--lab-dir", str(tmp_path))
    assert code == 4 and "lab.json" in err and "Traceback" not in err
    assert (tmp_path / "lab.json").read_text() == "{nope"
    code, _, err = run(capsys, "status", "--lab-dir", str(tmp_path / "none"))
    assert code == 64 and "no lab" in err
