"""What every cdpctl command group shares: the parser class, help layout, coordinator options.

Theory of operation
-------------------
cdpctl is one parser with a sub-command per operation. Each command group is
a module (`cdpctl.health`, `cdpctl.policy`, `cdpctl.labcmd`, `cdpctl.restore`,
`cdpctl.sync`, `cdpctl.pki`, `cdpctl.completion`) that satisfies
`CommandGroup`: one `register(sub, ctx)` that adds its sub-commands to the
top-level subparsers. A sub-command names its handler with
`set_defaults(func=...)`; a handler is a `Command`, called by `cdpctl.cli.run`
with the parsed arguments and the same `Context` the parser was built with,
and returns the exit code.

`Context` carries the helpers every group needs to look alike (help
formatter, epilog with the exit-code table, the coordinator options and how
they resolve) and the builder of the whole parser (for `cdpctl completion`,
which describes cdpctl itself). Groups import this module, never `cdpctl.cli`
or each other's private names, so there is no import cycle; a test can build
a Context with another coordinator resolver.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Protocol, TypeAlias

from cdp_common.errors import EXIT_USAGE, exit_codes_help
from cdpctl import resolve

EXIT_CODES = exit_codes_help()

COORDINATOR_HELP = """\
which coordinator (first match wins):
  --coordinator HOST:PORT[,HOST:PORT...] (a leader and its standbys: the
  leader is found), else $CDP_COORDINATOR, else the lab.json of the
  local lab in --lab-dir, else $CDP_LAB_DIR, else ./lab.
TLS credentials: --insecure, else --ca/--cert/--key, else the lab's client
certificate (pki/cdpctl.pem) when a lab.json was found."""


class Parser(argparse.ArgumentParser):
    """argparse that exits with 64 (EX_USAGE) instead of 2 on bad arguments."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


# What `Parser.add_subparsers` returns: its sub-parsers are Parsers too (exit 64).
# argparse's class is generic only to type checkers, hence the string.
Subparsers: TypeAlias = "argparse._SubParsersAction[Parser]"


def epilog(examples: str, extra: str = "") -> str:
    """The epilog of every cdpctl help page: examples, optional notes, the exit codes."""
    text = "examples:\n" + textwrap.indent(textwrap.dedent(examples).strip("\n"), "  ")
    if extra:
        text += "\n\n" + extra
    return text + "\n\n" + EXIT_CODES


def add_coordinator_args(p: argparse.ArgumentParser) -> None:
    """The options of every command that talks to the coordinator, plus --json."""
    g = p.add_argument_group("coordinator connection")
    g.add_argument("--coordinator", metavar="HOST:PORT[,...]",
                   help="coordinator address; with standby coordinators a comma-separated "
                        "list (the call goes to the leader)")
    g.add_argument("--lab-dir", metavar="DIR",
                   help="local lab whose lab.json names the coordinator (default ./lab)")
    g.add_argument("--ca", metavar="FILE", help="CA certificate (PEM)")
    g.add_argument("--cert", metavar="FILE", help="client certificate (PEM)")
    g.add_argument("--key", metavar="FILE", help="client private key (PEM)")
    g.add_argument("--insecure", action="store_true",
                   help="plaintext gRPC (only for a coordinator with tls.insecure = true)")
    g.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                   help="give up on the coordinator after this long (default 5)")
    p.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")


def coordinator_from_args(args: argparse.Namespace) -> resolve.Coordinator:
    """The coordinator named by `add_coordinator_args`'s options, this process's
    environment and working directory (see cdpctl.resolve for the order)."""
    return resolve.resolve(coordinator=args.coordinator, lab_dir_arg=args.lab_dir, ca=args.ca,
                           cert=args.cert, key=args.key, insecure=args.insecure,
                           env=os.environ, cwd=Path.cwd())


def print_json(doc: object) -> None:
    """The --json output of every command: indented, one document."""
    print(json.dumps(doc, indent=2))


class Epilog(Protocol):
    def __call__(self, examples: str, extra: str = "") -> str: ...


@dataclass(frozen=True)
class Context:
    """The shared parser helpers handed to every group's `register` and `Command`."""

    formatter: type[argparse.HelpFormatter]
    """help formatter of every (sub-)parser: keeps the descriptions' line breaks"""
    epilog: Epilog
    """epilog(examples, extra="") -> examples, extra notes (may be ""), the exit codes"""
    add_coordinator_args: Callable[[argparse.ArgumentParser], None]
    """adds --coordinator, --lab-dir, TLS options, --timeout and --json"""
    coordinator: Callable[[argparse.Namespace], resolve.Coordinator]
    """resolves those options to an address and TLS credentials (UsageError if it cannot)"""
    coordinator_help: str
    """epilog text explaining how those options resolve"""
    parser: Callable[[], argparse.ArgumentParser]
    """builds the whole cdpctl parser (for commands that describe cdpctl itself)"""


def context(parser: Callable[[], argparse.ArgumentParser]) -> Context:
    """The Context of the real cdpctl: its help layout, the environment's coordinator."""
    return Context(formatter=argparse.RawDescriptionHelpFormatter, epilog=epilog,
                   add_coordinator_args=add_coordinator_args,
                   coordinator=coordinator_from_args, coordinator_help=COORDINATOR_HELP,
                   parser=parser)


Command = Callable[[argparse.Namespace, Context], int]
"""A sub-command's handler (`set_defaults(func=...)`): returns the exit code; raises
CdpError (UsageError for bad arguments) and leaves the mapping to cdpctl.cli.run."""


class CommandGroup(Protocol):
    """A module of cdpctl sub-commands.

    `register` adds the group's sub-commands to `sub`, each with a man-page
    quality description and an epilog from `ctx.epilog`, and with
    `set_defaults(func=<Command>)` on every leaf. It only builds parsers:
    no network, no files, no output.
    """

    def register(self, sub: Subparsers, ctx: Context) -> None: ...
