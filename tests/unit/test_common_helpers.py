"""The shared helpers of cdp_common: the bound logger, in_thread, cancel_and_wait, names."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from cdp_common.aio import cancel_and_wait, in_thread
from cdp_common.log import bound
from cdp_common.names import is_name

pytestmark = pytest.mark.timeout(30)


def test_bound_logger_adds_its_fields(caplog: pytest.LogCaptureFixture) -> None:
    logger = bound(logging.getLogger("test.bound"), policy="p1", node="filter-1")
    with caplog.at_level(logging.INFO, "test.bound"):
        logger.info("hello", extra={"seq": 7, "node": "other"})
    (rec,) = caplog.records
    assert (rec.policy, rec.seq, rec.node) == ("p1", 7, "other")  # type: ignore[attr-defined]


async def test_in_thread_waits_for_the_thread_when_cancelled() -> None:
    started, release, finished = threading.Event(), threading.Event(), threading.Event()

    def work() -> None:
        started.set()
        release.wait(5)
        finished.set()

    task = asyncio.ensure_future(in_thread(work))
    await asyncio.to_thread(started.wait, 5)
    task.cancel()
    await asyncio.sleep(0.05)
    assert not task.done()            # still waiting for the thread
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert finished.is_set()


async def test_cancel_and_wait_ends_every_task() -> None:
    async def forever() -> None:
        await asyncio.Event().wait()

    async def fails() -> None:
        raise RuntimeError("boom")

    a, b = asyncio.create_task(forever()), asyncio.create_task(fails())
    await asyncio.sleep(0)
    await cancel_and_wait(a, b, None)
    assert a.cancelled() and b.done()


@pytest.mark.parametrize(("name", "ok"), [
    ("filter-1", True), ("p.db_2", True), ("a" * 64, True), ("a" * 65, False),
    ("", False), ("-x", False), ("x\n", False), ("x y", False), ("x/y", False),
])
def test_names(name: str, ok: bool) -> None:
    assert is_name(name) is ok
