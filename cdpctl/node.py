"""`cdpctl node drain NODE [--yes] [--undo] [--to TARGET]`: move every policy off a node.

Theory of operation: nothing moves silently. Without --yes the command only
says what would move where and what it costs; with --yes it does it, and only
when every policy has somewhere to go (else it refuses, changing nothing).

- A proxy: the coordinator drains it (`DrainNode`): placement neither keeps
  nor chooses it, so each policy it serves is handed over to another proxy of
  its site (a new epoch; the stream resumes where the target is durable).
  `--undo` lets it take policies again. The drain lives in the coordinator's
  memory: a coordinator restart forgets it (drain again).
- A target: its policies move by naming another target (`UpdatePolicy`),
  which holds no replica of them, so each needs a full seed: once the filter
  reports that the new target lacks what its journal no longer holds, a
  digest sync (`RequestSync`) sends every region with data. The restore points
  of the old target stay there (restorable with `--target`), new ones start
  on the new target. `plan_target` is the pure part.
- A filter holds its disks: nothing can move; refused.
"""

from __future__ import annotations

import argparse
import json
import textwrap
import time
from typing import TYPE_CHECKING, Any

from cdp_common.errors import CdpError
from cdpctl import lazy, status
from cdpctl.cmdline import Context, Subparsers
from cdpctl.state import UsageError
from cdpctl.units import format_bytes

if TYPE_CHECKING:
    from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
    from cdpctl import coordcall
else:   # loaded when a command runs, not for --help (cdpctl.lazy)
    cpb = lazy.module("cdp_common.pb.cdp.v1.coordinator_pb2")
    coordcall = lazy.module("cdpctl.coordcall")

EXIT_REFUSED = 2
SEED_WAIT_S = 60.0
POLL_S = 0.5
PROXY_ROLES = ("source-proxy", "target-proxy", "proxy")


def plan_target(doc: dict[str, Any], policies: list[dict[str, Any]], node_id: str,
                to: str = "") -> list[dict[str, Any]]:
    """Where each policy of target `node_id` would go (pure): the `to` target, else
    the up target of the policy's target site with the fewest policies (by id)."""
    nodes = {n["id"]: n for n in doc["nodes"]}
    count: dict[str, int] = {}
    for p in policies:
        count[p["target"]] = count.get(p["target"], 0) + 1
    moves = []
    for p in sorted(policies, key=lambda p: p["name"]):
        if p["target"] != node_id:
            continue
        site = p.get("target_site", "default")
        seed = sum(int(d["size_bytes"]) for d in p.get("disks", []))
        move = {"policy": p["name"], "slot": "target", "from": node_id, "to": "",
                "seed_bytes": seed, "reason": ""}
        if to:
            n = nodes.get(to)
            if n is None or n["role"] != "target":
                move["reason"] = f"{to} is not a registered target"
            elif n["state"] != "up":
                move["reason"] = f"target {to} is {n['state']}"
            elif n["site"] != site:
                move["reason"] = f"target {to} is on site {n['site']}, the policy's is {site}"
            else:
                move["to"] = to
        else:
            fits = [n for n in doc["nodes"] if n["role"] == "target" and n["id"] != node_id
                    and n["state"] == "up" and n["site"] == site]
            if fits:
                best = min(fits, key=lambda n: (count.get(n["id"], 0), n["id"]))
                move["to"] = best["id"]
                count[best["id"]] = count.get(best["id"], 0) + 1
            else:
                move["reason"] = f"no other target is up on site {site}"
        moves.append(move)
    return moves


def describe(move: dict[str, Any]) -> str:
    """One line of the plan; `slot` is "source proxy", "target proxy" or "target"."""
    slot = move["slot"]
    head = f"{move['policy']}: {slot} {move['from']} -> {move['to'] or '(nowhere)'}"
    if not move["to"]:
        return f"{head}: {move['reason'] or 'nowhere to go'}; it would stop replicating"
    if slot == "target":
        return (f"{head}: a full seed of up to {format_bytes(move['seed_bytes'])} ({move['to']} "
                f"holds no replica of it; holes and zero regions are not sent); its restore "
                f"points stay on {move['from']}, new ones start on {move['to']}")
    return f"{head}: a handover (the stream resumes where the target is durable)"


def _drain_proxy(args: argparse.Namespace, coord: Any, dry_run: bool) -> list[dict[str, Any]]:
    reply = coordcall.call(coord, lambda s: s.DrainNode(
        cpb.DrainNodeRequest(node_id=args.node, undrain=args.undo, dry_run=dry_run),
        timeout=args.timeout))
    return [{"policy": m.policy, "slot": f"{m.slot} proxy",
             "from": args.node, "to": m.to_node, "seed_bytes": 0, "reason": m.reason}
            for m in reply.moves]


def _set_target(coord: Any, policy: str, target: str, timeout: float) -> None:
    request = cpb.UpdatePolicyRequest(name=policy, patch_json=json.dumps({"target": target}))
    coordcall.call(coord, lambda s: s.UpdatePolicy(request, timeout=timeout))


def _request_sync(coord: Any, policy: str, timeout: float) -> int:
    reply = coordcall.call(coord, lambda s: s.RequestSync(cpb.PolicyName(name=policy),
                                                          timeout=timeout))
    return int(reply.sync_request_id)


