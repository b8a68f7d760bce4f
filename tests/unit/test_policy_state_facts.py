"""The protection state from the facts real nodes report (issue 11 item 2): a filter's
failed journal fsync and a target frozen by a failover travel as PolicyReport.error
through the heartbeat to the coordinator, which puts the policy in error with a
reason naming them; an assigned policy the target has no store for yet is
unprotected, not "not reported"."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from test_coordinator_state import lab, policy
from test_journal import FsyncFailsOnce, fill
from test_target_bounds import replicate

from cdp_common.config import NodeConfig, TargetConfig, TargetSection, TlsConfig
from cdp_common.errors import StorageError
from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
from cdp_coordinator.service import report_from_pb
from cdp_coordinator.state import CoordinatorState, Report
from cdp_filter.journal import Journal
from cdp_filter.policy import PolicyRuntime
from cdp_target.daemon import TargetDaemon
from cdp_target.restore import Failover

pytestmark = pytest.mark.timeout(30)


def judged(filter_reports: list[cpb.PolicyReport],
           target_reports: list[cpb.PolicyReport]) -> tuple[str, str]:
    """(state, reason) of p1 once filter-1 and target-1 sent these reports, past the grace."""
    s: CoordinatorState = lab(policies=[policy("p1")])
    s.tick(0)
    s.heartbeat("filter-1", [report_from_pb(r) for r in filter_reports], 5)
    s.heartbeat("target-1", [report_from_pb(r) for r in target_reports], 5)
    p = s.status(5, wall_now=1000).policies[0]
    return p.state, p.reason


def test_a_failed_journal_fsync_puts_the_policy_in_error(tmp_path: Path) -> None:
    j = Journal.open(str(tmp_path / "j"), 1 << 20, 1 << 30, policy="p1", io=FsyncFailsOnce())
    rt = PolicyRuntime("p1", j, [])
    try:
        fill(j, 2)
        target = [cpb.PolicyReport(policy="p1", durable_seq=2)]
        assert judged([rt.report()], target) == ("ok", "")
        with contextlib.suppress(StorageError):
            j.sync()
        state, reason = judged([rt.report()], target)
        assert state == "error"
        assert reason.startswith("filter-1: journal ") and "fsync failed" in reason
        assert "restart the filter" in reason
    finally:
        j.close()


def target_daemon(data: Path) -> TargetDaemon:
    return TargetDaemon(TargetConfig(node=NodeConfig(id="target-1", coordinator="127.0.0.1:1"),
                                     target=TargetSection(data_dir=str(data)),
                                     tls=TlsConfig(insecure=True)))


async def test_a_failed_over_then_frozen_policy_is_in_error(tmp_path: Path) -> None:
    data = tmp_path / "data"
    daemon = target_daemon(data)
    await daemon.service.open_existing()
    await daemon.restore.attach()
    try:
        daemon.service.set_assigned({"p1"})
        state, reason = judged([cpb.PolicyReport(policy="p1")], daemon.reports())
        assert (state, reason) == ("unprotected", "nothing of policy p1 is on target-1 yet "
                                                  "(no stream has arrived): no restore point")
        await replicate(daemon.service, "p1")
        await replicate(daemon.service, "p1", first=2)
        filt = [cpb.PolicyReport(policy="p1", captured_seq=2)]
        assert judged(filt, daemon.reports()) == ("ok", "")
        rt = daemon.service.policies["p1"]
        fo = Failover(rt.local)
        fo.start(lambda: rt.local.undo.catalog.points[-1])
        fo.commit()
    finally:
        await daemon.restore.close()
        await daemon.service.close()
    # the restarted target finds the committed failover: the store is frozen
    daemon = target_daemon(data)
    await daemon.service.open_existing()
    await daemon.restore.attach()
    try:
        assert daemon.service.policies["p1"].local.frozen
        state, reason = judged(filt, daemon.reports())
        assert state == "error"
        assert reason == ("target-1: policy p1 is frozen: failover committed, production "
                          "moved to DR; replication is stopped")
    finally:
        await daemon.restore.close()
        await daemon.service.close()


def test_a_fenced_or_refused_stream_is_an_error() -> None:
    """What the shipper reports after a permanent answer (cdp_filter.shipper)."""
    state, reason = judged([cpb.PolicyReport(policy="p1", error="fenced: epoch 3 < 4")],
                           [cpb.PolicyReport(policy="p1")])
    assert (state, reason) == ("error", "filter-1: fenced: epoch 3 < 4")


def test_no_store_travels_in_the_report() -> None:
    assert report_from_pb(cpb.PolicyReport(policy="p1", no_store=True)) == \
        Report("p1", no_store=True)
    assert not report_from_pb(cpb.PolicyReport(policy="p1")).no_store
