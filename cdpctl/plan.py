"""`cdpctl plan create|show|list|delete|run|test NAME`: failover plans over several policies.

Theory of operation
-------------------
A plan is an ordered list of *groups* of policies (a name may be a
consistency group's) with a delay after each group, e.g. a database before
its application servers:

    group 1: db              then wait 30 s
    group 2: app, web

Plans live in the coordinator's store (SavePlan, GetPlan, ListPlans,
DeletePlan), so every cdpctl sees them and they survive restarts; the
coordinator checks them when they are saved (names, delays 0..86400 s, at
least one group, no policy twice, every policy known). The coordinator only
keeps plans: `run` and `test` are carried out here, against each policy's
target, with the very calls `cdpctl failover` and `cdpctl failover test` make
(cdpctl.targetcall; `--planned` as cdpctl.planned).

`execute` is the pure core, fed the plan's groups, a *runner* (policy ->
what it did, or an exception) and an injected clock and sleep:

1. the policies of a group run concurrently (one thread each) and the group
   ends when all of them have;
2. a group with a failed policy stops the plan: its delay is not waited and
   the later groups are not started (their steps say "not started"); the
   policies of the failed group that succeeded stay failed over (the output
   says so, and how to undo them);
3. otherwise the plan waits the group's delay, then starts the next group;
   there is no wait after the last group.

Stopping a plan's test failovers (`plan test NAME --stop`) uses the same core
with the groups in reverse order, no delays and no stop on failure: it stops
as much as it can and reports each policy. Every step records its policy,
action, start and end time, seconds, ok or the error, and the point used.
"""

from __future__ import annotations

import argparse
import json
import textwrap
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdp_common.errors import CdpError
from cdp_common.timefmt import iso_utc
from cdpctl import lazy, table
from cdpctl.cmdline import Context, Subparsers
from cdpctl.state import UsageError

if TYPE_CHECKING:
    from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
    from cdp_common.pb.cdp.v1 import restore_pb2 as pb
    from cdpctl import coordcall, planned, targetcall
    from cdpctl.resolve import Coordinator
else:   # loaded when a command runs, not for --help (cdpctl.lazy)
    cpb = lazy.module("cdp_common.pb.cdp.v1.coordinator_pb2")
    pb = lazy.module("cdp_common.pb.cdp.v1.restore_pb2")
    coordcall = lazy.module("cdpctl.coordcall")
    planned = lazy.module("cdpctl.planned")
    targetcall = lazy.module("cdpctl.targetcall")

FAILOVER, PLANNED, TEST_START, TEST_STOP = ("failover", "planned failover", "test failover",
                                            "test stop")
OK, FAILED, NOT_STARTED = "ok", "failed", "not started"


class PlanFailedError(CdpError):
    """A step of the plan failed; the later groups were not started."""


@dataclass(frozen=True)
class Group:
    """One group of a plan: its policies run together, then `delay_s` is waited."""

    policies: tuple[str, ...]
    delay_s: float = 0.0


Runner = Callable[[str], dict[str, Any]]
"""runner(policy) -> {"point": {...} | None, "images": [...], "note": str} (any may be
missing); raises (a CdpError, or anything else) when the step failed."""


# ---------------------------------------------------------------- the pure core

def _iso(t: float) -> str:
    return iso_utc(int(t * 1e9))


def _step(group: int, policy: str, action: str) -> dict[str, Any]:
    return {"group": group, "policy": policy, "action": action, "state": NOT_STARTED,
            "ok": False, "error": "", "start": None, "end": None, "seconds": None,
            "point": None, "images": [], "note": ""}


def _run_one(step: dict[str, Any], runner: Runner, now: Callable[[], float]) -> None:
    start = now()
    step["start"] = _iso(start)
    try:
        done = runner(step["policy"])
    except CdpError as exc:
        step.update(state=FAILED, error=str(exc))
    except Exception as exc:  # a step's failure is reported, never a traceback
        step.update(state=FAILED, error=f"{type(exc).__name__}: {exc}")
    else:
        step.update(state=OK, ok=True, point=done.get("point"),
                    images=list(done.get("images") or []), note=done.get("note", ""))
    end = now()
    step.update(end=_iso(end), seconds=round(end - start, 3))


