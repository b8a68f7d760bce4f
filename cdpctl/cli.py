"""The `cdpctl` command line: argument parsing, dispatch and exit codes.

Every command returns an exit code; CdpError becomes a one-line message and
its code, never a traceback (see EXIT_CODES).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any, NoReturn

from cdp_common import crypto, pki
from cdp_common.errors import CdpError, CoordinatorUnreachable
from cdpctl import completion, lab, labplan, resolve, restore, status, sync, table
from cdpctl import policy as policy_cmd
from cdpctl.state import UsageError
from cdpctl.units import parse_size

EXIT_USAGE = 64

EXIT_CODES = """\
exit codes:
  0   ok
  1   warning (e.g. a policy's RPO lag is above its warning threshold)
  2   error (a node down, a policy in error or unassigned, a failed command)
  3   coordinator unreachable
  64  usage error (bad or missing arguments)"""

COORDINATOR_HELP = """\
which coordinator (first match wins):
  --coordinator HOST:PORT, else $CDP_COORDINATOR, else the lab.json of the
  local lab in --lab-dir, else $CDP_LAB_DIR, else ./lab.
TLS credentials: --insecure, else --ca/--cert/--key, else the lab's client
certificate (pki/cdpctl.pem) when a lab.json was found."""


class Parser(argparse.ArgumentParser):
    """argparse that exits with 64 (EX_USAGE) instead of 2 on bad arguments."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _fmt() -> type[argparse.HelpFormatter]:
    return argparse.RawDescriptionHelpFormatter


def _epilog(examples: str, extra: str = "") -> str:
    text = "examples:\n" + textwrap.indent(textwrap.dedent(examples).strip("\n"), "  ")
    if extra:
        text += "\n\n" + extra
    return text + "\n\n" + EXIT_CODES


def _add_coordinator_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("coordinator connection")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="coordinator address")
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


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="cdpctl", formatter_class=_fmt(),
        description=textwrap.dedent("""\
            Operate cdp, continuous data protection for Linux disks: query the
            health and status of a deployment from its coordinator, create
            certificates and keys, and run a complete local lab (every daemon a
            separate process on 127.0.0.1, disks exposed through FUSE)."""),
        epilog=_epilog("""\
            cdpctl lab up --dir ./lab --disk-size 1G
            cdpctl health
            cdpctl status --json
            cdpctl lab down --dir ./lab
            cdpctl pki init --dir /etc/cdp/pki
            cdpctl pki issue --dir /etc/cdp/pki filter-1 --host 192.0.2.10
            cdpctl keygen /etc/cdp/master.key"""))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # health
    p = sub.add_parser(
        "health", formatter_class=_fmt(), help="is everything up and within its RPO?",
        description=textwrap.dedent("""\
            Ask the coordinator for the state of every node and policy and judge it:
            ok when every node is up and every policy is ok, warning when a
            policy's RPO lag is above its warning threshold, error when a node is
            down or a policy is in error or has no proxy assigned. The exit code
            says which, so this fits a monitoring check."""),
        epilog=_epilog("""\
            cdpctl health
            cdpctl health --coordinator 192.0.2.1:7000 --ca ca.pem --cert ops.pem --key ops.key
            cdpctl health --json | jq .problems""", COORDINATOR_HELP))
    _add_coordinator_args(p)
    p.set_defaults(func=cmd_health)

    # status
    p = sub.add_parser(
        "status", formatter_class=_fmt(), help="nodes and policies as the coordinator sees them",
        description=textwrap.dedent("""\
            Show every registered node (role, site, up/down, last heartbeat) and
            every policy (assigned proxies, durable seq, RPO lag, bytes replicated,
            journal backlog). --json gives {"nodes": [...], "policies": [...]}."""),
        epilog=_epilog("""\
            cdpctl status
            cdpctl status --watch
            cdpctl status --json | jq '.policies[] | {name, rpo_lag_s}'""", COORDINATOR_HELP))
    _add_coordinator_args(p)
    p.add_argument("--watch", action="store_true",
                   help="redraw the tables every --interval seconds until Ctrl-C")
    p.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                   help="refresh period of --watch (default 1)")
    p.set_defaults(func=cmd_status)

    policy_cmd.add_parsers(sub, (_fmt, _epilog, _add_coordinator_args, _coordinator))

    # lab
    p = sub.add_parser(
        "lab", formatter_class=_fmt(), help="run the whole system on this machine",
        description=textwrap.dedent("""\
            A local lab runs a coordinator, a target, a target proxy, a source proxy
            and a filter as separate processes on 127.0.0.1 with mutual TLS, one
            policy "lab" and N protected disks exposed as files under DIR/mnt.
            Needs root (or FUSE permissions) and /dev/fuse."""),
        epilog=_epilog("""\
            cdpctl lab up --dir ./lab --disks 2 --disk-size 256M
            cdpctl lab status --dir ./lab
            cdpctl lab restart --dir ./lab source-proxy-1
            cdpctl lab kill --dir ./lab filter-1
            cdpctl lab start --dir ./lab filter-1
            cdpctl lab down --dir ./lab"""))
    lab_sub = p.add_subparsers(dest="lab_command", metavar="LAB_COMMAND", required=True)

    q = lab_sub.add_parser(
        "up", formatter_class=_fmt(), help="create and start a lab",
        description=textwrap.dedent("""\
            Create DIR/{pki,config,data,logs,mnt}: a throwaway CA and node
            certificates, a master key shared by both proxies, a TOML config per
            daemon on free ports; start the five daemons, wait until each serves
            gRPC health and the disk files exist, and write DIR/lab.json.
            Refuses when a lab is already running in DIR. Data of a previous
            lab in DIR is kept and reused."""),
        epilog=_epilog("""\
            cdpctl lab up --dir ./lab
            cdpctl lab up --dir /tmp/lab --disks 2 --disk-size 256M --insecure
            cdpctl lab up --dir ./lab --source-proxies 2 --target-proxies 2"""))
    q.add_argument("--dir", required=True, help="lab directory (created if missing)")
    q.add_argument("--disk-size", default="1G", metavar="SIZE",
                   help="size of each disk, K/M/G/T binary units (default 1G)")
    q.add_argument("--disks", type=int, default=1, metavar="N",
                   help="number of disks in the policy (default 1)")
    q.add_argument("--insecure", action="store_true",
                   help="plaintext gRPC between the daemons instead of mutual TLS")
    q.add_argument("--source-proxies", type=int, default=1, metavar="N",
                   help="source proxies source-proxy-1..N; spares take over when one "
                        "dies (default 1)")
    q.add_argument("--target-proxies", type=int, default=1, metavar="N",
                   help="target proxies target-proxy-1..N (default 1)")
    q.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="how long each daemon may take to come up (default 30)")
    q.add_argument("--json", action="store_true", help="print lab.json instead of a summary")
    q.set_defaults(func=cmd_lab_up)

    q = lab_sub.add_parser(
        "down", formatter_class=_fmt(), help="stop a lab",
        description=textwrap.dedent("""\
            SIGTERM every lab process (filter, source proxy, target proxy, target,
            coordinator), SIGKILL those still running after 10 s, lazily unmount
            the FUSE mount if it is still there and remove lab.json. Data,
            configs and logs are kept. Succeeds when no lab runs."""),
        epilog=_epilog("cdpctl lab down --dir ./lab"))
    q.add_argument("--dir", required=True, help="lab directory")
    q.set_defaults(func=cmd_lab_down)

    q = lab_sub.add_parser(
        "status", formatter_class=_fmt(), help="which lab processes are alive",
        description="List the lab's processes with PID, address and whether each is alive.",
        epilog=_epilog("cdpctl lab status --dir ./lab\ncdpctl lab status --dir ./lab --json"))
    q.add_argument("--dir", required=True, help="lab directory")
    q.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")
    q.set_defaults(func=cmd_lab_status)

    q = lab_sub.add_parser(
        "restart", formatter_class=_fmt(), help="start a stopped lab process again",
        description=textwrap.dedent("""\
            Start one lab process again with its recorded config and log, after it
            was killed or crashed, and wait until it serves gRPC health."""),
        epilog=_epilog("cdpctl lab restart --dir ./lab target-proxy-1"))
    q.add_argument("--dir", required=True, help="lab directory")
    q.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="how long it may take to come up (default 30)")
    q.add_argument("node_id", metavar="NODE_ID", help="process id from lab.json, e.g. filter-1")
    q.set_defaults(func=cmd_lab_restart)

    q = lab_sub.add_parser(
        "kill", formatter_class=_fmt(), help="SIGKILL one lab process (crash rehearsal)",
        description=textwrap.dedent("""\
            Kill one lab process with SIGKILL, as a crash would, and wait until it
            is gone. Killing the filter leaves its FUSE mount dead; it is lazily
            unmounted (programs that still hold a disk open get EIO/ENOTCONN).
            Nothing else is touched: journals, deltas and replicas stay as the
            crash left them. `cdpctl lab start` brings the process back."""),
        epilog=_epilog("""\
            cdpctl lab kill --dir ./lab target-1
            cdpctl lab kill --dir ./lab filter-1 && cdpctl lab start --dir ./lab filter-1"""))
    q.add_argument("--dir", required=True, help="lab directory")
    q.add_argument("node_id", metavar="NODE_ID", help="process id from lab.json, e.g. filter-1")
    q.set_defaults(func=cmd_lab_kill)

    q = lab_sub.add_parser(
        "start", formatter_class=_fmt(), help="start a killed lab process",
        description=textwrap.dedent("""\
            Start one lab process again with its recorded config and log (same
            ports), after `cdpctl lab kill` or a crash, and wait until it serves
            gRPC health. For the filter, the disks are back under DIR/mnt once
            the journal has been replayed. Refuses when the process runs."""),
        epilog=_epilog("cdpctl lab start --dir ./lab target-1"))
    q.add_argument("--dir", required=True, help="lab directory")
    q.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="how long it may take to come up (default 30)")
    q.add_argument("node_id", metavar="NODE_ID", help="process id from lab.json, e.g. filter-1")
    q.set_defaults(func=cmd_lab_restart)

    restore.add_parsers(sub, _fmt(), _epilog, _add_coordinator_args, COORDINATOR_HELP,
                        _coordinator)
    sync.add_parser(sub, _fmt(), _epilog, _add_coordinator_args, COORDINATOR_HELP, _coordinator)

    # pki
    p = sub.add_parser(
        "pki", formatter_class=_fmt(), help="certificates for mutual TLS",
        description=textwrap.dedent("""\
            A small CA for cdp: every node gets a certificate valid as server and
            client, signed by one CA that every node trusts."""),
        epilog=_epilog("""\
            cdpctl pki init --dir /etc/cdp/pki
            cdpctl pki issue --dir /etc/cdp/pki coordinator \\
                --host coord.example.org --host 192.0.2.1"""))
    pki_sub = p.add_subparsers(dest="pki_command", metavar="PKI_COMMAND", required=True)
    q = pki_sub.add_parser(
        "init", formatter_class=_fmt(), help="create a CA (ca.pem, ca.key)",
        description="Create DIR/ca.pem and DIR/ca.key (mode 0600). Refuses to overwrite a CA.",
        epilog=_epilog("cdpctl pki init --dir /etc/cdp/pki"))
    q.add_argument("--dir", required=True, help="PKI directory")
    q.set_defaults(func=cmd_pki_init)
    q = pki_sub.add_parser(
        "issue", formatter_class=_fmt(), help="issue a node certificate",
        description=textwrap.dedent("""\
            Issue DIR/NODE_ID.pem and DIR/NODE_ID.key signed by the CA in DIR, valid
            for the given host names and IP addresses (plus localhost and
            127.0.0.1). Point the node's [tls] section at them."""),
        epilog=_epilog("cdpctl pki issue --dir /etc/cdp/pki filter-1 --host 192.0.2.10"))
    q.add_argument("--dir", required=True, help="PKI directory holding ca.pem and ca.key")
    q.add_argument("node_id", metavar="NODE_ID", help="node id, also the certificate's CN")
    q.add_argument("--host", action="append", default=[], metavar="H",
                   help="DNS name or IP address peers use to reach the node (repeatable)")
    q.set_defaults(func=cmd_pki_issue)

    # keygen
    p = sub.add_parser(
        "keygen", formatter_class=_fmt(), help="create a master key for payload encryption",
        description=textwrap.dedent("""\
            Write a fresh random 32-byte master key (hex) to FILE, mode 0600. Give
            the same key file to the source and the target proxies
            (proxy.key_file). Refuses to overwrite an existing file."""),
        epilog=_epilog("cdpctl keygen /etc/cdp/master.key"))
    p.add_argument("file", metavar="FILE", help="key file to create")
    p.set_defaults(func=cmd_keygen)

    completion.register(sub, _fmt(), _epilog)
    return parser


