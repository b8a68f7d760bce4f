"""cdp-target daemon: serves `Target` and `RestorePoints` over the policy stores in
target.data_dir, on the node skeleton (cdp_common.node).

open: every existing policy store (pending deltas are applied by each policy's
apply worker); a store that fails to open is quarantined and reported in
error in every heartbeat, the others run. Then the node serves, registers as
ROLE_TARGET and reports per policy in every heartbeat: durable_seq, applied_seq, newest_time_ns,
bytes_replicated, gaps, the last apply error (or the failover refusal) and, for a
consistency-group member, its newest checkpoint point (checkpoint_id and time), the
newest verification of a point (`cdpctl verify` or the schedule) and the
verify_every_s schedule it runs (cdp_target.verifysched); a
policy assigned here whose first stream has not arrived is reported with
`no_store` (coordinator.proto PolicyReport). The data path never waits on
the coordinator. Shutdown stops the coordinator client, then the
server (streams end, partial deltas are discarded), lets an apply in progress
finish its current delta, stops the retention tick and closes the stores; everything is crash safe
anyway, so a kill -9 at any point is recovered on the next start.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc

from cdp_common import assignsig, node
from cdp_common.config import TargetConfig, restore_dir_of, verify_dir_of
from cdp_common.groups import split_member
from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
from cdp_common.pb.cdp.v1 import replication_pb2_grpc as rgrpc
from cdp_common.pb.cdp.v1 import restore_pb2_grpc as pgrpc
from cdp_target.points import Point
from cdp_target.restore_service import RestoreService
from cdp_target.service import PolicyRuntime, TargetService
from cdp_target.verifylog import Verification
from cdp_target.verifysched import VerifyScheduler

SHUTDOWN_GRACE_S = 2.0


def checkpoint_of(policy: str, store: object) -> Point | None:
    """The newest restore point of a group member that ends at a checkpoint (None for
    any other policy, or a store without restore points: a policy of its own never
    has checkpoints, and its catalog is not scanned every heartbeat)."""
    undo = getattr(store, "undo", None)
    if undo is None or split_member(policy) is None:
        return None
    p: Point | None = undo.catalog.newest_checkpoint
    return p


class TargetDaemon(node.NodeDaemon):
    def __init__(self, config: TargetConfig) -> None:
        self.config = config
        t = config.target
        self.service = TargetService(t.data_dir, retention_override={
            "short_term_retention_s": t.short_term_retention_s,
            "long_term_interval_s": t.long_term_interval_s,
            "long_term_retention_s": t.long_term_retention_s},
            max_disk_bytes=t.max_disk_bytes, max_delta_bytes=t.max_delta_bytes,
            require_assignment=True,
            verifier=assignsig.load_optional_verifier(config.tls.assignment_key_file,
                                                      config.tls.insecure),
            node_id=config.node.id)
        self.restore = RestoreService(self.service, restore_dir_of(t))
        self.verify = VerifyScheduler(self.service, self.restore.verification_log,
                                      self.restore.record_verification,
                                      verify_dir_of(t), restore_dir_of(t))
        self.node = node.Node(config, self, kind="target", role=cpb.ROLE_TARGET,
                              grace_s=SHUTDOWN_GRACE_S,
                              on_assignments=self._on_assignments(config.node.id))

    def _on_assignments(self, node_id: str) -> Callable[[cpb.AssignmentSet], Awaitable[None]]:
        """The restore service's handler (it admits the signed assignments, sets the
        policies assigned here), then each admitted one's verification schedule."""
        update = self.restore.on_assignments(node_id)

        async def on_assignments(aset: cpb.AssignmentSet) -> None:
            await update(aset)
            mine = self.service.assigned or set()
            self.verify.set_schedule({a.policy: a.verify_every_s for a in aset.assignments
                                      if a.target.node_id == node_id and a.policy in mine})
        return on_assignments

    def _verified(self, name: str, rt: PolicyRuntime) -> Verification | None:
        hit = self.restore.verified.get(name)
        return hit[1].newest() if hit is not None and hit[0] is rt.store else None

    def reports(self) -> list[cpb.PolicyReport]:
        out = [cpb.PolicyReport(policy=name, error=f"store quarantined at start-up: {why}")
               for name, why in sorted(self.service.quarantined.items())]
        for name in sorted(self.service.policies):
            rt = self.service.policies[name]
            s = rt.store.snapshot()
            ck = checkpoint_of(name, rt.store)
            v = self._verified(name, rt)
            out.append(cpb.PolicyReport(policy=name, durable_seq=s.durable_seq,
                                        checkpoint_id=ck.checkpoint_id if ck else 0,
                                        checkpoint_time_ns=ck.time_ns if ck else 0,
                                        applied_seq=s.applied_seq,
                                        newest_time_ns=s.newest_time_ns,
                                        bytes_replicated=s.bytes_replicated,
                                        error=rt.refusal or rt.error
                                        or (rt.repair.text() if rt.repair else ""),
                                        resync_request_id=rt.repair.request_id
                                        if rt.repair else 0,
                                        verified_point_id=v.point_id if v else 0,
                                        verified_ok=v.ok if v else False,
                                        verified_ns=v.time_ns if v else 0,
                                        verify_detail=v.detail if v else "",
                                        verify_every_s=self.verify.every.get(name, 0.0),
                                        gaps=[cpb.GapInfo(begin_seq=g.begin_seq,
                                                          end_seq=g.end_seq,
                                                          begin_time_ns=g.begin_time_ns,
                                                          end_time_ns=g.end_time_ns,
                                                          reason=g.reason)
                                              for g in rt.gaps.gaps]))
        # Assigned here, but no stream has arrived yet: say so, so the coordinator
        # tells "waiting for the first data" from "does not report it" (an error).
        waiting = (self.service.assigned or set()) - set(self.service.policies) \
            - set(self.service.quarantined)
        out += [cpb.PolicyReport(policy=name, no_store=True) for name in sorted(waiting)]
        return out

    async def open(self, node: node.Node) -> None:
        await self.service.open_existing()
        await self.restore.attach()
        self.verify.start()

    def add_servicers(self, server: grpc.aio.Server) -> None:
        rgrpc.add_TargetServicer_to_server(self.service, server)
        pgrpc.add_RestorePointsServicer_to_server(self.restore, server)

    async def close(self) -> None:
        await self.verify.close()
        await self.restore.close()
        await self.service.close()
