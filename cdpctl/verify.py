"""`cdpctl verify POLICY`: prove a restore point recoverable, and how fast it is usable.

Theory of operation: the point is restored into a scratch directory on the
target host (the Restore RPC: a sparse copy, replication goes on), each image
is attached as a loop device on this host (so this command runs where the
target's files are, as `restore --loop` does), and the time from the start to
that moment is the point's time to usable (RTO). Then, as asked:

- `--fsck`: the journal is replayed on the scratch copy (`e2fsck -E
  journal_only`, as a mount at failover would) and `e2fsck -fn` must find a
  clean file system;
- `--script FILE`: the copies are mounted read-only under the scratch
  directory and FILE runs with CDP_VERIFY_POLICY, CDP_VERIFY_POINT,
  CDP_VERIFY_MOUNTS (space-separated mount points) and CDP_VERIFY_DEVICES; it
  must exit 0 within --script-timeout.

A point whose restore fails (a damaged undo segment, say) fails too. The
result goes to the target (RecordVerification: `restore-points` shows it, the
target exports it as metrics), the loop devices are detached and the copies
deleted (unless --keep). Exit 0 when the point passed, 2 when it failed.
The checks after the restore (loop devices, e2fsck, the script) are
cdp_common.verifycheck, which the target's scheduled verification
(cdp_target.verifysched) runs too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdp_common.errors import CdpError
from cdp_common.verifycheck import Outcome, attach_loops, detach_loops, run_checks
from cdpctl import lazy, targetcall
from cdpctl.cmdline import Context, Subparsers
from cdpctl.state import UsageError

if TYPE_CHECKING:
    from cdp_common.pb.cdp.v1 import restore_pb2 as pb
else:   # loaded when a command runs, not for --help (cdpctl.lazy)
    pb = lazy.module("cdp_common.pb.cdp.v1.restore_pb2")

EXIT_FAILED = 2


def cmd_verify(args: argparse.Namespace, ctx: Context) -> int:
    if not args.scratch:
        raise UsageError("--scratch DIR is needed: an empty directory under the target's "
                         "restore_dir for the copy (the lab's: <lab>/restores/...)")
    if args.script and not Path(args.script).is_file():
        raise UsageError(f"--script: {args.script} is not a file")
    if args.script_timeout <= 0:
        raise UsageError("--script-timeout: must be greater than 0")
    coord = ctx.coordinator(args)
    scratch = Path(args.scratch).absolute()
    started = time.monotonic()
    client = targetcall.TargetClient(coord, targetcall.target_address(
        coord, args.policy, args.target, args.timeout))
    out = Outcome(checks=["restore"])
    point_id, devices, images = 0, [], []
    rto = 0.0
    try:
        try:
            done = client.stream("verify", client.stub.Restore(
                targetcall.restore_request(args, str(scratch)),
                timeout=targetcall.RESTORE_TIMEOUT_S), True)
        except CdpError as exc:
            # the restore itself failed: the point is not recoverable as stored
            out.fail(f"restore failed: {exc}")
            if not args.point:
                raise   # no point named: nothing to record the failure against
            point_id = args.point
        else:
            point_id = done.point.id
            images = [img.path for img in done.images]
            devices = attach_loops(images)
            rto = time.monotonic() - started
            env = {"CDP_VERIFY_POLICY": args.policy, "CDP_VERIFY_POINT": str(point_id)}
            run_checks(devices, scratch, args.fsck, args.script, args.script_timeout, env,
                       out)
        doc: dict[str, Any] = {"policy": args.policy, "point": point_id, "ok": out.ok,
                               "rto_s": round(rto, 3), "checks": out.checks,
                               "detail": out.detail, "kept": bool(args.keep and images)}
        try:
            client.call("record verification", client.stub.RecordVerification,
                        pb.Verification(policy=args.policy, point_id=point_id, ok=out.ok,
                                        rto_s=rto, checks=",".join(out.checks),
                                        detail="; ".join(out.detail)),
                        timeout=args.timeout)
            doc["recorded"] = True
        except CdpError as exc:
            doc["recorded"] = False
            doc["detail"].append(f"not recorded at the target: {exc}")
    finally:
        detach_loops(devices)
        if images and not args.keep:
            for path in images:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            shutil.rmtree(scratch, ignore_errors=True)
        client.close()
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        verdict = "recoverable" if out.ok else "NOT recoverable"
        print(f"restore point {point_id} of policy {args.policy}: {verdict} "
              f"({', '.join(out.checks)}; usable in {rto:.2f}s)")
        for line in out.detail:
            print(f"  {line}")
        if args.keep and images:
            print(f"  the copies are kept in {scratch}")
    return 0 if out.ok else EXIT_FAILED


def register(sub: Subparsers, ctx: Context) -> None:
    """`cdpctl verify` (see cdpctl.cmdline.CommandGroup)."""
    p = sub.add_parser(
        "verify", formatter_class=ctx.formatter,
        help="prove a restore point recoverable (restore, fsck, your script)",
        description=textwrap.dedent("""\
            Restore a point of POLICY (default: the newest) into --scratch on the
            target host, attach the copies as loop devices on this host (run it
            where the target's files are, as root), and measure the time to
            usable. --fsck replays the file system journal on the copy and runs
            `e2fsck -fn`; --script FILE mounts the copies read-only and runs FILE
            with CDP_VERIFY_POLICY, CDP_VERIFY_POINT, CDP_VERIFY_MOUNTS and
            CDP_VERIFY_DEVICES set. The result is recorded at the target
            (`cdpctl restore-points` shows it per point, the target exports
            cdp_target_verification_ok and _rto_seconds) and the copies are
            deleted unless --keep. A point whose restore fails (damaged undo
            data) is not recoverable. Replication goes on meanwhile.
            Exit 0: recoverable; 2: not."""),
        epilog=ctx.epilog("""\
            cdpctl verify db --fsck --scratch /srv/restore/verify
            cdpctl verify db --point 1234 --fsck --script ./check-db.sh \\
                --scratch /srv/restore/verify --json""", ctx.coordinator_help))
    p.add_argument("policy", metavar="POLICY", help="policy name")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--point", type=int, metavar="ID", help="restore point id")
    g.add_argument("--time", metavar="ISO8601", help="newest point at or before this time")
    g.add_argument("--latest", action="store_true", help="the newest point (default)")
    p.add_argument("--allow-inconsistent", action="store_true",
                   help="verify a point inside a gap too")
    p.add_argument("--scratch", metavar="DIR",
                   help="empty directory under the target's restore_dir for the copies")
    p.add_argument("--fsck", action="store_true", help="check the file system (ext2/3/4)")
    p.add_argument("--script", metavar="FILE", help="run FILE against the mounted copies")
    p.add_argument("--script-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="how long the script may run (default 600)")
    p.add_argument("--keep", action="store_true", help="keep the copies (and leave them "
                   "detached) for a look")
    p.add_argument("--target", metavar="HOST:PORT", help="the target's gRPC address")
    ctx.add_coordinator_args(p)
    p.set_defaults(func=cmd_verify)
