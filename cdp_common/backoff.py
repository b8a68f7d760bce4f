"""One reconnect backoff for every loop that talks to a peer.

Transient failures (`CdpError.transient`, `RemoteError` from a transient gRPC
code) are retried after a delay that doubles from `first_s` to `max_s`;
`reset()` after a success. A permanent failure (a bad key, a fenced epoch, an
invalid request) is not retried fast: the loop gives up on it for `hold_s`
(or until something it waits on changes, e.g. a new assignment) and says so
in its status. A small jitter keeps many nodes from reconnecting in step.
"""

from __future__ import annotations

import asyncio
import contextlib
import random

from cdp_common.errors import CdpError


def is_transient(exc: BaseException) -> bool:
    """Whether retrying may cure `exc`: a CdpError says so; anything else is not ours."""
    return exc.transient if isinstance(exc, CdpError) else False


class Backoff:
    def __init__(self, first_s: float = 0.2, max_s: float = 2.0, hold_s: float = 10.0,
                 jitter: float = 0.1, rand: random.Random | None = None) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self.hold_s = hold_s
        self.jitter = jitter
        self._next = first_s
        self._rand = rand or random.Random()

    def reset(self) -> None:
        self._next = self.first_s

    def delay(self, transient: bool = True) -> float:
        """The wait before the next attempt; a transient failure also grows the next one."""
        if not transient:
            base = max(self.hold_s, self.max_s)
        else:
            base = self._next
            self._next = min(self._next * 2, self.max_s)
        return base * (1 + self.jitter * (2 * self._rand.random() - 1))

    def delay_for(self, exc: BaseException) -> float:
        return self.delay(is_transient(exc))

    async def wait(self, transient: bool = True, wake: asyncio.Event | None = None) -> None:
        """Sleep `delay(transient)`, or less if `wake` is set meanwhile."""
        delay = self.delay(transient)
        if wake is None:
            await asyncio.sleep(delay)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), delay)
