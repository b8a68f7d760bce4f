"""`cdp-filter run --config FILE`: the source-host FUSE filter."""

from __future__ import annotations

from cdp_common import daemon
from cdp_common.config import FilterConfig


def main() -> None:
    from cdp_filter.daemon import FilterDaemon

    daemon.main("cdp-filter", "cdp source-host filter: captures writes to protected disks "
                "through FUSE, journals them and ships them to the source proxy.",
                FilterConfig, FilterDaemon)


if __name__ == "__main__":
    main()
