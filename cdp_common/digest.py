"""Region digests of a disk image (docs/FORMAT.md "Region digests").

Theory of operation: an image is cut into regions of `region_bytes` (a power
of two; the last region ends at the disk's end). A region's digest is the
xxh3-128 of its bytes, in the canonical 16-byte big-endian form. Both ends of
a digest sync (the target's replica, the filter's image) use `digests()`, so
they agree byte for byte. Sparse images are walked with SEEK_DATA/SEEK_HOLE:
a region that lies wholly in a hole is all zeros and gets the precomputed
digest of zeros without a read; a region with data is read once. Reads are
positional (`os.pread`) and never change the file.

xxh3-128 (not a cryptographic hash) is enough here: both images belong to the
same operator, and a collision only needs 2^64 work to *construct* with both
images under the attacker's control, in which case they could write the data
directly. A mismatch only costs a resend.
"""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass

import xxhash

ALGORITHM = "xxh3-128"
DIGEST_BYTES = 16
DEFAULT_REGION_BYTES = 1 << 20
MIN_REGION_BYTES = 64 << 10
MAX_REGION_BYTES = 64 << 20


def check_region_bytes(region_bytes: int) -> str:
    """'' when `region_bytes` is usable, else why not."""
    if region_bytes < MIN_REGION_BYTES or region_bytes > MAX_REGION_BYTES \
            or region_bytes & (region_bytes - 1):
        return (f"region_bytes {region_bytes} must be a power of two between "
                f"{MIN_REGION_BYTES} and {MAX_REGION_BYTES}")
    return ""


@functools.lru_cache(maxsize=8)
def zero_digest(length: int) -> bytes:
    """Digest of `length` zero bytes."""
    return xxhash.xxh3_128_digest(bytes(length))


@dataclass
class Region:
    offset: int
    length: int
    digest: bytes
    hole: bool  # all zeros, not read


def data_extents(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """[(begin, end)] of the data (non-hole) ranges of `fd` within [start, end).

    A file system without SEEK_DATA reports all of it as data."""
    out: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        try:
            d = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos
                break
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return [(start, end)]
            raise
        if d >= end:
            break
        h = os.lseek(fd, d, os.SEEK_HOLE)
        out.append((d, min(h, end)))
        pos = h
    return out


def has_data(fd: int, size: int) -> bool:
    """Does the image hold any non-hole byte? (Cheap: one SEEK_DATA.)"""
    return bool(data_extents(fd, 0, min(size, 1 << 62))[:1])


def digests(fd: int, size: int, offset: int, end: int, region_bytes: int,
            is_zero: bool = False) -> Iterator[Region]:
    """Digests of the regions starting in [offset, end) of an image of `size` bytes.

    `offset` must be a multiple of `region_bytes`. With `is_zero`, a region read
    whose bytes are all zero counts as a hole too (for the skip statistics)."""
    end = min(end, size)
    extents = data_extents(fd, offset, end)
    i = 0
    pos = offset
    while pos < end:
        rlen = min(region_bytes, size - pos)
        rend = pos + rlen
        while i < len(extents) and extents[i][1] <= pos:
            i += 1
        if i >= len(extents) or extents[i][0] >= rend:
            yield Region(pos, rlen, zero_digest(rlen), True)
        else:
            buf = os.pread(fd, rlen, pos)
            if len(buf) < rlen:
                buf += bytes(rlen - len(buf))
            d = xxhash.xxh3_128_digest(buf)
            yield Region(pos, rlen, d, is_zero and d == zero_digest(rlen))
        pos = rend
