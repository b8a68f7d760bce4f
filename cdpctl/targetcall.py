"""Talking to a target's RestorePoints service from cdpctl: finding the target,
one client with errors on cdp's scale, progress of long copies, loop devices,
and the request and result shapes that restore, failover, test failover and
verify share (so those commands depend on this module, not on each other).
"""

from __future__ import annotations

import argparse
import datetime as dt
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

from cdp_common.errors import CdpError, NotAuthorizedError
from cdp_common.groups import split_member
from cdp_common.timefmt import iso_utc as iso
from cdpctl import lazy, status
from cdpctl.resolve import Coordinator
from cdpctl.state import UsageError
from cdpctl.units import format_bytes

if TYPE_CHECKING:
    import grpc

    from cdp_common import rpc
    from cdp_common.pb.cdp.v1 import replication_pb2 as rpb
    from cdp_common.pb.cdp.v1 import replication_pb2_grpc as rgrpc
    from cdp_common.pb.cdp.v1 import restore_pb2 as pb
    from cdp_common.pb.cdp.v1 import restore_pb2_grpc as pgrpc
else:   # loaded when a command runs, not for --help (cdpctl.lazy)
    grpc = lazy.module("grpc")
    rpc = lazy.module("cdp_common.rpc")
    rpb = lazy.module("cdp_common.pb.cdp.v1.replication_pb2")
    rgrpc = lazy.module("cdp_common.pb.cdp.v1.replication_pb2_grpc")
    pb = lazy.module("cdp_common.pb.cdp.v1.restore_pb2")
    pgrpc = lazy.module("cdp_common.pb.cdp.v1.restore_pb2_grpc")

PROGRESS_EVERY_S = 0.5
RESTORE_TIMEOUT_S = 3600.0


class TargetError(CdpError):
    """The target refused or failed a restore-point request."""



