"""cdp_common.memtune: MiB-sized buffers are recycled, not page-faulted in anew."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from cdp_common import memtune

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc mallopt only")

# Allocate and free a 1 MiB buffer 200 times; print the minor page faults taken.
_PROBE = """
import resource, sys
from cdp_common import memtune
if sys.argv[1] == "tune":
    memtune.tune_malloc({})
src = bytes(1 << 20)
for _ in range(5):
    bytes(bytearray(src))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):
    bytes(bytearray(src))
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                         check=True, env={"PATH": "/usr/bin:/bin"})
    return int(out.stdout)


def test_tuned_process_recycles_big_buffers() -> None:
    # 400 fresh MiB untuned = ~100k faults; tuned, the heap serves them again.
    untuned, tuned = _faults("plain"), _faults("tune")
    assert untuned > 50_000
    assert tuned < 1_000


def test_switches() -> None:
    assert memtune.tune_malloc({"CDP_MALLOC_TUNE": "0"}) == {"mmap_threshold": False,
                                                             "trim_threshold": False}
    # the operator's glibc variables win over ours
    done = memtune.tune_malloc({"MALLOC_MMAP_THRESHOLD_": "1", "MALLOC_TRIM_THRESHOLD_": "1"})
    assert done == {"mmap_threshold": False, "trim_threshold": False}
