"""cdp_common.assignsig: the signed-assignment codec and the session checks."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from cdp_common import assignsig
from cdp_common.assignsig import Signer, Verifier
from cdp_common.errors import ConfigError, NotAuthorizedError
from cdp_common.identity import Identity
from cdp_common.pb.cdp.v1 import assignment_pb2 as apb
from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb

KEY = Ed25519PrivateKey.generate()
TARGET_PROXY = Identity("target-proxy", "tp-1")
SIGNER = Signer(KEY)


def verifier() -> Verifier:
    return Verifier(KEY.public_key())


def claims(policy: str = "lab", epoch: int = 3, encryption: bool = True) -> apb.AssignmentClaims:
    return apb.AssignmentClaims(
        policy=policy, epoch=epoch, filter_id="filter-1", filter_address="192.0.2.1:1",
        source_proxy_id="sp-1", source_proxy_address="192.0.2.2:2",
        target_proxy_id="tp-1", target_proxy_address="198.51.100.3:3",
        target_id="target-1", target_address="198.51.100.4:4", encryption=encryption,
        disks=[apb.ClaimedDisk(disk_id=0, filter="filter-1", name="disk0", size_bytes=1 << 20)])


def check(c: apb.AssignmentClaims, *, policy: str = "lab", epoch: int = 3,
          me: tuple[str, str] = ("target", "target-1"),
          peer: Identity | None = TARGET_PROXY,
          peer_role: str = "target-proxy") -> None:
    assignsig.check_session(c, where="t", policy=policy, epoch=epoch, me=me, peer=peer,
                            peer_role=peer_role)


def test_round_trip_and_the_checks_that_pass() -> None:
    signed = SIGNER.sign(claims())
    got = verifier().verify(signed, "t")
    assert got == claims()
    check(got)
    check(got, me=("source-proxy", "sp-1"), peer=Identity("filter", "filter-1"),
          peer_role="filter")
    check(got, peer=Identity("proxy", "tp-1"))       # a proxy with role both
    check(got, peer=None)                             # insecure: no identity to check
    assignsig.check_disks(got, [(0, 1 << 20)], "t")
    assert assignsig.address_of(got, "target") == "198.51.100.4:4"


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_tampered_byte_is_refused(data: st.DataObject) -> None:
    signed = SIGNER.sign(claims())
    field = data.draw(st.sampled_from(["claims", "signature"]))
    raw = bytearray(getattr(signed, field))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= data.draw(st.integers(1, 255))
    tampered = apb.SignedAssignment()
    tampered.CopyFrom(signed)
    setattr(tampered, field, bytes(raw))
    with pytest.raises(NotAuthorizedError):
        verifier().verify(tampered, "t")


@given(st.binary(max_size=200), st.binary(max_size=80))
def test_garbage_never_verifies(claims_bytes: bytes, sig: bytes) -> None:
    with pytest.raises(NotAuthorizedError):
        verifier().verify(apb.SignedAssignment(claims=claims_bytes, signature=sig), "t")


def test_wrong_key_missing_and_cut_signatures_are_refused() -> None:
    other = Signer(Ed25519PrivateKey.generate()).sign(claims())
    with pytest.raises(NotAuthorizedError, match="does not verify"):
        verifier().verify(other, "t")
    with pytest.raises(NotAuthorizedError, match="no signed assignment"):
        verifier().verify(apb.SignedAssignment(), "t")
    signed = SIGNER.sign(claims())
    with pytest.raises(NotAuthorizedError, match="malformed"):
        verifier().verify(apb.SignedAssignment(claims=signed.claims,
                                               signature=signed.signature[:-1]), "t")


def test_the_key_signs_nothing_but_assignments() -> None:
    """A signature over the bare claims (no context prefix) is not an assignment's."""
    data = claims().SerializeToString(deterministic=True)
    with pytest.raises(NotAuthorizedError):
        verifier().verify(apb.SignedAssignment(claims=data, signature=KEY.sign(data)), "t")


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"policy": "other"}, "is for policy 'lab'"),                     # replay into a policy
    ({"epoch": 2}, "is not the signed assignment's"),                 # stale epoch
    ({"epoch": 2**63}, "is not the signed assignment's"),             # forged epoch
    ({"me": ("target", "target-2")}, "not this node"),                # another target
    ({"peer": Identity("filter", "filter-1")}, "is not the target-proxy"),
    ({"peer": Identity("target-proxy", "tp-9")}, "is not the target-proxy"),
    ({"peer": Identity("source-proxy", "tp-1")}, "is not the target-proxy"),  # wrong role
])
def test_sessions_the_claims_do_not_name_are_refused(kwargs: dict[str, object],
                                                     needle: str) -> None:
    got = verifier().verify(SIGNER.sign(claims()), "t")
    with pytest.raises(NotAuthorizedError, match=needle):
        check(got, **kwargs)  # type: ignore[arg-type]


