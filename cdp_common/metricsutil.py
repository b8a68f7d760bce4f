"""What the daemons' metric modules share."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from prometheus_client.metrics import MetricWrapperBase


def forget(metrics: Iterable[MetricWrapperBase], *labels: str) -> None:
    """Remove the series of `labels` (e.g. a policy that is gone) from each metric."""
    for metric in metrics:
        with contextlib.suppress(KeyError):
            metric.remove(*labels)
