"""systemd units, sample configs and the notify protocol of the real daemons.

- every unit in deploy/systemd passes `systemd-analyze verify` with no output
  (verify exits 0 on unknown keys, so any warning fails the test);
- the units keep their promises: Type=notify with a watchdog, check-config
  before start, state under /var/lib/cdp, capabilities only for the filter;
- every sample config in deploy/examples passes `check-config`, every invalid
  one fails with exit code 2 and names the field;
- each daemon, started as systemd would (NOTIFY_SOCKET, WATCHDOG_USEC,
  WATCHDOG_PID), sends READY=1, then WATCHDOG=1 periodically, RELOADING=1 and
  READY=1 on SIGHUP, STOPPING=1 on SIGTERM, and exits 0.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cdp_common import assignsig, crypto, pki

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "deploy" / "systemd"
EXAMPLES = ROOT / "deploy" / "examples"
DAEMONS = ("cdp-coordinator", "cdp-target", "cdp-proxy", "cdp-filter")

pytestmark = pytest.mark.timeout(120)


def _unit_files() -> list[Path]:
    return sorted(UNITS.glob("*.service"))


def _parse(path: Path) -> configparser.RawConfigParser:
    cp = configparser.RawConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read(path)
    return cp


# ---------------------------------------------------------------- units

def test_every_daemon_has_a_unit() -> None:
    names = {p.name for p in _unit_files()}
    assert {f"{d}.service" for d in DAEMONS} <= names
    assert "cdp-proxy@.service" in names


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze missing (apt-get install systemd)")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # ExecStart paths must exist for verify: point /opt/cdp at stubs in tmp_path.
    opt = tmp_path / "opt" / "cdp" / "bin"
    opt.mkdir(parents=True)
    for d in DAEMONS:
        (opt / d).write_text("#!/bin/sh\n")
        (opt / d).chmod(0o755)
    units = tmp_path / "units"
    units.mkdir()
    for p in _unit_files():
        (units / p.name).write_text(p.read_text().replace("/opt/cdp/", f"{tmp_path}/opt/cdp/"))
    shutil.copy(units / "cdp-proxy@.service", units / "cdp-proxy@source.service")
    names = [p.name for p in _unit_files() if "@" not in p.name] + ["cdp-proxy@source.service"]
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", *names], cwd=units,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SYSTEMD_LOG_LEVEL": "info"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "" and done.stderr.strip() == "", done.stderr


@pytest.mark.parametrize("unit", [p.name for p in _unit_files()])
def test_unit_promises(unit: str) -> None:
    svc = _parse(UNITS / unit)["Service"]
    assert svc["Type"] == "notify"
    assert svc["NotifyAccess"] == "main"
    assert int(svc["WatchdogSec"]) > 0
    assert svc["Restart"] == "on-failure"
    assert "check-config --config" in svc["ExecStartPre"]
    assert svc["ExecStart"].split()[0] == svc["ExecStartPre"].split()[0]
    assert "--log-format json run --config" in svc["ExecStart"]
    assert svc["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert svc["StateDirectory"].startswith("cdp/")
    assert svc["ConfigurationDirectory"] == "cdp"
    assert svc["NoNewPrivileges"] == "yes"
    assert "/etc/cdp/" in svc["ExecStart"]
    if unit == "cdp-filter.service":
        assert "CAP_SYS_ADMIN" in svc["CapabilityBoundingSet"]
        assert svc["DeviceAllow"] == "/dev/fuse rw"
        # a private mount namespace would hide the FUSE mount from the host
        for key in ("ProtectSystem", "PrivateTmp", "ProtectHome", "PrivateDevices"):
            assert key not in svc, key
    else:
        assert svc["CapabilityBoundingSet"] == ""
        assert svc["User"] == "cdp"
        assert svc["ProtectSystem"] == "strict"
        assert svc["PrivateTmp"] == "yes"


# ---------------------------------------------------------------- sample configs

@pytest.fixture(scope="module")
def etc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stand-in for /etc/cdp: CA, node certificates and the master key."""
    root = tmp_path_factory.mktemp("etc-cdp")
    pki_dir = root / "pki"
    ca_pem, ca_key = pki.create_ca(pki_dir)
    for node, role in (("coordinator", "coordinator"), ("filter-1", "filter"),
                       ("source-proxy-1", "source-proxy"), ("target-proxy-1", "target-proxy"),
                       ("target-1", "target")):
        pki.create_node_cert(ca_pem, ca_key, pki_dir, node, [], role=role)
    crypto.write_new_key(str(root / "master.key"))
    assignsig.new_key_pair(pki_dir / "assignments.key", pki_dir / "assignments.pub")
    return root


def _daemon_of(example: Path) -> str:
    """coordinator.toml, coordinator-etcd.toml -> cdp-coordinator; proxy-*.toml -> cdp-proxy."""
    return f"cdp-{example.stem.split('-')[0]}"


