"""The source session (cdp_proxy/source.py) through in-memory sinks: no servers.

The test plays the filter by feeding `SourceProxy.Ship` a request iterator and
a fake servicer context, with a MemoryTarget (or a scripted sink) as the
downstream; replicas are compared with an oracle that applied the same writes.
The wrappers of sink.py (throttle, metrics, unreachable reports) are tested on
their own at the end.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from proxyfixtures import DISKS, Writer

from cdp_common import crypto, records, rpc
from cdp_common.config import ProxySection, TlsConfig
from cdp_common.errors import CdpError, RemoteError
from cdp_common.pb.cdp.v1 import replication_pb2 as rpb
from cdp_proxy import metrics
from cdp_proxy.sink import MeteredSink, ThrottledSink, UnreachableReportingSink
from cdp_proxy.sink_memory import MemoryDeltaSink, MemoryTarget
from cdp_proxy.source import SourceProxy
from cdp_proxy.stream import Channels, upstream_status
from cdp_proxy.throttle import TokenBucket

pytestmark = pytest.mark.timeout(30)

KEY = b"k" * 32
RING = crypto.KeyRing.single(KEY)
POLICY = "pol-s"
WAIT_S = 10.0


class Aborted(Exception):
    pass


class FakeContext:
    """The servicer context of one Ship call: what the session wrote, how it ended."""

    def __init__(self) -> None:
        self.out: asyncio.Queue[rpb.ShipResponse] = asyncio.Queue()
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.trailers: Any = ()

    async def write(self, message: rpb.ShipResponse) -> None:
        await self.out.put(message)

    async def abort(self, code: grpc.StatusCode, details: str,
                    trailing_metadata: Any = ()) -> None:
        self.code, self.details, self.trailers = code, details, trailing_metadata
        raise Aborted(details)

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"


class Filter:
    """One Ship call, driven as the filter drives it."""

    def __init__(self, proxy: SourceProxy) -> None:
        self.ctx = FakeContext()
        self.requests: asyncio.Queue[rpb.ShipRequest | None] = asyncio.Queue()
        self.pulled = 0  # requests the session took, the hello included
        self.task = asyncio.create_task(proxy.Ship(self._iter(), self.ctx))  # type: ignore[arg-type]

    async def _iter(self) -> AsyncIterator[rpb.ShipRequest]:
        while (req := await self.requests.get()) is not None:
            self.pulled += 1
            yield req

    def send(self, req: rpb.ShipRequest | None) -> None:
        self.requests.put_nowait(req)

    async def read(self) -> rpb.ShipResponse:
        get = asyncio.ensure_future(self.ctx.out.get())
        done, _ = await asyncio.wait({get, self.task}, timeout=WAIT_S,
                                     return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            return get.result()
        get.cancel()
        raise AssertionError(f"no response; call ended: {self.ctx.code} {self.ctx.details}")

    async def acks_until(self, seq: int) -> list[int]:
        acks: list[int] = []
        while not acks or acks[-1] < seq:
            resp = await self.read()
            assert resp.WhichOneof("body") == "ack"
            acks.append(resp.ack.durable_seq)
        return acks

    async def ended(self) -> tuple[grpc.StatusCode | None, str]:
        """Wait for the call to end; (code, details), code None for a clean end."""
        try:
            await asyncio.wait_for(self.task, WAIT_S)
        except Aborted:
            assert self.ctx.code is not None
        return self.ctx.code, self.ctx.details

    def close(self) -> None:
        self.task.cancel()


def hello(captured: int = 0, epoch: int = 1, encryption: bool = True,
          **kw: Any) -> rpb.ShipRequest:
    kw.setdefault("rpo_interval_s", 0.2)
    return rpb.ShipRequest(hello=rpb.ShipHello(
        policy=POLICY, filter_id="f1", epoch=epoch, disks=DISKS, target_proxy_address="tp:1",
        target_proxy_id="tp", compression_level=1, encryption=encryption,
        captured_seq=captured, target_address="t:1", **kw))


def proxy(target: Any, key: bytes | None = KEY, **section: Any) -> SourceProxy:
    sinks = target.sink if isinstance(target, MemoryTarget) else target
    return SourceProxy("sp", ProxySection(
        role="source", interval_max_bytes=section.pop("interval_max_bytes", 256 << 10),
        frame_bytes=section.pop("frame_bytes", 64 << 10), **section),
        Channels(TlsConfig(insecure=True), 8 << 20),
        crypto.KeyRing.single(key) if key is not None else None, sinks=sinks)


def batch(w: Writer, n: int) -> rpb.ShipRequest:
    return rpb.ShipRequest(batch=rpb.RecordBatch(records=w.random_batch(n), captured_seq=w.seq))


async def welcome(f: Filter) -> int:
    resp = await f.read()
    assert resp.WhichOneof("body") == "welcome"
    return resp.welcome.resume_from_seq


@pytest.mark.parametrize("encryption", [True, False])
async def test_replicates_resumes_and_ends_cleanly(encryption: bool) -> None:
    target = MemoryTarget(RING)
    p = proxy(target)
    f = Filter(p)
    f.send(hello(encryption=encryption))
    assert await welcome(f) == 0
    w = Writer()
    for _ in range(8):
        f.send(batch(w, 30))
    acks = await f.acks_until(w.seq)
    assert acks == sorted(acks) and len(set(acks)) == len(acks)
    assert len(acks) > 1, "the size cap / timer should have cut several deltas"
    assert target.durable_seq(POLICY) == w.seq
    assert target.images(POLICY) == w.oracle
    f.send(None)  # half-close: the call ends cleanly once all is acked
    assert await f.ended() == (None, "")
    # a new stream resumes after the durable seq and carries on
    f = Filter(p)
    f.send(hello(captured=w.seq, encryption=encryption))
    assert await welcome(f) == w.seq
    f.send(batch(w, 5))
    await f.acks_until(w.seq)  # the 100 ms ticker cuts the idle interval
    assert target.images(POLICY) == w.oracle
    f.send(None)
    assert await f.ended() == (None, "")
    assert target.opened == 2


@pytest.mark.parametrize("encryption", [True, False])
async def test_wrong_key_is_permission_denied_answered_and_reported(encryption: bool) -> None:
    """Key confirmation fails at the open, encrypted or not: no welcome, nothing stored."""
    target = MemoryTarget(crypto.KeyRing.single(b"b" * 32))
    p = proxy(target, key=b"a" * 32)
    f = Filter(p)
    f.send(hello(encryption=encryption))
    code, details = await f.ended()
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "wrong key or tampered open" in details and POLICY in details
    assert dict(f.ctx.trailers).get(rpc.ANSWERED_KEY) == "1"
    assert target.durable_seq(POLICY) == 0
    assert [pol for pol, _ in p.errors.items()] == [POLICY]


async def test_malformed_batch_and_seq_gap_are_invalid_argument() -> None:
    p = proxy(MemoryTarget(RING))
    bad = bytearray(records.encode(1, 1, 0, 0, b"x" * 100))
    bad[50] ^= 1
    for batch, text in [(bytes(bad), "malformed record batch"),
                        (records.encode(5, 1, 0, 0, b"x"), "out of order")]:
        f = Filter(p)
        f.send(hello())
        assert await welcome(f) == 0
        f.send(rpb.ShipRequest(batch=rpb.RecordBatch(records=batch)))
        code, details = await f.ended()
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert text in details and details.startswith(f"policy {POLICY!r}: ")


@pytest.mark.parametrize(("first", "code", "text"), [
    (rpb.ShipRequest(batch=rpb.RecordBatch()), grpc.StatusCode.INVALID_ARGUMENT,
     "the first message of a Ship stream must be a hello"),
    (hello(rpo_interval_s=float("nan")), grpc.StatusCode.INVALID_ARGUMENT,
     f"policy {POLICY!r}: bad rpo_interval_s nan"),
])
async def test_bad_first_message(first: rpb.ShipRequest, code: grpc.StatusCode,
                                 text: str) -> None:
    target = MemoryTarget(RING)
    f = Filter(proxy(target))
    f.send(first)
    assert await f.ended() == (code, text)
    assert target.opened == 0


@pytest.mark.parametrize("encryption", [True, False])
async def test_a_proxy_without_a_key_serves_no_session(encryption: bool) -> None:
    target = MemoryTarget(RING)
    f = Filter(proxy(target, key=None))
    f.send(hello(encryption=encryption))
    code, details = await f.ended()
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert details == (f"policy {POLICY!r}: this proxy has no key_file: every session proves "
                       "the master key, with encryption on or off")
    assert target.opened == 0


async def test_older_epoch_is_failed_precondition() -> None:
    target = MemoryTarget(RING)
    p = proxy(target)
    f = Filter(p)
    f.send(hello(epoch=5))
    assert await welcome(f) == 0
    f.close()
    stale = Filter(p)
    stale.send(hello(epoch=4))
    code, details = await stale.ended()
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "epoch 4 is older than epoch 5" in details


async def test_backpressure_stops_reading_the_filter() -> None:
    target = MemoryTarget(RING)
    target.hold_acks()
    p = proxy(target, inflight_max_bytes=512 << 10, interval_max_bytes=256 << 10)
    f = Filter(p)
    f.send(hello())
    assert await welcome(f) == 0
    w = Writer()
    for i in range(200):  # 200 x 64 KiB of incompressible data = 12.5 MiB
        f.send(rpb.ShipRequest(batch=rpb.RecordBatch(
            records=w.record(0, (i % 16) * 65536, os.urandom(65536)))))
    inflight_before = metrics.INFLIGHT._value.get()
    await asyncio.sleep(0.8)
    # in flight: at most inflight_max, plus one interval, plus one batch
    assert f.pulled <= 1 + (512 + 256) // 64 + 2, f.pulled
    assert metrics.INFLIGHT._value.get() - inflight_before <= (512 + 256 + 64) << 10
    target.release_acks()
    await f.acks_until(w.seq)
    assert f.pulled == 1 + 200
    assert target.images(POLICY)[0] == w.oracle[0]
    f.close()


class ScriptedSink:
    """A sink whose open fails with `error`, or whose acks end (None) at once."""

    peer = "target proxy tp:1"

    def __init__(self, error: CdpError | None = None) -> None:
        self.error = error
        self.closed = 0

    async def open(self, request: rpb.SessionOpen) -> int:
        if self.error is not None:
            raise self.error
        return 0

    async def send(self, frame: rpb.DeltaFrame) -> None:
        pass

    async def ack(self) -> int | None:
        return None

    def close(self) -> None:
        self.closed += 1


def remote(code: grpc.StatusCode, answered: bool, details: str = "boom") -> RemoteError:
    trailers = grpc.aio.Metadata(*((rpc.ANSWERED_KEY, "1"),) if answered else ())
    return rpc.remote_error(grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailers, details),
                            "target proxy tp:1")


@pytest.mark.parametrize(("error", "upstream", "reported"), [
    # a permanent answer passes upstream; anything else is UNAVAILABLE
    (remote(grpc.StatusCode.FAILED_PRECONDITION, True), grpc.StatusCode.FAILED_PRECONDITION,
     False),
    (remote(grpc.StatusCode.PERMISSION_DENIED, True), grpc.StatusCode.PERMISSION_DENIED, False),
    (remote(grpc.StatusCode.INVALID_ARGUMENT, False), grpc.StatusCode.UNAVAILABLE, False),
    (remote(grpc.StatusCode.RESOURCE_EXHAUSTED, True), grpc.StatusCode.UNAVAILABLE, False),
    (remote(grpc.StatusCode.UNAVAILABLE, True), grpc.StatusCode.UNAVAILABLE, False),
    # only an UNAVAILABLE that no node answered is a target proxy out of reach
    (remote(grpc.StatusCode.UNAVAILABLE, False), grpc.StatusCode.UNAVAILABLE, True),
    (remote(grpc.StatusCode.DEADLINE_EXCEEDED, False), grpc.StatusCode.UNAVAILABLE, False),
])
async def test_downstream_failure_becomes_the_upstream_status(
        error: RemoteError, upstream: grpc.StatusCode, reported: bool) -> None:
    sink = ScriptedSink(error)
    p = proxy(lambda _hello: sink)
    reports: list[tuple[str, str, str, str]] = []

    async def on_unreachable(*args: str) -> None:
        reports.append(args)  # type: ignore[arg-type]
    p.on_unreachable = on_unreachable
    f = Filter(p)
    f.send(hello())
    code, details = await f.ended()
    assert code == upstream
    assert details == f"policy {POLICY!r}: target proxy tp:1: boom"
    assert sink.closed >= 1
    await asyncio.sleep(0)
    expected = [("tp", "tp:1", POLICY, f"{error.code}: boom")] if reported else []
    assert reports == expected


async def test_downstream_that_ends_the_stream_is_unavailable() -> None:
    sink = ScriptedSink()
    f = Filter(proxy(lambda _hello: sink))
    f.send(hello())
    assert await welcome(f) == 0
    code, details = await f.ended()
    assert code == grpc.StatusCode.UNAVAILABLE
    assert details == f"policy {POLICY!r}: target proxy tp:1 closed the stream"
    assert sink.closed >= 1


def test_upstream_status_of_local_errors() -> None:
    from cdp_common.errors import AuthenticationError, FormatError, ProtocolError
    assert upstream_status(ProtocolError("x")) == "INVALID_ARGUMENT"
    assert upstream_status(FormatError("x")) == "INVALID_ARGUMENT"
    assert upstream_status(AuthenticationError("x")) == "PERMISSION_DENIED"


# ---------------------------------------------------------------- wrappers

class Recorder:
    peer = "inner"

    def __init__(self) -> None:
        self.sent: list[int] = []
        self.opened = 0

    async def open(self, request: rpb.SessionOpen) -> int:
        self.opened += 1
        return 7

    async def send(self, frame: rpb.DeltaFrame) -> None:
        self.sent.append(len(frame.envelope))

    async def ack(self) -> int | None:
        return 9

    def close(self) -> None:
        pass


async def test_throttled_sink_waits_for_tokens() -> None:
    now = [100.0]
    sleeps: list[float] = []

    async def sleep(s: float) -> None:
        sleeps.append(s)
        now[0] += s

    inner = Recorder()
    sink = ThrottledSink(inner, TokenBucket(1000.0, now[0], burst=1000.0), lambda: now[0], sleep)
    for _ in range(3):
        await sink.send(rpb.DeltaFrame(envelope=b"x" * 600))
    assert inner.sent == [600, 600, 600]
    assert sleeps == pytest.approx([0.2, 0.6])  # 1000 burst, then 1000 B/s
    assert await sink.open(rpb.SessionOpen()) == 7 and await sink.ack() == 9
    assert sink.peer == "inner"


async def test_metered_sink_counts_bytes_out() -> None:
    counter = metrics.BYTES_OUT.labels("source")
    before = counter._value.get()
    inner = Recorder()
    sink = MeteredSink(inner)
    await sink.send(rpb.DeltaFrame(envelope=b"y" * 123))
    assert counter._value.get() - before == 123
    assert inner.sent == [123]


async def test_reporting_sink_reports_only_an_unanswered_unavailable() -> None:
    details: list[str] = []
    for error, expected in [(remote(grpc.StatusCode.UNAVAILABLE, False), 1),
                            (remote(grpc.StatusCode.UNAVAILABLE, True), 1),
                            (remote(grpc.StatusCode.PERMISSION_DENIED, False), 1)]:
        sink = UnreachableReportingSink(ScriptedSink(error), details.append)
        with pytest.raises(RemoteError):
            await sink.open(rpb.SessionOpen())
        assert len(details) == expected
    assert details == ["UNAVAILABLE: boom"]
    ok = UnreachableReportingSink(Recorder(), details.append)
    assert await ok.open(rpb.SessionOpen()) == 7
    assert len(details) == 1


async def test_a_rotated_ring_reopens_the_session_under_the_new_key() -> None:
    """SIGHUP with a new current key: the open session ends as transient (the filter
    reconnects at once) and the next one seals with the new key id."""
    target = MemoryTarget(RING)
    p = proxy(target)
    f = Filter(p)
    f.send(hello())
    assert await welcome(f) == 0
    w = Writer()
    f.send(batch(w, 10))
    await f.acks_until(w.seq)
    rotated = RING.rotated(b"n" * 32)
    target.keys = rotated  # the target proxy reloads first
    p.keys = rotated       # then the source proxy
    code, details = await f.ended()
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "reopening the session under key id 1 (was 0)" in details
    f = Filter(p)
    f.send(hello(captured=w.seq))
    assert await welcome(f) == w.seq
    f.send(batch(w, 10))
    await f.acks_until(w.seq)
    assert target.images(POLICY) == w.oracle
    # the old key retired at the target: sessions under key id 1 carry on
    target.keys = crypto.KeyRing(rotated.keys[:1])
    f.send(batch(w, 5))
    await f.acks_until(w.seq)
    assert target.images(POLICY) == w.oracle
    f.send(None)
    assert await f.ended() == (None, "")


async def test_one_inflight_budget_for_the_whole_proxy() -> None:
    """Two sessions, each allowed 2 MiB in flight, share a 512 KiB proxy-wide budget:
    together they stop reading at about the budget (plus one open interval and one
    batch each), not at twice the per-session cap; acks free it for both."""
    target = MemoryTarget(RING)
    target.hold_acks()
    p = proxy(target, inflight_max_bytes=2 << 20, proxy_inflight_max_bytes=512 << 10,
              interval_max_bytes=256 << 10)
    writers, filters = {}, {}
    for name in ("pol-a", "pol-b"):
        f = filters[name] = Filter(p)
        h = hello().hello
        h.policy = name
        f.send(rpb.ShipRequest(hello=h))
        assert await welcome(f) == 0
        w = writers[name] = Writer()
        for i in range(60):  # 60 x 64 KiB of incompressible data per session
            f.send(rpb.ShipRequest(batch=rpb.RecordBatch(
                records=w.record(0, (i % 16) * 65536, os.urandom(65536)))))
    await asyncio.sleep(0.8)
    pulled = sum(f.pulled for f in filters.values())
    # 2 hellos + the budget (8 batches) + one open interval (4) and one batch each
    assert pulled <= 2 + 8 + 2 * (4 + 1), pulled
    assert p.budget.full()
    target.release_acks()
    for name, f in filters.items():
        await f.acks_until(writers[name].seq)
        assert f.pulled == 1 + 60
        assert target.images(name)[0] == writers[name].oracle[0]
    for f in filters.values():
        f.send(None)
        assert (await f.ended())[0] is None
    assert p.budget.used == 0


class _LyingSink(MemoryDeltaSink):
    """A downstream that acks 1000 seqs beyond what it got."""

    async def ack(self) -> int | None:
        got = await super().ack()
        return None if got is None else got + 1000


async def test_an_ack_above_what_was_sent_is_a_protocol_error() -> None:
    """The filter would trim records the target never got: the session ends instead,
    and the lie is not passed on."""
    target = MemoryTarget(RING)
    p = proxy(lambda hello: _LyingSink(target))
    f = Filter(p)
    f.send(hello())
    assert await welcome(f) == 0
    w = Writer()
    f.send(batch(w, 10))
    code, details = await f.ended()
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert "above the last seq sent" in details


# ---------------------------------------------------------------- consistency groups

class PeerContext(FakeContext):
    """A unary call's context, with the caller's certificate (None: plaintext)."""

    def __init__(self, pem: bytes | None = None) -> None:
        super().__init__()
        self.pem = pem

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"x509_pem_cert": [self.pem]} if self.pem else {}


async def test_checkpoint_answers_out_of_band_mark_the_round_only_from_the_filter(
        tmp_path: Any) -> None:
    """AnswerCheckpoint (not queued behind record batches): both members' answers
    make the proxy mark; an answer for no open session, another epoch or from
    another certificate than the session's filter is refused and counts for nothing."""
    from cdp_common import pki
    from cdp_common.pb.cdp.v1 import assignment_pb2 as apb
    ca_pem, ca_key = pki.create_ca(tmp_path / "pki")
    pki.create_node_cert(ca_pem, ca_key, tmp_path / "pki", "f9", [], role="filter")
    other = PeerContext((tmp_path / "pki" / "f9.pem").read_bytes())
    p = proxy(MemoryTarget(RING))
    filters: dict[str, Filter] = {}
    for fid, name in (("f1", "g..f1"), ("f2", "g..f2")):
        f = filters[name] = Filter(p)
        h = hello(rpo_interval_s=1.0).hello   # answers are awaited for 0.5 s
        h.policy, h.filter_id = name, fid
        h.assignment.claims = apb.AssignmentClaims(
            policy=name, epoch=1, filter_id=fid, group="g",
            group_members=["g..f1", "g..f2"]).SerializeToString()
        f.send(rpb.ShipRequest(hello=h))
        assert await welcome(f) == 0
    holds = {n: (await f.read()) for n, f in filters.items()}
    assert {r.WhichOneof("body") for r in holds.values()} == {"hold"}
    (cid,) = {r.hold.checkpoint_id for r in holds.values()}
    held = rpb.CheckpointHeld(checkpoint_id=cid)
    for request, ctx, code in (
            (rpb.CheckpointAnswer(policy="g..f1", epoch=1, held=held), other,
             grpc.StatusCode.PERMISSION_DENIED),
            (rpb.CheckpointAnswer(policy="g..f1", epoch=7, held=held), PeerContext(),
             grpc.StatusCode.NOT_FOUND),
            (rpb.CheckpointAnswer(policy="nope", epoch=1, held=held), PeerContext(),
             grpc.StatusCode.NOT_FOUND)):
        with pytest.raises(Aborted):
            await p.AnswerCheckpoint(request, ctx)  # type: ignore[arg-type]
        assert ctx.code == code, ctx.details
    for name in filters:
        await p.AnswerCheckpoint(rpb.CheckpointAnswer(  # type: ignore[arg-type]
            policy=name, epoch=1, held=held), PeerContext())
    for f in filters.values():
        resp = await f.read()
        assert resp.WhichOneof("body") == "mark" and resp.mark.checkpoint_id == cid
    for f in filters.values():
        f.close()
