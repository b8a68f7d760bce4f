"""The environment a benchmark figure was measured in (issue 14 item 3).

Absolute figures differ several-fold between machines of one kind, so every
figure is recorded with what produced it: the commit (and whether the tree
had uncommitted changes), the locked package versions (the sha256 of
requirements.lock and the versions of the packages on the data path), the
Python, the kernel, the CPU model and count, the memory, the C tools the
peers run, and the load average. The benchmark adds the raw-disk figure of
its own run.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# the packages on the data path whose version changes a figure
KEY_PACKAGES = ("grpcio", "protobuf", "pyfuse3", "zstandard", "cryptography", "uvloop")
TOOLS = {"zstd": ["zstd", "-V"], "openssl": ["openssl", "version"],
         "socat": ["socat", "-V"], "rsync": ["rsync", "--version"]}


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False,
                              timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _tool_version(cmd: list[str]) -> str:
    m = re.search(r"v?(\d+\.\d+(?:\.\d+)?[a-z]?)", _run(cmd).replace("\n", " "))
    return m.group(1) if m else "absent"


def locked_versions(lock: Path = ROOT / "requirements.lock") -> dict[str, str]:
    """`name==version` pins of the key packages, plus the lock file's sha256."""
    text = lock.read_text()
    out = {"requirements.lock sha256": hashlib.sha256(text.encode()).hexdigest()[:16]}
    for name in KEY_PACKAGES:
        m = re.search(rf"^{re.escape(name)}==(\S+)", text, re.MULTILINE)
        out[name] = m.group(1) if m else "not locked"
    return out


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def environment() -> dict[str, Any]:
    """What produced the figures of this run, as one flat dict."""
    head = _run(["git", "rev-parse", "--short=10", "HEAD"]).strip() or "unknown"
    dirty = bool(_run(["git", "status", "--porcelain", "--untracked-files=no"]).strip())
    mem_kib = next((int(line.split()[1]) for line in
                    Path("/proc/meminfo").read_text().splitlines()
                    if line.startswith("MemTotal:")), 0)
    env: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "commit": head + (" (uncommitted changes in the tree)" if dirty else ""),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cpu": f"{cpu_model()} x {os.cpu_count()}",
        "memory": f"{mem_kib / 2**20:.0f} GiB",
        **locked_versions(),
        "tools": ", ".join(f"{k} {_tool_version(v)}" for k, v in TOOLS.items()),
        "load average at start": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }
    return env


def markdown(env: dict[str, Any]) -> str:
    """The environment as a fenced block for docs/PERFORMANCE.md."""
    width = max(len(k) for k in env)
    return "\n".join(["```", *(f"{k:<{width}}  {v}" for k, v in env.items()), "```"])