# ---------------------------------------------------------------- commands

def _coordinator(args: argparse.Namespace) -> resolve.Coordinator:
    return resolve.resolve(coordinator=args.coordinator, lab_dir_arg=args.lab_dir, ca=args.ca,
                           cert=args.cert, key=args.key, insecure=args.insecure,
                           env=os.environ, cwd=Path.cwd())


def _print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2))


def cmd_status(args: argparse.Namespace) -> int:
    if args.watch:
        if args.json:
            raise UsageError("--watch and --json do not go together")
        if args.interval <= 0:
            raise UsageError("--interval: must be greater than 0")
        coord = _coordinator(args)
        return policy_cmd.watch(
            lambda: status.render_status(status.fetch_status(coord, args.timeout)),
            args.interval)
    doc = status.fetch_status(_coordinator(args), args.timeout)
    if args.json:
        _print_json(doc)
    else:
        print(status.render_status(doc))
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    doc = status.fetch_status(_coordinator(args), args.timeout)
    verdict = status.evaluate(doc)
    if args.json:
        _print_json(verdict.as_dict())
    else:
        print(status.render_health(doc, verdict))
    return verdict.exit_code


def cmd_lab_up(args: argparse.Namespace) -> int:
    size = parse_size(args.disk_size)
    if not 1 <= args.disks <= 64:
        raise UsageError(f"--disks: expected 1..64, got {args.disks}")
    if args.timeout <= 0:
        raise UsageError("--timeout: must be greater than 0")
    for opt, n in (("--source-proxies", args.source_proxies),
                   ("--target-proxies", args.target_proxies)):
        if not 1 <= n <= labplan.MAX_PROXIES:
            raise UsageError(f"{opt}: expected 1..{labplan.MAX_PROXIES}, got {n}")
    say = (lambda _msg: None) if args.json else print
    state = lab.lab_up(Path(args.dir), args.disks, size, args.insecure, args.timeout, say=say,
                       source_proxies=args.source_proxies, target_proxies=args.target_proxies)
    if args.json:
        _print_json(state)
    else:
        print()
        print(lab.summary(state))
    return 0


