"""The compose test bed's scenario, run by run-testbed.sh once the bed is up.

Every step checks what the operator would check, from outside the daemons:

1. write A through the filter; the target's replica reaches the source's sha256;
   an on-demand restore point P_A is made;
   the consistency group "app" (one disk on each of the two filters, run as
   members app..filter-1 and app..filter-2): a write on filter-1, then, once
   it is acknowledged, one on filter-2; a group restore point whose checkpoint
   was taken after both is restored, and both images equal the disks byte for
   byte; `cdpctl status --json` shows the group's row, with both members, ok;
2. kill -9 the source proxy serving the policy (its process, from the host) and
   keep it down: the coordinator rebinds the policy to the other source proxy;
   write B arrives; the killed one starts again and the policy stays put
   (the bed's coordinator does not rebalance: coordinator.toml says why);
3. partition the sites past the lease (the proxies off the wan network, the
   coordinator off the DR network): `cdpctl health` must not say OK while the
   policy cannot replicate, and write C must not reach the replica; heal it:
   C arrives and health is OK again;
4. restore P_A: its image equals the disk as it was after A (not B, not C);
   restore the latest point: it equals the disk now.

SCENARIO=etcd (the etcd variant, compose.etcd.yaml: two coordinators on a
3-member etcd cluster, every node given the list of both) runs instead:

1. the leader is the one coordinator whose cdp_coordinator_leader gauge is 1;
   write A replicates;
2. the leading coordinator's container is killed with SIGKILL (its etcd member
   loses its network with it: 2 of 3 keep the quorum) and kept down: the
   standby leads; `cdpctl status` through the list of both answers, and every
   assignment keeps its source proxy, target proxy and epoch (a takeover
   rebinds nothing);
3. write B replicates, through the new leader's assignments.

Standard library only: it runs with the host's python3 and drives
docker-compose and docker. Output lines start with "[testbed]"; the exit code
is 0 when every check held, 1 when one failed (with what was seen), 2 when the
bed could not be driven.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

POLICY = "testbed"
DISK = "/run/cdp/disks/disk0"
REPLICA = f"/var/lib/cdp/target/{POLICY}/replicas/disk0.img"
RESTORES = "/var/lib/cdp/target/_restores"
CONN = ("--coordinator 198.51.100.5:7000 --ca /etc/cdp/secrets/pki/ca.pem "
        "--cert /etc/cdp/secrets/pki/cdpctl.pem --key /etc/cdp/secrets/pki/cdpctl.key")
# node id -> compose service, and where each service sits on which network
SERVICE = {"source-proxy-1": "source-proxy", "source-proxy-2": "source-proxy-2"}
WAN = {"source-proxy": "198.51.100.140", "source-proxy-2": "198.51.100.142",
       "target-proxy": "198.51.100.141"}
COORDINATOR_DR = "198.51.100.69"
# the consistency group: (compose service of the filter, member policy, disk), in
# the order of the dependent writes
GROUP = "app"
GROUP_DISKS = (("filter", "app..filter-1", "app-data"), ("filter-2", "app..filter-2", "app-log"))
LEASE_S = 3.0   # coordinator.toml keeps the default lease_ms


class Failed(Exception):
    """A check did not hold: exit 1 with what was seen."""


class Broken(Exception):
    """The bed could not be driven (docker, compose): exit 2."""


def say(msg: str) -> None:
    print(f"[testbed] {msg}", flush=True)


class Bed:
    def __init__(self, compose: list[str], ctl: str = "coordinator", conn: str = CONN) -> None:
        self.compose = compose
        self.project = compose[compose.index("-p") + 1]
        self.ctl = ctl      # the service cdpctl runs in
        self.conn = conn

    def run(self, cmd: list[str], timeout: float = 120, check: bool = True,
            ) -> subprocess.CompletedProcess[str]:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise Broken(f"{shlex.join(cmd)}: no answer in {timeout:.0f} s") from e
        if check and done.returncode != 0:
            raise Broken(f"{shlex.join(cmd)} exited {done.returncode}: "
                         f"{(done.stderr or done.stdout).strip()[-600:]}")
        return done

    def sh(self, service: str, script: str, timeout: float = 120, check: bool = True,
           ) -> subprocess.CompletedProcess[str]:
        return self.run([*self.compose, "exec", "-T", service, "sh", "-c", script],
                        timeout, check)

    def cdpctl(self, args: str, check: bool = True, timeout: float = 120,
               ) -> subprocess.CompletedProcess[str]:
        return self.sh(self.ctl, f"cdpctl {args} {self.conn}", timeout, check)

    def status(self) -> dict[str, Any]:
        return json.loads(self.cdpctl("status --json").stdout)

    def policy(self) -> dict[str, Any]:
        for p in self.status()["policies"]:
            if p["name"] == POLICY:
                return dict(p)
        raise Failed(f"policy {POLICY} is not in `cdpctl status`")

    def container(self, service: str) -> str:
        cid = self.run([*self.compose, "ps", "-q", service]).stdout.strip()
        if not cid:
            raise Broken(f"no container for service {service}")
        return cid

    def network(self, name: str) -> str:
        return f"{self.project}_{name}"

    def sha(self, service: str, path: str) -> str:
        done = self.sh(service, f"sha256sum {path} 2>/dev/null", check=False)
        return done.stdout.split()[0] if done.returncode == 0 and done.stdout else ""


def wait(what: str, cond: Callable[[], bool], timeout: float, every: float = 0.5) -> float:
    start = time.monotonic()
    while True:
        try:
            if cond():
                return time.monotonic() - start
        except (Failed, Broken, ValueError, KeyError):
            pass   # the bed is settling (a node restarting, a partition): ask again
        if time.monotonic() - start > timeout:
            raise Failed(f"{what}: not within {timeout:.0f} s")
        time.sleep(every)


def write(bed: Bed, offset_mib: int, mib: int, service: str = "filter",
          disk: str = DISK) -> str:
    """Write fresh random data through a filter; the disk's sha256 afterwards."""
    out = bed.sh(service, f"head -c {mib * 1048576} /dev/urandom > /tmp/data && "
                 f"dd if=/tmp/data of={disk} bs=1M seek={offset_mib} oflag=direct "
                 f"conv=notrunc,fsync status=none && sha256sum {disk}").stdout
    return out.split()[0]


