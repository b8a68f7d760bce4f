"""The slot rules of `cdp_coordinator.placement`, one rule at a time (pure)."""

from __future__ import annotations

import re

from cdp_coordinator import placement
from cdp_coordinator.model import SOURCE_ROLES, Node, NodeInfo, Role
from cdp_coordinator.placement import SLOT_RULES, Rule, Slot, fill


def test_docstring_table_is_the_rules_table() -> None:
    doc = placement.__doc__ or ""
    table = re.findall(r"^    ([A-Z]+)  ", doc, re.MULTILINE)
    assert table == [r.name for r, _ in SLOT_RULES]
    assert SLOT_RULES[-1][0] is Rule.NONE   # the catch-all comes last


def nodes(*specs: tuple[str, Role, bool, int]) -> dict[str, Node]:
    out = {}
    for nid, role, up, capacity in specs:
        out[nid] = Node(NodeInfo(nid, int(role), address=f"{nid}:1", capacity=capacity),
                        last_seen=0.0 if up else None, up=up)
    return out


def slot(bound: str = "", pinned: str = "", enabled: bool = True) -> Slot:
    return Slot("source", SOURCE_ROLES, "default", bound, pinned, enabled)


def test_each_rule() -> None:
    ns = nodes(("a", Role.SOURCE_PROXY, True, 0), ("b", Role.PROXY_BOTH, True, 1),
               ("t", Role.TARGET_PROXY, True, 0), ("down", Role.SOURCE_PROXY, False, 0))
    loads = {"a": 1}
    assert fill(slot(bound="a", enabled=False), ns, loads, 0) == (Rule.DISABLED, "")
    assert loads == {"a": 0}                                # the slot was released
    loads = {"a": 1}
    assert fill(slot(bound="a", pinned="b"), ns, loads, 0) == (Rule.PINNED, "b")
    assert loads == {"a": 0, "b": 1}
    assert fill(slot(bound="a", pinned="down"), ns, {"a": 1}, 0) == (Rule.KEEP, "a")
    assert fill(slot(pinned="t"), ns, {}, 0) == (Rule.CHOOSE, "a")   # wrong role: ignored
    # b is full (capacity 1), a is least loaded among the others
    assert fill(slot(), ns, {"a": 5, "b": 1}, 0) == (Rule.CHOOSE, "a")
    full = nodes(("b", Role.SOURCE_PROXY, True, 1), ("down", Role.SOURCE_PROXY, False, 0))
    assert fill(slot(), full, {"b": 1}, 0) == (Rule.NONE, "")


def test_grace_keeps_but_never_chooses() -> None:
    ns = {"g": Node(NodeInfo("g", int(Role.SOURCE_PROXY)), grace_until=10.0)}
    assert fill(slot(bound="g"), ns, {"g": 1}, 5.0) == (Rule.KEEP, "g")
    assert fill(slot(bound="g"), ns, {"g": 1}, 10.0) == (Rule.NONE, "")
    assert fill(slot(), ns, {}, 5.0) == (Rule.NONE, "")
    assert fill(slot(pinned="g"), ns, {}, 5.0) == (Rule.NONE, "")   # pinned needs "up"
