"""Process-wide malloc tuning for the daemons (glibc only; a no-op elsewhere).

Theory of operation: the data path allocates and frees buffers of 0.1-2 MiB
many times per second (record batches, frames, compressed and decrypted
payloads, protobuf messages). glibc serves every allocation above
M_MMAP_THRESHOLD (128 KiB at start, raised dynamically only up to the size
of the largest freed mmap chunk) with a fresh mmap and returns it with munmap
on free, so every such buffer page-faults all its pages in again (~0.3 ms
per MiB on this project's VMs: more than zstd level 1 costs for the same
bytes). Likewise, freed memory at the top of the heap above M_TRIM_THRESHOLD
is returned to the kernel and faulted in again by the next allocation.

`tune_malloc` sets a fixed mmap threshold of 32 MiB (glibc's maximum on
64-bit) and a trim threshold of 64 MiB, so these buffers are recycled from
the heap instead. Measured with bench/bench_e2e.py (docs/PERFORMANCE.md):
CPU per MB replicated for the five processes fell by about a third. The cost
is bounded: at most TRIM_THRESHOLD_BYTES of freed heap stays mapped per
process beyond what its caps already allow (design invariant I4 still holds:
every buffer is bounded by its own cap, this only keeps a constant reserve).

Operators can override either value with glibc's own environment variables
(MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_), which then win; CDP_MALLOC_TUNE=0
disables the tuning.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Mapping

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 64 * 1024 * 1024


def tune_malloc(environ: Mapping[str, str] | None = None) -> dict[str, bool]:
    """Apply the thresholds above; returns which ones were set (for the log)."""
    env = os.environ if environ is None else environ
    done = {"mmap_threshold": False, "trim_threshold": False}
    if env.get("CDP_MALLOC_TUNE", "1") == "0":
        return done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return done
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if "MALLOC_MMAP_THRESHOLD_" not in env:
        done["mmap_threshold"] = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    if "MALLOC_TRIM_THRESHOLD_" not in env:
        done["trim_threshold"] = bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    return done
