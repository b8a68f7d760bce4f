"""cdpctl's one way to call the coordinator: a channel per call, gRPC errors as CdpErrors.

Theory of operation
-------------------
A cdpctl command makes one or two unary calls, so `call` opens a channel,
runs `fn(stub)` and closes it again. The address may be a comma-separated
list of coordinators (a leader and its standbys, `--coordinator a:1,b:2`):
the call goes to the first; a failure to reach it (UNAVAILABLE,
DEADLINE_EXCEEDED) moves on to the leader that a standby named in its
`cdp-leader` trailer, else to the next address. A standby answers read-only
calls itself, marked `cdp-standby`; such an answer is kept only when the
leader it names cannot be reached, because the leader's view is the live one.
A failed call becomes an error on the documented exit-code scale:

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
from typing import Any, TypeVar

import grpc

from cdp_common import rpc
from cdp_common.errors import CdpError, CoordinatorUnreachable, NotAuthorizedError
from cdp_common.pb.cdp.v1 import coordinator_pb2_grpc as cgrpc
from cdpctl.resolve import Coordinator
from cdpctl.state import UsageError

T = TypeVar("T")

_REFUSED = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
            grpc.StatusCode.FAILED_PRECONDITION)
_FOLLOW = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
LEADER_KEY = "cdp-leader"     # cdp_common.coordclient.LEADER_KEY (not imported: grpc.aio)
STANDBY_KEY = "cdp-standby"
MAX_TRIES = 8


def addresses(coord: Coordinator) -> list[str]:
    """The coordinator addresses `coord.address` lists (comma-separated), in order."""
    out: list[str] = []
    for part in coord.address.split(","):
        part = part.strip()
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UsageError(f"{coord.source}: expected HOST:PORT[,HOST:PORT...], "
                             f"got {coord.address!r}")
        if part not in out:
            out.append(part)
    return out


def _value(metadata: Any, key: str) -> str:
    for item in metadata or ():
        k, v = (item[0], item[1]) if isinstance(item, tuple) else (item.key, item.value)
        if k == key:
            return v.decode() if isinstance(v, bytes) else str(v)
    return ""


class _Trailers(grpc.UnaryUnaryClientInterceptor):
    """Keeps the trailing metadata of the last unary call (a standby's marks)."""

    def __init__(self) -> None:
        self.metadata: Any = ()

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        outcome = continuation(details, request)
        try:
            self.metadata = outcome.trailing_metadata()
        except Exception:  # no trailers: no standby mark
            self.metadata = ()
        return outcome


def call(coord: Coordinator, fn: Callable[[cgrpc.CoordinatorStub], T], *,
         refusals: bool = True) -> T:
    """`fn(stub)` on a fresh channel to the leader among `coord`'s addresses; gRPC
    failures mapped as the module says."""
    queue = addresses(coord)
    tried: list[str] = []
    standby: list[T] = []
    last: grpc.RpcError | None = None
    last_address = queue[0]
    while queue and len(tried) < MAX_TRIES:
        address = queue.pop(0)
        if address in tried:
            continue
        tried.append(address)
        trailers = _Trailers()
        channel = rpc.sync_channel(address, coord.tls)
        try:
            result = fn(cgrpc.CoordinatorStub(grpc.intercept_channel(channel, trailers)))
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            if code not in _FOLLOW:
                raise error(coord, exc, refusals=refusals, address=address) from None
            last, last_address = exc, address
            leader = _value(exc.trailing_metadata() if isinstance(exc, grpc.Call) else (),
                            LEADER_KEY)
            if leader and leader not in tried:
                queue.insert(0, leader)
            continue
        finally:
            channel.close()
        leader = _value(trailers.metadata, LEADER_KEY)
        if _value(trailers.metadata, STANDBY_KEY) and leader and leader not in tried:
            standby[:] = [result]     # a standby's view: the leader's is better
            queue.insert(0, leader)
            continue
        return result
    if standby:
        return standby[0]
    assert last is not None
    raise error(coord, last, refusals=refusals, address=last_address) from None


def error(coord: Coordinator, exc: grpc.RpcError, *, refusals: bool = True,
          address: str = "") -> CdpError:
    """The CdpError a failed coordinator call stands for (see the module docstring)."""
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    where = address or coord.address
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return NotAuthorizedError(f"coordinator at {where}: {details}")
    if refusals and code == grpc.StatusCode.INVALID_ARGUMENT:
        return UsageError(details)
    if refusals and code in _REFUSED:
        return CdpError(details)
    name = code.name if code is not None else "error"
    return CoordinatorUnreachable(
        f"coordinator at {coord.address} ({coord.source}) unreachable: {name}: {details}")
