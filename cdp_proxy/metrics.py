"""Prometheus metrics of cdp-proxy (process-wide, created once at import).

`role` is "source" or "target": a proxy with role = both serves both.
"""

from __future__ import annotations

import time

from prometheus_client import REGISTRY, Counter, Gauge

BYTES_IN = Counter("cdp_proxy_bytes_in", "Bytes received: record batches from the filter "
                   "(source) or frame envelopes from the source proxy (target).", ["role"])
BYTES_OUT = Counter("cdp_proxy_bytes_out", "Bytes sent: frame envelopes to the target proxy "
                    "(source) or plaintext delta chunks to the target (target).", ["role"])
POLICY_BYTES_IN = Counter("cdp_proxy_policy_bytes_in", "Bytes received per policy (as "
                          "cdp_proxy_bytes_in): the proxy's load by policy.",
                          ["role", "policy"])
RECORDS = Counter("cdp_proxy_records", "Journal records received from filters.")
DELTAS = Counter("cdp_proxy_deltas", "Deltas cut (source) or forwarded complete (target).",
                 ["role"])
INFLIGHT = Gauge("cdp_proxy_inflight_bytes", "Encoded delta bytes sent to target proxies "
                 "and not yet acked as durable, plus cut deltas waiting to be sent.")
AUTH_FAILURES = Counter("cdp_proxy_auth_failures", "Frames that failed authentication "
                        "(wrong key, tampering, replay).")
CHECKPOINTS = Counter("cdp_proxy_checkpoints", "Consistency-group checkpoint rounds: "
                      "\"marked\" (every member holds a marker) or \"abandoned\" (a member "
                      "missing, refusing or late: no group point).", ["outcome"])
SESSIONS = Gauge("cdp_proxy_sessions", "Open replication streams.", ["role"])


class ByteRate:
    """Payload bytes/s received (both roles) since the previous sample: the load a
    proxy reports in its heartbeats, for the coordinator's least-loaded choice."""

    def __init__(self) -> None:
        self._last = (time.monotonic(), self._total())

    @staticmethod
    def _total() -> float:
        return sum(REGISTRY.get_sample_value("cdp_proxy_bytes_in_total", {"role": r}) or 0.0
                   for r in ("source", "target"))

    def sample(self) -> float:
        now, total = time.monotonic(), self._total()
        then, before = self._last
        self._last = (now, total)
        return max(0.0, (total - before) / (now - then)) if now > then else 0.0