def execute(groups: Sequence[Group], action: str, runner: Runner, *,
            now: Callable[[], float] = time.time,
            sleep: Callable[[float], None] = time.sleep,
            stop_on_failure: bool = True, wait: bool = True,
            reverse: bool = False) -> dict[str, Any]:
    """Run the groups in order (module docstring), or in reverse order with `reverse`
    (each keeps its number); returns the result document: {"action", "ok", "start",
    "end", "seconds", "groups": [...], "steps": [...]}, groups and steps in run order."""
    steps_of = [[_step(i, p, action) for p in g.policies] for i, g in enumerate(groups, 1)]
    docs = [{"group": i, "policies": list(g.policies), "delay_s": g.delay_s,
             "state": NOT_STARTED, "waited_s": 0.0} for i, g in enumerate(groups, 1)]
    if reverse:
        groups, steps_of, docs = groups[::-1], steps_of[::-1], docs[::-1]
    began = now()
    failed = False
    for i, (g, steps, doc) in enumerate(zip(groups, steps_of, docs, strict=True)):
        if failed and stop_on_failure:
            break
        with ThreadPoolExecutor(max_workers=max(1, len(steps)),
                                thread_name_prefix=f"plan-group-{i + 1}") as pool:
            for f in [pool.submit(_run_one, s, runner, now) for s in steps]:
                f.result()
        bad = any(s["state"] != OK for s in steps)
        doc["state"] = FAILED if bad else OK
        failed = failed or bad
        if wait and g.delay_s > 0 and i < len(groups) - 1 and not (bad and stop_on_failure):
            t0 = now()
            sleep(g.delay_s)
            doc["waited_s"] = round(now() - t0, 3)
    end = now()
    steps = [s for group in steps_of for s in group]
    return {"action": action, "ok": not failed, "start": _iso(began), "end": _iso(end),
            "seconds": round(end - began, 3), "groups": docs, "steps": steps}


def groups_of(plan: cpb.Plan | dict[str, Any]) -> list[Group]:
    """The plan's groups, from its message or its JSON document."""
    if isinstance(plan, dict):
        return [Group(tuple(g["policies"]), float(g["delay_s"])) for g in plan["groups"]]
    return [Group(tuple(g.policies), g.delay_s) for g in plan.groups]


def plan_doc(plan: cpb.Plan) -> dict[str, Any]:
    return {"name": plan.name, "groups": [{"group": i, "policies": list(g.policies),
                                          "delay_s": g.delay_s}
                                         for i, g in enumerate(plan.groups, 1)]}


def parse_groups(items: Sequence[tuple[str, str]]) -> list[Group]:
    """The groups of `--group P[,P...] [--delay S] ...`, in the order given: each
    --delay sets the delay after the group just before it."""
    out: list[Group] = []
    for kind, value in items:
        if kind == "group":
            names = tuple(n.strip() for n in value.split(","))
            if not all(names):
                raise UsageError(f"--group {value!r}: expected POLICY[,POLICY...]")
            out.append(Group(names))
            continue
        if not out:
            raise UsageError(f"--delay {value}: give it after the --group it follows")
        try:
            delay = float(value)
        except ValueError:
            raise UsageError(f"--delay {value!r}: expected seconds, e.g. 30") from None
        if out[-1].delay_s:
            raise UsageError(f"--delay {value}: group {len(out)} has a delay already")
        out[-1] = Group(out[-1].policies, delay)
    if not out:
        raise UsageError("a plan needs at least one --group POLICY[,POLICY...]")
    return out


def _fmt_s(s: float) -> str:
    return f"{s:g} s"


def render_plan(doc: dict[str, Any]) -> str:
    lines = [f"plan {doc['name']}: {sum(len(g['policies']) for g in doc['groups'])} "
             f"policies in {len(doc['groups'])} group(s)"]
    last = len(doc["groups"])
    for g in doc["groups"]:
        then = (f", then wait {_fmt_s(g['delay_s'])}" if g["delay_s"] and g["group"] < last
                else "")
        lines.append(f"  group {g['group']}: {', '.join(g['policies'])}{then}")
    return "\n".join(lines)


