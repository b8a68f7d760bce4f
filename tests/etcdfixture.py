"""A real single-member etcd for tests (a plain module; the fixtures live in the tests).

`EtcdServer(data_dir)` runs the `etcd` binary (Debian's etcd-server) on
127.0.0.1 with two free ports and `data_dir`, waits until it answers, and
`stop()` ends it by its PID (terminate, wait, kill). `kill()` is a crash
(SIGKILL); `start()` again on the same data dir is the restart that proves
durability. `etcd_skip_reason()` is the one reason tests skip: no binary.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

START_TIMEOUT_S = 30.0


def etcd_binary() -> str | None:
    return shutil.which("etcd") or next(
        (p for p in ("/usr/bin/etcd", "/usr/local/bin/etcd") if os.access(p, os.X_OK)), None)


def etcd_skip_reason() -> str | None:
    if etcd_binary() is None:
        return "the etcd binary is missing (apt-get install etcd-server; scripts/bootstrap.sh)"
    return None


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class EtcdServer:
    """One etcd process on loopback; `endpoint` is "127.0.0.1:<client port>"."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.client_port, self.peer_port = free_ports(2)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}.log"

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self) -> EtcdServer:
        binary = etcd_binary()
        assert binary, etcd_skip_reason()
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        try:
            self.proc = subprocess.Popen(
                [binary, "--name", "test", "--data-dir", str(self.data_dir),
                 "--listen-client-urls", client, "--advertise-client-urls", client,
                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", f"test={peer}", "--initial-cluster-state", "new",
                 "--log-level", "warn", "--logger", "zap"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        finally:
            log.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        """Until a linearizable read answers (a leader is elected), not just the port."""
        from cdp_coordinator.etcdstore import ping

        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}: "
                                   f"{self.log_path.read_text(errors='replace')[-2000:]}")
            try:
                ping(self.endpoint, timeout_s=1.0)
                return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"etcd on {self.endpoint} did not answer within "
                                       f"{START_TIMEOUT_S}s") from None
                time.sleep(0.05)

    def kill(self) -> None:
        """A crash: SIGKILL, then reap."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture(scope="module")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """One etcd per test module (tests keep apart by key prefix); skips without the binary."""
    reason = etcd_skip_reason()
    if reason:
        pytest.skip(reason)
    server = EtcdServer(tmp_path_factory.mktemp("etcd") / "data").start()
    try:
        yield server
    finally:
        server.stop()


def put_raw(endpoint: str, key: bytes, value: bytes) -> None:
    """Write one key behind the store's back (to corrupt it)."""
    from cdp_common.pb.etcd.etcdserverpb import rpc_pb2 as pb
    from cdp_common.pb.etcd.etcdserverpb import rpc_pb2_grpc as pbg

    with grpc.insecure_channel(endpoint) as channel:
        pbg.KVStub(channel).Put(pb.PutRequest(key=key, value=value), timeout=10)
