"""Signed assignments: what the coordinator vouches for, and the checks of a session
against it (docs/SECURITY.md "Signed assignments", proto/cdp/v1/assignment.proto).

Theory of operation: the coordinator turns each assignment into
`AssignmentClaims` (policy, epoch, the four endpoints, encryption, the disks,
retention, and for a consistency group's member its group and members),
serializes them once and signs `CONTEXT || claims` with its Ed25519 key. The
filter passes the `SignedAssignment` on in its hello; each hop verifies it
with the coordinator's public key and, with `check_session`, that the claims
name the hop itself and the peer that called (its certificate identity), and
that what the peer says (policy, epoch, disks, encryption) is what they say.
From then on a hop dials only the addresses of the claims. So a certificate
alone opens nothing: an epoch, a target address or an encryption flag can no
longer be made up, only replayed from a real assignment, and the target fences
an older epoch as before.

With `tls.insecure = true` there are no identities; a node without the public
key then verifies nothing (`Verifier` is None), which the daemons log at start.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from google.protobuf.message import DecodeError

from cdp_common import identity
from cdp_common.errors import ConfigError, NotAuthorizedError
from cdp_common.identity import Identity
from cdp_common.pb.cdp.v1 import assignment_pb2 as apb
from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb

CONTEXT = b"cdp-assignment-v1\0"
SIGNATURE_BYTES = 64
MAX_CLAIMS_BYTES = 1 << 16
_CACHE_MAX = 4096

FILTER, SOURCE_PROXY, TARGET_PROXY, TARGET = (
    identity.FILTER, identity.SOURCE_PROXY, identity.TARGET_PROXY, identity.TARGET)


# ---------------------------------------------------------------- keys

def new_key_pair(private_path: Path, public_path: Path) -> None:
    """Create an Ed25519 key pair (PEM; the private key 0600); refuses to overwrite."""
    for p in (private_path, public_path):
        if p.exists():
            raise ConfigError(f"{p} exists; not overwriting a signing key")
    key = Ed25519PrivateKey.generate()
    fd = _create(private_path, 0o600)
    with open(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    with open(_create(public_path, 0o644), "wb") as f:
        f.write(key.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo))


def _create(path: Path, mode: int) -> int:
    import os
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path} ({exc.strerror})") from None


def load_signer(path: str, what: str = "coordinator.signing_key_file") -> Signer:
    try:
        key = serialization.load_pem_private_key(_read(path, what), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{what}: {path} is not a PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{what}: {path} is not an Ed25519 private key")
    return Signer(key)


def load_verifier(path: str, what: str = "tls.assignment_key_file") -> Verifier:
    try:
        key = serialization.load_pem_public_key(_read(path, what))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{what}: {path} is not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{what}: {path} is not an Ed25519 public key")
    return Verifier(key)


# ---------------------------------------------------------------- sign / verify

class Signer:
    """The coordinator's side: signs claims, each distinct claims once."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self._cache: dict[bytes, bytes] = {}

    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()

    def sign(self, claims: apb.AssignmentClaims) -> apb.SignedAssignment:
        data = claims.SerializeToString(deterministic=True)
        sig = self._cache.get(data)
        if sig is None:
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            sig = self._cache[data] = self._key.sign(CONTEXT + data)
        return apb.SignedAssignment(claims=data, signature=sig)


class Verifier:
    """Every other node's side: the claims of a signed assignment, or NotAuthorizedError."""

    def __init__(self, key: Ed25519PublicKey) -> None:
        self._key = key
        self._seen: dict[tuple[bytes, bytes], apb.AssignmentClaims] = {}

    def verify(self, signed: apb.SignedAssignment, where: str) -> apb.AssignmentClaims:
        if not signed.claims and not signed.signature:
            raise NotAuthorizedError(f"{where}: no signed assignment (a session needs the "
                                     "coordinator's signed assignment)")
        key = (signed.claims, signed.signature)
        cached = self._seen.get(key)
        if cached is not None:
            return cached
        if len(signed.signature) != SIGNATURE_BYTES or len(signed.claims) > MAX_CLAIMS_BYTES:
            raise NotAuthorizedError(f"{where}: malformed signed assignment")
        try:
            self._key.verify(signed.signature, CONTEXT + signed.claims)
        except InvalidSignature:
            raise NotAuthorizedError(f"{where}: the assignment's signature does not verify "
                                     "(not signed by this deployment's coordinator)") from None
        claims = apb.AssignmentClaims()
        try:
            claims.ParseFromString(signed.claims)
        except DecodeError:
            raise NotAuthorizedError(f"{where}: signed claims do not decode") from None
        if len(self._seen) >= _CACHE_MAX:
            self._seen.clear()
        self._seen[key] = claims
        return claims


def load_optional_verifier(path: str, insecure: bool) -> Verifier | None:
    """The node's verifier: required with TLS, optional (None when unset) when insecure."""
    if not path:
        if not insecure:
            raise ConfigError("tls.assignment_key_file: required unless tls.insecure = true "
                              "(the coordinator's public key: `cdpctl pki signing-key`)")
        return None
    return load_verifier(path)


# ---------------------------------------------------------------- session checks

def peer_of(context: Any) -> Identity | None:
    """The caller's certificate identity (None: plaintext); a malformed one is refused."""
    try:
        return identity.peer_identity(context)
    except identity.IdentityError as exc:
        raise NotAuthorizedError(f"the peer's certificate: {exc}") from None


def _named(claims: apb.AssignmentClaims, role: str) -> tuple[str, str]:
    """(node id, address) the claims name for `role`."""
    return {
        FILTER: (claims.filter_id, claims.filter_address),
        SOURCE_PROXY: (claims.source_proxy_id, claims.source_proxy_address),
        TARGET_PROXY: (claims.target_proxy_id, claims.target_proxy_address),
        TARGET: (claims.target_id, claims.target_address),
    }[role]


