"""cdp_coordinator.reconcile: config-file policies are applied at every start."""

from __future__ import annotations

import dataclasses

from cdp_common.config import PolicyConfig, PolicyDiskConfig
from cdp_coordinator.reconcile import config_owned, differences, reconcile


def pol(name: str, **kw: object) -> PolicyConfig:
    base = PolicyConfig(name=name, target="target-1",
                        disks=[PolicyDiskConfig(filter="filter-1", name="vda", size_bytes=1 << 20)])
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def test_missing_policies_are_created_changed_ones_replaced_others_untouched() -> None:
    stored = {"a": pol("a"), "b": pol("b", rpo_warning_s=99.0), "cli": pol("cli")}
    changes = reconcile([pol("a"), pol("b"), pol("new")], stored)
    assert [(c.policy.name, c.text.split(":")[0]) for c in changes] == [
        ("b", "changed by the config file"), ("new", "created from the config file")]
    assert changes[0].policy == pol("b")
    assert "rpo_warning_s: 99.0 -> " in changes[0].text


def test_differences_name_every_changed_field_with_old_and_new() -> None:
    new = pol("a", rpo_interval_s=7.0, disks=[
        PolicyDiskConfig(filter="filter-1", name="vda", size_bytes=2 << 20)])
    diff = sorted(differences(pol("a"), new))   # in field order; sorted to compare
    assert diff[0] == "disks: [filter-1:vda:1048576] -> [filter-1:vda:2097152]"
    assert diff[1].startswith("rpo_interval_s: ") and diff[1].endswith("-> 7.0")
    assert len(diff) == 2
    assert differences(pol("a"), pol("a")) == []


def test_config_owned_policies_are_refused_to_the_cli() -> None:
    why = config_owned("a", [pol("a")], "/etc/cdp/coordinator.toml")
    assert "declared in the coordinator's config file (/etc/cdp/coordinator.toml)" in why
    assert config_owned("b", [pol("a")], "x") == ""
