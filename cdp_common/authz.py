"""Who may call what: one table of RPC -> allowed callers, and the one server
interceptor that enforces it (docs/SECURITY.md "Authorization").

Theory of operation: every server of every node installs `Authorizer` (through
cdp_common.node.server_interceptors) when TLS is on. Before a servicer runs,
it reads the caller's certificate identity (cdp_common.identity) and refuses,
with PERMISSION_DENIED and a message naming the method and the caller:

- a certificate without a cdp identity (none, or not ours: fail closed);
- a certificate whose serial is in the revocation list (`[tls] revoked_file`,
  re-read on SIGHUP);
- a method the table does not list (an RPC added without a rule is closed);
- a caller the method's rule does not allow.

The table is about roles. What a role may do *to a given policy* (a filter
ships only its own policy, a target proxy applies only the policies assigned
to it) is the signed assignments' job (cdp_common.assignsig), and what a node
may claim about itself (its id and role at Register) the coordinator's.

Callers, as rule words:
    filter, source-proxy, target-proxy, target, coordinator   that node role
                                  (a `proxy` certificate acts as both proxy roles)
    node      any node role
    viewer    an operator of scope viewer or admin
    admin     an operator of scope admin
    any       any cdp identity (health checks)
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from cdp_common import identity, rpc
from cdp_common.errors import NotAuthorizedError
from cdp_common.identity import Identity
from cdp_common.revocation import load_revoked

log = logging.getLogger("common.authz")

NODES = ("filter", "source-proxy", "target-proxy", "target")
"""The roles of nodes that talk to the coordinator (a `proxy` acts as both proxies)."""

RULES: dict[str, tuple[str, ...]] = {
    # coordinator: nodes about themselves (the service checks id and role claims)
    "/cdp.v1.Coordinator/Register": NODES,
    "/cdp.v1.Coordinator/Heartbeat": NODES,
    "/cdp.v1.Coordinator/WatchAssignments": NODES,
    "/cdp.v1.Coordinator/ReportUnreachable": NODES,
    # coordinator: operators
    "/cdp.v1.Coordinator/GetStatus": ("viewer",),
    "/cdp.v1.Coordinator/GetPolicy": ("viewer",),
    "/cdp.v1.Coordinator/ListPolicies": ("viewer",),
    "/cdp.v1.Coordinator/ListAlarms": ("viewer",),
    "/cdp.v1.Coordinator/CreatePolicy": ("admin",),
    "/cdp.v1.Coordinator/UpdatePolicy": ("admin",),
    "/cdp.v1.Coordinator/DeletePolicy": ("admin",),
    "/cdp.v1.Coordinator/SetPolicyEnabled": ("admin",),
    "/cdp.v1.Coordinator/RequestSync": ("admin",),
    "/cdp.v1.Coordinator/DrainNode": ("admin",),
    "/cdp.v1.Coordinator/GetPlan": ("viewer",),
    "/cdp.v1.Coordinator/ListPlans": ("viewer",),
    "/cdp.v1.Coordinator/SavePlan": ("admin",),
    "/cdp.v1.Coordinator/DeletePlan": ("admin",),
    # the data path, one hop each
    "/cdp.v1.SourceProxy/Ship": ("filter",),
    "/cdp.v1.SourceProxy/GetDigests": ("filter",),
    "/cdp.v1.SourceProxy/AnswerCheckpoint": ("filter",),
    "/cdp.v1.TargetProxy/Replicate": ("source-proxy",),
    "/cdp.v1.TargetProxy/GetDigests": ("source-proxy",),
    "/cdp.v1.Target/Apply": ("target-proxy",),
    "/cdp.v1.Target/GetDigests": ("target-proxy",),
    "/cdp.v1.Target/GetPolicyState": ("viewer",),
    # restore points at the target: operators
    "/cdp.v1.RestorePoints/List": ("viewer",),
    "/cdp.v1.RestorePoints/Create": ("admin",),
    "/cdp.v1.RestorePoints/Restore": ("admin",),
    "/cdp.v1.RestorePoints/Failover": ("admin",),
    "/cdp.v1.RestorePoints/FailoverUndo": ("admin",),
    "/cdp.v1.RestorePoints/FailoverCommit": ("admin",),
    "/cdp.v1.RestorePoints/TestStart": ("admin",),
    "/cdp.v1.RestorePoints/TestList": ("viewer",),
    "/cdp.v1.RestorePoints/TestStop": ("admin",),
    "/cdp.v1.RestorePoints/RecordVerification": ("admin",),
    # liveness (the coordinator probes nodes, cdpctl lab and health check them)
    "/grpc.health.v1.Health/Check": ("any",),
    "/grpc.health.v1.Health/Watch": ("any",),
    "/grpc.health.v1.Health/List": ("any",),
}

WORDS = frozenset({*identity.NODE_ROLES, "node", "viewer", "admin", "any"})


def allows(rule: tuple[str, ...], who: Identity) -> bool:
    """Whether `who` is one of the callers `rule` names."""
    for word in rule:
        if word == "any":
            return True
        if word == "admin" and who.is_operator and who.scope == identity.ADMIN:
            return True
        if word == "viewer" and who.is_operator and who.scope in identity.SCOPES:
            return True
        if word == "node" and who.role in identity.NODE_ROLES:
            return True
        if word in identity.NODE_ROLES and who.acts_as(word):
            return True
    return False


def describe(rule: tuple[str, ...]) -> str:
    """The rule in words, for refusals and docs/SECURITY.md."""
    names = {"admin": "admin operators", "viewer": "viewer or admin operators",
             "node": "any node", "any": "any cdp certificate", "filter": "filters",
             "source-proxy": "source proxies", "target-proxy": "target proxies",
             "target": "targets", "coordinator": "the coordinator", "proxy": "proxies"}
    return ", ".join(names[w] for w in rule)


def check(method: str, who: Identity | None, revoked: frozenset[int]) -> None:
    """Raise NotAuthorizedError unless `who` may call `method` (the pure decision)."""
    short = method.removeprefix("/cdp.v1.").removeprefix("/").replace("/", ".")
    if who is None:
        raise NotAuthorizedError(f"{short}: the caller's certificate names no cdp identity "
                                 "(issue it with `cdpctl pki issue` or `issue-operator`)")
    if who.serial in revoked:
        raise NotAuthorizedError(f"{short}: the certificate of {who} (serial {who.serial:x}) "
                                 "is revoked")
    rule = RULES.get(method)
    if rule is None:
        raise NotAuthorizedError(f"{short}: no authorization rule for this method")
    if not allows(rule, who):
        raise NotAuthorizedError(f"{who} may not call {short} ({describe(rule)} only)")


# ---------------------------------------------------------------- the interceptor

REFUSAL_LOG_S = 60.0


@dataclass
class _Seen:
    at: float
    count: int


class Authorizer(grpc.aio.ServerInterceptor):
    """The interceptor; `reload(revoked_file)` swaps the revocation list."""

    def __init__(self, revoked_file: str = "", node_id: str = "") -> None:
        self.revoked = load_revoked(revoked_file)
        self.node_id = node_id
        self._logged: dict[tuple[str, str], _Seen] = {}

    def reload(self, revoked_file: str) -> None:
        """SIGHUP: a bad file keeps the old list (ConfigError for the caller to log)."""
        self.revoked = load_revoked(revoked_file)

    async def intercept_service(self, continuation: Callable[[Any], Any],
                                handler_call_details: Any) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return _guarded(handler, handler_call_details.method, self._check)

    async def _check(self, method: str, context: Any) -> None:
        try:
            try:
                who = identity.peer_identity(context)
            except identity.IdentityError as exc:
                raise NotAuthorizedError(f"{method}: the caller's certificate: {exc}") from None
            check(method, who, self.revoked)
        except NotAuthorizedError as exc:
            self._log(method, context.peer(), str(exc))
            await rpc.abort(context, exc)

    def _log(self, method: str, peer: str, why: str) -> None:
        """Once per peer and method a minute: a refused caller retries often."""
        now = time.monotonic()
        key = (peer, method)
        seen = self._logged.get(key)
        if seen is not None and now - seen.at < REFUSAL_LOG_S:
            seen.count += 1
            return
        if len(self._logged) > 4096:
            self._logged.clear()
        more = f" (and {seen.count} more)" if seen is not None and seen.count else ""
        self._logged[key] = _Seen(now, 0)
        log.warning("refused: %s%s", why, more, extra={"node": self.node_id, "peer": peer})


def _guarded(handler: grpc.RpcMethodHandler, method: str,
             check: Callable[[str, Any], Any]) -> grpc.RpcMethodHandler:
    """`handler` with `check(method, context)` awaited before its behaviour runs."""
    def wrap(behaviour: Any) -> Any:
        if behaviour is None:
            return None
        if inspect.isasyncgenfunction(behaviour):
            async def gen(request: Any, context: Any) -> Any:
                await check(method, context)
                async for item in behaviour(request, context):
                    yield item
            return gen

        async def call(request: Any, context: Any) -> Any:
            await check(method, context)
            return await behaviour(request, context)
        return call

    return handler._replace(
        unary_unary=wrap(handler.unary_unary), unary_stream=wrap(handler.unary_stream),
        stream_unary=wrap(handler.stream_unary), stream_stream=wrap(handler.stream_stream))
