"""The one exit-code table: docs/OPERATIONS.md §11 shows exactly cdp_common.errors.EXIT_CODES,
and every daemon exits with the documented code for usage errors, invalid configs, corrupt
state and failed storage (a real process each; no traceback). cdpctl's codes are tested in
test_cdpctl_cli.py and the lab tests."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from cdp_common.errors import EXIT_CODES, FormatError, StorageError

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[2]
DAEMONS = ["cdp_filter", "cdp_proxy", "cdp_target", "cdp_coordinator"]


def run(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def daemon_config(path: Path, node_id: str, sections: str, coordinator: str = "") -> Path:
    """Write a daemon's TOML config: its [node] on a free loopback port (and its
    coordinator, if any), then `sections` (the daemon's own), then insecure TLS."""
    coord = f'coordinator = "{coordinator}"\n' if coordinator else ""
    path.write_text(f'[node]\nid = "{node_id}"\nlisten = "127.0.0.1:0"\n{coord}'
                    f'{sections.strip()}\n[tls]\ninsecure = true\n')
    return path


def test_operations_md_shows_the_table() -> None:
    text = (ROOT / "docs" / "OPERATIONS.md").read_text()
    section = text[text.index("## 11. Exit codes"):text.index("## 12.")]
    rows = re.findall(r"^\| (\d+) \| ([^|]+) \| ([^|]+) \|$", section, re.M)
    assert [(int(c), n.strip(), m.strip()) for c, n, m in rows] == list(EXIT_CODES)


@pytest.mark.parametrize("module", DAEMONS)
def test_daemon_usage_and_config_codes(module: str, tmp_path: Path) -> None:
    helped = run(module, "--help")
    assert helped.returncode == 0 and "64  usage error" in helped.stdout
    assert run(module, "frobnicate").returncode == 64
    assert run(module, "run").returncode == 64           # --config is required
    missing = run(module, "check-config", "--config", str(tmp_path / "none.toml"))
    assert missing.returncode == 2 and "none.toml" in missing.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[node\n")
    assert run(module, "run", "--config", str(bad)).returncode == 2


def test_filter_storage_failure_exits_9(tmp_path: Path) -> None:
    config = daemon_config(tmp_path / "filter.toml", "filter-1", f"""
[filter]
mountpoint = "{tmp_path / 'mnt'}"
data_dir = "{tmp_path / 'data'}"
[[disks]]
name = "d0"
policy = "p"
size_bytes = 1048576
image = "/proc/cdp-no-such-dir/d0.img"
""", coordinator="127.0.0.1:1")
    done = run("cdp_filter", "run", "--config", str(config))
    assert done.returncode == StorageError.exit_code == 9, done.stderr
    assert "/proc/cdp-no-such-dir/d0.img" in done.stderr


def test_coordinator_corrupt_store_exits_4(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    db.write_bytes(b"this is not a database" * 200)
    config = daemon_config(tmp_path / "coordinator.toml", "coordinator", f"""
[coordinator]
db_path = "{db}"
""")
    before = db.read_bytes()
    done = run("cdp_coordinator", "run", "--config", str(config))
    assert done.returncode == FormatError.exit_code == 4, done.stderr
    assert str(db) in done.stderr and "corrupt" in done.stderr
    assert db.read_bytes() == before                     # nothing changed
