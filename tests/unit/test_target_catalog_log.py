"""The restore-point catalog as an append-only log (cdp_target.catalogfile, issue 13 item 4).

- appends survive a reopen; the log replays to exactly the catalog in memory;
- a torn last record, cut at every byte or zero-filled from any byte, loads the
  points before it exactly, and the next append does not follow the garbage;
- a damaged record anywhere before the last is CorruptStateError, never skipped;
- compaction after retention keeps exactly the surviving points (and they restore);
- sizes by the one-pass table equal the old per-point definition, at 7,200 points;
- a catalog of the old format (points.json) loads and is upgraded by the first change;
- power cut or kill at every step of an append, a compaction and an upgrade leaves
  the catalog before or after, nothing else; a failed append is followed by a
  compaction.
"""

from __future__ import annotations

import contextlib
import random
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdp_common import statefile
from cdp_common.delta import Extent, encode_chunks
from cdp_common.errors import CorruptStateError
from cdp_common.fileio import OS_IO, FileIO, OsFileIO
from cdp_common.fileio_sim import SimIO, SimulatedCrash, kill, steps_of
from cdp_target import catalogfile as CF
from cdp_target import points as P
from cdp_target.restore import restore_images
from cdp_target.restore_service import point_pb
from cdp_target.store import DiskSpec, PolicyStore
from cdp_target.undostore import CATALOG_FILE, CATALOG_KIND, OLD_CATALOG_FILE, UndoStore

pytestmark = pytest.mark.timeout(120)

S = 1_000_000_000
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])


def oracle_size(cat: P.Catalog, point: P.Point) -> int:
    """The definition of a point's size, as the listing computed it before (quadratic)."""
    newer = [p.last_seq for p in cat.points if p.last_seq > point.last_seq]
    if not newer:
        return 0
    return sum(s.size_bytes for s in cat.segments
               if s.lo >= point.last_seq and s.hi <= newer[0])


def evolve(cat: P.Catalog, rng: random.Random, steps: int, now: list[int],
           retention: P.Retention | None = None) -> P.Catalog:
    """Random applied deltas, on-demand marks and retention passes (merged sizes made up)."""
    seq = cat.newest.last_seq if cat.newest else 0
    for _ in range(steps):
        now[0] += 2 * S
        hi = seq + rng.randint(1, 3)
        cat = cat.with_applied(seq, hi, now[0], rng.randrange(0, 1 << 20))
        seq = hi
        if rng.random() < 0.05 and cat.points:
            cat = cat.mark_long(rng.choice(cat.points).id)
        if retention is not None and rng.random() < 0.3:
            plan = P.plan_retention(cat, now[0], retention)
            cat = P.finish_merge(plan, {(m.new.lo, m.new.hi): sum(s.size_bytes for s in m.old)
                                        for m in plan.merges})
    return cat


TIGHT = P.Retention(short_term_retention_s=20.0, long_term_interval_s=30.0,
                    long_term_retention_s=200.0, compact_run=4)


def open_undo(d: Path, io: FileIO = OS_IO, applied: int = 0) -> UndoStore:
    u = UndoStore(d, io=io)
    u.recover(applied, 0)
    return u


def feed(u: UndoStore, n: int, rng: random.Random, t0: int = 1000 * S) -> None:
    """n applied deltas straight into the undo store (sizes only: no segment files)."""
    seq = u.catalog.newest.last_seq if u.catalog.newest else 0
    t = max(t0, u.catalog.newest.time_ns if u.catalog.newest else 0)
    for _ in range(n):
        hi, t = seq + rng.randint(1, 3), t + 2 * S
        u.after_apply(seq, hi, t, rng.randrange(1, 1 << 16))
        seq = hi


def record_starts(raw: bytes) -> list[int]:
    """Byte offsets of every record of a valid log, and its end."""
    pos, out = CF.HEADER_SIZE, []
    while pos < len(raw):
        out.append(pos)
        pos += CF.FRAME_SIZE + int.from_bytes(raw[pos:pos + 4], "little")
    assert pos == len(raw)
    return [*out, pos]


def load_raw(d: Path, raw: bytes) -> P.Catalog:
    (d / CATALOG_FILE).write_bytes(raw)
    return CF.CatalogLog(d / CATALOG_FILE).load()


# ---------------------------------------------------------------- codec

patch_st = st.builds(
    CF.Patch,
    drop_points=st.lists(st.integers(0, 2**64 - 1), max_size=5).map(tuple),
    put_points=st.lists(st.builds(P.Point, st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1),
                                  st.sampled_from([P.SHORT, P.LONG]), st.booleans()),
                        max_size=5).map(tuple),
    drop_segments=st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
                           max_size=5).map(tuple),
    put_segments=st.lists(st.builds(P.Segment, st.integers(0, 2**64 - 1),
                                    st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
                          max_size=5).map(tuple),
    clear=st.booleans())


