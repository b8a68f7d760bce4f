"""`cdpctl failover test start|list|stop POLICY`: test failovers (cdp_target.failtest).

Theory of operation: `start` asks the target for writable images of the
policy's disks at a point under --out (TestStart: a restore that the target
remembers by name) and, with --loop, attaches them as writable loop devices on
this host; replication and restore points go on untouched and writes to the
copy never reach them. `list` shows the tests the target remembers; `stop`
detaches the loop devices of a test's images on this host, then asks the
target to delete the images and forget the test. Like `restore --loop`, the
loop devices need this command to run where the target's files are.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdp_common.timefmt import iso_utc as iso
from cdpctl import lazy, targetcall
from cdpctl.state import UsageError

if TYPE_CHECKING:
    from cdp_common.pb.cdp.v1 import restore_pb2 as pb
else:   # loaded when a command runs, not for --help (cdpctl.lazy)
    pb = lazy.module("cdp_common.pb.cdp.v1.restore_pb2")

USAGE = ("expected `failover test start POLICY --out DIR`, `failover test list POLICY` or "
         "`failover test stop POLICY NAME|--all`")


def default_name(now: float | None = None) -> str:
    return time.strftime("test-%Y%m%d-%H%M%S", time.gmtime(now))


def test_dict(t: Any) -> dict[str, Any]:
    return {"name": t.name, "state": t.state, "out_dir": t.out_dir,
            "started": iso(t.started_ns) if t.started_ns else "",
            "point": {"id": t.point.id, "last_seq": t.point.last_seq,
                      "time": iso(t.point.time_ns) if t.point.time_ns else ""},
            "images": [{"disk": i.disk, "path": i.path} for i in t.images]}


def run(args: argparse.Namespace, coord: Any, words: list[str]) -> int:
    if len(words) < 2 or words[0] not in ("start", "list", "stop"):
        raise UsageError(USAGE)
    action, args.policy = words[0], words[1]
    rest = words[2:]
    if action != "start" and (args.point or args.time or args.loop or args.out or args.name
                              or args.allow_inconsistent):
        raise UsageError(f"failover test {action}: --point, --time, --out, --name, --loop and "
                         f"--allow-inconsistent go with `failover test start`")
    if action == "start" and (rest or args.all):
        raise UsageError(USAGE)
    if action == "list" and (rest or args.all):
        raise UsageError(USAGE)
    if action == "stop" and (len(rest) + bool(args.all) != 1):
        raise UsageError("failover test stop: name one test, or --all")
    if action == "start" and not args.out:
        raise UsageError("failover test start: --out DIR is needed (under the target's "
                         "restore_dir)")
    client = targetcall.TargetClient(coord, targetcall.target_address(
        coord, args.policy, args.target, args.timeout))
    try:
        if action == "start":
            return _start(args, client)
        listed = client.call("test list", client.stub.TestList,
                             pb.FailoverRequest(policy=args.policy), timeout=args.timeout)
        if action == "list":
            tests = [test_dict(t) for t in listed.tests]
            print(json.dumps({"policy": args.policy, "tests": tests}, indent=2) if args.json
                  else _render(args.policy, tests))
            return 0
        names = [t.name for t in listed.tests] if args.all else rest
        stopped = []
        for name in names:
            for t in listed.tests:
                if t.name == name:
                    detached = [d for img in t.images for d in targetcall.detach_loops(img.path)]
                    break
            else:
                detached = []
            done = client.call("test stop", client.stub.TestStop,
                               pb.TestStopRequest(policy=args.policy, name=name),
                               timeout=300)
            stopped.append({**test_dict(done), "detached": detached})
            if not args.json:
                print(f"test failover {name} of policy {args.policy} stopped: "
                      f"{len(done.images)} image(s) deleted"
                      + (f", loop devices {' '.join(detached)} detached" if detached else ""))
        if args.json:
            print(json.dumps({"policy": args.policy, "stopped": stopped}, indent=2))
        elif not names:
            print(f"no test failover of policy {args.policy} runs")
        return 0
    finally:
        client.close()


def _start(args: argparse.Namespace, client: Any) -> int:
    req = targetcall.restore_request(args, str(Path(args.out).absolute()))
    name = args.name or default_name()
    done = client.stream("test start", client.stub.TestStart(
        pb.TestStartRequest(restore=req, name=name), timeout=targetcall.RESTORE_TIMEOUT_S),
        args.json)
    images = targetcall.images_of(done, args.loop, read_only=False)
    point = targetcall.chosen_point_dict(done)
    doc = {"policy": args.policy, "name": name, "point": point, "images": images,
           "method": done.method, "seconds": round(done.seconds, 3)}
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"test failover {name} of policy {args.policy} at point {point['id']} "
          f"({point['time']}, last seq {point['last_seq']}) in {done.seconds:.2f}s "
          f"({done.method} copy); replication and restore points go on, untouched:")
    if not point["consistent"]:
        print(targetcall.inconsistent_warning(point))
    for img in images:
        print(f"  {img['disk']}: {img['path']}" + (f" -> {img['loop']} (writable)"
                                                   if "loop" in img else ""))
    print(f"stop it (deletes the copy): cdpctl failover test stop {args.policy} {name}")
    return 0


def _render(policy: str, tests: list[dict[str, Any]]) -> str:
    if not tests:
        return f"no test failover of policy {policy} runs"
    lines = []
    for t in tests:
        p = t["point"]
        lines.append(f"{t['name']}  {t['state']}  point {p['id']} ({p['time'] or '?'})  "
                     f"started {t['started']}  in {t['out_dir']}")
    return "\n".join(lines)
