"""`cdpctl restore-points`, `cdpctl restore` and `cdpctl failover`.

Theory of operation: these commands talk to the policy's *target* (the
`RestorePoints` service of cdp-target), found through the coordinator's
GetStatus (the policy's target node, else the one node with role target) or
given with --target HOST:PORT; TLS credentials are the coordinator's. The
target writes the images on its own host, so operators run restore and
failover where the target's files are reachable (in the lab: this host).
Loop devices (--loop) are attached by cdpctl itself with losetup.

Pure helpers (`point_dict`, `render_points`) are tested without a target;
finding the target, its client, loop devices and the shared request shapes
are in `cdpctl.targetcall` (also used by test failover and verify).
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdp_common.errors import CdpError
from cdp_common.timefmt import iso_utc as iso
from cdpctl import failtest, lazy, status, table
from cdpctl.cmdline import Context, Subparsers
from cdpctl.state import UsageError
from cdpctl.targetcall import (
    RESTORE_TIMEOUT_S,
    TargetClient,
    chosen_point_dict,
    client_for,
    detach_loops,
    group_failover_members,
    images_of,
    inconsistent_warning,
    member_of_image,
    members_of,
    restore_request,
)
from cdpctl.units import format_bytes

if TYPE_CHECKING:
    from cdp_common.pb.cdp.v1 import restore_pb2 as pb
    from cdpctl.resolve import Coordinator
else:   # loaded when a command runs, not for --help (cdpctl.lazy)
    pb = lazy.module("cdp_common.pb.cdp.v1.restore_pb2")

# ---------------------------------------------------------------- pure helpers

def gap_of(last_seq: int, gaps: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The gap a point ending at `last_seq` lies in (docs/FORMAT.md §1b:
    begin_seq <= last_seq < end_seq, end_seq 0 = open), or None: consistent."""
    for g in gaps:
        if g["begin_seq"] <= last_seq and (not g["end_seq"] or last_seq < g["end_seq"]):
            return g
    return None


