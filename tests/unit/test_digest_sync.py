"""Pure parts of the digest sync: region digests, the sync core, CLI progress."""

from __future__ import annotations

import io
import os
from pathlib import Path

import xxhash

from cdp_common import digest
from cdp_filter.sync import SyncCore, differing
from cdp_target.gaps import GapBook, GapRecord
from cdpctl import status
from cdpctl import sync as sync_cmd

MiB = 1 << 20


def test_region_digests_skip_holes_and_match_a_plain_hash(tmp_path: Path) -> None:
    path = tmp_path / "img"
    size = 5 * MiB + 4096  # last region is short
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(2 * MiB + 100)
        f.write(b"x" * 5000)
        f.seek(5 * MiB)
        f.write(b"y" * 4096)
    fd = os.open(path, os.O_RDONLY)
    try:
        regions = list(digest.digests(fd, size, 0, size, MiB, is_zero=True))
        raw = path.read_bytes()
    finally:
        os.close(fd)
    assert [r.offset for r in regions] == [0, MiB, 2 * MiB, 3 * MiB, 4 * MiB, 5 * MiB]
    assert regions[-1].length == 4096
    for r in regions:
        assert r.digest == xxhash.xxh3_128_digest(raw[r.offset:r.offset + r.length])
    assert [r.hole for r in regions] == [True, True, False, True, True, False]


def test_region_size_is_checked() -> None:
    assert digest.check_region_bytes(MiB) == ""
    assert "power of two" in digest.check_region_bytes(3 * MiB)
    assert digest.check_region_bytes(4096)


def test_differing_regions() -> None:
    a = digest.Region(0, MiB, b"a" * 16, False)
    b = digest.Region(MiB, MiB, b"b" * 16, False)
    assert differing([a, b], b"a" * 16 + b"c" * 16) == [b]


def test_sync_core_round_trip_and_requests() -> None:
    core = SyncCore()
    assert core.want_operator(5) and not core.want_operator(5) and not core.want_operator(4)
    core.start(5, "operator", 10 * MiB, 123)
    core.compared(MiB, 4096, 0, now=1.0)
    core.compared(MiB, 0, MiB, now=2.0)
    core.offset = 2 * MiB
    again = SyncCore.from_json(core.to_json())
    assert (again.phase, again.id, again.offset, again.compared_bytes, again.hole_bytes) == \
        ("compare", 5, 2 * MiB, 2 * MiB, MiB)
    assert core.rate(2.0) == 2 * MiB
    core.finish()
    assert (core.phase, core.id, core.done_id) == ("", 0, 5)


def test_watch_step_and_output() -> None:
    running = {"name": "p", "sync_phase": "compare", "sync_done_bytes": MiB,
               "sync_total_bytes": 4 * MiB, "sync_rate_bps": 2e6, "sync_eta_s": 1.5,
               "sync_done_id": 0}
    step = sync_cmd.watch_step(running, 7, False)
    assert not step.done and step.fraction == 0.25 and "compare 25%" in step.line
    assert sync_cmd.watch_step({**running, "sync_phase": "", "sync_done_id": 7}, 7, True).done
    assert sync_cmd.watch_step({**running, "sync_phase": ""}, 0, True).done
    docs = iter([{"policies": [running]}, {"policies": [{**running, "sync_phase": "",
                                                         "sync_done_id": 7}]}])
    out = io.StringIO()
    code = sync_cmd.watch(lambda: next(docs), "p", 7, 60, out=out, tty=False,
                          clock=lambda: 0.0, sleep=lambda s: None)
    assert code == 0 and out.getvalue().splitlines()[-1] == "p: sync done"
    assert sync_cmd.bar(0.5, 10) == "[#####.....]"


def test_status_lines_show_mode_sync_and_gaps() -> None:
    p = {"name": "p", "capture_mode": "tracking", "dirty_bytes": 2 * MiB,
         "gap_begin_time_ns": 1, "sync_phase": "send", "sync_reason": "initial",
         "sync_done_bytes": 0, "sync_total_bytes": MiB,
         "gaps": [{"begin_seq": 5, "end_seq": 0, "begin_time_ns": 1, "end_time_ns": 0,
                   "reason": "overflow"}]}
    lines = status.capture_lines(p)
    assert "tracking, 2.0 MiB dirty" in lines[0] or "tracking" in lines[0]
    assert "sync initial send 0%" in lines[1]
    assert "from seq 5" in lines[2] and "still open" in lines[2]


def test_gap_lines_name_the_last_point_inside_and_hide_empty_gaps() -> None:
    from cdpctl import restore

    gaps = [{"begin_seq": 129, "end_seq": 257, "begin_time_ns": 1, "end_time_ns": 2,
             "begin_time": "", "end_time": "", "reason": "operator"},
            {"begin_seq": 258, "end_seq": 258, "begin_time_ns": 3, "end_time_ns": 4,
             "begin_time": "", "end_time": "", "reason": "operator"}]
    lines = [line for line in status.capture_lines({"name": "p", "gaps": gaps})
             if "gap" in line]
    assert len(lines) == 1   # [258, 258) covers no point
    assert "from seq 129" in lines[0] and "to seq 256 (closed" in lines[0], lines
    (line,) = restore.render_gaps(gaps)
    assert "last seq 129..256" in line


def test_restore_points_inside_a_gap_are_flagged() -> None:
    from cdpctl import restore

    gaps = [{"begin_seq": 10, "end_seq": 20, "begin_time": "", "end_time": "",
             "reason": "overflow"},
            {"begin_seq": 30, "end_seq": 0, "begin_time": "", "end_time": "",
             "reason": "overflow"}]
    assert restore.gap_of(9, gaps) is None
    assert restore.gap_of(10, gaps) is gaps[0] and restore.gap_of(19, gaps) is gaps[0]
    assert restore.gap_of(20, gaps) is None
    assert restore.gap_of(10**9, gaps) is gaps[1]
    lines = restore.render_gaps(gaps)
    assert "last seq 10..19" in lines[0] and "still open" in lines[1]
    table = restore.render_points([{"id": 1, "kind": "short", "time": "t", "last_seq": 12,
                                    "size_bytes": 0, "consistent": False, "gap": "overflow"}])
    assert "NO (in a gap: overflow)" in table


def test_the_gap_a_point_lies_in_is_named() -> None:
    book = GapBook(Path("/nonexistent"), [GapRecord(10, 20, 0, 0, "overflow"),
                                          GapRecord(30, 0, 1_700_000_000_000_000_000, 0,
                                                    "resync")])
    assert book.covering(9) is None and book.covering(20) is None
    assert book.covering(19) is book.gaps[0] and book.covering(10**9) is book.gaps[1]
    assert book.gaps[0].describe() == "overflow gap: points with last seq 10..19"
    assert book.gaps[1].describe() == ("resync gap: points with last seq 30 and later "
                                       "(still open), since 2023-11-14T22:13:20.000Z")
