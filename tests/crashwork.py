"""A background O_DIRECT writer with an oracle that survives filter crashes.

Theory of operation: `CrashWriter` runs in a thread and writes mixed-size,
4 KiB-aligned blocks of mixed content through the protected disk with one
O_DIRECT pwrite each (so each write is one or a few FUSE requests, never
cached). A pwrite that returned is *acknowledged*: its bytes go into the
oracle at once. A pwrite that failed (the filter was killed under it: EIO or
ENOTCONN) is *not acknowledged*: nothing is promised for it, so the writer
remembers (offset, new bytes, oracle bytes before) and waits until the test
says the filter is back (`filter_up`). Before writing again it reads the
region back through the restarted filter and checks that every 4 KiB block
is either entirely old or entirely new (a kill can cut a write between the
FUSE requests it was split into, never inside one), then adopts what it
read into the oracle. So at any quiet moment `oracle == source image`, and an
acknowledged write is never forgiven: if the source lost one, the final
comparison fails.

`throttle_bytes_per_s` bounds the write rate so the pipeline can catch up
in a test-sized time even on a 2-core machine.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import os
import random
import threading
import time
from pathlib import Path

from workload import mixed_data

BLOCK = 4096
SIZES = (4096, 4096, 8192, 16384, 65536, 262144, 1024 * 1024)
MAX_WRITE = 1024 * 1024
_DOWN_ERRNOS = (errno.EIO, errno.ENOTCONN, errno.ENOENT, errno.ENODEV, errno.ECONNABORTED)


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


class CrashWriter:
    def __init__(self, path: str | Path, size_bytes: int, seed: int,
                 throttle_bytes_per_s: int = 4 * 1024 * 1024) -> None:
        self.path = str(path)
        self.size = size_bytes
        self.rng = random.Random(seed)
        self.oracle = bytearray(size_bytes)
        self.throttle = throttle_bytes_per_s
        self.filter_up = threading.Event()
        self.filter_up.set()
        self.stop = threading.Event()
        self.failure: BaseException | None = None
        self.acked = 0
        self.acked_bytes = 0
        self.unacked = 0          # writes that failed because the filter died
        self.unacked_landed = 0   # ... of which the source had kept every block
        self._buf = mmap.mmap(-1, MAX_WRITE)  # page aligned, as O_DIRECT wants
        self._thread = threading.Thread(target=self._run, name="crash-writer", daemon=True)

    # ------------------------------------------------------------ control

    def start(self) -> None:
        self._thread.start()

    def finish(self, timeout_s: float = 60.0) -> None:
        """Stop writing and join; re-raise whatever went wrong in the thread."""
        self.stop.set()
        self.filter_up.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise AssertionError("the writer thread did not stop")
        if self.failure is not None:
            raise AssertionError(f"writer failed: {self.failure!r}") from self.failure

    def oracle_sha256(self) -> str:
        return hashlib.sha256(self.oracle).hexdigest()

    # ------------------------------------------------------------ thread

    def _open(self) -> int:
        while True:
            self.filter_up.wait()
            try:
                return os.open(self.path, os.O_RDWR | os.O_DIRECT)
            except OSError as exc:
                if exc.errno not in _DOWN_ERRNOS or self.stop.is_set():
                    raise
                time.sleep(0.05)

    def _run(self) -> None:
        try:
            fd = self._open()
            try:
                while not self.stop.is_set():
                    length = self.rng.choice(SIZES)
                    offset = self.rng.randrange(0, (self.size - length) // BLOCK + 1) * BLOCK
                    data = mixed_data(self.rng, length)
                    view = memoryview(self._buf)[:length]
                    view[:] = data
                    try:
                        n = os.pwrite(fd, view, offset)
                    except OSError as exc:
                        if exc.errno not in _DOWN_ERRNOS:
                            raise
                        self.unacked += 1
                        old = bytes(self.oracle[offset:offset + length])
                        _close(fd)  # flush on a dead mount fails; the fd is freed anyway
                        fd = -1
                        fd = self._reconcile(offset, data, old)
                        continue
                    finally:
                        view.release()
                    if n != length:
                        raise AssertionError(f"short write {n} of {length} at {offset}")
                    self.oracle[offset:offset + length] = data
                    self.acked += 1
                    self.acked_bytes += length
                    if self.throttle:
                        time.sleep(length / self.throttle)
            finally:
                if fd >= 0:
                    _close(fd)
        except BaseException as exc:  # surfaced by finish()
            self.failure = exc

    def _reconcile(self, offset: int, new: bytes, old: bytes) -> int:
        """After the filter is back: adopt what the source kept of an unacked write."""
        fd = self._open()
        got = bytearray()
        view = memoryview(self._buf)[:len(new)]
        try:
            n = os.preadv(fd, [view], offset)
            got[:] = view[:n]
        finally:
            view.release()
        if len(got) != len(new):
            raise AssertionError(f"short read back {len(got)} of {len(new)} at {offset}")
        all_new = True
        for i in range(0, len(new), BLOCK):
            block = got[i:i + BLOCK]
            if block == new[i:i + BLOCK]:
                continue
            all_new = False
            if block != old[i:i + BLOCK]:
                raise AssertionError(
                    f"block at {offset + i} after a crash holds neither the old bytes nor "
                    f"the unacknowledged write's bytes")
        if all_new:
            self.unacked_landed += 1
        self.oracle[offset:offset + len(new)] = got
        return fd
