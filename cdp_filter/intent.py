"""Write-intent regions of one policy: where a power cut may have left an image
write that neither the journal nor a dirty bit remembers.

Theory of operation
-------------------
An application write reaches the journal (append) and then the image (pwrite),
both in the page cache until a flush. A kill -9 loses neither (the kernel has
both), but a power cut may keep one and not the other: the kernel writes dirty
pages back in any order, and a trim fdatasyncs the images while the newest
journal records are still unsynced. An image block that survives without its
journal record is never shipped, and the replica would silently lack it.

So, as md's write-intent bitmap and DRBD's activity log do, the disk is cut
into regions of `region_bytes` (default 4 MiB) with one bit each, kept in a
`DirtyBitmap` file per disk:

W1  Before a write reaches the image, every region it touches has its bit set
    *durably* (`admit`: set, pwrite, one group fsync for all writers waiting).
    A region whose bit is already durable costs nothing: sequential writes pay
    one fsync per region, a hot region none.
W2  A bit is cleared (`checkpoint`, every CHECKPOINT_S) only for a region not
    written since the previous checkpoint began, and only after the journal
    (and, while tracking, the dirty bitmaps) were made durable since: its
    writes are then all remembered elsewhere. Clearing needs no fsync: a bit
    that survives a power cut set only costs a resync of its region.

After a host crash (`cdp_filter.storage.recover_intent`, at start-up, before
replay): when bits are set and the boot id differs from the one recorded at
the previous start, the host went down with the filter running, so every
region marked is marked in the dirty-block bitmaps and resynced from the
images (cdp_filter.salvage `mark_for_resync`, gap reason "power-loss").
Same boot id: the filter was only killed, the page cache kept everything and
the journal's redo covers it; the journal and images are then fsynced (what
the dead process appended may be only in the page cache) and the bits
cleared. A clean stop clears them too.

On disk (docs/FORMAT.md "Write-intent bitmap"):
    <data_dir>/intent/<policy>/<disk>.bitmap   DirtyBitmap format, block = region
    <data_dir>/intent/boot.json                {"boot_id": ...}, the last start's
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Sequence

from cdp_common import statefile
from cdp_common.errors import FormatError, StorageError
from cdp_common.fileio import OS_IO, FileIO
from cdp_filter.dirty import DirtyBitmap

log = logging.getLogger("filter.intent")

CHECKPOINT_S = 2.0
BOOT_FILE = "boot.json"
BOOT_KIND = "filter-boot"
BOOT_VERSION = 1
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"

Region = tuple[int, int]  # (disk_id, region index)


def current_boot_id() -> str:
    """This boot of the host ('' when unknown: then every unclean stop counts as a crash)."""
    try:
        with open(BOOT_ID_PATH, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def load_boot_id(directory: str, io: FileIO = OS_IO) -> str:
    """The boot id the previous start recorded ('' for none or unreadable: unknown)."""
    try:
        data = statefile.load(os.path.join(directory, BOOT_FILE), BOOT_KIND, BOOT_VERSION, io)
    except (FormatError, StorageError) as exc:
        log.warning("%s: %s; treating the last stop as a host crash", BOOT_FILE, exc)
        return ""
    value = (data or {}).get("boot_id", "")
    return value if isinstance(value, str) else ""


def save_boot_id(directory: str, boot_id: str, io: FileIO = OS_IO) -> None:
    path = os.path.join(directory, BOOT_FILE)
    try:
        io.makedirs(directory)
        statefile.save(path, BOOT_KIND, BOOT_VERSION, {"boot_id": boot_id}, io)
    except OSError as exc:
        raise StorageError(f"{path}: cannot record the boot id ({exc.strerror})") from None


class IntentLog:
    """The write-intent bitmaps of one policy's disks (see the module docstring)."""

    def __init__(self, directory: str, region_bytes: int, disks: Sequence[tuple[str, int]],
                 io: FileIO = OS_IO) -> None:
        self.directory = directory
        self.region_bytes = region_bytes
        self.io = io
        try:
            io.makedirs(directory)
        except OSError as exc:
            raise StorageError(f"write-intent bitmaps {directory}: cannot create "
                               f"({exc.strerror})") from None
        self.bitmaps = [DirtyBitmap.open(os.path.join(directory, f"{name}.bitmap"),
                                         region_bytes, size, io) for name, size in disks]
        self._unsynced: set[Region] = set()   # set in memory and file, not yet fsynced
        self._syncing: asyncio.Future[None] | None = None
        self._touched: set[Region] = set()    # written since the last checkpoint began
        self.failure: StorageError | None = None
        """The first fsync failure, kept: no later write is admitted (like the journal's)."""

    # ------------------------------------------------------------ facts

    @property
    def marked(self) -> int:
        return sum(b.count for b in self.bitmaps)

    def extents(self) -> list[tuple[int, int, int]]:
        """(disk_id, offset, length) of every region marked."""
        out = []
        for disk_id, bm in enumerate(self.bitmaps):
            b = bm.next_set(0)
            while b >= 0:
                off = b * self.region_bytes
                out.append((disk_id, off, min(self.region_bytes, bm.disk_size - off)))
                b = bm.next_set(b + 1)
        return out

    # ------------------------------------------------------------ write path (W1)

    def ready(self, disk_id: int, off: int, length: int) -> bool:
        """May a write of [off, off+length) reach the image now? Marks it written
        (W2 keeps its regions) when it may. Synchronous: call it in the same
        event-loop step as the image write."""
        bm = self.bitmaps[disk_id]
        regions = bm.block_range(off, length)
        unsynced = self._unsynced
        for r in regions:
            if not bm.is_set(r) or (unsynced and (disk_id, r) in unsynced):
                return False
        touched = self._touched
        for r in regions:
            touched.add((disk_id, r))
        return True

    async def admit(self, disk_id: int, off: int, length: int) -> None:
        """Set the bits of the regions [off, off+length) touches and return once they
        are durable. Call `ready` again afterwards (a checkpoint may run meanwhile)."""
        if self.failure is not None:
            raise self.failure
        bm = self.bitmaps[disk_id]
        mine = [(disk_id, r) for r in bm.block_range(off, length)]
        self._touched.update(mine)   # not cleared by a checkpoint while we wait
        for region in mine:
            if not bm.is_set(region[1]):
                bm.mark(region[1] * self.region_bytes, 1)
                self._unsynced.add(region)
        while any(r in self._unsynced for r in mine):
            if self._syncing is None:
                await self._sync_batch()
            else:
                await asyncio.shield(self._syncing)

    async def _sync_batch(self) -> None:
        """One fsync per bitmap with unsynced bits, for every writer waiting (group commit)."""
        batch = set(self._unsynced)
        fut = self._syncing = asyncio.get_running_loop().create_future()
        fds = sorted({self.bitmaps[d].fd for d, _ in batch})
        try:
            await asyncio.to_thread(self._fsync, fds)
        except OSError as exc:
            if self.failure is None:
                self.failure = StorageError(
                    f"write-intent bitmap {self.directory}: fsync failed ({exc.strerror}); "
                    "writes are refused until the filter restarts")
            fut.set_exception(self.failure)
            fut.exception()   # retrieved here; the waiters get it through shield
            raise self.failure from None
        except BaseException:
            fut.cancel()      # shutting down (or a simulated crash): waiters stop too
            raise
        finally:
            self._syncing = None
        self._unsynced -= batch
        fut.set_result(None)

    def _fsync(self, fds: list[int]) -> None:
        for fd in fds:
            self.io.fsync(fd)   # not bm.sync(): its flag may change on the loop meanwhile

    # ------------------------------------------------------------ clearing (W2)

    async def checkpoint(self, make_durable: Callable[[], Awaitable[None]]) -> int:
        """Clear the bits of regions not written since the last checkpoint began, once
        `make_durable()` (journal and dirty-bitmap fsyncs) returned; returns how many."""
        if not self.marked:
            self._touched = set()
            return 0
        hot, self._touched = self._touched, set()
        await make_durable()
        keep = hot | self._touched | self._unsynced
        cleared = 0
        for disk_id, bm in enumerate(self.bitmaps):
            b = bm.next_set(0)
            while b >= 0:
                if (disk_id, b) not in keep and bm.clear(b):
                    cleared += 1
                b = bm.next_set(b + 1)
        return cleared

    def clear_all(self) -> None:
        """Every write is durable elsewhere (a clean stop, or recovery done): clear, fsync."""
        for bm in self.bitmaps:
            bm.clear_all()
            bm.sync()
        self._touched = set()

    def close(self) -> None:
        for bm in self.bitmaps:
            bm.close()
