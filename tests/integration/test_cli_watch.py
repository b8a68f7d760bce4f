"""`cdpctl status --watch` and `cdpctl health --watch` against a real lab (issue 15
item 5): frames are redrawn in place every --interval, a coordinator that stops
answering is shown and retried (not fatal), and Ctrl-C ends the watch with the
code of the last frame."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_eventually

pytestmark = pytest.mark.timeout(180)

CLEAR = "\x1b[H\x1b[2J"


class Watch:
    """A `cdpctl ... --watch` process whose output is collected as it comes."""

    def __init__(self, lab_dir: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cdpctl", *args, "--watch", "--interval", "0.3",
             "--timeout", "1", "--lab-dir", str(lab_dir)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.out = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for chunk in iter(lambda: self.proc.stdout.read(1), ""):  # type: ignore[union-attr]
            self.out += chunk

    def frames(self) -> list[str]:
        return [f for f in self.out.split(CLEAR) if f.strip()]

    def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(15)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def test_status_and_health_watch_redraw_survive_the_coordinator_and_stop(
        lab: Any, tmp_path: Path) -> None:
    handle = lab(tmp_path / "lab", disk_size="64M")
    assert_eventually(lambda: handle.cli("health").returncode == 0, 60, 0.5, "not healthy")
    status, health = Watch(handle.dir, "status"), Watch(handle.dir, "health")
    try:
        assert_eventually(lambda: len(status.frames()) >= 3 and len(health.frames()) >= 3,
                          30, 0.2, "the watches did not redraw")
        assert "POLICY" in status.frames()[-1] and "lab" in status.frames()[-1]
        assert "health: OK" in health.frames()[-1]
        # the coordinator goes away: each frame says so, the watch goes on
        handle.kill("coordinator")
        seen = len(health.frames())
        assert_eventually(lambda: any("cdpctl:" in f for f in health.frames()[seen:])
                          and any("cdpctl:" in f for f in status.frames()[seen:]), 30, 0.2,
                          "the watches did not show the unreachable coordinator")
        assert status.proc.poll() is None and health.proc.poll() is None
        handle.restart("coordinator")
        seen = len(health.frames())
        assert_eventually(lambda: any("health: OK" in f for f in health.frames()[seen:]),
                          60, 0.3, "health --watch did not recover with the coordinator")
        time.sleep(0.5)
        assert status.interrupt() == 0
        assert health.interrupt() == 0      # the last frame said OK
    finally:
        status.kill()
        health.kill()
    assert "Traceback" not in status.out + health.out