def _check(daemon: str, config: Path) -> subprocess.CompletedProcess[str]:
    module = "cdp_" + daemon.removeprefix("cdp-")
    return subprocess.run([sys.executable, "-m", module, "check-config", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.toml")))
def test_sample_config_is_valid(example: str, etc: Path, tmp_path: Path) -> None:
    text = (EXAMPLES / example).read_text().replace("/etc/cdp/", f"{etc}/")
    config = tmp_path / example
    config.write_text(text)
    done = _check(_daemon_of(EXAMPLES / example), config)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{config}: ok"


@pytest.mark.parametrize("example", sorted(p.name for p in (EXAMPLES / "invalid").glob("*.toml")))
def test_invalid_sample_config_names_the_field(example: str) -> None:
    path = EXAMPLES / "invalid" / example
    text = path.read_text()
    daemon = re.search(r"^# daemon: (\S+)$", text, re.M)
    expect = re.search(r"^# expect: (.+)$", text, re.M)
    assert daemon and expect, "an invalid sample needs '# daemon:' and '# expect:' lines"
    done = _check(daemon.group(1), path)
    assert done.returncode == 2, done.stderr
    assert expect.group(1) in done.stderr
    assert "Traceback" not in done.stderr


# ---------------------------------------------------------------- notify protocol

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Notify:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.path = path
        self.seen: list[str] = []

    def wait_for(self, want: str, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(want in m.split("\n") for m in self.seen):
                return
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                self.seen.append(self.sock.recv(4096).decode())
            except TimeoutError:
                break
        raise AssertionError(f"{want} never arrived; got {self.seen!r}")

    def clear(self) -> None:
        self.seen.clear()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[Notify]:
    n = Notify(tmp_path / "notify.sock")
    yield n
    n.close()


def _start(module: str, config: Path, notify: Notify | None, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    if notify is not None:
        env.update(NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="200000")
    # WATCHDOG_PID must be the daemon's own pid, known only after the fork:
    # exec through a shell that sets it to $$ (exec keeps the pid).
    cmd = (f'WATCHDOG_PID=$$ exec "{sys.executable}" -m {module} --log-format json '
           f'run --config "{config}"')
    with open(log, "wb") as out:
        return subprocess.Popen(["/bin/sh", "-c", cmd], env=env, stdout=out, stderr=out,
                                cwd=ROOT)


def _stop(proc: subprocess.Popen[bytes]) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            return None
    return proc.returncode


def _configs(tmp: Path, coord_port: int) -> dict[str, tuple[str, str]]:
    coord = f"127.0.0.1:{coord_port}"
    key = tmp / "master.key"
    if not key.exists():
        crypto.write_new_key(str(key))
    return {
        "coordinator": ("cdp_coordinator", f"""
[node]
id = "coordinator"
listen = "{coord}"
[coordinator]
db_path = "{tmp}/coord.db"
[tls]
insecure = true
"""),
        "target": ("cdp_target", f"""
[node]
id = "target-1"
coordinator = "{coord}"
[target]
data_dir = "{tmp}/target"
[tls]
insecure = true
"""),
        "proxy": ("cdp_proxy", f"""
[node]
id = "proxy-1"
coordinator = "{coord}"
[proxy]
role = "both"
key_file = "{key}"
[tls]
insecure = true
"""),
        "filter": ("cdp_filter", f"""
[node]
id = "filter-1"
coordinator = "{coord}"
[filter]
mountpoint = "{tmp}/mnt"
data_dir = "{tmp}/filter"
[[disks]]
name = "disk0"
policy = "p"
size_bytes = 1048576
[tls]
insecure = true
"""),
    }


def _fuse_ok() -> bool:
    return os.geteuid() == 0 and os.path.exists("/dev/fuse")


@pytest.mark.parametrize("name", ["coordinator", "target", "proxy", "filter"])
def test_daemon_speaks_sd_notify(name: str, tmp_path: Path, notify: Notify) -> None:
    if name == "filter" and not _fuse_ok():
        pytest.skip("the filter needs root and /dev/fuse")
    port = _free_port()
    configs = _configs(tmp_path, port)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if name != "coordinator":  # the others register with a live coordinator
            module, text = configs["coordinator"]
            (tmp_path / "coordinator.toml").write_text(text)
            procs.append(_start(module, tmp_path / "coordinator.toml", None,
                                tmp_path / "coordinator.log"))
        module, text = configs[name]
        config = tmp_path / f"{name}.toml"
        config.write_text(text)
        proc = _start(module, config, notify, tmp_path / f"{name}.log")
        procs.append(proc)
        log = tmp_path / f"{name}.log"
        try:
            notify.wait_for("READY=1", 30)
            notify.clear()
            notify.wait_for("WATCHDOG=1", 5)
            notify.clear()
            notify.wait_for("WATCHDOG=1", 5)  # periodic
            # SIGHUP with a new log level: RELOADING=1, then READY=1 again
            config.write_text(text + '\n[log]\nlevel = "debug"\n')
            proc.send_signal(signal.SIGHUP)
            notify.wait_for("RELOADING=1", 10)
            notify.wait_for("READY=1", 10)
            assert proc.poll() is None
            proc.send_signal(signal.SIGTERM)
            notify.wait_for("STOPPING=1", 10)
            assert proc.wait(40) == 0
        except AssertionError:
            print(log.read_text())
            raise
        assert "reloaded" in log.read_text()
    finally:
        for p in reversed(procs):
            _stop(p)


def test_sighup_with_a_broken_config_keeps_running(tmp_path: Path, notify: Notify) -> None:
    module, text = _configs(tmp_path, _free_port())["coordinator"]
    config = tmp_path / "coordinator.toml"
    config.write_text(text)
    log = tmp_path / "coordinator.log"
    proc = _start(module, config, notify, log)
    try:
        notify.wait_for("READY=1", 30)
        config.write_text(text.replace("[coordinator]", "[coordinator]\nlease_ms = 1"))
        notify.clear()
        proc.send_signal(signal.SIGHUP)
        notify.wait_for("READY=1", 10)
        assert proc.poll() is None
        assert "keeping the running configuration" in log.read_text()
        assert "lease_ms" in log.read_text()
    finally:
        assert _stop(proc) == 0
