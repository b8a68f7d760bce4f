"""`cdpctl health` and `cdpctl status`: the command shells over cdpctl.status.

Theory of operation: both fetch one `GetStatus` document (cdpctl.status
turns it into plain dicts and judges it); `status` prints it, `health`
prints the verdict and exits with its code. `status --watch` and
`health --watch` redraw in place with `watch` until Ctrl-C (a coordinator that
stops answering is shown and retried, not fatal) and then exit with the code
of the last frame.
"""

from __future__ import annotations

import argparse
import textwrap
import time
from collections.abc import Callable
from datetime import UTC, datetime

from cdp_common.errors import CdpError
from cdpctl import status
from cdpctl.cmdline import Context, Subparsers, print_json
from cdpctl.resolve import Coordinator
from cdpctl.state import UsageError


def watch(render: Callable[[], tuple[str, int]], interval_s: float, clear: bool = True,
          count: int = 0) -> int:
    """Redraw `render()` (text, exit code) every interval until Ctrl-C (or `count`
    times, for tests); returns the last frame's exit code."""
    n, code = 0, 0
    try:
        while True:
            try:
                text, code = render()
            except CdpError as exc:   # shown, and tried again next time
                text, code = f"cdpctl: {exc}", exc.exit_code
            stamp = datetime.now(UTC).strftime("%H:%M:%S")
            print(("\x1b[H\x1b[2J" if clear else "")
                  + f"every {interval_s:g}s, {stamp} UTC (Ctrl-C to stop)\n\n" + text,
                  flush=True)
            n += 1
            if count and n >= count:
                return code
            time.sleep(interval_s)
    except KeyboardInterrupt:
        return code


def _watch_args(args: argparse.Namespace) -> None:
    if args.json:
        raise UsageError("--watch and --json do not go together")
    if args.interval <= 0:
        raise UsageError("--interval: must be greater than 0")


def cmd_status(args: argparse.Namespace, ctx: Context) -> int:
    if args.watch:
        _watch_args(args)
        coord = ctx.coordinator(args)
        return watch(lambda: (status.render_status(status.fetch_status(coord, args.timeout)),
                              0), args.interval)
    doc = status.fetch_status(ctx.coordinator(args), args.timeout)
    if args.json:
        print_json(doc)
    else:
        print(status.render_status(doc))
    return 0


def _health_frame(coord: Coordinator, timeout: float) -> tuple[str, int]:
    doc = status.fetch_status(coord, timeout)
    verdict = status.evaluate(doc)
    return status.render_health(doc, verdict), verdict.exit_code


def cmd_health(args: argparse.Namespace, ctx: Context) -> int:
    if args.watch:
        _watch_args(args)
        coord = ctx.coordinator(args)
        return watch(lambda: _health_frame(coord, args.timeout), args.interval)
    doc = status.fetch_status(ctx.coordinator(args), args.timeout)
    verdict = status.evaluate(doc)
    if args.json:
        print_json(verdict.as_dict())
    else:
        print(status.render_health(doc, verdict))
    return verdict.exit_code


def register(sub: Subparsers, ctx: Context) -> None:
    """`cdpctl health` and `cdpctl status` (see cdpctl.cmdline.CommandGroup)."""
    p = sub.add_parser(
        "health", formatter_class=ctx.formatter, help="is everything up and within its RPO?",
        description=textwrap.dedent("""\
            Ask the coordinator for the state of every node and policy and judge it:
            ok when every node is up and every policy is ok (or disabled);
            warning when a policy is degraded (an open gap, RPO lag over its
            warning threshold, its newest restore point verification failed:
            `cdpctl verify` or its verify_every_s schedule) or enabled but
            unprotected (nothing on its target
            yet), or a node's clock is skewed; error when a node is down, a
            policy is in error (no proxy, a node not reporting it, a failed
            fsync, a frozen policy, lag over its error threshold...) or a filter
            protects a policy the coordinator does not know. A consistency group
            (a policy on several filters) is judged by its members' rows and by
            its own: degraded while a member misses checkpoints, error while a
            member is in error or the group's newest common restore point is
            older than its error threshold. The exit code says
            which, so this fits a monitoring check; every problem has its reason."""),
        epilog=ctx.epilog("""\
            cdpctl health
            cdpctl health --coordinator 192.0.2.1:7000 --ca ca.pem --cert ops.pem --key ops.key
            cdpctl health --json | jq .problems
            cdpctl health --watch --interval 5""", ctx.coordinator_help))
    ctx.add_coordinator_args(p)
    _watch_options(p, "the verdict")
    p.set_defaults(func=cmd_health)

    p = sub.add_parser(
        "status", formatter_class=ctx.formatter,
        help="nodes and policies as the coordinator sees them",
        description=textwrap.dedent("""\
            Show every registered node (role, site, up/down, last heartbeat) and
            every policy (assigned proxies, durable seq, RPO lag, bytes replicated,
            journal backlog). A consistency group (a policy on several filters) is
            shown as its own row, its lag the age of its newest common checkpoint,
            with its member policies <group>..<filter> indented under it.
            --json gives {"nodes": [...], "policies": [...]}; a group's row has
            "members", a member's "group"."""),
        epilog=ctx.epilog("""\
            cdpctl status
            cdpctl status --watch
            cdpctl status --json | jq '.policies[] | {name, rpo_lag_s}'""",
                          ctx.coordinator_help))
    ctx.add_coordinator_args(p)
    _watch_options(p, "the tables")
    p.set_defaults(func=cmd_status)


def _watch_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--watch", action="store_true",
                   help=f"redraw {what} every --interval seconds until Ctrl-C, then exit "
                        "with the last one's code")
    p.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                   help="refresh period of --watch (default 1)")
