"""Power loss at every step of a scripted journal workload (the ALICE / CrashMonkey idea).

The workload appends records (segment rollover every 3 records), syncs where
the real filter syncs (an application flush: `sync` and `sync_async`), trims
on acks (state update, then unlinks), drops the whole journal (overflow) and
skips the seq counter forward (`advance_to`). A dry run over `SimIO` names
its steps; then, for EVERY step, the workload runs again and the process
"dies" there, `power_cut()` drops what was not fsynced, and the real
`Journal.open` recovers. Checked each time (DESIGN I1/I2, source side, and the
journal's J1/J2):

- reopening never raises: a power cut only ever leaves a state recovery
  handles (FormatError is reserved for a `state` that does not decode, which
  an atomic replace never leaves behind);
- every record acknowledged durable (appended before a sync that returned)
  and not trimmed is there, with its bytes;
- the seqs kept are contiguous from the oldest to the last, every record
  decodes and equals what was appended under its seq (nothing torn, no seq
  reused for other data);
- no seq that was acked durable, or that a returned trim/advance recorded,
  can be handed out again (last_seq is at least that high);
- recovery does not mistake the power cut for corruption (no cut that
  salvage classifies as corrupt, which would trigger a needless resync);
- a power cut during recovery itself, at each of its steps, recovers too.
"""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cdp_common import records
from cdp_common.fileio_sim import SimIO, SimulatedCrash, steps_of
from cdp_filter.journal import Journal
from cdp_filter.salvage import salvage

pytestmark = pytest.mark.timeout(120)
H = records.HEADER_SIZE
SEG_BYTES = 3 * (H + 64)  # three records per segment: rollovers all along
DISK_SIZES = [1 << 30]


@dataclass
class Oracle:
    """What the workload was promised before it died."""

    data: dict[int, bytes] = field(default_factory=dict)   # seq -> payload, append returned
    synced: int = 0        # highest seq covered by a sync that returned: durable (I1)
    trim_started: int = 0  # highest seq a trim/drop/advance was asked for (may be gone)
    trim_done: int = 0     # highest seq such a call returned for (J1: never reused)


def payload(seq: int) -> bytes:
    return bytes((seq * 7 + i) % 251 for i in range(64))


def workload(j: Journal, o: Oracle) -> None:
    def append(n: int) -> None:
        for _ in range(n):
            seq = j.last_seq + 1
            assert j.append(seq * 1000, 0, seq * 4096, payload(seq)) == seq
            o.data[seq] = payload(seq)

    def sync() -> None:
        last = j.last_seq
        j.sync()
        o.synced = max(o.synced, last)

    def sync_async() -> None:
        last = j.last_seq
        asyncio.run(j.sync_async())
        o.synced = max(o.synced, last)

    def trim(seq: int) -> None:
        seq = min(seq, j.last_seq)
        o.trim_started = max(o.trim_started, seq)
        j.trim_through(seq)
        o.trim_done = max(o.trim_done, seq)

    append(4)          # 1..4: a rollover
    sync()
    append(2)          # 5, 6: not synced yet
    trim(2)            # no whole segment acked: in memory only
    append(3)          # 7..9
    sync_async()       # several dirty segments, oldest first
    trim(5)            # state, then unlink 1..3
    append(4)          # 10..13
    sync()
    trim(9)            # state, unlink 4..6 and 7..9
    append(2)          # 14, 15
    sync()
    last = j.last_seq  # overflow: the dirty-block bitmap takes over
    o.trim_started = max(o.trim_started, last)
    j.drop_all()
    o.trim_done = max(o.trim_done, last)
    append(2)          # 16, 17 in a fresh segment
    sync()
    target = j.last_seq + 5  # the target holds seqs the journal lost
    o.trim_started = max(o.trim_started, target)
    j.advance_to(target)
    o.trim_done = max(o.trim_done, target)
    append(1)          # 23
    sync()