def replicated(bed: Bed, want: str, timeout: float) -> float:
    return wait(f"replica sha256 = {want[:16]}…", lambda: bed.sha("target", REPLICA) == want,
                timeout)


def health(bed: Bed) -> tuple[int, str]:
    done = bed.cdpctl("health", check=False)
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr.strip()
    return done.returncode, last


def step_write_and_point(bed: Bed, timeout: float, write_mib: int) -> tuple[str, str]:
    sha_a = write(bed, 3, write_mib)
    took = replicated(bed, sha_a, timeout)
    say(f"write A ({write_mib} MiB): replica sha256 {sha_a[:16]}… matches after {took:.1f} s")
    point = json.loads(bed.cdpctl(f"restore-points create {POLICY} --json").stdout)
    say(f"restore point {point['id']} made after A (last seq {point['last_seq']})")
    return sha_a, str(point["id"])


def group_row(bed: Bed) -> dict[str, Any]:
    for p in bed.status()["policies"]:
        if p["name"] == GROUP:
            return dict(p)
    raise Failed(f"group {GROUP} is not in `cdpctl status`")


def step_group(bed: Bed, timeout: float) -> None:
    """Dependent writes on two filters, restored together from one group point."""
    want: dict[str, str] = {}
    for service, _member, disk in GROUP_DISKS:
        # each write starts after the one before returned (fsync'd, acknowledged)
        want[disk] = write(bed, 1, 1, service, f"/run/cdp/disks/{disk}")
    written_ns = time.time_ns()
    say(f"group {GROUP}: wrote 1 MiB on " + ", then on ".join(
        f"{s} ({d}, {want[d][:12]}…)" for s, _, d in GROUP_DISKS))
    # A checkpoint id is the source proxy's clock when its round began (the host's
    # clock: containers share it), so a point whose id is later holds both writes.
    found: list[dict[str, Any]] = []

    def newer_point() -> bool:
        points = json.loads(bed.cdpctl(f"restore-points {GROUP} --json").stdout)
        found[:] = [p for p in points if p["checkpoint_id"] > written_ns and p["members"]]
        return bool(found)
    took = wait(f"a group point of {GROUP} after the writes", newer_point, timeout)
    point = found[0]
    members = sorted(m["policy"] for m in point["members"])
    if members != sorted(m for _, m, _ in GROUP_DISKS):
        raise Failed(f"group point {point['id']} has members {members}")
    if not point["consistent"]:
        raise Failed(f"group point {point['id']} is not consistent: {point['gap']}")
    say(f"group point {point['id']} of {GROUP} ({', '.join(members)}) after "
        f"{took:.1f} s")
    out = f"{RESTORES}/group"
    doc = json.loads(bed.cdpctl(f"restore {GROUP} --point {point['id']} --out {out} --json",
                                timeout=300).stdout)
    images = {img["disk"]: img["path"] for img in doc["images"]}
    if sorted(images) != sorted(want):
        raise Failed(f"restore of group point {point['id']} wrote {sorted(images)}, "
                     f"not {sorted(want)}")
    for disk, sha in want.items():
        got = bed.sha("target", images[disk])
        if got != sha:
            raise Failed(f"restore of group point {point['id']}: {disk} sha256 "
                         f"{got or '<none>'} != the source's {sha}")
    bed.sh("target", f"rm -rf {out}")
    say(f"restore of group point {point['id']}: both images match the filters' disks")
    seen: dict[str, Any] = {}

    def row_ok() -> bool:
        seen.update(group_row(bed))
        return seen["state"] == "ok"
    try:
        wait(f"group {GROUP} ok in `cdpctl status`", row_ok, timeout)
    except Failed as e:
        raise Failed(f"{e}: {seen.get('state')} ({seen.get('reason')})") from None
    if sorted(seen["members"] or []) != members:
        raise Failed(f"the group's status row lists members {seen['members']}")
    say(f"status: group {GROUP} ok, members {', '.join(members)}, RPO lag "
        f"{seen['rpo_lag_s']:.1f} s")