def render_list(plans: list[dict[str, Any]]) -> str:
    if not plans:
        return "no failover plans"
    rows = [(p["name"], len(p["groups"]),
             " | ".join(",".join(g["policies"]) for g in p["groups"]),
             " ".join(_fmt_s(g["delay_s"]) for g in p["groups"][:-1]) or "-")
            for p in plans]
    return table.render(("PLAN", "GROUPS", "POLICIES (BY GROUP)", "DELAYS"), rows,
                        right=("GROUPS",))


def _point_text(p: dict[str, Any] | None) -> str:
    if not p:
        return "-"
    text = f"{p.get('id', '?')} ({p.get('time') or '?'}"
    if p.get("members"):
        text += ", group checkpoint"
    elif "last_seq" in p:
        text += f", seq {p['last_seq']}"
    return text + ")"


def render_run(doc: dict[str, Any]) -> str:
    """The text output of `plan run` / `plan test`: a line, the steps table, the waits."""
    n = len(doc["steps"])
    point = f", point {doc['point']}" if doc.get("point") else ""
    head = (f"plan {doc['plan']}: {doc['action']} of {n} policies in {len(doc['groups'])} "
            f"group(s){point}: "
            + ("done" if doc["ok"] else "FAILED") + f" in {doc['seconds']:.1f} s")
    rows = []
    waited = {g["group"]: g for g in doc["groups"]}
    for s in doc["steps"]:
        result = s["state"] if s["state"] != FAILED else f"FAILED: {s['error']}"
        if s["state"] == OK and s.get("note"):
            result += f" ({s['note']})"
        rows.append((s["group"], s["policy"], s["action"], s["start"] or "-", s["end"] or "-",
                     "-" if s["seconds"] is None else f"{s['seconds']:.2f}",
                     _point_text(s["point"]), result))
    lines = [head, table.render(("GROUP", "POLICY", "ACTION", "START (UTC)", "END (UTC)",
                                 "SECONDS", "POINT", "RESULT"), rows,
                                right=("GROUP", "SECONDS"))]
    waits = [f"after group {i}: waited {g['waited_s']:.1f} s (delay {_fmt_s(g['delay_s'])})"
             for i, g in sorted(waited.items()) if g["waited_s"]]
    lines += waits
    skipped = [g["group"] for g in doc["groups"] if g["state"] == NOT_STARTED]
    if skipped:
        lines.append("not started (a step failed before them): group(s) "
                     + ", ".join(map(str, skipped)))
    if not doc["ok"] and doc["action"] in (FAILOVER, PLANNED):
        done = [s["policy"] for s in doc["steps"] if s["state"] == OK]
        if done:
            lines.append("still failed over: " + ", ".join(done) + " (undo each with "
                         "`cdpctl failover undo POLICY`, or fix the failure and run the "
                         "plan's later groups)")
    return "\n".join(lines)


# ---------------------------------------------------------------- the target calls

def plan_test_name(plan: str) -> str:
    """The name of a plan's test failovers at every policy's target."""
    return f"plan-{plan}"[:64]


def _request(args: argparse.Namespace, policy: str, out_dir: str = "") -> pb.RestoreRequest:
    req = pb.RestoreRequest(policy=policy, out_dir=out_dir,
                            allow_inconsistent=args.allow_inconsistent)
    if args.time:
        req.time_ns = targetcall.parse_time(args.time)
    else:
        req.latest = True
    return req


def _client(coord: Coordinator, args: argparse.Namespace,
            policy: str) -> targetcall.TargetClient:
    return targetcall.TargetClient(coord, targetcall.target_address(
        coord, policy, args.target, args.timeout))


def _done(done: pb.RestoreDone) -> dict[str, Any]:
    return {"point": targetcall.chosen_point_dict(done),
            "images": targetcall.images_of(done, loop=False, read_only=False)}


