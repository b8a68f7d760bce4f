"""The node skeleton every cdp daemon composes.

A daemon is a `Component` (its servicers, its reports, its open/start/stop/
close hooks) run by one `Node`, which owns everything that is the same in
every daemon:

    open        component.open()          storage, replay: before anyone can connect
    serve       gRPC server + grpc.health.v1 on node.listen, the component's
                servicers, the server interceptors (`server_interceptors`, the
                one place they are installed)
    metrics     Prometheus /metrics on node.metrics_listen ('' = off)
    control     CoordinatorClient (register, heartbeat with component.reports(),
                watch assignments) when the node has a role and a coordinator
    start       component.start(): its own tasks, via node.spawn (a task group:
                a task that fails stops the node with that error)
    ready       `ready` is set (sd_notify READY=1, cdp_common.daemon)
    ...         until shutdown() or a failed task
    cleanup     the reverse order, each step once, each step even if an
                earlier one failed: spawned tasks, component.stop(), the
                coordinator client, the server (grace period), metrics,
                component.close()

SIGHUP calls `reload(config)` (cdp_common.daemon re-reads and validates the
file first), which the node passes to the component.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine, Sequence
from typing import Any, Generic, Protocol, TypeVar

import grpc

from cdp_common import authz, limits, rpc
from cdp_common.aio import cancel_and_wait, in_thread
from cdp_common.config import NodeConfig, TlsConfig
from cdp_common.coordclient import AssignFn, CoordinatorClient, LoadFn
from cdp_common.errors import CdpError, ConfigError
from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb

log = logging.getLogger("common.node")
T = TypeVar("T")


class NodeConfigured(Protocol):
    """What the node reads from a daemon's config (every *Config has both)."""

    @property
    def node(self) -> NodeConfig: ...
    @property
    def tls(self) -> TlsConfig: ...


def server_interceptors(config: NodeConfigured, authorizer: authz.Authorizer | None
                        ) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors of every server of a node: the one place they are chosen.
    Authorization first, so a refused caller holds no stream slot."""
    limits.configure(config.node)  # the first-message deadline of this process's streams
    first: list[grpc.aio.ServerInterceptor] = [authorizer] if authorizer is not None else []
    return [*first, limits.PeerStreamLimit(config.node.max_streams_per_peer)]


def make_authorizer(config: NodeConfigured, kind: str) -> authz.Authorizer | None:
    """The node's authorizer; None with tls.insecure (no identities), said loudly."""
    if config.tls.insecure:
        log.warning("%s %s: tls.insecure: no authentication and no authorization (labs and "
                    "tests only)", kind, config.node.id, extra={"node": config.node.id})
        return None
    return authz.Authorizer(config.tls.revoked_file, config.node.id)


class Component:
    """What a daemon supplies; every hook has a no-op default."""

    async def open(self, node: Node) -> None:
        """Before the server binds (storage, recovery). Raise CdpError to refuse to start."""

    def add_servicers(self, server: grpc.aio.Server) -> None:
        """Add the daemon's servicers to the node's server."""

    async def start(self, node: Node) -> None:
        """After the server serves and the coordinator client runs: start the daemon's work."""

    def reports(self) -> Sequence[cpb.PolicyReport]:
        """Per-policy reports sent with every heartbeat."""
        return []

    async def stop(self) -> None:
        """Undo start() (the node has already cancelled what it spawned)."""

    async def close(self) -> None:
        """Undo open(); runs last, also when open() failed half way."""

    def reload(self, config: Any) -> None:
        """SIGHUP with a validated new config: apply what can change without a restart."""