def cmd_lab_down(args: argparse.Namespace) -> int:
    lab.lab_down(Path(args.dir))
    return 0


def cmd_lab_status(args: argparse.Namespace) -> int:
    state, rows = lab.lab_status(Path(args.dir))
    if state is None:
        if args.json:
            _print_json({"running": False, "processes": []})
        else:
            print(f"no lab in {Path(args.dir).absolute()} (no lab.json)")
        return 2
    all_alive = all(r["alive"] for r in rows)
    if args.json:
        _print_json({"running": all_alive, "coordinator": state.get("coordinator"),
                     "processes": [{k: r[k] for k in ("id", "role", "pid", "address",
                                                      "metrics_address", "log", "alive")}
                                   for r in rows],
                     "disks": state.get("disks", [])})
    else:
        print(table.render(("PROCESS", "ROLE", "PID", "STATE", "ADDRESS", "METRICS"),
                           [(r["id"], r["role"], r["pid"], "alive" if r["alive"] else "dead",
                             r["address"], r["metrics_address"]) for r in rows],
                           right=("PID",)))
        for d in state.get("disks", []):
            print(f"disk {d['name']}: {d['path']}")
    return 0 if all_alive else 2


def cmd_lab_kill(args: argparse.Namespace) -> int:
    lab.lab_kill(Path(args.dir), args.node_id)
    return 0


