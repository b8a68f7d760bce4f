"""One conformance suite for the `ReplicaStore` contract (cdp_target.service), run
against every implementation: the file store (PolicyStore) and the in-memory one."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from cdp_common.delta import Extent, encode_chunks, encode_extent
from cdp_common.errors import FencedError, FormatError, ProtocolError
from cdp_common.fileio_sim import SimIO, kill
from cdp_target.memstore import MemoryStore, MemoryStores
from cdp_target.service import ReplicaStore, ReplicaStores
from cdp_target.store import LocalStores, PolicyStore
from cdp_target.storestate import DiskMismatchError, DiskSpec

pytestmark = pytest.mark.timeout(60)

SIZE = 64 * 1024
DISKS = {0: DiskSpec("vda", SIZE), 1: DiskSpec("vdb", SIZE // 2)}


class Impl:
    """How the suite opens, crashes and inspects one implementation."""

    def __init__(self, kind: str, root: Path) -> None:
        self.kind = kind
        self.root = root
        self.sim: SimIO | None = None
        self.stores: ReplicaStores
        if kind == "memory":
            self.stores = MemoryStores(root / "side")
        else:
            self.sim = SimIO([root / "data"])
            self.stores = LocalStores(root / "data", io=self.sim)

    def open(self, disks: dict[int, DiskSpec] | None = DISKS) -> ReplicaStore:
        return self.stores.open("p1", disks)

    def restart(self, store: ReplicaStore, crash: bool) -> ReplicaStore:
        """Stop the store (kill -9 when `crash`) and open it again."""
        if not crash:
            store.close()
        elif self.sim is not None:
            kill(self.sim)
            self.sim = SimIO([self.root / "data"])
            self.stores = LocalStores(self.root / "data", io=self.sim)
        # a crashed MemoryStore is just dropped: its MemoryDisk is what survives
        return self.open(None)

    def image(self, store: ReplicaStore, disk_id: int) -> bytes:
        if isinstance(store, MemoryStore):
            return store.image(disk_id)
        assert isinstance(store, PolicyStore)
        return store.replica_path(disk_id).read_bytes()


@pytest.fixture(params=["files", "memory"])
def impl(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Impl]:
    yield Impl(request.param, tmp_path)


class Oracle:
    """The images every implementation must hold: base (zeros) + the writes so far."""

    def __init__(self) -> None:
        self.images = {i: bytearray(d.size_bytes) for i, d in DISKS.items()}

    def apply(self, ext: list[Extent]) -> None:
        for e in ext:
            fill = e.data if e.data is not None else bytes(e.length)
            self.images[e.disk_id][e.offset:e.offset + e.length] = fill

    def check(self, impl: Impl, store: ReplicaStore) -> None:
        got = {i: impl.image(store, i) for i in DISKS}
        assert got == {i: bytes(b) for i, b in self.images.items()}


def extents(rng: random.Random, n: int = 4) -> list[Extent]:
    out = []
    for _ in range(n):
        disk = rng.choice(list(DISKS))
        length = rng.choice([512, 4096, 5000])
        offset = rng.randrange(0, DISKS[disk].size_bytes - length)
        out.append(Extent(disk, offset, length,
                          None if rng.random() < 0.2 else rng.randbytes(length)))
    return out


def send(store: ReplicaStore, first: int, last: int, ext: list[Extent]) -> int:
    fresh = store.begin(first, last)
    for chunk in encode_chunks(ext, 4096):
        store.add_chunk(chunk)
    durable = store.commit(last * 1000)
    assert fresh == (durable == last)
    return durable


def test_a_new_store_is_empty(impl: Impl) -> None:
    s = impl.open()
    snap = s.snapshot()
    assert (snap.epoch, snap.durable_seq, snap.applied_seq) == (0, 0, 0)
    assert snap.disks == DISKS
    assert impl.image(s, 0) == bytes(SIZE)
    s.close()


def test_commit_acks_and_apply_writes_the_replica(impl: Impl) -> None:
    s, oracle, rng = impl.open(), Oracle(), random.Random(1)
    seq = 0
    for _ in range(4):
        ext = extents(rng)
        assert send(s, seq + 1, seq + 2, ext) == seq + 2
        oracle.apply(ext)
        seq += 2
    snap = s.snapshot()
    assert (snap.durable_seq, snap.applied_seq, snap.newest_time_ns) == (8, 0, 8000)
    assert s.apply_pending() == 8
    oracle.check(impl, s)
    s.close()


def test_duplicate_is_acked_without_rewriting(impl: Impl) -> None:
    s, oracle = impl.open(), Oracle()
    ext = [Extent(0, 0, 4096, b"x" * 4096)]
    send(s, 1, 4, ext)
    oracle.apply(ext)
    s.apply_pending()
    before = s.snapshot()
    for first, last in ((1, 4), (2, 3), (4, 4)):
        assert s.begin(first, last) is False
        s.add_chunk(encode_extent(Extent(0, 0, 4096, b"y" * 4096)))
        assert s.commit(99) == 4
    assert s.snapshot() == before
    assert s.apply_pending() == 4
    oracle.check(impl, s)
    s.close()


def test_gap_overlap_and_bad_range_are_protocol_errors(impl: Impl) -> None:
    s = impl.open()
    send(s, 1, 3, [])
    for first, last in ((5, 6), (3, 5), (2, 4), (0, 4), (7, 6)):
        with pytest.raises(ProtocolError):
            s.begin(first, last)
    assert s.durable_seq == 3
    send(s, 4, 4, [])
    s.close()


def test_stale_epoch_is_fenced_and_a_newer_one_survives_a_crash(impl: Impl) -> None:
    s = impl.open()
    assert s.open_session(5) == 0
    with pytest.raises(FencedError):
        s.open_session(4)
    assert s.epoch == 5
    s = impl.restart(s, crash=True)
    assert s.epoch == 5
    with pytest.raises(FencedError):
        s.open_session(4)
    assert s.open_session(5) == 0
    s.close()


def test_chunk_or_commit_outside_a_delta_is_a_protocol_error(impl: Impl) -> None:
    s = impl.open()
    with pytest.raises(ProtocolError):
        s.add_chunk(b"")
    with pytest.raises(ProtocolError):
        s.commit(0)
    s.close()


def test_bad_chunk_discards_the_partial_delta(impl: Impl) -> None:
    s = impl.open()
    s.begin(1, 2)
    s.add_chunk(encode_extent(Extent(0, 0, 512, b"a" * 512)))
    with pytest.raises(FormatError):
        s.add_chunk(encode_extent(Extent(9, 0, 512, b"b" * 512)))  # unknown disk
    with pytest.raises(ProtocolError):
        s.commit(0)
    assert s.durable_seq == 0
    assert s.apply_pending() == 0
    assert impl.image(s, 0) == bytes(SIZE)
    s.close()


def test_abort_discards_and_the_resend_is_accepted(impl: Impl) -> None:
    s, oracle = impl.open(), Oracle()
    s.begin(1, 1)
    s.add_chunk(encode_extent(Extent(0, 0, 512, b"a" * 512)))
    s.abort()
    s.abort()
    assert s.durable_seq == 0
    ext = [Extent(0, 0, 512, b"b" * 512)]
    send(s, 1, 1, ext)
    oracle.apply(ext)
    s.apply_pending()
    oracle.check(impl, s)
    s.close()


def test_disks_that_contradict_the_replicas_are_refused(impl: Impl) -> None:
    s = impl.open()
    with pytest.raises(DiskMismatchError, match="shrinking or renaming"):
        s.set_disks({0: DiskSpec("vda", SIZE // 2)})
    with pytest.raises(DiskMismatchError, match="shrinking or renaming"):
        s.set_disks({0: DiskSpec("vdz", SIZE)})
    with pytest.raises(DiskMismatchError):
        s.set_disks({2: DiskSpec("vda", SIZE)})
    s.set_disks({2: DiskSpec("vdc", 4096)})
    assert s.snapshot().disks[2] == DiskSpec("vdc", 4096)
    s.set_disks({0: DiskSpec("vda", SIZE * 2)})      # a grown disk is kept, larger
    assert s.snapshot().disks[0] == DiskSpec("vda", SIZE * 2)
    s = impl.restart(s, False)
    assert s.snapshot().disks[0] == DiskSpec("vda", SIZE * 2)
    s.close()


@pytest.mark.parametrize("crash", [True, False])
def test_restart_keeps_every_ack_and_drops_the_partial_delta(impl: Impl, crash: bool) -> None:
    s, oracle, rng = impl.open(), Oracle(), random.Random(2)
    s.open_session(3)
    for first in (1, 3, 5):
        ext = extents(rng)
        send(s, first, first + 1, ext)
        oracle.apply(ext)
    s.apply_pending()
    ext = extents(rng)
    send(s, 7, 9, ext)  # committed, not applied
    oracle.apply(ext)
    s.begin(10, 12)  # partial at the restart
    s.add_chunk(encode_extent(Extent(0, 0, 512, b"z" * 512)))
    s = impl.restart(s, crash)
    snap = s.snapshot()
    assert (snap.epoch, snap.durable_seq) == (3, 9)
    assert snap.disks == DISKS
    assert s.apply_pending() == 9
    oracle.check(impl, s)
    ext = extents(rng)
    send(s, 10, 12, ext)  # the partial delta is resent after the reconnect
    oracle.apply(ext)
    assert s.apply_pending() == 12
    oracle.check(impl, s)
    s.close()


def test_redo_after_a_crash_is_idempotent(impl: Impl) -> None:
    s, oracle, rng = impl.open(), Oracle(), random.Random(3)
    for first in (1, 2, 3):
        ext = extents(rng, 6)
        send(s, first, first, ext)
        oracle.apply(ext)
    assert s.apply_pending() == 3
    assert s.apply_pending() == 3
    s = impl.restart(s, crash=True)
    assert s.apply_pending() == 3
    oracle.check(impl, s)
    assert s.snapshot().applied_seq == 3
    s.close()
