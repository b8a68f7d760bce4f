"""The etcd shell of the election (cdp_coordinator.leader) against a real etcd:
one leader among candidates, takeover after a resignation and after a crash
(the lease runs out), and the store's write fence of a deposed leader."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest
from etcdfixture import EtcdServer, etcd_server

from cdp_common.errors import FencedError
from cdp_coordinator.election import Action, Step
from cdp_coordinator.etcdstore import EtcdStore
from cdp_coordinator.leader import EtcdElection
from cdp_coordinator.model import NodeInfo, Role

__all__ = ["etcd_server"]   # the module-scoped fixture, used by name


class Member:
    def __init__(self, name: str, server: EtcdServer, prefix: str) -> None:
        self.name = name
        self.steps: list[Step] = []
        self.fence = 0
        self.election = EtcdElection([server.endpoint], prefix, name, f"{name}:1", 1,
                                     self.on_change, poll_s=0.1)
        self.task: asyncio.Task[None] | None = None

    def on_change(self, step: Step, fence: int) -> None:
        self.steps.append(step)
        if step.action is Action.LEAD:
            self.fence = fence

    @property
    def leading(self) -> bool:
        return self.election.election.leading


@contextlib.asynccontextmanager
async def members(server: EtcdServer, prefix: str, n: int) -> AsyncIterator[list[Member]]:
    ms = [Member(f"c{i}", server, prefix) for i in range(n)]
    for m in ms:
        m.task = asyncio.create_task(m.election.run())
    try:
        yield ms
    finally:
        for m in ms:
            if m.task is not None:
                m.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await m.task


async def until(pred: object, timeout_s: float) -> float:
    t0 = time.monotonic()
    while not pred():  # type: ignore[operator]
        assert time.monotonic() - t0 < timeout_s, "not in time"
        await asyncio.sleep(0.05)
    return time.monotonic() - t0


async def test_one_leader_the_others_follow_it(etcd_server: EtcdServer) -> None:
    async with members(etcd_server, "/el-one/", 3) as ms:
        await until(lambda: sum(m.leading for m in ms) == 1 and all(
            m.election.election.leader for m in ms), 10)
        leader = next(m for m in ms if m.leading)
        for m in ms:
            assert m.election.election.leader == f"{leader.name}:1"
        await asyncio.sleep(1.5)   # renewals keep it: still one leader, the same
        assert [m.name for m in ms if m.leading] == [leader.name]
        assert sum(1 for s in leader.steps if s.action is Action.LEAD) == 1


async def test_takeover_after_resign_and_after_a_crash(etcd_server: EtcdServer) -> None:
    async with members(etcd_server, "/el-take/", 2) as ms:
        await until(lambda: sum(m.leading for m in ms) == 1, 10)
        first = next(m for m in ms if m.leading)
        other = next(m for m in ms if m is not first)
        assert first.task is not None
        first.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first.task
        await first.election.resign()                    # a clean shutdown
        took = await until(lambda: other.leading, 5)
        print(f"takeover after a resignation: {took:.2f} s")
        assert took < 2.0
        assert other.fence > first.fence > 0
        # now the new leader crashes: no resignation, its lease must run out
        assert other.task is not None
        other.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await other.task
        third = Member("c9", etcd_server, "/el-take/")
        third.task = asyncio.create_task(third.election.run())
        try:
            await until(lambda: third.election.election.leader == "c1:1"
                        or third.election.election.leader == f"{other.name}:1", 5)
            took = await until(lambda: third.leading, 10)
            print(f"takeover after a crash: {took:.2f} s (lease TTL "
                  f"{third.election.election.ttl_s:.0f} s)")
            assert took <= third.election.election.ttl_s + 2.0
        finally:
            third.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await third.task


async def test_a_deposed_leader_cannot_write(etcd_server: EtcdServer) -> None:
    prefix = "/el-fence/"
    async with members(etcd_server, prefix, 1) as (a,):
        await until(lambda: a.leading, 10)
        old = EtcdStore([etcd_server.endpoint], prefix=prefix)
        old.set_fence(a.fence)
        node = NodeInfo("filter-1", int(Role.FILTER), "default", "127.0.0.1:1")
        old.save_node(node)                                  # leading: written
        assert a.task is not None
        a.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await a.task
        await a.election.resign()
        async with members(etcd_server, prefix, 1) as (b,):
            await until(lambda: b.leading, 10)
            with pytest.raises(FencedError, match="no longer leads"):
                old.save_node(node)
            with pytest.raises(FencedError):
                old.save_sync_requests({"p1": 5})
            new = EtcdStore([etcd_server.endpoint], prefix=prefix)
            new.set_fence(b.fence)
            new.save_sync_requests({"p1": 5})
            assert new.load().sync_requests == {"p1": 5}
            assert [n.id for n in new.load().nodes] == ["filter-1"]
            new.close()
        old.close()


async def test_a_failed_round_is_retried_on_the_next_endpoint_at_once(
        etcd_server: EtcdServer) -> None:
    """The first endpoint refuses: the same round goes on at the next one, instead of
    waiting the poll interval (here 60 s, far beyond the test's patience)."""
    steps: list[Step] = []
    election = EtcdElection(["127.0.0.1:1", etcd_server.endpoint], "/el-next/", "c0",
                            "c0:1", 1, lambda step, fence: steps.append(step), poll_s=60)
    task = asyncio.create_task(election.run())
    try:
        await until(lambda: election.election.leading, 20)
        assert any(s.action is Action.LEAD for s in steps)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
