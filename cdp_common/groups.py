"""Consistency groups: a policy with disks on several filters (pure).

Theory of operation: the data path knows only single-filter policies (one
journal, one seq counter, one stream, one store per policy). A policy whose
disks lie on N ≥ 2 filters is run as a *group* of N member policies, one per
filter, named ``<group>..<filter>`` and holding that filter's disks in config
order. Members share everything else of the group's config (target, sites,
RPO, retention, keys by name), and the coordinator places them on one source
proxy, one target proxy and one target, so the source proxy can checkpoint all
members' streams together and the target can intersect their points
(docs/ARCHITECTURE.md "Consistency groups").

``..`` cannot appear in an operator's policy name, and a group's name must
leave room for its members' (config.validate_policy refuses both), so a member
name is always a valid name that never collides with a policy of its own.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # cdpctl imports this module; loading the config module costs startup
    from cdp_common.config import PolicyConfig

SEPARATOR = ".."


def member_name(group: str, filter_id: str) -> str:
    return f"{group}{SEPARATOR}{filter_id}"


def split_member(name: str) -> tuple[str, str] | None:
    """(group, filter) of a member policy name; None for any other name."""
    group, sep, filter_id = name.partition(SEPARATOR)
    if not sep or not group or not filter_id:
        return None
    return group, filter_id


def filters_of(policy: PolicyConfig) -> list[str]:
    """The policy's filters in the order their first disk appears."""
    seen: dict[str, None] = {}
    for d in policy.disks:
        seen.setdefault(d.filter, None)
    return list(seen)


def is_group(policy: PolicyConfig) -> bool:
    return len(filters_of(policy)) > 1


def members(policy: PolicyConfig) -> list[PolicyConfig]:
    """The member policies of a group, sorted by name; [policy] for a one-filter policy."""
    if not is_group(policy):
        return [policy]
    out = [replace(policy, name=member_name(policy.name, f),
                   disks=[d for d in policy.disks if d.filter == f])
           for f in filters_of(policy)]
    return sorted(out, key=lambda m: m.name)


def member_names(policy: PolicyConfig) -> list[str]:
    return [m.name for m in members(policy)] if is_group(policy) else []

