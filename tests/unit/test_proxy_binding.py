"""cdp_proxy.binding: the newest verified epoch per policy fences older assignments."""

from __future__ import annotations

import pytest

from cdp_common.errors import FencedError
from cdp_proxy.binding import EpochFloor


def test_an_older_epoch_is_fenced_per_policy() -> None:
    floor = EpochFloor()
    floor.admit("a", 3, "t")
    floor.admit("a", 3, "t")        # the same epoch reconnects
    floor.admit("b", 1, "t")        # policies are separate
    with pytest.raises(FencedError, match="epoch 2 is older than epoch 3"):
        floor.admit("a", 2, "t")
    floor.admit("a", 4, "t")        # a rebind
    with pytest.raises(FencedError):
        floor.admit("a", 3, "t")
