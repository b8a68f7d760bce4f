"""Fixtures shared by every test tier.

- `assert_eventually(fn, timeout_s, interval_s, message)`: poll instead of sleeping.
  `fn` passes when it returns anything but False without raising
  AssertionError; the last AssertionError is re-raised on timeout.
  `async_assert_eventually` is the same for coroutine functions (or plain ones).
  Both are importable (`from conftest import assert_eventually`) and fixtures.
- `cdpctl(*args, check=False, timeout=...) -> CompletedProcess`: run the CLI as
  operators do (`python -m cdpctl`), text output captured.
- `lab`: a factory `start_lab(tmp_dir, disks=1, disk_size="256M", insecure=False)
  -> LabHandle` that runs `cdpctl lab up` and, at teardown, `cdpctl lab down`,
  kills any PID left from lab.json and lazily unmounts the FUSE mount. Skips
  when not root or /dev/fuse is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

LAB_UP_TIMEOUT_S = 120.0
CDPCTL_TIMEOUT_S = 60.0


# ---------------------------------------------------------------- polling

class _Poll:
    """The deadline and the last failure of one `assert_eventually` loop."""

    def __init__(self, fn: Callable[..., Any], timeout_s: float, message: str) -> None:
        self.deadline = time.monotonic() + timeout_s
        self.text = (message or f"condition {getattr(fn, '__name__', fn)} not met") + \
            f" (within {timeout_s}s)"

    def missed(self, last: AssertionError | None) -> None:
        """After a failed attempt: raise once the time is up."""
        if time.monotonic() >= self.deadline:
            raise AssertionError(self.text) from last


def assert_eventually(fn: Callable[[], T], timeout_s: float = 10.0, interval_s: float = 0.1,
                      message: str = "") -> T:
    """Call `fn` until it passes (returns anything but False, raises no AssertionError);
    returns its last result."""
    poll = _Poll(fn, timeout_s, message)
    while True:
        last: AssertionError | None = None
        try:
            if (result := fn()) is not False:
                return result
        except AssertionError as exc:
            last = exc
        poll.missed(last)
        time.sleep(interval_s)


async def async_assert_eventually(fn: Callable[[], Awaitable[T] | T], timeout_s: float = 10.0,
                                  interval_s: float = 0.1, message: str = "") -> T:
    """`assert_eventually` for coroutine functions; sleeps with asyncio.sleep."""
    poll = _Poll(fn, timeout_s, message)
    while True:
        last: AssertionError | None = None
        try:
            result = fn()
            if inspect.isawaitable(result):
                result = await result
            if result is not False:
                return result
        except AssertionError as exc:
            last = exc
        poll.missed(last)
        await asyncio.sleep(interval_s)


@pytest.fixture(name="assert_eventually")
def _assert_eventually_fixture() -> Callable[..., Any]:
    return assert_eventually


@pytest.fixture(name="async_assert_eventually")
def _async_assert_eventually_fixture() -> Callable[..., Any]:
    return async_assert_eventually


# ---------------------------------------------------------------- cdpctl

def cdpctl(*args: str, check: bool = False, timeout: float = CDPCTL_TIMEOUT_S,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m cdpctl ARGS`; output captured as text."""
    done = subprocess.run([sys.executable, "-m", "cdpctl", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          env=None if env is None else {**os.environ, **env})
    if check and done.returncode != 0:
        raise AssertionError(f"cdpctl {' '.join(args)} exited {done.returncode}\n"
                             f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}")
    return done


@pytest.fixture(name="cdpctl")
def _cdpctl_fixture() -> Callable[..., subprocess.CompletedProcess[str]]:
    return cdpctl


# ---------------------------------------------------------------- lab

def lab_skip_reason() -> str | None:
    """Why a lab cannot run here, or None."""
    if os.geteuid() != 0:
        return "the lab needs root (FUSE mount with allow_other, loop devices)"
    if not os.path.exists("/dev/fuse"):
        return "the lab needs /dev/fuse"
    if not any(os.access(os.path.join(d, "fusermount3"), os.X_OK)
               for d in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep)):
        return "the lab needs fusermount3 (apt-get install fuse3)"
    return None


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


