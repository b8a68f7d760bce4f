"""Which disks this filter protects: its config's [[disks]] and the coordinator's policies.

Theory of operation
-------------------
A disk is protected for one of two reasons:

- *declared*: the filter's config lists it in [[disks]] (e.g. an existing image
  to protect). The config owns it: the coordinator can never detach it, and a
  policy that disagrees with it (another size, another policy, a disk the config
  does not list for that policy) is an error on the policy, never a silent choice;
- *managed*: a policy assigned to this filter names it and the config does not
  declare that policy. The filter creates a sparse image of the policy's size
  under data_dir, attaches it to the mount and captures; the manifest
  (`<data_dir>/disks.json`, below) remembers it, so it is attached again at the
  next start before the coordinator answers. When the policy is no longer
  assigned here it is detached (its data stays: state "deleted") until purged.

`plan` is the pure core: from the declared disks, the manifest and the admitted
assignments it computes what to attach, grow, detach, and the error of each
policy it cannot honour. The daemon (cdp_filter.daemon) carries the plan out.

Manifest (docs/FORMAT.md "Managed disks"):
    {"kind": "filter-disks", "version": 1,
     "policies": {"<policy>": {"state": "active" | "deleted",
                               "disks": [{"disk_id", "name", "size_bytes"}]}}}
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cdp_common import statefile
from cdp_common.config import DiskConfig
from cdp_common.errors import FormatError, StorageError
from cdp_common.fileio import OS_IO, FileIO
from cdp_common.names import is_name

MANIFEST_FILE = "disks.json"
MANIFEST_KIND = "filter-disks"
MANIFEST_VERSION = 1
ACTIVE = "active"
DELETED = "deleted"


@dataclass(frozen=True)
class DiskSpec:
    disk_id: int
    name: str
    size_bytes: int


@dataclass
class ManagedPolicy:
    state: str
    disks: list[DiskSpec]


@dataclass
class Plan:
    attach: dict[str, list[DiskSpec]] = field(default_factory=dict)   # new managed policies
    grow: dict[str, list[DiskSpec]] = field(default_factory=dict)     # disks to enlarge
    detach: list[str] = field(default_factory=list)                   # managed, unassigned
    errors: dict[str, str] = field(default_factory=dict)              # policy -> why not


# ---------------------------------------------------------------- manifest

def load_manifest(data_dir: str, io: FileIO = OS_IO) -> dict[str, ManagedPolicy]:
    path = os.path.join(data_dir, MANIFEST_FILE)
    data = statefile.load(path, MANIFEST_KIND, MANIFEST_VERSION, io) or {}
    out: dict[str, ManagedPolicy] = {}
    try:
        for name, p in dict(data.get("policies", {})).items():
            state = str(p["state"])
            if state not in (ACTIVE, DELETED) or not is_name(name):
                raise ValueError(f"policy {name!r}: state {state!r}")
            disks = [DiskSpec(int(d["disk_id"]), str(d["name"]), int(d["size_bytes"]))
                     for d in p["disks"]]
            out[name] = ManagedPolicy(state, disks)
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(f"{path}: corrupt disk manifest ({exc})") from None
    return out


def save_manifest(data_dir: str, manifest: Mapping[str, ManagedPolicy],
                  io: FileIO = OS_IO) -> None:
    path = os.path.join(data_dir, MANIFEST_FILE)
    doc: dict[str, Any] = {"policies": {
        name: {"state": p.state, "disks": [{"disk_id": d.disk_id, "name": d.name,
                                            "size_bytes": d.size_bytes} for d in p.disks]}
        for name, p in sorted(manifest.items())}}
    try:
        io.makedirs(data_dir)
        statefile.save(path, MANIFEST_KIND, MANIFEST_VERSION, doc, io)
    except OSError as exc:
        raise StorageError(f"{path}: cannot save the disk manifest ({exc.strerror})") from None


# ---------------------------------------------------------------- the plan

def declared_disks(declared: Sequence[DiskConfig]) -> dict[str, list[DiskSpec]]:
    """[[disks]] by policy, with the disk ids the filter gives them (config order)."""
    out: dict[str, list[DiskSpec]] = {}
    for dc in declared:
        disks = out.setdefault(dc.policy, [])
        disks.append(DiskSpec(len(disks), dc.name, dc.size_bytes))
    return out


def _describe(d: DiskSpec) -> str:
    return f"{d.name} (disk {d.disk_id}, {d.size_bytes} bytes)"


def _check_declared(policy: str, have: list[DiskSpec], want: list[DiskSpec]) -> str:
    """'' when the policy's disks are exactly the [[disks]] declared for it."""
    h = {d.name: d for d in have}
    w = {d.name: d for d in want}
    problems = []
    for name, d in sorted(w.items()):
        mine = h.get(name)
        if mine is None:
            problems.append(f"disk {name} is in the policy but not in this filter's "
                            f"[[disks]] for {policy}")
        elif mine.size_bytes != d.size_bytes:
            problems.append(f"disk {name} is {d.size_bytes} bytes in the policy but "
                            f"{mine.size_bytes} in this filter's [[disks]]")
        elif mine.disk_id != d.disk_id:
            problems.append(f"disk {name} is disk {d.disk_id} in the policy but "
                            f"{mine.disk_id} in this filter's [[disks]] (their order)")
    for name in sorted(set(h) - set(w)):
        problems.append(f"disk {name} is in this filter's [[disks]] for {policy} but not "
                        "in the policy")
    if not problems:
        return ""
    return (f"policy {policy} disagrees with this filter's config: " + "; ".join(problems)
            + " (the config's disks are captured as declared)")


