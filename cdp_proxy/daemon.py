"""cdp-proxy daemon: the data mover, role = source, target or both, on the node
skeleton (cdp_common.node).

The master key is loaded once (at construction: a missing or bad key file is a
ConfigError before anything binds). The node serves the servicer(s) of the
role (`SourceProxy`, `TargetProxy`), registers as ROLE_SOURCE_PROXY /
ROLE_TARGET_PROXY / ROLE_PROXY_BOTH and reports only the last error per
policy. The data path never waits on the coordinator: streams are opened by
filters and source proxies with the addresses of their own assignments.

A proxy keeps no state across streams (the filter's journal is the source of
truth), so shutdown just stops the server: open streams end, the filters
reconnect elsewhere or later and resend from the target's durable seq.
"""

from __future__ import annotations

import logging

import grpc

from cdp_common import node
from cdp_common.config import ProxyConfig
from cdp_common.crypto import load_master_key
from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
from cdp_common.pb.cdp.v1 import replication_pb2_grpc as rgrpc
from cdp_proxy import metrics
from cdp_proxy.source import SourceProxy
from cdp_proxy.stream import Channels, PolicyErrors
from cdp_proxy.target_role import TargetProxy

log = logging.getLogger("proxy.daemon")

SHUTDOWN_GRACE_S = 2.0
ROLES = {"source": cpb.ROLE_SOURCE_PROXY, "target": cpb.ROLE_TARGET_PROXY,
         "both": cpb.ROLE_PROXY_BOTH}


class ProxyDaemon(node.NodeDaemon):
    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        proxy = config.proxy
        # ConfigError (exit code 2, one line) if the key file is missing or bad
        self.master_key = load_master_key(proxy.key_file) if proxy.key_file else None
        self.errors = PolicyErrors()
        self.channels = Channels(config.tls, config.node.max_message_bytes)
        self.source: SourceProxy | None = None
        self.target: TargetProxy | None = None
        if proxy.role in ("source", "both"):
            self.source = SourceProxy(config.node.id, proxy, self.channels, self.master_key,
                                      self.errors)
        if proxy.role in ("target", "both"):
            self.target = TargetProxy(config.node.id, self.channels, self.master_key,
                                      self.errors)
        self._rate = metrics.ByteRate()
        self.node = node.Node(config, self, kind=f"proxy (role {proxy.role})",
                              role=ROLES[proxy.role], grace_s=SHUTDOWN_GRACE_S,
                              load=self._rate.sample)

    def reports(self) -> list[cpb.PolicyReport]:
        return [cpb.PolicyReport(policy=p, error=m) for p, m in sorted(self.errors.items())]

    def add_servicers(self, server: grpc.aio.Server) -> None:
        if self.source is not None:
            rgrpc.add_SourceProxyServicer_to_server(self.source, server)
        if self.target is not None:
            rgrpc.add_TargetProxyServicer_to_server(self.target, server)

    async def start(self, node: node.Node) -> None:
        if self.source is not None and node.coordinator is not None:
            self.source.on_unreachable = node.coordinator.report_unreachable

    async def close(self) -> None:
        await self.channels.close()

    def reload(self, config: ProxyConfig) -> None:
        """SIGHUP: re-read proxy.key_file; sessions opened from now on use the new key
        (open sessions keep theirs). A missing or bad key file raises ConfigError and
        the old key stays."""
        if not config.proxy.key_file:
            return
        key = load_master_key(config.proxy.key_file)
        self.master_key = key
        if self.source is not None:
            self.source.master_key = key
        if self.target is not None:
            self.target.master_key = key
        log.info("reloaded the master key from %s", config.proxy.key_file,
                 extra={"node": self.config.node.id})