def step_kill_proxy(bed: Bed, timeout: float) -> str:
    before = bed.policy()["source_proxy"]
    if before not in SERVICE:
        raise Failed(f"policy served by unknown source proxy {before!r}")
    cid = bed.container(SERVICE[before])
    pid = bed.run(["docker", "inspect", "-f", "{{.State.Pid}}", cid]).stdout.strip()
    # Kept down until the rebind: restarted at once, it would be back within
    # its lease and rightly keep the policy.
    bed.run(["docker", "update", "--restart=no", cid])
    bed.run(["kill", "-9", pid])
    killed = time.monotonic()
    say(f"killed {before} (pid {pid} on the host) with SIGKILL")
    took = wait("rebind to the other source proxy",
                lambda: bed.policy()["source_proxy"] not in ("", before), timeout)
    after = bed.policy()["source_proxy"]
    say(f"policy rebound from {before} to {after} {time.monotonic() - killed:.1f} s after "
        f"the kill (waited {took:.1f} s)")
    sha_b = write(bed, 20, 4)
    took = replicated(bed, sha_b, timeout)
    say(f"write B through {after}: replica matches after {took:.1f} s")
    bed.run(["docker", "update", "--restart=on-failure", cid])
    bed.run(["docker", "start", cid])
    wait(f"{before} back", lambda: any(n["id"] == before and n["state"] == "up"
                                       for n in bed.status()["nodes"]), timeout)
    say(f"{before} started again and registered; the policy stays on {after}")
    if bed.policy()["source_proxy"] != after:
        raise Failed(f"the policy moved again when {before} came back")
    return sha_b


def _partition(bed: Bed, cut: bool) -> None:
    verb = "disconnect" if cut else "connect"
    links = [("wan", s, ip) for s, ip in WAN.items()] + [("dr", "coordinator", COORDINATOR_DR)]
    for net, service, ip in links:
        cmd = ["docker", "network", verb]
        cmd += ["-f"] if cut else ["--ip", ip]
        bed.run([*cmd, bed.network(net), bed.container(service)])


