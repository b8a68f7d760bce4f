"""How `cdpctl restore` names a failed call to the target: the link down is
"unreachable"; the target answering with its own failure (a read-only or full
restore dir) is that failure, not an unreachable target."""

from __future__ import annotations

from typing import Any

import grpc

from cdp_common import rpc
from cdpctl.targetcall import TargetClient


class Failed(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    def __init__(self, code: grpc.StatusCode, details: str, answered: bool) -> None:
        self._code, self._details = code, details
        self._trailer = rpc.answered_trailer() if answered else ()

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Any:
        return self._trailer

    def initial_metadata(self) -> Any:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> None:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Any) -> bool:
        return False


def client() -> TargetClient:
    c = TargetClient.__new__(TargetClient)
    c.address = "10.0.0.9:7004"
    return c


def test_the_link_down_is_unreachable() -> None:
    err = client()._error("restore", Failed(grpc.StatusCode.UNAVAILABLE, "connect failed",
                                            answered=False))
    assert "unreachable" in str(err) and "10.0.0.9:7004" in str(err)


def test_the_targets_own_failure_is_not_unreachable() -> None:
    err = client()._error("restore", Failed(grpc.StatusCode.UNAVAILABLE,
                                            "/srv/restore: Read-only file system",
                                            answered=True))
    assert "unreachable" not in str(err)
    assert str(err) == ("target at 10.0.0.9:7004 failed (restore): "
                        "/srv/restore: Read-only file system")
