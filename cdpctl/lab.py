"""`cdpctl lab`: run the whole of cdp on one machine, every daemon its own process.

`up` writes keys, certificates and configs (see cdpctl.labplan for the
layout), starts the daemons in dependency order, waits for each to serve
grpc.health.v1 and for the FUSE disk files to appear, and records
everything in lab.json. lab.json is rewritten after every start, so `down`
can clean up even after a failed or interrupted `up`. `down` signals only the
PIDs it recorded, after checking that each still runs the recorded config
(a PID may have been reused).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cdp_common import assignsig, crypto, pki, rpc
from cdp_common.config import TlsConfig
from cdp_common.errors import CdpError
from cdpctl import labplan
from cdpctl.labplan import LabPlan, NodePlan
from cdpctl.state import load_state, save_state, state_path

STOP_TIMEOUT_S = 10.0
LOG_TAIL_LINES = 20

Say = Callable[[str], None]


class LabError(CdpError):
    """The lab could not be started or is in an unexpected state."""


# ---------------------------------------------------------------- processes

def free_ports(n: int, host: str = labplan.HOST) -> list[int]:
    """n distinct ports that were free a moment ago (all held open while picking)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def process_alive(pid: int, config: str | None = None) -> bool:
    """True if `pid` runs (not a zombie) and, when given, has `config` on its command line."""
    if pid <= 0:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    if stat.rpartition(")")[2].split()[0] in ("Z", "X"):
        return False
    return config is None or os.fsencode(config) in cmdline


def is_fuse_mount(path: Path) -> bool:
    target = os.path.realpath(path)
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return False
    for line in mounts:
        fields = line.split()
        if len(fields) >= 3 and fields[1].replace("\\040", " ") == target \
                and fields[2].startswith("fuse"):
            return True
    return False


def unmount_lazy(path: Path) -> str | None:
    """fusermount3 -u -z; returns an error message or None."""
    try:
        done = subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"fusermount3 -u -z {path}: {exc}"
    if done.returncode != 0:
        return f"fusermount3 -u -z {path}: {done.stderr.strip()}"
    return None


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    tail = text.splitlines()[-lines:]
    return "\n".join("    " + line for line in tail) if tail else "    (log is empty)"


def launch(module: str, config: Path, log: Path, argv: Sequence[str] = ()) -> int:
    """Start `python -m module run --config config` (or `argv`: etcd) detached, output
    appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if argv:
        binary = shutil.which(argv[0]) or next(
            (p for p in (f"/usr/bin/{argv[0]}", f"/usr/local/bin/{argv[0]}")
             if os.access(p, os.X_OK)), None)
        if binary is None:
            raise LabError(f"{argv[0]} is not installed (apt-get install etcd-server; "
                           "scripts/bootstrap.sh installs it)")
        cmd = [binary, *argv[1:]]
    else:
        cmd = [sys.executable, "-m", module, "run", "--config", str(config)]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, env=env,
                                close_fds=True)
    return proc.pid


def etcd_healthy(address: str, timeout_s: float = 1.0) -> bool:
    """etcd's /health on its client address says the member has a quorum."""
    try:
        with urllib.request.urlopen(f"http://{address}/health", timeout=timeout_s) as reply:
            return bool(json.loads(reply.read()).get("health") in ("true", True))
    except (OSError, ValueError):
        return False


def health_serving(address: str, tls: TlsConfig, timeout_s: float = 1.0) -> bool:
    channel = rpc.sync_channel(address, tls)
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=timeout_s)
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False
    finally:
        channel.close()


def _reap(pid: int) -> None:
    # Our own children would stay zombies (and look alive) until waited for.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def stop_processes(procs: list[dict[str, Any]], timeout_s: float = STOP_TIMEOUT_S,
                   say: Say = print) -> list[str]:
    """SIGTERM in the given order, wait, SIGKILL stragglers; returns ids that were running."""
    running = [p for p in procs if process_alive(int(p["pid"]), p.get("config"))]
    for p in running:
        say(f"stopping {p['id']} (pid {p['pid']})")
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(p["pid"]), signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    left = list(running)
    while left and time.monotonic() < deadline:
        for p in left:
            _reap(int(p["pid"]))
        left = [p for p in left if process_alive(int(p["pid"]), p.get("config"))]
        if left:
            time.sleep(0.1)
    for p in left:
        say(f"{p['id']} (pid {p['pid']}) did not stop within {timeout_s:.0f}s: SIGKILL")
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(p["pid"]), signal.SIGKILL)
    for p in left:
        # Identity was checked before SIGKILL; a dying process loses its cmdline
        # before it is gone, so only the pid is watched from here on.
        for _ in range(100):
            _reap(int(p["pid"]))
            if not process_alive(int(p["pid"])):
                break
            time.sleep(0.05)
    return [p["id"] for p in running]


