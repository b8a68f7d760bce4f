"""Blocking calls from asyncio code: `in_thread`.

Why not plain `asyncio.to_thread`: when the awaiting task is cancelled,
to_thread returns at once while the thread keeps running, so the next caller
could start a second blocking call on the same object (two threads on one
policy's receive path). `in_thread` lets a cancelled caller go only once its
thread is done.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run blocking `fn` in a thread; if cancelled, wait for the thread before re-raising."""
    fut = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        await asyncio.wait({fut})
        raise
