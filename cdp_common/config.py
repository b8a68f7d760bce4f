"""Typed daemon configuration loaded from TOML.

Every daemon's config is a frozen dataclass tree; `load_config(cls, path)`
checks types and unknown keys and raises ConfigError naming the offending
field (`policies[0].rpo_interval_s: expected a number, got 'fast'`). Each
field's docstring lives in its `metadata["doc"]`, which `cdpctl` and the docs
render.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cdp_common.errors import ConfigError
from cdp_common.names import is_name
from cdp_common.revocation import load_revoked

T = TypeVar("T")

MiB = 1024 * 1024
GiB = 1024 * MiB
TiB = 1024 * GiB

UINT32_MAX = 2**32 - 1
"""Fields sent as uint32 in the protocol (capacity, heartbeat_ms, lease_ms) must fit."""
MESSAGE_LIMIT = 2**31
"""gRPC message limits are C ints: a limit must stay below 2^31."""
MAX_DISK_BYTES = 64 * TiB
"""Default largest disk a policy may have (`max_disk_bytes`)."""
DEFAULT_INTERVAL_MAX_BYTES = 64 * MiB
"""The source proxy's default interval_max_bytes; the target's default delta cap is twice it."""
VERIFY_MIN_INTERVAL_S = 60.0
"""Default smallest nonzero `verify_every_s` (a verification restores a whole point)."""


def doc(text: str, default: Any = dataclasses.MISSING, str_list: bool = False,
        **kw: Any) -> Any:
    """A dataclass field carrying its documentation. `str_list`: a string field that
    also accepts a list of strings, stored joined with commas."""
    meta = {"doc": text, "str_list": True} if str_list else {"doc": text}
    if default is dataclasses.MISSING and "default_factory" not in kw:
        return field(metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def coordinator_addresses(value: str) -> list[str]:
    """The coordinator addresses of a `node.coordinator` value: comma-separated,
    blanks ignored, in order, without repeats."""
    out: list[str] = []
    for part in value.split(","):
        part = part.strip()
        if part and part not in out:
            out.append(part)
    return out


# ---------------------------------------------------------------- shared sections

@dataclass(frozen=True)
class TlsConfig:
    insecure: bool = doc("Plaintext gRPC instead of mutual TLS. Only for tests and labs.", False)
    ca_file: str = doc("PEM file of the CA that signs every node certificate.", "")
    cert_file: str = doc("PEM certificate of this node.", "")
    key_file: str = doc("PEM private key of this node.", "")
    revoked_file: str = doc("Revoked certificate serials, one hex serial per line ('#' "
                            "comments; `cdpctl pki revoke` appends): their calls are refused. "
                            "Re-read on SIGHUP.", "")
    assignment_key_file: str = doc("The coordinator's Ed25519 public key (PEM): assignments "
                                   "and sessions are accepted only when signed by it. "
                                   "Required on filters, proxies and targets unless "
                                   "tls.insecure = true; unused by the coordinator.", "")


@dataclass(frozen=True)
class LogConfig:
    level: str = doc("Lowest level logged: 'debug', 'info', 'warning' or 'error'; '' = the "
                     "--log-level option. Re-read on SIGHUP.", "")


@dataclass(frozen=True)
class NodeConfig:
    id: str = doc("Unique node id, e.g. 'filter-1'.")
    site: str = doc("Site name; proxies are chosen on the policy's source/target site.", "default")
    listen: str = doc("host:port the gRPC server binds.", "127.0.0.1:0")
    advertise: str = doc("host:port peers use to reach this node (default: listen).", "")
    coordinator: str = doc("host:port of the coordinator; with standby coordinators, "
                           "all of them: a comma-separated string or a list of "
                           "host:port (the node follows the leader).", "", str_list=True)
    metrics_listen: str = doc("host:port of the Prometheus /metrics HTTP server ('' = off).", "")
    max_message_bytes: int = doc("Largest gRPC message accepted or sent (64 KiB .. 2 GiB - 1).",
                                 8 * MiB)
    capacity: int = doc("Most policies this node serves at once (0 = unlimited).", 0)
    capacity_bytes_per_s: int = doc("Proxies: payload bytes per second this node may carry; "
                                    "while it reports this much or more, the coordinator "
                                    "gives it no new policy (0 = unlimited).", 0)
    max_concurrent_rpcs: int = doc("Most RPCs the gRPC server runs at once; more are refused "
                                   "with RESOURCE_EXHAUSTED.", 4096)
    max_streams_per_peer: int = doc("Most RPCs one peer (one certificate identity, or one "
                                    "address without TLS) may have open at once.", 512)
    first_message_timeout_s: float = doc("Seconds a stream may take to send its first "
                                         "message before it is closed (DEADLINE_EXCEEDED).", 10.0)


# ---------------------------------------------------------------- filter

@dataclass(frozen=True)
class DiskConfig:
    name: str = doc("Disk name; the file <mountpoint>/<name> is the protected disk.")
    policy: str = doc("Policy (consistency group) the disk belongs to.")
    size_bytes: int = doc("Disk size in bytes (multiple of 4096, at most "
                          "filter.max_disk_bytes).")
    image: str = doc("Backing image path (default <data_dir>/images/<name>.img).", "")


@dataclass(frozen=True)
class FilterSection:
    mountpoint: str = doc("Directory where the FUSE file system exposing the disks is mounted.")
    data_dir: str = doc("Directory for backing images and write journals.")
    journal_cap_bytes: int = doc("Journal size at which writers are slowed down.", 1 * GiB)
    journal_segment_bytes: int = doc("Size of one journal segment file.", 64 * MiB)
    batch_bytes: int = doc("Target size of one shipped record batch.", 1 * MiB)
    fsync_journal: bool = doc("fsync the journal when the application flushes.", True)
    dirty_tracking: bool = doc("When the journal reaches journal_cap_bytes or its volume is "
                               "full, track dirty blocks and resync them later (a gap) "
                               "instead of holding writers back.", True)
    dirty_block_bytes: int = doc("Block size of the dirty-block bitmap (multiple of 4096).",
                                 64 * 1024)
    power_loss_protection: bool = doc(
        "Before the first write to a region since its writes were last made durable, "
        "fsync a write-intent bit for it; after a host crash or power loss the regions "
        "marked are resynced from the images, so the replica cannot silently lack a "
        "write that reached an image but not the journal. Needs dirty_tracking.", True)
    intent_region_bytes: int = doc("Region size of the write-intent bitmap (multiple of "
                                   "4096): larger regions mean fewer fsyncs on first "
                                   "writes and more to resync after a power loss.",
                                   4 * MiB)
    max_disk_bytes: int = doc("Largest disk size accepted in [[disks]].", MAX_DISK_BYTES)


@dataclass(frozen=True)
class FilterConfig:
    node: NodeConfig
    filter: FilterSection
    disks: list[DiskConfig] = doc("Protected disks.", default_factory=list)
    tls: TlsConfig = doc("TLS settings.", default_factory=TlsConfig)
    log: LogConfig = doc("Logging settings.", default_factory=LogConfig)


# ---------------------------------------------------------------- proxy

@dataclass(frozen=True)
class ProxySection:
    role: str = doc("'source', 'target' or 'both'.", "source")
    key_file: str = doc("Master key ring for payload encryption: '<key id> <hex>' lines, "
                        "newest first, or one 64-hex-character key (docs/FORMAT.md, Key ring).",
                        "")
    interval_max_bytes: int = doc("Close an interval early when its records reach this size.",
                                  DEFAULT_INTERVAL_MAX_BYTES)
    inflight_max_bytes: int = doc("Encoded bytes in flight to the target before the source "
                                  "proxy stops reading from the filter (per session).",
                                  256 * MiB)
    proxy_inflight_max_bytes: int = doc("Encoded bytes in flight across all sessions of the "
                                        "source proxy: one budget for the whole proxy.",
                                        1 * GiB)
    frame_bytes: int = doc("Plaintext size of one delta frame.", 1 * MiB)


@dataclass(frozen=True)
class ProxyConfig:
    node: NodeConfig
    proxy: ProxySection = doc("Proxy settings.", default_factory=ProxySection)
    tls: TlsConfig = doc("TLS settings.", default_factory=TlsConfig)
    log: LogConfig = doc("Logging settings.", default_factory=LogConfig)


# ---------------------------------------------------------------- target

@dataclass(frozen=True)
class TargetSection:
    data_dir: str = doc("Directory holding replicas, deltas and restore points.")
    short_term_retention_s: float = doc("Overrides every policy's short-term retention "
                                        "(0 = the policy's; for tests and labs).", 0.0)
    long_term_interval_s: float = doc("Overrides every policy's long-term interval "
                                      "(0 = the policy's).", 0.0)
    long_term_retention_s: float = doc("Overrides every policy's long-term retention "
                                       "(0 = the policy's).", 0.0)
    restore_dir: str = doc("The only directory restores write images under (a restore's "
                           "out_dir must be inside it; '' = <data_dir>/_restores).", "")
    max_disk_bytes: int = doc("Largest disk an Apply stream may announce.", MAX_DISK_BYTES)
    max_delta_bytes: int = doc("Largest delta (chunk payload bytes) accepted; a stream that "
                               "sends more is ended and its partial delta discarded.",
                               2 * DEFAULT_INTERVAL_MAX_BYTES)
    verify_dir: str = doc("Scratch directory of scheduled verifications (`verify_every_s`): "
                          "the newest point is restored under it, checked and deleted; "
                          "inside restore_dir ('' = <restore_dir>/.verify).", "")


@dataclass(frozen=True)
class TargetConfig:
    node: NodeConfig
    target: TargetSection
    tls: TlsConfig = doc("TLS settings.", default_factory=TlsConfig)
    log: LogConfig = doc("Logging settings.", default_factory=LogConfig)


# ---------------------------------------------------------------- coordinator

@dataclass(frozen=True)
class PolicyDiskConfig:
    filter: str = doc("Id of the filter node that holds the disk.")
    name: str = doc("Disk name on that filter.")
    size_bytes: int = doc("Disk size in bytes.")


@dataclass(frozen=True)
class PolicyConfig:
    name: str = doc("Policy name (letters, digits, '-', '_', '.').")
    disks: list[PolicyDiskConfig] = doc("Disks of the policy; they share one seq counter.")
    target: str = doc("Id of the target node that keeps the replicas.")
    source_site: str = doc("Site of the source proxies.", "default")
    target_site: str = doc("Site of the target proxies.", "default")
    rpo_interval_s: float = doc("Seconds between restore points.", 2.0)
    compression_level: int = doc("zstd level (0 = no compression).", 1)
    encryption: bool = doc("Encrypt payload between proxies (AES-256-GCM).", True)
    rpo_warning_s: float = doc("RPO lag that raises a warning.", 15.0)
    rpo_error_s: float = doc("RPO lag that raises an error.", 60.0)
    bandwidth_limit_mbps: float = doc("Mbit/s the source proxy may send for this policy "
                                      "(0 = unlimited).", 0.0)
    pinned_source_proxy: str = doc("Id of the source proxy to use while it is healthy "
                                   "('' = least loaded).", "")
    pinned_target_proxy: str = doc("Id of the target proxy to use while it is healthy "
                                   "('' = least loaded).", "")
    enabled: bool = doc("A disabled policy gets no proxies; its filter keeps journaling.", True)
    short_term_retention_s: float = doc("Seconds a short-term restore point (one per RPO "
                                        "interval) is kept.", 14400.0)
    long_term_interval_s: float = doc("Seconds between long-term restore points.", 28800.0)
    long_term_retention_s: float = doc("Seconds a long-term restore point is kept.", 604800.0)
    frozen: bool = doc("Writes to the policy's disks are refused (EROFS) while set: "
                       "`cdpctl failover POLICY --planned` sets it so the journal drains "
                       "to a last restore point, `cdpctl failover undo` clears it.", False)
    verify_every_s: float = doc("Seconds between scheduled verifications of the newest "
                                "restore point by the target (restored to scratch space, "
                                "`e2fsck -fn` after a journal replay, recorded as "
                                "`cdpctl verify` records; a failure makes the policy "
                                "degraded). 0 = none; else at least 60 (the coordinator's "
                                "`verify_min_interval_s`).", 0.0)


@dataclass(frozen=True)
class CoordinatorSection:
    db_path: str = doc("SQLite database file of the coordinator's state (required when "
                       "`store = \"sqlite\"`).", "")
    heartbeat_ms: int = doc("Heartbeat period asked of every node.", 1000)
    lease_ms: int = doc("A node is down when no heartbeat arrived for this long.", 3000)
    max_disk_bytes: int = doc("Largest disk size a policy may have.", MAX_DISK_BYTES)
    rebalance_max_per_minute: int = doc("Most policy slots moved per minute from the most "
                                        "to the least loaded proxy of a site when they "
                                        "differ by two or more, e.g. after a proxy joins "
                                        "(a handover: the stream resumes on the new proxy); "
                                        "0 = never move a policy off a healthy proxy.", 2)
    clock_skew_alarm_ms: int = doc("A node whose clock differs from the coordinator's by "
                                   "more than this is alarmed (its policies turn warning); "
                                   "the RPO lag is corrected for the offset either way.", 500)
    signing_key_file: str = doc("Ed25519 private key (PEM) the coordinator signs assignments "
                                "with (`cdpctl pki signing-key`); required unless "
                                "tls.insecure = true.", "")
    store: str = doc("Where the coordinator's state lives: `\"sqlite\"` (the file `db_path`) "
                     "or `\"etcd\"` (`etcd_endpoints`, under `etcd_prefix`; "
                     "docs/FORMAT.md).", "sqlite")
    etcd_endpoints: list[str] = doc("etcd client endpoints (host:port), tried in order; "
                                    "required when `store = \"etcd\"`. Plain gRPC for now: "
                                    "loopback endpoints only unless tls.insecure = true.",
                                    default_factory=list)
    etcd_prefix: str = doc("Key prefix of this coordinator's state in etcd; starts and ends "
                           "with `/`.", "/cdp/")
    etcd_timeout_ms: int = doc("Deadline of one etcd request.", 5000)
    etcd_max_txn_ops: int = doc("Operations per etcd transaction; the same as the etcd "
                                "members' `--max-txn-ops`.", 128)
    election_ttl_s: int = doc("`store = \"etcd\"`: TTL of the leader election lease. "
                              "Coordinators sharing one etcd prefix elect one leader; the "
                              "others stand by (read-only status) and one of them leads "
                              "within about this long after the leader dies (etcd may "
                              "round it up to its minimum lease TTL). Long enough to ride out an "
                              "etcd member lost (a raft election): 4 s, for a takeover "
                              "within 5 s.", 4)
    takeover_grace_ms: int = doc("`store = \"etcd\"`: after a standby takes over, the "
                                 "nodes are kept in service this long (at least `lease_ms`) "
                                 "while they find the new leader, so a takeover rebinds "
                                 "nothing.", 6000)
    verify_min_interval_s: float = doc("Smallest nonzero `verify_every_s` a policy may "
                                       "have (lower it only for tests and labs).",
                                       VERIFY_MIN_INTERVAL_S)


STORES = ("sqlite", "etcd")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


@dataclass(frozen=True)
class CoordinatorConfig:
    node: NodeConfig
    coordinator: CoordinatorSection
    policies: list[PolicyConfig] = doc("CDP policies.", default_factory=list)
    tls: TlsConfig = doc("TLS settings.", default_factory=TlsConfig)
    log: LogConfig = doc("Logging settings.", default_factory=LogConfig)


# ---------------------------------------------------------------- loader



def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return _build(tp, value, where)  # type: ignore[arg-type]
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{where}: unsupported type")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def _build(cls: type[T], data: dict[str, Any], where: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"{prefix}{unknown[0]}: unknown setting")
    kwargs = {}
    for name, f in fields.items():
        path = f"{where}.{name}" if where else name
        if name in data:
            value = data[name]
            if f.metadata.get("str_list") and isinstance(value, list):
                items = _convert(list[str], value, path)
                if any("," in v for v in items):
                    raise ConfigError(f"{path}: an item of the list contains ','")
                value = ",".join(items)
            kwargs[name] = _convert(hints[name], value, path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if dataclasses.is_dataclass(hints[name]):
                kwargs[name] = _convert(hints[name], {}, path)
            else:
                raise ConfigError(f"{path}: required setting is missing")
    return cls(**kwargs)


def _positive(value: float, where: str) -> None:
    if value <= 0:
        raise ConfigError(f"{where}: must be greater than 0, got {value}")


def _between(value: float, lo: float, hi: float, where: str) -> None:
    if not lo <= value <= hi:
        raise ConfigError(f"{where}: must be between {lo} and {hi}, got {value}")


def _disk_size(value: int, limit: int, where: str, limit_name: str) -> None:
    """A disk size: a positive multiple of 4096, at most `limit`."""
    if value > limit:
        raise ConfigError(f"{where}: {value} bytes is larger than {limit_name} ({limit})")
    if value <= 0 or value % 4096:
        raise ConfigError(f"{where}: must be a positive multiple of 4096, got {value}")


def _address(value: str, where: str, allow_empty: bool = False) -> None:
    if allow_empty and not value:
        return
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{where}: expected host:port, got {value!r}")


def _readable(path: str, where: str) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path} ({exc.strerror or exc})") from None


def _validate_node(config: Any, node: NodeConfig) -> None:
    if not is_name(node.id):
        raise ConfigError(f"node.id: {node.id!r} is not a valid id")
    _address(node.listen, "node.listen")
    _address(node.advertise, "node.advertise", allow_empty=True)
    _address(node.metrics_listen, "node.metrics_listen", allow_empty=True)
    if not isinstance(config, CoordinatorConfig):
        addresses = coordinator_addresses(node.coordinator)
        if not addresses:
            _address(node.coordinator, "node.coordinator")
        for i, a in enumerate(addresses):
            _address(a, f"node.coordinator[{i}]" if len(addresses) > 1 else "node.coordinator")
    _between(node.max_message_bytes, 64 * 1024, MESSAGE_LIMIT - 1, "node.max_message_bytes")
    _between(node.capacity, 0, UINT32_MAX, "node.capacity")
    _between(node.capacity_bytes_per_s, 0, 2**63 - 1, "node.capacity_bytes_per_s")
    _between(node.max_concurrent_rpcs, 1, MESSAGE_LIMIT - 1, "node.max_concurrent_rpcs")
    _between(node.max_streams_per_peer, 1, MESSAGE_LIMIT - 1, "node.max_streams_per_peer")
    _between(node.first_message_timeout_s, 0.1, 3600.0, "node.first_message_timeout_s")


def validate(config: Any) -> None:
    """Semantic checks beyond types; raises ConfigError naming the field.

    Everything a daemon would trip over at run time is refused here, so
    `check-config` saying ok means the values work: ranges, uint32 and
    message-size limits, finite numbers (the loader refuses NaN and inf),
    readable certificate and key files, a well-formed master key."""
    node = getattr(config, "node", None)
    if isinstance(node, NodeConfig):
        _validate_node(config, node)
    log_cfg = getattr(config, "log", None)
    if isinstance(log_cfg, LogConfig) and log_cfg.level not in ("", "debug", "info", "warning",
                                                                "error"):
        raise ConfigError(f"log.level: expected 'debug', 'info', 'warning' or 'error', "
                          f"got {log_cfg.level!r}")
    tls = getattr(config, "tls", None)
    if isinstance(tls, TlsConfig) and not tls.insecure:
        for name in ("ca_file", "cert_file", "key_file"):
            if not getattr(tls, name):
                raise ConfigError(f"tls.{name}: required unless tls.insecure = true")
            if not Path(getattr(tls, name)).is_file():
                raise ConfigError(f"tls.{name}: {getattr(tls, name)} does not exist")
            _readable(getattr(tls, name), f"tls.{name}")
        load_revoked(tls.revoked_file)
    if isinstance(tls, TlsConfig) and not isinstance(config, CoordinatorConfig) \
            and (tls.assignment_key_file or not tls.insecure):
        from cdp_common.assignsig import load_optional_verifier  # cryptography: only here
        load_optional_verifier(tls.assignment_key_file, tls.insecure)
    if isinstance(config, FilterConfig):
        _validate_filter(config)
    elif isinstance(config, ProxyConfig):
        _validate_proxy(config)
    elif isinstance(config, TargetConfig):
        _validate_target(config)
    elif isinstance(config, CoordinatorConfig):
        _validate_coordinator(config)


def _validate_proxy(config: ProxyConfig) -> None:
    p = config.proxy
    if p.role not in ("source", "target", "both"):
        raise ConfigError(f"proxy.role: expected 'source', 'target' or 'both', got {p.role!r}")
    if p.role != "source" and not p.key_file:
        raise ConfigError("proxy.key_file: required for a target proxy")
    if p.role != "target" and not p.key_file:
        raise ConfigError("proxy.key_file: required for a source proxy")
    try:
        from cdp_common.crypto import load_master_key  # zstandard, cryptography: only here
        load_master_key(p.key_file)
    except ConfigError as exc:
        raise ConfigError(f"proxy.{exc}") from None
    for name in ("interval_max_bytes", "inflight_max_bytes", "proxy_inflight_max_bytes",
                 "frame_bytes"):
        _between(getattr(p, name), 1, 2**62, f"proxy.{name}")
    if p.frame_bytes > config.node.max_message_bytes // 2:
        raise ConfigError("proxy.frame_bytes: must be at most half of node.max_message_bytes")
    if p.proxy_inflight_max_bytes < p.inflight_max_bytes:
        raise ConfigError(f"proxy.proxy_inflight_max_bytes: must be at least "
                          f"proxy.inflight_max_bytes ({p.inflight_max_bytes}), "
                          f"got {p.proxy_inflight_max_bytes}")


def _validate_target(config: TargetConfig) -> None:
    t = config.target
    if not t.data_dir:
        raise ConfigError("target.data_dir: required")
    for name in ("short_term_retention_s", "long_term_interval_s", "long_term_retention_s"):
        value = getattr(t, name)
        if value < 0:
            raise ConfigError(f"target.{name}: must be 0 (the policy's) or more, got {value}")
    if t.restore_dir and not Path(t.restore_dir).is_absolute():
        raise ConfigError(f"target.restore_dir: must be an absolute path, got {t.restore_dir!r}")
    _between(t.max_disk_bytes, 4096, 2**62, "target.max_disk_bytes")
    _between(t.max_delta_bytes, 1 * MiB, 2**62, "target.max_delta_bytes")
    if t.verify_dir and not inside_dir(t.verify_dir, str(restore_dir_of(t))):
        raise ConfigError(f"target.verify_dir: must be an absolute path inside restore_dir "
                          f"({restore_dir_of(t)}), got {t.verify_dir!r}")


def restore_dir_of(t: TargetSection) -> Path:
    """The directory restores write under: `restore_dir`, else <data_dir>/_restores."""
    return Path(t.restore_dir) if t.restore_dir else Path(t.data_dir) / "_restores"


def verify_dir_of(t: TargetSection) -> Path:
    """Scratch space of scheduled verifications: `verify_dir`, else <restore_dir>/.verify."""
    return Path(t.verify_dir) if t.verify_dir else restore_dir_of(t) / ".verify"


def inside_dir(path: str, root: str) -> bool:
    """`path` is absolute and, lexically normalized, strictly below `root`."""
    if not os.path.isabs(path):
        return False
    p, r = os.path.normpath(path), os.path.normpath(root)
    return p.startswith(r.rstrip(os.sep) + os.sep)


def _validate_filter(config: FilterConfig) -> None:
    f = config.filter
    _positive(f.journal_cap_bytes, "filter.journal_cap_bytes")
    _positive(f.journal_segment_bytes, "filter.journal_segment_bytes")
    _positive(f.batch_bytes, "filter.batch_bytes")
    if f.journal_segment_bytes > f.journal_cap_bytes:
        raise ConfigError("filter.journal_segment_bytes: must not exceed filter.journal_cap_bytes")
    if f.dirty_block_bytes <= 0 or f.dirty_block_bytes % 4096:
        raise ConfigError(f"filter.dirty_block_bytes: must be a positive multiple of 4096, "
                          f"got {f.dirty_block_bytes}")
    if f.intent_region_bytes <= 0 or f.intent_region_bytes % 4096:
        raise ConfigError(f"filter.intent_region_bytes: must be a positive multiple of 4096, "
                          f"got {f.intent_region_bytes}")
    if f.power_loss_protection and not f.dirty_tracking:
        raise ConfigError("filter.power_loss_protection: needs filter.dirty_tracking (the "
                          "regions written before a power loss are resynced by it); set "
                          "power_loss_protection = false too to run without either")
    if f.batch_bytes > config.node.max_message_bytes // 2:
        raise ConfigError("filter.batch_bytes: must be at most half of node.max_message_bytes")
    _between(f.max_disk_bytes, 4096, 2**62, "filter.max_disk_bytes")
    seen: set[str] = set()
    for i, disk in enumerate(config.disks):
        where = f"disks[{i}]"
        if not is_name(disk.name):
            raise ConfigError(f"{where}.name: {disk.name!r} is not a valid disk name")
        if disk.name in seen:
            raise ConfigError(f"{where}.name: disk {disk.name!r} is listed twice")
        seen.add(disk.name)
        if not is_name(disk.policy):
            raise ConfigError(f"{where}.policy: {disk.policy!r} is not a valid policy name")
        _disk_size(disk.size_bytes, f.max_disk_bytes, f"{where}.size_bytes",
                   "filter.max_disk_bytes")


def _validate_coordinator(config: CoordinatorConfig) -> None:
    c = config.coordinator
    _validate_store(config)
    _between(c.heartbeat_ms, 1, UINT32_MAX, "coordinator.heartbeat_ms")
    _between(c.rebalance_max_per_minute, 0, 10_000, "coordinator.rebalance_max_per_minute")
    _between(c.lease_ms, 1, UINT32_MAX, "coordinator.lease_ms")
    if c.lease_ms <= c.heartbeat_ms:
        raise ConfigError("coordinator.lease_ms: must be longer than coordinator.heartbeat_ms")
    _between(c.max_disk_bytes, 4096, 2**62, "coordinator.max_disk_bytes")
    _finite_positive(c.verify_min_interval_s, "coordinator.verify_min_interval_s")
    if c.signing_key_file or not config.tls.insecure:
        if not c.signing_key_file:
            raise ConfigError("coordinator.signing_key_file: required unless tls.insecure = true"
                              " (create one with `cdpctl pki signing-key`)")
        from cdp_common.assignsig import load_signer
        load_signer(c.signing_key_file)
    names: set[str] = set()
    for i, p in enumerate(config.policies):
        where = f"policies[{i}]"
        validate_policy(p, where, max_disk_bytes=c.max_disk_bytes,
                        verify_min_interval_s=c.verify_min_interval_s)
        if p.name in names:
            raise ConfigError(f"{where}.name: policy {p.name!r} is defined twice")
        names.add(p.name)


def _validate_store(config: CoordinatorConfig) -> None:
    c = config.coordinator
    if c.store not in STORES:
        raise ConfigError(f"coordinator.store: must be one of {', '.join(map(repr, STORES))}, "
                          f"got {c.store!r}")
    if c.store == "sqlite":
        if not c.db_path:
            raise ConfigError("coordinator.db_path: required (coordinator.store = \"sqlite\")")
        return
    if not c.etcd_endpoints:
        raise ConfigError("coordinator.etcd_endpoints: required (coordinator.store = \"etcd\")")
    for i, ep in enumerate(c.etcd_endpoints):
        _address(ep, f"coordinator.etcd_endpoints[{i}]")
        if not config.tls.insecure and ep.rpartition(":")[0] not in LOOPBACK_HOSTS:
            raise ConfigError(f"coordinator.etcd_endpoints[{i}]: {ep} is not a loopback "
                              "address; the etcd client has no TLS yet, so a remote etcd "
                              "needs tls.insecure = true")
    if len(c.etcd_prefix) < 2 or not (c.etcd_prefix.startswith("/")
                                      and c.etcd_prefix.endswith("/")):
        raise ConfigError(f"coordinator.etcd_prefix: must start and end with '/' and name "
                          f"something, got {c.etcd_prefix!r}")
    _between(c.etcd_timeout_ms, 1, UINT32_MAX, "coordinator.etcd_timeout_ms")
    _between(c.etcd_max_txn_ops, 4, UINT32_MAX, "coordinator.etcd_max_txn_ops")
    _between(c.election_ttl_s, 1, 3600, "coordinator.election_ttl_s")
    _between(c.takeover_grace_ms, 0, UINT32_MAX, "coordinator.takeover_grace_ms")


def _finite_positive(value: float, where: str) -> None:
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{where}: must be a number greater than 0, got {value}")


def validate_policy(p: PolicyConfig, where: str = "", *,
                    max_disk_bytes: int = MAX_DISK_BYTES,
                    verify_min_interval_s: float = VERIFY_MIN_INTERVAL_S) -> None:
    """Semantic checks of one policy, shared by the config loader and the policy RPCs.

    Raises ConfigError naming the field (`where` prefixes it, e.g. "policies[0]")."""
    pre = f"{where}." if where else ""
    if not is_name(p.name):
        raise ConfigError(f"{pre}name: {p.name!r} is not a valid policy name")
    if not p.disks:
        raise ConfigError(f"{pre}disks: a policy needs at least one disk")
    seen: set[str] = set()
    for j, d in enumerate(p.disks):
        if not is_name(d.filter):
            raise ConfigError(f"{pre}disks[{j}].filter: {d.filter!r} is not a valid node id")
        if not is_name(d.name):
            raise ConfigError(f"{pre}disks[{j}].name: {d.name!r} is not a valid disk name")
        if d.name in seen:
            raise ConfigError(f"{pre}disks[{j}].name: disk {d.name!r} is listed twice")
        seen.add(d.name)
        _disk_size(d.size_bytes, max_disk_bytes, f"{pre}disks[{j}].size_bytes",
                   "max_disk_bytes")
    if ".." in p.name:
        raise ConfigError(f"{pre}name: {p.name!r} contains '..', which names the members of "
                          "a consistency group")
    filters = sorted({d.filter for d in p.disks})
    for f in filters if len(filters) > 1 else ():
        # A policy on several filters is a consistency group of one member policy
        # per filter, named <policy>..<filter> (cdp_common.groups).
        if not is_name(f"{p.name}..{f}"):
            raise ConfigError(f"{pre}name: member policy name {p.name}..{f} (policy name + "
                              "'..' + filter id) is longer than 64 characters: shorten the "
                              "policy name")
    if not is_name(p.target):
        raise ConfigError(f"{pre}target: {p.target!r} is not a valid node id")
    for name in ("source_site", "target_site"):
        if not is_name(getattr(p, name)):
            raise ConfigError(f"{pre}{name}: {getattr(p, name)!r} is not a valid site name")
    _finite_positive(p.rpo_interval_s, f"{pre}rpo_interval_s")
    for name in ("short_term_retention_s", "long_term_interval_s", "long_term_retention_s"):
        _finite_positive(getattr(p, name), f"{pre}{name}")
    if not 0 <= p.compression_level <= 22:
        raise ConfigError(f"{pre}compression_level: must be 0..22, got {p.compression_level}")
    _finite_positive(p.rpo_warning_s, f"{pre}rpo_warning_s")
    _finite_positive(p.rpo_error_s, f"{pre}rpo_error_s")
    if p.rpo_error_s < p.rpo_warning_s:
        raise ConfigError(f"{pre}rpo_error_s: must be at least rpo_warning_s "
                          f"({p.rpo_warning_s}), got {p.rpo_error_s}")
    if not math.isfinite(p.bandwidth_limit_mbps) or p.bandwidth_limit_mbps < 0:
        raise ConfigError(f"{pre}bandwidth_limit_mbps: must be 0 (unlimited) or more, "
                          f"got {p.bandwidth_limit_mbps}")
    for name in ("pinned_source_proxy", "pinned_target_proxy"):
        value = getattr(p, name)
        if value and not is_name(value):
            raise ConfigError(f"{pre}{name}: {value!r} is not a valid node id")
    if p.verify_every_s < 0 or (0 < p.verify_every_s < verify_min_interval_s):
        raise ConfigError(f"{pre}verify_every_s: must be 0 (no scheduled verification) or "
                          f"at least {verify_min_interval_s:g}, got {p.verify_every_s:g}")


def build_policy(data: dict[str, Any], where: str = "", *,
                 max_disk_bytes: int = MAX_DISK_BYTES,
                 verify_min_interval_s: float = VERIFY_MIN_INTERVAL_S) -> PolicyConfig:
    """A PolicyConfig from a TOML/JSON table: types, unknown keys, then validate_policy."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'policy'}: expected a table, got {data!r}")
    policy = _build(PolicyConfig, data, where)
    validate_policy(policy, where, max_disk_bytes=max_disk_bytes,
                    verify_min_interval_s=verify_min_interval_s)
    return policy


def load_config(cls: type[T], path: str | Path) -> T:
    """Parse and validate a TOML config file into `cls`."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        config = _build(cls, data, "")
        validate(config)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return config
