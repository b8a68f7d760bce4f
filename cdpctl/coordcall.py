"""cdpctl's one way to call the coordinator: a channel per call, gRPC errors as CdpErrors.

Theory of operation
-------------------
A cdpctl command makes one or two unary calls, so `call` opens a channel,
runs `fn(stub)` and closes it again. A failed call becomes an error on the
documented exit-code scale:

    PERMISSION_DENIED                              NotAuthorizedError (5): this
                                                   certificate may not do that (always)
    INVALID_ARGUMENT                               UsageError (64): a field the
                                                   coordinator rejected, named in details
    NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION CdpError (2): the coordinator
                                                   answered and refused
    anything else                                  CoordinatorUnreachable (3)

With `refusals=False` every failure is "unreachable": for a query such as
GetStatus, any failure means there is no answer to judge.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import grpc

from cdp_common import rpc
from cdp_common.errors import CdpError, CoordinatorUnreachable, NotAuthorizedError
from cdp_common.pb.cdp.v1 import coordinator_pb2_grpc as cgrpc
from cdpctl.resolve import Coordinator
from cdpctl.state import UsageError

T = TypeVar("T")

_REFUSED = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
            grpc.StatusCode.FAILED_PRECONDITION)


def call(coord: Coordinator, fn: Callable[[cgrpc.CoordinatorStub], T], *,
         refusals: bool = True) -> T:
    """`fn(stub)` on a fresh channel to `coord`; gRPC failures mapped as the module says."""
    channel = rpc.sync_channel(coord.address, coord.tls)
    try:
        return fn(cgrpc.CoordinatorStub(channel))
    except grpc.RpcError as exc:
        raise error(coord, exc, refusals=refusals) from None
    finally:
        channel.close()


def error(coord: Coordinator, exc: grpc.RpcError, *, refusals: bool = True) -> CdpError:
    """The CdpError a failed coordinator call stands for (see the module docstring)."""
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return NotAuthorizedError(f"coordinator at {coord.address}: {details}")
    if refusals and code == grpc.StatusCode.INVALID_ARGUMENT:
        return UsageError(details)
    if refusals and code in _REFUSED:
        return CdpError(details)
    name = code.name if code is not None else "error"
    return CoordinatorUnreachable(
        f"coordinator at {coord.address} ({coord.source}) unreachable: {name}: {details}")
