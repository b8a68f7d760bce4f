"""asyncio helpers every component uses.

Why `in_thread` and not plain `asyncio.to_thread`: when the awaiting task is
cancelled, to_thread returns at once while the thread keeps running, so the
next caller could start a second blocking call on the same object (two
threads on one policy's receive path). `in_thread` lets a cancelled caller go
only once its thread is done.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run blocking `fn` in a thread; if cancelled, wait for the thread before re-raising
    (so a cancelled caller never leaves a half-done write running behind its back)."""
    fut = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        await asyncio.wait({fut})
        raise


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel every live task and wait until each has ended (errors are the task's own)."""
    live = [t for t in tasks if t is not None and not t.done()]
    for t in live:
        t.cancel()
    for t in live:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await t