def failover_runner(coord: Coordinator, args: argparse.Namespace) -> Runner:
    """A policy's failover, as `cdpctl failover POLICY [--time T] [--planned]`."""
    def run(policy: str) -> dict[str, Any]:
        client = _client(coord, args, policy)
        try:
            if args.planned:
                request = _planned_request(coord, args, client, policy)
            else:
                request = _request(args, policy)
            # as `failover --planned`: a failure from here on leaves the source frozen
            done = client.stream("failover", client.stub.Failover(
                request, timeout=targetcall.RESTORE_TIMEOUT_S), quiet=True)
            out = _done(done)
            if args.planned:
                out["note"] = "RPO 0; the source stays frozen until `failover undo`"
            return out
        finally:
            client.close()
    return run


def _planned_request(coord: Coordinator, args: argparse.Namespace,
                     client: targetcall.TargetClient, policy: str) -> pb.RestoreRequest:
    """Freeze, drain, the final point (cdpctl.planned); unfreeze when that fails."""
    def points() -> list[pb.PointInfo]:
        return list(client.call("restore-points", client.stub.List,
                                pb.ListPointsRequest(policy=policy),
                                timeout=args.timeout).points)

    planned.set_frozen(coord, policy, True, args.timeout)
    try:
        point, _ = planned.drain(coord, policy, points, args.drain_timeout, args.json)
    except BaseException:
        planned.set_frozen(coord, policy, False, args.timeout)
        raise
    return pb.RestoreRequest(policy=policy, point_id=point.id)


def start_test_runner(coord: Coordinator, args: argparse.Namespace, plan: str) -> Runner:
    """A policy's test failover under OUT/<policy>/, named after the plan."""
    out = Path(args.out).absolute()

    def run(policy: str) -> dict[str, Any]:
        client = _client(coord, args, policy)
        try:
            done = client.stream("test start", client.stub.TestStart(
                pb.TestStartRequest(restore=_request(args, policy, str(out / policy)),
                                    name=plan_test_name(plan)),
                timeout=targetcall.RESTORE_TIMEOUT_S), quiet=True)
        finally:
            client.close()
        return {**_done(done), "note": f"test {plan_test_name(plan)}"}
    return run


def stop_test_runner(coord: Coordinator, args: argparse.Namespace, plan: str) -> Runner:
    """Stop the plan's test failover of a policy (none running: nothing to do)."""
    name = plan_test_name(plan)

    def run(policy: str) -> dict[str, Any]:
        client = _client(coord, args, policy)
        try:
            listed = client.call("test list", client.stub.TestList,
                                 pb.FailoverRequest(policy=policy), timeout=args.timeout)
            test = next((t for t in listed.tests if t.name == name), None)
            if test is None:
                return {"note": f"no test {name} ran: nothing to stop"}
            for img in test.images:
                targetcall.detach_loops(img.path)
            done = client.call("test stop", client.stub.TestStop,
                               pb.TestStopRequest(policy=policy, name=name), timeout=300)
        finally:
            client.close()
        return {"images": [{"disk": i.disk, "path": i.path} for i in done.images],
                "note": f"{len(done.images)} image(s) deleted"}
    return run


def _warm_up() -> None:
    """Load the lazily imported modules before the threads use them: a lazy module
    is not safe to load from two threads at once (importlib.util.LazyLoader)."""
    for mod, attr in ((cpb, "Plan"), (pb, "RestoreRequest"), (coordcall, "call"),
                      (planned, "drain"), (targetcall, "TargetClient")):
        getattr(mod, attr)
    for name, attr in (("grpc", "RpcError"), ("rpc", "sync_channel"),
                       ("pgrpc", "RestorePointsStub"), ("rgrpc", "TargetStub"),
                       ("rpb", "PolicyStateRequest")):
        getattr(getattr(targetcall, name), attr)


# ---------------------------------------------------------------- commands

def _get(coord: Coordinator, args: argparse.Namespace) -> cpb.Plan:
    reply = coordcall.call(coord, lambda s: s.GetPlan(cpb.PlanName(name=args.name),
                                                      timeout=args.timeout))
    return reply.plan


