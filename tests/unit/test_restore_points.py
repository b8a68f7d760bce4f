"""Restore points on a real PolicyStore directory: every point restores to the
oracle prefix image, retention frees space and keeps long-term points exact,
and a crash at every step of apply, compaction and retention (simulated by
leaving exactly the files that step leaves) keeps every listed point exact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from cdp_common.delta import Extent, decode_chunk, encode_chunks
from cdp_common.errors import StorageError
from cdp_common.fsutil import pwrite_all
from cdp_target import points as P
from cdp_target.restore import Failover, FailoverStateError, pick_point, restore_images
from cdp_target.store import DeltaReader, DiskSpec, PolicyStore, delta_name
from cdp_target.undostore import UNDO_DIR

pytestmark = pytest.mark.timeout(60)

SIZE = 256 * 1024
DISKS = {0: DiskSpec("vda", SIZE), 1: DiskSpec("vdb", SIZE // 2)}
S = 1_000_000_000


def random_delta(rng: random.Random) -> list[Extent]:
    """Non-overlapping extents (as the source proxy's coalescer makes them)."""
    out = []
    for disk, spec in DISKS.items():
        starts = sorted(rng.sample(range(0, spec.size_bytes // 4096), rng.randrange(0, 4)))
        for blk in starts:
            length = rng.choice([512, 4096, 3000])
            off = blk * 4096 + rng.randrange(0, 4096 - length + 1)
            out.append(Extent(disk, off, length,
                              None if rng.random() < 0.2 else rng.randbytes(length)))
    return out


class Run:
    """A store fed with random deltas, and the prefix images after each."""

    def __init__(self, directory: Path, seed: int = 1) -> None:
        self.dir = directory
        self.rng = random.Random(seed)
        self.images = {i: bytearray(d.size_bytes) for i, d in DISKS.items()}
        self.prefix: dict[int, dict[int, bytes]] = {0: self.snap()}
        self.seq = 0
        self.now = 1000 * S
        self.store = self.open()

    def open(self) -> PolicyStore:
        store = PolicyStore.open(self.dir, DISKS, apply=False)
        store.undo.now_ns = lambda: self.now
        return store

    def snap(self) -> dict[int, bytes]:
        return {i: bytes(img) for i, img in self.images.items()}

    def commit(self, writes: int = 3) -> tuple[int, int, list[Extent]]:
        first, last = self.seq + 1, self.seq + writes
        ext = random_delta(self.rng)
        self.store.begin(first, last)
        for chunk in encode_chunks(ext, 8192):
            self.store.add_chunk(chunk)
        self.store.commit(self.now)
        self.seq = last
        for e in ext:
            self.images[e.disk_id][e.offset:e.offset + e.length] = (
                e.data if e.data is not None else bytes(e.length))
        self.prefix[last] = self.snap()
        return first, last, ext

    def step(self, n: int = 1, dt_s: float = 2.0) -> None:
        for _ in range(n):
            self.now += int(dt_s * S)
            self.commit()
            self.store.apply_pending()

    def check_all(self, tmp: Path) -> int:
        """Restore every listed point and compare with the oracle; returns how many."""
        cat = self.store.undo.catalog
        for p in cat.points:
            out = tmp / f"r{p.id}-{random.random()}"
            restore_images(self.store, lambda p=p: p, out)
            for i, d in DISKS.items():
                got = (out / f"{d.name}.img").read_bytes()
                assert got == self.prefix[p.last_seq][i], f"point {p.id} disk {d.name}"
            shutil.rmtree(out)
        return len(cat.points)

    def crash_reopen(self) -> None:
        self.store.close()
        self.store = self.open()


def undo_bytes(directory: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in (directory / UNDO_DIR).iterdir())


def test_every_point_restores_to_its_prefix(tmp_path: Path) -> None:
    run = Run(tmp_path / "pol")
    run.step(25)
    assert run.check_all(tmp_path) == 25
    cat = run.store.undo.catalog
    assert [p.last_seq for p in cat.points] == list(range(3, 76, 3))
    assert cat.points[0].kind == P.LONG and all(p.kind == P.SHORT for p in cat.points[1:])
    # JSON of the CLI: times of points are the capture time of their newest write
    assert cat.points[-1].time_ns == run.now


def test_pick_point_by_time_and_id(tmp_path: Path) -> None:
    run = Run(tmp_path / "pol")
    run.step(5)
    pts = run.store.undo.catalog.points
    assert pick_point(run.store, latest=True) == pts[-1]
    assert pick_point(run.store, point_id=pts[1].id) == pts[1]
    assert pick_point(run.store, time_ns=pts[2].time_ns + 1) == pts[2]
    with pytest.raises(Exception, match="no restore point 4"):
        pick_point(run.store, point_id=4)
    with pytest.raises(Exception, match="at or before"):
        pick_point(run.store, time_ns=1)


def test_retention_frees_space_and_keeps_long_term_points(tmp_path: Path) -> None:
    run = Run(tmp_path / "pol")
    run.store.undo.override = {"short_term_retention_s": 20.0, "long_term_interval_s": 30.0,
                               "long_term_retention_s": 100.0}
    run.step(40, dt_s=2.0)
    cat = run.store.undo.catalog
    longs = [p for p in cat.points if p.kind == P.LONG]
    shorts = [p for p in cat.points if p.kind == P.SHORT]
    assert len(longs) >= 3
    assert all(run.now - p.time_ns <= 20 * S for p in shorts)
    # runs between kept points that left the short-term window are one segment each
    for a, b in zip(cat.points, cat.points[1:], strict=False):
        if run.now - b.time_ns > 20 * S:
            run_segs = [s for s in cat.segments if a.last_seq <= s.lo and s.hi <= b.last_seq]
            assert len(run_segs) == 1, (a, b, run_segs)
    assert any(s.hi - s.lo > 3 for s in cat.segments), "nothing was compacted"
    assert run.check_all(tmp_path) == len(cat.points)
    before = undo_bytes(run.dir)
    # everything expires but the newest point: the undo space returns
    run.now += 1000 * S
    run.step(1)
    assert len(run.store.undo.catalog.points) == 1
    assert undo_bytes(run.dir) == 0 < before
    assert run.check_all(tmp_path) == 1


def test_on_demand_long_point_survives_short_retention(tmp_path: Path) -> None:
    run = Run(tmp_path / "pol")
    run.store.undo.override = {"short_term_retention_s": 10.0, "long_term_interval_s": 1e6,
                               "long_term_retention_s": 1e6}
    run.step(5)
    marked = run.store.undo.mark_long(run.store.undo.catalog.points[2].id)
    run.step(20)
    ids = [p.id for p in run.store.undo.catalog.points]
    assert marked.id in ids and marked.on_demand
    assert run.check_all(tmp_path) == len(ids)


# ---------------------------------------------------------------- crashes

def capture_undo(store: PolicyStore, first: int, last: int) -> int | None:
    """Step 1 of applying the committed delta first..last: make its undo durable."""
    with DeltaReader(store.deltas_dir / delta_name(first, last)) as reader:
        def extents() -> Iterator[Extent]:
            for chunk in reader.chunks():
                yield from decode_chunk(chunk, store.disk_sizes)
        return store.undo.before_apply(first - 1, last, extents, store.fds)


def write_replica(store: PolicyStore, ext: list[Extent]) -> None:
    """Step 2 of applying, for `ext` only: their data into the replica images."""
    for e in ext:
        if e.data is not None:
            pwrite_all(store.fds[e.disk_id], e.data, e.offset)


def half_apply(run: Run) -> tuple[int, int]:
    """Commit a delta, capture its undo, write half of it into the replica: a crash mid-apply."""
    first, last, ext = run.commit()
    capture_undo(run.store, first, last)
    write_replica(run.store, ext[: len(ext) // 2 + 1])
    return first, last


@pytest.mark.parametrize("step", ["undo-written", "image-half-written", "catalog-updated"])
def test_crash_during_apply(tmp_path: Path, step: str) -> None:
    run = Run(tmp_path / "pol")
    run.step(6)
    first, last, ext = run.commit()
    size = capture_undo(run.store, first, last)
    if step != "undo-written":
        write_replica(run.store, ext)
    if step == "catalog-updated":
        run.store.undo.after_apply(first - 1, last, run.now, size)
    run.crash_reopen()                  # state.json still says applied = first - 1
    assert run.check_all(tmp_path) == (7 if step == "catalog-updated" else 6)
    run.store.apply_pending()           # redo keeps the first undo capture
    assert run.check_all(tmp_path) == 7


def test_redo_never_recaptures_from_a_half_written_image(tmp_path: Path) -> None:
    run = Run(tmp_path / "pol")
    run.step(4)
    half_apply(run)
    run.crash_reopen()
    run.store.apply_pending()
    assert run.check_all(tmp_path) == 5


@pytest.mark.parametrize("step", ["merged-written", "catalog-swapped"])
def test_crash_during_compaction(tmp_path: Path, step: str) -> None:
    run = Run(tmp_path / "pol")
    run.step(12)
    undo = run.store.undo
    undo.override = {"short_term_retention_s": 5.0, "long_term_interval_s": 7.0,
                     "long_term_retention_s": 1000.0}
    plan = P.plan_retention(undo.catalog, run.now, undo.effective_retention())
    assert plan.merges and plan.delete is not None
    from cdp_target import undo as U
    from cdp_target.undostore import read_segment, write_segment
    sizes = {}
    for m in plan.merges:
        merged = U.merge_oldest_wins(read_segment(undo.seg_path(s), run.store.disk_sizes)
                                     for s in m.old)
        sizes[(m.new.lo, m.new.hi)] = write_segment(undo.seg_path(m.new), m.new.lo, m.new.hi,
                                                    merged)
    listed_before = len(undo.catalog.points)
    if step == "catalog-swapped":
        undo._save(P.finish_merge(plan, sizes))
    run.crash_reopen()
    n = run.check_all(tmp_path)
    assert n == (listed_before if step == "merged-written" else len(plan.catalog.points))
    names = {p.name for p in (run.dir / UNDO_DIR).iterdir()}
    assert names == {s.name for s in run.store.undo.catalog.segments}, "leftovers not removed"


def test_tmp_segment_is_discarded(tmp_path: Path) -> None:
    run = Run(tmp_path / "pol")
    run.step(3)
    (run.dir / UNDO_DIR / "00000000000000000009-00000000000000000012.undo.tmp").write_bytes(b"x")
    run.crash_reopen()
    assert run.check_all(tmp_path) == 3
    assert not list((run.dir / UNDO_DIR).glob("*.tmp"))


def test_corrupt_catalog_is_an_error_not_a_guess(tmp_path: Path) -> None:
    run = Run(tmp_path / "pol")
    run.step(3)
    run.store.close()
    (run.dir / "points.log").unlink()  # a store of the old format (catalog version 1)
    (run.dir / "points.json").write_text(json.dumps({"version": 1, "points": [[5, 1, "x", 0]],
                                                     "segments": []}))
    with pytest.raises(Exception, match="unknown kind"):
        PolicyStore.open(run.dir, DISKS, apply=False)


# ---------------------------------------------------------------- failover

def test_failover_undo_and_commit(tmp_path: Path) -> None:
    run = Run(tmp_path / "pol")
    run.step(6)
    store = run.store
    fo = Failover(store)
    target = store.undo.catalog.points[2]
    done = fo.start(lambda: target)
    assert fo.state == "active" and "is failed over" in fo.refusal()
    for i, d in DISKS.items():
        assert done.images[d.name].read_bytes() == run.prefix[target.last_seq][i]
    with pytest.raises(FailoverStateError):
        fo.start(lambda: target)
    fo.undo()
    assert not fo.state and not (store.dir / "failover").exists()
    # a fresh failover, then writes on the failover image, then commit
    fo.start(lambda: target)
    img = store.dir / "failover" / "vda.img"
    with open(img, "r+b") as f:
        f.write(b"PRODUCTION MOVED")
    fo.commit()
    assert fo.state == "committed" and store.frozen
    assert fo.refusal().startswith("policy pol is frozen: failover committed")
    assert (store.dir / "replicas" / "vda.img").read_bytes()[:16] == b"PRODUCTION MOVED"
    assert len(store.undo.catalog.points) == 1
    # deltas are no longer applied; the state survives a restart
    run.commit()
    assert store.apply_pending() == store.state.applied_seq < store.state.durable_seq
    run.crash_reopen()
    fo2 = Failover(run.store)
    fo2.recover()
    assert fo2.state == "committed" and run.store.frozen
    assert "is frozen" in fo2.refusal()
    with pytest.raises(FailoverStateError):
        fo2.undo()


def test_crash_mid_commit_is_completed_on_open(tmp_path: Path) -> None:
    run = Run(tmp_path / "pol")
    run.step(4)
    fo = Failover(run.store)
    point = run.store.undo.catalog.points[1]
    fo.start(lambda: point)
    doc = {**json.loads(fo.file.read_text()), "state": "committing"}
    fo.file.write_text(json.dumps(doc))
    os.rename(fo.dir / "vda.img", run.store.replica_path(0))   # one disk done, then crash
    run.crash_reopen()
    fo2 = Failover(run.store)
    fo2.recover()
    assert fo2.state == "committed"
    for i in DISKS:
        assert run.store.replica_path(i).read_bytes() == run.prefix[point.last_seq][i]


def test_restore_refuses_a_non_empty_target(tmp_path: Path) -> None:
    run = Run(tmp_path / "pol")
    run.step(2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "vda.img").write_bytes(b"keep me")
    with pytest.raises(StorageError, match="exists"):
        restore_images(run.store, lambda: run.store.undo.catalog.points[0], out)
    assert (out / "vda.img").read_bytes() == b"keep me"


@pytest.mark.parametrize("where", [-1, -40, 0.5, 30])
def test_a_corrupt_undo_segment_fails_the_restore_and_leaves_nothing(
        tmp_path: Path, where: float) -> None:
    run = Run(tmp_path / "pol")
    run.step(6)
    seg = run.store.undo.catalog.segments[2]
    path = run.store.undo.seg_path(seg)
    raw = bytearray(path.read_bytes())
    raw[int(len(raw) * where) if isinstance(where, float) else int(where)] ^= 0x40
    path.write_bytes(bytes(raw))
    out = tmp_path / "out"
    from cdp_common.errors import FormatError
    with pytest.raises(FormatError, match=path.name):
        restore_images(run.store, lambda: run.store.undo.catalog.points[0], out)
    assert list(out.iterdir()) == []
    # points the corrupt segment is not needed for still restore
    newer = run.store.undo.catalog.points[4]
    restore_images(run.store, lambda: newer, out)
    assert (out / "vda.img").read_bytes() == run.prefix[newer.last_seq][0]


def test_restore_over_a_reflinked_copy_zeroes_what_the_undo_zeroes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reflink branch (not on this ext4): a simulated clone, then the map on top."""
    import fcntl

    from cdp_target import restore as R

    def fake_clone(fd: int, request: int, src: int) -> int:
        assert request == R.FICLONE
        size = os.fstat(src).st_size
        os.ftruncate(fd, size)
        off = 0
        while off < size:
            off += os.copy_file_range(src, fd, size - off, off, off)
        return 0
    monkeypatch.setattr(fcntl, "ioctl", fake_clone)
    run = Run(tmp_path / "pol", seed=3)
    run.step(12)
    assert run.check_all(tmp_path) == 12
    out = tmp_path / "one"
    r = restore_images(run.store, lambda: run.store.undo.catalog.points[0], out)
    assert r.method == "reflink"