def _ordered(procs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(procs, key=lambda p: (labplan.stop_rank(p.get("role", "")), p["id"]))


# ---------------------------------------------------------------- commands

def _prepare(plan: LabPlan) -> None:
    for d in plan.dirs:
        d.mkdir(parents=True, exist_ok=True)
    if not plan.insecure:
        ca_pem, ca_key = plan.pki / "ca.pem", plan.pki / "ca.key"
        if not (ca_pem.exists() and ca_key.exists()):
            pki.create_ca(plan.pki, name="cdp lab CA")
        for nid, (role, scope) in plan.identities().items():
            if not (plan.pki / f"{nid}.pem").exists() or not (plan.pki / f"{nid}.key").exists():
                pki.create_node_cert(ca_pem, ca_key, plan.pki, nid, [labplan.HOST, "localhost"],
                                     role=role, scope=scope)
        if not plan.signing_key.exists():
            assignsig.new_key_pair(plan.signing_key, plan.signing_pub)
    if not plan.key_file.exists():
        crypto.write_new_key(plan.key_file)
    for node in plan.nodes:
        if not node.argv:   # etcd has a command line, no config file
            node.config.write_text(node.config_text)


def _wait_ready(node: NodePlan, pid: int, tls: TlsConfig, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        _reap(pid)
        if not process_alive(pid):
            raise LabError(f"{node.id} (pid {pid}) exited during start-up; "
                           f"last lines of {node.log}:\n{log_tail(node.log)}")
        if etcd_healthy(node.address) if node.argv else health_serving(node.address, tls):
            return
        if time.monotonic() > deadline:
            raise LabError(f"{node.id} (pid {pid}) is not serving on {node.address} after "
                           f"{timeout_s:.0f}s; last lines of {node.log}:\n{log_tail(node.log)}")
        time.sleep(0.2)


def _wait_disks(plan: LabPlan, pids: dict[str, int], timeout_s: float) -> None:
    for node in plan.nodes:
        if node.role == "filter":
            _wait_disk_paths(node, pids[node.id], [d.path for d in plan.disks
                                                   if d.filter == node.id], timeout_s,
                             late=lambda missing: f"disk {missing[0]} did not appear within "
                                                  f"{timeout_s:.0f}s (is the FUSE mount up?)")


def filter_mounts(state: dict[str, Any], root: Path) -> dict[str, Path]:
    """Filter id -> its FUSE mount, from lab.json (older ones name only `mountpoint`)."""
    if state.get("filters"):
        return {f["id"]: Path(f["mountpoint"]) for f in state["filters"]}
    return {labplan.FILTER_ID: Path(state.get("mountpoint") or root / "mnt")}


def _unmount_dead(mnt: Path) -> None:
    if is_fuse_mount(mnt):
        error = unmount_lazy(mnt)
        if error:
            raise LabError(error)


def lab_up(root: Path, disks: int, disk_size_bytes: int, insecure: bool,
           timeout_s: float = 30.0, say: Say = print, source_proxies: int = 1,
           target_proxies: int = 1, topology: labplan.Topology | None = None,
           ) -> dict[str, Any]:
    root = root.absolute()
    old = load_state(root)
    if old is not None:
        alive = [p["id"] for p in old.get("processes", [])
                 if process_alive(int(p["pid"]), p.get("config"))]
        if alive:
            raise LabError(f"a lab is already running in {root} ({', '.join(alive)}); "
                           f"stop it with `cdpctl lab down --dir {root}`")
        say(f"removing the state of a stopped lab in {root}")
        state_path(root).unlink()
    topo = topology or labplan.Topology(source_proxies=source_proxies,
                                        target_proxies=target_proxies, disks_per_policy=disks)
    plan = labplan.plan_lab(root, disks, disk_size_bytes, free_ports(topo.ports_needed()),
                            insecure, topology=topo)
    for mnt in {root / "mnt", *plan.mountpoints.values()}:
        if is_fuse_mount(mnt):
            unmount_lazy(mnt)
    _prepare(plan)
    cli_tls = TlsConfig(**plan.tls(labplan.CLI_CERT))
    pids: dict[str, int] = {}
    try:
        etcd = [n for n in plan.nodes if n.argv]
        for node in etcd:   # all members first: none is healthy before a quorum runs
            say(f"starting {node.id} on {node.address}")
            pids[node.id] = launch(node.module, node.config, node.log, node.argv)
            save_state(root, plan.lab_json(pids))
        for node in plan.nodes:
            if not node.argv:
                say(f"starting {node.id} on {node.address}")
                pids[node.id] = launch(node.module, node.config, node.log)
                save_state(root, plan.lab_json(pids))
            _wait_ready(node, pids[node.id], cli_tls, timeout_s)
        _wait_disks(plan, pids, timeout_s)
    except BaseException:
        say("start-up failed; stopping what was started")
        stop_processes(_ordered(plan.lab_json(pids)["processes"]), say=say)
        for mnt in plan.mountpoints.values():
            if is_fuse_mount(mnt):
                unmount_lazy(mnt)
        with contextlib.suppress(FileNotFoundError):
            state_path(root).unlink()
        raise
    state = plan.lab_json(pids)
    save_state(root, state)
    return state


def summary(state: dict[str, Any]) -> str:
    root = state["dir"]
    disk = state["disks"][0]["path"]
    lines = [f"lab is up in {root}; coordinator at {state['coordinator']}", "", "disks:"]
    hosts = {(d.get("filter"), d.get("target")) for d in state["disks"]}
    for d in state["disks"]:
        where = f"policy {d['policy']}"
        if d.get("member", d["policy"]) != d["policy"]:
            where += f" (member {d['member']})"
        if len(hosts) > 1:
            where += f", {d['filter']} -> {d['target']}"
        lines.append(f"  {d['path']}  ({d['size_bytes']} bytes, {where}; "
                     f"replica {d['replica_path']})")
    lines += [
        "",
        "put a file system on the first disk:",
        f"  dev=$(losetup --direct-io=on -f --show {disk})",
        "  mkfs.ext4 -q $dev && mkdir -p /mnt/cdp && mount $dev /mnt/cdp",
        "",
        "check it:",
        f"  cdpctl health --lab-dir {root}",
        f"  cdpctl status --lab-dir {root}",
        f"  cdpctl lab status --dir {root}      (logs in {root}/logs/)",
        "",
        "stop it (umount and `losetup -d $dev` first):",
        f"  cdpctl lab down --dir {root}",
    ]
    return "\n".join(lines)


def lab_down(root: Path, say: Say = print, timeout_s: float = STOP_TIMEOUT_S) -> None:
    root = root.absolute()
    state = load_state(root)
    mounts = list(filter_mounts(state, root).values()) if state else [root / "mnt"]
    if state is None:
        say(f"no lab in {root} (no lab.json); nothing to stop")
    else:
        stopped = stop_processes(_ordered(state.get("processes", [])), timeout_s, say)
        if not stopped:
            say("no lab process was running")
    for mnt in mounts:
        if is_fuse_mount(mnt):
            say(f"unmounting {mnt}")
            error = unmount_lazy(mnt)
            if error:
                raise LabError(error)
    if state is not None:
        with contextlib.suppress(FileNotFoundError):
            state_path(root).unlink()
        say(f"lab in {root} is down (data, configs and logs are kept)")


def lab_status(root: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The lab.json and, per process, its entry plus `alive`."""
    state = load_state(root.absolute())
    if state is None:
        return None, []
    rows = []
    for p in state.get("processes", []):
        rows.append({**p, "alive": process_alive(int(p["pid"]), p.get("config"))})
    return state, rows


def lab_kill(root: Path, node_id: str, wait_s: float = STOP_TIMEOUT_S,
             say: Say = print) -> int:
    """SIGKILL one lab process (a crash rehearsal) and wait until it is gone.

    For the filter, its FUSE mount is left dead ("transport endpoint is not
    connected") by the kill; it is lazily unmounted so the mountpoint is a
    plain directory again and `lab start` can mount afresh. Returns the pid.
    """
    root = root.absolute()
    state = load_state(root)
    if state is None:
        raise LabError(f"no lab in {root} (no lab.json)")
    p = _lab_process(state, node_id)
    pid = int(p["pid"])
    if not process_alive(pid, p.get("config")):
        raise LabError(f"{node_id} is not running (pid {pid} is gone); "
                       f"start it with `cdpctl lab start --dir {root} {node_id}`")
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + wait_s
    # Identity was checked before the kill; a dying process loses its
    # cmdline before it is gone, so only the pid is watched from here on.
    while True:
        _reap(pid)
        if not process_alive(pid):
            break
        if time.monotonic() > deadline:
            raise LabError(f"{node_id} (pid {pid}) still exists {wait_s:.0f}s after SIGKILL "
                           "(stuck in the kernel?)")
        time.sleep(0.02)
    say(f"killed {node_id} (pid {pid}, SIGKILL)")
    if p["role"] == "filter":
        mnt = filter_mounts(state, root)[p["id"]]
        if is_fuse_mount(mnt):
            _unmount_dead(mnt)
            say(f"unmounted the dead FUSE mount {mnt}")
    return pid


def _lab_process(state: dict[str, Any], node_id: str) -> dict[str, Any]:
    for p in state["processes"]:
        if p["id"] == node_id:
            return dict(p)
    ids = ", ".join(p["id"] for p in state["processes"])
    raise LabError(f"no process {node_id!r} in the lab (known: {ids})")


def lab_restart(root: Path, node_id: str, timeout_s: float = 30.0, say: Say = print) -> int:
    """Start one lab process again with its recorded config (after a crash or a kill)."""
    root = root.absolute()
    state = load_state(root)
    if state is None:
        raise LabError(f"no lab in {root} (no lab.json)")
    for p in state["processes"]:
        if p["id"] == node_id:
            break
    else:
        ids = ", ".join(p["id"] for p in state["processes"])
        raise LabError(f"no process {node_id!r} in the lab (known: {ids})")
    if process_alive(int(p["pid"]), p.get("config")):
        raise LabError(f"{node_id} is still running (pid {p['pid']})")
    tls_doc = state.get("tls") or {}
    tls = TlsConfig(insecure=True) if tls_doc.get("insecure") else TlsConfig(**tls_doc)
    if p["role"] == "filter":
        _unmount_dead(filter_mounts(state, root)[p["id"]])
    argv = tuple(p.get("argv") or ())
    module = "" if argv else (p.get("module") or f"cdp_{p['role'].split('-')[-1]}")
    pid = launch(module, Path(p["config"]), Path(p["log"]), argv)
    p["pid"] = pid
    save_state(root, state)
    node = NodePlan(id=p["id"], role=p["role"], module=module, address=p["address"],
                    metrics_address=p["metrics_address"], config=Path(p["config"]),
                    log=Path(p["log"]), config_text="", argv=argv)
    say(f"started {node_id} (pid {pid})")
    _wait_ready(node, pid, tls, timeout_s)
    if p["role"] == "filter":
        paths = [Path(d["path"]) for d in state.get("disks", [])
                 if d.get("filter", labplan.FILTER_ID) == p["id"]]
        _wait_disk_paths(node, pid, paths,
                         timeout_s, late=lambda _missing: f"the disks of {node.id} did not "
                                                          f"appear within {timeout_s:.0f}s")
    return pid


def _wait_disk_paths(node: NodePlan, pid: int, paths: list[Path], timeout_s: float,
                     late: Callable[[list[Path]], str]) -> None:
    """The filter serves gRPC before its mount is up: wait for the disk files too.

    `late(missing)` says what did not appear when the time is up.
    """
    deadline = time.monotonic() + timeout_s
    while missing := [path for path in paths if not path.exists()]:
        _reap(pid)
        if not process_alive(pid):
            raise LabError(f"{node.id} (pid {pid}) exited before its disks appeared; "
                           f"last lines of {node.log}:\n{log_tail(node.log)}")
        if time.monotonic() > deadline:
            raise LabError(f"{late(missing)}; last lines of {node.log}:\n{log_tail(node.log)}")
        time.sleep(0.1)
