"""Test failovers: writable copies of a policy's disks at a restore point, kept apart.

Theory of operation
-------------------
A test failover (`cdpctl failover test start`) is a restore (`restore.restore_images`:
sparse or reflinked images under the target's restore_dir) that the target
remembers by name, so tests can be listed and stopped later and several can
run at once. The images are ordinary files the operator may write (through a
loop device, say): they share nothing with the replicas, the undo segments or
the catalog, so replication, restore points and retention go on untouched,
and writes to a test never reach them.

Registry, `<data_dir>/<policy>/tests.json` (statefile kind "target-tests",
version 1): ``{"tests": [{"name", "state": "starting" | "ready", "out_dir",
"disks": [disk names], "point_id", "last_seq", "time_ns", "started_ns"}]}``.

Crash safety: a test is recorded ("starting", with its directory and disk
names) *before* its images are written and marked "ready" after, so a crash
in between leaves a listed test that `stop` cleans up; `stop` deletes exactly
`<out_dir>/<disk>.img` and `<disk>.partial` for the recorded disks (unlinked
relative to the directory, never following a link), then the directory if it
is empty, then the record. Stopping a test whose files are gone already just
drops the record.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cdp_common import statefile
from cdp_common.errors import CdpError, FormatError, StorageError
from cdp_common.names import NAME_RE

TESTS_FILE = "tests.json"
TESTS_KIND = "target-tests"
TESTS_VERSION = 1
MAX_TESTS = 32


class FailoverTestExists(CdpError, grpc_status="ALREADY_EXISTS"):
    """A test failover of that name runs already."""


class NoSuchFailoverTest(CdpError, grpc_status="NOT_FOUND"):
    """No test failover of that name."""


@dataclass(frozen=True)
class FailoverTest:
    name: str
    state: str          # "starting" | "ready"
    out_dir: str
    disks: tuple[str, ...]
    point_id: int = 0
    last_seq: int = 0
    time_ns: int = 0
    started_ns: int = 0

    def images(self) -> dict[str, Path]:
        return {d: Path(self.out_dir) / f"{d}.img" for d in self.disks}


class FailoverTests:
    """The test failovers of one policy; not thread-safe (the service serializes)."""

    def __init__(self, policy_dir: Path) -> None:
        self.path = policy_dir / TESTS_FILE
        self.tests: dict[str, FailoverTest] = {}

    def load(self) -> None:
        data = statefile.load(self.path, TESTS_KIND, TESTS_VERSION)
        self.tests = {}
        for t in (data or {}).get("tests", []):
            try:
                rec = FailoverTest(**{**t, "disks": tuple(t["disks"])})
            except (TypeError, KeyError) as exc:
                raise FormatError(f"{self.path}: a test failover entry does not decode "
                                  f"({exc})") from None
            self.tests[rec.name] = rec

    def _save(self) -> None:
        statefile.save(self.path, TESTS_KIND, TESTS_VERSION,
                       {"tests": [{**asdict(t), "disks": list(t.disks)}
                                  for t in sorted(self.tests.values(), key=lambda t: t.name)]})

    def begin(self, name: str, out_dir: Path, disks: list[str]) -> FailoverTest:
        """Record a test about to be written (before any image exists)."""
        if not NAME_RE.match(name):
            raise FormatError(f"test name {name!r}: letters, digits, '.', '_' and '-', "
                              f"starting with a letter or digit")
        if name in self.tests:
            raise FailoverTestExists(f"a test failover named {name!r} runs already "
                                  f"(stop it first, or choose another name)")
        if len(self.tests) >= MAX_TESTS:
            raise StorageError(f"{MAX_TESTS} test failovers run already; stop one first")
        rec = FailoverTest(name, "starting", str(out_dir), tuple(sorted(disks)),
                         started_ns=time.time_ns())
        self.tests[name] = rec
        self._save()
        return rec

    def ready(self, name: str, point_id: int, last_seq: int, time_ns: int) -> FailoverTest:
        rec = FailoverTest(**{**asdict(self.tests[name]), "state": "ready", "point_id": point_id,
                            "last_seq": last_seq, "time_ns": time_ns})
        self.tests[name] = rec
        self._save()
        return rec

    def stop(self, name: str) -> FailoverTest:
        """Delete the test's images and directory, then its record."""
        rec = self.tests.get(name)
        if rec is None:
            known = ", ".join(sorted(self.tests)) or "none"
            raise NoSuchFailoverTest(f"no test failover named {name!r} (running: {known})")
        remove_images(Path(rec.out_dir), rec.disks)
        del self.tests[name]
        self._save()
        return rec

    def abandon(self, name: str) -> None:
        """A start that failed: remove what it wrote and its record."""
        with contextlib.suppress(CdpError):
            self.stop(name)


def remove_images(out_dir: Path, disks: tuple[str, ...]) -> None:
    try:
        dfd = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StorageError(f"{out_dir}: cannot open ({exc.strerror or exc})") from None
    try:
        for d in disks:
            for name in (f"{d}.img", f"{d}.partial"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=dfd)
        os.fsync(dfd)
    except OSError as exc:
        raise StorageError(f"{out_dir}: cannot delete the test images "
                           f"({exc.strerror or exc})") from None
    finally:
        os.close(dfd)
    with contextlib.suppress(OSError):   # kept when something else lives there
        out_dir.rmdir()


def record_dict(rec: FailoverTest) -> dict[str, Any]:
    return {**asdict(rec), "disks": list(rec.disks),
            "images": {d: str(p) for d, p in rec.images().items()}}