def step_partition(bed: Bed, timeout: float) -> str:
    _partition(bed, cut=True)
    cut = time.monotonic()
    say("partitioned the sites: proxies off the wan, the coordinator off the DR network")
    try:
        sha_c = write(bed, 40, 4)
        took = wait("health to stop saying OK", lambda: health(bed)[0] != 0, 4 * LEASE_S + 30)
        code, last = health(bed)
        say(f"during the partition (after {took:.1f} s): `cdpctl health` exits {code}: {last}")
        if code == 0 or last.endswith("OK"):
            raise Failed(f"health says OK while the sites are partitioned: {last}")
        # past the lease: the DR nodes are down for the coordinator, and nothing crosses
        time.sleep(max(0.0, 2 * LEASE_S - (time.monotonic() - cut)))
        if bed.sha("target", REPLICA) == sha_c:
            raise Failed("write C reached the replica across a partition")
        say(f"write C held back at the source {time.monotonic() - cut:.1f} s into the partition")
    finally:
        _partition(bed, cut=False)
    healed = time.monotonic()
    took = replicated(bed, sha_c, timeout)
    say(f"healed: write C reached the replica {took:.1f} s after the links came back")
    wait("health OK again", lambda: health(bed)[0] == 0, timeout)
    say(f"health OK again {time.monotonic() - healed:.1f} s after healing")
    return sha_c


def step_restore(bed: Bed, point: str, sha_a: str, sha_now: str) -> None:
    for name, which, want in (("a", f"--point {point}", sha_a), ("latest", "--latest", sha_now)):
        out = f"{RESTORES}/{name}"
        doc = json.loads(bed.cdpctl(f"restore {POLICY} {which} --out {out} --json",
                                    timeout=300).stdout)
        got = bed.sha("target", f"{out}/disk0.img")
        label = f"restore of point {doc['point']['id']} ({which})"
        if got != want:
            raise Failed(f"{label}: image sha256 {got or '<none>'} != the source's {want}")
        say(f"{label}: image sha256 {got[:16]}… matches the source as it was")
        bed.sh("target", f"rm -rf {out}")


def step_final_health(bed: Bed, timeout: float) -> None:
    """Health OK at the end. The restores just before load the target's disk, so a
    lag may still be catching up: wait for OK, but show whatever was not OK."""
    first = bed.cdpctl("health", check=False)
    if first.returncode == 0:
        say(first.stdout.strip().splitlines()[-1])
        return
    say(f"health at the end exits {first.returncode}, waiting for OK:\n"
        f"{first.stdout.strip() or first.stderr.strip()}")
    t0 = time.monotonic()
    try:
        wait("health OK at the end", lambda: health(bed)[0] == 0, timeout)
    except Failed:
        status = bed.cdpctl("status", check=False)
        detail = bed.cdpctl("health", check=False)
        raise Failed(f"`cdpctl health` not OK at the end after {timeout:.0f} s:\n"
                     f"{detail.stdout.strip() or detail.stderr.strip()}\n"
                     f"--- cdpctl status ---\n{status.stdout}{status.stderr}") from None
    say(f"health OK {time.monotonic() - t0:.1f} s later")


# the etcd variant: coordinator node id -> (compose service, metrics address)
COORDINATORS = {"coordinator": ("coordinator", "198.51.100.5:9100"),
                "coordinator-b": ("coordinator-b", "198.51.100.6:9100")}
ETCD_CONN = CONN.replace("198.51.100.5:7000", "198.51.100.5:7000,198.51.100.6:7000")
LEADER_PROBE = """import sys, urllib.request
for node, address in zip(sys.argv[1::2], sys.argv[2::2]):
    try:
        text = urllib.request.urlopen(f"http://{address}/metrics", timeout=2).read().decode()
    except OSError:
        continue
    if "cdp_coordinator_leader 1.0" in text:
        print(node)
"""


def leaders(bed: Bed) -> list[str]:
    """The coordinators whose cdp_coordinator_leader gauge is 1 (asked from the filter)."""
    args = " ".join(f"{n} {m}" for n, (_, m) in COORDINATORS.items())
    done = bed.sh("filter", f"python3 -c {shlex.quote(LEADER_PROBE)} {args}", check=False)
    return done.stdout.split()


