"""cdpctl's view of a consistency group's failover (pure helpers)."""

from __future__ import annotations

from cdpctl.targetcall import group_failover_members, member_of_image

MEMBERS = ["g..filter-1", "g..filter-2"]


def test_an_image_names_its_member_by_its_failover_directory() -> None:
    assert member_of_image("/d/g..filter-2/failover/gb.img", MEMBERS) == "g..filter-2"
    assert member_of_image("/d/other/failover/gb.img", MEMBERS) == ""
    assert member_of_image("/d/g..filter-2/gb.img", MEMBERS) == ""
    assert member_of_image("gb.img", MEMBERS) == ""


def test_each_member_has_its_state_and_images() -> None:
    images = [{"disk": "ga", "path": "/d/g..filter-1/failover/ga.img"},
              {"disk": "gb", "path": "/d/g..filter-2/failover/gb.img"},
              {"disk": "gc", "path": "/d/g..filter-2/failover/gc.img"}]
    got = group_failover_members(images, list(reversed(MEMBERS)),
                                 {"g..filter-1": "active", "g..filter-2": ""})
    assert [(m["policy"], m["state"], [i["disk"] for i in m["images"]]) for m in got] == [
        ("g..filter-1", "active", ["ga"]), ("g..filter-2", "none", ["gb", "gc"])]
