"""The shipped units under a real systemd: PID 1 in a systemd-nspawn container.

test_systemd_units.py checks the unit files statically and the notify protocol
against a fake socket; this boots Debian bookworm with systemd as PID 1
(scripts/nspawn-rootfs.sh builds and caches the tree; each run boots it with
--volatile=overlay, so the cache stays clean), installs cdp the way an operator
does (deploy/install-systemd.sh from a wheelhouse, no network in the container),
writes configs from deploy/examples and certificates with `cdpctl pki`, starts
the five units (coordinator, target, proxy@target, proxy@source, filter) and
checks, each on the real thing:

- a write through the filter's FUSE disk reaches the target's replica (sha256),
  and `cdpctl restore` writes it into the target's restore_dir: the hardening
  of both units lets them do their job;
- `kill -9` of a daemon: systemd restarts it and replication resumes;
- `kill -STOP`: the watchdog (WatchdogSec, sd_notify WATCHDOG=1) kills and
  restarts it, and replication resumes;
- `systemctl reload`: each daemon re-reads its config (SIGHUP, "reloaded");
- `systemctl stop`: each exits cleanly well within its TimeoutStopSec.

The container has its own network namespace (--private-network, loopback
only), so the example ports cannot clash with other tests. It is stopped by
the pid this test started (SIGTERM to systemd-nspawn, which halts the
container; SIGKILL to both as a last resort); nothing is mounted on the host.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "deploy" / "examples"
CACHE = Path(os.environ.get("CDP_NSPAWN_CACHE", "/var/cache/cdp-test"))
# start order: coordinator first, then the DR site, then the source site
UNITS = ("cdp-coordinator", "cdp-target", "cdp-proxy@target", "cdp-proxy@source", "cdp-filter")
CONFIGS = {"coordinator": "cdp-coordinator", "target": "cdp-target",
           "proxy-target": "cdp-proxy@target", "proxy-source": "cdp-proxy@source",
           "filter": "cdp-filter"}
DISK = "/run/cdp/disks/db0"
REPLICA = "/var/lib/cdp/target/db/replicas/db0.img"
DISK_BYTES = 16 * 1024 * 1024
OPS = ("--coordinator 127.0.0.1:7000 --ca /etc/cdp/pki/ca.pem "
       "--cert /etc/cdp/pki/ops.pem --key /etc/cdp/pki/ops.key")
PATH = "/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# the unit's own grace period; a clean stop takes a few seconds
STOP_LIMIT_S = 45

pytestmark = [pytest.mark.timeout(420)]

T = TypeVar("T")


def _eventually(what: str, probe: Callable[[], T | None], timeout_s: float,
                detail: Callable[[], str] = lambda: "", every_s: float = 0.5) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        got = probe()
        if got is not None and got is not False:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s\n{detail()}")
        time.sleep(every_s)


class Container:
    """A booted container: commands run in all of PID 1's namespaces (nsenter -a)."""

    def __init__(self, leader: int, boot_log: Path) -> None:
        self.leader = leader
        self.boot_log = boot_log

    @property
    def root(self) -> Path:
        return Path(f"/proc/{self.leader}/root")

    def sh(self, script: str, check: bool = True, timeout_s: float = 120,
           ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", "env", "-i", f"PATH={PATH}",
             "LANG=C.UTF-8", "HOME=/root", "bash", "-euo", "pipefail", "-c", script],
            capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
        if check and done.returncode != 0:
            raise AssertionError(f"in the container: {script}\nexit {done.returncode}\n"
                                 f"stdout: {done.stdout}\nstderr: {done.stderr}")
        return done

    def show(self, unit: str) -> dict[str, str]:
        out = self.sh(f"systemctl show {unit} -p ActiveState -p SubState -p Result "
                      "-p MainPID -p NRestarts -p ExecMainStatus -p LimitNOFILE").stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *units: str, lines: int = 40, after: str = "") -> str:
        """The last `lines` of the units' journal (all units: UNITS), after cursor `after`."""
        args = " ".join(f"-u {u}" for u in (units or UNITS))
        since = f"'--after-cursor={after}'" if after else ""
        return self.sh(f"journalctl --no-pager -o short-monotonic -n {lines} {since} {args}",
                       check=False).stdout

    def cursor(self) -> str:
        """Where the journal ends now (for journal(after=...))."""
        out = self.sh("journalctl --no-pager -n 0 --show-cursor").stdout
        m = re.search(r"^-- cursor: (\S+)", out, re.M)
        assert m, out
        return m.group(1)

    def sha256(self, path: str) -> str:
        return self.sh(f"sha256sum {path}").stdout.split()[0]

    def status(self) -> str:
        done = self.sh(f"cdpctl status --json {OPS}", check=False)
        return done.stdout + done.stderr

    def detail(self, *units: str) -> Callable[[], str]:
        def render() -> str:
            shows = "\n".join(f"{u}: {self.show(u)}" for u in (units or UNITS))
            return f"{shows}\ncdpctl status:\n{self.status()}\njournal:\n{self.journal(*units)}"
        return render