@SETTINGS
@given(patch_st)
def test_record_round_trip(patch: CF.Patch) -> None:
    raw = CF.encode_record(patch)
    assert CF.decode_body(memoryview(raw)[CF.FRAME_SIZE:], "x") == patch


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 60), st.integers(1, 60))
def test_diff_replays_to_the_new_catalog(seed: int, n1: int, n2: int) -> None:
    rng, now = random.Random(seed), [1000 * S]
    a = evolve(P.Catalog(), rng, n1, now, TIGHT)
    b = evolve(a, rng, n2, now, TIGHT)
    assert CF.replay([CF.snapshot(a), CF.diff(a, b)]) == b
    assert CF.replay([CF.snapshot(b), CF.diff(b, a)]) == a
    assert CF.diff(b, b).empty


# ---------------------------------------------------------------- sizes

@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 200))
def test_sizes_equal_the_old_definition(seed: int, n: int) -> None:
    cat = evolve(P.Catalog(), random.Random(seed), n, [1000 * S], TIGHT)
    cat.check()
    assert {p.id: oracle_size(cat, p) for p in cat.points} == dict(cat.sizes)


def test_listing_7200_points_has_the_old_sizes() -> None:
    """4 h at a 2 s RPO, with on-demand points and merged runs behind them."""
    rng, now = random.Random(13), [1000 * S]
    cat = evolve(P.Catalog(), rng, 7200, now)  # default retention: all 7,200 kept
    long_ago = P.Retention(short_term_retention_s=1e9, long_term_interval_s=600.0,
                           long_term_retention_s=1e9, compact_run=16)
    plan = P.plan_retention(cat, now[0], long_ago)
    cat = P.finish_merge(plan, {(m.new.lo, m.new.hi): 7 for m in plan.merges})
    assert len(cat.points) == 7200
    listed = [point_pb(cat, p) for p in cat.points]
    # the oracle is quadratic: check every 37th point, and the sum of them all
    for info in listed[::37]:
        assert info.size_bytes == oracle_size(cat, cat.point(info.id))  # type: ignore[arg-type]
    assert sum(i.size_bytes for i in listed) == cat.total_bytes()
    assert listed[-1].size_bytes == 0


# ---------------------------------------------------------------- the log on disk

def test_appends_survive_reopen(tmp_path: Path) -> None:
    rng = random.Random(1)
    u = open_undo(tmp_path)
    feed(u, 40, rng)
    u.mark_long(u.catalog.points[5].id)
    size_after_first = (tmp_path / CATALOG_FILE).stat().st_size
    feed(u, 1, rng)
    record = (tmp_path / CATALOG_FILE).stat().st_size - size_after_first
    assert record < 100, f"one delta appended {record} bytes: not an append"
    again = open_undo(tmp_path, applied=u.catalog.newest.last_seq)  # type: ignore[union-attr]
    assert again.catalog == u.catalog and len(again.catalog.points) == 41
    assert not (tmp_path / OLD_CATALOG_FILE).exists()


def test_torn_last_record_at_every_byte_loads_the_points_before(tmp_path: Path) -> None:
    rng = random.Random(2)
    u = open_undo(tmp_path)
    feed(u, 5, rng)
    before = u.catalog
    feed(u, 1, rng)
    after = u.catalog
    raw = (tmp_path / CATALOG_FILE).read_bytes()
    last = record_starts(raw)[-2]
    assert load_raw(tmp_path, raw) == after
    for cut in range(last, len(raw)):
        assert load_raw(tmp_path, raw[:cut]) == before, f"cut at byte {cut}"
        assert (tmp_path / CATALOG_FILE).stat().st_size == last, "torn tail not cut"
        # a size extended over bytes never written: zeros from any byte on
        zeroed = raw[:cut] + bytes(len(raw) - cut)
        if zeroed != raw:  # (its last bytes may be zeros already)
            assert load_raw(tmp_path, zeroed) == before, f"zeros from byte {cut}"


