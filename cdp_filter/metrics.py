"""Prometheus metrics of cdp-filter (names: cdp_filter_<thing>_<unit>)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

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
