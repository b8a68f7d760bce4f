"""`cdpctl lab up|down|status|restart|kill|start`: the command shells over cdpctl.lab.

Theory of operation: the options are checked here (sizes, counts, timeouts)
before anything is created; cdpctl.lab does the work (plan, certificates,
processes, lab.json) and cdpctl.table draws `lab status`.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

from cdpctl import labplan, lazy, table
from cdpctl.cmdline import Context, Subparsers, print_json
from cdpctl.state import UsageError
from cdpctl.units import parse_size

if TYPE_CHECKING:
    from cdpctl import lab
else:   # grpc and the PKI, loaded when a lab command runs (cdpctl.lazy)
    lab = lazy.module("cdpctl.lab")


def parse_sites(text: str) -> tuple[str, str]:
    source, sep, dr = text.partition(",")
    if not sep or not source or not dr or "," in dr:
        raise UsageError(f"--sites: expected SOURCE,DR (two site names), got {text!r}")
    return source.strip(), dr.strip()


def cmd_lab_up(args: argparse.Namespace, ctx: Context) -> int:
    size = parse_size(args.disk_size)
    if args.timeout <= 0:
        raise UsageError("--timeout: must be greater than 0")
    for opt, n, most in (("--disks", args.disks, labplan.MAX_DISKS),
                         ("--filters", args.filters, labplan.MAX_FILTERS),
                         ("--targets", args.targets, labplan.MAX_TARGETS),
                         ("--policies", args.policies, labplan.MAX_POLICIES),
                         ("--source-proxies", args.source_proxies, labplan.MAX_PROXIES),
                         ("--target-proxies", args.target_proxies, labplan.MAX_PROXIES)):
        if not 1 <= n <= most:
            raise UsageError(f"{opt}: expected 1..{most}, got {n}")
    source_site, dr_site = parse_sites(args.sites) if args.sites else ("default", "default")
    topo = labplan.Topology(filters=args.filters, targets=args.targets, policies=args.policies,
                            source_proxies=args.source_proxies,
                            target_proxies=args.target_proxies, disks_per_policy=args.disks,
                            source_site=source_site, dr_site=dr_site,
                            store=args.store or ("etcd" if args.coordinators > 1 else "sqlite"),
                            coordinators=args.coordinators)
    try:
        topo.check()
    except ValueError as exc:
        raise UsageError(f"lab up: {exc}") from None
    say = (lambda _msg: None) if args.json else print
    state = lab.lab_up(Path(args.dir), args.disks, size, args.insecure, args.timeout, say=say,
                       topology=topo)
    if args.json:
        print_json(state)
    else:
        print()
        print(lab.summary(state))
    return 0


def cmd_lab_down(args: argparse.Namespace, ctx: Context) -> int:
    lab.lab_down(Path(args.dir))
    return 0


def cmd_lab_status(args: argparse.Namespace, ctx: Context) -> int:
    state, rows = lab.lab_status(Path(args.dir))
    if state is None:
        if args.json:
            print_json({"running": False, "processes": []})
        else:
            print(f"no lab in {Path(args.dir).absolute()} (no lab.json)")
        return 2
    all_alive = all(r["alive"] for r in rows)
    if args.json:
        print_json({"running": all_alive, "coordinator": state.get("coordinator"),
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


def cmd_lab_kill(args: argparse.Namespace, ctx: Context) -> int:
    lab.lab_kill(Path(args.dir), args.node_id)
    return 0


def cmd_lab_restart(args: argparse.Namespace, ctx: Context) -> int:
    lab.lab_restart(Path(args.dir), args.node_id, args.timeout)
    return 0


# `restart` and `start` are one command under two names (kept for scripts that use either).
_RESTART_TEXTS = (
    ("restart", "start a stopped lab process again", """\
        Start one lab process again with its recorded config and log, after it
        was killed or crashed, and wait until it serves gRPC health.""",
     "cdpctl lab restart --dir ./lab target-proxy-1"),
    ("start", "start a killed lab process", """\
        Start one lab process again with its recorded config and log (same
        ports), after `cdpctl lab kill` or a crash, and wait until it serves
        gRPC health. For the filter, the disks are back under DIR/mnt once
        the journal has been replayed. Refuses when the process runs.""",
     "cdpctl lab start --dir ./lab target-1"),
)

_NODE_ID_HELP = "process id from lab.json, e.g. filter-1"


def register(sub: Subparsers, ctx: Context) -> None:
    """`cdpctl lab ...` (see cdpctl.cmdline.CommandGroup)."""
    fmt, epilog = ctx.formatter, ctx.epilog
    p = sub.add_parser(
        "lab", formatter_class=fmt, help="run the whole system on this machine",
        description=textwrap.dedent("""\
            A local lab runs a coordinator, a target, a target proxy, a source proxy
            and a filter as separate processes on 127.0.0.1 with mutual TLS, one
            policy "lab" and N protected disks exposed as files under DIR/mnt;
            `lab up --filters/--targets/--policies/--sites` builds bigger
            topologies (several filters, targets, proxies and policies on two
            sites; with two filters or more, the last policy has disks on every
            filter: a consistency group). Needs root (or FUSE permissions) and
            /dev/fuse."""),
        epilog=epilog("""\
            cdpctl lab up --dir ./lab --disks 2 --disk-size 256M
            cdpctl lab status --dir ./lab
            cdpctl lab restart --dir ./lab source-proxy-1
            cdpctl lab kill --dir ./lab filter-1
            cdpctl lab start --dir ./lab filter-1
            cdpctl lab down --dir ./lab"""))
    lab_sub = p.add_subparsers(dest="lab_command", metavar="LAB_COMMAND", required=True)

    q = lab_sub.add_parser(
        "up", formatter_class=fmt, help="create and start a lab",
        description=textwrap.dedent("""\
            Create DIR/{pki,config,data,logs,mnt}: a throwaway CA and node
            certificates, a master key shared by the proxies, a TOML config per
            daemon on free ports; start the daemons (the coordinator, the targets,
            the target proxies, the source proxies, then the filters), wait until
            each serves gRPC health and its disk files exist, and write
            DIR/lab.json, which lists every process and every disk with its
            policy, member policy (<policy>..<filter> for a policy on several
            filters, else the policy), filter, target, path and replica path.
            Refuses when a lab is already running in DIR. Data of a previous
            lab in DIR is kept and reused."""),
        epilog=epilog("""\
            cdpctl lab up --dir ./lab
            cdpctl lab up --dir /tmp/lab --disks 2 --disk-size 256M --insecure
            cdpctl lab up --dir ./lab --source-proxies 2 --target-proxies 2
            cdpctl lab up --dir ./lab --filters 2 --targets 2 --policies 3 \\
                --source-proxies 2 --target-proxies 2 --sites hq,dr --disk-size 64M
            cdpctl lab up --dir ./lab --store etcd --coordinators 3"""))
    q.add_argument("--dir", required=True, help="lab directory (created if missing)")
    q.add_argument("--disk-size", default="1G", metavar="SIZE",
                   help="size of each disk, K/M/G/T binary units (default 1G)")
    q.add_argument("--disks", type=int, default=1, metavar="N",
                   help="number of disks of each policy (default 1)")
    q.add_argument("--filters", type=int, default=1, metavar="N",
                   help="filters filter-1..N, each with its own mount DIR/mnt/filter-<i> "
                        "(DIR/mnt with one), data dir and certificate (default 1)")
    q.add_argument("--targets", type=int, default=1, metavar="N",
                   help="targets target-1..N (default 1)")
    q.add_argument("--policies", type=int, default=1, metavar="N",
                   help="policies: one is called lab, several lab-1..N; policy i protects "
                        "--disks disks on filter i mod --filters, replicated to target i "
                        "mod --targets; with --filters 2 or more the last policy has "
                        "--disks disks on every filter, a consistency group (default 1)")
    q.add_argument("--sites", metavar="SOURCE,DR",
                   help="site names: the coordinator, filters and source proxies at SOURCE, "
                        "targets and target proxies at DR; the policies replicate from "
                        "SOURCE to DR (default: one site called default)")
    q.add_argument("--store", choices=labplan.STORES,
                   help="the coordinators' state store: sqlite (one file; the default with "
                        "one coordinator) or etcd (a 3-member etcd cluster etcd-1..3 on "
                        "loopback, plain; needs the etcd binary: apt-get install etcd-server)")
    q.add_argument("--coordinators", type=int, default=1, metavar="N",
                   help=f"coordinators coordinator, coordinator-2..N on one etcd (1.."
                        f"{labplan.MAX_COORDINATORS}; more than one implies --store etcd): one "
                        "leads, the others stand by and take over within seconds when it "
                        "dies; every node and cdpctl get the list (default 1)")
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
        "down", formatter_class=fmt, help="stop a lab",
        description=textwrap.dedent("""\
            SIGTERM every lab process (filter, source proxy, target proxy, target,
            coordinator), SIGKILL those still running after 10 s, lazily unmount
            the FUSE mount if it is still there and remove lab.json. Data,
            configs and logs are kept. Succeeds when no lab runs."""),
        epilog=epilog("cdpctl lab down --dir ./lab"))
    q.add_argument("--dir", required=True, help="lab directory")
    q.set_defaults(func=cmd_lab_down)

    q = lab_sub.add_parser(
        "status", formatter_class=fmt, help="which lab processes are alive",
        description="List the lab's processes with PID, address and whether each is alive.",
        epilog=epilog("cdpctl lab status --dir ./lab\ncdpctl lab status --dir ./lab --json"))
    q.add_argument("--dir", required=True, help="lab directory")
    q.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")
    q.set_defaults(func=cmd_lab_status)

    _restart_parser(lab_sub, ctx, *_RESTART_TEXTS[0])

    q = lab_sub.add_parser(
        "kill", formatter_class=fmt, help="SIGKILL one lab process (crash rehearsal)",
        description=textwrap.dedent("""\
            Kill one lab process with SIGKILL, as a crash would, and wait until it
            is gone. Killing the filter leaves its FUSE mount dead; it is lazily
            unmounted (programs that still hold a disk open get EIO/ENOTCONN).
            Nothing else is touched: journals, deltas and replicas stay as the
            crash left them. `cdpctl lab start` brings the process back."""),
        epilog=epilog("""\
            cdpctl lab kill --dir ./lab target-1
            cdpctl lab kill --dir ./lab filter-1 && cdpctl lab start --dir ./lab filter-1"""))
    q.add_argument("--dir", required=True, help="lab directory")
    q.add_argument("node_id", metavar="NODE_ID", help=_NODE_ID_HELP)
    q.set_defaults(func=cmd_lab_kill)

    _restart_parser(lab_sub, ctx, *_RESTART_TEXTS[1])


def _restart_parser(lab_sub: Subparsers, ctx: Context, name: str, helptext: str,
                    description: str, example: str) -> None:
    q = lab_sub.add_parser(name, formatter_class=ctx.formatter, help=helptext,
                           description=textwrap.dedent(description),
                           epilog=ctx.epilog(example))
    q.add_argument("--dir", required=True, help="lab directory")
    q.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="how long it may take to come up (default 30)")
    q.add_argument("node_id", metavar="NODE_ID", help=_NODE_ID_HELP)
    q.set_defaults(func=cmd_lab_restart)