@dataclass
class LabHandle:
    """A running lab: its directory and lab.json, plus helpers for fault tests."""

    dir: Path
    info: dict[str, Any]
    _killed: list[int] = field(default_factory=list)

    @property
    def coordinator(self) -> str:
        return str(self.info["coordinator"])

    @property
    def processes(self) -> list[dict[str, Any]]:
        return list(self.info["processes"])

    @property
    def disks(self) -> list[dict[str, Any]]:
        return list(self.info["disks"])

    def process(self, node_id: str) -> dict[str, Any]:
        for p in self.info["processes"]:
            if p["id"] == node_id:
                return dict(p)
        raise KeyError(f"no process {node_id!r} in the lab")

    def pid(self, node_id: str) -> int:
        return int(self.process(node_id)["pid"])

    def disk_path(self, index: int = 0) -> Path:
        return Path(self.info["disks"][index]["path"])

    def tls(self) -> Any:
        """A cdp_common.config.TlsConfig for connecting to the lab's daemons as `cdpctl`."""
        from cdp_common.config import TlsConfig
        t = self.info["tls"]
        return TlsConfig(insecure=True) if t.get("insecure") else TlsConfig(**t)

    def reload(self) -> dict[str, Any]:
        self.info = json.loads((self.dir / "lab.json").read_text())
        return self.info

    def kill(self, node_id: str, sig: int = signal.SIGKILL, wait_s: float = 10.0) -> None:
        """Send `sig` to a lab process and, for SIGKILL/SIGTERM, wait until it is gone."""
        pid = self.pid(node_id)
        self._killed.append(pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            assert_eventually(lambda: not _alive(pid), wait_s, 0.05,
                              f"{node_id} (pid {pid}) did not exit after signal {sig}")

    def restart(self, node_id: str, env: dict[str, str] | None = None) -> int:
        """Start a killed process again (same config, same ports, `env` added to its
        environment); returns its new pid."""
        cdpctl("lab", "restart", "--dir", str(self.dir), node_id, check=True,
               timeout=LAB_UP_TIMEOUT_S, env=env)
        return int(next(p for p in self.reload()["processes"] if p["id"] == node_id)["pid"])

    def set_config(self, node_id: str, section: str, **fields: Any) -> None:
        """Stop `node_id`, change `[section]` of its config file, start it again."""
        import tomllib

        from cdpctl import tomlw
        path = Path(self.process(node_id)["config"])
        doc = tomllib.loads(path.read_text())
        doc[section].update(fields)
        self.kill(node_id, signal.SIGTERM, wait_s=30)
        path.write_text(tomlw.dumps(doc))
        self.restart(node_id)

    def cli(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        """cdpctl ARGS against this lab's coordinator (adds --lab-dir)."""
        return cdpctl(*args, "--lab-dir", str(self.dir), check=check)

    def status(self) -> dict[str, Any]:
        done = self.cli("status", "--json", check=True)
        return dict(json.loads(done.stdout))

    def log(self, node_id: str) -> str:
        return Path(self.process(node_id)["log"]).read_text(errors="replace")

    def stop(self) -> None:
        """`lab down`, then make sure: kill leftovers, lazily unmount."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            cdpctl("lab", "down", "--dir", str(self.dir), timeout=60)
        for p in self.info.get("processes", []):
            pid = int(p["pid"])
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        mounts = [f["mountpoint"] for f in self.info.get("filters") or []]
        for mnt in mounts or [self.info.get("mountpoint") or str(self.dir / "mnt")]:
            if os.path.ismount(mnt) or _listed_mount(mnt):
                subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True,
                               check=False)


def _listed_mount(path: str) -> bool:
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return False
    return any(len(f := line.split()) > 1 and f[1] == os.path.realpath(path) for line in mounts)


@pytest.fixture
def lab() -> Iterator[Callable[..., LabHandle]]:
    """Factory: `start_lab(tmp_dir, disks=1, disk_size="256M", insecure=False,
    source_proxies=1, target_proxies=1, extra=())`; `extra` are more `lab up`
    options (--filters, --targets, --policies, --sites)."""
    reason = lab_skip_reason()
    if reason:
        pytest.skip(reason)
    started: list[LabHandle] = []

    def start_lab(tmp_dir: Path | str, disks: int = 1, disk_size: str = "256M",
                  insecure: bool = False, source_proxies: int = 1,
                  target_proxies: int = 1, extra: tuple[str, ...] = ()) -> LabHandle:
        directory = Path(tmp_dir).absolute()
        args = ["lab", "up", "--dir", str(directory), "--disks", str(disks),
                "--disk-size", disk_size, "--source-proxies", str(source_proxies),
                "--target-proxies", str(target_proxies), *extra]
        if insecure:
            args.append("--insecure")
        try:
            done = cdpctl(*args, timeout=LAB_UP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            LabHandle(directory, {"processes": []}).stop()
            raise
        state_file = directory / "lab.json"
        if done.returncode != 0:
            if state_file.exists():
                LabHandle(directory, json.loads(state_file.read_text())).stop()
            pytest.fail(f"cdpctl lab up failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        handle = LabHandle(directory, json.loads(state_file.read_text()))
        started.append(handle)
        return handle

    yield start_lab
    for handle in reversed(started):
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            handle.reload()
        handle.stop()
