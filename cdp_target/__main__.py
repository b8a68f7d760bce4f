"""cdp-target: the target host (replicas, durable deltas, apply)."""

from __future__ import annotations

from cdp_common import daemon
from cdp_common.config import TargetConfig
from cdp_target.daemon import TargetDaemon


def main() -> None:
    daemon.main("cdp-target", "cdp target host: makes deltas durable and applies them "
                "to the replica images", TargetConfig, TargetDaemon)


if __name__ == "__main__":
    main()
