"""`EtcdStore`: the coordinator's `StateStore` in etcd v3 (the distributed one, DESIGN §4).

Theory of operation
-------------------
Everything lives under one key prefix (`coordinator.etcd_prefix`, "/cdp/" by
default), laid out as docs/FORMAT.md "Coordinator state in etcd" specifies:

    <prefix>meta/schema              "1"
    <prefix>nodes/<id>               node JSON
    <prefix>policies/<name>          policy JSON (store.policy_to_json)
    <prefix>assignments/<policy>     assignment JSON (store.assignment_to_json), whose
                                     "epoch" is the largest ever saved for the policy
    <prefix>alarms/<id, 20 digits>   alarm event JSON
    <prefix>alarm-last-id            the last alarm id allocated (decimal)
    <prefix>alarm-levels/<policy>    the level of the policy's newest event
    <prefix>sync-requests/<policy>   the newest `cdpctl sync` request id (decimal)
    <prefix>plans/<name>             failover plan JSON (store.plan_to_json)
    <prefix>drains/<node>            "1": a node an operator drained
    <prefix>leader                   the leader election key (cdp_coordinator.leader)
    <prefix>live/<node>              the node's newest heartbeat as the leader heard it,
                                     under the node's own etcd lease (ephemeral)

Every mutator is one etcd transaction, so it takes effect entirely or not at
all, and a committed transaction is on a quorum's disk before etcd answers
(durable across a coordinator restart and an etcd crash). The ones that read
before they write are optimistic: they read at revision R, then commit only
if nothing in the range they read changed since (a compare "mod_revision <
R + 1" over the whole range, one compare whatever its size), and otherwise
read again and retry. That is how two coordinators (or a retried RPC racing
the original) can never make an epoch shrink: `save_assignments` writes
max(stored, given) computed from a read nobody changed in between. Alarm ids
come from `alarm-last-id`, advanced in the same transaction that writes the
events, so they grow strictly across restarts and writers and are never reused.

etcd refuses a transaction of more than `--max-txn-ops` operations (128 by
default, nested transactions included). The saves therefore write only what
differs from what they read (a redo writes nothing; the start-up reconcile
of a config file of 500 unchanged policies writes nothing), and a save whose
changes still exceed the limit fails whole with a `StorageError` that says
so, before sending anything (raise the limit on every etcd member and
`coordinator.etcd_max_txn_ops`). `add_alarms`, the one append, is split into
consecutive transactions of at most that size instead: each is atomic, ids
still grow, and a failure after the first leaves the earlier events logged.
`save_assignments` is split likewise (each assignment is its own max-epoch
rule, and one lost proxy rebinds more policies than 128 at 1,000 disks): a
failure after the first leaves the earlier ones written, which a retry of the
whole save (the coordinator's next flush) completes.

`load` reads nodes, policies and assignments at one revision, so it is one
consistent snapshot. A stored value that does not decode raises `FormatError`
naming the key; etcd unreachable, timing out or refusing a request raises
`StorageError` naming the endpoints (transient unless etcd refused the
request itself). Endpoints are tried in order; the first that answers is kept
until it fails with UNAVAILABLE. A retry on the next endpoint after a lost
answer can repeat a transaction: harmless for the idempotent saves, and for
`add_alarms` (the one append) it can log the events twice, never reuse an id.

The client is gRPC stubs generated from etcd's own API protos (proto/etcd,
scripts/gen_proto.sh), synchronous like the `StateStore` protocol. Leader
election among coordinators sharing the prefix is cdp_coordinator.leader; the
store takes part in it only with its write fence (`set_fence`): once set,
every transaction also compares the election key's create_revision with the
term this coordinator won, and a failed compare raises FencedError, so a
deposed leader that has not noticed yet cannot write.

Node liveness (`save_liveness`): each node the leader hears from has an etcd
lease of its own, TTL the coordinator's node lease rounded up to seconds,
granted the first time and renewed (LeaseKeepAlive, all of one save's leases
on one stream) at every save; its `live/<node>` key is put under it with the
newest heartbeat. A node whose heartbeats stop is renewed no more and its key
disappears with the lease, whichever coordinator leads, so a standby reading
`live/` sees exactly the nodes the leader heard within a lease. A lease found
expired (renewal answered with TTL 0, or a put refused for it) is granted anew.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import grpc

from cdp_common.config import PolicyConfig
from cdp_common.errors import CorruptStateError, FencedError, FormatError, StorageError
from cdp_common.pb.etcd.etcdserverpb import rpc_pb2 as pb
from cdp_common.pb.etcd.etcdserverpb import rpc_pb2_grpc as pbg
from cdp_coordinator.alarms import AlarmEvent
from cdp_coordinator.model import Assignment, NodeInfo
from cdp_coordinator.store import (
    MAX_ALARMS_KEPT,
    SCHEMA_VERSION,
    Liveness,
    Plan,
    Snapshot,
    alarm_event,
    assignment_from_json,
    assignment_to_json,
    plan_from_json,
    plan_to_json,
    policy_from_json,
    policy_to_json,
)

log = logging.getLogger("coord.store")

T = TypeVar("T")

DEFAULT_PREFIX = "/cdp/"
DEFAULT_TIMEOUT_S = 5.0
MAX_TXN_OPS = 128
"""etcd's default `--max-txn-ops`: operations (nested ones included) per transaction."""
CAS_ATTEMPTS = 50
"""Optimistic transactions retried this often under contention before giving up."""
ALARM_ID_DIGITS = 20
ELECTION_KEY = "leader"
"""The leader election key under the prefix (cdp_coordinator.leader)."""
LIST_PAGE = 1000

