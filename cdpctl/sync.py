"""`cdpctl sync POLICY [--watch]`: ask for a digest resync and follow it.

Theory of operation: `RequestSync` makes the coordinator put a new
`sync_request_id` in the policy's assignment; the filter compares region
digests of its image with the target's replica and resends the differing
regions (cdp_filter/sync.py), reporting its progress with its heartbeats.
`--watch` polls `GetStatus` and draws the progress: a bar redrawn in place on
a terminal, one plain line every few seconds when piped. It ends (exit 0)
once the filter reports the request done (`sync_done_id` >= the request id),
or with `--attach` (follow a sync already running, e.g. the initial sync)
once no sync is running (at once if none runs). `watch_step` is the pure part: it judges
one status document.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

from cdp_common.errors import CdpError
from cdpctl import lazy, status
from cdpctl.cmdline import Context, Subparsers
from cdpctl.state import UsageError

if TYPE_CHECKING:
    from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
    from cdpctl import coordcall
else:   # loaded when a command runs, not for --help (cdpctl.lazy)
    cpb = lazy.module("cdp_common.pb.cdp.v1.coordinator_pb2")
    coordcall = lazy.module("cdpctl.coordcall")
from cdpctl.units import format_seconds

EXIT_TIMEOUT = 2
POLL_S = 0.5
PLAIN_EVERY_S = 2.0
BAR_WIDTH = 30


@dataclass(frozen=True)
class Step:
    done: bool
    line: str          # progress text (no bar)
    fraction: float    # 0..1, -1 when unknown


def find_policy(doc: dict[str, Any], name: str) -> dict[str, Any]:
    for p in doc.get("policies", []):
        if p["name"] == name:
            return dict(p)
    raise CdpError(f"no policy named {name!r}")


def watch_step(p: dict[str, Any], request_id: int, seen_running: bool) -> Step:
    """Is the sync `request_id` (0: whatever runs) done, and what to show (pure)."""
    phase = p.get("sync_phase") or ""
    if request_id and int(p.get("sync_done_id", 0)) >= request_id:
        return Step(True, "sync done", 1.0)
    if not request_id and not phase:
        return Step(True, "sync done" if seen_running else "no sync running", 1.0)
    if not phase:
        return Step(False, "waiting for the filter to start the sync", -1.0)
    done, total = int(p.get("sync_done_bytes", 0)), int(p.get("sync_total_bytes", 0))
    return Step(False, status.sync_progress_text(p), done / total if total else -1.0)


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    if fraction < 0:
        return "[" + "?" * width + "]"
    n = round(min(1.0, fraction) * width)
    return "[" + "#" * n + "." * (width - n) + "]"


def watch(fetch: Callable[[], dict[str, Any]], name: str, request_id: int, timeout_s: float,
          out: TextIO = sys.stdout, tty: bool | None = None,
          clock: Callable[[], float] = time.monotonic,
          sleep: Callable[[float], None] = time.sleep) -> int:
    tty = out.isatty() if tty is None else tty
    start = clock()
    last_plain = -1e9
    seen_running = False
    width = 0
    while True:
        p = find_policy(fetch(), name)
        seen_running = seen_running or bool(p.get("sync_phase"))
        step = watch_step(p, request_id, seen_running)
        now = clock()
        if tty:
            text = f"{bar(step.fraction)} {step.line}"
            out.write("\r" + text.ljust(width))
            width = max(width, len(text))
            if step.done:
                out.write("\n")
            out.flush()
        elif step.done or now - last_plain >= PLAIN_EVERY_S:
            out.write(f"{name}: {step.line}\n")
            out.flush()
            last_plain = now
        if step.done:
            return 0
        if now - start > timeout_s:
            if tty:
                out.write("\n")
            print(f"cdpctl: error: sync of {name} not done after "
                  f"{format_seconds(timeout_s)}", file=sys.stderr)
            return EXIT_TIMEOUT
        sleep(POLL_S)


def register(sub: Subparsers, ctx: Context) -> None:
    """`cdpctl sync` (see cdpctl.cmdline.CommandGroup)."""
    p = sub.add_parser(
        "sync", formatter_class=ctx.formatter, help="resync a policy's replica by region digests",
        description=textwrap.dedent("""\
            Ask the policy's filter for a digest resync: it compares the digest
            (xxh3-128) of every 1 MiB region of its disks with the target's
            replica and resends only the regions that differ, while the
            application goes on writing (those writes are journaled and win).
            Holes and all-zero regions are not read twice. Use it when a replica
            may have diverged (restored by hand, damaged, a policy re-created).
            Restore points taken during a sync are marked as inside a gap.
            A policy whose target holds nothing while its disks already hold
            data is synced this way automatically (initial sync); --attach
            follows that one.

            --watch follows the sync until it is done: a progress bar on a
            terminal, one line every 2 s when piped."""),
        epilog=ctx.epilog("""\
            cdpctl sync db
            cdpctl sync db --watch
            cdpctl sync db --watch --attach      # follow a running (e.g. initial) sync
            cdpctl sync db --json | jq .sync_request_id""",
                          ctx.coordinator_help + "\n\nWith --watch, --timeout (default 3600 s "
                          "then) bounds the whole wait; exit 2 when it runs out."))
    p.add_argument("policy", metavar="POLICY", help="policy name")
    p.add_argument("--watch", action="store_true", help="follow the sync until it is done")
    p.add_argument("--attach", action="store_true",
                   help="with --watch: follow the running sync (if any), do not request "
                        "a new one")
    ctx.add_coordinator_args(p)
    # None: no --timeout given, so --watch may wait its default hour (see cmd_sync)
    p.set_defaults(func=cmd_sync, timeout=None)


def cmd_sync(args: argparse.Namespace, ctx: Context) -> int:
    if args.attach and not args.watch:
        raise UsageError("--attach needs --watch")
    if args.attach and args.json:
        raise UsageError("--attach and --json do not go together")
    coord = ctx.coordinator(args)
    rpc_timeout = 5.0 if args.timeout is None else min(args.timeout, 5.0)
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError("--timeout: must be greater than 0")
    request_id = 0
    if not args.attach:
        reply = coordcall.call(coord, lambda stub: stub.RequestSync(
            cpb.PolicyName(name=args.policy), timeout=rpc_timeout))
        request_id = int(reply.sync_request_id)
        if args.json:
            print(json.dumps({"policy": args.policy, "sync_request_id": request_id}))
        elif not args.watch:
            print(f"sync {request_id} of policy {args.policy} requested; follow it with "
                  f"`cdpctl sync {args.policy} --watch --attach` or `cdpctl status`")
    if not args.watch:
        return 0
    total = 3600.0 if args.timeout is None else args.timeout
    return watch(lambda: status.fetch_status(coord, rpc_timeout), args.policy, request_id,
                 total, out=sys.stderr if args.json else sys.stdout)