def plan(declared: Sequence[DiskConfig], manifest: Mapping[str, ManagedPolicy],
         assigned: Mapping[str, list[DiskSpec]], attached: Mapping[str, list[DiskSpec]],
         max_disk_bytes: int) -> Plan:
    """What to do for the admitted assignments `assigned` (policy -> this filter's
    disks in it), given the [[disks]] `declared`, the `manifest` and the managed
    policies `attached` now (policy -> disks as open)."""
    out = Plan()
    by_policy = declared_disks(declared)
    owner = {dc.name: dc.policy for dc in declared}    # disk name -> policy, on this filter
    for name, p in manifest.items():
        for d in p.disks:   # a deleted policy's names stay taken: its images are kept
            owner.setdefault(d.name, name)
    for policy, want in sorted(assigned.items()):
        if policy in by_policy:
            why = _check_declared(policy, by_policy[policy], want)
            if why:
                out.errors[policy] = why
            continue
        why = _check_new(policy, want, owner, manifest, max_disk_bytes)
        if why:
            out.errors[policy] = why
            continue
        have = attached.get(policy)
        if have is None:
            old = manifest.get(policy)
            if old is not None and old.state == DELETED and not _same_ids(old.disks, want):
                out.errors[policy] = (f"policy {policy} was deleted here with other disks "
                                      f"({', '.join(_describe(d) for d in old.disks)}), "
                                      "whose data is kept: purge it first "
                                      "(`cdpctl policy delete --purge`)")
                continue
            out.attach[policy] = list(want)
            continue
        why, grown = _compare_attached(policy, have, want)
        if why:
            out.errors[policy] = why
        if grown:
            out.grow[policy] = grown
    out.detach = sorted(p for p in attached if p not in assigned and p not in by_policy)
    return out


def _same_ids(a: list[DiskSpec], b: list[DiskSpec]) -> bool:
    return sorted((d.disk_id, d.name) for d in a) == sorted((d.disk_id, d.name) for d in b)


def _check_new(policy: str, want: list[DiskSpec], owner: Mapping[str, str],
               manifest: Mapping[str, ManagedPolicy], max_disk_bytes: int) -> str:
    if not want:
        return f"policy {policy} names no disk on this filter"
    ids = [d.disk_id for d in want]
    if len(set(ids)) != len(ids) or len({d.name for d in want}) != len(want):
        return f"policy {policy}: a disk id or name is listed twice"
    for d in want:
        if not is_name(d.name):
            return f"policy {policy}: {d.name!r} is not a valid disk name"
        if d.size_bytes <= 0 or d.size_bytes % 4096:
            return (f"policy {policy}: disk {d.name} of {d.size_bytes} bytes is not a "
                    "positive multiple of 4096")
        if d.size_bytes > max_disk_bytes:
            return (f"policy {policy}: disk {d.name} of {d.size_bytes} bytes is larger than "
                    f"this filter's max_disk_bytes ({max_disk_bytes})")
        other = owner.get(d.name, policy)
        if other != policy:
            gone = other in manifest and manifest[other].state == DELETED
            return (f"policy {policy}: disk name {d.name} is already used on this filter by "
                    f"policy {other}" + (" (deleted; its data is kept until purged)"
                                         if gone else ""))
    return ""


def _compare_attached(policy: str, have: list[DiskSpec], want: list[DiskSpec]
                      ) -> tuple[str, list[DiskSpec]]:
    """(error, disks to grow) for a managed policy already attached."""
    h = {d.disk_id: d for d in have}
    w = {d.disk_id: d for d in want}
    problems, grown = [], []
    for disk_id, d in sorted(w.items()):
        mine = h.get(disk_id)
        if mine is None:
            problems.append(f"disk {d.name} was added to the running policy (adding a disk "
                            "to a protected policy is not supported: create another policy)")
        elif mine.name != d.name:
            problems.append(f"disk {disk_id} is {mine.name} here but {d.name} in the policy "
                            "(renaming is not supported)")
        elif d.size_bytes < mine.size_bytes:
            problems.append(f"disk {d.name} would shrink from {mine.size_bytes} to "
                            f"{d.size_bytes} bytes (shrinking is refused)")
        elif d.size_bytes > mine.size_bytes:
            grown.append(d)
    for disk_id in sorted(set(h) - set(w)):
        problems.append(f"disk {h[disk_id].name} was removed from the running policy "
                        "(removing a disk is not supported: delete the policy)")
    why = f"policy {policy}: " + "; ".join(problems) if problems else ""
    return why, grown