class Node:
    """Runs one `Component` with the skeleton above; `run()` until `shutdown()`."""

    def __init__(self, config: NodeConfigured, component: Component, *, kind: str,
                 role: int | None = None, grace_s: float = 2.0,
                 on_assignments: AssignFn | None = None, load: LoadFn | None = None) -> None:
        self.config, self.component = config, component
        self.kind, self.role, self.grace_s = kind, role, grace_s
        self._on_assignments, self._load = on_assignments, load
        self.ready = asyncio.Event()
        self.authorizer = make_authorizer(config, kind)
        """The authorization interceptor of the node's server (None: insecure)."""
        self.server: rpc.Server | None = None
        self.coordinator: CoordinatorClient | None = None
        self.address = ""
        """host:port the server is bound to."""
        self.metrics_address = ""
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._failure: BaseException | None = None
        self._closing = False

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run `coro` for the node's lifetime; if it fails, the node stops with its error."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or self._closing:
            return
        exc = task.exception()
        if exc is not None and self._failure is None:
            log.error("%s: task %s failed: %s", self.kind, task.get_name(), exc,
                      exc_info=exc if not isinstance(exc, CdpError) else None,
                      extra={"node": self.config.node.id})
            self._failure = exc
            self._stop.set()

    async def shutdown(self) -> None:
        self._stop.set()

    def reload(self, config: Any) -> None:
        if self.authorizer is not None:
            try:
                self.authorizer.reload(config.tls.revoked_file)
            except ConfigError as exc:
                log.error("reload: %s; the old revocation list stays", exc,
                          extra={"node": self.config.node.id})
        self.component.reload(config)

    async def run(self) -> None:
        node = self.config.node
        async with contextlib.AsyncExitStack() as cleanup:
            cleanup.push_async_callback(self.component.close)
            await self.component.open(self)
            server = self.server = rpc.Server(node.listen, self.config.tls,
                                              node.max_message_bytes,
                                              interceptors=server_interceptors(
                                                  self.config, self.authorizer),
                                              max_concurrent_rpcs=node.max_concurrent_rpcs)
            self.component.add_servicers(server.grpc)
            await server.start()
            cleanup.push_async_callback(server.stop, self.grace_s)
            self.address = server.address
            self.metrics_address = await self._start_metrics(cleanup, node.metrics_listen)
            if self.role is not None and node.coordinator:
                self.coordinator = CoordinatorClient(
                    node, self.config.tls, self.role, node.advertise or self.address,
                    self.metrics_address, self.component.reports, self._on_assignments,
                    load=self._load)
                self.coordinator.start()
                cleanup.push_async_callback(self.coordinator.stop)
            cleanup.push_async_callback(self.component.stop)
            cleanup.push_async_callback(self._cancel_tasks)
            await self.component.start(self)
            log.info("%s %s serving on %s (metrics %s)", self.kind, node.id, self.address,
                     self.metrics_address or "off", extra={"node": node.id})
            if not self._stop.is_set():
                self.ready.set()
            await self._stop.wait()
        log.info("%s %s stopped", self.kind, node.id, extra={"node": node.id})
        if self._failure is not None:
            if isinstance(self._failure, CdpError):
                raise self._failure
            raise CdpError(f"{self.kind}: internal error: {self._failure!r}") from self._failure

    async def _cancel_tasks(self) -> None:
        self._closing = True
        await cancel_and_wait(*self._tasks)

    @staticmethod
    async def _start_metrics(cleanup: contextlib.AsyncExitStack, listen: str) -> str:
        if not listen:
            return ""
        from prometheus_client import start_http_server  # only nodes that serve metrics
        host, _, port = listen.rpartition(":")
        try:
            httpd, _thread = start_http_server(int(port), addr=host)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"node.metrics_listen: cannot serve metrics on {listen}: "
                           f"{exc}") from None

        async def stop() -> None:
            await in_thread(httpd.shutdown)
            httpd.server_close()
        cleanup.push_async_callback(stop)
        return f"{host}:{httpd.server_port}"


class _FromNode(Generic[T]):
    """An attribute of a NodeDaemon read from its node (`ready`, `address`, ...)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, daemon: NodeDaemon, owner: type | None = None) -> T:
        value: T = getattr(daemon.node, self.name)
        return value


class NodeDaemon(Component):
    """A component that is also the daemon cdp_common.daemon runs: it owns its `Node`
    (set `self.node` in __init__) and exposes the node's lifecycle."""

    node: Node
    ready: _FromNode[asyncio.Event] = _FromNode()
    address: _FromNode[str] = _FromNode()
    metrics_address: _FromNode[str] = _FromNode()
    coordinator: _FromNode[CoordinatorClient | None] = _FromNode()

    async def run(self) -> None:
        await self.node.run()

    async def shutdown(self) -> None:
        await self.node.shutdown()
