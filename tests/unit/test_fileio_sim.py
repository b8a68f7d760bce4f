"""The crash/power-loss simulator itself: what survives a cut is exactly what was made durable."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cdp_common import fsutil
from cdp_common.fileio import OS_IO
from cdp_common.fileio_sim import SimIO, SimulatedCrash


def _write(io: SimIO | None, path: Path, data: bytes, sync: bool) -> None:
    fio = io or OS_IO
    fd = fio.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fio.pwrite(fd, data, 0)
        if sync:
            fio.fsync(fd)
    finally:
        fio.close(fd)


def test_unsynced_write_is_dropped_synced_kept(tmp_path: Path) -> None:
    (tmp_path / "old").write_bytes(b"before")
    io = SimIO([tmp_path])
    _write(io, tmp_path / "kept", b"durable", sync=True)
    _write(io, tmp_path / "lost", b"volatile", sync=False)
    fd = io.open(tmp_path / "old", os.O_WRONLY)
    io.pwrite(fd, b"AFTER!", 0)
    io.close(fd)
    changed = io.power_cut()
    assert (tmp_path / "kept").read_bytes() == b"durable"
    assert not (tmp_path / "lost").exists()
    assert (tmp_path / "old").read_bytes() == b"before"
    assert any("lost" in c for c in changed)


def test_rename_needs_a_directory_fsync(tmp_path: Path) -> None:
    (tmp_path / "state").write_bytes(b"v1")
    io = SimIO([tmp_path])
    _write(io, tmp_path / "state.tmp", b"v2", sync=True)
    io.rename(tmp_path / "state.tmp", tmp_path / "state")
    io.power_cut()
    assert (tmp_path / "state").read_bytes() == b"v1"
    fsutil.write_file_atomic(tmp_path / "state", b"v3", io=io)
    io.power_cut()
    assert (tmp_path / "state").read_bytes() == b"v3"
    assert not (tmp_path / "state.tmp").exists()


def test_crash_at_each_step_stops_there(tmp_path: Path) -> None:
    clean = SimIO([tmp_path / "run"])
    fsutil.write_file_atomic(tmp_path / "run" / "f", b"x", io=clean)
    assert [s.split()[0] for s in clean.steps] == ["open", "pwrite", "fsync", "rename",
                                                    "fsync_dir"]
    for n in range(len(clean.steps)):
        d = tmp_path / "run"
        for f in d.iterdir():
            f.unlink()
        io = SimIO([d], crash_at=n)
        with pytest.raises(SimulatedCrash):
            fsutil.write_file_atomic(d / "f", b"x", io=io)
        assert io.steps == clean.steps[: n + 1]
        with pytest.raises(SimulatedCrash):
            io.fsync_dir(d)  # the process is gone: nothing else happens
        io.power_cut()
        # atomic replace: either no file or the whole new content, never a torn one
        assert not (d / "f").exists() or (d / "f").read_bytes() == b"x"


def test_a_reused_inode_number_is_another_file(tmp_path: Path) -> None:
    """The file system hands an unlinked file's inode number to the next file
    created; an entry whose unlink was not made durable still names the old one."""
    io = SimIO([tmp_path])
    _write(io, tmp_path / "a", b"old a", sync=True)
    io.fsync_dir(tmp_path)
    ino = (tmp_path / "a").stat().st_ino
    io.unlink(tmp_path / "a")   # not made durable: "a" comes back after a cut
    _write(io, tmp_path / "b", b"new b", sync=True)
    if (tmp_path / "b").stat().st_ino != ino:
        pytest.skip("this file system did not reuse the inode number")
    io.power_cut()
    assert (tmp_path / "a").read_bytes() == b"old a"
    assert (tmp_path / "b").read_bytes() == b"new b"  # its fsync committed its entry