def point_dict(p: pb.PointInfo, gaps: list[dict[str, Any]],
               member_gaps: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    """A listed point; `consistent` from the policy's gaps as the target gave them. A
    group point (with `members`) is consistent when every member's point is, by
    that member's gaps (`member_gaps`: policy -> gaps)."""
    if p.members:
        found = [(m.policy, gap_of(m.last_seq, (member_gaps or {}).get(m.policy, [])))
                 for m in p.members]
        bad = [f"{n}: {g['reason']}" for n, g in found if g is not None]
        g: dict[str, Any] | None = {"reason": "; ".join(bad)} if bad else None
    else:
        g = gap_of(p.last_seq, gaps)
    return {"id": p.id, "kind": p.kind, "time": iso(p.time_ns), "last_seq": p.last_seq,
            "size_bytes": p.size_bytes, "consistent": g is None,
            "gap": None if g is None else g["reason"],
            # nonzero: the point ends at this consistency-group checkpoint; a group's
            # points are its checkpoints (id = checkpoint id), with each member's point
            "checkpoint_id": p.checkpoint_id, "members": members_of(p),
            # the newest `cdpctl verify` of the point: None (never), "ok" or "failed"
            "verified": p.verified or None,
            "verify_rto_s": round(p.verify_rto_s, 3) if p.verified else None,
            "verified_time": iso(p.verified_ns) if p.verified_ns else None}


def render_points(points: list[dict[str, Any]]) -> str:
    """The points table; a CHECKPOINT column when some point ends at a checkpoint, and a
    MEMBERS column (member:point) for a consistency group's points."""
    if not points:
        return "no restore points"
    group = any(p.get("members") for p in points)
    checkpoints = not group and any(p.get("checkpoint_id") for p in points)
    head = ["ID", "KIND", "TIME (UTC)", "LAST SEQ", "SIZE", "CONSISTENT", "VERIFIED"]
    if checkpoints:
        head.insert(4, "CHECKPOINT")
    if group:
        head[3:4] = ["MEMBERS"]
    rows = []
    for p in points:
        row: list[Any] = [p["id"], p["kind"], p["time"], p["last_seq"],
                          format_bytes(p["size_bytes"]),
                          "yes" if p.get("consistent", True)
                          else f"NO (in a gap: {p.get('gap') or 'overflow'})",
                          _verified(p)]
        if checkpoints:
            row.insert(4, p.get("checkpoint_id") or "-")
        if group:
            row[3:4] = [" ".join(f"{m['policy']}:{m['point_id']}"
                                 for m in p.get("members", []))]
        rows.append(tuple(row))
    return table.render(tuple(head), rows,
                        right=("ID", "LAST SEQ", "SIZE", "CHECKPOINT"))


def _verified(p: dict[str, Any]) -> str:
    if not p.get("verified"):
        return "-"
    rto = p.get("verify_rto_s")
    return f"{p['verified']} (usable in {rto:.1f}s)" if p["verified"] == "ok" and rto \
        is not None else str(p["verified"]).upper()


def render_gaps(gaps: list[dict[str, Any]]) -> list[str]:
    return [f"gap ({g['reason']}): points with last seq {g['begin_seq']}"
            + (f"..{g['end_seq'] - 1}" if g["end_seq"] else " and later (still open)")
            + f", from {g['begin_time'] or '?'}"
            + (f" to {g['end_time']}" if g["end_time"] else "")
            + ", are not consistent" for g in gaps if status.gap_holds_points(g)]


# ---------------------------------------------------------------- commands

def cmd_points(args: argparse.Namespace, ctx: Context) -> int:
    coord = ctx.coordinator(args)
    words = args.words
    if len(words) == 2 and words[0] == "create":
        args.policy = words[1]
        client = client_for(args, coord)
        try:
            p = client.call("create", client.stub.Create,
                            pb.CreatePointRequest(policy=args.policy), timeout=args.timeout * 12)
            gaps = client.gaps(args.policy, args.timeout)
        finally:
            client.close()
        d = {**point_dict(p, gaps), "on_demand": True}
        if args.json:
            print(json.dumps(d, indent=2))
        else:
            print(f"long-term restore point {d['id']} at {d['time']} (last seq {d['last_seq']})")
            if not d["consistent"]:
                print(inconsistent_warning(d))
        return 0
    if len(words) != 1:
        raise UsageError("expected `restore-points POLICY` or `restore-points create POLICY`")
    args.policy = words[0]
    client = client_for(args, coord)
    member_gaps: dict[str, list[dict[str, Any]]] = {}
    member_states: dict[str, str] = {}
    try:
        reply = client.call("list", client.stub.List, pb.ListPointsRequest(policy=args.policy),
                            timeout=args.timeout)
        if any(p.members for p in reply.points):   # a consistency group
            member_gaps = client.all_gaps(args.timeout)
            gaps = []
        else:
            gaps = client.gaps(args.policy, args.timeout)
        if reply.failover_state and not gaps:   # a group's: say which member is where
            names = client.group_members(args.policy, args.timeout)
            member_states = client.failover_states(names, args.timeout)
    finally:
        client.close()
    points = [point_dict(p, gaps, member_gaps) for p in reply.points]
    if args.json:
        print(json.dumps(points, indent=2))
    else:
        print(render_points(points))
        for line in render_gaps(gaps):
            print(line)
        for name, mg in sorted(member_gaps.items()):
            if any(m["policy"] == name for p in points for m in p["members"]):
                for line in render_gaps(mg):
                    print(f"{name}: {line}")
        extra = f"{len(points)} points, {format_bytes(reply.total_bytes)} of undo data"
        if reply.failover_state and member_states:
            extra += (f"; group failover: {reply.failover_state} ("
                      + ", ".join(f"{n}: {st or 'none'}" for n, st in member_states.items())
                      + ")")
        elif reply.failover_state:
            extra += f"; policy failover: {reply.failover_state}"
        print(extra)
        if reply.failover_state == "partial":
            print(f"the group is only partly failed over: `cdpctl failover {args.policy} "
                  f"--point ID` finishes it, `cdpctl failover undo {args.policy}` undoes it")
    return 0


def cmd_restore(args: argparse.Namespace, ctx: Context) -> int:
    coord = ctx.coordinator(args)
    out = Path(args.out).absolute()
    req = restore_request(args, str(out))
    client = client_for(args, coord)
    try:
        done = client.stream("restore", client.stub.Restore(req, timeout=RESTORE_TIMEOUT_S),
                             args.json)
    finally:
        client.close()
    images = images_of(done, args.loop, read_only=True)
    doc = {"policy": args.policy, "point": chosen_point_dict(done), "images": images,
           "method": done.method, "seconds": round(done.seconds, 3)}
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        p = doc["point"]
        if p["members"]:
            print(f"restored checkpoint {p['id']} ({p['time']}) of consistency group "
                  f"{args.policy} in {done.seconds:.2f}s ({done.method} copy), members: "
                  + ", ".join(f"{m['policy']} point {m['point_id']}" for m in p["members"])
                  + ":")
        else:
            print(f"restored point {p['id']} ({p['time']}, last seq {p['last_seq']}) of "
                  f"policy {args.policy} in {done.seconds:.2f}s ({done.method} copy):")
        if not p["consistent"]:
            print(inconsistent_warning(p))
        for img in images:
            print(f"  {img['disk']}: {img['path']}" + (f" -> {img['loop']} (read-only)"
                                                       if "loop" in img else ""))
        if args.loop:
            print("detach with: losetup -d " + " ".join(i["loop"] for i in images))
    return 0


def cmd_failover(args: argparse.Namespace, ctx: Context) -> int:
    coord = ctx.coordinator(args)
    words = args.words
    if words[0] == "test":
        return failtest.run(args, coord, words[1:])
    if args.out or args.name or args.all:
        raise UsageError("--out, --name and --all go with `failover test`")
    if len(words) == 2 and words[0] in ("undo", "commit"):
        action, args.policy = words
    elif len(words) == 1:
        action, args.policy = "start", words[0]
    else:
        raise UsageError("expected `failover POLICY`, `failover undo POLICY` or "
                         "`failover commit POLICY`")
    if action != "start" and (args.point or args.time or args.loop
                              or args.allow_inconsistent):
        raise UsageError(f"failover {action}: --point, --time, --loop and "
                         f"--allow-inconsistent go with `failover POLICY`")
    if args.planned and (action != "start" or args.point or args.time
                         or args.allow_inconsistent):
        raise UsageError("--planned goes with `failover POLICY` alone: it fails over at the "
                         "point that holds every write (no --point, --time or "
                         "--allow-inconsistent)")
    client = client_for(args, coord)
    try:
        planned_doc: dict[str, Any] = {}
        if action == "start" and args.planned:
            request, planned_doc = _planned_request(args, coord, client)
        elif action == "start":
            request = restore_request(args)
        if action == "start":
            done = client.stream("failover", client.stub.Failover(
                request, timeout=RESTORE_TIMEOUT_S), args.json)
            images = images_of(done, args.loop, read_only=False)
            doc: dict[str, Any] = {"policy": args.policy, "state": "active",
                                   "point": chosen_point_dict(done), "images": images,
                                   "seconds": round(done.seconds, 3)}
            if planned_doc:
                doc["planned"] = planned_doc
            acted = [m.policy for m in done.point.members]
        else:
            fn = client.stub.FailoverUndo if action == "undo" else client.stub.FailoverCommit
            reply = client.call(f"failover {action}", fn,
                                pb.FailoverRequest(policy=args.policy), timeout=300)
            # undo: a loop device would keep the deleted image alive, detach it; commit:
            # its loop devices now write to the replica, which is production now
            detached = [d for img in reply.images for d in detach_loops(img.path)] \
                if action == "undo" else []
            doc = {"policy": args.policy, "state": reply.state or "none",
                   "point": {"id": reply.point.id, "last_seq": reply.point.last_seq,
                             "time": iso(reply.point.time_ns)},
                   "images": [{"disk": i.disk, "path": i.path} for i in reply.images],
                   "detached": detached}
            acted = [m.policy for m in reply.point.members]
            if action == "undo":
                from cdpctl import planned
                if planned.is_frozen(coord, args.policy, args.timeout):
                    planned.set_frozen(coord, args.policy, False, args.timeout)
                    doc["unfrozen"] = True   # production takes writes again
            if acted:
                doc["point"].update(checkpoint_id=reply.point.checkpoint_id,
                                    members=members_of(reply.point))
        if acted:   # a consistency group: every member, its state and its images
            doc["members"] = _group_members(client, args, action, acted, doc["images"])
    finally:
        client.close()
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    if "members" in doc:
        _print_group_failover(args.policy, action, doc)
        return 0
    if action == "start" and planned_doc:
        p = doc["point"]
        print(f"policy {args.policy}: planned failover to point {p['id']} ({p['time']}, last "
              f"seq {p['last_seq']}), which holds every write the source accepted (RPO 0); "
              "the source refuses writes (frozen) until `cdpctl failover undo "
              f"{args.policy}`.")
        print("writable disks:")
        for img in doc["images"]:
            print(f"  {img['disk']}: {img['path']}" + (f" -> {img['loop']}" if "loop" in img
                                                       else ""))
    elif action == "start":
        p = doc["point"]
        print(f"policy {args.policy} is failed over to point {p['id']} ({p['time']}, last seq "
              f"{p['last_seq']}); replication is stopped, the source keeps journaling.")
        if not p["consistent"]:
            print(inconsistent_warning(p))
        print("writable disks:")
        for img in doc["images"]:
            print(f"  {img['disk']}: {img['path']}" + (f" -> {img['loop']}" if "loop" in img
                                                       else ""))
        print(f"discard: cdpctl failover undo {args.policy}   make permanent: "
              f"cdpctl failover commit {args.policy}")
    elif action == "undo":
        print(f"failover of policy {args.policy} undone: images deleted, replication resumes"
              + ("; the source takes writes again (unfrozen)" if doc.get("unfrozen") else ""))
    else:
        print(f"failover of policy {args.policy} committed: the replicas now hold the failover "
              f"disks; replication stays stopped (production moved to DR)")
    return 0


def _planned_request(args: argparse.Namespace, coord: Coordinator, client: TargetClient,
                     ) -> tuple[pb.RestoreRequest, dict[str, Any]]:
    """Freeze, drain and find the final point (cdpctl.planned); unfreeze on failure."""
    from cdpctl import planned

    def points() -> list[pb.PointInfo]:
        reply = client.call("restore-points", client.stub.List,
                            pb.ListPointsRequest(policy=args.policy), timeout=args.timeout)
        return list(reply.points)

    planned.set_frozen(coord, args.policy, True, args.timeout)
    try:
        point, captured = planned.drain(coord, args.policy, points, args.drain_timeout,
                                        args.json)
    except BaseException:
        planned.set_frozen(coord, args.policy, False, args.timeout)
        raise
    return (pb.RestoreRequest(policy=args.policy, point_id=point.id),
            {"captured_seq": captured, "rpo_s": 0.0})


def _group_members(client: TargetClient, args: argparse.Namespace, action: str,
                   acted: list[str], images: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every member of the group with its failover state as the target now says, and
    its images; each image also names its member. The action is done already: when
    the states cannot be read, the acted-on members' are the action's outcome."""
    outcome = {"start": "active", "undo": "", "commit": "committed"}[action]
    try:
        names = client.group_members(args.policy, args.timeout) or acted
        states = client.failover_states(names, args.timeout)
    except CdpError:
        names, states = acted, {n: outcome for n in acted}
    for img in images:
        img["member"] = member_of_image(img["path"], names) or None
    return group_failover_members(images, names, states)


def _print_group_failover(group: str, action: str, doc: dict[str, Any]) -> None:
    p = doc["point"]
    members = ", ".join(f"{m['policy']} point {m['point_id']}" for m in p["members"])
    if action == "start":
        print(f"consistency group {group} is failed over to checkpoint {p['id']} "
              f"({p['time']}; {members}); replication of its members is stopped, the "
              f"sources keep journaling.")
        if not p["consistent"]:
            print(inconsistent_warning(p))
        print("writable disks:")
        for img in doc["images"]:
            print(f"  {img['disk']} ({img.get('member') or '?'}): {img['path']}"
                  + (f" -> {img['loop']}" if "loop" in img else ""))
        print(f"discard: cdpctl failover undo {group}   make permanent: "
              f"cdpctl failover commit {group}")
    elif action == "undo":
        print(f"failover of consistency group {group} undone ({members}): images deleted, "
              f"replication resumes")
    else:
        print(f"failover of consistency group {group} committed ({members}): the replicas "
              f"now hold the failover disks; replication stays stopped (production moved "
              f"to DR)")
    states = ", ".join(f"{m['policy']}: {m['state']}" for m in doc["members"])
    print(f"group failover: {doc['state']} ({states})")


# ---------------------------------------------------------------- parser

_TARGET_HELP = ("the target is found through the coordinator (the policy's target node);\n"
                "--target HOST:PORT names it directly. Images are written BY THE TARGET, on\n"
                "its host: run restore and failover where the target's files are reachable\n"
                "(in the lab: this host).")


def _point_args(p: argparse.ArgumentParser, *, latest: bool) -> None:
    """--point | --time (| --latest): which restore point, one at most."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--point", type=int, metavar="ID", help="restore point id")
    g.add_argument("--time", metavar="ISO8601", help="newest point at or before this time")
    if latest:
        g.add_argument("--latest", action="store_true",
                       help="the newest point (default), after the target applies every "
                            "delta it has acked")
    p.add_argument("--allow-inconsistent", action="store_true",
                   help="accept a point inside a gap (refused by default: its blocks mix "
                        "old and new data); the result says consistent: false")


def register(sub: Subparsers, ctx: Context) -> None:
    """`cdpctl restore-points`, `restore` and `failover` (see cdpctl.cmdline.CommandGroup)."""
    fmt, epilog = ctx.formatter, ctx.epilog
    notes = ctx.coordinator_help + "\n\n" + _TARGET_HELP

    def common(p: argparse.ArgumentParser) -> None:
        ctx.add_coordinator_args(p)
        p.add_argument("--target", metavar="HOST:PORT", help="the target's gRPC address")

    p = sub.add_parser(
        "restore-points", formatter_class=fmt, help="list restore points, or create one",
        description=textwrap.dedent("""\
            List the restore points of POLICY, oldest first: id, kind (short: one per
            RPO interval, kept for the policy's short-term retention; long: every
            long_term_interval_s or on demand, kept for the long-term retention), the
            capture time of its newest write (UTC), its last seq and the undo bytes it
            holds, and whether it is consistent: a point inside a *gap* (the filter's
            journal overflowed, or a sync was running: see `cdpctl sync`) holds a mix
            of old and new blocks; the gaps are listed below the table. --json prints
            a list of {id, kind, time, last_seq, size_bytes, consistent, gap,
            checkpoint_id, members, ...}.

            For a consistency group (a policy with disks on several filters, run as
            members <group>..<filter>) POLICY may be the group's name: its points are
            the checkpoints every member has, id = the checkpoint id, with each
            member's point (MEMBERS); `cdpctl restore GROUP --point ID` restores all
            members' disks at that checkpoint into one directory. A member's own
            points show their CHECKPOINT.

            `restore-points create POLICY` makes the newest point (after every durable
            delta is applied) a long-term point, kept like scheduled ones."""),
        epilog=epilog("""\
            cdpctl restore-points lab
            cdpctl restore-points lab --json | jq '.[-1].id'
            cdpctl restore-points create lab""", notes))
    p.add_argument("words", nargs="+", metavar="[create] POLICY", help="policy name")
    common(p)
    p.set_defaults(func=cmd_points)

    p = sub.add_parser(
        "restore", formatter_class=fmt, help="write the disks of a restore point",
        description=textwrap.dedent("""\
            Write each disk of POLICY as it was at a restore point to DIR/<disk>.img
            (sparse; a reflink when the file system has it). --point picks a point by
            id, --time the newest point at or before an ISO 8601 time (UTC when no
            zone is given), --latest (the default) the newest. --loop also attaches
            each image as a read-only loop device and prints it; detach with
            `losetup -d DEVICE`. Progress goes to stderr for long copies. DIR must be
            under the target's [target] restore_dir (the lab's: <lab>/restores) and
            must not hold the images already; images are created 0600, never through
            a symlink. Replication goes on meanwhile; applying new deltas to the
            replica pauses during the copy.

            A point inside a gap (see `cdpctl restore-points`) is refused, naming the
            gap, unless --allow-inconsistent; the result's `consistent` is what the
            target found when it chose the point. --latest first applies every delta
            the target has acked, so no acked write is left out."""),
        epilog=epilog("""\
            cdpctl restore lab --latest --out /srv/restore/lab-1
            cdpctl restore lab --point 1234 --out /srv/restore/lab-2 --loop
            cdpctl restore lab --time 2024-05-01T12:30:00Z --out /srv/restore/r --json""",
                      notes))
    p.add_argument("policy", metavar="POLICY")
    _point_args(p, latest=True)
    p.add_argument("--out", required=True, metavar="DIR",
                   help="directory on the target host for the images, under its "
                        "restore_dir")
    p.add_argument("--loop", action="store_true", help="attach read-only loop devices")
    common(p)
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser(
        "failover", formatter_class=fmt, help="fail over to a restore point, undo or commit",
        description=textwrap.dedent("""\
            `failover POLICY [--point ID | --time ISO8601] [--loop]` stops replication
            of POLICY (the target refuses its deltas; the source keeps journaling) and
            presents writable disks at the point (default: the newest) under
            <target data_dir>/<policy>/failover/, plus loop devices with --loop.
            Writes to them are kept aside from the replicas:
              `failover undo POLICY` detaches their loop devices, deletes them and
                 resumes replication from the durable seq;
              `failover commit POLICY` makes them the replicas' content for good; the
                 policy stays stopped (production moved to DR) and its older restore
                 points are dropped. `cdpctl status` shows the policy's failover.
            As with `cdpctl restore`, a point inside a gap is refused unless
            --allow-inconsistent, and the newest point includes every acked delta.

            POLICY may be a consistency group (disks on several filters, members
            <group>..<filter>): --point is then a group point (a checkpoint id from
            `cdpctl restore-points GROUP`), and every member fails over at its point
            of that checkpoint, so all the group's disks come up at one instant;
            undo and commit act on every member. A member failed over on its own
            elsewhere refuses the group's failover. A failover cut short (the target
            killed between two members) leaves the group "partial" (restore-points
            says which members): the same failover again finishes it, `failover
            undo GROUP` undoes it. --json adds "members": each member's state and
            images.

            A test failover leaves replication alone: `failover test start POLICY
            --out DIR [--point ID | --time ISO8601] [--name NAME] [--loop]` writes
            writable images of the point under DIR (in the target's restore_dir),
            with writable loop devices with --loop; writes to them never reach the
            replicas or the restore points, and several tests may run at once.
            `failover test list POLICY` shows them; `failover test stop POLICY NAME`
            (or --all) detaches their loop devices and deletes every trace.

            `failover POLICY --planned` loses no write (RPO 0), for a move planned
            ahead: it freezes the policy (its filters refuse every new write with
            EROFS, and say so in their log), waits until the target applied all that
            was captured (--drain-timeout), then fails over at the point that holds
            it (for a group: a checkpoint taken after the freeze). The source stays
            frozen, since production moved to DR; `failover undo POLICY` unfreezes
            it. If the drain does not finish, nothing is failed over and the policy
            is unfrozen again."""),
        epilog=epilog("""\
            cdpctl failover lab --loop
            cdpctl failover lab --time 2024-05-01T12:30:00Z --json
            cdpctl failover undo lab
            cdpctl failover commit lab
            cdpctl failover lab --planned --json
            cdpctl failover test start lab --point 1234 --out /srv/restore/drill --loop
            cdpctl failover test list lab
            cdpctl failover test stop lab --all""", notes))
    p.add_argument("words", nargs="+", metavar="[undo|commit|test start|list|stop] POLICY",
                   help="policy name, after `undo`, `commit` or `test start|list|stop` for "
                        "those actions (`test stop POLICY NAME`)")
    _point_args(p, latest=False)
    p.add_argument("--loop", action="store_true", help="attach writable loop devices")
    p.add_argument("--out", metavar="DIR",
                   help="test start: directory on the target host for the test's images, "
                        "under its restore_dir")
    p.add_argument("--name", metavar="NAME",
                   help="test start: the test's name (default test-<UTC time>)")
    p.add_argument("--all", action="store_true", help="test stop: every test of the policy")
    p.add_argument("--planned", action="store_true",
                   help="freeze the source, drain, fail over at the point holding every "
                        "write (RPO 0)")
    p.add_argument("--drain-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="--planned: how long the drain may take (default 120)")
    common(p)
    p.set_defaults(func=cmd_failover)
