"""Daemon lifecycle shared by every cdp process.

`main(prog, config_cls, make_daemon)` gives each daemon the same command line:

    cdp-X [--log-format text|json] [--log-level LEVEL] run --config FILE
    cdp-X check-config --config FILE

`run` installs uvloop, builds the daemon, awaits `daemon.run()` and calls
`daemon.shutdown()` on SIGTERM/SIGINT. Errors of the CdpError hierarchy end
the process with their exit code and a one-line message, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import uvloop

from cdp_common import log
from cdp_common.config import load_config
from cdp_common.errors import CdpError

C = TypeVar("C")


class Daemon(Protocol):
    async def run(self) -> None:
        """Serve until shutdown() is called; return after cleaning up."""

    async def shutdown(self) -> None:
        """Ask run() to finish (idempotent, may be called from a signal handler)."""


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="log line format on stderr (default: text)")
    parser.add_argument("--log-level", default="info",
                        choices=("debug", "info", "warning", "error"),
                        help="lowest level logged (default: info)")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("--config", "-c", required=True, help="TOML config file")
    check = sub.add_parser("check-config", help="validate a config file and exit "
                           "(0 = valid, 2 = invalid, with the field and the reason)")
    check.add_argument("--config", "-c", required=True, help="TOML config file")
    return parser


async def _serve(daemon: Daemon) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(daemon.shutdown()))
    await daemon.run()


def main(prog: str, description: str, config_cls: type[C],
         make_daemon: Callable[[C], Daemon | Awaitable[Daemon]],
         argv: list[str] | None = None) -> None:
    args = build_parser(prog, description).parse_args(argv)
    log.setup(args.log_format, args.log_level)
    logger = logging.getLogger(prog)
    try:
        config = load_config(config_cls, args.config)
        if args.command == "check-config":
            print(f"{args.config}: ok")
            return
        async def start() -> None:
            made = make_daemon(config)
            daemon: Any = await made if asyncio.iscoroutine(made) else made
            await _serve(daemon)
        uvloop.run(start())
    except CdpError as exc:
        logger.error("%s", exc)
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        pass


def start_metrics(listen: str) -> str:
    """Start the Prometheus HTTP server; returns the bound host:port ('' if off)."""
    if not listen:
        return ""
    from prometheus_client import start_http_server
    host, _, port = listen.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host)
    return f"{host}:{server.server_port}"


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None) -> None:
    live = [t for t in tasks if t is not None and not t.done()]
    for t in live:
        t.cancel()
    for t in live:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await t


def pid() -> int:
    return os.getpid()