@SETTINGS
@given(st.data())
def test_torn_tail_then_append_never_reads_garbage(tmp_path: Path, data: st.DataObject) -> None:
    d = Path(tempfile.mkdtemp(dir=tmp_path))
    rng = random.Random(data.draw(st.integers(0, 1000)))
    u = open_undo(d)
    feed(u, 4, rng)
    before = u.catalog
    feed(u, 1, rng)
    raw = (d / CATALOG_FILE).read_bytes()
    last = record_starts(raw)[-2]
    cut = data.draw(st.integers(last, len(raw) - 1))
    if cut >= last + 8:  # the length and its check are there: anything may follow
        tail = data.draw(st.binary(max_size=len(raw) - cut))
    else:  # a part of the frame, then zeros (a size extended over unwritten bytes)
        tail = bytes(data.draw(st.integers(0, len(raw) - cut)))
    (d / CATALOG_FILE).write_bytes(raw[:cut] + tail)
    u2 = open_undo(d, applied=before.newest.last_seq)  # type: ignore[union-attr]
    assert u2.catalog == before
    feed(u2, 2, rng)
    assert open_undo(d).catalog == u2.catalog


def test_damaged_record_before_the_last_is_an_error(tmp_path: Path) -> None:
    rng = random.Random(3)
    u = open_undo(tmp_path)
    feed(u, 4, rng)
    raw = (tmp_path / CATALOG_FILE).read_bytes()
    starts = record_starts(raw)
    last = starts[-2]
    for i in range(last):   # every byte of the header and of every record but the last
        bad = bytearray(raw)
        bad[i] ^= 0x5A
        with pytest.raises(CorruptStateError, match=r"corrupt|magic|version|reserved"):
            load_raw(tmp_path, bytes(bad))
    # the message says where and why
    bad = bytearray(raw)
    bad[starts[1] + CF.FRAME_SIZE + 3] ^= 1
    with pytest.raises(CorruptStateError, match=r"record 1 at byte \d+: checksum mismatch"):
        load_raw(tmp_path, bytes(bad))
    # so does the store: it refuses to open rather than list a guess
    with pytest.raises(CorruptStateError):
        open_undo(tmp_path)


def test_a_valid_record_that_breaks_the_chain_is_an_error(tmp_path: Path) -> None:
    u = open_undo(tmp_path)
    feed(u, 3, random.Random(4))
    u.log.append(CF.Patch(put_segments=(P.Segment(1000, 1001, 5),)))  # CRC-valid nonsense
    with pytest.raises(CorruptStateError, match=r"chain|boundar|segments end"):
        open_undo(tmp_path)


def test_torn_record_cannot_hide_an_applied_point(tmp_path: Path) -> None:
    """A dropped (torn) last record was never durable, so applied_seq is never past it;
    when it is, the record was durable and damaged: an error, not a reset."""
    u = open_undo(tmp_path)
    feed(u, 3, random.Random(5))
    newest = u.catalog.newest
    assert newest is not None
    raw = (tmp_path / CATALOG_FILE).read_bytes()
    (tmp_path / CATALOG_FILE).write_bytes(raw[:-1])
    with pytest.raises(CorruptStateError, match="already applied"):
        open_undo(tmp_path, applied=newest.last_seq)


def test_the_log_is_compacted_past_its_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    monkeypatch.setattr(CF, "COMPACT_SLACK_BYTES", 2000)
    rng = random.Random(6)
    u = open_undo(tmp_path)
    sizes = []
    for _ in range(60):
        feed(u, 1, rng)
        u._save(P.Catalog(u.catalog.points[-3:], u.catalog.segments[-2:]))  # "retention"
        sizes.append((tmp_path / CATALOG_FILE).stat().st_size)
    assert max(sizes) <= 2 * (CF.HEADER_SIZE + CF.record_size(4, 3)) + 2000 + 200
    assert u.log.records < 60, "never compacted"
    assert open_undo(tmp_path).catalog == u.catalog


# ---------------------------------------------------------------- retention, for real

DISKS = {0: DiskSpec("vda", 64 * 1024)}


