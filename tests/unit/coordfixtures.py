"""Shared helpers of the coordinator tests (a plain module, no fixtures): policies,
nodes, configs, an injected clock, and the in-memory store."""

from __future__ import annotations

from pathlib import Path

from cdp_common.config import (
    CoordinatorConfig,
    CoordinatorSection,
    NodeConfig,
    PolicyConfig,
    PolicyDiskConfig,
    TlsConfig,
)
from cdp_coordinator.model import NodeInfo, Role

TLS = TlsConfig(insecure=True)


class Clock:
    """An injected clock: call it for the time, set `t` to move it."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def pol(name: str, **kw: object) -> PolicyConfig:
    """A policy of two disks on filter-1, replicated to target-1."""
    return PolicyConfig(name=name, disks=[PolicyDiskConfig("filter-1", "disk0", 1 << 20),
                                          PolicyDiskConfig("filter-1", "disk1", 2 << 20)],
                        target="target-1", **kw)  # type: ignore[arg-type]


def config(db: Path | str, policies: list[PolicyConfig], lease_ms: int = 300,
           listen: str = "127.0.0.1:0") -> CoordinatorConfig:
    return CoordinatorConfig(node=NodeConfig(id="coordinator", listen=listen),
                             coordinator=CoordinatorSection(db_path=str(db), heartbeat_ms=100,
                                                            lease_ms=lease_ms),
                             policies=policies, tls=TLS)


NODES = [NodeInfo("filter-1", int(Role.FILTER), "default", "127.0.0.1:1"),
         NodeInfo("sp-1", int(Role.SOURCE_PROXY), "default", "127.0.0.1:2"),
         NodeInfo("sp-2", int(Role.SOURCE_PROXY), "default", "127.0.0.1:5"),
         NodeInfo("tp-1", int(Role.TARGET_PROXY), "default", "127.0.0.1:3"),
         NodeInfo("target-1", int(Role.TARGET), "default", "127.0.0.1:4")]
"""A filter, two source proxies, a target proxy and a target, all on site "default"."""
