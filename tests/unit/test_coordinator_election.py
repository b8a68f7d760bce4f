"""Leader election: the pure state machine (cdp_coordinator.election), and the
service as a standby and taking over (same epochs, nodes in grace, sync requests
kept), on the in-memory store shared by two services."""

from __future__ import annotations

import random
from pathlib import Path

import grpc
import pytest
from coordfixtures import NODES, Clock, config, pol, serve

from cdp_common.coordclient import LEADER_KEY, STANDBY_KEY, metadata_value
from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
from cdp_coordinator.election import TRANSITIONS, Action, Election, Event, Role
from cdp_coordinator.memstore import MemoryBacking, MemoryStore
from cdp_coordinator.model import Role as NodeRole
from cdp_coordinator.service import CoordinatorService
from cdp_coordinator.store import SqliteStore
from cdpctl import coordcall

# ------------------------------------------------------------------ the core


def test_the_table_is_the_docstring() -> None:
    import cdp_coordinator.election as mod

    doc = mod.__doc__ or ""
    for (role, event), (after, action) in TRANSITIONS.items():
        if event is Event.STOP:
            continue
        line = f"{role.name:<11} {event.value:<12} -> {after.name:<11} {action.name}"
        assert line in doc, line


def test_campaign_win_renew_and_step_down_when_unconfirmed() -> None:
    e = Election(ttl_s=2.0)
    step = e.handle(Event.WON, 10.0, "a:1")
    assert (step.before, step.after, step.action) == (Role.CANDIDATE, Role.LEADER, Action.LEAD)
    assert e.leading and e.leader == "a:1" and e.terms == 1
    e.renewed(10.0)
    assert e.tick(11.0) is None                    # before the deadline
    e.renewed(11.0)
    assert e.tick(12.4) is None
    step = e.tick(12.5)                            # 11 + 2 - 0.5: the lease may be gone
    assert step is not None and step.action is Action.STEP_DOWN
    assert e.role is Role.CANDIDATE and e.leader == "" and e.confirmed_at is None


def test_standby_follows_and_campaigns_when_the_key_goes() -> None:
    e = Election(ttl_s=2.0)
    step = e.handle(Event.LOST, 0.0, "b:2")
    assert step.action is Action.FOLLOW and e.role is Role.STANDBY and e.leader == "b:2"
    assert e.tick(100.0) is None                   # a standby has no deadline
    step = e.handle(Event.LOST, 1.0, "c:3")        # a new leader: follow it
    assert step.action is Action.FOLLOW and e.leader == "c:3"
    step = e.handle(Event.VACANT, 2.0)
    assert step.action is Action.CAMPAIGN and e.role is Role.CANDIDATE and e.leader == ""
    step = e.handle(Event.WON, 2.1, "a:1")
    assert step.action is Action.LEAD


@pytest.mark.parametrize("event", [Event.VACANT, Event.LEASE_LOST, Event.LOST, Event.STOP])
def test_a_leader_steps_down_on_every_loss(event: Event) -> None:
    e = Election(ttl_s=2.0)
    e.handle(Event.WON, 0.0, "a:1")
    step = e.handle(event, 0.1, "b:2")
    assert step.action is Action.STEP_DOWN and not e.leading


def test_unlisted_pairs_change_nothing() -> None:
    e = Election(ttl_s=2.0)
    e.handle(Event.WON, 0.0, "a:1")
    step = e.handle(Event.WON, 0.5, "a:1")        # still ours
    assert step.action is Action.NONE and e.leading and e.terms == 1
    e.handle(Event.STOP, 1.0)
    for event in Event:
        assert e.handle(event, 2.0, "x:1").action is Action.NONE
        assert e.role is Role.STOPPED


