"""cdp_common.identity: the cdp:// URI a certificate names, and how it is read."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from hypothesis import given
from hypothesis import strategies as st

from cdp_common import identity, pki
from cdp_common.identity import Identity, IdentityError


def test_uris_round_trip() -> None:
    assert identity.make_uri("filter", "filter-1") == "cdp://filter/filter-1"
    assert identity.parse_uri("cdp://filter/filter-1") == Identity("filter", "filter-1")
    assert identity.parse_uri("cdp://operator/alice?scope=viewer") == \
        Identity("operator", "alice", "viewer")
    assert Identity("proxy", "p").acts_as("source-proxy")
    assert Identity("proxy", "p").acts_as("target-proxy")
    assert not Identity("source-proxy", "p").acts_as("target-proxy")
    assert not Identity("filter", "f").acts_as("proxy")


@pytest.mark.parametrize("uri", [
    "https://filter/filter-1",              # another scheme
    "cdp://root/filter-1",                  # unknown role
    "cdp://filter/bad%0Aid",                # not a name (a newline, percent-encoded)
    "cdp://filter/a/b",                     # a path, not an id
    "cdp://filter/",                        # no id
    "cdp://operator/alice",                 # an operator without a scope
    "cdp://operator/alice?scope=root",      # an unknown scope
    "cdp://filter/f?scope=admin",           # a node with a scope
    "cdp://operator/alice?scope=admin&scope=viewer",
    "cdp://operator/alice?scope=admin&x=1",
    "cdp://filter/f#frag",
])
def test_malformed_uris_are_refused(uri: str) -> None:
    with pytest.raises(IdentityError):
        identity.parse_uri(uri)


@given(st.text(max_size=80))
def test_parse_never_crashes(uri: str) -> None:
    try:
        got = identity.parse_uri(uri)
    except IdentityError:
        return
    assert identity.parse_uri(got.uri()) == got


def test_certificates_name_their_identity(tmp_path: Path) -> None:
    ca_pem, ca_key = pki.create_ca(tmp_path)
    pem, key = pki.create_node_cert(ca_pem, ca_key, tmp_path, "target-1", ["192.0.2.9"],
                                    role="target")
    cert = x509.load_pem_x509_certificate(pem.read_bytes())
    assert identity.from_pem(pem.read_bytes()) == Identity("target", "target-1", "",
                                                           cert.serial_number)
    assert key.stat().st_mode & 0o777 == 0o600
    with pytest.raises(IdentityError):
        pki.create_node_cert(ca_pem, ca_key, tmp_path, "x", [], role="filter", scope="admin")
    with pytest.raises(IdentityError):
        pki.create_node_cert(ca_pem, ca_key, tmp_path, "ops", [], role="operator")
    # a CA certificate (no cdp URI) has no identity
    assert identity.from_pem(ca_pem.read_bytes()) is None


def test_rewritten_key_file_is_made_private(tmp_path: Path) -> None:
    ca_pem, ca_key = pki.create_ca(tmp_path)
    (tmp_path / "n.key").write_bytes(b"old")
    (tmp_path / "n.key").chmod(0o644)
    pki.create_node_cert(ca_pem, ca_key, tmp_path, "n", [], role="filter")
    assert (tmp_path / "n.key").stat().st_mode & 0o777 == 0o600
