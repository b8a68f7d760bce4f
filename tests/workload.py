"""Write workloads with an oracle, shared by integration, e2e and bench.

A workload writes through the protected disk (the FUSE file) with os.pwrite
and keeps, in memory, the image the disk must have: the oracle.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

MiB = 1024 * 1024


def mixed_data(rng: random.Random, size: int) -> bytes:
    """Random, zero or compressible bytes, so every path of the codec is used."""
    kind = rng.random()
    if kind < 0.4:
        return rng.randbytes(size)
    if kind < 0.6:
        return bytes(size)
    line = f"cdp line {rng.randrange(1 << 30):010d} lorem ipsum dolor sit amet\n".encode()
    return (line * (size // len(line) + 1))[:size]


class Workload:
    """Random-offset writes of mixed sizes and content, with an oracle image."""

    def __init__(self, path: str | Path, size_bytes: int, seed: int = 1) -> None:
        self.path = str(path)
        self.size = size_bytes
        self.rng = random.Random(seed)
        self.oracle = bytearray(size_bytes)
        self.written = 0
        self.writes = 0

    def write_bytes(self, total: int, max_write: int = 256 * 1024) -> None:
        fd = os.open(self.path, os.O_RDWR)
        try:
            done = 0
            while done < total:
                length = self.rng.choice((512, 4096, 4096, 8192, 65536, max_write,
                                          self.rng.randrange(1, max_write)))
                offset = self.rng.randrange(0, self.size - length)
                if self.rng.random() < 0.5:
                    offset -= offset % 4096
                data = mixed_data(self.rng, length)
                os.pwrite(fd, data, offset)
                self.oracle[offset:offset + length] = data
                done += length
                self.writes += 1
            os.fsync(fd)
        finally:
            os.close(fd)
        self.written += total

    def oracle_sha256(self) -> str:
        return hashlib.sha256(self.oracle).hexdigest()


def sha256_file(path: str | Path, chunk: int = 4 * MiB) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
