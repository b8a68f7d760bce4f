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

Seqs, for restore points (invariant I2). With a `seq_probe` (the filter's
`cdp_filter_captured_seq` metric, i.e. the journal's last seq), the writer
also keeps the *write log*: every change it made to the disk, in order, with
the seq window it got. The writer is the only application writer and issues
one pwrite at a time, so between two probes the only seqs taken are its own
write's and those of records the filter makes itself (RESYNC records, the
GAP_END marker). After each write it probes again: a write made between
probes `known` and `S` holds a seq in `(known, S]` -- exactly `S` when
`S == known + 1`, the normal case (a 1 MiB O_DIRECT pwrite is one FUSE
request, one seq). When `S == known` the write took no seq: the journal had
overflowed and the filter only marked the blocks dirty; such a write belongs
to every point at or after `known + 1` (any *consistent* one of those lies
after the gap's GAP_END marker, so the resync carried it). A failed write
that the restarted source kept (wholly or in part) is logged with what was
read back, in the window `(known, S]` probed after the restart (the journal
record made before the kill survives SIGKILL and is replayed; a torn one was
cut, and its seq is then free for the next write, never shipped).

`prefix_shas` replays the log once: the image at restore point `P` is the
disk's first state plus every logged change with seq window at or below `P`;
a point that falls strictly inside a wider window (`lo <= P < hi`) cannot be
told apart and is reported as `None` (ambiguous, skipped by the caller, and
counted).

`throttle_bytes_per_s` bounds the write rate so the pipeline can catch up
in a test-sized time even on a 2-core machine.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import mmap
import os
import random
import re
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from workload import mixed_data

BLOCK = 4096
SIZES = (4096, 4096, 8192, 16384, 65536, 262144, 1024 * 1024)
MAX_WRITE = 1024 * 1024
_DOWN_ERRNOS = (errno.EIO, errno.ENOTCONN, errno.ENOENT, errno.ENODEV, errno.ECONNABORTED)
PROBE_GIVE_UP_S = 120.0


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def captured_seq(metrics_address: str, policy: str, timeout_s: float = 2.0) -> int:
    """The filter's `cdp_filter_captured_seq{policy=...}` (its journal's last seq).

    Raises OSError (or http.client.HTTPException) when the filter does not answer.
    """
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=timeout_s) as r:
        text = r.read().decode()
    m = re.search(r'^cdp_filter_captured_seq\{policy="' + re.escape(policy)
                  + r'"\}\s+(\S+)$', text, re.M)
    if m is None:
        raise OSError(f"no cdp_filter_captured_seq for policy {policy} at {metrics_address}")
    return int(float(m.group(1)))


@dataclass(frozen=True)
class Logged:
    """One change to the disk: `data` at `offset`, made with a seq in [lo, hi]."""

    lo: int
    hi: int
    offset: int
    data: bytes


class CrashWriter:
    def __init__(self, path: str | Path, size_bytes: int, seed: int,
                 throttle_bytes_per_s: int = 4 * 1024 * 1024,
                 seq_probe: Callable[[], int] | None = None) -> None:
        self.path = str(path)
        self.size = size_bytes
        self.rng = random.Random(seed)
        self.oracle = bytearray(size_bytes)
        self.base = b""                  # the disk before the first logged write
        self.throttle = throttle_bytes_per_s
        self.filter_up = threading.Event()
        self.filter_up.set()
        self.stop = threading.Event()
        self.failure: BaseException | None = None
        self.acked = 0
        self.acked_bytes = 0
        self.unacked = 0          # writes that failed because the filter died
        self.unacked_landed = 0   # ... of which the source had kept every block
        self.unacked_partly = 0   # ... of which the source had kept some blocks
        self.seq_probe = seq_probe
        self.known = 0            # last probed captured seq
        self.log: list[Logged] = []
        self.seqless = 0          # acked writes that took no seq (dirty tracking)
        self.wide = 0             # logged changes whose seq is not known exactly
        self._buf = mmap.mmap(-1, MAX_WRITE)  # page aligned, as O_DIRECT wants
        self._thread = threading.Thread(target=self._run, name="crash-writer", daemon=True)

    # ------------------------------------------------------------ control

    def start(self) -> None:
        if self.seq_probe is not None:
            self.known = self._probe()
        self.base = bytes(self.oracle)
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

    def prefix_shas(self, seqs: list[int]) -> dict[int, str | None]:
        """sha256 of the oracle image at each restore point seq (None: ambiguous)."""
        img = bytearray(self.base)
        out: dict[int, str | None] = {}
        i = 0
        for p in sorted(set(seqs)):
            while i < len(self.log) and self.log[i].hi <= p:
                w = self.log[i]
                img[w.offset:w.offset + len(w.data)] = w.data
                i += 1
            ambiguous = i < len(self.log) and self.log[i].lo <= p
            out[p] = None if ambiguous else hashlib.sha256(img).hexdigest()
        return out

    # ------------------------------------------------------------ seqs

    def _probe(self) -> int:
        """The filter's captured seq; waits (filter_up) while the filter is down."""
        assert self.seq_probe is not None
        deadline = time.monotonic() + PROBE_GIVE_UP_S
        while True:
            try:
                seq = self.seq_probe()
                break
            except (OSError, http.client.HTTPException):
                if time.monotonic() > deadline:
                    raise
                self.filter_up.wait(PROBE_GIVE_UP_S)
                time.sleep(0.05)
        if seq < self.known:
            raise AssertionError(f"the filter's captured seq went back from {self.known} "
                                 f"to {seq}: a seq would be reused")
        return seq

    def _logged(self, offset: int, data: bytes) -> None:
        """Log a change just made to the disk with the seq window the probe gives."""
        if self.seq_probe is None:
            return
        seq = self._probe()
        if seq == self.known:
            self.seqless += 1
            lo = hi = seq + 1          # no seq: in every point after `known`
        else:
            lo, hi = self.known + 1, seq
            if hi > lo:
                self.wide += 1
        self.log.append(Logged(lo, hi, offset, data))
        self.known = seq

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
                    self._logged(offset, data)
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
        elif got != old:
            self.unacked_partly += 1
        self.oracle[offset:offset + len(new)] = got
        if got != old:
            self._logged(offset, bytes(got))
        elif self.seq_probe is not None:
            self.known = self._probe()   # seqs the filter took meanwhile belong to no write
        return fd
