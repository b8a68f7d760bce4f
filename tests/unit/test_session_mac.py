"""Key confirmation of session opens (cdp_common.crypto open MAC, cdp_proxy.frames
seal_open/check_open): a round trip verifies; a tampered field, a wrong key, a wrong
policy, an open replayed into another session id or epoch, a missing MAC or an
unknown key id are refused (AuthenticationError = PERMISSION_DENIED), encrypted
session or not; a proxy without keys serves nothing.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdp_common import crypto
from cdp_common.crypto import FrameHeader, KeyRing, OpenClaims
from cdp_common.errors import AuthenticationError, ConfigError, ProtocolError
from cdp_common.pb.cdp.v1 import replication_pb2 as rpb
from cdp_proxy import frames

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

u64 = st.integers(0, 2**64 - 1)
u32 = st.integers(0, 2**32 - 1)
key_st = st.binary(min_size=32, max_size=32)
text_st = st.text(max_size=20)
claims_st = st.builds(
    OpenClaims, policy=st.text(min_size=1, max_size=20),
    session_id=st.binary(min_size=16, max_size=16), epoch=u64, key_id=u32,
    encryption=st.booleans(), source_proxy_id=text_st, target_address=text_st,
    captured_seq=u64,
    disks=st.lists(st.tuples(u32, u64, text_st), max_size=3).map(tuple))


def _other(value: object) -> object:
    """A value of the same type that differs from `value`."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value ^ 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, bytes):
        return bytes([value[0] ^ 1]) + value[1:] if value else b"\0"
    assert isinstance(value, tuple)
    return value[:-1] if value else ((0, 4096, "d"),)


# ---------------------------------------------------------------- the MAC codec

@SETTINGS
@given(claims_st, key_st)
def test_open_mac_round_trip(claims: OpenClaims, key: bytes) -> None:
    mac = crypto.open_mac(key, claims)
    assert len(mac) == crypto.OPEN_MAC_BYTES
    crypto.verify_open_mac(key, claims, mac)


@SETTINGS
@given(claims_st, key_st, st.sampled_from([f.name for f in dataclasses.fields(OpenClaims)]))
def test_any_tampered_claim_is_refused(claims: OpenClaims, key: bytes, name: str) -> None:
    mac = crypto.open_mac(key, claims)
    tampered = dataclasses.replace(claims, **{name: _other(getattr(claims, name))})
    with pytest.raises(AuthenticationError, match="wrong key or tampered open"):
        crypto.verify_open_mac(key, tampered, mac)


@SETTINGS
@given(claims_st, key_st, key_st)
def test_wrong_key_is_refused(claims: OpenClaims, key: bytes, other: bytes) -> None:
    if key == other:
        return
    with pytest.raises(AuthenticationError):
        crypto.verify_open_mac(other, claims, crypto.open_mac(key, claims))


