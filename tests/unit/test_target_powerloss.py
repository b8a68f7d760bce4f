"""Power loss at every step of the target store (issue 9: I1-I3 for the target).

A scripted workload -- open a policy store, receive, commit and apply six
deltas with their undo segments, with a retention tight enough to merge
and drop restore points -- runs once with no crash to learn its steps (every
mutating FileIO call, cdp_common.fileio_sim). Then, for EVERY step, it runs
again with the crash at that step; `power_cut()` drops every write not
fsynced before it (per file) and undoes renames and creations not made
durable by a directory fsync; the store is reopened and must show:

- reopening never raises on a power-cut state (I3);
- every acked seq is durable (durable_seq >= the last ack; I1) and applies;
- the replica equals the oracle image at durable_seq byte for byte, so no
  partial delta was applied and nothing twice (I2, I3);
- every listed restore point restores to the oracle at its seq (I2).
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import pytest

from cdp_common.delta import Extent, encode_chunks
from cdp_common.fileio import OS_IO, FileIO
from cdp_common.fileio_sim import SimIO, SimulatedCrash
from cdp_target.restore import restore_images
from cdp_target.store import DiskSpec, PolicyStore
from cdp_target.undostore import UndoStore

pytestmark = pytest.mark.timeout(120)

DISKS = {0: DiskSpec("vda", 16 * 1024), 1: DiskSpec("vdb", 8 * 1024)}
S = 1_000_000_000
RETENTION = {"short_term_retention_s": 3.0, "long_term_interval_s": 5.0,
             "long_term_retention_s": 1000.0, "compact_run": 2.0}


def _deltas() -> list[tuple[int, int, list[Extent]]]:
    rng = random.Random(9)
    out, seq = [], 0
    for _ in range(6):
        ext = []
        for _ in range(rng.randint(1, 3)):
            disk = rng.choice(list(DISKS))
            length = rng.choice([512, 2048, 4096])
            offset = rng.randrange(0, DISKS[disk].size_bytes - length)
            ext.append(Extent(disk, offset, length,
                              None if rng.random() < 0.25 else rng.randbytes(length)))
        span = rng.randint(1, 3)
        out.append((seq + 1, seq + span, ext))
        seq += span
    return out


DELTAS = _deltas()


def _oracle() -> dict[int, dict[int, bytes]]:
    """Disk images after every write with seq <= k, for every delta boundary k."""
    images = {i: bytearray(d.size_bytes) for i, d in DISKS.items()}
    out = {0: {i: bytes(b) for i, b in images.items()}}
    for _first, last, ext in DELTAS:
        for e in ext:
            images[e.disk_id][e.offset:e.offset + e.length] = (
                e.data if e.data is not None else bytes(e.length))
        out[last] = {i: bytes(b) for i, b in images.items()}
    return out


ORACLE = _oracle()


class Clock:
    def __init__(self) -> None:
        self.now = 1000 * S

    def __call__(self) -> int:
        return self.now


def open_store(d: Path, io: FileIO, clock: Clock) -> PolicyStore:
    undo = UndoStore(d, now_ns=clock, io=io, override=RETENTION)
    return PolicyStore.open(d, DISKS, apply=False, io=io, undo=undo)


def workload(d: Path, io: FileIO, acked: list[int]) -> None:
    """The scripted workload; appends every ack to `acked` as it is given."""
    clock = Clock()
    store = open_store(d, io, clock)
    for first, last, ext in DELTAS:
        clock.now += 2 * S
        store.begin(first, last)
        for chunk in encode_chunks(ext, 2048):
            store.add_chunk(chunk)
        acked.append(store.commit(clock.now))
        store.apply_pending()
    store.close()


def dry_run() -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "p"
        io = SimIO([d])
        acked: list[int] = []
        workload(d, io, acked)
        assert acked == [last for _f, last, _e in DELTAS]
        return list(io.steps)


STEPS = dry_run()

KNOWN_BROKEN: dict[str, str] = {}
"""crash step name -> why an invariant breaks there (xfail strict, names the case)."""


def check_recovered(d: Path, acked: list[int], out: Path) -> None:
    store = PolicyStore.open(d, DISKS, apply=True, io=OS_IO,
                             undo=UndoStore(d, now_ns=Clock(), override=RETENTION))
    try:
        snap = store.snapshot()
        last_ack = max(acked, default=0)
        assert snap.durable_seq >= last_ack, "an acked delta was lost (I1)"
        assert snap.durable_seq in ORACLE, f"durable_seq {snap.durable_seq} is no delta boundary"
        assert snap.applied_seq == snap.durable_seq
        for i, spec in DISKS.items():
            got = store.replica_path(i).read_bytes()
            assert got == ORACLE[snap.durable_seq][i], (
                f"replica {spec.name} differs from the oracle at seq {snap.durable_seq}")
        points = store.undo.catalog.points
        if snap.durable_seq:  # the replica itself is the newest point
            assert points and points[-1].last_seq == snap.durable_seq, points
        for p in points:
            target = out / f"point-{p.id}"
            restore_images(store, lambda p=p: p, target)
            for i, spec in DISKS.items():
                got = (target / f"{spec.name}.img").read_bytes()
                assert got == ORACLE[p.last_seq][i], (
                    f"restore point {p.id} (seq {p.last_seq}) differs on {spec.name}")
    finally:
        store.close()


def _cases() -> list[object]:
    out: list[object] = []
    for n, name in enumerate(STEPS):
        marks = ([pytest.mark.xfail(strict=True, reason=KNOWN_BROKEN[name])]
                 if name in KNOWN_BROKEN else [])
        out.append(pytest.param(n, id=f"{n}-{name.replace(' ', '-')}", marks=marks))
    return out


def test_the_workload_has_every_kind_of_step() -> None:
    kinds = {s.split()[0] for s in STEPS}
    assert {"open", "pwrite", "pwritev", "fsync", "fdatasync", "rename", "fsync_dir",
            "unlink"} <= kinds, kinds
    assert any(s.endswith(".undo") or ".undo" in s for s in STEPS)
    assert 50 < len(STEPS) < 1000


@pytest.mark.parametrize("crash_at", _cases())
def test_power_cut_at_every_step(tmp_path: Path, crash_at: int) -> None:
    d = tmp_path / "p"
    io = SimIO([d], crash_at=crash_at)
    acked: list[int] = []
    with pytest.raises(SimulatedCrash):
        workload(d, io, acked)
    io.power_cut()
    check_recovered(d, acked, tmp_path / "restored")
