"""Daemon lifecycle shared by every cdp process.

`main(prog, config_cls, make_daemon)` gives each daemon the same command line:

    cdp-X [--log-format text|json] [--log-level LEVEL] run --config FILE
    cdp-X check-config --config FILE

`run` installs uvloop, builds the daemon, awaits `daemon.run()` and calls
`daemon.shutdown()` on SIGTERM/SIGINT. Errors of the CdpError hierarchy end
the process with their exit code and a one-line message, never a traceback.

Under systemd (`Type=notify`, see deploy/systemd/) the lifecycle also speaks
sd_notify (cdp_common/sdnotify.py): READY=1 once the daemon's `ready` event
is set, i.e. when it serves (cdp_common.node); WATCHDOG=1 every half
WatchdogSec from the event loop; STOPPING=1 on SIGTERM/SIGINT. Shutdown has a
grace period (SHUTDOWN_GRACE_S): a daemon whose run() has not returned by
then is cancelled and the process exits with an error.

SIGHUP reloads without a restart (RELOADING=1 ... READY=1): the config file
is read and validated again (an invalid one is logged and ignored, nothing
changes); then `[log] level` is applied, every gRPC server re-reads its TLS
certificate, key and CA for new connections (cdp_common/tlsreload.py), and
the daemon's own `reload(config)` hook, if it has one, applies what else it
can (the proxy re-reads its key_file). Everything else needs a restart.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, Protocol, TypeVar

import uvloop

from cdp_common import log, memtune, sdnotify, tlsreload
from cdp_common.aio import cancel_and_wait
from cdp_common.config import load_config
from cdp_common.errors import EXIT_INTERRUPTED, EXIT_USAGE, CdpError, exit_codes_help

C = TypeVar("C")


class Daemon(Protocol):
    async def run(self) -> None:
        """Serve until shutdown() is called; return after cleaning up."""

    async def shutdown(self) -> None:
        """Ask run() to finish (idempotent, may be called from a signal handler)."""


class _Parser(argparse.ArgumentParser):
    """Usage errors exit 64, as on the one exit-code table (argparse's default is 2)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description=description, epilog=exit_codes_help(),
                     formatter_class=argparse.RawDescriptionHelpFormatter)
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


SHUTDOWN_GRACE_S = 30.0
"""After SIGTERM, how long run() may take to clean up before it is cancelled
(the units' TimeoutStopSec is longer, so systemd never has to SIGKILL)."""

_log = logging.getLogger("common.daemon")


async def _wait_ready(daemon: Daemon, run_task: asyncio.Task[None]) -> bool:
    """Wait until the daemon serves (its `ready` event); False if run() ended."""
    event = getattr(daemon, "ready", None)
    if not isinstance(event, asyncio.Event):
        await asyncio.sleep(0)
        return not run_task.done()
    waiter = asyncio.ensure_future(event.wait())
    await asyncio.wait({waiter, run_task}, return_when=asyncio.FIRST_COMPLETED)
    if not waiter.done():
        waiter.cancel()
        return False
    return True


async def _watchdog(notifier: sdnotify.Notifier, interval_s: float) -> None:
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval_s)


async def _serve(daemon: Daemon, reload: Callable[[], None] | None = None,
                 notifier: sdnotify.Notifier | None = None,
                 grace_s: float = SHUTDOWN_GRACE_S) -> None:
    notifier = notifier or sdnotify.Notifier.from_env()
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    pending: set[asyncio.Future[Any]] = set()

    def on_stop() -> None:
        if stopping.is_set():
            return
        stopping.set()
        notifier.stopping()
        fut = asyncio.ensure_future(daemon.shutdown())
        pending.add(fut)
        fut.add_done_callback(pending.discard)

    def on_hup() -> None:
        notifier.reloading()
        try:
            if reload is not None:
                reload()
        finally:
            notifier.ready("serving")

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    run_task = asyncio.create_task(daemon.run(), name="daemon-run")
    watchdog: asyncio.Task[None] | None = None
    stop_wait = asyncio.ensure_future(stopping.wait())
    try:
        if await _wait_ready(daemon, run_task) and not stopping.is_set():
            notifier.ready("serving")
            interval = notifier.watchdog_interval_s
            if interval:
                watchdog = asyncio.create_task(_watchdog(notifier, interval), name="watchdog")
        await asyncio.wait({run_task, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if not run_task.done():
            try:
                await asyncio.wait_for(asyncio.shield(run_task), grace_s)
            except TimeoutError:
                _log.error("shutdown took longer than %.0f s; cancelling", grace_s)
                run_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await run_task
                raise CdpError(f"did not shut down within {grace_s:.0f} s") from None
        elif not stopping.is_set():
            notifier.stopping()
        run_task.result()
    finally:
        stop_wait.cancel()
        await cancel_and_wait(watchdog)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        notifier.close()


def reload_config(config_cls: type[C], path: str, cli_log_level: str,
                  daemon: Daemon) -> None:
    """The SIGHUP reload: see the module docstring. Never raises."""
    try:
        config = load_config(config_cls, path)
    except CdpError as exc:
        _log.error("reload: %s; keeping the running configuration", exc)
        return
    log_cfg = getattr(config, "log", None)
    log.set_level(getattr(log_cfg, "level", "") or cli_log_level)
    try:
        n = tlsreload.reload_all()
        if n:
            _log.info("reload: TLS certificates re-read for new connections")
    except CdpError as exc:
        _log.error("reload: %s; keeping the old certificates", exc)
    # a node daemon reloads through its node (the revocation list, then its own hook)
    node = getattr(daemon, "node", None)
    hook = getattr(node, "reload", None) or getattr(daemon, "reload", None)
    if callable(hook):
        try:
            hook(config)
        except CdpError as exc:
            _log.error("reload: %s", exc)
    _log.info("reloaded %s", path)


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
        level = getattr(getattr(config, "log", None), "level", "")
        if level:
            log.set_level(level)
        memtune.tune_malloc()  # recycle MiB-sized buffers instead of page-faulting them in
        async def start() -> None:
            made = make_daemon(config)
            daemon = await made if isinstance(made, Awaitable) else made
            await _serve(daemon, lambda: reload_config(config_cls, args.config,
                                                       args.log_level, daemon))
        uvloop.run(start())
    except CdpError as exc:
        logger.error("%s", exc)
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:  # only before the loop runs; SIGINT later is a clean stop
        sys.exit(EXIT_INTERRUPTED)
