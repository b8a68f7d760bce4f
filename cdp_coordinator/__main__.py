"""`cdp-coordinator run --config FILE` / `cdp-coordinator check-config --config FILE`."""

from __future__ import annotations

from cdp_common import daemon
from cdp_common.config import CoordinatorConfig


def main() -> None:
    from cdp_coordinator.daemon import CoordinatorDaemon

    daemon.main("cdp-coordinator",
                "CDP coordinator: node registry, heartbeat leases, proxy assignment, "
                "rebinding and RPO monitoring.",
                CoordinatorConfig, CoordinatorDaemon)


if __name__ == "__main__":
    main()