def run(root: Path, crash_at: int | None) -> tuple[SimIO, Oracle, bool]:
    """Fresh journal dir, the workload over SimIO; returns (io, oracle, crashed)."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    io = SimIO([root], crash_at=crash_at)
    oracle = Oracle()
    try:
        j = Journal.open(str(root), SEG_BYTES, 1 << 30, policy="p", io=io)
        workload(j, oracle)
        j.close()
    except SimulatedCrash:
        return io, oracle, True
    return io, oracle, False


class CutLog:
    """on_cut hook: remembers how salvage would classify every cut."""

    def __init__(self) -> None:
        self.corrupt: list[str] = []

    def __call__(self, data: memoryview, expected_seq: int, whole: bool) -> None:
        s = salvage(data, expected_seq, DISK_SIZES, whole)
        if s.corrupt:
            self.corrupt.append(s.describe())


def check_recovered(root: Path, o: Oracle, where: str, append: bool = False) -> None:
    cuts = CutLog()
    j = Journal.open(str(root), SEG_BYTES, 1 << 30, policy="p", on_cut=cuts)
    try:
        recs = list(j.records_after(0))
        seqs = [r.seq for r in recs]
        assert not cuts.corrupt, f"{where}: power cut taken for corruption: {cuts.corrupt}"
        if seqs:
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"{where}: {seqs}"
            assert seqs[0] == j.oldest_seq and seqs[-1] == j.last_seq, where
        for r in recs:
            assert r.data == o.data.get(r.seq), f"{where}: seq {r.seq} holds other bytes"
            assert (r.time_ns, r.offset) == (r.seq * 1000, r.seq * 4096), where
        acked = [s for s in range(o.trim_started + 1, o.synced + 1) if s in o.data]
        missing = sorted(set(acked) - set(seqs))
        assert not missing, f"{where}: acked durable but lost: {missing}"
        assert j.last_seq >= max(o.synced, o.trim_done), \
            f"{where}: last_seq {j.last_seq} would reuse acked seqs"
        if append:  # the journal works on (this changes the tree: done last)
            assert j.append(1, 0, 0, b"next") == j.last_seq
    finally:
        j.close()


def test_dry_run_covers_the_interesting_steps(tmp_path: Path) -> None:
    io, oracle, crashed = run(tmp_path / "j", None)
    assert not crashed and oracle.synced == 23
    ops = {s.split()[0] for s in io.steps}
    assert {"open", "pwritev", "fsync", "fsync_dir", "rename", "unlink"} <= ops
    assert any(s == "rename state" for s in io.steps)
    assert len(io.steps) > 40, steps_of(io.steps)


def test_power_cut_at_every_step_loses_nothing_acked(tmp_path: Path) -> None:
    root = tmp_path / "j"
    clean, _o, _c = run(root, None)
    recovery_crashes = 0
    for n, step in enumerate(clean.steps):
        io, oracle, crashed = run(root, n)
        assert crashed and io.steps[-1] == step, f"step {n}: {step} not reached"
        io.power_cut()
        where = f"power cut at step {n} ({step})"
        # Recovery itself (cutting a tail, unlinking trimmed segments) may be
        # cut short by another power loss: find its steps, crash at each.
        probe = root.parent / "probe"
        shutil.rmtree(probe, ignore_errors=True)
        shutil.copytree(root, probe)
        rio = SimIO([probe])
        Journal.open(str(probe), SEG_BYTES, 1 << 30, policy="p", io=rio).close()
        for m in range(len(rio.steps)):
            shutil.rmtree(probe)
            shutil.copytree(root, probe)
            cio = SimIO([probe], crash_at=m)
            with pytest.raises(SimulatedCrash):
                Journal.open(str(probe), SEG_BYTES, 1 << 30, policy="p", io=cio)
            cio.power_cut()
            check_recovered(probe, oracle, f"{where}, then at recovery step {m} "
                                           f"({rio.steps[m]})", append=True)
            recovery_crashes += 1
        check_recovered(root, oracle, where)
        check_recovered(root, oracle, where + ", reopened twice", append=True)
    assert recovery_crashes > 0  # some cuts left work for recovery (trimmed segments)