def test_random_runs_never_two_leaders_by_the_rules() -> None:
    """Two coordinators over one simulated key with leases: at no instant do both
    act as leader (the invariant of the module docstring), over random crashes,
    stalls and renewals."""
    rng = random.Random(13)
    ttl = 2.0
    for _ in range(200):
        now = 0.0
        key: tuple[int, float] | None = None        # (holder, lease expiry)
        expiry = [0.0, 0.0]
        alive = [True, True]
        es = [Election(ttl), Election(ttl)]
        for _ in range(60):
            now += rng.uniform(0.05, 0.6)
            if key is not None and key[1] <= now:
                key = None                             # lease expired at "etcd"
            i = rng.randrange(2)
            roll = rng.random()
            if roll < 0.05:
                alive[i] = not alive[i]                # crash / restart (a new process)
                if alive[i]:
                    es[i] = Election(ttl)
                continue
            if not alive[i] or roll < 0.25:            # stalled: no round this time
                pass
            else:
                e = es[i]
                e.tick(now)
                sent = now
                expiry[i] = sent + ttl                 # keep-alive renews at "etcd"
                if key is not None and key[0] == i:
                    key = (i, expiry[i])
                e.renewed(sent)
                if key is None:
                    if e.leading:
                        e.handle(Event.VACANT, now)
                    key = (i, expiry[i])
                    e.handle(Event.WON, now, str(i))
                elif key[0] == i:
                    e.handle(Event.WON, now, str(i))
                else:
                    e.handle(Event.LOST, now, str(key[0]))
            for j in range(2):
                es[j].tick(now) if alive[j] else None
            acting = [j for j in range(2) if alive[j] and es[j].leading]
            assert len(acting) <= 1, (now, key, acting)
            if acting:
                assert key is not None and key[0] == acting[0]


# ------------------------------------------------------------------ the service


def _svc(backing: MemoryBacking, clock: Clock, leading: bool,
         grace_s: float = 5.0) -> CoordinatorService:
    return CoordinatorService(config("unused.db", [pol("p1"), pol("p2")]), MemoryStore(backing),
                              clock=clock, leading=leading, takeover_grace_s=grace_s)


def _bring_up(svc: CoordinatorService, clock: Clock) -> None:
    for n in NODES:
        svc.register(n)
    for n in NODES:
        svc.state.heartbeat(n.id, [], clock())
    svc.flush()


async def test_a_standby_writes_nothing_and_refuses_with_the_leader_named() -> None:
    backing, clock = MemoryBacking(), Clock()
    leader = _svc(backing, clock, leading=True)
    _bring_up(leader, clock)
    before = {k: v[0] for k, v in backing.assignments.items()}
    assert before and all(e >= 1 for e in before.values())
    standby = _svc(backing, clock, leading=False)
    standby.become_standby("127.0.0.1:7001")
    assert {k: v[0] for k, v in backing.assignments.items()} == before
    async with serve(standby, "grpc") as stub:
        call = stub.Heartbeat(cpb.HeartbeatRequest(node_id="filter-1"))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "127.0.0.1:7001" in (err.value.details() or "")
        assert metadata_value(err.value.trailing_metadata(), LEADER_KEY) == "127.0.0.1:7001"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreatePolicy(cpb.CreatePolicyRequest(policy_json="{}"))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        watch = stub.WatchAssignments(cpb.WatchRequest(node_id="filter-1"))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in watch:
                pass
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # read-only status is served, marked as a standby's
        call = stub.GetStatus(cpb.StatusRequest())
        reply = await call
        assert {p.name: p.epoch for p in reply.policies} == before
        trailers = await call.trailing_metadata()
        assert metadata_value(trailers, STANDBY_KEY) == "1"
        assert metadata_value(trailers, LEADER_KEY) == "127.0.0.1:7001"
    assert coordcall.LEADER_KEY == LEADER_KEY and coordcall.STANDBY_KEY == STANDBY_KEY


