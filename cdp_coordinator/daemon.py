"""The cdp-coordinator process: SQLite store, gRPC service, ticker, metrics."""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import Counter, Gauge

from cdp_common import rpc
from cdp_common.config import CoordinatorConfig
from cdp_common.daemon import cancel_and_wait, start_metrics
from cdp_common.pb.cdp.v1 import coordinator_pb2_grpc as cgrpc
from cdp_coordinator.service import CoordinatorService
from cdp_coordinator.store import SqliteStore

log = logging.getLogger("coord.daemon")

NODES = Gauge("cdp_coordinator_nodes", "Registered nodes by state.", ["state"])
REBINDS = Counter("cdp_coordinator_rebinds", "Times a bound proxy or target was lost or replaced.")
RPO_LAG = Gauge("cdp_coordinator_rpo_lag_seconds", "RPO lag per policy.", ["policy"])
EPOCH = Gauge("cdp_coordinator_policy_epoch", "Current assignment epoch per policy.", ["policy"])

METRICS_PERIOD_S = 1.0
SHUTDOWN_GRACE_S = 2.0


class CoordinatorDaemon:
    def __init__(self, config: CoordinatorConfig) -> None:
        self.config = config
        self.address = ""
        self.metrics_address = ""
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._rebinds_seen = 0
        self.service: CoordinatorService | None = None

    async def run(self) -> None:
        cfg = self.config
        store = SqliteStore(cfg.coordinator.db_path)
        try:
            self.service = service = CoordinatorService(cfg, store)
            server = rpc.Server(cfg.node.listen, cfg.tls, cfg.node.max_message_bytes)
            cgrpc.add_CoordinatorServicer_to_server(service, server.grpc)
            await server.start()
            self.address = cfg.node.advertise or server.address
            self.metrics_address = start_metrics(cfg.node.metrics_listen)
            log.info("coordinator serving on %s (metrics %s)", self.address,
                     self.metrics_address or "off")
            ticker = asyncio.create_task(service.ticker(), name="coord-ticker")
            metrics = asyncio.create_task(self._metrics_loop(service), name="coord-metrics")
            self.ready.set()
            try:
                await self._stop.wait()
            finally:
                await cancel_and_wait(ticker, metrics)
                service.close()
                await server.stop(SHUTDOWN_GRACE_S)
                log.info("coordinator stopped")
        finally:
            store.close()

    async def shutdown(self) -> None:
        self._stop.set()

    def update_metrics(self, service: CoordinatorService) -> None:
        status = service.state.status(service.clock(), service.wall())
        up = sum(1 for n in status.nodes if n.state == "up")
        NODES.labels(state="up").set(up)
        NODES.labels(state="down").set(len(status.nodes) - up)
        for p in status.policies:
            RPO_LAG.labels(policy=p.name).set(p.rpo_lag_s)
            EPOCH.labels(policy=p.name).set(p.epoch)
        delta = service.state.rebinds - self._rebinds_seen
        if delta > 0:
            REBINDS.inc(delta)
            self._rebinds_seen = service.state.rebinds

    async def _metrics_loop(self, service: CoordinatorService) -> None:
        while True:
            self.update_metrics(service)
            await asyncio.sleep(METRICS_PERIOD_S)
