"""Who a peer is: the role and id its certificate names (docs/SECURITY.md).

Every certificate `cdpctl pki` issues carries one SAN URI

    cdp://<role>/<id>                      a node: role in NODE_ROLES, id a name
    cdp://operator/<name>?scope=<scope>    an operator: scope 'admin' or 'viewer'

`peer_identity(context)` reads it from the TLS peer of a gRPC call. A
certificate without such a URI (issued before identities existed, or by
another tool) has no identity and is refused wherever a role is required.
The parse is pure and cached by the certificate's PEM, so a stream pays for
it once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from cdp_common.names import is_name

if TYPE_CHECKING:
    from cryptography import x509

SCHEME = "cdp"
FILTER, SOURCE_PROXY, TARGET_PROXY, PROXY, TARGET, COORDINATOR, OPERATOR = (
    "filter", "source-proxy", "target-proxy", "proxy", "target", "coordinator", "operator")
NODE_ROLES = (FILTER, SOURCE_PROXY, TARGET_PROXY, PROXY, TARGET, COORDINATOR)
"""`proxy` is a proxy with role = both: it acts as a source and a target proxy."""
ADMIN, VIEWER = "admin", "viewer"
SCOPES = (ADMIN, VIEWER)


class IdentityError(ValueError):
    """A certificate's cdp URI is malformed."""


@dataclass(frozen=True)
class Identity:
    role: str
    id: str
    scope: str = ""
    """Operators only: 'admin' or 'viewer'."""
    serial: int = 0
    """The certificate's serial number (for the revocation list)."""

    @property
    def is_operator(self) -> bool:
        return self.role == OPERATOR

    def acts_as(self, role: str) -> bool:
        """Whether this identity may act in `role` (a `proxy` is both proxy roles)."""
        return self.role == role or (self.role == PROXY and role in (SOURCE_PROXY, TARGET_PROXY))

    def uri(self) -> str:
        return make_uri(self.role, self.id, self.scope)

    def __str__(self) -> str:
        return f"{self.role} {self.id}" + (f" ({self.scope})" if self.scope else "")


def make_uri(role: str, ident: str, scope: str = "") -> str:
    """The SAN URI for `role`/`ident`; raises IdentityError for a bad combination."""
    check(role, ident, scope)
    return f"{SCHEME}://{role}/{ident}" + (f"?scope={scope}" if scope else "")


def check(role: str, ident: str, scope: str) -> None:
    if role not in (*NODE_ROLES, OPERATOR):
        raise IdentityError(f"unknown role {role!r} (expected one of "
                            f"{', '.join((*NODE_ROLES, OPERATOR))})")
    if not is_name(ident):
        raise IdentityError(f"bad id {ident!r}: not a valid name")
    if role == OPERATOR and scope not in SCOPES:
        raise IdentityError(f"operator {ident}: scope must be admin or viewer, got {scope!r}")
    if role != OPERATOR and scope:
        raise IdentityError(f"{role} {ident}: only operators have a scope")


def parse_uri(uri: str, serial: int = 0) -> Identity:
    """The identity a `cdp://` URI names; raises IdentityError."""
    parts = urlsplit(uri)
    if parts.scheme != SCHEME:
        raise IdentityError(f"not a cdp URI: {uri!r}")
    role, ident = parts.netloc, parts.path.removeprefix("/")
    query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
    scope = query.get("scope", [""])
    if len(scope) != 1 or set(query) - {"scope"} or parts.fragment:
        raise IdentityError(f"malformed cdp URI {uri!r}")
    check(role, ident, scope[0])
    return Identity(role, ident, scope[0], serial)


def from_certificate(cert: x509.Certificate) -> Identity | None:
    from cryptography import x509  # here: cdpctl's parser needs this module's names only
    """The identity of `cert`: its one cdp:// SAN URI, None if it has none.
    Raises IdentityError for a malformed one or for two of them."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = [u for u in sans.get_values_for_type(x509.UniformResourceIdentifier)
            if u.startswith(f"{SCHEME}:")]
    if not uris:
        return None
    if len(uris) > 1:
        raise IdentityError(f"certificate {cert.serial_number:x} names {len(uris)} identities")
    return parse_uri(uris[0], cert.serial_number)


@functools.lru_cache(maxsize=256)
def from_pem(pem: bytes) -> Identity | None:
    """`from_certificate` of a PEM certificate (cached: one parse per peer)."""
    from cryptography import x509
    return from_certificate(x509.load_pem_x509_certificate(pem))


def peer_identity(context: Any) -> Identity | None:
    """The identity of the TLS peer of a gRPC call (None: plaintext, or no cdp URI).
    Raises IdentityError for a malformed one."""
    auth = context.auth_context()
    pems = auth.get("x509_pem_cert") if auth else None
    if not pems:
        return None
    return from_pem(bytes(pems[0]))
