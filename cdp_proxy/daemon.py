"""cdp-proxy daemon: the data mover, role = source, target or both, on the node
skeleton (cdp_common.node).

The key ring (cdp_common.crypto.KeyRing: the master keys of proxy.key_file by
key id, the first current) is loaded at construction (a missing or bad key
file is a ConfigError before anything binds) and again on SIGHUP. The node
serves the servicer(s) of the role (`SourceProxy`, `TargetProxy`), registers
as ROLE_SOURCE_PROXY / ROLE_TARGET_PROXY / ROLE_PROXY_BOTH and reports only
the last error per policy. The data path never waits on the coordinator: streams are opened by
filters and source proxies with the addresses of their own assignments.

A proxy keeps no state across streams (the filter's journal is the source of
truth), so shutdown just stops the server: open streams end, the filters
reconnect elsewhere or later and resend from the target's durable seq.
"""

from __future__ import annotations

import logging

import grpc

from cdp_common import assignsig, node
from cdp_common.config import ProxyConfig
from cdp_common.crypto import load_key_ring
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
        self.keys = load_key_ring(proxy.key_file) if proxy.key_file else None
        self.errors = PolicyErrors()
        # the coordinator's public key; ConfigError if TLS is on and it is missing or bad
        verifier = assignsig.load_optional_verifier(config.tls.assignment_key_file,
                                                    config.tls.insecure)
        if verifier is None:
            log.warning("no tls.assignment_key_file: sessions are not checked against signed "
                        "assignments (tls.insecure lab mode only)",
                        extra={"node": config.node.id})
        self.channels = Channels(config.tls, config.node.max_message_bytes)
        self.source: SourceProxy | None = None
        self.target: TargetProxy | None = None
        if proxy.role in ("source", "both"):
            self.source = SourceProxy(config.node.id, proxy, self.channels, self.keys,
                                      self.errors, verifier=verifier)
        if proxy.role in ("target", "both"):
            self.target = TargetProxy(config.node.id, self.channels, self.keys,
                                      self.errors, verifier=verifier)
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
        """SIGHUP: re-read the key ring of proxy.key_file. Sessions opened from now on
        use it: a source proxy seals with its current key, a target proxy accepts
        opens under any key it holds; open sessions keep the key they opened with.
        A missing or bad key file raises ConfigError and the old ring stays."""
        if not config.proxy.key_file:
            return
        keys = load_key_ring(config.proxy.key_file)
        self.keys = keys
        if self.source is not None:
            self.source.keys = keys
        if self.target is not None:
            self.target.keys = keys
        log.info("reloaded the key ring from %s: key ids %s, new sessions seal with key id %d",
                 config.proxy.key_file, ", ".join(map(str, keys.ids())), keys.current_id,
                 extra={"node": self.config.node.id})
