"""Prometheus metrics of cdp-filter (names: cdp_filter_<thing>_<unit>)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from cdp_common import metricsutil

WRITES = Counter("cdp_filter_writes", "Application writes captured.", ["policy"])
WRITE_BYTES = Counter("cdp_filter_write_bytes", "Bytes of application writes captured.",
                      ["policy"])
JOURNAL_BYTES = Gauge("cdp_filter_journal_bytes", "Bytes held in the write journal.",
                      ["policy"])
SHIPPED_BYTES = Counter("cdp_filter_shipped_bytes", "Journal bytes sent to the source proxy.",
                        ["policy"])
DURABLE_SEQ = Gauge("cdp_filter_durable_seq", "Highest seq acked durable by the target.",
                    ["policy"])
CAPTURED_SEQ = Gauge("cdp_filter_captured_seq", "Highest seq captured.", ["policy"])
JOURNAL_CAP = Gauge("cdp_filter_journal_cap_bytes", "journal_cap_bytes: past it the journal "
                    "overflows into dirty tracking.", ["policy"])
JOURNAL_FULL_IN = Gauge("cdp_filter_journal_full_in_seconds", "Seconds until the journal "
                        "reaches journal_cap_bytes at its steady growth (+Inf: not "
                        "filling).", ["policy"])
INTENT_REGIONS = Gauge("cdp_filter_intent_regions", "Write-intent regions marked (resynced "
                       "after a power loss).", ["policy"])
CHECKPOINT_HOLD = Histogram("cdp_filter_checkpoint_hold_seconds", "How long a consistency-"
                            "group checkpoint held the policy's new writes (hold to mark, "
                            "release or timeout).", ["policy"],
                            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25,
                                     0.5, 1.0, 2.0))
CHECKPOINT_MARKERS = Counter("cdp_filter_checkpoint_markers", "CHECKPOINT markers appended "
                             "(consistency-group checkpoints this member took part in).",
                             ["policy"])
PER_POLICY = (WRITES, WRITE_BYTES, JOURNAL_BYTES, SHIPPED_BYTES, DURABLE_SEQ, CAPTURED_SEQ,
              JOURNAL_CAP, JOURNAL_FULL_IN, INTENT_REGIONS, CHECKPOINT_HOLD, CHECKPOINT_MARKERS)


def forget(policy: str) -> None:
    """A detached policy's series go away."""
    metricsutil.forget(PER_POLICY, policy)
