"""Shipper through the in-memory RecordSink (cdp_filter/memsink.py): no server, no
socket. Resume, batching, acks trimming the journal, reconnect after failures and
refusals, epoch changes and fences, lost-tail and trimmed-gap handling."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import shipperfixtures
from google.protobuf import json_format
from shipperfixtures import eventually

from cdp_common import records
from cdp_common.errors import UnavailableError
from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
from cdp_filter.memsink import MemoryDownstream, MemoryRecordSink
from cdp_filter.shipper import Shipper

pytestmark = pytest.mark.timeout(30)
H = records.HEADER_SIZE



def assignment(epoch: int = 1) -> cpb.Assignment:
    return cpb.Assignment(
        policy="p", epoch=epoch, source_proxy=cpb.Endpoint(node_id="sp", address="mem:1"),
        target_proxy=cpb.Endpoint(node_id="tp", address="mem:2"),
        target=cpb.Endpoint(node_id="t", address="mem:3"), rpo_interval_s=2.0)


class Rig(shipperfixtures.Rig):
    """A shipper over the in-memory sink; `start(a)` adopts `a` first."""

    sink: MemoryRecordSink

    def __init__(self, tmp: Path, sink: MemoryRecordSink) -> None:
        super().__init__(tmp, sink=sink)

    def start(self, a: cpb.Assignment | None = None) -> None:
        self.shipper.set_assignment(a or assignment())
        super().start()


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    r = Rig(tmp_path, MemoryRecordSink())
    yield r
    await r.close()


def check_data(sink: MemoryRecordSink) -> None:
    for seq, rec in sink.downstream.received.items():
        assert rec.data == bytes([seq % 256]) * 100 and rec.time_ns == seq


async def test_ships_in_order_in_batches_and_trims(rig: Rig) -> None:
    rig.write(25)
    rig.start()
    await eventually(lambda: rig.sink.seqs[-1:] == [25])
    rig.write(30)
    await eventually(lambda: rig.rt.durable_seq == 55)
    assert rig.sink.seqs == list(range(1, 56)) and rig.sink.duplicates == 0
    check_data(rig.sink)
    assert rig.sink.sessions[0].batches >= 55 // 4  # at most batch_bytes (4 records) each
    hello = rig.sink.hellos[0]
    assert (hello.policy, hello.filter_id, hello.epoch, hello.captured_seq) == \
        ("p", "filter-1", 1, 25)
    assert hello.target_address == "mem:3" and hello.disks[0].name == "d"
    assert rig.sink.addresses == ["mem:1"]
    assert rig.journal.segment_count <= 1 and rig.rt.error == "" and rig.shipper.connected


async def test_reconnects_and_resends_from_the_durable_seq(rig: Rig) -> None:
    rig.sink.auto_ack = False
    rig.sink.fail_after_batches = 2
    rig.write(20)
    rig.start()
    await eventually(lambda: len(rig.sink.hellos) >= 2)
    await eventually(lambda: "injected failure" in rig.rt.error)
    assert rig.sink.sessions[-1].resume_from_seq == 0  # nothing was durable
    rig.sink.auto_ack = True
    rig.write(1)
    await eventually(lambda: rig.rt.durable_seq == 21)
    # resent from seq 1, every record applied once
    assert rig.sink.seqs == list(range(1, 22)) and rig.sink.duplicates == 0
    check_data(rig.sink)


async def test_refused_open_is_reported_then_retried(rig: Rig) -> None:
    rig.sink.fail_open = UnavailableError("policy 'p': target proxy unreachable")
    rig.write(3)
    rig.start()
    await eventually(lambda: "target proxy unreachable" in rig.rt.error)
    await eventually(lambda: rig.rt.durable_seq == 3)
    assert len(rig.sink.hellos) == 2
    await eventually(lambda: rig.rt.error == "")  # the ack shows the stream healthy


async def test_refusal_shows_as_the_policy_error(rig: Rig) -> None:
    rig.sink.downstream.epoch = 9   # a newer assignment was seen downstream
    rig.write(2)
    rig.start(assignment(epoch=3))
    await eventually(lambda: "older than 9" in rig.rt.error)
    assert rig.sink.seqs == [] and rig.journal.last_seq == 2
    assert rig.rt.report().error == rig.rt.error


async def test_new_epoch_restarts_the_session(rig: Rig) -> None:
    rig.write(5)
    rig.start(assignment(epoch=1))
    await eventually(lambda: rig.rt.durable_seq == 5)
    rig.shipper.set_assignment(assignment(epoch=1))  # same: nothing happens
    await asyncio.sleep(0.05)
    assert len(rig.sink.hellos) == 1
    rig.shipper.set_assignment(assignment(epoch=2))
    await eventually(lambda: len(rig.sink.hellos) == 2)
    assert rig.sink.hellos[1].epoch == 2 and rig.sink.sessions[-1].resume_from_seq == 5
    rig.write(2)
    await eventually(lambda: rig.rt.durable_seq == 7)
    assert rig.sink.seqs == list(range(1, 8))


async def test_target_ahead_of_journal_needs_an_operator_sync(tmp_path: Path) -> None:
    rig = Rig(tmp_path, MemoryRecordSink(MemoryDownstream(durable_seq=40)))
    try:
        rig.write(3)
        rig.start()
        await eventually(lambda: "durable through seq 40" in rig.rt.error)
        assert rig.journal.last_seq == 3 and rig.sink.seqs == []
        released = assignment()
        released.sync_request_id = 1   # `cdpctl sync` after the error was shown
        rig.shipper.set_assignment(released)
        await eventually(lambda: rig.shipper.connected)
        assert rig.journal.last_seq == 40
        rig.write(2)
        await eventually(lambda: rig.rt.durable_seq == 42)
        assert rig.sink.seqs == [41, 42]
    finally:
        await rig.close()


async def test_trimmed_gap_is_reported_and_nothing_sent(tmp_path: Path) -> None:
    rig = Rig(tmp_path, MemoryRecordSink(MemoryDownstream(durable_seq=5)))
    try:
        rig.write(25)
        rig.journal.trim_through(20)
        rig.start()
        await eventually(lambda: "resync" in rig.rt.error)
        assert rig.sink.seqs == []
    finally:
        await rig.close()


async def test_welcome_hook_sees_resume_before_trim(rig: Rig) -> None:
    seen: list[tuple[int, int]] = []
    rig.shipper.on_welcome = lambda resume: seen.append((resume, rig.rt.durable_seq))
    rig.sink.downstream.durable_seq = 0
    rig.write(4)
    rig.start()
    await eventually(lambda: rig.rt.durable_seq == 4)
    assert seen == [(0, 0)] and rig.shipper.welcomes == 1


def make_shipper(tmp: Path, rig: Rig) -> Shipper:
    return rig.new_shipper()


async def test_assignment_cache_is_a_versioned_state_file(tmp_path: Path, rig: Rig) -> None:
    rig.shipper.set_assignment(assignment(epoch=7))
    doc = json.loads((tmp_path / "assignment.p.json").read_text())
    assert doc["kind"] == "assignment" and doc["version"] == 2
    assert doc["assignment"]["epoch"] == "7"  # proto3 JSON: uint64 as a string
    again = make_shipper(tmp_path, rig)
    assert again.assignment is not None and again.assignment.epoch == 7


async def test_legacy_assignment_cache_is_read(tmp_path: Path, rig: Rig) -> None:
    (tmp_path / "assignment.p.json").write_text(json_format.MessageToJson(assignment(epoch=4)))
    again = make_shipper(tmp_path, rig)
    assert again.assignment is not None and again.assignment.epoch == 4
    assert again.assignment.source_proxy.address == "mem:1"


@pytest.mark.parametrize("text", ["{broken", "[]", '{"kind": "journal", "version": 1}',
                                  '{"kind": "assignment", "version": 2, "assignment": 3}',
                                  '{"kind": "assignment", "version": 2, '
                                  '"assignment": {"epoch": "x"}}'])
async def test_corrupt_assignment_cache_is_ignored(tmp_path: Path, rig: Rig, text: str,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "assignment.p.json").write_text(text)
    again = make_shipper(tmp_path, rig)
    assert again.assignment is None
    assert "ignoring unreadable" in caplog.text
