"""The checks that prove restored disk images usable (shared by `cdpctl verify` and the
target's scheduled verification, cdp_target.verifysched).

Theory of operation: the caller has restored a point into scratch space (a
sparse copy); `attach_loops` gives each image a writable loop device (the
copies are scratch: `e2fsck -E journal_only` replays the file system journal
on them, as a mount at failover would), `run_checks` then runs, as asked,
`e2fsck -fn` on each device (a clean file system or the check fails) and the
operator's script against the copies mounted read-only, and `detach_loops`
lets the devices go. Every command goes through a `Runner`, so a test can
see (or fake) exactly what runs. `cannot_verify` says why this host cannot
run the checks at all (not root, no losetup or e2fsck): such a verification
is recorded as failed with that reason, never as passed.

No daemon logic: subprocesses only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cdp_common.errors import CdpError

FSCK_TIMEOUT_S = 3600.0
LOSETUP_TIMEOUT_S = 60.0
Runner = Callable[[list[str], float, dict[str, str] | None], tuple[int, str]]
"""runner(argv, timeout_s, extra_env) -> (exit code, stdout + stderr)."""


class LoopError(CdpError):
    """A loop device could not be attached (needs root and a free loop device)."""


def run_command(argv: list[str], timeout_s: float,
                env: dict[str, str] | None = None) -> tuple[int, str]:
    """The default Runner: 127 when not installed, 124 on timeout."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s,
                              stdin=subprocess.DEVNULL,
                              env=None if env is None else {**os.environ, **env})
    except FileNotFoundError:
        return 127, f"{argv[0]}: not installed"
    except subprocess.TimeoutExpired:
        return 124, f"{argv[0]}: no result within {timeout_s:.0f}s"
    return done.returncode, (done.stdout + done.stderr).strip()


@dataclass
class Outcome:
    """What a verification found: ok until a check fails; `checks` names what ran."""

    ok: bool = True
    checks: list[str] = field(default_factory=list)
    detail: list[str] = field(default_factory=list)

    def fail(self, why: str) -> None:
        self.ok = False
        self.detail.append(why)


def cannot_verify(fsck: bool = True, which: Callable[[str], str | None] = shutil.which,
                  euid: Callable[[], int] = os.geteuid) -> str:
    """Why this host cannot attach and check restored images ("" when it can)."""
    if euid() != 0:
        return "not root: loop devices cannot be attached"
    missing = [tool for tool in ("losetup", *(("e2fsck",) if fsck else ())) if not which(tool)]
    if missing:
        return f"{' and '.join(missing)} not installed"
    return ""


def attach_loops(paths: list[str], runner: Runner = run_command) -> list[str]:
    """A writable loop device per scratch copy (direct I/O where it works); on a
    failure the ones attached already are detached and LoopError raised."""
    devices: list[str] = []
    try:
        for path in paths:
            base = ["losetup", "--find", "--show"]
            code, text = runner([*base, "--direct-io=on", path], LOSETUP_TIMEOUT_S, None)
            if code != 0:
                code, text = runner([*base, path], LOSETUP_TIMEOUT_S, None)
            if code != 0:
                raise LoopError(f"losetup {path}: {text or 'failed'} (needs root)")
            devices.append(text.splitlines()[-1].strip())
    except BaseException:
        detach_loops(devices, runner)
        raise
    return devices


def detach_loops(devices: list[str], runner: Runner = run_command) -> None:
    for dev in devices:
        runner(["losetup", "-d", dev], LOSETUP_TIMEOUT_S, None)


def run_checks(devices: list[str], mounts_dir: Path, fsck: bool, script: str | None,
               script_timeout_s: float, env: dict[str, str], out: Outcome,
               runner: Runner = run_command) -> None:
    """The file system check and the operator's script over the attached copies."""
    if fsck:
        out.checks.append("fsck")
        for dev in devices:
            code, text = runner(["e2fsck", "-E", "journal_only", "-y", dev], FSCK_TIMEOUT_S,
                                None)
            if code not in (0, 1):   # 1: the journal was replayed
                out.fail(f"e2fsck journal replay on {dev} exited {code}: {text[-500:]}")
                continue
            code, text = runner(["e2fsck", "-f", "-n", dev], FSCK_TIMEOUT_S, None)
            if code != 0:
                out.fail(f"e2fsck -fn {dev} exited {code} (errors found): {text[-800:]}")
    if script and out.ok:
        out.checks.append("script")
        mounts: list[Path] = []
        try:
            for i, dev in enumerate(devices):
                mnt = mounts_dir / f"mnt{i}"
                mnt.mkdir(parents=True, exist_ok=True)
                code, text = runner(["mount", "-o", "ro", dev, str(mnt)], 120, None)
                if code != 0:
                    out.fail(f"mount {dev} read-only exited {code}: {text[-500:]}")
                    return
                mounts.append(mnt)
            code, text = runner([script], script_timeout_s, {
                **env, "CDP_VERIFY_MOUNTS": " ".join(map(str, mounts)),
                "CDP_VERIFY_DEVICES": " ".join(devices)})
            if code != 0:
                out.fail(f"script {script} exited {code}: {text[-800:]}")
            else:
                out.detail.append(f"script {script} passed")
        finally:
            for mnt in mounts:
                runner(["umount", str(mnt)], 120, None)
