"""Prometheus metrics of cdp-target (default registry, scraped via node.metrics_listen)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

DURABLE_SEQ = Gauge("cdp_target_durable_seq", "Highest seq durable at the target.", ["policy"])
APPLIED_SEQ = Gauge("cdp_target_applied_seq", "Highest seq applied to the replicas.", ["policy"])
BYTES = Counter("cdp_target_bytes", "Delta payload bytes made durable.")
DELTAS = Counter("cdp_target_deltas", "Deltas made durable (duplicates not counted).")
APPLY_SECONDS = Histogram("cdp_target_apply_seconds", "Time to apply one delta to the replicas.",
                          buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
