"""`cdpctl policy ...` and `cdpctl alarms`: CDP policies and the RPO alarm log.

Theory of operation: policies live in the coordinator's store and travel as
the JSON of their TOML table (the `[[policies]]` fields of the coordinator
config, same names and units). The CLI only assembles that JSON from its
options (`--disk`, `--target`, `--set FIELD=VALUE`, `--file`) and prints what
the coordinator answers; every check is the coordinator's (one validator for
config file and CLI), and a refusal names the field:

    cdpctl: error: rpo_error_s: must be at least rpo_warning_s (15.0), got 5.0

Exit codes: 0 done, 2 refused (unknown policy, duplicate name) or failed,
3 coordinator unreachable, 64 bad arguments or a field the coordinator
rejected as invalid.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdpctl import lazy, table
from cdpctl.cmdline import Context, Subparsers
from cdpctl.state import UsageError
from cdpctl.units import format_bytes, parse_size

if TYPE_CHECKING:
    from cdp_common.pb.cdp.v1 import coordinator_pb2 as cpb
    from cdpctl import coordcall
else:   # loaded when a command runs, not for --help (cdpctl.lazy)
    cpb = lazy.module("cdp_common.pb.cdp.v1.coordinator_pb2")
    coordcall = lazy.module("cdpctl.coordcall")

FIELDS_HELP = """\
fields (as in the coordinator config's [[policies]]; --set FIELD=VALUE, VALUE
in TOML syntax, bare words are strings):
  target               id of the target node keeping the replicas
  disks                --disk FILTER:DISK:SIZE (repeatable; disks on several filters
                       make a consistency group, run as <policy>..<filter> members)
  source_site          site of the source proxies (default "default")
  target_site          site of the target proxies (default "default")
  rpo_interval_s       seconds between restore points (default 2)
  rpo_warning_s        RPO lag that raises a warning (default 15)
  rpo_error_s          RPO lag that raises an error (default 60, >= warning)
  compression_level    zstd level 0..22 (0 = none, default 1)
  encryption           true/false: AES-256-GCM between the proxies (default true)
  bandwidth_limit_mbps Mbit/s the source proxy may send (0 = unlimited)
  pinned_source_proxy  source proxy to use while it is healthy ("" = least loaded)
  pinned_target_proxy  target proxy to use while it is healthy ("" = least loaded)
  enabled              false: no proxies are assigned; the filter keeps journaling"""


# ---------------------------------------------------------------- building a policy

def parse_value(text: str) -> Any:
    """A --set value: TOML syntax (2, 1.5, true, "x", [..]); anything else is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_sets(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--set {item!r}: expected FIELD=VALUE")
        out[key] = parse_value(value.strip())
    return out


def parse_disk(text: str) -> dict[str, Any]:
    parts = text.split(":")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise UsageError(f"--disk {text!r}: expected FILTER:DISK:SIZE, e.g. filter-1:disk0:1G")
    return {"filter": parts[0], "name": parts[1], "size_bytes": parse_size(parts[2])}


def load_file(path: str) -> dict[str, Any]:
    """A policy table from a TOML or JSON file (a [[policies]] entry, or a bare table)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"--file {path}: cannot read ({exc.strerror})") from None
    try:
        data: Any = json.loads(raw) if path.endswith(".json") else tomllib.loads(raw.decode())
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"--file {path}: not valid {'JSON' if path.endswith('.json') else 'TOML'}"
                         f": {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("policies"), list):
        if len(data["policies"]) != 1:
            raise UsageError(f"--file {path}: holds {len(data['policies'])} policies; give one")
        data = data["policies"][0]
    if not isinstance(data, dict):
        raise UsageError(f"--file {path}: expected a table of policy fields")
    return data


def build_doc(args: argparse.Namespace) -> dict[str, Any]:
    doc: dict[str, Any] = load_file(args.file) if args.file else {}
    if args.name:
        doc["name"] = args.name
    if args.target:
        doc["target"] = args.target
    if args.disk:
        doc["disks"] = [parse_disk(d) for d in args.disk]
    doc.update(parse_sets(args.set))
    if args.disabled:
        doc["enabled"] = False
    for required in ("name", "target", "disks"):
        if required not in doc:
            option = "disk" if required == "disks" else required
            raise UsageError(f"{required}: required (--{option} or --file)")
    return doc


# ---------------------------------------------------------------- output

def _rows(policies: list[dict[str, Any]]) -> str:
    if not policies:
        return "no policies"
    rows = []
    for p in policies:
        filters = sorted({d["filter"] for d in p.get("disks", [])})
        bw = p.get("bandwidth_limit_mbps", 0) or 0
        pins = "/".join(x or "-" for x in (p.get("pinned_source_proxy", ""),
                                           p.get("pinned_target_proxy", "")))
        rows.append((p["name"], "yes" if p.get("enabled", True) else "no",
                     ",".join(filters), len(p.get("disks", [])), p["target"],
                     f"{p['rpo_interval_s']:g}s", f"{p['rpo_warning_s']:g}s/{p['rpo_error_s']:g}s",
                     f"{bw:g}" if bw else "-", pins))
    return table.render(("POLICY", "ENABLED", "FILTER", "DISKS", "TARGET", "RPO", "WARN/ERR",
                         "MBIT/S", "PINNED SRC/TGT"), rows, right=("DISKS",))


def show_text(p: dict[str, Any]) -> str:
    lines = []
    for key, value in p.items():
        if key == "disks":
            continue
        lines.append(f"{key:22} {json.dumps(value) if isinstance(value, str) else value}")
    for i, d in enumerate(p.get("disks", [])):
        lines.append(f"disks[{i}]{'':14} {d['filter']}:{d['name']} "
                     f"({format_bytes(d['size_bytes'])})")
    members = group_members(p)
    if members:
        lines.append(f"{'members':22} {', '.join(members)} (a consistency group)")
    return "\n".join(lines)


def group_members(p: dict[str, Any]) -> list[str]:
    """The member policies of a policy on several filters, sorted (as
    cdp_common.groups.member_names, without loading the config module); [] else."""
    filters = {d["filter"] for d in p.get("disks", [])}
    return sorted(f"{p['name']}..{f}" for f in filters) if len(filters) > 1 else []


def _emit(args: argparse.Namespace, reply: cpb.PolicyReply, verb: str) -> int:
    p = json.loads(reply.policy_json) if reply.policy_json else {"name": args.name}
    if args.json:
        print(json.dumps(p, indent=2))
    else:
        print(f"policy {p['name']} {verb}")
    if reply.warning:
        print(f"cdpctl: warning: {reply.warning}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- commands

def cmd_create(args: argparse.Namespace, ctx: Context) -> int:
    doc = build_doc(args)
    reply = coordcall.call(ctx.coordinator(args), lambda s: s.CreatePolicy(
        cpb.CreatePolicyRequest(policy_json=json.dumps(doc)), timeout=args.timeout))
    return _emit(args, reply, "created")


def cmd_edit(args: argparse.Namespace, ctx: Context) -> int:
    patch: dict[str, Any] = load_file(args.file) if args.file else {}
    if args.target:
        patch["target"] = args.target
    if args.disk:
        patch["disks"] = [parse_disk(d) for d in args.disk]
    patch.update(parse_sets(args.set))
    if not patch:
        raise UsageError("nothing to change: give --set FIELD=VALUE, --target, --disk or --file")
    reply = coordcall.call(ctx.coordinator(args), lambda s: s.UpdatePolicy(
        cpb.UpdatePolicyRequest(name=args.name, patch_json=json.dumps(patch)),
        timeout=args.timeout))
    return _emit(args, reply, "updated")


def cmd_list(args: argparse.Namespace, ctx: Context) -> int:
    reply = coordcall.call(ctx.coordinator(args), lambda s: s.ListPolicies(
        cpb.ListPoliciesRequest(), timeout=args.timeout))
    policies = [json.loads(t) for t in reply.policies_json]
    print(json.dumps({"policies": policies}, indent=2) if args.json else _rows(policies))
    return 0


def cmd_show(args: argparse.Namespace, ctx: Context) -> int:
    reply = coordcall.call(ctx.coordinator(args), lambda s: s.GetPolicy(
        cpb.PolicyName(name=args.name), timeout=args.timeout))
    p = json.loads(reply.policy_json)
    print(json.dumps(p, indent=2) if args.json else show_text(p))
    return 0


def cmd_delete(args: argparse.Namespace, ctx: Context) -> int:
    reply = coordcall.call(ctx.coordinator(args), lambda s: s.DeletePolicy(
        cpb.DeletePolicyRequest(name=args.name, purge=args.purge), timeout=args.timeout))
    if args.purge:
        return _emit(args, reply, "deleted; its nodes delete what they kept of it (the "
                     "filter's images and journal, the target's replicas and restore points)"
                     if reply.policy_json else "purged: every node deletes what it kept of it")
    return _emit(args, reply, "deleted: capture stops and its disks are detached; their data "
                 "(the filter's images and journal, the target's replicas and restore points) "
                 f"is kept until `cdpctl policy delete {args.name} --purge`")


def cmd_enable(args: argparse.Namespace, ctx: Context) -> int:
    enabled = args.policy_command == "enable"
    reply = coordcall.call(ctx.coordinator(args), lambda s: s.SetPolicyEnabled(
        cpb.SetPolicyEnabledRequest(name=args.name, enabled=enabled), timeout=args.timeout))
    return _emit(args, reply, "enabled" if enabled else
                 "disabled (the filter keeps journaling; enable it to resume shipping)")


def alarms_dict(reply: cpb.ListAlarmsReply) -> dict[str, Any]:
    return {"active": dict(sorted(reply.active.items())), "events": [
        {"id": e.id, "time_ns": e.time_ns, "policy": e.policy, "kind": e.kind,
         "level": e.level, "rpo_lag_s": round(e.rpo_lag_s, 3), "message": e.message}
        for e in reply.events]}


def render_alarms(doc: dict[str, Any]) -> str:
    lines = []
    if doc["active"]:
        lines.append("active alarms: " + ", ".join(f"{p} ({lv})"
                                                  for p, lv in doc["active"].items()))
    else:
        lines.append("no active alarms")
    if doc["events"]:
        rows = [(datetime.fromtimestamp(e["time_ns"] / 1e9, UTC).strftime(
                    "%Y-%m-%d %H:%M:%S"), e["policy"], e["kind"], e["level"],
                 f"{e['rpo_lag_s']:.1f}s", e["message"]) for e in doc["events"]]
        lines += ["", table.render(("TIME (UTC)", "POLICY", "EVENT", "LEVEL", "LAG", "MESSAGE"),
                                   rows, right=("LAG",))]
    else:
        lines.append("no alarm events")
    return "\n".join(lines)


def cmd_alarms(args: argparse.Namespace, ctx: Context) -> int:
    if args.limit < 1:
        raise UsageError("--limit: must be at least 1")
    reply = coordcall.call(ctx.coordinator(args), lambda s: s.ListAlarms(
        cpb.ListAlarmsRequest(policy=args.policy or "", limit=args.limit), timeout=args.timeout))
    doc = alarms_dict(reply)
    print(json.dumps(doc, indent=2) if args.json else render_alarms(doc))
    return 1 if doc["active"] else 0


# ---------------------------------------------------------------- parser

def _field_args(q: argparse.ArgumentParser, disk_help: str, set_help: str,
                file_help: str) -> None:
    """--target, --disk, --set and --file: the options `create` and `edit` share."""
    q.add_argument("--target", metavar="NODE", help="target node id")
    q.add_argument("--disk", action="append", default=[], metavar="FILTER:DISK:SIZE",
                   help=disk_help)
    q.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help=set_help)
    q.add_argument("--file", metavar="FILE", help=file_help)


def register(sub: Subparsers, ctx: Context) -> None:
    """`cdpctl policy ...` and `cdpctl alarms` (see cdpctl.cmdline.CommandGroup)."""
    fmt, epilog, common = ctx.formatter, ctx.epilog, ctx.add_coordinator_args

    p = sub.add_parser(
        "policy", formatter_class=fmt, help="create, list, show, edit, delete CDP policies",
        description=textwrap.dedent("""\
            CDP policies as the coordinator stores them. A policy names its disks,
            its target, RPO interval and thresholds, compression,
            encryption, bandwidth limit and optional pinned proxies. The
            coordinator validates every field and refuses a bad value with a
            message naming it; nothing is changed then. A disk belongs to one
            policy; it may grow, never shrink. The filter creates the disks a
            policy names (sparse images) and attaches them to its mount; a
            deleted policy's disks are detached once closed and their data kept
            until `delete --purge`. Policies in the coordinator config file are
            the file's: every coordinator start applies it again, so edit them
            there (a change made here says so in a warning).

            A policy with disks on several filters is a consistency group: the
            coordinator runs it as one member policy per filter, named
            <policy>..<filter> (what status, the filters and the target show),
            all on the same proxies and target, with restore points of the
            group where every member has the same checkpoint. Editing,
            disabling, deleting or syncing the group does it to every member."""),
        epilog=epilog("""\
            cdpctl policy create db --target target-1 --disk filter-1:disk0:10G \\
                --set rpo_warning_s=30 --set rpo_error_s=120
            cdpctl policy create app --target target-1 --disk filter-1:data:10G \\
                --disk filter-2:log:1G      # a group: app..filter-1, app..filter-2
            cdpctl policy list
            cdpctl policy show db --json
            cdpctl policy edit db --set bandwidth_limit_mbps=200 --set pinned_source_proxy=sp-2
            cdpctl policy disable db
            cdpctl policy delete db""", FIELDS_HELP))
    psub = p.add_subparsers(dest="policy_command", metavar="POLICY_COMMAND", required=True)

    q = psub.add_parser(
        "create", formatter_class=fmt, help="create a policy",
        description="Create a policy from options and/or a TOML/JSON file (options win).",
        epilog=epilog("""\
            cdpctl policy create db --target target-1 --disk filter-1:disk0:10G
            cdpctl policy create web --file web.toml --set enabled=false""", FIELDS_HELP))
    q.add_argument("name", metavar="NAME", nargs="?", help="policy name (or name in --file)")
    _field_args(q, "a disk of the policy (repeatable)", "any other field (repeatable)",
                "TOML or JSON file with the policy's fields")
    q.add_argument("--disabled", action="store_true", help="create it disabled")
    common(q)
    q.set_defaults(func=cmd_create)

    q = psub.add_parser(
        "edit", formatter_class=fmt, help="change fields of a policy",
        description=textwrap.dedent("""\
            Change the given fields of a policy; the others keep their values.
            A change of proxies or parameters reaches the nodes at once
            (new assignment). The name cannot change."""),
        epilog=epilog("""\
            cdpctl policy edit db --set rpo_warning_s=5 --set rpo_error_s=10
            cdpctl policy edit db --set pinned_target_proxy='""'""", FIELDS_HELP))
    q.add_argument("name", metavar="NAME")
    _field_args(q, "replace the disk list (repeatable)", "field to change (repeatable)",
                "TOML or JSON file with fields to change")
    common(q)
    q.set_defaults(func=cmd_edit)

    for name, helptext, func in (
            ("list", "list every policy", cmd_list),
            ("show", "every field of one policy", cmd_show),
            ("delete", "delete a policy (its data is kept unless --purge)", cmd_delete),
            ("enable", "assign proxies again and resume shipping", cmd_enable),
            ("disable", "stop shipping; the filter keeps journaling", cmd_enable)):
        q = psub.add_parser(name, formatter_class=fmt, help=helptext,
                            description=helptext[0].upper() + helptext[1:] + ".",
                            epilog=epilog(f"cdpctl policy {name}"
                                          + ("" if name == "list" else " db")))
        if name != "list":
            q.add_argument("name", metavar="NAME")
        if name == "delete":
            q.add_argument("--purge", action="store_true",
                           help="also delete what its nodes kept of it: the filter's images "
                                "and journal, the target's replicas and restore points "
                                "(for a policy already deleted: every node's); irreversible")
        common(q)
        q.set_defaults(func=func)

    p = sub.add_parser(
        "alarms", formatter_class=fmt, help="RPO alarm events (raised, lowered, cleared)",
        description=textwrap.dedent("""\
            The coordinator's alarm log: an event each time a policy's state
            raises or lowers its level (degraded or unprotected: warning; error:
            error; see `cdpctl health`) and when it recovers, oldest first, plus
            the alarms active now.
            Exits 1 while an alarm is active, 0 otherwise."""),
        epilog=epilog("""\
            cdpctl alarms
            cdpctl alarms --policy db --limit 20
            cdpctl alarms --json | jq '.events[-1]'"""))
    p.add_argument("--policy", metavar="NAME", help="only this policy's events")
    p.add_argument("--limit", type=int, default=100, metavar="N",
                   help="newest N events (default 100)")
    common(p)
    p.set_defaults(func=cmd_alarms)
