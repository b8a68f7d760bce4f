"""check-config says no to every value that would fail at run time (issue 10): each
bad value is refused with a ConfigError naming the field and the value, and the
value just inside the bound is accepted. Plus text logs escape control characters."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest

from cdp_common import log as cdplog
from cdp_common.config import (
    MAX_DISK_BYTES,
    CoordinatorConfig,
    FilterConfig,
    ProxyConfig,
    TargetConfig,
    build_policy,
    load_config,
)
from cdp_common.errors import ConfigError

pytestmark = pytest.mark.timeout(30)

NODE = '[node]\nid = "n-1"\nlisten = "127.0.0.1:0"\n{coord}{node}\n[tls]\ninsecure = true\n'


def write(tmp_path: Path, node: str, body: str, coordinator: bool = True) -> Path:
    coord = 'coordinator = "127.0.0.1:7000"\n' if coordinator else ""
    path = tmp_path / "c.toml"
    path.write_text(NODE.format(coord=coord, node=node) + body)
    return path


def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "master.key"
    path.write_text("ab" * 32 + "\n")
    return path


def target_body(extra: str = "") -> str:
    return f'[target]\ndata_dir = "/tmp/t"\n{extra}\n'


def coordinator_body(extra: str = "") -> str:
    return f'[coordinator]\ndb_path = "/tmp/c.db"\n{extra}\n'


def filter_body(size: int) -> str:
    return ('[filter]\nmountpoint = "/tmp/m"\ndata_dir = "/tmp/f"\n'
            f'[[disks]]\nname = "disk0"\npolicy = "p"\nsize_bytes = {size}\n')


def refused(cls: type, path: Path, *needles: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(cls, path)
    for needle in needles:
        assert needle in str(info.value), str(info.value)


@pytest.mark.parametrize(("node", "field", "value"), [
    ("capacity = -1", "node.capacity", "-1"),
    ("capacity = 4294967296", "node.capacity", "4294967296"),
    ("max_message_bytes = 1099511627776", "node.max_message_bytes", "1099511627776"),
    ("max_message_bytes = 2147483648", "node.max_message_bytes", "2147483648"),
    ("max_concurrent_rpcs = 0", "node.max_concurrent_rpcs", "0"),
    ("max_streams_per_peer = -3", "node.max_streams_per_peer", "-3"),
    ("first_message_timeout_s = nan", "node.first_message_timeout_s", "nan"),
    ("first_message_timeout_s = 0.0", "node.first_message_timeout_s", "0.0"),
])
def test_node_bounds(tmp_path: Path, node: str, field: str, value: str) -> None:
    refused(TargetConfig, write(tmp_path, node, target_body()), field, value)


def test_node_bounds_just_inside(tmp_path: Path) -> None:
    config = load_config(TargetConfig, write(
        tmp_path, "capacity = 4294967295\nmax_message_bytes = 2147483647", target_body()))
    assert config.node.capacity == 2**32 - 1
    assert config.node.max_message_bytes == 2**31 - 1


@pytest.mark.parametrize(("extra", "field", "value"), [
    ("lease_ms = 4294967296\nheartbeat_ms = 1000", "coordinator.lease_ms", "4294967296"),
    ("heartbeat_ms = 4294967296\nlease_ms = 5000", "coordinator.heartbeat_ms", "4294967296"),
    ("heartbeat_ms = -5", "coordinator.heartbeat_ms", "-5"),
])
def test_coordinator_uint32_fields(tmp_path: Path, extra: str, field: str, value: str) -> None:
    refused(CoordinatorConfig, write(tmp_path, "", coordinator_body(extra), coordinator=False),
            field, value)


def test_coordinator_lease_at_the_uint32_limit_is_fine(tmp_path: Path) -> None:
    config = load_config(CoordinatorConfig, write(
        tmp_path, "", coordinator_body("lease_ms = 4294967295"), coordinator=False))
    assert config.coordinator.lease_ms == 2**32 - 1


@pytest.mark.parametrize(("extra", "field", "value"), [
    ("short_term_retention_s = -1.0", "target.short_term_retention_s", "-1.0"),
    ("long_term_retention_s = nan", "target.long_term_retention_s", "nan"),
    ("long_term_interval_s = inf", "target.long_term_interval_s", "inf"),
    ('restore_dir = "relative/dir"', "target.restore_dir", "relative/dir"),
    ("max_delta_bytes = 0", "target.max_delta_bytes", "0"),
    ("max_disk_bytes = -4096", "target.max_disk_bytes", "-4096"),
])
def test_target_bounds(tmp_path: Path, extra: str, field: str, value: str) -> None:
    refused(TargetConfig, write(tmp_path, "", target_body(extra)), field, value)


def test_target_defaults(tmp_path: Path) -> None:
    t = load_config(TargetConfig, write(tmp_path, "", target_body())).target
    assert t.max_disk_bytes == MAX_DISK_BYTES
    assert t.max_delta_bytes == 2 * 64 * 1024 * 1024  # 2 x the proxy's interval_max_bytes
    assert t.restore_dir == ""


def test_proxy_key_file_must_exist_and_be_well_formed(tmp_path: Path) -> None:
    missing = tmp_path / "nope.key"
    refused(ProxyConfig, write(tmp_path, "", f'[proxy]\nkey_file = "{missing}"\n'),
            "proxy.key_file", str(missing), "cannot read")
    short = tmp_path / "short.key"
    short.write_bytes(b"x" * 7)
    refused(ProxyConfig, write(tmp_path, "", f'[proxy]\nkey_file = "{short}"\n'),
            "proxy.key_file", "64 hex characters")
    good = key_file(tmp_path)
    config = load_config(ProxyConfig, write(tmp_path, "", f'[proxy]\nkey_file = "{good}"\n'))
    assert config.proxy.key_file == str(good)


def test_proxy_key_file_unreadable(tmp_path: Path) -> None:
    key = tmp_path / "a-directory"   # unreadable as a file, even for root
    key.mkdir()
    refused(ProxyConfig, write(tmp_path, "", f'[proxy]\nkey_file = "{key}"\n'),
            "proxy.key_file", "cannot read")


def test_proxy_budget_not_below_the_session_budget(tmp_path: Path) -> None:
    key = key_file(tmp_path)
    refused(ProxyConfig, write(tmp_path, "", f'[proxy]\nkey_file = "{key}"\n'
                                             "inflight_max_bytes = 1000\n"
                                             "proxy_inflight_max_bytes = 999\n"),
            "proxy.proxy_inflight_max_bytes", "999")


@pytest.mark.parametrize(("size", "needle"), [
    (4097, "multiple of 4096"),
    (0, "multiple of 4096"),
    (2**63 - 1, "larger than filter.max_disk_bytes"),
    (MAX_DISK_BYTES + 4096, "larger than filter.max_disk_bytes"),
])
def test_filter_disk_size(tmp_path: Path, size: int, needle: str) -> None:
    refused(FilterConfig, write(tmp_path, "", filter_body(size)), "disks[0].size_bytes",
            str(size), needle)


def test_filter_disk_at_the_maximum_is_fine(tmp_path: Path) -> None:
    config = load_config(FilterConfig, write(tmp_path, "", filter_body(MAX_DISK_BYTES)))
    assert config.disks[0].size_bytes == MAX_DISK_BYTES


def policy(size: int) -> dict[str, object]:
    return {"name": "p", "target": "target-1",
            "disks": [{"filter": "filter-1", "name": "disk0", "size_bytes": size}]}


def test_policy_disk_size_bound() -> None:
    with pytest.raises(ConfigError, match=r"disks\[0\].size_bytes: 9223372036854775807 bytes "
                                          r"is larger than max_disk_bytes"):
        build_policy(policy(2**63 - 1))
    with pytest.raises(ConfigError, match="multiple of 4096"):
        build_policy(policy(4096 * 3 + 1))
    with pytest.raises(ConfigError, match="larger than max_disk_bytes"):
        build_policy(policy(8192), max_disk_bytes=4096)
    assert build_policy(policy(MAX_DISK_BYTES)).disks[0].size_bytes == MAX_DISK_BYTES


def test_policy_numbers_must_be_finite() -> None:
    with pytest.raises(ConfigError, match="short_term_retention_s: expected a finite number"):
        build_policy({**policy(4096), "short_term_retention_s": float("nan")})
    with pytest.raises(ConfigError, match="rpo_interval_s: expected a finite number"):
        build_policy({**policy(4096), "rpo_interval_s": float("inf")})


def test_coordinator_max_disk_bytes_applies_to_config_policies(tmp_path: Path) -> None:
    body = coordinator_body("max_disk_bytes = 8192") + (
        '[[policies]]\nname = "p"\ntarget = "target-1"\n'
        '[[policies.disks]]\nfilter = "filter-1"\nname = "disk0"\nsize_bytes = 12288\n')
    refused(CoordinatorConfig, write(tmp_path, "", body, coordinator=False),
            "policies[0].disks[0].size_bytes", "12288")


def test_examples_keep_metrics_on_localhost() -> None:
    root = Path(__file__).resolve().parents[2] / "deploy" / "examples"
    found = 0
    for path in sorted(root.glob("*.toml")):
        for line in path.read_text().splitlines():
            if line.startswith("metrics_listen"):
                found += 1
                assert "127.0.0.1:" in line or "[::1]:" in line, f"{path}: {line}"
    assert found >= 4


def test_text_log_escapes_control_characters() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(cdplog.TextFormatter())
    logger = logging.getLogger("test.config_bounds")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("node %s registered", "evil\n2026-01-01 INFO forged",
                       extra={"node": "n\r\x1b[2Jx", "policy": "p"})
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("with a traceback", extra={"policy": "p\nq"})
    finally:
        logger.removeHandler(handler)
    lines = out.getvalue().splitlines()
    assert "node evil\\x0a2026-01-01 INFO forged registered" in lines[0]
    assert "node=n\\x0d\\x1b[2Jx" in lines[0] and "policy=p" in lines[0]
    assert lines[1].endswith("with a traceback [policy=p\\x0aq]")
    assert lines[2].startswith("Traceback")   # a traceback keeps its own lines
    assert cdplog.escape_control("plain text") == "plain text"
