"""A proxy's checks of a session against its signed assignment (cdp_common.assignsig).

Theory of operation: a hello (source role), a session open (target role) or
a digest request arrives with the coordinator's signed assignment. With a
verifier (always, unless tls.insecure without the public key), the proxy
verifies the signature, checks that the claims name this proxy and the
calling peer, and that the policy, epoch, disks and encryption flag the peer
sent are the claims'; then it overwrites every address in the message with
the claims' addresses, so whatever the proxy dials next was chosen by the
coordinator, never by the client. Any mismatch is NotAuthorizedError
(PERMISSION_DENIED) before anything is dialled or forwarded.
"""

from __future__ import annotations

import contextlib
from typing import Any

from google.protobuf.message import DecodeError

from cdp_common import assignsig, identity
from cdp_common.assignsig import Verifier
from cdp_common.errors import FencedError, NotAuthorizedError
from cdp_common.pb.cdp.v1 import assignment_pb2 as apb
from cdp_common.pb.cdp.v1 import replication_pb2 as rpb


class EpochFloor:
    """The newest verified epoch per policy this proxy has served: an older signed
    assignment (replayed by a node it still names) opens nothing here."""

    def __init__(self) -> None:
        self._newest: dict[str, int] = {}

    def admit(self, policy: str, epoch: int, where: str) -> None:
        newest = self._newest.get(policy, 0)
        if epoch < newest:
            raise FencedError(f"{where}: epoch {epoch} is older than epoch {newest} "
                              "already served here")
        self._newest[policy] = epoch


def _check(verifier: Verifier, signed: apb.SignedAssignment, *, where: str, policy: str,
           epoch: int, me: tuple[str, str], context: Any, peer_role: str,
           disks: list[rpb.DiskInfo], encryption: bool) -> apb.AssignmentClaims:
    claims = verifier.verify(signed, where)
    assignsig.check_session(claims, where=where, policy=policy, epoch=epoch, me=me,
                            peer=assignsig.peer_of(context), peer_role=peer_role)
    assignsig.check_disks(claims, ((d.disk_id, d.size_bytes) for d in disks), where)
    if encryption != claims.encryption:
        raise NotAuthorizedError(f"{where}: encryption {'on' if encryption else 'off'} but "
                                 f"the policy's signed assignment says "
                                 f"{'on' if claims.encryption else 'off'} (no downgrade)")
    return claims


def bind_hello(verifier: Verifier | None, node_id: str, hello: rpb.ShipHello,
               context: Any, epochs: EpochFloor | None = None) -> apb.AssignmentClaims:
    """Source role: check a filter's hello; point it at the claims' target proxy and
    target. Returns the claims (unverified, as sent, when there is no verifier)."""
    if verifier is None:
        unchecked = apb.AssignmentClaims()
        with contextlib.suppress(DecodeError):
            unchecked.ParseFromString(hello.assignment.claims)
        return unchecked
    claims = _check(verifier, hello.assignment, where=f"hello for {hello.policy}",
                    policy=hello.policy, epoch=hello.epoch,
                    me=(identity.SOURCE_PROXY, node_id), context=context,
                    peer_role=identity.FILTER, disks=list(hello.disks),
                    encryption=hello.encryption)
    if epochs is not None:
        epochs.admit(hello.policy, claims.epoch, f"hello for {hello.policy}")
    hello.target_proxy_id = claims.target_proxy_id
    hello.target_proxy_address = claims.target_proxy_address
    hello.target_address = claims.target_address
    return claims


def bind_open(verifier: Verifier | None, node_id: str, o: rpb.SessionOpen,
              context: Any, epochs: EpochFloor | None = None) -> None:
    """Target role: check a source proxy's session open; point it at the claims' target."""
    if verifier is None:
        return
    claims = _check(verifier, o.assignment, where=f"session open for {o.policy}",
                    policy=o.policy, epoch=o.epoch, me=(identity.TARGET_PROXY, node_id),
                    context=context, peer_role=identity.SOURCE_PROXY, disks=list(o.disks),
                    encryption=o.encryption)
    if epochs is not None:
        epochs.admit(o.policy, claims.epoch, f"session open for {o.policy}")
    if o.target_address != claims.target_address:
        raise NotAuthorizedError(f"session open for {o.policy}: target {o.target_address} "
                                 f"is not the signed assignment's ({claims.target_address})")


def bind_digests(verifier: Verifier | None, node_id: str, req: rpb.DigestRequest,
                 context: Any, role: str) -> None:
    """Either role: a digest request is relayed only to the claims' next hop."""
    if verifier is None:
        return
    where = f"digest request for {req.policy}"
    claims = verifier.verify(req.assignment, where)
    peer_role = identity.FILTER if role == identity.SOURCE_PROXY else identity.SOURCE_PROXY
    assignsig.check_session(claims, where=where, policy=req.policy, epoch=claims.epoch,
                            me=(role, node_id), peer=assignsig.peer_of(context),
                            peer_role=peer_role)
    req.target_proxy_address = claims.target_proxy_address
    req.target_address = claims.target_address