def cmd_create(args: argparse.Namespace, ctx: Context) -> int:
    groups = parse_groups(args.steps or [])
    plan = cpb.Plan(name=args.name, groups=[cpb.PlanGroup(policies=list(g.policies),
                                                          delay_s=g.delay_s) for g in groups])
    reply = coordcall.call(ctx.coordinator(args), lambda s: s.SavePlan(
        cpb.SavePlanRequest(plan=plan, replace=args.replace), timeout=args.timeout))
    doc = plan_doc(reply.plan)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print("saved " + render_plan(doc))
    return 0


def cmd_show(args: argparse.Namespace, ctx: Context) -> int:
    doc = plan_doc(_get(ctx.coordinator(args), args))
    print(json.dumps(doc, indent=2) if args.json else render_plan(doc))
    return 0


def cmd_list(args: argparse.Namespace, ctx: Context) -> int:
    reply = coordcall.call(ctx.coordinator(args), lambda s: s.ListPlans(
        cpb.ListPlansRequest(), timeout=args.timeout))
    plans = [plan_doc(p) for p in reply.plans]
    print(json.dumps({"plans": plans}, indent=2) if args.json else render_list(plans))
    return 0


def cmd_delete(args: argparse.Namespace, ctx: Context) -> int:
    reply = coordcall.call(ctx.coordinator(args), lambda s: s.DeletePlan(
        cpb.PlanName(name=args.name), timeout=args.timeout))
    doc = plan_doc(reply.plan)
    print(json.dumps(doc, indent=2) if args.json else
          f"plan {doc['name']} deleted (its policies and any failover are untouched)")
    return 0


def _finish(args: argparse.Namespace, name: str, point: str, doc: dict[str, Any]) -> int:
    doc = {"plan": name, "point": point, **doc}
    print(json.dumps(doc, indent=2) if args.json else render_run(doc))
    if doc["ok"]:
        return 0
    bad = [s for s in doc["steps"] if s["state"] == FAILED]
    raise PlanFailedError(f"plan {name}: {doc['action']} failed: "
                          + "; ".join(f"{s['policy']}: {s['error']}" for s in bad))


def _point_word(args: argparse.Namespace) -> str:
    if getattr(args, "planned", False):
        return "planned (RPO 0)"
    return f"at or before {args.time}" if args.time else "latest"


def cmd_run(args: argparse.Namespace, ctx: Context) -> int:
    if args.planned and (args.time or args.allow_inconsistent):
        raise UsageError("--planned fails over at the point holding every write: no --time "
                         "or --allow-inconsistent")
    if args.time:
        targetcall.parse_time(args.time)   # a bad time is refused before anything runs
    coord = ctx.coordinator(args)
    plan = _get(coord, args)
    _warm_up()
    doc = execute(groups_of(plan), PLANNED if args.planned else FAILOVER,
                  failover_runner(coord, args))
    return _finish(args, plan.name, _point_word(args), doc)


def cmd_test(args: argparse.Namespace, ctx: Context) -> int:
    if args.stop and (args.out or args.time or args.allow_inconsistent):
        raise UsageError("plan test --stop: --out, --time and --allow-inconsistent go with "
                         "starting the test")
    if not args.stop and not args.out:
        raise UsageError("plan test: --out DIR is needed (under the target's restore_dir; "
                         "each policy's images go to DIR/<policy>/), or --stop")
    if args.time:
        targetcall.parse_time(args.time)
    coord = ctx.coordinator(args)
    plan = _get(coord, args)
    _warm_up()
    if args.stop:
        doc = execute(groups_of(plan), TEST_STOP, stop_test_runner(coord, args, plan.name),
                      stop_on_failure=False, wait=False, reverse=True)
        return _finish(args, plan.name, "", doc)
    doc = execute(groups_of(plan), TEST_START, start_test_runner(coord, args, plan.name))
    return _finish(args, plan.name, _point_word(args), doc)


# ---------------------------------------------------------------- parser

