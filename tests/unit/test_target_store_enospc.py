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
from cdp_target import store as store_mod
from cdp_target.store import PolicyStore

pytestmark = pytest.mark.timeout(30)


def test_failed_state_write_after_apply_keeps_the_delta(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(3)
    oracle = Oracle()
    s = PolicyStore.open(tmp_path / "p", DISKS, apply=False)
    ext = random_extents(rng)
    assert send(s, 1, 5, ext)  # fresh
    oracle.apply(ext)

    real = PolicyStore._write_state_locked
    calls = {"n": 0}

    def full_once(self: PolicyStore) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise store_mod._storage("state.json", OSError(errno.ENOSPC, "No space left"))
        real(self)

    monkeypatch.setattr(PolicyStore, "_write_state_locked", full_once)
    with pytest.raises(StorageError, match="No space left"):
        s.apply_pending()
    assert s.snapshot().applied_seq == 0
    assert list((tmp_path / "p" / "deltas").glob("*.delta")), "the delta was dropped"
    # space is back: the retry applies it (idempotent redo)
    assert s.apply_pending() == 5
    s.close()
    monkeypatch.setattr(PolicyStore, "_write_state_locked", real)
    s = PolicyStore.open(tmp_path / "p", DISKS)
    assert s.snapshot().applied_seq == 5
    oracle.check(tmp_path / "p")
    s.close()