_CHANNEL_OPTIONS = [
    # etcd restarts in seconds: reconnect soon after, not after gRPC's default
    # backoff that grows to two minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.max_receive_message_length", 64 << 20),
]


def prefix_end(prefix: bytes) -> bytes:
    """The range_end that makes [prefix, end) every key starting with prefix (etcd's rule)."""
    b = bytearray(prefix)
    while b:
        if b[-1] < 0xFF:
            b[-1] += 1
            return bytes(b)
        b.pop()
    return b"\0"   # every key


def ping(endpoint: str, timeout_s: float = 1.0) -> None:
    """One linearizable read: returns once etcd at `endpoint` has a leader and answers.
    Raises grpc.RpcError."""
    with grpc.insecure_channel(endpoint) as channel:
        pbg.KVStub(channel).Range(pb.RangeRequest(key=b"\0", count_only=True), timeout=timeout_s)


def node_to_json(n: NodeInfo) -> str:
    return json.dumps(dataclasses.asdict(n), sort_keys=True)


def node_from_json(text: str) -> NodeInfo:
    """The stored node; unknown keys are ignored. Raises FormatError."""
    try:
        d = json.loads(text)
        if not isinstance(d, dict):
            raise TypeError(f"expected a JSON object, got {type(d).__name__}")
        return NodeInfo(id=str(d["id"]), role=int(d["role"]), site=str(d.get("site", "default")),
                        address=str(d.get("address", "")), capacity=int(d.get("capacity", 0)),
                        metrics_address=str(d.get("metrics_address", "")),
                        pid=int(d.get("pid", 0)))
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(f"stored node: bad or missing {exc}") from None


def alarm_to_json(e: AlarmEvent) -> str:
    return json.dumps({"time_ns": e.time_ns, "policy": e.policy, "kind": str(e.kind),
                       "level": str(e.level), "rpo_lag_s": e.rpo_lag_s, "message": e.message},
                      sort_keys=True)


