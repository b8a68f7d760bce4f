"""Failover plans at the coordinator: SavePlan / GetPlan / ListPlans / DeletePlan over
real gRPC and direct calls (in-memory store): every validation rule refuses with
INVALID_ARGUMENT naming the field, an unknown policy with NOT_FOUND naming it, a
duplicate with ALREADY_EXISTS unless replace; nothing changes when refused; plans
survive a coordinator restart; a consistency group's name is a valid step; a standby
refuses the writes."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from coordfixtures import TRANSPORTS, memory_service, pol, serve

from cdp_common.config import PolicyConfig, PolicyDiskConfig
from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
from cdp_coordinator.memstore import MemoryBacking

pytestmark = pytest.mark.timeout(30)

GROUP = PolicyConfig(name="grp", target="target-1",
                     disks=[PolicyDiskConfig("filter-1", "g0", 1 << 20),
                            PolicyDiskConfig("filter-2", "g1", 1 << 20)])


def one(name: str) -> PolicyConfig:
    return PolicyConfig(name=name, target="target-1",
                        disks=[PolicyDiskConfig("filter-1", f"{name}0", 1 << 20)])


def policies() -> list[PolicyConfig]:
    return [pol("db"), one("app"), one("web"), GROUP]


def plan(name: str, *groups: tuple[list[str], float]) -> cpb.Plan:
    return cpb.Plan(name=name, groups=[cpb.PlanGroup(policies=p, delay_s=d)
                                       for p, d in groups])


async def refused(call: Any, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == code, err.value.details()
    return str(err.value.details())


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_plan_crud_and_restart(transport: str) -> None:
    backing = MemoryBacking()
    svc = memory_service(policies(), backing)
    dr = plan("dr", (["db"], 30), (["app", "web"], 0))
    async with serve(svc, transport) as stub:
        assert list((await stub.ListPlans(cpb.ListPlansRequest())).plans) == []
        saved = (await stub.SavePlan(cpb.SavePlanRequest(plan=dr))).plan
        assert saved == dr
        why = await refused(stub.SavePlan(cpb.SavePlanRequest(plan=dr)),
                            grpc.StatusCode.ALREADY_EXISTS)
        assert "already exists" in why
        other = plan("dr", (["grp"], 5), (["db"], 0))   # a consistency group by its name
        assert (await stub.SavePlan(cpb.SavePlanRequest(plan=other, replace=True))).plan == other
        await stub.SavePlan(cpb.SavePlanRequest(plan=plan("a-plan", (["grp..filter-1"], 0)),
                                                replace=True))   # a member on its own
        names = [p.name for p in (await stub.ListPlans(cpb.ListPlansRequest())).plans]
        assert names == ["a-plan", "dr"]
    svc2 = memory_service(policies(), backing)                 # a restart
    async with serve(svc2, transport) as stub:
        assert (await stub.GetPlan(cpb.PlanName(name="dr"))).plan == other
        assert (await stub.DeletePlan(cpb.PlanName(name="dr"))).plan == other
        for call in (stub.GetPlan(cpb.PlanName(name="dr")),
                     stub.DeletePlan(cpb.PlanName(name="dr"))):
            assert "no failover plan named 'dr'" in await refused(call,
                                                                  grpc.StatusCode.NOT_FOUND)
        assert [p.name for p in (await stub.ListPlans(cpb.ListPlansRequest())).plans] == [
            "a-plan"]


@pytest.mark.parametrize(("bad", "field"), [
    (plan("bad name", (["db"], 0)), "name:"),
    (plan("", (["db"], 0)), "name:"),
    (plan("dr"), "groups:"),
    (plan("dr", (["db"], 0), ([], 0)), "groups[2]:"),
    (plan("dr", (["db", "app"], 0), (["web", "db"], 0)), "groups[2].policies: policy db is "
                                                          "already in group 1"),
    (plan("dr", (["db"], -1)), "groups[1].delay_s:"),
    (plan("dr", (["db"], 86401)), "groups[1].delay_s:"),
    (plan("dr", (["db"], float("nan"))), "groups[1].delay_s:"),
    (plan("dr", (["db"], float("inf"))), "groups[1].delay_s:"),
    (plan("dr", (["d b"], 0)), "groups[1].policies:"),
])
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_invalid_plans_are_refused_naming_the_field(transport: str, bad: cpb.Plan,
                                                          field: str) -> None:
    backing = MemoryBacking()
    async with serve(memory_service(policies(), backing), transport) as stub:
        why = await refused(stub.SavePlan(cpb.SavePlanRequest(plan=bad)),
                            grpc.StatusCode.INVALID_ARGUMENT)
        assert why.startswith(field), why
    assert backing.plans == {}


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_unknown_policy_is_refused_naming_it(transport: str) -> None:
    backing = MemoryBacking()
    async with serve(memory_service(policies(), backing), transport) as stub:
        why = await refused(stub.SavePlan(cpb.SavePlanRequest(
            plan=plan("dr", (["db"], 86400), (["app", "nosuch"], 0)))),
            grpc.StatusCode.NOT_FOUND)
        assert "no policy or consistency group named nosuch" in why
    assert backing.plans == {}


async def test_a_standby_refuses_writes_and_serves_reads() -> None:
    backing = MemoryBacking()
    leader = memory_service(policies(), backing)
    async with serve(leader, "direct") as stub:
        await stub.SavePlan(cpb.SavePlanRequest(plan=plan("dr", (["db"], 1))))
    leader.become_standby("10.0.0.9:7000")
    async with serve(leader, "grpc") as stub:
        for call in (stub.SavePlan(cpb.SavePlanRequest(plan=plan("x", (["db"], 0)))),
                     stub.DeletePlan(cpb.PlanName(name="dr"))):
            assert "standby" in await refused(call, grpc.StatusCode.UNAVAILABLE)
        assert (await stub.GetPlan(cpb.PlanName(name="dr"))).plan.name == "dr"
