"""Clock offsets from heartbeats, and the RPO lag and state they correct."""

from __future__ import annotations

from coordfixtures import pol
from hypothesis import given
from hypothesis import strategies as st
from test_coordinator_state import lab

from cdp_common.states import PolicyState
from cdp_coordinator.clocks import WINDOW, ClockBook
from cdp_coordinator.model import Assignment, Endpoint, Report
from cdp_coordinator.status import policy_status


@given(offset=st.floats(-3600, 3600), delays=st.lists(st.floats(0, 0.5), min_size=1,
                                                       max_size=WINDOW))
def test_the_estimate_is_the_least_delayed_sample(offset: float, delays: list[float]) -> None:
    book = ClockBook()
    coord_now = 1_700_000_000.0
    for i, d in enumerate(delays):
        sent = coord_now + i + offset          # the node's clock at sending
        book.note("n1", int(sent * 1e9), coord_now + i + d)
    est = book.offset_s("n1")
    assert est is not None
    assert abs(est - (offset - min(delays))) < 1e-3
    assert est <= offset + 1e-3               # never overstates a node that is ahead


def test_unknown_and_old_nodes_have_no_offset() -> None:
    book = ClockBook()
    book.note("old", 0, 1000.0)               # a node too old to send its clock
    assert book.offset_s("old") is None and book.offset_s("never") is None
    assert book.offsets() == {}


def test_the_window_forgets_a_stepped_clock() -> None:
    book = ClockBook()
    for i in range(WINDOW):
        book.note("n1", int((1000 + i + 5.0) * 1e9), 1000 + i)
    for i in range(WINDOW):
        book.note("n1", int((2000 + i) * 1e9), 2000 + i)   # stepped back by NTP
    off = book.offset_s("n1")
    assert off is not None and abs(off) < 1e-3


def _status(offsets: dict[str, float]) -> tuple[float, PolicyState, str]:
    """filter-1 captured seq 10 two seconds ago and target-1 holds seq 5, captured
    three seconds ago, both by the filter's clock (coordinator clock + offset)."""
    p = pol("p")
    a = Assignment(policy="p", epoch=1, source_proxy=Endpoint("sp", "a:1"),
                   target_proxy=Endpoint("tp", "b:1"), target=Endpoint("target-1", "c:1"))
    wall = 10_000.0
    f_clock = wall + offsets.get("filter-1", 0.0)
    reports = {("filter-1", "p"): Report(policy="p", captured_seq=10,
                                         captured_time_ns=int((f_clock - 2.0) * 1e9)),
               ("target-1", "p"): Report(policy="p", durable_seq=5,
                                         newest_time_ns=int((f_clock - 3.0) * 1e9))}
    s = policy_status(p, a, reports, 0, wall, offsets, 0.5)
    return s.rpo_lag_s, s.state, s.reason


def test_lag_is_corrected_and_skew_warns() -> None:
    lag, state, reason = _status({})
    assert abs(lag - 3.0) < 1e-3 and state == PolicyState.OK and not reason
    for off in (30.0, -30.0):
        lag, state, reason = _status({"filter-1": off, "target-1": 0.01})
        assert abs(lag - 3.0) < 1e-3, (off, lag)       # the same lag, whatever the clock
        assert state == PolicyState.DEGRADED
        assert reason == (f"clock of filter-1 is 30.00s {'ahead of' if off > 0 else 'behind'}"
                          f" the coordinator's (alarm above 0.5s)")
    lag, state, reason = _status({"filter-1": 0.2})
    assert state == PolicyState.OK and not reason
    _, state, reason = _status({"target-1": -2.0})
    assert state == PolicyState.DEGRADED and "clock of target-1 is 2.00s behind" in reason


def test_a_registering_node_starts_a_fresh_estimate() -> None:
    s = lab()
    s.heartbeat("filter-1", [], 0, sent_time_ns=int(1030 * 1e9), received_wall_s=1000.0)
    assert abs((s.clocks.offset_s("filter-1") or 0) - 30.0) < 1e-6
    s.register(s.nodes["filter-1"].info, 1.0)
    assert s.clocks.offset_s("filter-1") is None