@SETTINGS
@given(claims_st, key_st, st.integers(0, 8 * crypto.OPEN_MAC_BYTES - 1))
def test_flipped_or_cut_mac_is_refused(claims: OpenClaims, key: bytes, bit: int) -> None:
    mac = bytearray(crypto.open_mac(key, claims))
    for bad in (bytes(mac[:bit // 8]), bytes(mac[:bit // 8]) + bytes([mac[bit // 8] ^ 1 << bit % 8])
                + bytes(mac[bit // 8 + 1:])):
        with pytest.raises(AuthenticationError):
            crypto.verify_open_mac(key, claims, bad)


@SETTINGS
@given(claims_st, claims_st)
def test_claims_encode_injectively(a: OpenClaims, b: OpenClaims) -> None:
    """Different claims never share the MAC's input (length prefixes, fixed fields)."""
    assert (crypto.encode_claims(a) == crypto.encode_claims(b)) == (a == b)


def test_open_mac_key_is_domain_separated() -> None:
    master, sid = b"m" * 32, b"s" * 16
    mac_key = crypto.open_mac_key(master, "pol")
    assert mac_key != crypto.policy_key(master, "pol")
    assert mac_key != crypto.session_key(crypto.policy_key(master, "pol"), sid)
    assert mac_key != crypto.open_mac_key(master, "pol2")


# ---------------------------------------------------------------- check_open

MASTER = b"k" * 32
RING = KeyRing.single(MASTER)
DISKS = [rpb.DiskInfo(disk_id=0, name="d0", size_bytes=1 << 20)]


def _open(encryption: bool, **kw: object) -> rpb.SessionOpen:
    fields: dict[str, object] = dict(policy="pol", session_id=b"s" * 16, epoch=3, disks=DISKS,
                                     source_proxy_id="sp", captured_seq=9,
                                     encryption=encryption, target_address="t:1")
    fields.update(kw)
    return rpb.SessionOpen(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("encryption", [True, False])
def test_check_open_accepts_a_sealed_open(encryption: bool) -> None:
    o = frames.seal_open(_open(encryption), RING)
    assert o.key_id == 0 and len(o.open_mac) == crypto.OPEN_MAC_BYTES
    frames.check_open(o, RING)


@pytest.mark.parametrize("encryption", [True, False])
def test_check_open_refuses_a_missing_or_foreign_mac(encryption: bool) -> None:
    # the attack of issue 10: a stolen source-proxy certificate, no master key
    for mac in (b"", b"\0" * 32, crypto.open_mac(b"w" * 32, frames.claims_of(_open(encryption)))):
        with pytest.raises(AuthenticationError) as info:
            frames.check_open(_open(encryption, open_mac=mac), RING)
        assert info.value.grpc_status == "PERMISSION_DENIED"


@pytest.mark.parametrize("encryption", [True, False])
def test_flag_flip_and_replay_into_another_session_are_refused(encryption: bool) -> None:
    sealed = frames.seal_open(_open(encryption), RING)
    for change in ({"encryption": not encryption}, {"session_id": b"t" * 16},
                   {"epoch": 4}, {"epoch": 2**63}, {"policy": "other"},
                   {"target_address": "evil:1"}, {"source_proxy_id": "sp2"},
                   {"captured_seq": 10},
                   {"disks": [rpb.DiskInfo(disk_id=0, name="d0", size_bytes=2 << 20)]}):
        replayed = rpb.SessionOpen()
        replayed.CopyFrom(sealed)
        for name, value in change.items():
            if name == "disks":
                del replayed.disks[:]
                replayed.disks.extend(value)  # type: ignore[arg-type]
            else:
                setattr(replayed, name, value)
        with pytest.raises(AuthenticationError, match="wrong key or tampered open"):
            frames.check_open(replayed, RING)


def test_wrong_policy_key_is_refused() -> None:
    """An open MAC'd for another policy's claims does not verify for this one."""
    other = frames.seal_open(_open(True, policy="other"), RING)
    with pytest.raises(AuthenticationError):
        frames.check_open(_open(True, open_mac=other.open_mac), RING)


def test_unknown_key_id_is_refused_and_named() -> None:
    new_ring = RING.rotated(b"n" * 32)
    o = frames.seal_open(_open(True), new_ring)
    assert o.key_id == 1
    with pytest.raises(AuthenticationError, match="key id 1 is not in this proxy's key ring"):
        frames.check_open(o, RING)
    frames.check_open(o, new_ring)
    # the key id is covered by the MAC: naming the old key does not pass either
    o.key_id = 0
    with pytest.raises(AuthenticationError):
        frames.check_open(o, new_ring)


def test_a_proxy_without_keys_serves_no_session() -> None:
    for encryption in (True, False):
        with pytest.raises(ConfigError) as info:
            frames.check_open(frames.seal_open(_open(encryption), RING), None)
        assert info.value.grpc_status == "FAILED_PRECONDITION"
        with pytest.raises(ConfigError):
            frames.seal_open(_open(encryption), None)


def test_shape_is_checked_before_the_mac() -> None:
    with pytest.raises(ProtocolError):
        frames.check_open(_open(True, session_id=b"short"), RING)


# ---------------------------------------------------------------- rotation window

@pytest.mark.parametrize("encryption", [True, False])
def test_sessions_under_old_and_new_keys_work_in_the_window(encryption: bool) -> None:
    """A receiver holding both keys opens sessions sealed under either; a session's
    frames must carry its own key id."""
    old, new = KeyRing.single(MASTER), KeyRing.single(MASTER).rotated(b"n" * 32)
    h = FrameHeader(1, 1, 0, True, 5)
    for sender in (old, new):
        o = frames.seal_open(_open(encryption), sender)
        frames.check_open(o, new)
        env = frames.sealer_for(o, sender, 1).seal(h, b"payload")
        assert frames.opener_for(o, new).open(h, env) == b"payload"
    if encryption:
        o_new = frames.seal_open(_open(True), new)
        o_old = frames.seal_open(_open(True), old)
        env = frames.sealer_for(o_old, old, 1).seal(h, b"payload")
        with pytest.raises(AuthenticationError, match="sealed under key id 0"):
            frames.opener_for(o_new, new).open(h, env)


def test_v1_envelopes_stay_readable_under_key_id_0() -> None:
    """Envelope version 1 (no key id) is key id 0's: still opened, on key id 0 only."""
    sid = b"s" * 16
    key = crypto.session_key(crypto.policy_key(MASTER, "pol"), sid)
    h = FrameHeader(1, 1, 0, True, 5)
    v2 = crypto.FrameSealer("pol", sid, key, 1).seal(h, b"payload")
    assert v2[0] == crypto.ENVELOPE_ENCRYPTED_V2 and v2[1:5] == b"\0\0\0\0"
    v1 = bytes([crypto.ENVELOPE_ENCRYPTED]) + v2[5:]
    assert crypto.FrameOpener("pol", sid, key).open(h, v1) == b"payload"
    with pytest.raises(AuthenticationError):
        crypto.FrameOpener("pol", sid, key, key_id=1).open(h, v1)