def check_session(claims: apb.AssignmentClaims, *, where: str, policy: str, epoch: int,
                  me: tuple[str, str], peer: Identity | None, peer_role: str) -> None:
    """The claims are for `policy` at `epoch`, name this node (`me` = (role, id)) and
    the calling peer in `peer_role` (skipped when there is no identity: insecure)."""
    if claims.policy != policy:
        raise NotAuthorizedError(f"{where}: the signed assignment is for policy "
                                 f"{claims.policy!r}, not {policy!r}")
    if claims.epoch != epoch:
        raise NotAuthorizedError(f"{where}: epoch {epoch} is not the signed assignment's "
                                 f"({claims.epoch})")
    role, node_id = me
    named, _ = _named(claims, role)
    if named != node_id:
        raise NotAuthorizedError(f"{where}: the assignment of {policy} epoch {epoch} names "
                                 f"{role} {named or '(none)'}, not this node ({node_id})")
    if peer is None:
        return
    named_peer, _ = _named(claims, peer_role)
    if peer.id != named_peer or not peer.acts_as(peer_role):
        raise NotAuthorizedError(f"{where}: {peer} is not the {peer_role} of {policy} epoch "
                                 f"{epoch} ({named_peer or 'none'})")


def check_apply(verifier: Verifier | None, node_id: str, policy: str, epoch: int,
                signed: apb.SignedAssignment, disks: Iterable[tuple[int, int]],
                context: Any) -> None:
    """The target's check of an Apply open: signed, names this target and the calling
    target proxy, epoch and disks as claimed (nothing checked without a verifier)."""
    if verifier is None:
        return
    where = f"apply open for {policy}"
    claims = verifier.verify(signed, where)
    check_session(claims, where=where, policy=policy, epoch=epoch, me=(TARGET, node_id),
                  peer=peer_of(context), peer_role=TARGET_PROXY)
    check_disks(claims, disks, where)


def check_assignment(verifier: Verifier, a: cpb.Assignment, node_id: str,
                     role: str = FILTER) -> None:
    """A node's check of an assignment the coordinator sent it (the filter's before it
    ships, the target's before it creates a store or applies a retention): signed,
    naming this node in `role` (or unassigned), and every field the node acts on
    (endpoints, epoch, encryption, disks, retention, group and its members, the
    freeze, the verification schedule) is the claims'. So a node
    posing as the coordinator cannot point a filter's writes elsewhere or expire a
    target's restore points."""
    where = f"assignment of {a.policy} epoch {a.epoch}"
    claims = verifier.verify(a.signed, where)
    plain = (a.policy, a.epoch, a.filter.node_id, a.source_proxy.node_id,
             a.source_proxy.address, a.target_proxy.node_id, a.target_proxy.address,
             a.target.node_id, a.target.address, a.encryption, a.short_term_retention_s,
             a.long_term_interval_s, a.long_term_retention_s,
             sorted((d.disk_id, d.filter, d.name, d.size_bytes) for d in a.disks),
             a.group, list(a.group_members), a.frozen, a.verify_every_s)
    signed = (claims.policy, claims.epoch, claims.filter_id, claims.source_proxy_id,
              claims.source_proxy_address, claims.target_proxy_id,
              claims.target_proxy_address, claims.target_id, claims.target_address,
              claims.encryption, claims.short_term_retention_s, claims.long_term_interval_s,
              claims.long_term_retention_s,
              sorted((d.disk_id, d.filter, d.name, d.size_bytes) for d in claims.disks),
              claims.group, list(claims.group_members), claims.frozen,
              claims.verify_every_s)
    if plain != signed:
        raise NotAuthorizedError(f"{where}: its fields differ from its signed claims")
    named = _named(claims, role)[0]
    if named not in ("", node_id):   # "": unassigned, for every node
        raise NotAuthorizedError(f"{where}: names {role} {named!r}, not {node_id}")


class AssignmentGate:
    """A node's filter over the assignment sets the coordinator pushes: `admits(a)` is
    `check_assignment` as a yes/no that logs the first refusal of each policy and epoch
    (sets arrive every change; one line per forgery is enough). Without a verifier
    (insecure) every assignment is admitted."""

    def __init__(self, verifier: Verifier | None, node_id: str, role: str,
                 log: logging.Logger) -> None:
        self.verifier, self.node_id, self.role, self.log = verifier, node_id, role, log
        self._refused: dict[str, int] = {}

    def admits(self, a: cpb.Assignment) -> bool:
        if self.verifier is None:
            return True
        try:
            check_assignment(self.verifier, a, self.node_id, self.role)
        except NotAuthorizedError as exc:
            if self._refused.get(a.policy) != a.epoch:
                self._refused[a.policy] = a.epoch
                self.log.error("ignoring an assignment: %s", exc, extra={"policy": a.policy})
            return False
        self._refused.pop(a.policy, None)
        return True


def check_disks(claims: apb.AssignmentClaims, disks: Iterable[tuple[int, int]],
                where: str) -> None:
    """The (disk_id, size_bytes) a peer sends are exactly the claims' disks."""
    claimed = sorted((d.disk_id, d.size_bytes) for d in claims.disks)
    if sorted(disks) != claimed:
        raise NotAuthorizedError(f"{where}: the disks do not match the signed assignment of "
                                 f"{claims.policy} ({claimed})")


def address_of(claims: apb.AssignmentClaims, role: str) -> str:
    """The address the claims give `role` (the only one a hop may dial)."""
    return _named(claims, role)[1]
