"""The filter's FUSE mount: one file per disk under filter.mountpoint (cdp_filter.fs)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import pyfuse3
import pyfuse3.asyncio

from cdp_common.errors import StorageError
from cdp_filter import fs
from cdp_filter.policy import Disk, PolicyRuntime

pyfuse3.asyncio.enable()
log = logging.getLogger("filter.mount")

END_TIMEOUT_S = 10.0


class Mount:
    """pyfuse3 allows one mount per process; `start` it once, `stop` it once."""

    def __init__(self, mountpoint: str) -> None:
        self.mountpoint = mountpoint
        self._task: asyncio.Task[None] | None = None
        self._mounted = False
        self._stopping = False
        self.ops: fs.FilterFs | None = None

    def start(self, disks: list[Disk], runtimes: dict[str, PolicyRuntime],
              on_lost: Callable[[], Awaitable[None]]) -> None:
        """Mount and serve; `on_lost()` if the FUSE loop ends unasked (unmounted from outside)."""
        fs.prepare_mountpoint(self.mountpoint)
        ops = self.ops = fs.FilterFs(disks)
        ops.runtimes = dict(runtimes)
        try:
            pyfuse3.init(ops, self.mountpoint, fs.mount_options())
        except RuntimeError as exc:
            raise StorageError(f"filter.mountpoint: cannot mount FUSE at {self.mountpoint}: "
                               f"{exc}") from None
        self._mounted = True
        self._task = asyncio.create_task(self._main(on_lost), name="fuse")
        log.info("mounted %d disks at %s", len(disks), self.mountpoint)

    def add(self, disks: list[Disk], runtime: PolicyRuntime) -> None:
        """Attach a policy's disks at run time: they appear under the mountpoint now."""
        assert self.ops is not None
        self.ops.add(disks, runtime)
        log.info("attached %s at %s", ", ".join(d.name for d in disks), self.mountpoint,
                 extra={"policy": runtime.name})

    def hide(self, policy: str, on_gone: Callable[[], None]) -> None:
        """Take a policy's disks out of the mount; `on_gone()` once no handle is open."""
        assert self.ops is not None
        names = self.ops.hide(policy, on_gone)
        for name in names:   # the kernel's cached dentries, or lookups would still work
            pyfuse3.invalidate_entry_async(pyfuse3.ROOT_INODE, name.encode(),
                                           ignore_enoent=True)
        left = self.ops.open_handles(policy)
        if left:
            log.info("detaching %s: %d open handles left, detached when they are closed",
                     ", ".join(names), left, extra={"policy": policy})

    async def refresh(self, disk: Disk) -> None:
        """The disk's size changed: make the kernel forget the attributes it cached."""
        with contextlib.suppress(OSError):
            await asyncio.to_thread(pyfuse3.invalidate_inode, disk.inode, True)

    async def _main(self, on_lost: Callable[[], Awaitable[None]]) -> None:
        try:
            await pyfuse3.main()
        finally:
            if not self._stopping:
                log.warning("FUSE loop ended (unmounted from outside?); shutting down")
                await on_lost()

    async def stop(self) -> None:
        """End the FUSE loop and unmount (no-op if never mounted)."""
        self._stopping = True
        if not self._mounted:
            return
        with contextlib.suppress(Exception):
            pyfuse3.terminate()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), END_TIMEOUT_S)
            except (TimeoutError, Exception) as exc:
                log.warning("FUSE loop did not end cleanly: %s", exc)
        try:
            pyfuse3.close(unmount=True)
        except Exception as exc:
            log.warning("unmount failed: %s", exc)
        self._mounted = False
