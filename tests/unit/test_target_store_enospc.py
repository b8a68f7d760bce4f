"""PolicyStore when its volume is full: a state write that fails after an
apply leaves the delta in place and applied_seq where state.json has it, so
neither a retry nor a crash can lose the delta (issue 5, target volume full)."""

from __future__ import annotations

import errno
import random
from pathlib import Path

import pytest
from test_target_store import DISKS, Oracle, random_extents, send

from cdp_common.errors import StorageError
from cdp_common.fileio import OsFileIO, StrPath
from cdp_target.store import PolicyStore

pytestmark = pytest.mark.timeout(30)


class FullOnce(OsFileIO):
    """The volume is full for the first state-file write after `arm()`."""

    def __init__(self) -> None:
        self.armed = False

    def arm(self) -> None:
        self.armed = True

    def open(self, path: StrPath, flags: int, mode: int = 0o600) -> int:
        if self.armed and Path(path).name == "state.json.tmp":
            self.armed = False
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().open(path, flags, mode)


def test_failed_state_write_after_apply_keeps_the_delta(tmp_path: Path) -> None:
    rng = random.Random(3)
    oracle = Oracle()
    io = FullOnce()
    s = PolicyStore.open(tmp_path / "p", DISKS, apply=False, io=io)
    ext = random_extents(rng)
    assert send(s, 1, 5, ext)  # fresh
    oracle.apply(ext)

    io.arm()
    with pytest.raises(StorageError, match="No space left"):
        s.apply_pending()
    assert s.snapshot().applied_seq == 0
    assert list((tmp_path / "p" / "deltas").glob("*.delta")), "the delta was dropped"
    # space is back: the retry applies it (idempotent redo)
    assert s.apply_pending() == 5
    s.close()
    s = PolicyStore.open(tmp_path / "p", DISKS)
    assert s.snapshot().applied_seq == 5
    oracle.check(tmp_path / "p")
    s.close()
