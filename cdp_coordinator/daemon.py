"""The cdp-coordinator process on the node skeleton (cdp_common.node): the store
(SQLite or etcd), the Coordinator service, its ticker (leases, rebinds), metrics
and, with etcd, the leader election (cdp_coordinator.leader): the coordinator
starts as a standby and serves as leader once elected."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import grpc
from prometheus_client import Counter, Gauge

from cdp_common import assignsig, metricsutil, node
from cdp_common.config import CoordinatorConfig, CoordinatorSection
from cdp_common.errors import ConfigError
from cdp_common.pb.cdp.v1 import coordinator_pb2_grpc as cgrpc
from cdp_common.states import AlarmLevel, NodeState, PolicyState, policy_level
from cdp_coordinator.election import Action, Step
from cdp_coordinator.model import Role
from cdp_coordinator.service import CoordinatorService
from cdp_coordinator.store import SqliteStore, StateStore

if TYPE_CHECKING:
    from cdp_coordinator.leader import EtcdElection

NODES = Gauge("cdp_coordinator_nodes", "Registered nodes by state.", ["state"])
REBINDS = Counter("cdp_coordinator_rebinds", "Times a bound proxy or target was lost or replaced.")
MOVES = Counter("cdp_coordinator_rebalance_moves",
                "Policy slots the rebalancer moved from a loaded proxy to an idle one.")
log = logging.getLogger("coord.daemon")
RPO_LAG = Gauge("cdp_coordinator_rpo_lag_seconds", "RPO lag per policy.", ["policy"])
EPOCH = Gauge("cdp_coordinator_policy_epoch", "Current assignment epoch per policy.", ["policy"])
POLICY_STATE = Gauge("cdp_coordinator_policy_state",
                     "1 for the policy's current protection state, 0 for the others.",
                     ["policy", "state"])
CLOCK_OFFSET = Gauge("cdp_coordinator_node_clock_offset_seconds",
                     "Node clock minus coordinator clock, from heartbeats.", ["node"])
NODE_UP = Gauge("cdp_coordinator_node_up", "1 while the node's lease runs, 0 when it is down.",
                ["node", "role"])
RPO_WARNING = Gauge("cdp_coordinator_policy_rpo_warning_seconds",
                    "The policy's rpo_warning_s threshold.", ["policy"])
RPO_ERROR = Gauge("cdp_coordinator_policy_rpo_error_seconds",
                  "The policy's rpo_error_s threshold.", ["policy"])
ALARM_LEVEL = Gauge("cdp_coordinator_policy_alarm_level",
                    "Severity of the policy's state as health sees it: 0 ok, 1 warning, "
                    "2 error.", ["policy"])
POLICY_GAP_OPEN = Gauge("cdp_coordinator_policy_gap_open",
                        "1 while a gap is open on the policy (restore points since its begin "
                        "are not restorable).", ["policy"])
JOURNAL = Gauge("cdp_coordinator_policy_journal_bytes",
                "Bytes in the filter's journal for the policy, as reported.", ["policy"])
DIRTY = Gauge("cdp_coordinator_policy_dirty_bytes",
              "Bytes marked dirty for a resync on the filter, as reported.", ["policy"])
SYNC_DONE = Gauge("cdp_coordinator_policy_sync_done_bytes",
                  "Bytes compared or resent by the running sync or resync.", ["policy"])
SYNC_TOTAL = Gauge("cdp_coordinator_policy_sync_total_bytes",
                   "Bytes the running sync or resync covers (0: none runs).", ["policy"])
CAPTURE_MODE = Gauge("cdp_coordinator_policy_capture_mode",
                     "1 for the filter's capture mode of the policy, 0 for the others.",
                     ["policy", "mode"])
CAPTURE_MODES = ("journaling", "tracking", "resyncing")
BREACH_IN = Gauge("cdp_coordinator_policy_rpo_breach_in_seconds",
                  "Seconds until the RPO lag reaches rpo_error_s at its steady rise "
                  "(+Inf: no breach forecast).", ["policy"])
POLICY_METRICS = (RPO_LAG, EPOCH, RPO_WARNING, RPO_ERROR, ALARM_LEVEL, POLICY_GAP_OPEN,
                  JOURNAL, DIRTY, SYNC_DONE, SYNC_TOTAL, BREACH_IN)
"""Labelled by policy alone: a deleted policy's series are removed from each."""
LEVELS = {AlarmLevel.OK: 0, AlarmLevel.WARNING: 1, AlarmLevel.ERROR: 2}

LEADER = Gauge("cdp_coordinator_leader",
               "1 while this coordinator leads (always with SQLite), 0 while it stands by.")
METRICS_PERIOD_S = 1.0
SHUTDOWN_GRACE_S = 2.0


def open_store(c: CoordinatorSection) -> StateStore:
    """The `StateStore` that `coordinator.store` names. Raises StorageError, FormatError."""
    if c.store == "etcd":
        from cdp_coordinator.etcdstore import EtcdStore

        return EtcdStore(c.etcd_endpoints, prefix=c.etcd_prefix,
                         timeout_s=c.etcd_timeout_ms / 1000, max_txn_ops=c.etcd_max_txn_ops)
    return SqliteStore(c.db_path)


