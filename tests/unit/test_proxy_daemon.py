"""ProxyDaemon lifecycle: coordinator registration per role, config checks, CLI."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from cdp_common import crypto, rpc
from cdp_common.config import (
    CoordinatorConfig,
    CoordinatorSection,
    NodeConfig,
    ProxyConfig,
    ProxySection,
    TlsConfig,
)
from cdp_common.errors import ConfigError
from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
from cdp_common.pb.cdp.v1 import coordinator_pb2_grpc as cgrpc
from cdp_coordinator.daemon import CoordinatorDaemon
from cdp_proxy.daemon import ProxyDaemon

pytestmark = pytest.mark.timeout(60)
TLS = TlsConfig(insecure=True)


@pytest.mark.parametrize("role,expected", [("source", cpb.ROLE_SOURCE_PROXY),
                                           ("target", cpb.ROLE_TARGET_PROXY),
                                           ("both", cpb.ROLE_PROXY_BOTH)])
async def test_registers_with_role_and_reports_errors(tmp_path: Path, role: str,
                                                      expected: int) -> None:
    coord = CoordinatorDaemon(CoordinatorConfig(
        node=NodeConfig(id="coordinator", listen="127.0.0.1:0"),
        coordinator=CoordinatorSection(db_path=str(tmp_path / "c.db"), heartbeat_ms=100,
                                       lease_ms=500), tls=TLS))
    ctask = asyncio.create_task(coord.run())
    await asyncio.wait_for(coord.ready.wait(), 10)
    key = tmp_path / "master.key"
    crypto.write_new_key(key)
    proxy = ProxyDaemon(ProxyConfig(
        node=NodeConfig(id=f"px-{role}", listen="127.0.0.1:0", coordinator=coord.address,
                        metrics_listen="127.0.0.1:0"),
        proxy=ProxySection(role=role, key_file=str(key)), tls=TLS))
    ptask = asyncio.create_task(proxy.run())
    channel = rpc.channel(coord.address, TLS, 1 << 20)
    try:
        await asyncio.wait_for(proxy.ready.wait(), 10)
        assert proxy.metrics_address
        stub = cgrpc.CoordinatorStub(channel)
        for _ in range(100):
            status = await stub.GetStatus(cpb.StatusRequest())
            nodes = {n.info.id: n for n in status.nodes}
            if f"px-{role}" in nodes:
                break
            await asyncio.sleep(0.05)
        node = nodes[f"px-{role}"]
        assert node.info.role == expected
        assert node.info.address == proxy.address
        assert node.state == "up"
        proxy.errors.set("p1", "target proxy x: wrong key")
        assert [(r.policy, r.error) for r in proxy.reports()] == [("p1", "target proxy x: "
                                                                   "wrong key")]
        proxy.errors.clear("p1")
        assert proxy.reports() == []
    finally:
        await channel.close()
        await proxy.shutdown()
        await asyncio.wait_for(ptask, 10)
        await coord.shutdown()
        await asyncio.wait_for(ctask, 10)


async def test_keeps_serving_without_coordinator(tmp_path: Path) -> None:
    key = tmp_path / "k"
    crypto.write_new_key(key)
    proxy = ProxyDaemon(ProxyConfig(
        node=NodeConfig(id="px", listen="127.0.0.1:0", coordinator="127.0.0.1:1"),
        proxy=ProxySection(role="both", key_file=str(key)), tls=TLS))
    task = asyncio.create_task(proxy.run())
    await asyncio.wait_for(proxy.ready.wait(), 10)
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    async with rpc.channel(proxy.address, TLS, 1 << 20) as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    await proxy.shutdown()
    await asyncio.wait_for(task, 10)


def test_bad_key_file_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.key"
    bad.write_text("nope\n")
    with pytest.raises(ConfigError, match="key_file"):
        ProxyDaemon(ProxyConfig(node=NodeConfig(id="px"),
                                proxy=ProxySection(role="target", key_file=str(bad)), tls=TLS))


def test_check_config_cli(tmp_path: Path) -> None:
    key = tmp_path / "k"
    crypto.write_new_key(key)
    good = tmp_path / "good.toml"
    good.write_text(f"""
[node]
id = "proxy-1"
listen = "127.0.0.1:0"
coordinator = "127.0.0.1:7000"

[proxy]
role = "both"
key_file = "{key}"
frame_bytes = 1048576

[tls]
insecure = true
""")
    out = subprocess.run([sys.executable, "-m", "cdp_proxy", "check-config", "--config",
                          str(good)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text().replace('role = "both"', 'role = "middle"'))
    out = subprocess.run([sys.executable, "-m", "cdp_proxy", "check-config", "--config",
                          str(bad)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "proxy.role" in out.stderr and "Traceback" not in out.stderr