# ---------------------------------------------------------------- boot and teardown

def _skip_unless_bootable() -> None:
    if os.geteuid() != 0:
        pytest.skip("systemd-nspawn needs root")
    for tool, package in (("systemd-nspawn", "systemd-container"), ("nsenter", "util-linux"),
                          ("debootstrap", "debootstrap")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} missing (apt-get install {package})")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse: the filter cannot mount its disks")


def _rootfs() -> Path:
    done = subprocess.run([str(ROOT / "scripts" / "nspawn-rootfs.sh"), str(CACHE)],
                          capture_output=True, text=True, timeout=600)
    if done.returncode in (75, 77):  # no network/mirror for debootstrap; not root
        pytest.skip(f"cannot build the nspawn root file system: {done.stderr.strip()[-1500:]}")
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.strip().splitlines()[-1])


NETWORK_TROUBLE = re.compile(r"NewConnectionError|Temporary failure in name resolution|"
                             r"Network is unreachable|Could not fetch URL|ConnectTimeout")


def _wheelhouse_done(proc: subprocess.Popen[str], log: Path) -> None:
    rc = proc.wait(timeout=300)
    if rc != 0:
        text = log.read_text()
        if NETWORK_TROUBLE.search(text):
            pytest.skip(f"scripts/wheelhouse.sh needs PyPI once: {text[-1500:]}")
        raise AssertionError(f"scripts/wheelhouse.sh failed ({rc}):\n{text[-4000:]}")


