"""cdp-proxy daemon: the data mover, role = source, target or both.

Lifecycle: load the master key once, bind node.listen with the servicer(s)
of its role (`SourceProxy`, `TargetProxy`) plus health, serve metrics,
register with the coordinator (ROLE_SOURCE_PROXY / ROLE_TARGET_PROXY /
ROLE_PROXY_BOTH) and heartbeat, reporting only the last error per policy.
The data path never waits on the coordinator: streams are opened by filters
and source proxies with the addresses of their own assignments.

A proxy keeps no state across streams (the filter's journal is the source of
truth), so shutdown just stops the server: open streams end, the filters
reconnect elsewhere or later and resend from the target's durable seq.
"""

from __future__ import annotations

import asyncio
import logging

from cdp_common import daemon as cdaemon
from cdp_common import rpc
from cdp_common.config import ProxyConfig
from cdp_common.coordclient import CoordinatorClient
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


class ProxyDaemon:
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
        self.server: rpc.Server | None = None
        self.coordinator: CoordinatorClient | None = None
        self.address = ""
        self.metrics_address = ""
        self.started = asyncio.Event()
        self._stop = asyncio.Event()
        self._rate = metrics.ByteRate()

    def reports(self) -> list[cpb.PolicyReport]:
        return [cpb.PolicyReport(policy=p, error=m) for p, m in sorted(self.errors.items())]

    async def run(self) -> None:
        node = self.config.node
        try:
            self.server = rpc.Server(node.listen, self.config.tls, node.max_message_bytes)
            if self.source is not None:
                rgrpc.add_SourceProxyServicer_to_server(self.source, self.server.grpc)
            if self.target is not None:
                rgrpc.add_TargetProxyServicer_to_server(self.target, self.server.grpc)
            await self.server.start()
            self.address = node.advertise or self.server.address
            self.metrics_address = cdaemon.start_metrics(node.metrics_listen)
            if node.coordinator:
                self.coordinator = CoordinatorClient(
                    node, self.config.tls, ROLES[self.config.proxy.role], self.address,
                    self.metrics_address, self.reports, load=self._rate.sample)
                if self.source is not None:
                    self.source.on_unreachable = self.coordinator.report_unreachable
                self.coordinator.start()
            log.info("proxy (role %s) serving on %s (metrics %s)", self.config.proxy.role,
                     self.address, self.metrics_address or "off", extra={"node": node.id})
            self.started.set()
            await self._stop.wait()
        finally:
            await self._cleanup()

    async def shutdown(self) -> None:
        self._stop.set()

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

    async def _cleanup(self) -> None:
        if self.coordinator is not None:
            await self.coordinator.stop()
        if self.server is not None:
            await self.server.stop(SHUTDOWN_GRACE_S)
        await self.channels.close()
        log.info("proxy stopped", extra={"node": self.config.node.id})
