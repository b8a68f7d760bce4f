"""What a policy's disks may not do to other policies' and to their own past.

A disk (filter, name) belongs to one policy: a second policy naming it would
have two journals fight over one file. A disk of a policy may grow; it never
shrinks (the blocks past the new end would be lost from every replica and
restore point). Both are refused when the policy is created or edited, before
anything is stored; the filter refuses them too (cdp_filter.diskset), for a
policy that reaches it some other way.
"""

from __future__ import annotations

from collections.abc import Mapping

from cdp_common.config import PolicyConfig


def disk_conflicts(new: PolicyConfig, old: PolicyConfig | None,
                   policies: Mapping[str, PolicyConfig]) -> str:
    """Why `new` (replacing `old`, if any) may not be stored; '' when it may."""
    owner = {(d.filter, d.name): p.name for p in policies.values() if p.name != new.name
             for d in p.disks}
    for d in new.disks:
        other = owner.get((d.filter, d.name))
        if other is not None:
            return (f"disks: {d.filter}:{d.name} is already a disk of policy {other} "
                    "(one disk, one policy)")
    if old is not None:
        before = {(d.filter, d.name): d.size_bytes for d in old.disks}
        for d in new.disks:
            size = before.get((d.filter, d.name))
            if size is not None and d.size_bytes < size:
                return (f"disks: {d.filter}:{d.name} would shrink from {size} to "
                        f"{d.size_bytes} bytes; shrinking is refused (grow it, or create "
                        "a new policy)")
    return ""