def _seed(args: argparse.Namespace, coord: Any, moves: list[dict[str, Any]],
          say: Any) -> None:
    """Point each policy at its new target, then start its seed once its filter sees
    that the new target lacks what the journal no longer holds."""
    for m in moves:
        _set_target(coord, m["policy"], m["to"], args.timeout)
        say(f"{m['policy']}: target is now {m['to']}")
    waiting = {m["policy"]: m for m in moves}
    deadline = time.monotonic() + SEED_WAIT_S
    while waiting and time.monotonic() < deadline:
        doc = status.fetch_status(coord, args.timeout)
        for p in doc["policies"]:
            m = waiting.get(p["name"], {})
            if not m or p["target"] != m["to"]:
                continue
            if f"cdpctl sync {p['name']}" in p["reason"]:
                m["sync_request_id"] = _request_sync(coord, p["name"], args.timeout)
                say(f"{p['name']}: seeding {m['to']} by digests (sync "
                    f"{m['sync_request_id']}); follow it with `cdpctl sync {p['name']} "
                    f"--watch --attach`")
                del waiting[p["name"]]
            elif p["state"] == "ok" and p["durable_seq"] > 0:
                say(f"{p['name']}: {m['to']} caught up from the journal, no seed needed")
                del waiting[p["name"]]
        if waiting:
            time.sleep(POLL_S)
    for name in waiting:
        say(f"{name}: its filter did not report on {waiting[name]['to']} within "
            f"{SEED_WAIT_S:.0f}s; once it does, run `cdpctl sync {name}` if `cdpctl status` "
            f"asks for it")


def cmd_drain(args: argparse.Namespace, ctx: Context) -> int:
    coord = ctx.coordinator(args)
    doc = status.fetch_status(coord, args.timeout)
    node = next((n for n in doc["nodes"] if n["id"] == args.node), None)
    if node is None:
        raise CdpError(f"no node {args.node!r} is registered")
    role = node["role"]
    if args.to and role != "target":
        raise UsageError("--to: only for a target (a proxy's policies go where placement "
                         "puts them)")
    quiet = args.json

    def say(msg: str) -> None:
        if not quiet:
            print(msg)

    if role in PROXY_ROLES:
        moves = _drain_proxy(args, coord, dry_run=True)
    elif role == "target":
        if args.undo:
            raise UsageError("--undo: a target's policies stay where they were moved; "
                             "move them back with `cdpctl node drain NEW_TARGET --to "
                             f"{args.node}`")
        reply = coordcall.call(coord, lambda s: s.ListPolicies(cpb.ListPoliciesRequest(),
                                                               timeout=args.timeout))
        moves = plan_target(doc, [json.loads(t) for t in reply.policies_json], args.node,
                            args.to)
    else:
        raise CdpError(f"{args.node} is a {role}: its disks cannot be moved elsewhere; "
                       f"delete or disable its policies instead")
    verb = "undraining" if args.undo else "draining"
    stuck = [m for m in moves if not m["to"]]
    result: dict[str, Any] = {"node": args.node, "role": role, "undo": args.undo,
                              "moves": moves, "done": False}
    say(f"{verb} {args.node} ({role}) moves {len(moves)} "
        f"polic{'y' if len(moves) == 1 else 'ies'}" + (":" if moves else "."))
    for m in moves:
        say("  " + describe(m))
    if not args.yes:
        say("nothing changed; run again with --yes to do it")
    elif stuck and not args.undo:
        say(f"refused: {len(stuck)} of them would have nowhere to go; nothing changed "
            "(add a node, or name one with --to for a target)")
        if quiet:
            print(json.dumps(result, indent=2))
        return EXIT_REFUSED
    elif role in PROXY_ROLES:
        result["moves"] = _drain_proxy(args, coord, dry_run=False)
        result["done"] = True
        say(f"{args.node} {'undrained' if args.undo else 'drained'}")
    else:
        _seed(args, coord, moves, say)
        result["done"] = True
    if quiet:
        print(json.dumps(result, indent=2))
    return 0


def register(sub: Subparsers, ctx: Context) -> None:
    """`cdpctl node ...` (see cdpctl.cmdline.CommandGroup)."""
    p = sub.add_parser("node", formatter_class=ctx.formatter, help="node operations (drain)")
    node_sub = p.add_subparsers(dest="node_command", metavar="NODE_COMMAND", required=True)
    q = node_sub.add_parser(
        "drain", formatter_class=ctx.formatter, help="move every policy off a node",
        description=textwrap.dedent("""\
            Say what moving every policy off NODE takes, and with --yes do it.
            Nothing moves without --yes, and --yes refuses (changing nothing)
            when a policy would have nowhere to go.

            A proxy is drained at the coordinator: each policy it serves is
            handed over to another proxy of its site (a new epoch; the stream
            resumes where the target is durable, nothing is resent but what
            the target lacks). A drained proxy takes no policy until
            `--undo`; a coordinator restart forgets the drain.

            A target's policies move to another up target of their target
            site (the least loaded, or --to): the new target holds no replica,
            so each policy is seeded in full by a digest sync (every region
            with data crosses the link; holes and zero regions do not), and
            its restore points start there afresh; the old target keeps its
            points (restore them with --target). The policies are in a gap
            until the seed is done. A filter cannot be drained."""),
        epilog=ctx.epilog("""\
            cdpctl node drain source-proxy-1          # what would move
            cdpctl node drain source-proxy-1 --yes
            cdpctl node drain source-proxy-1 --undo --yes
            cdpctl node drain target-1 --to target-2 --yes""", ctx.coordinator_help))
    q.add_argument("node", metavar="NODE", help="node id (see `cdpctl status`)")
    q.add_argument("--yes", action="store_true", help="do it (default: only say what it takes)")
    q.add_argument("--undo", action="store_true",
                   help="a proxy: take policies again (they move back only by rebalancing)")
    q.add_argument("--to", metavar="TARGET", default="",
                   help="a target: move its policies to this target")
    ctx.add_coordinator_args(q)
    q.set_defaults(func=cmd_drain)
