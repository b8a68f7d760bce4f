"""`cdp-proxy run --config FILE` / `cdp-proxy check-config --config FILE`."""

from __future__ import annotations

from cdp_common import daemon
from cdp_common.config import ProxyConfig


def main() -> None:
    from cdp_proxy.daemon import ProxyDaemon

    daemon.main("cdp-proxy",
                "CDP proxy: cuts the write stream into restore-point intervals, compresses "
                "and encrypts them (role source), authenticates and forwards them to the "
                "target (role target), or both.",
                ProxyConfig, ProxyDaemon)


if __name__ == "__main__":
    main()
