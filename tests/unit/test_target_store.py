"""PolicyStore: commit, apply, idempotence, gaps, fencing and crash recovery.

Crashes kill the store on its real code path (`crash`: its SimIO stops every
later file call and closes its descriptors), then some tests rewind files to
what a crash at an earlier step would leave (state.json from before a
rename, delta file still there after its apply, ...) and reopen the
directory. tests/unit/test_target_powerloss.py crashes at every step instead.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

from cdp_common.delta import Extent, encode_chunks, encode_extent
from cdp_common.errors import FencedError, FormatError, ProtocolError, StorageError
from cdp_common.fileio_sim import SimIO, kill
from cdp_target.store import (
    DeltaReader,
    DiskMismatchError,
    DiskSpec,
    PolicyStore,
    delta_name,
)

pytestmark = pytest.mark.timeout(30)

SIZE = 256 * 1024
DISKS = {0: DiskSpec("vda", SIZE), 1: DiskSpec("vdb", SIZE // 2)}


class Oracle:
    """Expected replica contents: base (zeros) + every applied extent, in order."""

    def __init__(self) -> None:
        self.images = {i: bytearray(d.size_bytes) for i, d in DISKS.items()}

    def apply(self, extents: list[Extent]) -> None:
        for e in extents:
            self.images[e.disk_id][e.offset:e.offset + e.length] = (
                e.data if e.data is not None else bytes(e.length))

    def check(self, store_dir: Path) -> None:
        for i, d in DISKS.items():
            got = (store_dir / "replicas" / f"{d.name}.img").read_bytes()
            assert len(got) == d.size_bytes
            assert got == bytes(self.images[i]), f"disk {d.name} differs"


def random_extents(rng: random.Random, n: int = 6) -> list[Extent]:
    out = []
    for _ in range(n):
        disk = rng.choice(list(DISKS))
        size = DISKS[disk].size_bytes
        length = rng.choice([512, 4096, 8192, 3 * 4096 + 17])
        offset = rng.randrange(0, size - length)
        if rng.random() < 0.2:
            out.append(Extent(disk, offset, length, None))
        else:
            out.append(Extent(disk, offset, length, rng.randbytes(length)))
    return out


def send(store: PolicyStore, first: int, last: int, extents: list[Extent],
         newest: int = 0, chunk_bytes: int = 8192) -> int:
    fresh = store.begin(first, last)
    for chunk in encode_chunks(extents, chunk_bytes):
        store.add_chunk(chunk)
    durable = store.commit(newest or last * 1000)
    assert durable >= last
    return int(fresh)


def crashable(directory: Path, disks: dict[int, DiskSpec] | None = None,
              **kw: Any) -> PolicyStore:
    """Open a store whose every file call goes through a SimIO, so `crash` can kill it."""
    return PolicyStore.open(directory, disks, io=SimIO([directory]), **kw)


def crash(store: PolicyStore) -> None:
    """Drop the store like kill -9 would, on its real code path: its SimIO stops
    every later call and closes its descriptors; nothing written is removed."""
    assert isinstance(store.io, SimIO), "open the store with crashable()"
    kill(store.io)


def state(store_dir: Path) -> dict[str, int]:
    return json.loads((store_dir / "state.json").read_text())  # type: ignore[no-any-return]


def crashable_with_delta(directory: Path, seed: int, last: int,
                         n: int = 6) -> tuple[PolicyStore, Oracle, list[Extent]]:
    """A crashable store holding one committed, unapplied random delta 1..last,
    the oracle that expects it, and its extents."""
    store = crashable(directory, DISKS)
    oracle = Oracle()
    ext = random_extents(random.Random(seed), n)
    send(store, 1, last, ext)
    oracle.apply(ext)
    return store, oracle, ext


def reopen_applies(directory: Path, oracle: Oracle, applied_seq: int,
                   gone: tuple[Path, ...] = ()) -> None:
    """Reopen after a crash: the store applies on open up to `applied_seq`,
    the files in `gone` were cleaned up, and the replicas equal the oracle."""
    store = crashable(directory)
    assert store.snapshot().applied_seq == applied_seq
    for path in gone:
        assert not path.exists()
    oracle.check(directory)
    store.close()


def test_commit_then_apply(tmp_path: Path) -> None:
    d = tmp_path / "p1"
    store = PolicyStore.open(d, DISKS)
    oracle = Oracle()
    rng = random.Random(1)
    seq = 0
    for _ in range(5):
        ext = random_extents(rng)
        send(store, seq + 1, seq + 3, ext)
        seq += 3
        oracle.apply(ext)
    st = state(d)
    assert st["durable_seq"] == 15 and st["applied_seq"] == 0
    assert st["newest_time_ns"] == 15000
    assert len(list((d / "deltas").glob("*.delta"))) == 5
    assert store.apply_pending() == 15
    assert state(d)["applied_seq"] == 15
    assert list((d / "deltas").iterdir()) == []
    oracle.check(d)
    store.close()


def test_state_persists_and_disks_recorded(tmp_path: Path) -> None:
    d = tmp_path / "p"
    store = PolicyStore.open(d, DISKS)
    send(store, 1, 2, [Extent(0, 0, 4096, b"a" * 4096)])
    store.note_captured(9)
    send(store, 3, 3, [Extent(1, 4096, 4096, b"b" * 4096)])
    store.close()
    again = PolicyStore.open(d)  # disks from the state
    snap = again.snapshot()
    assert snap.durable_seq == snap.applied_seq == 3
    assert snap.captured_seq == 9
    assert snap.disks == DISKS
    assert snap.bytes_replicated == 2 * (16 + 4096)
    again.close()


def test_duplicate_is_ignored_and_acked(tmp_path: Path) -> None:
    d = tmp_path / "p"
    store = PolicyStore.open(d, DISKS)
    oracle = Oracle()
    ext = [Extent(0, 0, 4096, b"x" * 4096)]
    send(store, 1, 4, ext)
    oracle.apply(ext)
    store.apply_pending()
    before = state(d)
    # Same delta again, and a sub-range of it: ignored, ack = durable seq.
    assert store.begin(1, 4) is False
    store.add_chunk(encode_extent(Extent(0, 0, 4096, b"y" * 4096)))
    assert store.commit(1) == 4
    assert store.begin(2, 3) is False
    assert store.commit(1) == 4
    assert state(d) == before
    assert list((d / "deltas").iterdir()) == []
    store.apply_pending()
    oracle.check(d)
    store.close()


def test_gap_and_overlap_are_protocol_errors(tmp_path: Path) -> None:
    store = PolicyStore.open(tmp_path / "p", DISKS)
    with pytest.raises(ProtocolError, match="does not follow durable seq 0"):
        store.begin(2, 5)
    send(store, 1, 5, [])
    with pytest.raises(ProtocolError, match="gap or overlap"):
        store.begin(4, 8)  # overlap
    with pytest.raises(ProtocolError, match="gap or overlap"):
        store.begin(7, 8)  # gap
    with pytest.raises(ProtocolError, match="bad seq range"):
        store.begin(9, 8)
    with pytest.raises(ProtocolError, match="outside a delta"):
        store.add_chunk(b"")
    assert store.snapshot().durable_seq == 5
    store.close()


def test_empty_delta_advances_durable_seq(tmp_path: Path) -> None:
    d = tmp_path / "p"
    store = PolicyStore.open(d, DISKS)
    send(store, 1, 1, [])
    assert store.apply_pending() == 1
    assert store.snapshot().durable_seq == 1
    Oracle().check(d)
    store.close()


def test_bad_chunk_discards_partial_delta(tmp_path: Path) -> None:
    d = tmp_path / "p"
    store = PolicyStore.open(d, DISKS)
    assert store.begin(1, 2)
    store.add_chunk(encode_extent(Extent(0, 0, 4096, b"a" * 4096)))
    with pytest.raises(FormatError, match="outside disk"):
        store.add_chunk(encode_extent(Extent(1, SIZE, 4096, b"b" * 4096)))
    assert list((d / "deltas").iterdir()) == []
    with pytest.raises(ProtocolError):
        store.commit(0)
    with pytest.raises(FormatError, match="unknown disk"):
        store.begin(1, 2)
        store.add_chunk(encode_extent(Extent(7, 0, 4096, b"a" * 4096)))
    # A clean retry of the same delta works.
    send(store, 1, 2, [Extent(0, 0, 4096, b"c" * 4096)])
    store.apply_pending()
    assert (d / "replicas" / "vda.img").read_bytes()[:4096] == b"c" * 4096
    store.close()


def test_zero_extents_read_as_zeros(tmp_path: Path) -> None:
    d = tmp_path / "p"
    store = PolicyStore.open(d, DISKS)
    send(store, 1, 1, [Extent(0, 0, 64 * 1024, b"\xff" * 64 * 1024)])
    send(store, 2, 2, [Extent(0, 4096, 8192, None), Extent(0, 20000, 100, None)])
    store.apply_pending()
    img = (d / "replicas" / "vda.img").read_bytes()
    assert img[:4096] == b"\xff" * 4096
    assert img[4096:12288] == bytes(8192)
    assert img[12288:20000] == b"\xff" * (20000 - 12288)
    assert img[20000:20100] == bytes(100)
    assert img[20100:65536] == b"\xff" * (65536 - 20100)
    store.close()


def test_fencing(tmp_path: Path) -> None:
    d = tmp_path / "p"
    store = PolicyStore.open(d, DISKS)
    assert store.open_session(5) == 0
    assert store.open_session(5) == 0  # same epoch: a reconnect
    with pytest.raises(FencedError, match="epoch 4 is older than epoch 5"):
        store.open_session(4)
    store.close()
    store = PolicyStore.open(d)
    with pytest.raises(FencedError):
        store.open_session(3)
    store.open_session(6)
    assert state(d)["epoch"] == 6
    store.close()


def test_disk_changes(tmp_path: Path) -> None:
    d = tmp_path / "p"
    PolicyStore.open(d, DISKS).close()
    with pytest.raises(DiskMismatchError, match="disk 0 was 'vda' of 262144 bytes"):
        PolicyStore.open(d, {0: DiskSpec("vda", SIZE // 2)})
    with pytest.raises(DiskMismatchError, match="renaming"):
        PolicyStore.open(d, {0: DiskSpec("vdz", SIZE)})
    with pytest.raises(DiskMismatchError, match="already used"):
        PolicyStore.open(d, {2: DiskSpec("vda", SIZE)})
    with pytest.raises(DiskMismatchError, match="not a valid disk name"):
        PolicyStore.open(d, {3: DiskSpec("../etc", SIZE)})
    # Adding a disk is fine; the old ones stay.
    store = PolicyStore.open(d, {0: DISKS[0], 2: DiskSpec("vdc", 8192)})
    assert set(store.snapshot().disks) == {0, 1, 2}
    assert (d / "replicas" / "vdc.img").stat().st_size == 8192
    store.close()
    # Growing a disk keeps its bytes and adds zeros; the next open agrees.
    replica = d / "replicas" / "vda.img"
    replica.write_bytes(b"\x5a" * SIZE)
    store = PolicyStore.open(d, {0: DiskSpec("vda", SIZE * 2)})
    assert store.snapshot().disks[0] == DiskSpec("vda", SIZE * 2)
    store.close()
    assert replica.read_bytes() == b"\x5a" * SIZE + bytes(SIZE)
    PolicyStore.open(d, None).close()


def test_replicas_are_sparse(tmp_path: Path) -> None:
    d = tmp_path / "p"
    PolicyStore.open(d, {0: DiskSpec("big", 1 << 30)}).close()
    st = (d / "replicas" / "big.img").stat()
    assert st.st_size == 1 << 30
    assert st.st_blocks * 512 < 1 << 20


# ---------------------------------------------------------------- crashes

def test_crash_while_receiving_leaves_no_delta(tmp_path: Path) -> None:
    d = tmp_path / "p"
    store = crashable(d, DISKS)
    send(store, 1, 1, [Extent(0, 0, 4096, b"a" * 4096)])
    store.begin(2, 3)
    store.add_chunk(encode_extent(Extent(0, 0, 4096, b"b" * 4096)))
    crash(store)
    assert any(p.name.startswith("incoming") for p in (d / "deltas").iterdir())
    store = crashable(d)
    assert list((d / "deltas").iterdir()) == []
    assert store.snapshot().durable_seq == store.snapshot().applied_seq == 1
    assert (d / "replicas" / "vda.img").read_bytes()[:4096] == b"a" * 4096
    send(store, 2, 3, [Extent(0, 0, 4096, b"c" * 4096)])  # resent after reconnect
    store.close()


def test_crash_after_commit_before_apply(tmp_path: Path) -> None:
    d = tmp_path / "p"
    store, oracle, _ = crashable_with_delta(d, seed=2, last=3)
    crash(store)
    reopen_applies(d, oracle, 3)


def test_crash_after_rename_before_state_update(tmp_path: Path) -> None:
    """The delta file is durable under its final name; state.json still old."""
    d = tmp_path / "p"
    store = crashable(d, DISKS)
    oracle = Oracle()
    rng = random.Random(3)
    e1, e2 = random_extents(rng), random_extents(rng)
    send(store, 1, 2, e1)
    oracle.apply(e1)
    old_state = (d / "state.json").read_bytes()
    send(store, 3, 5, e2, newest=10**12)
    oracle.apply(e2)
    crash(store)
    (d / "state.json").write_bytes(old_state)
    store = crashable(d)
    snap = store.snapshot()
    assert snap.durable_seq == snap.applied_seq == 5  # rolled forward, then applied
    assert snap.newest_time_ns == 10**12
    oracle.check(d)
    store.close()


def test_crash_after_rename_torn_file_is_discarded(tmp_path: Path) -> None:
    d = tmp_path / "p"
    store = crashable(d, DISKS)
    send(store, 1, 1, [Extent(0, 0, 4096, b"a" * 4096)])
    old_state = (d / "state.json").read_bytes()
    store.begin(2, 2)
    store.add_chunk(encode_extent(Extent(0, 0, 4096, b"b" * 4096)))
    store.commit(0)
    crash(store)
    (d / "state.json").write_bytes(old_state)
    path = d / "deltas" / delta_name(2, 2)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 10)
    store = crashable(d)
    assert store.snapshot().durable_seq == 1
    assert not path.exists()
    assert (d / "replicas" / "vda.img").read_bytes()[:4096] == b"a" * 4096
    store.close()


def test_crash_during_apply_redoes_it(tmp_path: Path) -> None:
    """Replica half-written (garbage in the delta's ranges), applied_seq not updated."""
    d = tmp_path / "p"
    store, oracle, ext = crashable_with_delta(d, seed=4, last=9, n=10)
    committed_state = (d / "state.json").read_bytes()
    delta = d / "deltas" / delta_name(1, 9)
    saved = delta.read_bytes()
    store.apply_pending()
    crash(store)
    (d / "state.json").write_bytes(committed_state)
    delta.write_bytes(saved)
    with open(d / "replicas" / "vda.img", "r+b") as f:
        for e in ext[::2]:
            if e.disk_id == 0:
                f.seek(e.offset)
                f.write(os.urandom(e.length))
    reopen_applies(d, oracle, 9, gone=(delta,))


def test_crash_after_apply_before_unlink(tmp_path: Path) -> None:
    d = tmp_path / "p"
    store, oracle, _ = crashable_with_delta(d, seed=5, last=2)
    delta = d / "deltas" / delta_name(1, 2)
    saved = delta.read_bytes()
    store.apply_pending()
    crash(store)
    delta.write_bytes(saved)
    (d / "state.json.tmp").write_text("{ torn")
    reopen_applies(d, oracle, 2, gone=(delta, d / "state.json.tmp"))


def test_corrupt_committed_delta_is_not_applied(tmp_path: Path) -> None:
    d = tmp_path / "p"
    store = PolicyStore.open(d, DISKS)
    send(store, 1, 1, [Extent(0, 0, 4096, b"a" * 4096)])
    delta = d / "deltas" / delta_name(1, 1)
    raw = bytearray(delta.read_bytes())
    raw[100] ^= 0x01
    delta.write_bytes(raw)
    with pytest.raises(StorageError, match=r"corrupt, not applied: .*checksum"):
        store.apply_pending()
    assert store.snapshot().applied_seq == 0
    assert delta.exists()
    assert (d / "replicas" / "vda.img").read_bytes()[:4096] == bytes(4096)
    store.close()
    with pytest.raises(StorageError):
        PolicyStore.open(d)
    PolicyStore.open(d, apply=False).close()  # the daemon opens and reports instead


def test_missing_delta_is_reported(tmp_path: Path) -> None:
    d = tmp_path / "p"
    store = PolicyStore.open(d, DISKS)
    send(store, 1, 1, [])
    send(store, 2, 2, [])
    (d / "deltas" / delta_name(1, 1)).unlink()
    with pytest.raises(StorageError, match=r"seqs 1\.\.1 is missing"):
        store.apply_pending()
    store.close()


def test_delta_file_format(tmp_path: Path) -> None:
    d = tmp_path / "p"
    store = PolicyStore.open(d, DISKS)
    ext = [Extent(0, 0, 4096, b"q" * 4096), Extent(1, 8192, 4096, None)]
    chunks = list(encode_chunks(ext, 4120))
    assert len(chunks) == 2
    store.begin(1, 7)
    for c in chunks:
        store.add_chunk(c)
    store.commit(123456)
    path = d / "deltas" / delta_name(1, 7)
    raw = path.read_bytes()
    assert raw[:4] == b"CDPD" and raw[-28:-24] == b"CDPT"
    assert len(raw) == 24 + sum(4 + len(c) for c in chunks) + 28
    with DeltaReader(path) as r:
        assert (r.info.first_seq, r.info.last_seq, r.info.chunk_count) == (1, 7, 2)
        assert r.info.payload_bytes == sum(len(c) for c in chunks)
        assert r.info.newest_time_ns == 123456
        assert list(r.chunks()) == chunks
    store.close()


@pytest.mark.parametrize("seed", range(6))
def test_random_crashes(tmp_path: Path, seed: int) -> None:
    """Random deltas with a crash at a random step each round; the end state
    always equals the oracle and durable_seq never goes back."""
    rng = random.Random(seed)
    d = tmp_path / "p"
    store = crashable(d, DISKS)
    oracle = Oracle()
    acked = 0
    for _ in range(12):
        ext = random_extents(rng, rng.randint(0, 8))
        first = store.snapshot().durable_seq + 1
        last = first + rng.randint(0, 4)
        step = rng.choice(["none", "receiving", "renamed", "committed", "applied"])
        snap_state = (d / "state.json").read_bytes()
        if step == "receiving":
            store.begin(first, last)
            for c in list(encode_chunks(ext, 4096))[:1]:
                store.add_chunk(c)
            crash(store)
        else:
            send(store, first, last, ext, chunk_bytes=rng.choice([4096, 65536]))
            oracle.apply(ext)
            if step == "renamed":
                crash(store)
                (d / "state.json").write_bytes(snap_state)
            else:
                acked = last
                if step == "applied":
                    store.apply_pending()
                if step != "none":
                    crash(store)
        if step != "none":
            store = crashable(d)
        assert store.snapshot().durable_seq >= acked
    store.apply_pending()
    oracle.check(d)
    store.close()
    shutil.rmtree(d)