class _Ordered(argparse.Action):
    """--group and --delay into one list, in the order given."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        items = list(getattr(namespace, self.dest, None) or [])
        items.append(("group" if option_string == "--group" else "delay", str(values)))
        setattr(namespace, self.dest, items)


_ABOUT = """\
A failover plan is an ordered list of groups of policies (or consistency
groups) with a delay after each group: the policies of one group fail over
together, then the plan waits, then the next group starts, e.g. a database,
30 s for it to come up, then the application servers that need it. Plans
are kept by the coordinator (every cdpctl sees them; they survive restarts)."""

_RUN_NOTES = """\
A step that fails stops the plan: the later groups are not started, and the
output says which policies are failed over already. Each step's images are
written BY THE TARGET, on its host (see `cdpctl failover --help`). Exit code
0: every step succeeded; 2: a step failed (the table says which, and why)."""


def register(sub: Subparsers, ctx: Context) -> None:
    """`cdpctl plan ...` (see cdpctl.cmdline.CommandGroup)."""
    fmt, epilog = ctx.formatter, ctx.epilog
    p = sub.add_parser(
        "plan", formatter_class=fmt, help="failover plans: several policies in order",
        description=_ABOUT + textwrap.dedent("""

            `plan create NAME --group P[,P...] [--delay S] ...` saves one,
            `plan show NAME`, `plan list` and `plan delete NAME` manage them,
            `plan run NAME` fails over every policy group by group, and
            `plan test NAME --out DIR` does the same with test failovers
            (replication goes on; `plan test NAME --stop` removes them)."""),
        epilog=epilog("""\
            cdpctl plan create dr --group db --delay 30 --group app,web
            cdpctl plan show dr
            cdpctl plan test dr --out /srv/restore/drill
            cdpctl plan test dr --stop
            cdpctl plan run dr --json""", ctx.coordinator_help))
    plan_sub = p.add_subparsers(dest="plan_command", metavar="PLAN_COMMAND", required=True)

    q = plan_sub.add_parser(
        "create", formatter_class=fmt, help="save a failover plan",
        description=_ABOUT + textwrap.dedent("""

            Each --group POLICY[,POLICY...] adds a group, in the order given;
            a --delay SECONDS right after a --group is the wait after that
            group (0..86400, default 0; a delay after the last group is kept
            but not waited). The coordinator refuses a plan naming a policy it
            does not know (naming it), a policy in two groups, an empty group,
            a bad name or delay; nothing is saved then. An existing plan of the
            same name is refused unless --replace."""),
        epilog=epilog("""\
            cdpctl plan create dr --group db --delay 30 --group app,web
            cdpctl plan create dr --group db --delay 60 --group app,web --replace
            cdpctl plan create nightly-drill --group group-app --json""",
                      ctx.coordinator_help))
    q.add_argument("name", metavar="NAME", help="plan name (1-64 letters, digits, _ . -)")
    q.add_argument("--group", dest="steps", action=_Ordered, metavar="POLICY[,POLICY...]",
                   help="the next group: policies failed over together (repeatable)")
    q.add_argument("--delay", dest="steps", action=_Ordered, metavar="SECONDS",
                   help="seconds to wait after the group just before it")
    q.add_argument("--replace", action="store_true", help="overwrite a plan of this name")
    ctx.add_coordinator_args(q)
    q.set_defaults(func=cmd_create)

    for name, about, fn, example in (
            ("show", "show a failover plan's groups and delays", cmd_show,
             "cdpctl plan show dr\ncdpctl plan show dr --json"),
            ("delete", "delete a failover plan (its policies are untouched)", cmd_delete,
             "cdpctl plan delete dr")):
        q = plan_sub.add_parser(name, formatter_class=fmt, help=about,
                                description=about[0].upper() + about[1:] + ".",
                                epilog=epilog(example, ctx.coordinator_help))
        q.add_argument("name", metavar="NAME", help="plan name")
        ctx.add_coordinator_args(q)
        q.set_defaults(func=fn)

    q = plan_sub.add_parser(
        "list", formatter_class=fmt, help="list the failover plans",
        description="List every failover plan: its groups, their policies and the delays.",
        epilog=epilog("cdpctl plan list\ncdpctl plan list --json", ctx.coordinator_help))
    ctx.add_coordinator_args(q)
    q.set_defaults(func=cmd_list)

    def point_args(q: argparse.ArgumentParser) -> None:
        g = q.add_mutually_exclusive_group()
        g.add_argument("--point", choices=("latest",), default="latest",
                       help="each policy's newest point (the default), after its target "
                            "applied every delta it acked")
        g.add_argument("--time", metavar="ISO8601",
                       help="each policy's newest point at or before this time (UTC when "
                            "no zone is given)")
        q.add_argument("--allow-inconsistent", action="store_true",
                       help="accept a point inside a gap (refused by default)")
        q.add_argument("--target", metavar="HOST:PORT",
                       help="the target's gRPC address (default: each policy's, found "
                            "through the coordinator)")

    q = plan_sub.add_parser(
        "run", formatter_class=fmt, help="fail over a plan's policies group by group",
        description=textwrap.dedent("""\
            Fail over every policy of plan NAME, as `cdpctl failover POLICY`
            does, group by group: the policies of a group at once, then the
            group's delay, then the next group. --time applies to every policy
            (each at its newest point at or before it); the default is each
            policy's newest point. --planned makes each a planned failover
            (`cdpctl failover POLICY --planned`: freeze, drain, RPO 0; the
            sources stay frozen until `cdpctl failover undo POLICY`).

            The output is one row per step: group, policy, action, start and
            end time (UTC), seconds, the point used and the result; --json has
            the same as {"plan", "action", "point", "ok", "start", "end",
            "seconds", "groups": [{group, policies, delay_s, state, waited_s}],
            "steps": [{group, policy, action, state, ok, error, start, end,
            seconds, point, images, note}]}. Undo each failover with `cdpctl
            failover undo POLICY`, or make it permanent with `failover
            commit`.""") + "\n\n" + _RUN_NOTES,
        epilog=epilog("""\
            cdpctl plan run dr
            cdpctl plan run dr --time 2024-05-01T12:30:00Z --json
            cdpctl plan run dr --planned""", ctx.coordinator_help))
    q.add_argument("name", metavar="NAME", help="plan name")
    point_args(q)
    q.add_argument("--planned", action="store_true",
                   help="planned failovers: freeze, drain, the point holding every write")
    q.add_argument("--drain-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="--planned: how long each policy's drain may take (default 120)")
    ctx.add_coordinator_args(q)
    q.set_defaults(func=cmd_run)

    q = plan_sub.add_parser(
        "test", formatter_class=fmt, help="test failovers of a plan's policies, or stop them",
        description=textwrap.dedent("""\
            Start a test failover (`cdpctl failover test start`) of every
            policy of plan NAME, group by group with the plan's delays, each
            policy's writable images under DIR/<policy>/ (DIR in the target's
            restore_dir). Replication and restore points go on untouched. The
            tests are named plan-NAME at each policy's target (`cdpctl failover
            test list POLICY` shows them). --time as for `plan run`.

            `plan test NAME --stop` stops every one of them (the groups in
            reverse order, no delays; a policy without the test is fine),
            deleting their images, and goes on past a failure, reporting each
            policy. Output as for `plan run`.""") + "\n\n" + _RUN_NOTES,
        epilog=epilog("""\
            cdpctl plan test dr --out /srv/restore/drill
            cdpctl plan test dr --out /srv/restore/drill --time 2024-05-01T12:30:00Z --json
            cdpctl plan test dr --stop""", ctx.coordinator_help))
    q.add_argument("name", metavar="NAME", help="plan name")
    q.add_argument("--out", metavar="DIR",
                   help="directory on the target host for the tests' images "
                        "(DIR/<policy>/), under its restore_dir")
    q.add_argument("--stop", action="store_true", help="stop the plan's test failovers")
    point_args(q)
    ctx.add_coordinator_args(q)
    q.set_defaults(func=cmd_test)