def alarm_from_json(id: int, text: str) -> AlarmEvent:
    """Raises FormatError."""
    try:
        d = json.loads(text)
        if not isinstance(d, dict):
            raise TypeError(f"expected a JSON object, got {type(d).__name__}")
        return alarm_event(id, int(d["time_ns"]), str(d["policy"]), str(d["kind"]),
                           str(d["level"]), float(d["rpo_lag_s"]), str(d["message"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(f"stored alarm event {id}: bad or missing {exc}") from None


def _put(key: bytes, value: str, lease: int = 0) -> pb.RequestOp:
    return pb.RequestOp(request_put=pb.PutRequest(key=key, value=value.encode(), lease=lease))


def liveness_to_json(e: Liveness) -> str:
    return json.dumps({"seen_wall_ns": e.seen_wall_ns,
                       "payload": base64.b64encode(e.payload).decode()})


def liveness_from_json(node_id: str, text: str) -> Liveness:
    try:
        d = json.loads(text)
        return Liveness(node_id, int(d["seen_wall_ns"]),
                        base64.b64decode(d["payload"], validate=True))
    except (KeyError, TypeError, ValueError) as exc:   # binascii.Error is a ValueError
        raise FormatError(f"stored liveness of node {node_id}: bad or missing {exc}") from None


def _delete(key: bytes, range_end: bytes = b"") -> pb.RequestOp:
    return pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=key, range_end=range_end))


def _unchanged_since(key: bytes, range_end: bytes, revision: int) -> pb.Compare:
    """True when no key of [key, range_end) was written after `revision`."""
    return pb.Compare(key=key, range_end=range_end, target=pb.Compare.MOD,
                      result=pb.Compare.LESS, mod_revision=revision + 1)


class EtcdStore:
    """`StateStore` in etcd v3 (see the module docstring)."""

    def __init__(self, endpoints: Sequence[str], prefix: str = DEFAULT_PREFIX,
                 timeout_s: float = DEFAULT_TIMEOUT_S, max_txn_ops: int = MAX_TXN_OPS) -> None:
        if not endpoints:
            raise StorageError("coordinator.etcd_endpoints: no endpoint given",
                               transient=False)
        self.endpoints = list(endpoints)
        self.prefix = prefix.encode()
        self.timeout_s = timeout_s
        self.max_txn_ops = max_txn_ops
        self._current = 0
        self._channels: dict[int, grpc.Channel] = {}
        self.fence_revision = 0
        """While > 0, every write also requires the election key to have this
        create_revision (this coordinator still leads the term it won), else
        FencedError (`set_fence`)."""
        self.name = f"etcd {', '.join(self.endpoints)} (prefix {prefix!r})"
        self._live_leases: dict[str, int] = {}
        """Node id -> the etcd lease its liveness key is under (`save_liveness`)."""
        try:
            self._check_schema()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ plumbing

    def _key(self, *parts: str) -> bytes:
        return self.prefix + "".join(parts).encode()

    def _range_of(self, section: str) -> tuple[bytes, bytes]:
        start = self._key(section)
        return start, prefix_end(start)

    def _channel(self, i: int) -> grpc.Channel:
        if i not in self._channels:
            self._channels[i] = grpc.insecure_channel(self.endpoints[i],
                                                      options=_CHANNEL_OPTIONS)
        return self._channels[i]

    def _call(self, what: str, fn: Callable[[pbg.KVStub], T]) -> T:
        """`fn(stub)` on the current endpoint, then the others while they are UNAVAILABLE."""
        return self._call_on(what, lambda c: fn(pbg.KVStub(c)))

    def _lease_call(self, what: str, fn: Callable[[pbg.LeaseStub], T]) -> T:
        return self._call_on(what, lambda c: fn(pbg.LeaseStub(c)))

    def _call_on(self, what: str, fn: Callable[[grpc.Channel], T]) -> T:
        n = len(self.endpoints)
        last: grpc.RpcError | None = None
        for k in range(n):
            i = (self._current + k) % n
            try:
                result = fn(self._channel(i))
            except grpc.RpcError as exc:
                last = exc
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    continue
                raise self._error(what, exc) from None
            self._current = i
            return result
        assert last is not None
        raise self._error(what, last, unreachable=True) from None

    def _error(self, what: str, exc: grpc.RpcError, unreachable: bool = False) -> StorageError:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        transient = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        head = f"etcd unreachable at {', '.join(self.endpoints)}" if unreachable else self.name
        name = code.name if code is not None else "?"
        return StorageError(f"{head}: cannot {what}: {name}: {details}", transient=transient)

    def _range(self, what: str, key: bytes, range_end: bytes = b"", revision: int = 0,
               **kw: Any) -> pb.RangeResponse:
        req = pb.RangeRequest(key=key, range_end=range_end, revision=revision, **kw)
        return self._call(what, lambda s: s.Range(req, timeout=self.timeout_s))

    def set_fence(self, revision: int) -> None:
        """Fence every later write on the election key's create_revision being
        `revision` (0: no fence; cdp_coordinator.leader)."""
        self.fence_revision = revision

    def _fence(self) -> list[pb.Compare]:
        if not self.fence_revision:
            return []
        return [pb.Compare(key=self._key(ELECTION_KEY), target=pb.Compare.CREATE,
                           result=pb.Compare.EQUAL, create_revision=self.fence_revision)]

    def _check_fence(self, what: str) -> None:
        """Raise FencedError when the fence no longer holds (another coordinator leads)."""
        if not self.fence_revision:
            return
        resp = self._range("read the election key", self._key(ELECTION_KEY))
        if not resp.kvs or resp.kvs[0].create_revision != self.fence_revision:
            raise FencedError(f"{self.name}: cannot {what}: this coordinator no longer "
                              f"leads (election term {self.fence_revision} is over)")

    def _commit(self, what: str, compare: list[pb.Compare],
                ops: Sequence[pb.RequestOp]) -> bool:
        """One transaction: `ops` if every compare holds (and the fence); returns whether
        it did. Raises FencedError when the fence failed."""
        if not ops:
            return True
        if len(ops) > self.max_txn_ops:
            raise StorageError(f"{self.name}: cannot {what}: {len(ops)} changes in one "
                               f"transaction exceed etcd's --max-txn-ops ({self.max_txn_ops}); "
                               f"raise it on every etcd member and coordinator.etcd_max_txn_ops",
                               transient=False)
        req = pb.TxnRequest(compare=compare + self._fence(), success=ops)
        resp: pb.TxnResponse = self._call(what, lambda s: s.Txn(req, timeout=self.timeout_s))
        if not resp.succeeded:
            self._check_fence(what)
        return resp.succeeded

    def _optimistic(self, what: str, attempt: Callable[[], tuple[list[pb.Compare],
                                                                  list[pb.RequestOp]]]) -> None:
        """Read (inside `attempt`), then commit if nothing read changed; retry otherwise."""
        for _ in range(CAS_ATTEMPTS):
            compare, ops = attempt()
            if self._commit(what, compare, ops):
                return
            log.debug("%s: concurrent write, retrying", what, extra={"peer": self.name})
        raise StorageError(f"{self.name}: cannot {what}: still contended after "
                           f"{CAS_ATTEMPTS} attempts")

    def _corrupt(self, key: bytes, exc: FormatError) -> FormatError:
        return FormatError(f"{self.name}: corrupt coordinator state at "
                           f"{key.decode(errors='replace')}: {exc}")

    def _check_schema(self) -> None:
        key = self._key("meta/schema")
        resp = self._range("read the schema version", key)
        if not resp.kvs:
            # put only if still absent: two coordinators starting together agree
            self._commit("write the schema version",
                         [pb.Compare(key=key, target=pb.Compare.VERSION,
                                     result=pb.Compare.EQUAL, version=0)],
                         [_put(key, str(SCHEMA_VERSION))])
            return
        raw = resp.kvs[0].value
        try:
            version = int(raw)
        except ValueError:
            raise CorruptStateError(f"{self.name}: {key.decode(errors='replace')} is "
                                    f"{raw[:40]!r}, not a schema version") from None
        if version > SCHEMA_VERSION:
            raise FormatError(f"{self.name}: schema version {version} is newer than this "
                              f"coordinator ({SCHEMA_VERSION})")

    # ------------------------------------------------------------ StateStore

    def load(self) -> Snapshot:
        start, end = self._range_of("nodes/")
        first = self._range("read coordinator state", start, end)
        rev = first.header.revision
        pols = self._range("read coordinator state", *self._range_of("policies/"), revision=rev)
        asgs = self._range("read coordinator state", *self._range_of("assignments/"),
                           revision=rev)
        syncs = self._range("read coordinator state", *self._range_of("sync-requests/"),
                            revision=rev)
        drains = self._range("read coordinator state", *self._range_of("drains/"),
                             revision=rev)
        decoded: list[list[Any]] = [[], [], []]
        decoders: list[Callable[[str], Any]] = [node_from_json, policy_from_json,
                                                assignment_from_json]
        for out, decode, resp in zip(decoded, decoders, (first, pols, asgs), strict=True):
            for kv in resp.kvs:
                try:
                    out.append(decode(kv.value.decode()))
                except UnicodeDecodeError as exc:
                    raise self._corrupt(kv.key, FormatError(f"not UTF-8: {exc}")) from None
                except FormatError as exc:
                    raise self._corrupt(kv.key, exc) from None
        n = len(self._key("drains/"))
        return Snapshot(nodes=decoded[0], policies=decoded[1], assignments=decoded[2],
                        sync_requests=self._sync_requests(syncs.kvs),
                        drains=frozenset(kv.key[n:].decode(errors="replace")
                                         for kv in drains.kvs))

    def _sync_requests(self, kvs: Sequence[Any]) -> dict[str, int]:
        n = len(self._key("sync-requests/"))
        out = {}
        for kv in kvs:
            try:
                out[kv.key[n:].decode()] = int(kv.value)
            except (UnicodeDecodeError, ValueError):
                raise self._corrupt(kv.key, FormatError(
                    f"sync request id {kv.value[:40]!r} is not a number")) from None
        return out

    def save_sync_requests(self, requests: dict[str, int]) -> None:
        if not requests:
            return
        start, end = self._range_of("sync-requests/")
        keys = {self._key("sync-requests/", name): rid for name, rid in requests.items()}

        def attempt() -> tuple[list[pb.Compare], list[pb.RequestOp]]:
            resp = self._range("read sync requests", start, end)
            stored = self._sync_requests([kv for kv in resp.kvs if kv.key in keys])
            n = len(start)
            ops = [_put(k, str(rid)) for k, rid in sorted(keys.items())
                   if rid > stored.get(k[n:].decode(), 0)]
            return [_unchanged_since(start, end, resp.header.revision)], ops

        self._optimistic("save sync requests", attempt)

    def save_drains(self, nodes: frozenset[str]) -> None:
        start, end = self._range_of("drains/")
        wanted = {self._key("drains/", n) for n in nodes}

        def attempt() -> tuple[list[pb.Compare], list[pb.RequestOp]]:
            # (etcd refuses a put inside a range the same transaction deletes)
            resp = self._range("read drained nodes", start, end)
            stored = {kv.key for kv in resp.kvs}
            ops = [*(_delete(k) for k in sorted(stored - wanted)),
                   *(_put(k, "1") for k in sorted(wanted - stored))]
            return [_unchanged_since(start, end, resp.header.revision)], ops

        self._optimistic("save drained nodes", attempt)

    def save_node(self, info: NodeInfo) -> None:
        self._commit("save a node", [], [_put(self._key("nodes/", info.id), node_to_json(info))])

    def save_policies(self, policies: list[PolicyConfig]) -> None:
        wanted = {self._key("policies/", p.name): policy_to_json(p) for p in policies}
        start, end = self._range_of("policies/")

        def attempt() -> tuple[list[pb.Compare], list[pb.RequestOp]]:
            resp = self._range("read policies", start, end)
            stored = {kv.key: kv.value for kv in resp.kvs}
            stale = [_delete(k) for k in stored if k not in wanted]
            puts = [_put(k, v) for k, v in wanted.items() if stored.get(k) != v.encode()]
            return [_unchanged_since(start, end, resp.header.revision)], stale + puts

        self._optimistic("save policies", attempt)

    def save_assignments(self, assignments: list[Assignment]) -> None:
        if not assignments:
            return
        given: dict[bytes, Assignment] = {}
        for a in assignments:               # one put per key; the same max rule in the list
            key = self._key("assignments/", a.policy)
            prev = given.get(key)
            given[key] = a if prev is None else dataclasses.replace(
                a, epoch=max(a.epoch, prev.epoch))
        # Each assignment stands alone (its own epoch rule), so a mass rebind (a lost
        # proxy of 150 policies) is written in transactions of at most max_txn_ops;
        # one that fails leaves the earlier ones written, and the caller saves again.
        keys = sorted(given)
        for i in range(0, len(keys), self.max_txn_ops):
            self._save_assignments({k: given[k] for k in keys[i:i + self.max_txn_ops]})

    def _save_assignments(self, given: dict[bytes, Assignment]) -> None:
        start, end = self._range_of("assignments/")

        def attempt() -> tuple[list[pb.Compare], list[pb.RequestOp]]:
            resp = self._range("read assignments", start, end)
            stored = {kv.key: kv.value for kv in resp.kvs if kv.key in given}
            ops = []
            for key, a in given.items():
                epoch = a.epoch
                if key in stored:
                    try:
                        epoch = max(epoch, assignment_from_json(stored[key].decode()).epoch)
                    except (FormatError, UnicodeDecodeError) as exc:
                        # its epoch floor is unknown: never overwrite it with a smaller one
                        raise self._corrupt(key, FormatError(str(exc))) from None
                value = assignment_to_json(dataclasses.replace(a, epoch=epoch))
                if stored.get(key) != value.encode():
                    ops.append(_put(key, value))
            return [_unchanged_since(start, end, resp.header.revision)], ops

        self._optimistic("save assignments", attempt)

    def save_policy(self, policy: PolicyConfig) -> None:
        self._commit("save a policy", [],
                     [_put(self._key("policies/", policy.name), policy_to_json(policy))])

    def delete_policy(self, name: str) -> None:
        self._commit("delete a policy", [], [_delete(self._key("policies/", name))])

    def add_alarms(self, events: list[AlarmEvent]) -> list[AlarmEvent]:
        out: list[AlarmEvent] = []
        per_txn = max(1, (self.max_txn_ops - 2) // 2)   # + counter, levels, pruning
        for i in range(0, len(events), per_txn):
            out += self._add_alarms(events[i:i + per_txn])
        return out

    def _add_alarms(self, events: list[AlarmEvent]) -> list[AlarmEvent]:
        counter = self._key("alarm-last-id")
        out: list[AlarmEvent] = []

        def attempt() -> tuple[list[pb.Compare], list[pb.RequestOp]]:
            resp = self._range("read the alarm counter", counter)
            last, mod = 0, 0
            if resp.kvs:
                mod = resp.kvs[0].mod_revision
                try:
                    last = int(resp.kvs[0].value)
                except ValueError:
                    raise self._corrupt(counter, FormatError(
                        f"alarm counter {resp.kvs[0].value[:40]!r} is not a number")) from None
            out[:] = [dataclasses.replace(e, id=last + i) for i, e in enumerate(events, 1)]
            newest = out[-1].id
            ops = [_put(counter, str(newest))]
            ops += [_put(self._alarm_key(e.id), alarm_to_json(e)) for e in out]
            levels = {e.policy: str(e.level) for e in out}
            ops += [_put(self._key("alarm-levels/", p), lv) for p, lv in levels.items()]
            if newest > MAX_ALARMS_KEPT:    # keep ids > newest - MAX_ALARMS_KEPT (and the new)
                ops.append(_delete(self._key("alarms/"), self._alarm_key(
                    min(newest - MAX_ALARMS_KEPT + 1, last + 1))))
            return [pb.Compare(key=counter, target=pb.Compare.MOD, result=pb.Compare.EQUAL,
                               mod_revision=mod)], ops

        self._optimistic("add alarms", attempt)
        return out

    def _alarm_key(self, id: int) -> bytes:
        return self._key("alarms/", f"{id:0{ALARM_ID_DIGITS}d}")

    def list_alarms(self, policy: str = "", limit: int = 1000) -> list[AlarmEvent]:
        if limit == 0:
            return []
        start, end = self._range_of("alarms/")
        found: list[AlarmEvent] = []
        revision = 0
        while True:                          # newest first, a page at a time
            resp = self._range("read alarms", start, end, revision=revision,
                               limit=LIST_PAGE if policy or limit < 0 else limit,
                               sort_order=pb.RangeRequest.DESCEND,
                               sort_target=pb.RangeRequest.KEY)
            revision = resp.header.revision  # the next pages at the same revision
            for kv in resp.kvs:
                event = self._decode_alarm(kv.key, kv.value)
                if not policy or event.policy == policy:
                    found.append(event)
                    if 0 < limit <= len(found):
                        return found[::-1]
            if not resp.more or not resp.kvs:
                return found[::-1]
            end = resp.kvs[-1].key           # exclusive: the page below the oldest seen

    def _decode_alarm(self, key: bytes, value: bytes) -> AlarmEvent:
        tail = key[len(self._key("alarms/")):]
        try:
            return alarm_from_json(int(tail), value.decode())
        except ValueError as exc:            # a key that is not an id, or not UTF-8
            raise self._corrupt(key, FormatError(f"stored alarm event: {exc}")) from None
        except FormatError as exc:
            raise self._corrupt(key, exc) from None

    def alarm_levels(self) -> dict[str, str]:
        start, end = self._range_of("alarm-levels/")
        resp = self._range("read alarm levels", start, end)
        n = len(start)
        return {kv.key[n:].decode(errors="replace"): kv.value.decode(errors="replace")
                for kv in resp.kvs}

    def save_plan(self, plan: Plan) -> None:
        self._commit("save a plan", [], [_put(self._key("plans/", plan.name),
                                              plan_to_json(plan))])

    def delete_plan(self, name: str) -> None:
        self._commit("delete a plan", [], [_delete(self._key("plans/", name))])

    def list_plans(self) -> list[Plan]:
        return self._plans(self._range("read plans", *self._range_of("plans/")).kvs)

    def get_plan(self, name: str) -> Plan | None:
        found = self._plans(self._range("read a plan", self._key("plans/", name)).kvs)
        return found[0] if found else None

    def _plans(self, kvs: Sequence[Any]) -> list[Plan]:
        out = []
        for kv in kvs:   # etcd returns a range in key order: by name
            try:
                out.append(plan_from_json(kv.value.decode()))
            except UnicodeDecodeError as exc:
                raise self._corrupt(kv.key, FormatError(f"not UTF-8: {exc}")) from None
            except FormatError as exc:
                raise self._corrupt(kv.key, exc) from None
        return out

    def save_liveness(self, entries: list[Liveness], ttl_s: float) -> None:
        if not entries:
            return
        ttl = max(1, math.ceil(ttl_s))
        self._renew_live_leases([e.node_id for e in entries if e.node_id in self._live_leases])
        for e in entries:
            if e.node_id not in self._live_leases:
                self._live_leases[e.node_id] = self._grant(ttl)
        for i in range(0, len(entries), self.max_txn_ops):
            chunk = entries[i:i + self.max_txn_ops]
            try:
                self._put_live(chunk)
            except StorageError as exc:
                if "lease not found" not in str(exc):
                    raise
                for e in chunk:   # expired between the renewal and the put: once more
                    self._live_leases[e.node_id] = self._grant(ttl)
                self._put_live(chunk)

    def _put_live(self, chunk: list[Liveness]) -> None:
        self._commit("save node liveness", [], [
            _put(self._key("live/", e.node_id), liveness_to_json(e),
                 self._live_leases[e.node_id]) for e in chunk])

    def _grant(self, ttl: int) -> int:
        resp: pb.LeaseGrantResponse = self._lease_call(
            "grant a node liveness lease",
            lambda s: s.LeaseGrant(pb.LeaseGrantRequest(TTL=ttl), timeout=self.timeout_s))
        if resp.error or resp.TTL <= 0:
            raise StorageError(f"{self.name}: cannot grant a node liveness lease: "
                               f"{resp.error or 'TTL 0'}")
        return int(resp.ID)

    def _renew_live_leases(self, nodes: list[str]) -> None:
        """Renew these nodes' leases on one keep-alive stream; forget those expired."""
        if not nodes:
            return
        ids = {self._live_leases[n]: n for n in nodes}
        requests = [pb.LeaseKeepAliveRequest(ID=i) for i in ids]
        answers: list[pb.LeaseKeepAliveResponse] = self._lease_call(
            "renew node liveness leases",
            lambda s: list(s.LeaseKeepAlive(iter(requests), timeout=self.timeout_s)))
        renewed = {int(a.ID) for a in answers if a.TTL > 0}
        for lease, node in ids.items():
            if lease not in renewed:
                del self._live_leases[node]

    def load_liveness(self) -> list[Liveness]:
        start, end = self._range_of("live/")
        resp = self._range("read node liveness", start, end)
        out = []
        for kv in resp.kvs:   # key order: by node id
            node = kv.key[len(start):].decode(errors="replace")
            try:
                out.append(liveness_from_json(node, kv.value.decode()))
            except UnicodeDecodeError as exc:
                raise self._corrupt(kv.key, FormatError(f"not UTF-8: {exc}")) from None
            except FormatError as exc:
                raise self._corrupt(kv.key, exc) from None
        return out

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
