"""cdp-target daemon: serves `Target` over the policy stores in target.data_dir.

Lifecycle: open every existing policy store (pending deltas are applied by
each policy's apply worker), bind node.listen, serve health and metrics,
register with the coordinator as ROLE_TARGET and report per policy in every
heartbeat: durable_seq, applied_seq, newest_time_ns, bytes_replicated and the
last apply error. The data path never waits on the coordinator. Shutdown stops
the server (streams end, partial deltas are discarded), lets an apply in
progress finish its current delta and closes the stores; everything is crash
safe anyway, so a kill -9 at any point is recovered on the next start.
"""

from __future__ import annotations

import asyncio
import logging

from cdp_common import daemon as cdaemon
from cdp_common import rpc
from cdp_common.config import TargetConfig
from cdp_common.coordclient import CoordinatorClient
from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
from cdp_common.pb.cdp.v1 import replication_pb2_grpc as rgrpc
from cdp_common.pb.cdp.v1 import restore_pb2_grpc as pgrpc
from cdp_target.restore_service import RestoreService
from cdp_target.service import TargetService
from cdp_target.undostore import set_global_override

log = logging.getLogger("target.daemon")

SHUTDOWN_GRACE_S = 2.0


class TargetDaemon:
    def __init__(self, config: TargetConfig) -> None:
        self.config = config
        self.service = TargetService(config.target.data_dir)
        self.restore = RestoreService(self.service)
        t = config.target
        set_global_override({"short_term_retention_s": t.short_term_retention_s,
                             "long_term_interval_s": t.long_term_interval_s,
                             "long_term_retention_s": t.long_term_retention_s})
        self.server: rpc.Server | None = None
        self.coordinator: CoordinatorClient | None = None
        self.address = ""
        self.metrics_address = ""
        self.started = asyncio.Event()
        self._stop = asyncio.Event()

    def reports(self) -> list[cpb.PolicyReport]:
        out = []
        for name in sorted(self.service.policies):
            rt = self.service.policies[name]
            s = rt.store.snapshot()
            out.append(cpb.PolicyReport(policy=name, durable_seq=s.durable_seq,
                                        applied_seq=s.applied_seq,
                                        newest_time_ns=s.newest_time_ns,
                                        bytes_replicated=s.bytes_replicated,
                                        error=rt.refusal or rt.error
                                        or (rt.repair.text() if rt.repair else ""),
                                        resync_request_id=rt.repair.request_id
                                        if rt.repair else 0,
                                        gaps=[cpb.GapInfo(begin_seq=g.begin_seq,
                                                          end_seq=g.end_seq,
                                                          begin_time_ns=g.begin_time_ns,
                                                          end_time_ns=g.end_time_ns,
                                                          reason=g.reason)
                                              for g in rt.gaps.gaps]))
        return out

    async def run(self) -> None:
        node = self.config.node
        try:
            await self.service.open_existing()
            await self.restore.attach()
            self.server = rpc.Server(node.listen, self.config.tls, node.max_message_bytes)
            rgrpc.add_TargetServicer_to_server(self.service, self.server.grpc)
            pgrpc.add_RestorePointsServicer_to_server(self.restore, self.server.grpc)
            await self.server.start()
            self.address = self.server.address
            self.metrics_address = cdaemon.start_metrics(node.metrics_listen)
            if node.coordinator:
                self.coordinator = CoordinatorClient(
                    node, self.config.tls, cpb.ROLE_TARGET, node.advertise or self.address,
                    self.metrics_address, self.reports,
                    on_assignments=self.restore.on_assignments(node.id))
                self.coordinator.start()
            log.info("target serving on %s (data dir %s, metrics %s)", self.address,
                     self.config.target.data_dir, self.metrics_address or "off",
                     extra={"node": node.id})
            self.started.set()
            await self._stop.wait()
        finally:
            await self._cleanup()

    async def shutdown(self) -> None:
        self._stop.set()

    async def _cleanup(self) -> None:
        await self.restore.close()
        if self.coordinator is not None:
            await self.coordinator.stop()
        if self.server is not None:
            await self.server.stop(SHUTDOWN_GRACE_S)
        await self.service.close()
        log.info("target stopped", extra={"node": self.config.node.id})
