"""The test-failover registry of the target (cdp_target.failtest): recorded before
its images are written, so a crash in between leaves a test `stop` cleans up;
`stop` deletes exactly the recorded images and never follows a link."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdp_common.errors import FormatError
from cdp_target.failtest import FailoverTestExists, FailoverTests, NoSuchFailoverTest


def test_begin_ready_reload_stop(tmp_path: Path) -> None:
    book = FailoverTests(tmp_path)
    out = tmp_path / "restores" / "t1"
    book.begin("t1", out, ["disk1", "disk0"])
    out.mkdir(parents=True)
    (out / "disk0.img").write_bytes(b"a")
    (out / "disk1.partial").write_bytes(b"b")       # a copy cut by a crash
    again = FailoverTests(tmp_path)
    again.load()
    assert again.tests["t1"].state == "starting" and again.tests["t1"].disks == (
        "disk0", "disk1")
    again.ready("t1", 7, 70, 700)
    third = FailoverTests(tmp_path)
    third.load()
    assert (third.tests["t1"].state, third.tests["t1"].point_id) == ("ready", 7)
    third.stop("t1")
    assert not out.exists() and third.tests == {}
    fourth = FailoverTests(tmp_path)
    fourth.load()
    assert fourth.tests == {}


def test_stop_keeps_other_files_and_never_follows_a_link(tmp_path: Path) -> None:
    book = FailoverTests(tmp_path)
    out = tmp_path / "t"
    out.mkdir()
    victim = tmp_path / "precious.img"
    victim.write_bytes(b"keep")
    (out / "disk0.img").symlink_to(victim)
    (out / "notes.txt").write_text("the operator's")
    book.begin("t", out, ["disk0"])
    book.stop("t")
    assert victim.read_bytes() == b"keep"           # the link went, not its target
    assert (out / "notes.txt").exists() and not (out / "disk0.img").exists()


def test_names_are_checked_and_unique(tmp_path: Path) -> None:
    book = FailoverTests(tmp_path)
    with pytest.raises(FormatError):
        book.begin("../x", tmp_path / "x", ["d"])
    book.begin("a", tmp_path / "a", ["d"])
    with pytest.raises(FailoverTestExists):
        book.begin("a", tmp_path / "b", ["d"])
    with pytest.raises(NoSuchFailoverTest, match="running: a"):
        book.stop("zz")


def test_a_damaged_registry_is_a_format_error(tmp_path: Path) -> None:
    (tmp_path / "tests.json").write_text('{"kind": "target-tests", "version": 1, '
                                         '"tests": [{"name": "x"}]}')
    with pytest.raises(FormatError, match="does not decode"):
        FailoverTests(tmp_path).load()