def assignments(bed: Bed) -> dict[str, tuple[str, str, int]]:
    return {p["name"]: (p["source_proxy"], p["target_proxy"], p["epoch"])
            for p in bed.status()["policies"]}


def step_etcd_takeover(bed: Bed, timeout: float, write_mib: int) -> None:
    found: list[str] = []

    def one_leader() -> bool:
        found[:] = leaders(bed)
        return len(found) == 1
    wait("exactly one leading coordinator", one_leader, timeout)
    old = found[0]
    sha_a = write(bed, 3, write_mib)
    took = replicated(bed, sha_a, timeout)
    say(f"{old} leads; write A ({write_mib} MiB): replica sha256 {sha_a[:16]}… matches "
        f"after {took:.1f} s")
    before = assignments(bed)
    cid = bed.container(COORDINATORS[old][0])
    # kept down: restarted at once, it could win the election back
    bed.run(["docker", "update", "--restart=no", cid])
    bed.run(["docker", "kill", "--signal", "KILL", cid])
    killed = time.monotonic()
    say(f"killed the leading coordinator {old} (docker kill -s KILL)")

    def other_leads() -> bool:
        found[:] = leaders(bed)
        return len(found) == 1 and found[0] != old
    wait("the standby to lead", other_leads, timeout, every=0.2)
    new = found[0]
    say(f"standby {new} leads {time.monotonic() - killed:.1f} s after the kill")
    seen: dict[str, tuple[str, str, int]] = {}

    def status_answers() -> bool:
        seen.clear()
        seen.update(assignments(bed))
        return True
    took = wait("`cdpctl status` through the list of both", status_answers, timeout)
    if seen != before:
        changed = {n: (before.get(n), seen.get(n)) for n in before.keys() | seen.keys()
                   if before.get(n) != seen.get(n)}
        raise Failed(f"the takeover changed assignments (before, after): {changed}")
    say(f"status through the list answers ({took:.1f} s); every assignment kept its proxies "
        f"and epoch ({POLICY}: epoch {seen[POLICY][2]})")
    sha_b = write(bed, 20, 4)
    took = replicated(bed, sha_b, timeout)
    say(f"write B under {new}: replica matches after {took:.1f} s")
    if assignments(bed) != before:
        raise Failed("an assignment changed after the takeover")
    say(f"after write B the assignments are still the ones {old} made")


def main() -> int:
    compose = shlex.split(os.environ.get("COMPOSE_CMD", ""))
    if "-p" not in compose:
        print("scenario.py: set COMPOSE_CMD to the docker-compose command line, "
              "with -p PROJECT and -f FILE", file=sys.stderr)
        return 2
    timeout = float(os.environ.get("TIMEOUT_S", "90"))
    write_mib = int(os.environ.get("WRITE_MIB", "8"))
    if os.environ.get("SCENARIO", "default") == "etcd":
        return run_etcd(Bed(compose, ctl="filter", conn=ETCD_CONN), timeout, write_mib)
    bed = Bed(compose)
    try:
        sha_a, point = step_write_and_point(bed, timeout, write_mib)
        step_group(bed, timeout)
        step_kill_proxy(bed, timeout)
        sha_now = step_partition(bed, timeout)
        step_restore(bed, point, sha_a, sha_now)
        step_final_health(bed, timeout)
    except Failed as e:
        print(f"[testbed] FAILED: {e}", file=sys.stderr, flush=True)
        return 1
    except Broken as e:
        print(f"[testbed] could not drive the bed: {e}", file=sys.stderr, flush=True)
        return 2
    say("all checks held")
    return 0


def run_etcd(bed: Bed, timeout: float, write_mib: int) -> int:
    try:
        step_etcd_takeover(bed, timeout, write_mib)
    except Failed as e:
        print(f"[testbed] FAILED: {e}", file=sys.stderr, flush=True)
        return 1
    except Broken as e:
        print(f"[testbed] could not drive the bed: {e}", file=sys.stderr, flush=True)
        return 2
    say("all checks held")
    return 0


if __name__ == "__main__":
    sys.exit(main())
