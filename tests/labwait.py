"""Waiting on a running lab (the `lab` fixture's LabHandle) until its replica
has caught up with the source; shared by the integration tests.

Caught up means: something was captured, every captured seq is durable on the
target (and applied to the replica, when asked), and the replica's sha256 is
the one the workload's oracle expects.
"""

from __future__ import annotations

from typing import Any

from conftest import assert_eventually
from workload import sha256_file


def policy(handle: Any) -> dict[str, Any]:
    """The lab's first policy, as `cdpctl status --json` shows it."""
    return dict(handle.status()["policies"][0])


def wait_caught_up(handle: Any, expected_sha: str, timeout_s: float = 90.0,
                   applied: bool = False) -> dict[str, Any]:
    """Poll until the first disk's replica has caught up (applied too, with
    `applied`) and equals `expected_sha`; returns that policy row."""
    replica = handle.disks[0]["replica_path"]

    def caught_up() -> dict[str, Any]:
        p = policy(handle)
        assert p["captured_seq"] > 0, p
        assert p["durable_seq"] == p["captured_seq"], p
        if applied:
            assert p["applied_seq"] == p["durable_seq"], p
        assert sha256_file(replica) == expected_sha, "replica differs from the source"
        return p

    return assert_eventually(caught_up, timeout_s, 1.0,
                             "replica did not catch up with the source")
