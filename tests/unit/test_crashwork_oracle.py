"""The crash matrix's restore-point oracle (tests/crashwork.py), without a lab.

`CrashWriter._logged` turns the probes of the filter's captured seq around
each write into seq windows; `prefix_shas` replays them into the image at a
restore point, or says it cannot tell (a point strictly inside a window).
These tests drive both with a scripted probe: exact seqs, seqs the filter
took for its own records (RESYNC, GAP_END) next to a write, writes that took
no seq (dirty tracking), and a probe that goes back (a reused seq).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest
from crashwork import CrashWriter

SIZE = 64 * 1024


def sha(img: bytes | bytearray) -> str:
    return hashlib.sha256(img).hexdigest()


def writer_with(probes: list[int]) -> CrashWriter:
    seqs: Iterator[int] = iter(probes)
    w = CrashWriter("/nonexistent", SIZE, seed=1, seq_probe=lambda: next(seqs))
    w.known = next(seqs)
    w.base = bytes(SIZE)
    return w


def image(*writes: tuple[int, bytes]) -> bytearray:
    img = bytearray(SIZE)
    for off, data in writes:
        img[off:off + len(data)] = data
    return img


A, B, C = b"a" * 4096, b"b" * 4096, b"c" * 8192


def test_exact_seqs_give_every_prefix() -> None:
    w = writer_with([10, 11, 12, 13])
    w._logged(0, A)
    w._logged(4096, B)
    w._logged(0, C)          # overwrites A and B: later wins
    got = w.prefix_shas([10, 11, 12, 13, 99])
    assert got[10] == sha(image())
    assert got[11] == sha(image((0, A)))
    assert got[12] == sha(image((0, A), (4096, B)))
    assert got[13] == got[99] == sha(image((0, C)))
    assert w.wide == w.seqless == 0


def test_a_window_makes_only_the_points_inside_it_ambiguous() -> None:
    # The filter appended two RESYNC records around the second write: its seq
    # is one of 12..14.
    w = writer_with([10, 11, 14, 15])
    w._logged(0, A)
    w._logged(4096, B)
    w._logged(8192, C)
    got = w.prefix_shas([11, 12, 13, 14, 15])
    assert got[11] == sha(image((0, A)))
    assert got[12] is None and got[13] is None
    assert got[14] == sha(image((0, A), (4096, B)))
    assert got[15] == sha(image((0, A), (4096, B), (8192, C)))
    assert w.wide == 1


def test_seqless_writes_belong_to_every_point_after_the_last_seq() -> None:
    # Two writes while tracking (no seq), then a journaled one that takes 11.
    w = writer_with([10, 10, 10, 11])
    w._logged(0, C)
    w._logged(4096, B)
    w._logged(0, A)
    got = w.prefix_shas([10, 11])
    assert got[10] == sha(image())
    assert got[11] == sha(image((0, C), (4096, B), (0, A)))
    assert w.seqless == 2


def test_a_seq_going_back_is_an_error() -> None:
    w = writer_with([10, 9])
    with pytest.raises(AssertionError, match="went back"):
        w._logged(0, A)
