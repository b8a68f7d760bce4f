"""sd_notify: environment rules, message format, and the daemon lifecycle that speaks it."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path

import pytest

from cdp_common import daemon as cdaemon
from cdp_common import sdnotify
from cdp_common.errors import CdpError

pytestmark = pytest.mark.timeout(30)


def test_parse_env_path_abstract_and_absent() -> None:
    env = sdnotify.parse_env({"NOTIFY_SOCKET": "/run/systemd/notify"}, 7)
    assert env.socket_address == "/run/systemd/notify"
    assert env.watchdog_interval_s is None
    assert sdnotify.parse_env({"NOTIFY_SOCKET": "@abc"}, 7).socket_address == b"\0abc"
    assert sdnotify.parse_env({}, 7).socket_address is None
    # relative paths are not a systemd notify socket
    assert sdnotify.parse_env({"NOTIFY_SOCKET": "x"}, 7).socket_address is None


def test_watchdog_interval_is_half_the_period_and_only_for_our_pid() -> None:
    env = {"NOTIFY_SOCKET": "/s", "WATCHDOG_USEC": "4000000"}
    assert sdnotify.parse_env(env, 7).watchdog_interval_s == 2.0
    assert sdnotify.parse_env({**env, "WATCHDOG_PID": "7"}, 7).watchdog_interval_s == 2.0
    assert sdnotify.parse_env({**env, "WATCHDOG_PID": "8"}, 7).watchdog_interval_s is None
    assert sdnotify.parse_env({**env, "WATCHDOG_USEC": "0"}, 7).watchdog_interval_s is None
    assert sdnotify.parse_env({**env, "WATCHDOG_USEC": "soon"}, 7).watchdog_interval_s is None


def test_message_format() -> None:
    assert sdnotify.message(READY=1, STATUS="serving on 1.2.3.4:5") == \
        b"READY=1\nSTATUS=serving on 1.2.3.4:5"
    with pytest.raises(ValueError, match="STATUS"):
        sdnotify.message(STATUS="two\nlines")


def test_notifier_without_socket_is_a_noop() -> None:
    n = sdnotify.Notifier.from_env({})
    assert not n.enabled
    assert n.ready() is False and n.watchdog() is False
    n.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.setblocking(False)
    yield sock
    sock.close()


def _drain(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


def test_notifier_sends_to_a_bound_socket(notify_socket: socket.socket) -> None:
    n = sdnotify.Notifier.from_env({"NOTIFY_SOCKET": notify_socket.getsockname()})
    assert n.ready("up") and n.watchdog() and n.stopping()
    msgs = _drain(notify_socket)
    assert msgs == ["READY=1\nSTATUS=up", "WATCHDOG=1", "STOPPING=1"]
    n.close()


def test_notifier_survives_a_vanished_socket(tmp_path: Path) -> None:
    n = sdnotify.Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert n.enabled
    assert n.ready() is False  # logged, never raised
    n.close()


class FakeDaemon:
    def __init__(self, hang_on_shutdown: bool = False) -> None:
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self.hang = hang_on_shutdown

    async def run(self) -> None:
        await asyncio.sleep(0.05)
        self.ready.set()
        await self._stop.wait()
        if self.hang:
            await asyncio.sleep(3600)

    async def shutdown(self) -> None:
        self._stop.set()


async def _until(sock: socket.socket, want: str, seen: list[str]) -> None:
    for _ in range(400):
        seen.extend(_drain(sock))
        if any(want in m for m in seen):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{want!r} never arrived; got {seen!r}")


async def test_serve_sends_ready_watchdog_reloading_and_stopping(
        notify_socket: socket.socket) -> None:
    env = {"NOTIFY_SOCKET": notify_socket.getsockname(), "WATCHDOG_USEC": "100000",
           "WATCHDOG_PID": str(os.getpid())}
    reloads: list[int] = []
    d = FakeDaemon()
    task = asyncio.create_task(cdaemon._serve(d, lambda: reloads.append(1),
                                              sdnotify.Notifier.from_env(env)))
    seen: list[str] = []
    await _until(notify_socket, "READY=1", seen)
    assert not any("WATCHDOG=1" in m for m in seen[:seen.index("READY=1\nSTATUS=serving")])
    seen.clear()
    await _until(notify_socket, "WATCHDOG=1", seen)
    seen.clear()
    await _until(notify_socket, "WATCHDOG=1", seen)  # periodic, not once
    os.kill(os.getpid(), signal.SIGHUP)
    await _until(notify_socket, "RELOADING=1", seen)
    await _until(notify_socket, "READY=1", seen)
    assert reloads == [1]
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(task, 5)
    await _until(notify_socket, "STOPPING=1", seen)


async def test_serve_cancels_a_daemon_that_overstays_the_grace_period(
        notify_socket: socket.socket) -> None:
    d = FakeDaemon(hang_on_shutdown=True)
    n = sdnotify.Notifier.from_env({"NOTIFY_SOCKET": notify_socket.getsockname()})
    task = asyncio.create_task(cdaemon._serve(d, None, n, grace_s=0.2))
    await asyncio.wait_for(d.ready.wait(), 5)
    os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(CdpError, match="did not shut down within"):
        await asyncio.wait_for(task, 5)


async def test_serve_never_signals_ready_when_run_fails_first() -> None:
    class Broken(FakeDaemon):
        async def run(self) -> None:
            raise CdpError("cannot bind")

    with pytest.raises(CdpError, match="cannot bind"):
        await cdaemon._serve(Broken(), None, sdnotify.Notifier.from_env({}))
