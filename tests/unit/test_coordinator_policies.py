"""Policy validation (every field), policy CRUD and ReportUnreachable over real gRPC and
by calling the servicer directly (in-memory store), the disk rules, config-file policies
applied at every start, purge orders, alarms through the service (injected clocks)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import grpc
import pytest
from coordfixtures import NODES, TRANSPORTS, Clock, memory_service, serve

from cdp_common.config import PolicyConfig, PolicyDiskConfig, build_policy
from cdp_common.errors import ConfigError
from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
from cdp_coordinator.memstore import MemoryBacking
from cdp_coordinator.state import Report

pytestmark = pytest.mark.timeout(30)

GOOD: dict[str, Any] = {"name": "db", "target": "target-1",
                        "disks": [{"filter": "filter-1", "name": "disk7", "size_bytes": 1 << 20}]}


@pytest.mark.parametrize(("patch", "field"), [
    ({"name": "bad name"}, "name"),
    ({"name": ""}, "name"),
    ({"name": "db\n"}, "name"),  # a trailing newline must not pass as a name
    ({"disks": [{"filter": "f", "name": "d\n", "size_bytes": 4096}]}, "disks[0].name"),
    ({"disks": []}, "disks"),
    ({"disks": [{"filter": "f 1", "name": "d", "size_bytes": 4096}]}, "disks[0].filter"),
    ({"disks": [{"filter": "f", "name": "d/x", "size_bytes": 4096}]}, "disks[0].name"),
    ({"disks": [{"filter": "f", "name": "d", "size_bytes": 4097}]}, "disks[0].size_bytes"),
    ({"disks": [{"filter": "f", "name": "d", "size_bytes": 0}]}, "disks[0].size_bytes"),
    ({"disks": [{"filter": "f", "name": "d", "size_bytes": 4096},
                {"filter": "f", "name": "d", "size_bytes": 4096}]}, "disks[1].name"),
    ({"name": "db..filter-1"}, "name"),   # '..' names the members of a group
    ({"name": "n" * 61, "disks": [{"filter": "f", "name": "d", "size_bytes": 4096},
                                  {"filter": "gg", "name": "e", "size_bytes": 4096}]},
     "name"),   # its member names (name..gg) would be longer than 64 characters
    ({"disks": [{"filter": "f", "name": "d"}]}, "disks[0].size_bytes"),
    ({"disks": "disk0"}, "disks"),
    ({"target": ""}, "target"),
    ({"target": 7}, "target"),
    ({"source_site": ""}, "source_site"),
    ({"target_site": "a b"}, "target_site"),
    ({"rpo_interval_s": 0}, "rpo_interval_s"),
    ({"rpo_interval_s": "fast"}, "rpo_interval_s"),
    ({"rpo_interval_s": float("nan")}, "rpo_interval_s"),
    ({"compression_level": 23}, "compression_level"),
    ({"compression_level": -1}, "compression_level"),
    ({"compression_level": 1.5}, "compression_level"),
    ({"encryption": "yes"}, "encryption"),
    ({"rpo_warning_s": 0}, "rpo_warning_s"),
    ({"rpo_warning_s": float("inf")}, "rpo_warning_s"),
    ({"rpo_warning_s": 10, "rpo_error_s": 5}, "rpo_error_s"),
    ({"bandwidth_limit_mbps": -1}, "bandwidth_limit_mbps"),
    ({"bandwidth_limit_mbps": float("nan")}, "bandwidth_limit_mbps"),
    ({"pinned_source_proxy": "sp 1"}, "pinned_source_proxy"),
    ({"pinned_target_proxy": "tp/1"}, "pinned_target_proxy"),
    ({"enabled": 1}, "enabled"),
    ({"colour": "red"}, "colour"),
])
def test_every_field_is_validated(patch: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_policy({**GOOD, **patch})
    assert str(err.value).startswith(f"{field}:"), str(err.value)


def test_valid_policy_with_every_field() -> None:
    p = build_policy({**GOOD, "source_site": "east", "target_site": "west",
                      "rpo_interval_s": 1, "rpo_warning_s": 5, "rpo_error_s": 5,
                      "compression_level": 0, "encryption": False,
                      "bandwidth_limit_mbps": 100, "pinned_source_proxy": "sp-2",
                      "pinned_target_proxy": "tp-2", "enabled": False})
    assert p.bandwidth_limit_mbps == 100.0 and not p.enabled and p.rpo_interval_s == 1.0
    assert build_policy(GOOD).enabled and build_policy(GOOD).bandwidth_limit_mbps == 0


# ---------------------------------------------------------------- service

def seed() -> PolicyConfig:
    return PolicyConfig(name="lab", target="target-1",
                        disks=[PolicyDiskConfig("filter-1", "disk0", 1 << 20)])


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_policy_crud_over_grpc_and_config_reconciled(transport: str) -> None:
    backing = MemoryBacking()
    clock = Clock()
    svc = memory_service([seed()], backing, clock=clock)
    for n in NODES:
        svc.register(n)
    async with serve(svc, transport) as stub:
        names = [json.loads(t)["name"] for t in (await stub.ListPolicies(
            cpb.ListPoliciesRequest())).policies_json]
        assert names == ["lab"]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreatePolicy(cpb.CreatePolicyRequest(policy_json=json.dumps(
                {**GOOD, "rpo_warning_s": 9, "rpo_error_s": 3})))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("rpo_error_s:")
        assert "db" not in svc.state.policies            # refused: nothing changed
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreatePolicy(cpb.CreatePolicyRequest(policy_json="{not json"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        made = json.loads((await stub.CreatePolicy(cpb.CreatePolicyRequest(
            policy_json=json.dumps(GOOD)))).policy_json)
        assert made["name"] == "db" and made["enabled"] is True
        assert svc.state.assignments["db"].source_proxy.node_id in ("sp-1", "sp-2")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreatePolicy(cpb.CreatePolicyRequest(policy_json=json.dumps(GOOD)))
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        # one disk, one policy; a disk grows, never shrinks (nothing changes when refused)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreatePolicy(cpb.CreatePolicyRequest(policy_json=json.dumps(
                {**GOOD, "name": "db2"})))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "filter-1:disk7 is already a disk of policy db" in err.value.details()
        assert "db2" not in svc.state.policies
        for size, ok in ((1 << 19, False), (1 << 21, True)):
            patch = json.dumps({"disks": [{"filter": "filter-1", "name": "disk7",
                                           "size_bytes": size}]})
            if ok:
                reply = await stub.UpdatePolicy(cpb.UpdatePolicyRequest(name="db",
                                                                        patch_json=patch))
                assert reply.warning == ""        # a CLI policy: no config file to fight
            else:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.UpdatePolicy(cpb.UpdatePolicyRequest(name="db", patch_json=patch))
                assert "would shrink from 1048576 to 524288 bytes" in err.value.details()
        assert svc.state.policies["db"].disks[0].size_bytes == 1 << 21
        assert [d.size_bytes for x in svc.assignment_set("filter-1").assignments
                if x.policy == "db" for d in x.disks] == [1 << 21]
        # update merges; a bad patch changes nothing; rename refused
        up = json.loads((await stub.UpdatePolicy(cpb.UpdatePolicyRequest(
            name="db", patch_json='{"pinned_source_proxy": "sp-2", '
                                  '"bandwidth_limit_mbps": 50}'))).policy_json)
        assert up["pinned_source_proxy"] == "sp-2" and up["target"] == "target-1"
        a = svc.state.assignments["db"]
        assert a.source_proxy.node_id == "sp-2"
        pb = svc.assignment_set("filter-1")
        assert {x.policy: x.bandwidth_limit_mbps for x in pb.assignments}["db"] == 50
        for patch, code in (('{"compression_level": 99}', grpc.StatusCode.INVALID_ARGUMENT),
                            ('{"name": "other"}', grpc.StatusCode.INVALID_ARGUMENT),
                            ('[1]', grpc.StatusCode.INVALID_ARGUMENT)):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.UpdatePolicy(cpb.UpdatePolicyRequest(name="db", patch_json=patch))
            assert err.value.code() == code
        assert svc.state.policies["db"].compression_level == 1
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetPolicy(cpb.PolicyName(name="nope"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        # disable / enable
        await stub.SetPolicyEnabled(cpb.SetPolicyEnabledRequest(name="db", enabled=False))
        assert svc.state.assignments["db"].reason == "disabled"
        status = await stub.GetStatus(cpb.StatusRequest())
        st = {p.name: p for p in status.policies}["db"]
        assert st.state == "unprotected" and not st.enabled and st.bandwidth_limit_mbps == 50
        assert st.reason.startswith("disabled by the operator")
        await stub.SetPolicyEnabled(cpb.SetPolicyEnabledRequest(name="db", enabled=True))
        assert svc.state.assignments["db"].reason == ""
        # the config file's policy: a CLI change is answered with a warning ...
        edited = await stub.UpdatePolicy(cpb.UpdatePolicyRequest(
            name="lab", patch_json='{"rpo_warning_s": 7}'))
        assert "declared in the coordinator's config file" in edited.warning
        assert "the next coordinator start applies the file again" in edited.warning
        gone = await stub.DeletePolicy(cpb.DeletePolicyRequest(name="lab"))
        assert "creates it again from the file" in gone.warning
        # ... and a delete with purge hands its nodes the order, not the others
        await stub.DeletePolicy(cpb.DeletePolicyRequest(name="db", purge=True))
        assert list(svc.assignment_set("filter-1").purge_policies) == ["db"]
        assert list(svc.assignment_set("target-1").purge_policies) == ["db"]
        assert list(svc.assignment_set("sp-1").purge_policies) == []
        await stub.CreatePolicy(cpb.CreatePolicyRequest(policy_json=json.dumps(GOOD)))
        assert list(svc.assignment_set("filter-1").purge_policies) == []   # a new db
        # a policy deleted before: every node gets the order (each checks it serves none)
        assert (await stub.DeletePolicy(cpb.DeletePolicyRequest(name="old", purge=True))
                ).policy_json == ""
        assert all("old" in svc.assignment_set(n.id).purge_policies for n in NODES)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.DeletePolicy(cpb.DeletePolicyRequest(name="old"))   # without purge
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    svc.store.close()
    # ... because every start applies the file again: lab is back, as the file says
    svc2 = memory_service([seed()], backing, clock=clock)
    assert set(svc2.state.policies) == {"db", "lab"}
    assert svc2.state.policies["lab"] == seed()
    svc2.store.close()
    changed = dataclasses.replace(seed(), rpo_warning_s=42.0, rpo_error_s=90.0)
    svc3 = memory_service([changed], backing, clock=clock)
    assert svc3.state.policies["lab"] == changed
    svc3.store.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_report_unreachable_probes_then_rebinds(transport: str) -> None:
    clock = Clock()
    answers = {"127.0.0.1:2": "UNAVAILABLE: connection refused"}
    probed: list[str] = []

    async def probe(address: str) -> str:
        probed.append(address)
        return answers.get(address, "")

    svc = memory_service([seed()], clock=clock, probe=probe)
    for n in NODES:
        svc.register(n)
    assert svc.state.assignments["lab"].source_proxy.node_id == "sp-1"
    epoch = svc.state.assignments["lab"].epoch
    async with serve(svc, transport) as stub:
        # a reachable node is not taken down, and not probed again right away
        r = await stub.ReportUnreachable(cpb.ReportUnreachableRequest(
            reporter="filter-1", node_id="tp-1", policy="lab"))
        assert r.probed and r.reachable and not r.rebound
        r = await stub.ReportUnreachable(cpb.ReportUnreachableRequest(
            reporter="filter-1", node_id="tp-1", policy="lab"))
        assert not r.probed and r.reachable
        # by address (as a source proxy knows its target proxy): probe fails -> rebind
        r = await stub.ReportUnreachable(cpb.ReportUnreachableRequest(
            reporter="filter-1", address="127.0.0.1:2", policy="lab", detail="refused"))
        assert r.probed and not r.reachable and r.rebound, r
        a = svc.state.assignments["lab"]
        assert a.source_proxy.node_id == "sp-2" and a.epoch == epoch + 1
        # already down: nothing more
        r = await stub.ReportUnreachable(cpb.ReportUnreachableRequest(node_id="sp-1"))
        assert not r.probed and "already down" in r.detail
        r = await stub.ReportUnreachable(cpb.ReportUnreachableRequest(node_id="ghost"))
        assert not r.probed and "unknown" in r.detail
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ReportUnreachable(cpb.ReportUnreachableRequest())
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert probed == ["127.0.0.1:3", "127.0.0.1:2"]
    svc.store.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_alarms_raised_cleared_and_listed(transport: str) -> None:
    clock, wall = Clock(), Clock(1_700_000_000.0)
    p = PolicyConfig(name="lab", target="target-1", rpo_warning_s=2, rpo_error_s=4,
                     disks=[PolicyDiskConfig("filter-1", "disk0", 1 << 20)])
    svc = memory_service([p], clock=clock, wall=wall)
    for n in NODES:
        svc.register(n)
    assert svc.check_alarms() == []          # within the start-up grace: not judged
    clock.t += 1
    t0 = int(wall.t * 1e9)

    def beat(captured: int, durable: int) -> None:
        for n in NODES:
            reports = []
            if n.id == "filter-1":
                reports = [Report("lab", captured_seq=captured, captured_time_ns=t0)]
            if n.id == "target-1":
                reports = [Report("lab", durable_seq=durable, newest_time_ns=t0)]
            svc.state.heartbeat(n.id, reports, clock.t)

    beat(10, 10)
    assert svc.check_alarms() == []
    beat(20, 10)
    wall.t += 3
    assert [(e.kind, e.level) for e in svc.check_alarms()] == [("raised", "warning")]
    assert svc.check_alarms() == []
    wall.t += 2
    assert [(e.kind, e.level) for e in svc.check_alarms()] == [("raised", "error")]
    beat(20, 20)
    assert [(e.kind, e.level) for e in svc.check_alarms()] == [("cleared", "ok")]
    async with serve(svc, transport) as stub:
        reply = await stub.ListAlarms(cpb.ListAlarmsRequest())
        assert [(e.kind, e.level) for e in reply.events] == [
            ("raised", "warning"), ("raised", "error"), ("cleared", "ok")]
        assert dict(reply.active) == {}
        assert "error threshold 4s" in reply.events[1].message
        assert len((await stub.ListAlarms(cpb.ListAlarmsRequest(limit=1))).events) == 1
    svc.store.close()


async def test_created_policies_obey_the_configured_disk_limit() -> None:
    """[coordinator] max_disk_bytes bounds policies made over the API, not only the file."""
    import dataclasses
    svc = memory_service([seed()])
    svc.config = dataclasses.replace(svc.config, coordinator=dataclasses.replace(
        svc.config.coordinator, max_disk_bytes=1 << 20))
    async with serve(svc, "direct") as stub:
        big = {**GOOD, "disks": [{**GOOD["disks"][0], "size_bytes": 2 << 20}]}
        with pytest.raises(Exception) as err:
            await stub.CreatePolicy(cpb.CreatePolicyRequest(policy_json=json.dumps(big)))
        assert "max_disk_bytes" in str(err.value), err.value
        assert "db" not in svc.state.policies
