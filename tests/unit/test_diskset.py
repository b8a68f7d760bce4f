"""cdp_filter.diskset: which disks the filter protects, from its [[disks]], its
manifest and the coordinator's policies (issue 11 item 1). Every disagreement is
an error with a reason; nothing is chosen silently."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdp_common.config import DiskConfig
from cdp_common.errors import FormatError
from cdp_filter.diskset import (
    ACTIVE,
    DELETED,
    DiskSpec,
    ManagedPolicy,
    load_manifest,
    plan,
    save_manifest,
)

M = 1 << 20
MAX = 1 << 40
DECLARED = [DiskConfig(name="vda", policy="lab", size_bytes=64 * M),
            DiskConfig(name="vdb", policy="lab", size_bytes=8 * M)]
LAB = [DiskSpec(0, "vda", 64 * M), DiskSpec(1, "vdb", 8 * M)]


def test_a_new_policy_is_attached_and_a_declared_one_left_alone() -> None:
    p = plan(DECLARED, {}, {"lab": LAB, "p2": [DiskSpec(0, "disk9", 64 * M)]}, {}, MAX)
    assert p.attach == {"p2": [DiskSpec(0, "disk9", 64 * M)]}
    assert p.errors == {} and p.detach == [] and p.grow == {}


@pytest.mark.parametrize(("want", "needle"), [
    ([DiskSpec(0, "vda", 32 * M), LAB[1]], "vda is 33554432 bytes in the policy but 67108864"),
    ([LAB[0]], "vdb is in this filter's [[disks]] for lab but not in the policy"),
    ([*LAB, DiskSpec(2, "vdc", M)], "vdc is in the policy but not in this filter's [[disks]]"),
    ([DiskSpec(1, "vda", 64 * M), DiskSpec(0, "vdb", 8 * M)], "vda is disk 1 in the policy"),
])
def test_a_declared_policy_that_disagrees_is_an_error(want: list[DiskSpec],
                                                      needle: str) -> None:
    p = plan(DECLARED, {}, {"lab": want}, {}, MAX)
    assert needle in p.errors["lab"] and "captured as declared" in p.errors["lab"]
    assert p.attach == {} and p.detach == []


@pytest.mark.parametrize(("disks", "needle"), [
    ([DiskSpec(0, "vda", M)], "already used on this filter by policy lab"),
    ([DiskSpec(0, "old", M)], "by policy gone (deleted; its data is kept until purged)"),
    ([DiskSpec(0, "d", 4097)], "not a positive multiple of 4096"),
    ([DiskSpec(0, "d", 2 * MAX)], "larger than this filter's max_disk_bytes"),
    ([DiskSpec(0, "../x", M)], "not a valid disk name"),
    ([DiskSpec(0, "a", M), DiskSpec(0, "b", M)], "listed twice"),
    ([], "names no disk on this filter"),
])
def test_a_new_policy_that_cannot_be_honoured_is_an_error(disks: list[DiskSpec],
                                                          needle: str) -> None:
    manifest = {"gone": ManagedPolicy(DELETED, [DiskSpec(0, "old", M)])}
    p = plan(DECLARED, manifest, {"p2": disks}, {}, MAX)
    assert needle in p.errors["p2"], p.errors
    assert p.attach == {}


def test_managed_policies_detach_grow_and_refuse_shrink_add_remove() -> None:
    attached = {"p2": [DiskSpec(0, "a", 8 * M), DiskSpec(1, "b", 8 * M)],
                "p3": [DiskSpec(0, "c", 8 * M)]}
    manifest = {n: ManagedPolicy(ACTIVE, d) for n, d in attached.items()}
    p = plan(DECLARED, manifest, {"p2": [DiskSpec(0, "a", 16 * M), DiskSpec(1, "b", 8 * M)]},
             attached, MAX)
    assert p.detach == ["p3"] and p.grow == {"p2": [DiskSpec(0, "a", 16 * M)]}
    assert p.errors == {}
    shrink = plan(DECLARED, manifest, {"p2": [DiskSpec(0, "a", 4 * M), DiskSpec(1, "b", 8 * M)],
                                       "p3": attached["p3"]}, attached, MAX)
    assert "shrink from 8388608 to 4194304 bytes (shrinking is refused)" in shrink.errors["p2"]
    assert shrink.grow == {} and shrink.detach == []
    changed = plan(DECLARED, manifest, {"p2": [DiskSpec(0, "a", 8 * M), DiskSpec(2, "z", M)],
                                        "p3": attached["p3"]}, attached, MAX)
    assert "disk z was added" in changed.errors["p2"]
    assert "disk b was removed" in changed.errors["p2"]


def test_a_declared_policy_is_never_detached() -> None:
    p = plan(DECLARED, {}, {}, {"lab": LAB}, MAX)
    assert p.detach == []


def test_a_deleted_policy_comes_back_only_with_its_own_disks() -> None:
    manifest = {"p2": ManagedPolicy(DELETED, [DiskSpec(0, "a", 8 * M)])}
    again = plan([], manifest, {"p2": [DiskSpec(0, "a", 8 * M)]}, {}, MAX)
    assert again.attach == {"p2": [DiskSpec(0, "a", 8 * M)]}
    other = plan([], manifest, {"p2": [DiskSpec(0, "x", 8 * M)]}, {}, MAX)
    assert "purge it first" in other.errors["p2"] and other.attach == {}


def test_manifest_round_trip_and_corruption(tmp_path: Path) -> None:
    assert load_manifest(str(tmp_path)) == {}
    m = {"p2": ManagedPolicy(ACTIVE, [DiskSpec(0, "a", 8 * M)]),
         "p3": ManagedPolicy(DELETED, [DiskSpec(0, "c", M), DiskSpec(1, "d", M)])}
    save_manifest(str(tmp_path), m)
    assert load_manifest(str(tmp_path)) == m
    text = (tmp_path / "disks.json").read_text().replace('"active"', '"maybe"')
    (tmp_path / "disks.json").write_text(text)
    with pytest.raises(FormatError, match="corrupt disk manifest"):
        load_manifest(str(tmp_path))