class CoordinatorDaemon(node.NodeDaemon):
    def __init__(self, config: CoordinatorConfig) -> None:
        self.config = config
        self._rebinds_seen = 0
        self._moves_seen = 0
        self._policies_seen: set[str] = set()
        self.store: StateStore | None = None
        self.service: CoordinatorService | None = None
        self.election: EtcdElection | None = None
        self.node = node.Node(config, self, kind="coordinator", grace_s=SHUTDOWN_GRACE_S)

    async def open(self, node: node.Node) -> None:
        c = self.config.coordinator
        self.store = open_store(c)
        # with etcd, other coordinators may share the store: stand by until elected
        self.service = CoordinatorService(self.config, self.store, signer=self._signer(),
                                          leading=c.store != "etcd",
                                          takeover_grace_s=c.takeover_grace_ms / 1000)

    def _signer(self) -> assignsig.Signer | None:
        path, insecure = self.config.coordinator.signing_key_file, self.config.tls.insecure
        if not path and insecure:
            log.warning("no coordinator.signing_key_file: assignments are not signed "
                        "(tls.insecure lab mode only)", extra={"node": self.config.node.id})
            return None
        if not path:
            raise ConfigError("coordinator.signing_key_file: required unless tls.insecure = "
                              "true (create one with `cdpctl pki signing-key`)")
        return assignsig.load_signer(path)

    def add_servicers(self, server: grpc.aio.Server) -> None:
        assert self.service is not None
        cgrpc.add_CoordinatorServicer_to_server(self.service, server)

    async def start(self, node: node.Node) -> None:
        assert self.service is not None
        c = self.config.coordinator
        node.spawn(self.service.ticker(), "coord-ticker")
        node.spawn(self._metrics_loop(self.service), "coord-metrics")
        if c.store == "etcd":
            from cdp_coordinator.leader import EtcdElection

            address = self.config.node.advertise or node.address
            self.service.address = address
            self.election = EtcdElection(c.etcd_endpoints, c.etcd_prefix, self.config.node.id,
                                         address, c.election_ttl_s, self._on_election,
                                         timeout_s=c.etcd_timeout_ms / 1000)
            node.spawn(self.election.run(), "coord-election")

    def _on_election(self, step: Step, fence_revision: int) -> None:
        assert self.service is not None and self.store is not None
        if step.action is Action.LEAD:
            set_fence = getattr(self.store, "set_fence", None)
            if set_fence is not None:
                set_fence(fence_revision)
            self.service.become_leader()
        else:   # FOLLOW, STEP_DOWN; the fence of an ended term stays: it refuses writes
            self.service.become_standby(step.leader)

    async def stop(self) -> None:
        if self.election is not None:
            await self.election.resign()   # the key goes now: a standby leads at once
        if self.service is not None:
            self.service.close()   # ends the watch streams before the server stops

    async def close(self) -> None:
        if self.store is not None:
            self.store.close()

    def update_metrics(self, service: CoordinatorService) -> None:
        LEADER.set(int(service.leading))
        status = service.state.status(service.clock(), service.wall())
        up = sum(1 for n in status.nodes if n.state == NodeState.UP)
        NODES.labels(state="up").set(up)
        NODES.labels(state="down").set(len(status.nodes) - up)
        for p in status.policies:
            RPO_LAG.labels(policy=p.name).set(p.rpo_lag_s)
            EPOCH.labels(policy=p.name).set(p.epoch)
            for s in PolicyState:
                POLICY_STATE.labels(policy=p.name, state=s.value).set(int(s == p.state))
            RPO_WARNING.labels(policy=p.name).set(p.rpo_warning_s)
            RPO_ERROR.labels(policy=p.name).set(p.rpo_error_s)
            ALARM_LEVEL.labels(policy=p.name).set(LEVELS[policy_level(p.state, p.enabled)])
            POLICY_GAP_OPEN.labels(policy=p.name).set(int(
                bool(p.progress.gap_begin_time_ns) or any(not g.end_seq for g in p.gaps)))
            JOURNAL.labels(policy=p.name).set(p.journal_bytes)
            BREACH_IN.labels(policy=p.name).set(p.rpo_breach_in_s or float("inf"))
            DIRTY.labels(policy=p.name).set(p.progress.dirty_bytes)
            SYNC_DONE.labels(policy=p.name).set(p.progress.sync_done_bytes)
            SYNC_TOTAL.labels(policy=p.name).set(p.progress.sync_total_bytes)
            mode = p.progress.capture_mode or "journaling"
            for m in CAPTURE_MODES:
                CAPTURE_MODE.labels(policy=p.name, mode=m).set(int(m == mode))
        gone = self._policies_seen - {p.name for p in status.policies}
        for name in gone:   # a deleted policy's series go away
            metricsutil.forget(POLICY_METRICS, name)
            for s in PolicyState:
                metricsutil.forget([POLICY_STATE], name, s.value)
            for m in CAPTURE_MODES:
                metricsutil.forget([CAPTURE_MODE], name, m)
        self._policies_seen = {p.name for p in status.policies}
        for n in status.nodes:
            NODE_UP.labels(node=n.info.id, role=Role(n.info.role).name.lower()).set(
                int(n.state == NodeState.UP))
            if n.clock_offset_s is not None:
                CLOCK_OFFSET.labels(node=n.info.id).set(n.clock_offset_s)
        if service.state.rebinds < self._rebinds_seen:   # a takeover loaded a new state
            self._rebinds_seen = self._moves_seen = 0
        delta = service.state.rebinds - self._rebinds_seen
        if delta > 0:
            REBINDS.inc(delta)
            self._rebinds_seen = service.state.rebinds
        delta = service.state.moves - self._moves_seen
        if delta > 0:
            MOVES.inc(delta)
            self._moves_seen = service.state.moves

    async def _metrics_loop(self, service: CoordinatorService) -> None:
        while True:
            self.update_metrics(service)
            await asyncio.sleep(METRICS_PERIOD_S)
