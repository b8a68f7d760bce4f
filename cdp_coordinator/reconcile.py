"""The coordinator config file's [[policies]], applied to the store on every start.

A policy in the config file belongs to the file: at each start it is created
when the store lacks it and replaced when a field differs, with one log line
naming every field that changed (old -> new). The CLI cannot edit or delete
such a policy (`config_owned`: the next start would undo it silently); it says
to edit the file instead. Policies created from the CLI are not touched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cdp_common.config import PolicyConfig


@dataclass(frozen=True)
class Change:
    policy: PolicyConfig
    text: str          # for the log line: "created" or "field: old -> new, ..."


def _show(value: object) -> str:
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return ":".join(str(v) for v in dataclasses.astuple(value))
    return repr(value)


def differences(old: PolicyConfig, new: PolicyConfig) -> list[str]:
    """'field: old -> new' for every field that differs, in field order."""
    out = []
    for f in dataclasses.fields(PolicyConfig):
        a, b = getattr(old, f.name), getattr(new, f.name)
        if a != b:
            out.append(f"{f.name}: {_show(a)} -> {_show(b)}")
    return out


def reconcile(config: Iterable[PolicyConfig],
              stored: Mapping[str, PolicyConfig]) -> list[Change]:
    """What to store for the config file's policies given the stored ones; pure."""
    changes = []
    for p in config:
        old = stored.get(p.name)
        if old is None:
            changes.append(Change(p, "created from the config file"))
        elif old != p:
            changes.append(Change(p, "changed by the config file: "
                                  + "; ".join(differences(old, p))))
    return changes


def config_owned(name: str, config: Iterable[PolicyConfig], path: str) -> str:
    """Why the CLI may not change policy `name` ('' when it may)."""
    if any(p.name == name for p in config):
        where = f" ({path})" if path else ""
        return (f"policy {name} is declared in the coordinator's config file{where}, which "
                "is applied at every start: change or remove it there")
    return ""
