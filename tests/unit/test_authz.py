"""cdp_common.authz: the one table, the decision, and the interceptor over real TLS."""

from __future__ import annotations

import datetime
import re
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cdp_common import authz, pki, rpc
from cdp_common.config import TlsConfig
from cdp_common.errors import ConfigError, NotAuthorizedError
from cdp_common.identity import Identity
from cdp_common.pb.cdp.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    replication_pb2,
    restore_pb2,
)
from cdp_common.revocation import load_revoked

pytestmark = pytest.mark.timeout(60)

DOC = Path(__file__).resolve().parents[2] / "docs" / "SECURITY.md"


def every_method() -> set[str]:
    out = set()
    for module in (coordinator_pb2, replication_pb2, restore_pb2, health_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            out |= {f"/{service.full_name}/{m.name}" for m in service.methods}
    return out


def test_the_table_covers_every_method_and_nothing_else() -> None:
    assert set(authz.RULES) == every_method()
    for method, rule in authz.RULES.items():
        assert rule and set(rule) <= authz.WORDS, method


def test_the_documented_table_is_the_code_table() -> None:
    """docs/SECURITY.md lists every rule as `| Service.Method | callers |`."""
    text = DOC.read_text()
    rows = dict(re.findall(r"^\| `([A-Za-z.0-9]+/[A-Za-z]+)` \| ([^|]+) \|$", text, re.M))
    code = {m.removeprefix("/").removeprefix("cdp.v1."): authz.describe(r)
            for m, r in authz.RULES.items()}
    assert {k: v.strip() for k, v in rows.items()} == code


FILTER = Identity("filter", "filter-1", serial=1)
BOTH = Identity("proxy", "p-1", serial=2)
VIEWER = Identity("operator", "noc", "viewer", serial=3)
ADMIN = Identity("operator", "ops", "admin", serial=4)
TARGET = Identity("target", "target-1", serial=5)


@pytest.mark.parametrize(("method", "who", "ok"), [
    ("/cdp.v1.Coordinator/CreatePolicy", ADMIN, True),
    ("/cdp.v1.Coordinator/CreatePolicy", VIEWER, False),
    ("/cdp.v1.Coordinator/CreatePolicy", FILTER, False),
    ("/cdp.v1.Coordinator/UpdatePolicy", FILTER, False),
    ("/cdp.v1.Coordinator/RequestSync", VIEWER, False),
    ("/cdp.v1.Coordinator/GetStatus", VIEWER, True),
    ("/cdp.v1.Coordinator/GetStatus", ADMIN, True),
    ("/cdp.v1.Coordinator/GetStatus", FILTER, False),
    ("/cdp.v1.Coordinator/Register", FILTER, True),
    ("/cdp.v1.Coordinator/Register", ADMIN, False),
    ("/cdp.v1.SourceProxy/Ship", FILTER, True),
    ("/cdp.v1.SourceProxy/Ship", TARGET, False),
    ("/cdp.v1.TargetProxy/Replicate", BOTH, True),
    ("/cdp.v1.TargetProxy/Replicate", FILTER, False),
    ("/cdp.v1.Target/Apply", BOTH, True),
    ("/cdp.v1.Target/Apply", FILTER, False),
    ("/cdp.v1.Target/Apply", ADMIN, False),
    ("/cdp.v1.RestorePoints/Restore", VIEWER, False),
    ("/cdp.v1.RestorePoints/Restore", ADMIN, True),
    ("/cdp.v1.RestorePoints/List", VIEWER, True),
    ("/grpc.health.v1.Health/Check", TARGET, True),
    ("/cdp.v1.Coordinator/NoSuchMethod", ADMIN, False),
])
def test_decisions(method: str, who: Identity, ok: bool) -> None:
    if ok:
        authz.check(method, who, frozenset())
    else:
        with pytest.raises(NotAuthorizedError):
            authz.check(method, who, frozenset())


def test_no_identity_and_revoked_are_refused() -> None:
    with pytest.raises(NotAuthorizedError, match="names no cdp identity"):
        authz.check("/grpc.health.v1.Health/Check", None, frozenset())
    with pytest.raises(NotAuthorizedError, match="revoked"):
        authz.check("/cdp.v1.Coordinator/GetStatus", ADMIN, frozenset({4}))


def test_revocation_file(tmp_path: Path) -> None:
    f = tmp_path / "revoked"
    f.write_text("# retired 2026-12\nserial=0A:1B\n  ff  # a comment\n\n")
    assert load_revoked(str(f)) == {0x0A1B, 0xFF}
    f.write_text("12\nnot-hex\n")
    with pytest.raises(ConfigError, match="line 2"):
        load_revoked(str(f))
    with pytest.raises(ConfigError, match="cannot read"):
        load_revoked(str(tmp_path / "missing"))
    assert load_revoked("") == frozenset()


# ---------------------------------------------------------------- over real TLS

class _Coordinator(coordinator_pb2_grpc.CoordinatorServicer):
    async def GetStatus(self, request: coordinator_pb2.StatusRequest,
                        context: grpc.aio.ServicerContext) -> coordinator_pb2.StatusReply:
        return coordinator_pb2.StatusReply(now_ns=7)

    async def WatchAssignments(self, request: coordinator_pb2.WatchRequest,
                               context: grpc.aio.ServicerContext,
                               ) -> AsyncIterator[coordinator_pb2.AssignmentSet]:
        yield coordinator_pb2.AssignmentSet()


def _foreign_cert(directory: Path, ca_pem: Path, ca_key: Path) -> TlsConfig:
    """A certificate of our CA without a cdp identity (issued by another tool)."""
    ca = x509.load_pem_x509_certificate(ca_pem.read_bytes())
    ca_private = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stranger")]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(
                __import__("ipaddress").ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_private, hashes.SHA256()))  # type: ignore[arg-type]
    pem, k = directory / "stranger.pem", directory / "stranger.key"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return TlsConfig(ca_file=str(ca_pem), cert_file=str(pem), key_file=str(k))


