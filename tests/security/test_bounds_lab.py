"""Bounds and files against a real lab (issue 10, items 6 and 7).

One lab, four attacks, each leaving the lab as it was:

(a) one Apply for a new policy with a 2^63-1-byte disk, with the lab's own
    target-proxy certificate: refused (INVALID_ARGUMENT from the size bound, or
    PERMISSION_DENIED once assignments are signed); nothing is persisted under
    the target's data dir; the target restarts after a kill and the lab policy
    still replicates (it used to never start again);
(b) a restore into a directory holding a planted ``disk0.img.partial`` symlink
    to a file outside: the outside file is unchanged and the image is written
    safely inside, 0600; an --out outside the target's restore_dir is refused
    with a clear message and no traceback;
(c) a stream that never sends its first message (Target.Apply, SourceProxy.Ship)
    is closed with DEADLINE_EXCEEDED after the first-message deadline;
(d) the target's replicas, deltas and undo segments are 0600.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from labwait import wait_caught_up
from securitylab import address_of, assert_unchanged, channel, node_tls, snapshot
from workload import MiB, Workload, sha256_file

from cdp_common.pb.cdp.v1 import replication_pb2 as rpb
from cdp_common.pb.cdp.v1 import replication_pb2_grpc as rgrpc

pytestmark = pytest.mark.timeout(240)

DISK = 64 * MiB
FIRST_MESSAGE_TIMEOUT_S = 10.0   # the [node] default


def entries(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.iterdir())


def silent_until(stop: threading.Event) -> Iterator[Any]:
    """A request stream that sends nothing until `stop` (at most 60 s)."""
    stop.wait(60)
    return
    yield  # pragma: no cover - makes this a generator


def attack_huge_disk(lab: Any, target_data: Path) -> None:
    before_top = entries(target_data)
    before = snapshot(lab)
    huge = rpb.ApplyRequest(open=rpb.ApplyOpen(policy="evil", epoch=1, disks=[
        rpb.DiskInfo(disk_id=0, name="disk0", size_bytes=2**63 - 1)]))
    with (channel(lab, address_of(lab, "target-1"), node_tls(lab, "target-proxy-1")) as ch,
          pytest.raises(grpc.RpcError) as refused):
        for _ in rgrpc.TargetStub(ch).Apply(iter([huge]), timeout=20):
            pass
    assert refused.value.code() in (grpc.StatusCode.INVALID_ARGUMENT,
                                    grpc.StatusCode.PERMISSION_DENIED), refused.value
    assert not (target_data / "evil").exists(), "the refused policy left files behind"
    assert entries(target_data) == before_top
    assert_unchanged(before, lab)
    # the restart that used to fail for good: the target runs, the policy goes on
    lab.kill("target-1")
    lab.restart("target-1")
    assert not (target_data / "evil").exists()


def attack_planted_symlink(lab: Any, work: Workload) -> None:
    restore_dir = Path(lab.info["restore_dir"])
    out = restore_dir / "job"
    out.mkdir(parents=True)
    victim = lab.dir / "outside.txt"
    victim.write_text("must stay as it is\n")
    (out / "disk0.img.partial").symlink_to(victim)
    done = lab.cli("restore", "lab", "--latest", "--out", str(out), "--json")
    assert "Traceback" not in done.stderr, done.stderr
    assert victim.read_text() == "must stay as it is\n"
    assert not victim.is_symlink() and victim.stat().st_size == len("must stay as it is\n")
    assert done.returncode == 0, done.stderr      # written safely inside, not followed
    image = out / "disk0.img"
    assert not image.is_symlink() and image.is_file()
    assert stat.S_IMODE(image.stat().st_mode) == 0o600
    assert sha256_file(image) == work.oracle_sha256()
    assert sorted(p.name for p in out.iterdir()) == ["disk0.img"]

    elsewhere = lab.dir / "elsewhere"
    refused = lab.cli("restore", "lab", "--latest", "--out", str(elsewhere))
    assert refused.returncode != 0
    assert "Traceback" not in refused.stderr, refused.stderr
    assert "outside the target's restore_dir" in refused.stderr, refused.stderr
    assert not elsewhere.exists()


def attack_silent_streams(lab: Any) -> None:
    results: dict[str, tuple[grpc.StatusCode | None, float]] = {}
    stop = threading.Event()

    def silent(name: str, address: str, cert: str, call: Any) -> None:
        started = time.monotonic()
        with channel(lab, address, node_tls(lab, cert)) as ch:
            try:
                for _ in call(ch)(silent_until(stop), timeout=45):
                    pass
                results[name] = (None, time.monotonic() - started)
            except grpc.RpcError as exc:
                results[name] = (exc.code(), time.monotonic() - started)

    threads = [
        threading.Thread(target=silent, args=(
            "apply", address_of(lab, "target-1"), "target-proxy-1",
            lambda ch: rgrpc.TargetStub(ch).Apply)),
        threading.Thread(target=silent, args=(
            "ship", address_of(lab, "source-proxy-1"), "filter-1",
            lambda ch: rgrpc.SourceProxyStub(ch).Ship)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    stop.set()
    for name in ("apply", "ship"):
        code, took = results[name]
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED, (name, code)
        assert FIRST_MESSAGE_TIMEOUT_S - 1 <= took <= FIRST_MESSAGE_TIMEOUT_S + 15, (name, took)


def check_modes(target_data: Path) -> None:
    store = target_data / "lab"
    kinds: dict[str, int] = {}
    for sub in ("replicas", "deltas", "undo"):
        for p in (store / sub).rglob("*"):
            if p.is_file():
                kinds[sub] = kinds.get(sub, 0) + 1
                assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert kinds.get("replicas") and kinds.get("undo"), kinds


def test_bounds_and_files_against_a_real_lab(lab: Any, tmp_path: Path) -> None:
    handle = lab(tmp_path / "lab", disk_size="64M")
    target_data = handle.dir / "data" / "target-1"
    work = Workload(handle.disk_path(), DISK, seed=23)
    work.write_bytes(2 * MiB)
    wait_caught_up(handle, work.oracle_sha256(), applied=True)

    attack_huge_disk(handle, target_data)
    work.write_bytes(1 * MiB)                 # the policy still replicates after the restart
    wait_caught_up(handle, work.oracle_sha256(), applied=True)

    check_modes(target_data)
    attack_planted_symlink(handle, work)
    before = snapshot(handle)
    attack_silent_streams(handle)
    assert_unchanged(before, handle)
    assert os.path.isdir(target_data / "lab")
