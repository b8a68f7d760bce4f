"""cdp_common.statefile: the one versioned JSON state-file helper."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdp_common import statefile
from cdp_common.errors import FormatError
from cdp_common.fileio_sim import SimIO, SimulatedCrash

pytestmark = pytest.mark.timeout(60)


def test_round_trip_and_on_disk_shape(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    statefile.save(path, "target-store", 2, {"epoch": 3, "durable_seq": 17})
    on_disk = json.loads(path.read_text())
    assert on_disk == {"kind": "target-store", "version": 2, "epoch": 3, "durable_seq": 17}
    assert statefile.load(path, "target-store", 2) == {"version": 2, "epoch": 3,
                                                       "durable_seq": 17}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_missing_file_is_none(tmp_path: Path) -> None:
    assert statefile.load(tmp_path / "nope.json", "k", 1) is None


def test_legacy_file_without_kind_or_version_is_version_1(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text('{"trimmed_through": 5}')
    assert statefile.load(path, "journal", 3) == {"trimmed_through": 5, "version": 1}
    path.write_text('{"version": 2, "trimmed_through": 6}')
    assert statefile.load(path, "journal", 3) == {"trimmed_through": 6, "version": 2}


def test_older_version_is_returned_for_migration(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    statefile.save(path, "k", 1, {"a": 1})
    assert statefile.load(path, "k", 4) == {"a": 1, "version": 1}


def test_save_overrides_callers_kind_and_version(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    statefile.save(path, "k", 2, {"version": 9, "kind": "x", "a": 1})
    assert json.loads(path.read_text()) == {"kind": "k", "version": 2, "a": 1}


@pytest.mark.parametrize(("content", "words"), [
    (b"{not json", "corrupt"),
    (b"\xff\xfe", "corrupt"),
    (b"[1, 2]", "not a JSON object"),
    (b"", "corrupt"),
    (b'{"kind": "journal", "version": 1}', "'journal'"),
    (b'{"kind": "k", "version": 3}', "newer"),
    (b'{"kind": "k", "version": "1"}', "bad version"),
    (b'{"kind": "k", "version": 0}', "bad version"),
    (b'{"kind": "k", "version": true}', "bad version"),
])
def test_what_does_not_decode_is_a_format_error_naming_the_file(
        tmp_path: Path, content: bytes, words: str) -> None:
    path = tmp_path / "bad-state.json"
    path.write_bytes(content)
    with pytest.raises(FormatError) as info:
        statefile.load(path, "k", 2)
    assert str(path) in str(info.value)
    assert words in str(info.value)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_arbitrary_bytes_load_or_raise_format_error(tmp_path_factory: pytest.TempPathFactory,
                                                    raw: bytes) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "s.json"
    path.write_bytes(raw)
    try:
        got = statefile.load(path, "k", 1)
    except FormatError:
        return
    assert isinstance(got, dict) and got["version"] == 1


def test_save_goes_through_the_io_seam_and_survives_a_power_cut(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    statefile.save(path, "k", 1, {"n": 1})
    io = SimIO([tmp_path])
    statefile.save(path, "k", 1, {"n": 2}, io=io)
    assert [s.split()[0] for s in io.steps] == ["open", "pwrite", "fsync", "rename", "fsync_dir"]
    io.power_cut()
    assert statefile.load(path, "k", 1, io=io) == {"n": 2, "version": 1}
    for n in range(5):  # a crash at any step (it stops the step) leaves the old content
        crash = SimIO([tmp_path], crash_at=n)
        with pytest.raises(SimulatedCrash):
            statefile.save(path, "k", 1, {"n": 3 + n}, io=crash)
        crash.power_cut()
        assert statefile.load(path, "k", 1) == {"n": 2, "version": 1}, crash.steps