def _ppid(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    m = re.search(r"^PPid:\s+(\d+)", status, re.M)
    return int(m.group(1)) if m else 0


def _find_leader(nspawn: subprocess.Popen[str]) -> int | None:
    """The container's PID 1: a descendant of our systemd-nspawn, pid 1 in its own pid ns."""
    if nspawn.poll() is not None:
        raise AssertionError(f"systemd-nspawn exited with {nspawn.returncode}")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        nspid = re.search(r"^NSpid:\s+(.*)$", status, re.M)
        if nspid is None or nspid.group(1).split()[1:][-1:] != ["1"]:
            continue
        pid = up = int(entry.name)
        while up > 1:
            up = _ppid(up)
            if up == nspawn.pid:
                return pid
    return None


def _stop_container(nspawn: subprocess.Popen[str], leader: int | None) -> None:
    if nspawn.poll() is None:
        nspawn.send_signal(signal.SIGTERM)  # nspawn halts the container's systemd
        with contextlib.suppress(subprocess.TimeoutExpired):
            nspawn.wait(30)
    if nspawn.poll() is None:
        if leader is not None:
            # the end of a pid namespace's init kills every process in it
            with contextlib.suppress(ProcessLookupError):
                os.kill(leader, signal.SIGKILL)
        nspawn.kill()
        nspawn.wait(30)


def _configs(c: Container) -> None:
    """The example configs, every address on the container's loopback, a small disk."""
    etc = c.root / "etc" / "cdp"
    for name in CONFIGS:
        text = (EXAMPLES / f"{name}.toml").read_text()
        text = re.sub(r"(0\.0\.0\.0|192\.0\.2\.\d+|198\.51\.100\.\d+):", "127.0.0.1:", text)
        text = text.replace("10737418240", str(DISK_BYTES))
        assert "127.0.0.1:" in text
        (etc / f"{name}.toml").write_text(text)


SETUP = """
pki=/etc/cdp/pki
cdpctl pki init --dir $pki
for n in coordinator:coordinator filter-1:filter source-proxy-1:source-proxy \
         target-proxy-1:target-proxy target-1:target; do
    cdpctl pki issue --dir $pki "${n%%:*}" --role "${n##*:}" --host 127.0.0.1
done
cdpctl pki issue-operator --dir $pki ops --scope admin
cdpctl pki signing-key --dir $pki
cdpctl keygen /etc/cdp/master.key
"""
PERMISSIONS = """
chgrp -R cdp /etc/cdp
chmod 0640 /etc/cdp/pki/*.key /etc/cdp/master.key /etc/cdp/*.toml
install -d -o cdp -g cdp -m 0750 /srv/restore
"""


@pytest.fixture(scope="module")
def box() -> Iterator[Container]:
    _skip_unless_bootable()
    tmp = Path(tempfile.mkdtemp(prefix="cdp-nspawn-"))
    nspawn: subprocess.Popen[str] | None = None
    leader: int | None = None
    wheel_log = tmp / "wheelhouse.log"
    wheels = tmp / "wheelhouse"
    wheels.mkdir()
    # the wheelhouse builds (about 40 s) while the root file system is found or built
    with open(wheel_log, "w") as out:
        wheelhouse = subprocess.Popen([str(ROOT / "scripts" / "wheelhouse.sh"), str(wheels)],
                                      stdout=out, stderr=subprocess.STDOUT, text=True,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        t0 = time.monotonic()
        rootfs = _rootfs()
        print(f"rootfs {rootfs} ready in {time.monotonic() - t0:.1f} s")
        boot_log = tmp / "boot.log"
        with open(boot_log, "w") as out:
            nspawn = subprocess.Popen(
                ["systemd-nspawn", "-D", str(rootfs), "--volatile=overlay", "-b",
                 "--register=no", "--keep-unit", f"--machine=cdp-test-{os.getpid()}",
                 "--private-network", "--bind=/dev/fuse", "--console=read-only",
                 f"--bind-ro={ROOT}:/src", f"--bind-ro={wheels}:/wheelhouse"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                start_new_session=True)
        try:
            leader = _eventually("the container's PID 1", lambda: _find_leader(nspawn), 30)
            c = Container(leader, boot_log)
            state = c.sh("systemctl is-system-running --wait", check=False, timeout_s=120)
        except (AssertionError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"systemd-nspawn cannot boot here: {exc}\n{boot_log.read_text()[-2000:]}")
        if state.stdout.strip() not in ("running", "degraded"):
            pytest.skip(f"the container did not boot: {state.stdout} "
                        f"{boot_log.read_text()[-2000:]}")
        print(f"booted in {time.monotonic() - t0:.1f} s")

        _wheelhouse_done(wheelhouse, wheel_log)
        print(f"wheelhouse ready at {time.monotonic() - t0:.1f} s")
        install = c.sh("WHEELHOUSE=/wheelhouse /src/deploy/install-systemd.sh", timeout_s=300)
        assert "install: done" in install.stdout, install.stdout + install.stderr
        assert "No such file" not in install.stderr, install.stderr
        c.sh(SETUP)
        _configs(c)
        c.sh(PERMISSIONS)
        print(f"installed and configured at {time.monotonic() - t0:.1f} s")
        for unit in UNITS:
            done = c.sh(f"systemctl start {unit}", check=False, timeout_s=120)
            assert done.returncode == 0, (
                f"systemctl start {unit}: {done.stderr}\n{c.detail(unit)()}")
        print(f"units started at {time.monotonic() - t0:.1f} s")
        yield c
    finally:
        if wheelhouse.poll() is None:  # its own process group: the script and its pips
            with contextlib.suppress(ProcessLookupError):
                os.killpg(wheelhouse.pid, signal.SIGTERM)
            wheelhouse.wait(30)
        if nspawn is not None:
            _stop_container(nspawn, leader)
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- helpers

def _write(c: Container, block: int, what: str) -> str:
    """Write 256 KiB of fresh random data at 256 KiB * block through the FUSE disk; its sha256."""
    c.sh(f"dd if=/dev/urandom of={DISK} bs=64k count=4 seek={block * 4} conv=notrunc,fsync "
         "status=none")
    sha = c.sha256(DISK)
    _eventually(f"{what}: the write replicated to the target's replica",
                lambda: c.sha256(REPLICA) == sha, 60, c.detail())
    return sha


def _healthy(c: Container, timeout_s: float = 60) -> None:
    _eventually("cdpctl health exits 0",
                lambda: c.sh(f"cdpctl health {OPS}", check=False).returncode == 0,
                timeout_s, c.detail(), every_s=1.0)


def _restarted(c: Container, unit: str, before: dict[str, str], timeout_s: float) -> dict[str, str]:
    def probe() -> dict[str, str] | None:
        now = c.show(unit)
        ok = (now["ActiveState"] == "active" and now["MainPID"] not in ("0", before["MainPID"])
              and int(now["NRestarts"]) > int(before["NRestarts"]))
        return now if ok else None
    return _eventually(f"{unit} restarted by systemd (before: {before})", probe, timeout_s,
                       c.detail(unit))


def _main_pid(c: Container, unit: str) -> int:
    info = c.show(unit)
    assert info["ActiveState"] == "active" and info["MainPID"] != "0", c.detail(unit)()
    return int(info["MainPID"])


# ---------------------------------------------------------------- the checks, in order

def test_units_run_and_replicate(box: Container) -> None:
    for unit in UNITS:
        info = box.show(unit)
        assert (info["ActiveState"], info["SubState"]) == ("active", "running"), \
            box.detail(unit)()
        # the units ask for 65536 open files; systemd gives at most what its host allows
        pid = info["MainPID"]
        limits = box.sh(f"grep 'Max open files' /proc/{pid}/limits; "
                        "grep 'Max open files' /proc/1/limits").stdout.split("\n")
        got, host = int(limits[0].split()[3]), int(limits[1].split()[4])
        assert got == min(65536, host), limits
    # the filter's FUSE mount is in the system's mount namespace (no private one)
    mount = box.sh("findmnt -n -o FSTYPE /run/cdp/disks", check=False).stdout.strip()
    assert mount.startswith("fuse"), f"no FUSE mount at /run/cdp/disks: {mount!r}\n" \
        + box.detail("cdp-filter")()
    assert int(box.sh(f"stat -c %s {DISK}").stdout) == DISK_BYTES
    _healthy(box)
    _write(box, 1, "first write")

    def reported() -> bool:  # the coordinator hears of it with the next heartbeats
        policy = json.loads(box.sh(f"cdpctl status --json {OPS}").stdout)["policies"][0]
        return bool(policy["state"] == "ok" and policy["durable_seq"] > 0
                    and policy["bytes_replicated"] > 0)

    _eventually("cdpctl status shows the write durable", reported, 15, box.detail())


def test_restore_writes_into_the_restore_dir(box: Container) -> None:
    """ProtectSystem=strict leaves the target only its state dir and ReadWritePaths."""
    sha = box.sha256(DISK)
    done = box.sh(f"cdpctl restore db --latest --out /srv/restore/r1 --json {OPS}", check=False)
    assert done.returncode == 0, done.stdout + done.stderr + box.journal("cdp-target")
    image = "/srv/restore/r1/db0.img"
    assert box.sha256(image) == sha, box.sh(f"ls -l /srv/restore/r1; cat {REPLICA} | sha256sum")
    mode = box.sh(f"stat -c '%a %U' {image}").stdout.split()
    assert mode == ["600", "cdp"], mode


def test_kill_9_is_restarted_and_replication_resumes(box: Container) -> None:
    unit = "cdp-proxy@source"
    before = box.show(unit)
    box.sh(f"kill -9 {_main_pid(box, unit)}")
    _restarted(box, unit, before, 30)
    journal = box.journal(unit)
    assert "status=9/KILL" in journal, journal
    _write(box, 2, "after kill -9 of the source proxy")
    _healthy(box)


def test_a_stopped_daemon_is_killed_by_the_watchdog(box: Container) -> None:
    unit = "cdp-target"
    before = box.show(unit)
    box.sh(f"kill -STOP {_main_pid(box, unit)}")
    # WatchdogSec=20: no WATCHDOG=1 for 20 s, then SIGABRT, RestartSec=2
    _restarted(box, unit, before, 60)
    journal = box.journal(unit, lines=80)
    assert "Failed with result 'watchdog'" in journal, journal
    _write(box, 3, "after the watchdog restarted the target")
    _healthy(box)


def test_reload_rereads_the_config(box: Container) -> None:
    for unit in UNITS:
        pid, mark = _main_pid(box, unit), box.cursor()
        box.sh(f"systemctl reload {unit}")

        def reloaded(unit: str = unit, mark: str = mark) -> bool:
            return '"reloaded /etc/cdp/' in box.journal(unit, after=mark)

        _eventually(f"{unit} logs a reload", reloaded, 15, box.detail(unit))
        assert _main_pid(box, unit) == pid, "a reload must not restart the daemon"
    _write(box, 4, "after the reloads")


def test_stop_is_clean(box: Container) -> None:
    for unit in reversed(UNITS):  # the source site first, the coordinator last
        t0, mark = time.monotonic(), box.cursor()
        box.sh(f"systemctl stop {unit}", timeout_s=STOP_LIMIT_S + 15)
        took = time.monotonic() - t0
        info = box.show(unit)
        journal = box.journal(unit, after=mark)
        assert info["ActiveState"] == "inactive" and info["Result"] == "success", \
            f"{unit}: {info}\n{journal}"
        assert info["ExecMainStatus"] == "0", f"{unit}: {info}\n{journal}"
        by_systemd = "\n".join(line for line in journal.splitlines() if " systemd[1]: " in line)
        assert "SIGKILL" not in by_systemd and "timed out" not in by_systemd, journal
        assert took < STOP_LIMIT_S - 15, f"{unit} took {took:.1f} s to stop\n{journal}"
    # the filter unmounted its disks
    assert box.sh("findmnt /run/cdp/disks", check=False).returncode != 0
