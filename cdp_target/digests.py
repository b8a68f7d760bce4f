"""`Target.GetDigests`: region digests of a policy's replica (digest sync).

Theory of operation: the filter of a policy compares its image with the
replica region by region (cdp_filter/sync.py) and resends only the regions
that differ. This serves the replica's side: the requested range is cut into
replies of REPLY_REGIONS regions; each reply is computed in a worker thread
while apply is held still (`PolicyStore.paused`), so it describes the replica
at one applied seq (reported in the reply). Between replies apply goes on.

Why any applied seq is good enough: every write after the applied seq is in
a durable delta or in the filter's journal and will reach the replica in seq
order, so a region equal to the replica's now stays equal once they are
applied; a region that differs is resent from the image, later in the
stream than anything it overwrites.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

import grpc

from cdp_common import digest, rpc
from cdp_common.aio import in_thread
from cdp_common.errors import (
    CdpError,
    InvalidRequestError,
    NotFoundError,
    UnavailableError,
)
from cdp_common.pb.cdp.v1 import replication_pb2 as rpb
from cdp_target.store import PolicyStore

log = logging.getLogger("target.digests")

REPLY_REGIONS = 16


def _range(req: rpb.DigestRequest, size: int) -> tuple[int, int] | str:
    """(start, end) of the request, or why it is invalid."""
    why = digest.check_region_bytes(req.region_bytes)
    if why:
        return why
    if req.algorithm not in ("", digest.ALGORITHM):
        return f"unknown digest algorithm {req.algorithm!r} (only {digest.ALGORITHM})"
    if req.offset % req.region_bytes:
        return f"offset {req.offset} is not a multiple of region_bytes {req.region_bytes}"
    if req.offset > size:
        return f"offset {req.offset} is past the end of the disk ({size} bytes)"
    end = size if req.length == 0 else min(size, req.offset + req.length)
    return req.offset, end


def _one_reply(store: PolicyStore, disk_id: int, start: int, end: int, size: int,
               region: int) -> rpb.DigestReply:
    with store.paused():
        fd = store.fds[disk_id]
        applied = store.state.applied_seq
        regions = list(digest.digests(fd, size, start, end, region))
    return rpb.DigestReply(disk_id=disk_id, offset=start, region_bytes=region,
                           count=len(regions), digests=b"".join(r.digest for r in regions),
                           applied_seq=applied, hole_regions=sum(r.hole for r in regions))


async def serve(store_of: Callable[[str], PolicyStore | None], req: rpb.DigestRequest,
                context: grpc.aio.ServicerContext) -> AsyncIterator[rpb.DigestReply]:
    """`store_of(policy)`: the policy's local store, None when there is none."""
    try:
        found = store_of(req.policy)
    except CdpError as exc:
        await rpc.abort(context, UnavailableError(f"policy {req.policy}: {exc}"))
    if found is None:
        await rpc.abort(context, NotFoundError(f"policy {req.policy!r}: no replica here"))
    store = found
    sizes = store.disk_sizes
    if req.disk_id not in sizes:
        await rpc.abort(context, NotFoundError(f"policy {req.policy}: no disk {req.disk_id}"))
    size = sizes[req.disk_id]
    rng = _range(req, size)
    if isinstance(rng, str):
        await rpc.abort(context, InvalidRequestError(f"policy {req.policy}: {rng}"))
    assert not isinstance(rng, str)
    pos, end = rng
    step = REPLY_REGIONS * req.region_bytes
    while pos < end:
        nxt = min(end, pos + step)
        try:
            reply = await in_thread(_one_reply, store, req.disk_id, pos, nxt, size,
                                    req.region_bytes)
        except (CdpError, OSError) as exc:
            log.warning("digests failed: %s", exc, extra={"policy": req.policy})
            await rpc.abort(context, UnavailableError(f"policy {req.policy}: {exc}"))
        yield reply
        pos = nxt