async def test_interceptor_over_tls(tmp_path: Path) -> None:
    ca_pem, ca_key = pki.create_ca(tmp_path)

    def tls(name: str, role: str, scope: str = "") -> TlsConfig:
        pem, key = pki.create_node_cert(ca_pem, ca_key, tmp_path, name, ["127.0.0.1"],
                                        role=role, scope=scope)
        return TlsConfig(ca_file=str(ca_pem), cert_file=str(pem), key_file=str(key))

    server_tls = tls("coordinator", "coordinator")
    revoked = tmp_path / "revoked"
    revoked.write_text("")
    guard = authz.Authorizer(str(revoked), "coordinator")
    server = rpc.Server("127.0.0.1:0", server_tls, 1 << 20, interceptors=[guard])
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(_Coordinator(), server.grpc)
    await server.start()
    viewer, filt = tls("noc", "operator", "viewer"), tls("filter-1", "filter")
    stranger = _foreign_cert(tmp_path, ca_pem, ca_key)

    async def call(t: TlsConfig, what: str) -> grpc.StatusCode:
        async with rpc.channel(server.address, t, 1 << 20) as ch:
            stub = coordinator_pb2_grpc.CoordinatorStub(ch)
            try:
                if what == "status":
                    assert (await stub.GetStatus(coordinator_pb2.StatusRequest())).now_ns == 7
                elif what == "watch":
                    async for _ in stub.WatchAssignments(coordinator_pb2.WatchRequest()):
                        pass
                else:
                    await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
                return grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                return exc.code()

    try:
        assert await call(viewer, "status") == grpc.StatusCode.OK
        assert await call(filt, "status") == grpc.StatusCode.PERMISSION_DENIED
        assert await call(filt, "watch") == grpc.StatusCode.OK          # a server stream
        assert await call(viewer, "watch") == grpc.StatusCode.PERMISSION_DENIED
        assert await call(filt, "health") == grpc.StatusCode.OK
        assert await call(stranger, "health") == grpc.StatusCode.PERMISSION_DENIED
        # revoke the viewer; the list is re-read on reload (SIGHUP)
        serial = x509.load_pem_x509_certificate(Path(viewer.cert_file).read_bytes()).serial_number
        revoked.write_text(f"{serial:x}\n")
        assert await call(viewer, "status") == grpc.StatusCode.OK
        guard.reload(str(revoked))
        assert await call(viewer, "status") == grpc.StatusCode.PERMISSION_DENIED
        assert await call(filt, "watch") == grpc.StatusCode.OK
        # a bad file at reload keeps the old list
        revoked.write_text("zz\n")
        with pytest.raises(ConfigError):
            guard.reload(str(revoked))
        assert await call(viewer, "status") == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await server.stop(0)