def test_other_disks_are_refused() -> None:
    got = verifier().verify(SIGNER.sign(claims()), "t")
    for disks in ([(0, 2 << 20)], [(0, 1 << 20), (1, 1 << 20)], []):
        with pytest.raises(NotAuthorizedError, match="disks do not match"):
            assignsig.check_disks(got, disks, "t")


def test_check_apply_without_a_verifier_checks_nothing() -> None:
    assignsig.check_apply(None, "target-1", "lab", 9, apb.SignedAssignment(), [], object())


def test_key_files(tmp_path: Path) -> None:
    private, public = tmp_path / "a.key", tmp_path / "a.pub"
    assignsig.new_key_pair(private, public)
    assert private.stat().st_mode & 0o777 == 0o600
    signer, ver = assignsig.load_signer(str(private)), assignsig.load_verifier(str(public))
    assert ver.verify(signer.sign(claims()), "t") == claims()
    with pytest.raises(ConfigError, match="not overwriting"):
        assignsig.new_key_pair(private, tmp_path / "b.pub")
    with pytest.raises(ConfigError, match="not a PEM public key"):
        assignsig.load_verifier(str(private))
    with pytest.raises(ConfigError, match="cannot read"):
        assignsig.load_signer(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="required unless tls"):
        assignsig.load_optional_verifier("", insecure=False)
    assert assignsig.load_optional_verifier("", insecure=True) is None


def _assignment() -> cpb.Assignment:
    c = claims()
    return cpb.Assignment(
        policy=c.policy, epoch=c.epoch, encryption=c.encryption, signed=SIGNER.sign(c),
        filter=cpb.Endpoint(node_id=c.filter_id, address=c.filter_address),
        source_proxy=cpb.Endpoint(node_id=c.source_proxy_id, address=c.source_proxy_address),
        target_proxy=cpb.Endpoint(node_id=c.target_proxy_id, address=c.target_proxy_address),
        target=cpb.Endpoint(node_id=c.target_id, address=c.target_address),
        disks=[cpb.PolicyDisk(disk_id=d.disk_id, filter=d.filter, name=d.name,
                              size_bytes=d.size_bytes) for d in c.disks])


def test_a_filter_acts_only_on_the_coordinators_assignments() -> None:
    """A node posing as the coordinator cannot point a filter's writes elsewhere."""
    assignsig.check_assignment(verifier(), _assignment(), "filter-1")
    moved = _assignment()
    moved.source_proxy.address = "203.0.113.66:1"
    with pytest.raises(NotAuthorizedError, match="differ from its signed claims"):
        assignsig.check_assignment(verifier(), moved, "filter-1")
    unsigned = _assignment()
    unsigned.ClearField("signed")
    with pytest.raises(NotAuthorizedError, match="no signed assignment"):
        assignsig.check_assignment(verifier(), unsigned, "filter-1")
    with pytest.raises(NotAuthorizedError, match="names filter 'filter-1', not filter-2"):
        assignsig.check_assignment(verifier(), _assignment(), "filter-2")
    thawed = _assignment()   # a forged freeze (or thaw) of production's writes
    thawed.frozen = True
    with pytest.raises(NotAuthorizedError, match="differ from its signed claims"):
        assignsig.check_assignment(verifier(), thawed, "filter-1")


def test_a_target_takes_no_retention_the_coordinator_did_not_sign() -> None:
    """A forged retention of seconds would expire every restore point but the newest."""
    assignsig.check_assignment(verifier(), _assignment(), "target-1", "target")
    short = _assignment()
    short.short_term_retention_s = 2
    with pytest.raises(NotAuthorizedError, match="differ from its signed claims"):
        assignsig.check_assignment(verifier(), short, "target-1", "target")
    with pytest.raises(NotAuthorizedError, match="names target 'target-1', not target-2"):
        assignsig.check_assignment(verifier(), _assignment(), "target-2", "target")
