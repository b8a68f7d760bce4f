"""FUSE smoke test: the real cdp-filter daemon in a subprocess (insecure
config, no coordinator listening). Writes through the mount with O_DIRECT,
checks image and journal, refuses out-of-range writes and size changes,
recovers from kill -9 (stale mount + redo of the journal), stops on SIGTERM."""

from __future__ import annotations

import errno
import glob
import mmap
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cdp_common import records

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="FUSE smoke test needs root"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="/dev/fuse is missing"),
]

MiB = 1 << 20


class FilterProc:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.mnt = tmp / "mnt"
        self.data = tmp / "data"
        self.config = tmp / "filter.toml"
        self.config.write_text(f"""
[node]
id = "filter-1"
listen = "127.0.0.1:0"
coordinator = "127.0.0.1:1"
[tls]
insecure = true
[filter]
mountpoint = "{self.mnt}"
data_dir = "{self.data}"
journal_segment_bytes = {4 * MiB}
journal_cap_bytes = {64 * MiB}
[[disks]]
name = "d0"
policy = "p1"
size_bytes = {16 * MiB}
[[disks]]
name = "d1"
policy = "p1"
size_bytes = {4 * MiB}
""")
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp / "filter.log"

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cdp_filter", "run", "--config", str(self.config)],
                stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"filter exited: {self.log.read_text()}")
            if self.mounted():
                try:
                    if sorted(os.listdir(self.mnt)) == ["d0", "d1"]:
                        return
                except OSError:
                    pass
            time.sleep(0.05)
        raise AssertionError(f"filter did not mount: {self.log.read_text()}")

    def mounted(self) -> bool:
        real = os.path.realpath(self.mnt)
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == real and " - fuse" in line for line in f)

    def kill(self, sig: int) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        os.kill(self.proc.pid, sig)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(5)

    def cleanup(self) -> None:
        self.kill(signal.SIGKILL)
        if self.mounted():
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], check=False,
                           capture_output=True)

    def journal_records(self) -> list[records.Record]:
        out: list[records.Record] = []
        for path in sorted(glob.glob(str(self.data / "journal" / "p1" / "*.seg"))):
            out.extend(records.decode_all(Path(path).read_bytes()))
        return out


@pytest.fixture
def filt(tmp_path: Path) -> Iterator[FilterProc]:
    fp = FilterProc(tmp_path)
    try:
        fp.start()
        yield fp
    finally:
        fp.cleanup()


def aligned(data: bytes) -> mmap.mmap:
    buf = mmap.mmap(-1, len(data))
    buf.write(data)
    return buf


def pattern(seed: int, n: int) -> bytes:
    return (bytes([seed % 256]) * 13 + os.urandom(3)) * (n // 16)


def test_capture_through_fuse(filt: FilterProc) -> None:
    d0, d1 = pattern(1, MiB), pattern(2, 4096)
    fd0 = os.open(filt.mnt / "d0", os.O_RDWR | os.O_DIRECT)
    fd1 = os.open(filt.mnt / "d1", os.O_RDWR | os.O_DIRECT)
    try:
        assert os.fstat(fd0).st_size == 16 * MiB
        assert os.pwrite(fd0, aligned(d0), 2 * MiB) == MiB
        assert os.pwrite(fd1, aligned(d1), 8192) == 4096
        assert os.pwrite(fd0, aligned(d1), 0) == 4096
        os.fsync(fd0)
        with pytest.raises(OSError) as info:
            os.pwrite(fd1, aligned(d1), 4 * MiB)
        assert info.value.errno == errno.ENOSPC
        with pytest.raises(OSError) as info:
            os.ftruncate(fd1, MiB)
        assert info.value.errno == errno.EPERM
        back = aligned(b"\0" * MiB)
        assert os.preadv(fd0, [back], 2 * MiB) == MiB and bytes(back) == d0
    finally:
        os.close(fd0)
        os.close(fd1)
    img0 = (filt.data / "images" / "d0.img").read_bytes()
    img1 = (filt.data / "images" / "d1.img").read_bytes()
    assert len(img0) == 16 * MiB and img0[2 * MiB:3 * MiB] == d0 and img0[:4096] == d1
    assert img1[8192:12288] == d1
    recs = filt.journal_records()
    assert [(r.seq, r.disk_id, r.offset, r.length) for r in recs] == [
        (1, 0, 2 * MiB, MiB), (2, 1, 8192, 4096), (3, 0, 0, 4096)]
    assert recs[0].data == d0 and recs[0].time_ns > 0
    assert filt.kill(signal.SIGTERM) == 0
    assert not filt.mounted()


def test_kill9_restart_replays_journal(filt: FilterProc) -> None:
    data = pattern(7, 64 * 1024)
    fd = os.open(filt.mnt / "d0", os.O_RDWR | os.O_DIRECT)
    try:
        for i in range(8):
            os.pwrite(fd, aligned(data), i * 64 * 1024)
    finally:
        os.close(fd)
    assert filt.kill(signal.SIGKILL) == -signal.SIGKILL
    # A write the journal holds but the image lost (killed between the two).
    img = filt.data / "images" / "d0.img"
    with open(img, "r+b") as f:
        f.seek(7 * 64 * 1024)
        f.write(b"\xee" * 64 * 1024)
    filt.start()  # must clear the stale mount and redo the journal first
    assert img.read_bytes()[7 * 64 * 1024:8 * 64 * 1024] == data
    with open(filt.mnt / "d0", "rb", buffering=0) as f:
        f.seek(7 * 64 * 1024)
        assert f.read(64 * 1024) == data
    fd = os.open(filt.mnt / "d0", os.O_RDWR | os.O_DIRECT)
    try:
        os.pwrite(fd, aligned(data), 0)
    finally:
        os.close(fd)
    assert [r.seq for r in filt.journal_records()] == list(range(1, 10))
