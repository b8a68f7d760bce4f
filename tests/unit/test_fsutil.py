"""cdp_common.fsutil: the shared durable-replace primitive."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from cdp_common.fsutil import write_file_atomic


def test_replaces_content_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    write_file_atomic(target, b"new", 0o644)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(os.stat(target).st_mode) & 0o777 == 0o644 & ~_umask()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_failure_keeps_the_old_content(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    with pytest.raises(OSError):
        write_file_atomic(target, b"new", tmp=tmp_path / "missing-dir" / "x.tmp")
    assert target.read_bytes() == b"old"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
