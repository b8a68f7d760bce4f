"""Server TLS credentials that can be replaced without a restart (SIGHUP).

Theory of operation
-------------------
gRPC core asks a *certificate configuration fetcher* for new server
credentials before every TLS handshake; returning None keeps the current
ones. `ReloadableServerTls` hands core such a fetcher. `reload()` re-reads the
three files named in `[tls]` (ca_file, cert_file, key_file), checks that the
certificate and the private key belong together and that the CA parses, and
only then queues the new configuration; the next handshake picks it up.
Connections already open keep the credentials they were made with; a bad
set of files is refused with a ConfigError and the old credentials stay.

The paths themselves are fixed at start: renewing certificates in place (the
usual `cdpctl pki issue` or ACME-style rotation) is a reload, moving them
elsewhere is a restart. Every live instance registers itself so the daemon
lifecycle can reload all servers of the process with `reload_all()`.
"""

from __future__ import annotations

import threading
import weakref
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cdp_common.config import TlsConfig
from cdp_common.errors import ConfigError

_LIVE: weakref.WeakSet[ReloadableServerTls] = weakref.WeakSet()


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"tls.{what}: cannot read {path} ({exc.strerror})") from None


def load_checked(tls: TlsConfig) -> tuple[bytes, bytes, bytes]:
    """(ca, cert, key) PEM bytes, after checking they parse and the key fits the cert."""
    ca, cert, key = (_read(tls.ca_file, "ca_file"), _read(tls.cert_file, "cert_file"),
                     _read(tls.key_file, "key_file"))
    try:
        x509.load_pem_x509_certificates(ca)
    except ValueError as exc:
        raise ConfigError(f"tls.ca_file: {tls.ca_file} is not a PEM certificate ({exc})") from None
    try:
        leaf = x509.load_pem_x509_certificates(cert)[0]
    except ValueError as exc:
        raise ConfigError(f"tls.cert_file: {tls.cert_file} is not a PEM certificate "
                          f"({exc})") from None
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"tls.key_file: {tls.key_file} is not an unencrypted PEM private key "
                          f"({exc})") from None
    raw = serialization.PublicFormat.SubjectPublicKeyInfo
    pem = serialization.Encoding.PEM
    if leaf.public_key().public_bytes(pem, raw) != private.public_key().public_bytes(pem, raw):
        raise ConfigError(f"tls.key_file: {tls.key_file} does not belong to the certificate "
                          f"{tls.cert_file}")
    return ca, cert, key


class ReloadableServerTls:
    """Mutual-TLS server credentials whose files can be re-read at run time."""

    def __init__(self, tls: TlsConfig) -> None:
        self.tls = tls
        self._lock = threading.Lock()  # the fetcher runs on a gRPC core thread
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self.reloads = 0
        ca, cert, key = load_checked(tls)
        self._initial = grpc.ssl_server_certificate_configuration([(key, cert)],
                                                                  root_certificates=ca)
        _LIVE.add(self)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self._initial, self._fetch,
                                                   require_client_authentication=True)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            pending, self._pending = self._pending, None
        return pending

    def reload(self) -> None:
        """Queue the current files for the next handshakes; ConfigError keeps the old ones."""
        ca, cert, key = load_checked(self.tls)
        config = grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)
        with self._lock:
            self._pending = config
        self.reloads += 1


def reload_all() -> int:
    """Reload every live server's TLS files; returns how many. Raises the first ConfigError
    after trying them all."""
    first: ConfigError | None = None
    n = 0
    for server_tls in list(_LIVE):
        try:
            server_tls.reload()
            n += 1
        except ConfigError as exc:
            first = first or exc
    if first is not None:
        raise first
    return n
