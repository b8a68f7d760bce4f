"""Verification results per restore point: what `cdpctl verify` found (pure + one file).

`cdpctl verify` restores a point to scratch space, attaches it, checks the
file system and runs the operator's script, then records the outcome here
(`RestorePoints.RecordVerification`), so that `restore-points` shows which
points were proven recoverable and how long they took to be usable (RTO), and
the target exports the newest result as metrics.

`<data_dir>/<policy>/verified.json` (statefile kind "target-verifications",
version 1): ``{"results": [{"point_id", "last_seq", "ok", "rto_s", "checks",
"detail", "time_ns"}]}``, the newest result per point, oldest point first; at
most MAX_RESULTS are kept, and results of points retention dropped go at the
next record.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from cdp_common import statefile
from cdp_common.errors import FormatError

VERIFY_FILE = "verified.json"
VERIFY_KIND = "target-verifications"
VERIFY_VERSION = 1
MAX_RESULTS = 1000
MAX_DETAIL = 2000


@dataclass(frozen=True)
class Verification:
    point_id: int
    last_seq: int
    ok: bool
    rto_s: float        # command start -> the disks restored and attached (usable)
    checks: str         # what ran, e.g. "restore,fsck,script"
    detail: str         # why it failed, or what passed
    time_ns: int


class VerifyLog:
    """The results of one policy; not thread-safe (the service serializes)."""

    def __init__(self, policy_dir: Path) -> None:
        self.path = policy_dir / VERIFY_FILE
        self.results: dict[int, Verification] = {}

    def load(self) -> None:
        data = statefile.load(self.path, VERIFY_KIND, VERIFY_VERSION)
        out: dict[int, Verification] = {}
        for r in (data or {}).get("results", []):
            try:
                v = Verification(int(r["point_id"]), int(r["last_seq"]), bool(r["ok"]),
                                 float(r["rto_s"]), str(r["checks"]), str(r["detail"]),
                                 int(r["time_ns"]))
            except (KeyError, TypeError, ValueError) as exc:
                raise FormatError(f"{self.path}: a verification result does not decode "
                                  f"({exc})") from None
            out[v.point_id] = v
        self.results = out

    def record(self, v: Verification, live_points: Iterable[int]) -> None:
        """Keep `v` as the point's newest result; drop results of points gone."""
        live = set(live_points)
        kept = {k: r for k, r in self.results.items() if k in live}
        kept[v.point_id] = Verification(**{**asdict(v), "detail": v.detail[:MAX_DETAIL]})
        newest = sorted(kept)[-MAX_RESULTS:]
        results = {k: kept[k] for k in newest}
        statefile.save(self.path, VERIFY_KIND, VERIFY_VERSION,
                       {"results": [asdict(results[k]) for k in newest]})
        self.results = results

    def newest(self) -> Verification | None:
        """The result recorded last (by time), for the metrics."""
        return max(self.results.values(), key=lambda r: r.time_ns, default=None)