def test_takeover_keeps_every_epoch_and_gives_the_nodes_grace() -> None:
    backing, clock = MemoryBacking(), Clock()
    old = _svc(backing, clock, leading=True)
    _bring_up(old, clock)
    epochs = {name: a.epoch for name, a in old.state.assignments.items()}
    endpoints = {name: a.source_proxy.node_id for name, a in old.state.assignments.items()}
    rid = old.state.request_sync("p1", 123)
    old._save_sync("p1")
    new = _svc(backing, clock, leading=False, grace_s=5.0)
    new.become_standby("old:1")
    clock.t += 1.0                                     # the old leader dies
    assert new.become_leader() and new.leading
    assert {n: a.epoch for n, a in new.state.assignments.items()} == epochs
    assert {n: a.source_proxy.node_id for n, a in new.state.assignments.items()} == endpoints
    assert new.state.sync_requests["p1"] == rid        # a pending sync survives
    by = {a.policy: a.sync_request_id for a in new.assignment_set("filter-1").assignments}
    assert by["p1"] == rid
    clock.t += 4.0                                     # past one lease, inside the grace
    assert new.flush() == []
    assert {n: a.epoch for n, a in new.state.assignments.items()} == epochs
    # the nodes come back, except sp of p1: after the grace it alone is rebound
    lost = endpoints["p1"]
    for n in NODES:
        if n.id != lost:
            new.state.heartbeat(n.id, [], clock())
    clock.t += 1.5
    for n in NODES:
        if n.id != lost:
            new.state.heartbeat(n.id, [], clock())
    changed = new.flush()
    assert "p1" in changed
    assert new.state.assignments["p1"].epoch == epochs["p1"] + 1
    assert all(new.state.assignments[n].epoch == e for n, e in epochs.items()
               if endpoints[n] != lost)
    assert {k: v[0] for k, v in backing.assignments.items()}["p1"] == epochs["p1"] + 1


def test_a_deposed_leader_ends_its_watch_streams() -> None:
    backing, clock = MemoryBacking(), Clock()
    svc = _svc(backing, clock, leading=True)
    from cdp_coordinator.service import _Watcher

    w = _Watcher("filter-1")
    svc._watchers.add(w)
    svc.become_standby("b:2")
    assert not svc.leading and w.queue.get_nowait() is None


def test_a_failed_load_is_retried_by_the_ticker_state() -> None:
    backing, clock = MemoryBacking(), Clock()
    svc = _svc(backing, clock, leading=False)
    broken = svc.store.load

    def fail() -> object:
        from cdp_common.errors import StorageError

        raise StorageError("etcd down")
    svc.store.load = fail  # type: ignore[method-assign]
    assert not svc.become_leader() and svc.want_lead and not svc.leading
    svc.store.load = broken  # type: ignore[method-assign]
    assert svc.become_leader() and svc.leading and not svc.want_lead


# ------------------------------------------------------------------ sync requests stored


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_sync_requests_are_stored_and_only_grow(kind: str, tmp_path: Path) -> None:
    backing = MemoryBacking()

    def open_store() -> MemoryStore | SqliteStore:
        return MemoryStore(backing) if kind == "memory" else SqliteStore(tmp_path / "s.db")

    s = open_store()
    assert s.load().sync_requests == {}
    s.save_sync_requests({"p1": 5, "g..f1": 7})
    s.save_sync_requests({"p1": 3})                    # an older id never wins
    s.save_sync_requests({})
    s.close()
    s = open_store()
    assert s.load().sync_requests == {"p1": 5, "g..f1": 7}
    s.save_sync_requests({"p1": 9})
    assert s.load().sync_requests["p1"] == 9
    s.close()


def test_a_restarted_coordinator_hands_out_a_pending_sync(tmp_path: Path) -> None:
    clock = Clock()
    db = tmp_path / "c.db"
    svc = CoordinatorService(config(db, [pol("p1")]), SqliteStore(db), clock=clock)
    _bring_up(svc, clock)
    rid = svc.state.request_sync("p1", 10**18)
    svc._save_sync("p1")
    svc.store.close()
    again = CoordinatorService(config(db, [pol("p1")]), SqliteStore(db), clock=clock)
    sets = again.assignment_set("filter-1").assignments
    assert [a.sync_request_id for a in sets] == [rid]
    assert again.state.request_sync("p1", 1) == rid + 1   # still grows
    again.store.close()


def test_roles_are_the_node_roles() -> None:
    # the election's Role is not the node's Role: the service keeps them apart
    assert {r.value for r in Role} == {"candidate", "standby", "leader", "stopped"}
    assert NodeRole.FILTER != Role.LEADER
