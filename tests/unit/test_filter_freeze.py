"""A policy frozen for a planned failover (Assignment.frozen): the filter refuses
every new write, also one that was waiting when the freeze came, reports it, and
remembers it across a restart without the coordinator."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import shipperfixtures

from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
from cdp_filter.memsink import MemoryRecordSink
from cdp_filter.policy import WritesFrozenError

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[shipperfixtures.Rig]:
    r = shipperfixtures.Rig(tmp_path, sink=MemoryRecordSink())
    yield r
    await r.close()


def assignment(frozen: bool) -> cpb.Assignment:
    return cpb.Assignment(
        policy="p", epoch=1, source_proxy=cpb.Endpoint(node_id="sp", address="mem:1"),
        target_proxy=cpb.Endpoint(node_id="tp", address="mem:2"),
        target=cpb.Endpoint(node_id="t", address="mem:3"), rpo_interval_s=2.0, frozen=frozen)


async def test_frozen_policy_refuses_writes_and_takes_them_again_after(
        rig: shipperfixtures.Rig) -> None:
    rt, d = rig.rt, rig.disk
    await rt.write(d, 0, b"a" * 512)
    rt.set_frozen(True)
    with pytest.raises(WritesFrozenError, match="planned failover"):
        await rt.write(d, 4096, b"b" * 512)
    assert rig.journal.last_seq == 1 and rt.report().frozen
    rt.set_frozen(False)
    await rt.write(d, 4096, b"c" * 512)
    assert rig.journal.last_seq == 2 and not rt.report().frozen


async def test_a_write_waiting_on_a_checkpoint_is_refused_once_frozen(
        rig: shipperfixtures.Rig) -> None:
    rt, d = rig.rt, rig.disk
    assert rt.hold(3, 5.0) == ""
    waiting = asyncio.create_task(rt.write(d, 0, b"x" * 512))
    await asyncio.sleep(0.02)
    rt.set_frozen(True)
    rt.mark(3)
    with pytest.raises(WritesFrozenError):
        await asyncio.wait_for(waiting, 2)
    assert rig.journal.last_seq == 1   # the marker only: the write took no seq


async def test_the_freeze_comes_with_the_assignment_and_survives_a_restart(
        rig: shipperfixtures.Rig) -> None:
    rig.shipper.set_assignment(assignment(frozen=False))
    assert not rig.rt.frozen
    rig.shipper.set_assignment(assignment(frozen=True))   # same binding, only the freeze
    assert rig.rt.frozen
    rig.rt.set_frozen(False)       # a restarted filter: a fresh runtime, no coordinator
    rig.shipper = rig.new_shipper()
    assert rig.rt.frozen, "the remembered assignment did not keep the policy frozen"


async def test_a_freeze_while_unplaced_is_remembered_too(rig: shipperfixtures.Rig) -> None:
    unplaced = cpb.Assignment(policy="p", epoch=2, frozen=True,
                              reason="no healthy source proxy on site default")
    rig.shipper.set_assignment(unplaced)
    assert rig.rt.frozen and rig.shipper.assignment is None
    rig.rt.set_frozen(False)
    rig.shipper = rig.new_shipper()
    assert rig.rt.frozen and rig.shipper.assignment is None
