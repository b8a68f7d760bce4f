"""A consistency group across two filters (issue 12 item 2), in a lab of real
processes: the dependent-write rule and the per-filter oracle prefix.

A writer writes X_i to a disk of filter-1, waits for the write to return (the
filter has journaled it: the FUSE files are direct_io), then writes Y_i to a
disk of filter-2, without pause for WRITE_S seconds (at least MIN_PAIRS
pairs), while the group checkpoints every 0.5 s; pair i goes to block
i mod SLOTS of each disk, so checkpoints land amid the writes. Every group
restore point is then restored and read block by block: filter-1's disk must
equal the base plus exactly X_0..X_{k-1} and filter-2's exactly Y_0..Y_{m-1}
(each a prefix of its own filter's writes: the writes before its marker),
with m <= k (no Y_i without X_i) and k <= m + 1 (no X_{i+1} without Y_i,
which was acknowledged before X_{i+1} was issued).

Then the source proxy serving the group is killed: both members rebind to the
other one together and group points resume. Last, filter-2 is killed: the
group stops getting points and its status row says so (degraded or error).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import LabHandle, assert_eventually

pytestmark = [pytest.mark.root, pytest.mark.timeout(420)]

MIN_PAIRS = 1000
WRITE_S = 6.0
SLOTS = 1024
BLOCK = 4096
DISK = "16M"
GROUP = "grp"


def block(tag: bytes, i: int) -> bytes:
    head = tag + i.to_bytes(4, "little")
    return (head * (BLOCK // len(head) + 1))[:BLOCK]


def prefix_len(image: Path, tag: bytes) -> int:
    """The k for which the image is exactly the first k writes of `tag` (pair i in
    block i mod SLOTS; the newest wins); fails unless there is one."""
    data = image.read_bytes()
    newest = -1
    for s in range(SLOTS):
        b = data[s * BLOCK:(s + 1) * BLOCK]
        if b[:1] == tag:
            newest = max(newest, int.from_bytes(b[1:5], "little"))
    k = newest + 1
    for s in range(SLOTS):
        last = s + (k - 1 - s) // SLOTS * SLOTS if k > s else -1   # newest i < k in slot s
        want = block(tag, last) if last >= 0 else bytes(BLOCK)
        assert data[s * BLOCK:(s + 1) * BLOCK] == want, (
            f"{image.name}: block {s} is not what the first {k} writes leave there: "
            "not a prefix of the filter's writes")
    return k


def group_points(handle: LabHandle) -> list[dict[str, Any]]:
    done = handle.cli("restore-points", GROUP, "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    points = doc["points"] if isinstance(doc, dict) else doc
    # a group point's id is its checkpoint id: the proxy's clock (ns) at the hold
    return sorted(points, key=lambda p: p["id"])


def group_row(handle: LabHandle) -> dict[str, Any]:
    rows = {p["name"]: p for p in handle.status()["policies"]}
    assert GROUP in rows, sorted(rows)
    return rows[GROUP]


def disk_path(handle: LabHandle, filter_id: str, name: str) -> Path:
    mounts = {f["id"]: Path(f["mountpoint"]) for f in handle.info["filters"]}
    return mounts[filter_id] / name


def test_group_points_keep_the_dependent_write_rule(lab: Any, tmp_path: Path) -> None:
    handle = lab(tmp_path / "lab", disks=1, disk_size=DISK, source_proxies=2,
                 extra=("--filters", "2"))
    handle.cli("policy", "create", GROUP, "--target", "target-1",
               "--disk", f"filter-1:ga:{DISK}", "--disk", f"filter-2:gb:{DISK}",
               "--set", "rpo_interval_s=0.5", check=True)
    a, b = disk_path(handle, "filter-1", "ga"), disk_path(handle, "filter-2", "gb")
    assert_eventually(lambda: a.exists() and b.exists(), timeout_s=60,
                      message="the group's disks did not appear on the filters' mounts")
    assert_eventually(lambda: len(group_points(handle)) > 0, timeout_s=60,
                      message="no group point was made")
    fa, fb = os.open(a, os.O_WRONLY), os.open(b, os.O_WRONLY)
    pairs = 0
    try:
        end = time.monotonic() + WRITE_S
        while pairs < MIN_PAIRS or time.monotonic() < end:
            slot = pairs % SLOTS * BLOCK
            assert os.pwrite(fa, block(b"X", pairs), slot) == BLOCK
            assert os.pwrite(fb, block(b"Y", pairs), slot) == BLOCK
            pairs += 1
    finally:
        os.close(fa)
        os.close(fb)
    print(f"{pairs} pairs in {WRITE_S:.0f} s")
    done_ns = time.time_ns()
    assert_eventually(lambda: group_points(handle)[-1]["id"] > done_ns, timeout_s=60,
                      message="no group point after the last write")
    points = group_points(handle)
    seen: list[tuple[int, int]] = []
    for p in points:
        assert p["checkpoint_id"] and len(p["members"]) == 2, p
        out = Path(handle.info["restore_dir"]) / f"group-{p['id']}"
        done = handle.cli("restore", GROUP, "--point", str(p["id"]), "--out", str(out),
                          "--json", check=True)
        images = {img["disk"]: Path(img["path"]) for img in json.loads(done.stdout)["images"]}
        try:
            k, m = prefix_len(images["ga"], b"X"), prefix_len(images["gb"], b"Y")
        finally:
            for img in images.values():
                img.unlink()
        assert m <= k <= m + 1, (f"group point {p['id']}: {k} writes of filter-1 and {m} "
                                 "of filter-2 break the dependent-write rule")
        seen.append((k, m))
    print("group points (k, m):", seen)
    assert seen[-1] == (pairs, pairs), seen
    assert len({k for k, _ in seen if 0 < k < pairs}) >= 3, (
        f"the pairs were not spread over several group points: {seen}")
    assert group_row(handle)["state"] == "ok", group_row(handle)

    # The group's source proxy down: its members move together, points resume.
    serving = group_row(handle)["source_proxy"]
    killed_ns = time.time_ns()
    handle.kill(serving)
    t0 = time.monotonic()

    def members_moved() -> None:
        rows = {p["name"]: p for p in handle.status()["policies"]}
        proxies = {rows[m]["source_proxy"] for m in (f"{GROUP}..filter-1", f"{GROUP}..filter-2")}
        assert len(proxies) == 1 and serving not in proxies and "" not in proxies, proxies
    assert_eventually(members_moved, timeout_s=30, interval_s=0.2,
                      message="the group's members did not rebind together")
    print(f"group rebound in {time.monotonic() - t0:.1f} s")
    assert_eventually(lambda: group_points(handle)[-1]["id"] > killed_ns, timeout_s=60,
                      message="no group point after the rebind")

    # A member's filter down: no new group point, the group row says so.
    handle.kill("filter-2")
    last = group_points(handle)[-1]["id"]
    assert_eventually(lambda: group_row(handle)["state"] in ("degraded", "error"),
                      timeout_s=60, message="the group stayed ok with a member's filter down")
    assert group_points(handle)[-1]["id"] == last