def cmd_lab_restart(args: argparse.Namespace) -> int:
    lab.lab_restart(Path(args.dir), args.node_id, args.timeout)
    return 0


def cmd_pki_init(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    if (directory / "ca.pem").exists() or (directory / "ca.key").exists():
        raise CdpError(f"{directory} already holds a CA (ca.pem/ca.key); not overwriting it")
    ca_pem, ca_key = pki.create_ca(directory)
    print(f"created CA {ca_pem} (private key {ca_key}, keep it secret)")
    return 0


def cmd_pki_issue(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    ca_pem, ca_key = directory / "ca.pem", directory / "ca.key"
    if not ca_pem.exists() or not ca_key.exists():
        raise CdpError(f"no CA in {directory}; create one with `cdpctl pki init --dir {directory}`")
    if not labplan.valid_id(args.node_id):
        raise UsageError(f"NODE_ID {args.node_id!r}: letters, digits, '-', '_', '.' only")
    try:
        pem, key = pki.create_node_cert(ca_pem, ca_key, directory, args.node_id, args.host)
    except ValueError as exc:
        raise CdpError(f"cannot issue a certificate for {args.node_id}: {exc}") from None
    print(f"issued {pem} and {key} for {args.node_id}")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    try:
        crypto.write_new_key(args.file)
    except FileExistsError:
        raise CdpError(f"{args.file} exists; not overwriting a key") from None
    print(f"wrote a new master key to {args.file} (mode 0600)")
    return 0


# ---------------------------------------------------------------- entry

def run(argv: list[str]) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    try:
        code: int = args.func(args)
        return code
    except UsageError as exc:
        print(f"cdpctl: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CoordinatorUnreachable as exc:
        print(f"cdpctl: {exc}", file=sys.stderr)
        return status.EXIT_UNREACHABLE
    except CdpError as exc:
        # Every other failure is an error (2) on the documented scale.
        print(f"cdpctl: error: {exc}", file=sys.stderr)
        return status.EXIT_ERROR
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        print(f"cdpctl: error:{where}: {exc.strerror or exc}", file=sys.stderr)
        return status.EXIT_ERROR
    except KeyboardInterrupt:
        print("cdpctl: interrupted", file=sys.stderr)
        return 130