def parse_time(text: str) -> int:
    """ISO 8601 -> ns since the epoch; without a zone the time is UTC."""
    try:
        t = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(f"--time {text!r}: expected ISO 8601, e.g. 2024-05-01T12:30:00Z") \
            from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    delta = t - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return (delta.days * 86400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


def gap_dict(g: Any) -> dict[str, Any]:
    return {"begin_seq": g.begin_seq, "end_seq": g.end_seq,
            "begin_time": iso(g.begin_time_ns) if g.begin_time_ns else "",
            "end_time": iso(g.end_time_ns) if g.end_time_ns else "",
            "reason": g.reason or "overflow"}



def chosen_point_dict(done: pb.RestoreDone) -> dict[str, Any]:
    """The point a restore or failover used; `consistent` as the target computed it
    when it chose the point (false from a target too old to say)."""
    p = done.point
    return {"id": p.id, "kind": p.kind, "time": iso(p.time_ns), "last_seq": p.last_seq,
            "consistent": done.consistent, "gap": done.gap or None,
            "checkpoint_id": p.checkpoint_id, "members": members_of(p)}


def members_of(p: pb.PointInfo) -> list[dict[str, Any]]:
    """A group point's member points ([] for a policy's own point)."""
    return [{"policy": m.policy, "point_id": m.point_id, "last_seq": m.last_seq,
             "time": iso(m.time_ns)} for m in p.members]


def member_of_image(path: str, members: list[str]) -> str:
    """The member policy whose failover image `path` is: the target keeps a policy's
    failover images in <data_dir>/<policy>/failover/ ("" when not one of `members`)."""
    parts = path.rstrip("/").split("/")
    name = parts[-3] if len(parts) >= 3 and parts[-2] == "failover" else ""
    return name if name in members else ""


def group_failover_members(images: list[dict[str, Any]], members: list[str],
                           states: dict[str, str]) -> list[dict[str, Any]]:
    """A group failover per member: its state (`states`: "" = none) and its images
    (those of `images` under its failover directory)."""
    return [{"policy": m, "state": states.get(m) or "none",
             "images": [i for i in images if member_of_image(i["path"], members) == m]}
            for m in sorted(members)]


def inconsistent_warning(point: dict[str, Any]) -> str:
    return (f"WARNING: point {point['id']} is NOT consistent"
            + (f" ({point['gap']})" if point.get("gap") else "")
            + ": its blocks mix data from before and after the gap")



# ---------------------------------------------------------------- finding the target

def target_address(coord: Coordinator, policy: str, given: str | None, timeout_s: float) -> str:
    if given:
        host, sep, port = given.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise UsageError(f"--target: expected HOST:PORT, got {given!r}")
        return given
    doc = status.fetch_status(coord, timeout_s)
    nodes = {n["id"]: n for n in doc["nodes"]}
    pol = next((p for p in doc["policies"] if p["name"] == policy), None)
    if pol is None:   # a consistency group: its members share one target
        pol = next((p for p in doc["policies"]
                    if (split_member(p["name"]) or ("",))[0] == policy), None)
    if pol is None:
        raise TargetError(f"the coordinator knows no policy {policy!r}")
    if pol.get("target") and pol["target"] in nodes:
        return str(nodes[pol["target"]]["address"])
    targets = [n for n in doc["nodes"] if n["role"] == "target"]
    if len(targets) == 1:
        return str(targets[0]["address"])
    raise TargetError(f"cannot tell which target keeps policy {policy}; pass --target HOST:PORT")


class TargetClient:
    def __init__(self, coord: Coordinator, address: str) -> None:
        self.address = address
        self.channel = rpc.sync_channel(address, coord.tls)
        self.stub = pgrpc.RestorePointsStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def gaps(self, policy: str, timeout_s: float) -> list[dict[str, Any]]:
        """The policy's gaps, from Target.GetPolicyState (same address and TLS)."""
        reply = self.call("policy state", rgrpc.TargetStub(self.channel).GetPolicyState,
                          rpb.PolicyStateRequest(policy=policy), timeout=timeout_s)
        return [gap_dict(g) for s in reply.policies if s.policy == policy for g in s.gaps]

    def all_gaps(self, timeout_s: float) -> dict[str, list[dict[str, Any]]]:
        """Every policy's gaps at this target (one call: a group's members at once)."""
        reply = self.call("policy state", rgrpc.TargetStub(self.channel).GetPolicyState,
                          rpb.PolicyStateRequest(), timeout=timeout_s)
        return {s.policy: [gap_dict(g) for g in s.gaps] for s in reply.policies}

    def failover_states(self, policies: list[str], timeout_s: float) -> dict[str, str]:
        """Each policy's failover state at this target ("" none), from its List."""
        return {n: self.call("list", self.stub.List, pb.ListPointsRequest(policy=n),
                             timeout=timeout_s).failover_state for n in policies}

    def group_members(self, group: str, timeout_s: float) -> list[str]:
        """The member policies ``<group>..*`` this target keeps, sorted ([]: `group` is
        no consistency group here)."""
        return sorted(n for n in self.all_gaps(timeout_s)
                      if (split_member(n) or ("",))[0] == group)

    def call(self, what: str, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except grpc.RpcError as exc:
            raise self._error(what, exc) from None

    def _error(self, what: str, exc: grpc.RpcError) -> CdpError:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        answered = isinstance(exc, grpc.Call) and rpc.remote_error(exc, self.address).answered
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) \
                and not answered:
            return TargetError(f"target at {self.address} unreachable ({what}): {details}")
        if answered and code == grpc.StatusCode.UNAVAILABLE:
            # the target's own failure (its storage, say), not the link
            return TargetError(f"target at {self.address} failed ({what}): {details}")
        if code == grpc.StatusCode.PERMISSION_DENIED:
            return NotAuthorizedError(f"target at {self.address} ({what}): {details}")
        return TargetError(f"{what}: {details}")

    def stream(self, what: str, it: Any, quiet: bool) -> pb.RestoreDone:
        shown = 0.0
        started = time.monotonic()
        try:
            for msg in it:
                if msg.HasField("done"):
                    if shown and not quiet:
                        print(file=sys.stderr)
                    return msg.done
                now = time.monotonic()
                if not quiet and now - started > 1.0 and now - shown > PROGRESS_EVERY_S:
                    shown = now
                    pct = 100.0 * msg.bytes_done / msg.bytes_total if msg.bytes_total else 0.0
                    end = "\r" if sys.stderr.isatty() else "\n"
                    print(f"{what}: {msg.phase} {format_bytes(msg.bytes_done)} of "
                          f"{format_bytes(msg.bytes_total)} ({pct:.0f}%)", end=end,
                          file=sys.stderr, flush=True)
        except grpc.RpcError as exc:
            raise self._error(what, exc) from None
        raise TargetError(f"{what}: the target ended the stream without a result")


# ---------------------------------------------------------------- loop devices

def attach_loop(path: str, read_only: bool) -> str:
    base = ["losetup", "--find", "--show"] + (["--read-only"] if read_only else [])
    for extra in (["--direct-io=on"], []):
        done = subprocess.run([*base, *extra, path], capture_output=True, text=True,
                              check=False)
        if done.returncode == 0:
            return done.stdout.strip()
    raise CdpError(f"losetup {path}: {done.stderr.strip() or 'failed'} (needs root)")


def detach_loops(path: str) -> list[str]:
    """Detach every loop device backed by `path`; returns them."""
    done = subprocess.run(["losetup", "-j", path, "-O", "NAME", "-n"], capture_output=True,
                          text=True, check=False)
    devs = [d.strip() for d in done.stdout.splitlines() if d.strip()]
    for d in devs:
        subprocess.run(["losetup", "-d", d], capture_output=True, check=False)
    return devs



def restore_request(args: argparse.Namespace, out_dir: str = "") -> pb.RestoreRequest:
    given = [n for n, v in (("--point", args.point), ("--time", args.time),
                            ("--latest", getattr(args, "latest", False))) if v]
    if len(given) > 1:
        raise UsageError(f"{' and '.join(given)}: give only one")
    req = pb.RestoreRequest(policy=args.policy, out_dir=out_dir,
                            allow_inconsistent=args.allow_inconsistent)
    if args.point:
        req.point_id = args.point
    elif args.time:
        req.time_ns = parse_time(args.time)
    else:
        req.latest = True
    return req


def images_of(done: pb.RestoreDone, loop: bool, read_only: bool) -> list[dict[str, Any]]:
    out = []
    for img in done.images:
        d: dict[str, Any] = {"disk": img.disk, "path": img.path, "size_bytes": img.size_bytes}
        if loop:
            d["loop"] = attach_loop(img.path, read_only)
        out.append(d)
    return out


def client_for(args: argparse.Namespace, coord: Coordinator) -> TargetClient:
    return TargetClient(coord, target_address(coord, args.policy, args.target, args.timeout))
