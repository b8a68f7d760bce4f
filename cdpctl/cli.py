"""The `cdpctl` command line: build the parser from the command groups, dispatch, exit codes.

Theory of operation
-------------------
Each command group (cdpctl.cmdline.CommandGroup) registers its sub-commands
on one parser; `run` parses argv, calls the chosen sub-command's handler
with the same Context and maps what it raises to an exit code, in one place:
CdpError becomes a one-line message and its code, never a traceback (the
table is cdpctl.cmdline.EXIT_CODES, printed in every --help).
"""

from __future__ import annotations

import argparse
import sys
import textwrap

from cdp_common.errors import EXIT_INTERRUPTED, CdpError, CoordinatorUnreachable
from cdpctl import (
    completion,
    health,
    labcmd,
    node,
    pki,
    plan,
    policy,
    restore,
    status,
    sync,
    verify,
)
from cdpctl.cmdline import EXIT_USAGE, CommandGroup, Context, Parser, context
from cdpctl.state import UsageError

# Order of the commands in --help and in the completion scripts.
GROUPS: tuple[CommandGroup, ...] = (health, policy, labcmd, restore, plan, verify, sync, node,
                                     pki, completion)


def build_parser(ctx: Context | None = None) -> argparse.ArgumentParser:
    """The whole cdpctl parser; `ctx` defaults to the real one (cmdline.context)."""
    ctx = ctx or context(build_parser)
    parser = Parser(
        prog="cdpctl", formatter_class=ctx.formatter,
        description=textwrap.dedent("""\
            Operate cdp, continuous data protection for Linux disks: query the
            health and status of a deployment from its coordinator, create
            certificates and keys, and run a complete local lab (every daemon a
            separate process on 127.0.0.1, disks exposed through FUSE)."""),
        epilog=ctx.epilog("""\
            cdpctl lab up --dir ./lab --disk-size 1G
            cdpctl health
            cdpctl status --json
            cdpctl lab down --dir ./lab
            cdpctl pki init --dir /etc/cdp/pki
            cdpctl pki issue --dir /etc/cdp/pki filter-1 --role filter --host 192.0.2.10
            cdpctl keygen /etc/cdp/master.key"""))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in GROUPS:
        group.register(sub, ctx)
    return parser


def run(argv: list[str], ctx: Context | None = None) -> int:
    """Run one cdpctl command line; returns its exit code (the only error-to-code map)."""
    ctx = ctx or context(build_parser)
    parser = build_parser(ctx)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    try:
        code: int = args.func(args, ctx)
        return code
    except UsageError as exc:
        print(f"cdpctl: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CoordinatorUnreachable as exc:
        print(f"cdpctl: {exc}", file=sys.stderr)
        return status.EXIT_UNREACHABLE
    except CdpError as exc:
        # Its own code on the one table (cdp_common.errors.EXIT_CODES): 2 unless it says more.
        print(f"cdpctl: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        print(f"cdpctl: error:{where}: {exc.strerror or exc}", file=sys.stderr)
        return status.EXIT_ERROR
    except KeyboardInterrupt:
        print("cdpctl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
