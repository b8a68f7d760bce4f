"""systemd's notify protocol (sd_notify) without libsystemd.

Theory of operation
-------------------
A service started with `Type=notify` tells systemd how it is doing by sending
datagrams of newline-separated `KEY=VALUE` lines to the unix socket named in
`$NOTIFY_SOCKET` (a path, or an abstract name written with a leading `@`):

- `READY=1` once the daemon serves (systemd holds `systemctl start` until then);
- `WATCHDOG=1` at least every `$WATCHDOG_USEC` microseconds when the unit has
  `WatchdogSec=` (systemd kills and restarts a daemon that stops sending);
  we send every half period, from the daemon's event loop, so a wedged loop
  is exactly what stops the pings;
- `RELOADING=1` while a SIGHUP reload runs, then `READY=1` again;
- `STOPPING=1` when shutdown starts;
- `STATUS=...` a one-line human status shown by `systemctl status`.

`$WATCHDOG_PID`, when set, names the process the watchdog is meant for; any
other process (a child, a test runner that inherited the environment) must
not send pings. Everything here is a no-op when `$NOTIFY_SOCKET` is unset, so
daemons call it unconditionally. The pure part (`parse_env`, `message`) holds
the rules; `Notifier` is the thin socket shell. Sending never raises: losing
a notification must not take the daemon down (systemd then restarts it,
which is the designed outcome of a silent watchdog).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass

log = logging.getLogger("common.sdnotify")


@dataclass(frozen=True)
class NotifyEnv:
    """What the environment asks of this process."""

    socket_address: str | bytes | None
    """Where to send (abstract names as bytes starting with NUL), None = not under systemd."""
    watchdog_interval_s: float | None
    """How often to send WATCHDOG=1 (half of WATCHDOG_USEC), None = no watchdog."""


def parse_env(env: Mapping[str, str], pid: int) -> NotifyEnv:
    """Read NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID for process `pid`."""
    raw = env.get("NOTIFY_SOCKET", "")
    address: str | bytes | None = None
    if raw.startswith("@"):
        address = b"\0" + raw[1:].encode()
    elif raw.startswith("/"):
        address = raw
    interval: float | None = None
    usec = env.get("WATCHDOG_USEC", "")
    wd_pid = env.get("WATCHDOG_PID", "")
    pid_ok = not wd_pid or (wd_pid.isdigit() and int(wd_pid) == pid)
    if usec.isdigit() and int(usec) > 0 and pid_ok:
        interval = int(usec) / 2e6
    return NotifyEnv(address, interval)


def message(**fields: str | int) -> bytes:
    """`message(READY=1, STATUS="serving")` -> b"READY=1\\nSTATUS=serving"."""
    lines = []
    for key, value in fields.items():
        text = str(value)
        if "\n" in text:
            raise ValueError(f"{key}: a notify value cannot contain a newline")
        lines.append(f"{key}={text}")
    return "\n".join(lines).encode()


class Notifier:
    """Sends notify messages to systemd (or to a test's socket)."""

    def __init__(self, env: NotifyEnv) -> None:
        self.env = env
        self._sock: socket.socket | None = None
        if env.socket_address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        return cls(parse_env(os.environ if env is None else env, os.getpid()))

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        return self.env.watchdog_interval_s if self.enabled else None

    def send(self, **fields: str | int) -> bool:
        if self._sock is None or self.env.socket_address is None:
            return False
        try:
            self._sock.sendto(message(**fields), self.env.socket_address)
            return True
        except OSError as exc:
            log.warning("sd_notify %s failed: %s", ",".join(fields), exc)
            return False

    def ready(self, status: str = "") -> bool:
        return self.send(READY=1, STATUS=status) if status else self.send(READY=1)

    def reloading(self) -> bool:
        return self.send(RELOADING=1,
                         MONOTONIC_USEC=int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6))

    def stopping(self) -> bool:
        return self.send(STOPPING=1)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def status(self, text: str) -> bool:
        return self.send(STATUS=text)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
