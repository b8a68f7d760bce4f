"""Prometheus metrics of cdp-target (default registry, scraped via node.metrics_listen)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from cdp_common import metricsutil

DURABLE_SEQ = Gauge("cdp_target_durable_seq", "Highest seq durable at the target.", ["policy"])
APPLIED_SEQ = Gauge("cdp_target_applied_seq", "Highest seq applied to the replicas.", ["policy"])
BYTES = Counter("cdp_target_bytes", "Delta payload bytes made durable.")
DELTAS = Counter("cdp_target_deltas", "Deltas made durable (duplicates not counted).")
RESTORE_POINTS = Gauge("cdp_target_restore_points", "Restore points kept for the policy.",
                       ["policy"])
UNDO_BYTES = Gauge("cdp_target_undo_bytes", "Bytes of undo segments kept for the policy's "
                   "restore points.", ["policy"])
OPEN_GAPS = Gauge("cdp_target_open_gaps", "Gaps still open on the policy (restore points "
                  "since their begin are not consistent).", ["policy"])
VERIFY_OK = Gauge("cdp_target_verification_ok", "1 when the newest `cdpctl verify` of the "
                  "policy passed, 0 when it failed (absent: never verified).", ["policy"])
VERIFY_RTO = Gauge("cdp_target_verification_rto_seconds", "Time to usable (restored and "
                   "attached) measured by the newest `cdpctl verify` of the policy.",
                   ["policy"])
VERIFY_AGE = Gauge("cdp_target_verification_timestamp_seconds", "When the newest "
                   "`cdpctl verify` of the policy ran (Unix time).", ["policy"])
PER_POLICY = (DURABLE_SEQ, APPLIED_SEQ, RESTORE_POINTS, UNDO_BYTES, OPEN_GAPS, VERIFY_OK,
              VERIFY_RTO, VERIFY_AGE)


def forget(policy: str) -> None:
    """A purged policy's series go away (a scrape must not show a policy that is gone)."""
    metricsutil.forget(PER_POLICY, policy)


APPLY_SECONDS = Histogram("cdp_target_apply_seconds", "Time to apply one delta to the replicas.",
                          buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