def test_compaction_after_retention_keeps_exactly_the_surviving_points(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(CF, "COMPACT_SLACK_BYTES", 0)  # compact at nearly every retention
    rng = random.Random(7)
    d = tmp_path / "pol"
    now = [1000 * S]
    undo = UndoStore(d, now_ns=lambda: now[0],
                     override={"short_term_retention_s": 9.0, "long_term_interval_s": 13.0,
                               "long_term_retention_s": 1000.0, "compact_run": 3.0})
    store = PolicyStore.open(d, DISKS, apply=False, undo=undo)
    image = bytearray(DISKS[0].size_bytes)
    prefix = {0: bytes(image)}
    seq, compactions = 0, 0
    for _ in range(30):
        now[0] += 2 * S
        ext = []
        for _ in range(rng.randint(1, 3)):
            off = rng.randrange(0, len(image) - 4096)
            ext.append(Extent(0, off, 4096, rng.randbytes(4096)))
        store.begin(seq + 1, seq + 2)
        for chunk in encode_chunks(ext, 8192):
            store.add_chunk(chunk)
        store.commit(now[0])
        seq += 2
        for e in ext:
            assert e.data is not None
            image[e.offset:e.offset + e.length] = e.data
        prefix[seq] = bytes(image)
        records = store.undo.log.records
        store.apply_pending()
        compactions += store.undo.log.records <= records
        surviving = store.undo.catalog
        store.close()
        store = PolicyStore.open(d, DISKS, apply=False, undo=UndoStore(
            d, now_ns=lambda: now[0], override=undo.override))
        assert store.undo.catalog == surviving
    assert compactions > 5
    cat = store.undo.catalog
    assert 3 <= len(cat.points) < 30 and any(p.kind == P.LONG for p in cat.points)
    for p in cat.points:
        out = tmp_path / f"r{p.id}"
        restore_images(store, lambda p=p: p, out)
        assert (out / "vda.img").read_bytes() == prefix[p.last_seq], f"point {p.id}"
    names = {x.name for x in (d / "undo").iterdir()}
    assert names == {s.name for s in cat.segments}
    store.close()


# ---------------------------------------------------------------- old format

def test_old_format_catalog_loads_and_is_upgraded_by_the_first_change(tmp_path: Path) -> None:
    cat = evolve(P.Catalog(), random.Random(8), 30, [1000 * S], TIGHT)
    statefile.save(tmp_path / OLD_CATALOG_FILE, CATALOG_KIND, P.CATALOG_VERSION, cat.to_json())
    u = open_undo(tmp_path)
    assert u.catalog == cat
    assert not (tmp_path / CATALOG_FILE).exists(), "opening alone writes nothing"
    feed(u, 1, random.Random(9))
    assert (tmp_path / CATALOG_FILE).exists() and not (tmp_path / OLD_CATALOG_FILE).exists()
    assert open_undo(tmp_path).catalog == u.catalog
    assert u.catalog.points[:-1] == cat.points


# ---------------------------------------------------------------- crash and power cut

class FailingSync(OsFileIO):
    """fdatasync fails once (EIO) after the write went through."""

    def __init__(self) -> None:
        self.fail = True

    def fdatasync(self, fd: int) -> None:
        if self.fail:
            self.fail = False
            raise OSError(5, "Input/output error")
        super().fdatasync(fd)


def test_a_failed_append_lists_nothing_and_the_next_change_compacts(tmp_path: Path) -> None:
    rng = random.Random(10)
    io = FailingSync()
    u = open_undo(tmp_path, io=io)
    io.fail = False
    feed(u, 3, rng)
    before = u.catalog
    io.fail = True
    with pytest.raises(OSError):
        feed(u, 1, rng)
    assert u.catalog == before, "a point listed before it was durable"
    records = u.log.records
    feed(u, 1, rng)
    assert u.log.records == 1 < records, "the log was appended after a failed write"
    assert open_undo(tmp_path).catalog == u.catalog


def _change(kind: str) -> Callable[[UndoStore], None]:
    def append(u: UndoStore) -> None:
        feed(u, 1, random.Random(11))

    def retain(u: UndoStore) -> None:
        u._save(P.Catalog(u.catalog.points[-2:], u.catalog.segments[-1:]))

    def compact(u: UndoStore) -> None:
        u._save(P.Catalog(u.catalog.points[-2:], u.catalog.segments[-1:]), compact=True)

    return {"append": append, "retain": retain, "compact": compact, "upgrade": append}[kind]


@pytest.mark.parametrize("kind", ["append", "retain", "compact", "upgrade"])
def test_power_cut_at_every_step_leaves_before_or_after(tmp_path: Path, kind: str) -> None:
    change = _change(kind)

    def setup(d: Path) -> P.Catalog:
        u = open_undo(d)
        feed(u, 6, random.Random(12))
        if kind == "upgrade":  # make it a store of the old format
            statefile.save(d / OLD_CATALOG_FILE, CATALOG_KIND, P.CATALOG_VERSION,
                           u.catalog.to_json())
            (d / CATALOG_FILE).unlink()
        return u.catalog

    dry = tmp_path / "dry"
    before = setup(dry)
    io = SimIO([dry])
    u = open_undo(dry, io=io)
    change(u)
    after = u.catalog
    steps = list(io.steps)
    assert steps and before != after
    for n in range(len(steps) + 1):
        for fault in ("power", "kill"):
            d = tmp_path / f"{n}-{fault}"
            setup(d)
            io = SimIO([d], crash_at=n if n < len(steps) else None)
            with contextlib.suppress(SimulatedCrash):
                change(open_undo(d, io=io))
            if fault == "power":
                io.power_cut()
            else:
                kill(io)
            got = open_undo(d).catalog
            assert got in (before, after), (f"{fault} at step {n} of "
                                            f"{steps_of(steps)}: neither state")
            if n == len(steps):
                assert got == after
