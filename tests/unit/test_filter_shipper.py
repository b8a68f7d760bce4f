"""Shipper against an in-process SourceProxy that follows the Ship contract:
resume, batching, acks trimming the journal, reconnect after failures,
assignment changes, lost-tail and trimmed-gap handling, back-pressure."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from shipperfixtures import Rig, eventually

from cdp_common import records, rpc
from cdp_common.config import TlsConfig
from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
from cdp_common.pb.cdp.v1 import replication_pb2 as rpb
from cdp_common.pb.cdp.v1 import replication_pb2_grpc as rgrpc
from cdp_filter.resync import Tracker
from cdp_filter.shipper import Resume, plan_resume

pytestmark = pytest.mark.timeout(30)
TLS = TlsConfig(insecure=True)
H = records.HEADER_SIZE



class FakeProxy(rgrpc.SourceProxyServicer):
    """Acks every batch as durable right away (unless `hold_acks`), checks order."""

    def __init__(self) -> None:
        self.durable = 0
        self.hellos: list[rpb.ShipHello] = []
        self.seqs: list[int] = []
        self.batches = 0
        self.fail_after_batches: int | None = None
        self.hold_acks = False
        self.ack_beyond = 0   # > 0: a lying proxy acks this many seqs beyond what it got
        self.errors: list[str] = []
        self.skipped_to = 0   # the first seq after an announced jump

    async def Ship(self, request_iterator: AsyncIterator[rpb.ShipRequest],
                   context: grpc.aio.ServicerContext) -> AsyncIterator[rpb.ShipResponse]:
        it = request_iterator.__aiter__()
        first = await it.__anext__()
        self.hellos.append(first.hello)
        yield rpb.ShipResponse(welcome=rpb.ShipWelcome(resume_from_seq=self.durable))
        expect = self.durable + 1
        first = True
        async for req in it:
            for rec in records.decode_all(req.batch.records):
                if first and req.batch.skips_lost_seqs:
                    self.skipped_to = expect = rec.seq   # the one jump a stream may make
                first = False
                if rec.seq != expect:
                    self.errors.append(f"got seq {rec.seq}, expected {expect}")
                expect = rec.seq + 1
                self.seqs.append(rec.seq)
            self.batches += 1
            if self.fail_after_batches is not None and self.batches >= self.fail_after_batches:
                self.fail_after_batches = None
                await context.abort(grpc.StatusCode.UNAVAILABLE, "injected failure")
            if not self.hold_acks:
                self.durable = expect - 1
                yield rpb.ShipResponse(ack=rpb.ShipAck(durable_seq=self.durable
                                                       + self.ack_beyond))


@pytest.fixture
async def proxy() -> AsyncIterator[tuple[FakeProxy, str]]:
    fake = FakeProxy()
    server = rpc.Server("127.0.0.1:0", TLS, 8 << 20)
    rgrpc.add_SourceProxyServicer_to_server(fake, server.grpc)
    await server.start()
    yield fake, server.address
    await server.stop(0)


def assignment(address: str, epoch: int = 1) -> cpb.Assignment:
    return cpb.Assignment(
        policy="p", epoch=epoch, source_proxy=cpb.Endpoint(node_id="sp", address=address),
        target_proxy=cpb.Endpoint(node_id="tp", address="127.0.0.1:9"),
        target=cpb.Endpoint(node_id="t", address="127.0.0.1:8"), rpo_interval_s=2.0,
        compression_level=1, encryption=True)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    r = Rig(tmp_path)
    yield r
    await r.close()


def test_plan_resume() -> None:
    assert plan_resume(5, 1, 10) is Resume.OK
    assert plan_resume(0, 1, 0) is Resume.OK
    assert plan_resume(10, 11, 10) is Resume.OK
    assert plan_resume(11, 1, 10) is Resume.ADVANCE
    assert plan_resume(3, 5, 10) is Resume.GAP


async def test_ships_everything_in_order_and_trims(proxy: tuple[FakeProxy, str],
                                                   rig: Rig) -> None:
    fake, address = proxy
    rig.write(25)
    rig.shipper.set_assignment(assignment(address))
    rig.start()
    await eventually(lambda: fake.seqs[-1:] == [25])
    rig.write(30)  # wakes the idle shipper
    await eventually(lambda: fake.seqs[-1:] == [55])
    assert fake.seqs == list(range(1, 56)) and not fake.errors
    assert fake.batches >= 55 // 4  # batches of at most batch_bytes (4 records)
    hello = fake.hellos[0]
    assert hello.policy == "p" and hello.filter_id == "filter-1" and hello.epoch == 1
    assert hello.target_address == "127.0.0.1:8" and hello.disks[0].name == "d"
    assert hello.captured_seq == 25
    await eventually(lambda: rig.rt.durable_seq == 55)
    assert rig.journal.segment_count <= 1  # acked segments were deleted
    assert rig.rt.error == "" and rig.shipper.connected


async def test_reconnects_and_resumes_after_failure(proxy: tuple[FakeProxy, str],
                                                    rig: Rig) -> None:
    fake, address = proxy
    fake.fail_after_batches = 2
    fake.hold_acks = True  # the failed stream acked nothing: resend from 0
    rig.write(20)
    rig.shipper.set_assignment(assignment(address))
    rig.start()
    await eventually(lambda: len(fake.hellos) >= 2)
    fake.hold_acks = False
    rig.write(1)
    await eventually(lambda: fake.durable == 21)
    # second stream restarted at seq 1 (nothing was durable) and had no gaps
    assert fake.seqs[-21:] == list(range(1, 22))
    assert rig.rt.error == ""


async def test_error_reported_while_proxy_down(tmp_path: Path, rig: Rig) -> None:
    rig.write(3)
    rig.shipper.set_assignment(assignment("127.0.0.1:1"))
    rig.start()
    await eventually(lambda: "UNAVAILABLE" in rig.rt.error)
    assert rig.journal.last_seq == 3 and rig.rt.report().error == rig.rt.error


async def test_new_assignment_restarts_stream(proxy: tuple[FakeProxy, str], rig: Rig) -> None:
    fake, address = proxy
    rig.write(5)
    rig.shipper.set_assignment(assignment(address, epoch=1))
    rig.start()
    await eventually(lambda: fake.durable == 5)
    rig.shipper.set_assignment(assignment(address, epoch=1))  # same: nothing happens
    await asyncio.sleep(0.1)
    assert len(fake.hellos) == 1
    rig.shipper.set_assignment(assignment(address, epoch=2))
    await eventually(lambda: len(fake.hellos) == 2)
    assert fake.hellos[1].epoch == 2
    rig.write(2)
    await eventually(lambda: fake.durable == 7)
    assert fake.seqs == list(range(1, 8))


async def test_assignment_remembered_across_restart(proxy: tuple[FakeProxy, str],
                                                    rig: Rig) -> None:
    _fake, address = proxy
    rig.shipper.set_assignment(assignment(address, epoch=7))
    again = rig.new_shipper()
    assert again.assignment is not None and again.assignment.epoch == 7
    assert again.assignment.source_proxy.address == address


async def test_unassigned_keeps_journaling(proxy: tuple[FakeProxy, str], rig: Rig) -> None:
    fake, address = proxy
    unassigned = cpb.Assignment(policy="p", epoch=3, reason="no source proxy on site a")
    rig.shipper.set_assignment(unassigned)
    rig.start()
    rig.write(4)
    await asyncio.sleep(0.2)
    assert fake.hellos == [] and rig.journal.last_seq == 4
    assert "no source proxy" in rig.rt.error
    rig.shipper.set_assignment(assignment(address))
    await eventually(lambda: fake.durable == 4)


async def test_target_ahead_of_journal_waits_for_an_operator_sync(
        proxy: tuple[FakeProxy, str], rig: Rig) -> None:
    """A welcome above what was ever captured is never a silent skip: the policy is in
    error, nothing ships, the seq counter stays; an operator sync releases it."""
    fake, address = proxy
    fake.durable = 40  # the target has seqs our journal never had (or lost)
    rig.write(3)
    a = assignment(address)
    a.sync_request_id = 7   # an old, already handled request
    rig.shipper.set_assignment(a)
    rig.start()
    await eventually(lambda: "durable through seq 40" in rig.rt.error)
    assert "cdpctl sync p" in rig.rt.report().error
    await asyncio.sleep(0.3)
    assert rig.journal.last_seq == 3 and fake.seqs == []
    # the operator asks for a sync after seeing the error: skip ahead, ship again
    released = assignment(address)
    released.sync_request_id = 8
    rig.shipper.set_assignment(released)
    await eventually(lambda: rig.shipper.connected)
    assert rig.journal.last_seq == 40
    rig.write(2)
    await eventually(lambda: fake.durable == 42)
    assert fake.seqs == [41, 42] and not fake.errors


async def test_target_ahead_after_a_recovered_cut_skips_at_once(
        proxy: tuple[FakeProxy, str], rig: Rig) -> None:
    """The journal's recovery cut its tail and marked it for a dirty-block resync:
    the target being ahead is expected, and the counter skips past it."""
    fake, address = proxy
    fake.durable = 40
    rig.write(3)
    rig.rt.tail_cut_covered = True
    rig.shipper.set_assignment(assignment(address))
    rig.start()
    await eventually(lambda: rig.shipper.connected)
    assert rig.journal.last_seq == 40 and not rig.rt.tail_cut_covered   # used up
    rig.write(2)
    await eventually(lambda: fake.durable == 42)
    assert fake.seqs == [41, 42] and not fake.errors


async def test_an_ack_above_what_was_shipped_trims_nothing(
        proxy: tuple[FakeProxy, str], rig: Rig) -> None:
    fake, address = proxy
    fake.ack_beyond = 1000
    rig.write(3)
    rig.shipper.set_assignment(assignment(address))
    rig.start()
    await eventually(lambda: "above the last seq shipped (3)" in rig.rt.error)
    assert rig.journal.oldest_seq == 1 and rig.journal.last_seq == 3   # nothing trimmed


async def test_gap_is_reported(proxy: tuple[FakeProxy, str], rig: Rig) -> None:
    fake, address = proxy
    rig.write(25)
    rig.journal.trim_through(20)  # segment 1..10 and 11..20 deleted
    fake.durable = 5
    rig.shipper.set_assignment(assignment(address))
    rig.start()
    await eventually(lambda: "resync" in rig.rt.error)
    assert "cdpctl sync p" in rig.rt.report().error
    assert fake.seqs == []


async def test_target_behind_the_journal_jumps_only_with_a_later_sync(
        proxy: tuple[FakeProxy, str], rig: Rig) -> None:
    """A target that needs seqs the journal trimmed (the policy moved to a new target,
    or the target lost its store): nothing ships until a digest sync requested after
    the error runs, with its gap open; then the stream jumps over the trimmed seqs."""
    fake, address = proxy
    rig.rt.tracker = Tracker(rig.rt, str(rig.tmp / "dirty"), 4096)
    rig.write(25)
    rig.journal.trim_through(20)
    fake.durable = 5
    a = assignment(address)
    a.sync_request_id = 3   # an old request: it compared against another replica
    rig.shipper.set_assignment(a)
    rig.start()
    await eventually(lambda: "only keeps seqs from 21" in rig.rt.error)
    await asyncio.sleep(0.3)
    assert fake.seqs == [] and fake.skipped_to == 0
    # a newer request, but its sync has not opened its gap yet: still nothing
    newer = assignment(address)
    newer.sync_request_id = 4
    rig.shipper.set_assignment(newer)
    await asyncio.sleep(0.5)
    assert fake.seqs == []
    rig.rt.tracker.open_sync_gap("operator")   # the sync begins
    newest = assignment(address)
    newest.sync_request_id = 5
    rig.shipper.set_assignment(newest)
    await eventually(lambda: fake.durable == 25)
    assert fake.skipped_to == 21 and fake.seqs == [21, 22, 23, 24, 25] and not fake.errors


async def test_back_pressure_waits_for_trim(tmp_path: Path) -> None:
    rig = Rig(tmp_path, seg_bytes=2 * (H + 100), cap=4 * (H + 100))
    try:
        rig.write(4)
        assert rig.journal.over_cap
        waiter = asyncio.create_task(rig.rt.wait_space())
        await asyncio.sleep(0.05)
        assert not waiter.done()
        await rig.rt.trim_through(2)
        await asyncio.wait_for(waiter, 5)
        assert not rig.journal.over_cap
    finally:
        await rig.close()



async def test_report_says_when_journal_is_full(tmp_path: Path) -> None:
    rig = Rig(tmp_path, seg_bytes=2 * (H + 100), cap=2 * (H + 100))
    try:
        rig.write(1)
        assert rig.rt.report().error == "" and rig.rt.report().captured_seq == 1
        rig.write(1)
        assert "journal full" in rig.rt.report().error
        assert rig.rt.report().journal_bytes == 2 * (H + 100)
    finally:
        await rig.close()
