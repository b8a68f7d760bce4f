"""Apply committed deltas to the replica images: redo, undo capture, quarantine, retention.

Theory of operation
-------------------
`Applier.apply_pending` redoes every committed delta with ``last_seq >
applied_seq``, in seq order. For each delta (`_apply_one`):

1. verify it (deltafile.DeltaReader: CRC and framing, before anything is used);
2. make its undo segment durable (UndoStore.before_apply) -- before the
   replica is touched, so every restore point stays restorable;
3. pwrite its data extents, punch (or write) its zero extents, then fsync
   (punched holes) or fdatasync each touched replica;
4. list the new restore point (UndoStore.after_apply), with the checkpoint id
   the delta file carries (0: none; a quarantined delta's point has none);
5. persist applied_seq (`ApplyHost.record_applied`), delete the delta file,
   run retention.

Redo is idempotent: a delta is a set of absolute extents, so applying it
twice gives the same bytes, and step 2 keeps the first capture. A crash at
any step is redone from step 1 on the next open.

A committed delta that fails verification is never applied. With an
`on_corrupt` hook (cdp_target.repair) it is reported (the hook persists the
need for a resync), moved to ``quarantine/`` and applied as an empty delta,
so the chain of restore points goes on; without one, apply stops at it with
CorruptDeltaError. Each quarantine step is redone after a crash: the file is
still in ``deltas/`` (corrupt again) or already in ``quarantine/``
(`_skip_quarantined`).

Retention (UndoStore.retain) runs after each delta and on every pass, also
when idle, so expired points go even without new data; its failures are
logged and retried, no listed point is lost meanwhile.

All file I/O goes through the host's FileIO. The caller (PolicyStore) holds
its apply lock around `apply_pending`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Protocol

from cdp_common.delta import Extent, decode_chunk
from cdp_common.errors import FormatError, StorageError
from cdp_common.fileio import FileIO
from cdp_common.fsutil import zero_range
from cdp_target.deltafile import DeltaReader, delta_files, parse_delta_name
from cdp_target.undostore import UndoStore

log = logging.getLogger("target.apply")

QUARANTINE_DIR = "quarantine"

OnCorrupt = Callable[[int, int, str], None]
"""on_corrupt(first_seq, last_seq, why): persist that [first, last] needs a resync."""


class CorruptDeltaError(StorageError):
    """A committed delta failed its check at apply (never applied)."""


def storage_error(what: str, exc: OSError) -> StorageError:
    return StorageError(f"{what}: {exc.strerror or exc}")


class ApplyHost(Protocol):
    """What the applier needs from its policy store (PolicyStore is the one host)."""

    dir: Path
    deltas_dir: Path
    io: FileIO
    undo: UndoStore

    @property
    def fds(self) -> Mapping[int, int]:
        """Replica fds by disk id, open read-write."""

    @property
    def disk_sizes(self) -> dict[int, int]:
        ...

    def record_applied(self, seq: int) -> None:
        """Persist applied_seq = max(applied_seq, seq); on StorageError it is unchanged."""


class Applier:
    """Redo committed deltas onto a host's replicas (see the module docstring)."""

    def __init__(self, host: ApplyHost) -> None:
        self.host = host
        self.on_corrupt: OnCorrupt | None = None
        """Repair hook (cdp_target.repair): when set, a committed delta that fails its
        check is reported to it (it must persist the need for a resync and the gap),
        moved to quarantine/ and applied as an empty delta; when None, apply stops
        at it with CorruptDeltaError."""

    @property
    def _name(self) -> str:
        return self.host.dir.name

    def apply_pending(self, durable: int, applied: int, stop: Callable[[], bool],
                      on_applied: Callable[[int, float], None] | None = None) -> int:
        """Apply every committed delta in (applied, durable], in order; returns applied_seq.

        `stop()` is checked between deltas; a corrupt or missing delta raises
        StorageError and is left in place, not applied.
        """
        h = self.host
        for first, last, path in delta_files(h.deltas_dir):
            if last > durable:
                break  # being committed right now
            if last <= applied:
                with contextlib.suppress(FileNotFoundError):
                    h.io.unlink(path)
                continue
            if stop():
                break
            if first != applied + 1:
                applied = self._skip_quarantined(applied, first - 1)
            if first != applied + 1:
                raise StorageError(f"policy {self._name}: delta for seqs "
                                   f"{applied + 1}..{first - 1} is missing")
            started = time.monotonic()
            try:
                self._apply_one(path, last)
            except CorruptDeltaError as exc:
                if self.on_corrupt is None:
                    raise
                self._quarantine(path, first, last, str(exc))
            applied = last
            if on_applied is not None:
                on_applied(last, time.monotonic() - started)
        if applied < durable and not stop():
            applied = self._skip_quarantined(applied, durable)
        if applied < durable and not stop():
            raise StorageError(f"policy {self._name}: deltas for seqs "
                               f"{applied + 1}..{durable} are missing")
        self.retain()   # also when idle: expired points go even without new data
        return applied

    def _apply_one(self, path: Path, last_seq: int) -> None:
        """Steps 1-5 of the module docstring for one delta."""
        h = self.host
        sizes, fds, io = h.disk_sizes, h.fds, h.io
        try:
            touched: dict[int, bool] = {}  # disk id -> hole punched (needs a full fsync)
            with DeltaReader(path, io) as reader:
                lo, newest_ns = reader.info.first_seq - 1, reader.info.newest_time_ns
                checkpoint = reader.info.checkpoint_id

                def extents() -> Iterator[Extent]:
                    for chunk in reader.chunks():
                        yield from decode_chunk(chunk, sizes)
                undo_size = h.undo.before_apply(lo, last_seq, extents, fds)
                for ext in extents():
                    fd = fds[ext.disk_id]
                    if ext.data is not None:
                        io.pwrite(fd, ext.data, ext.offset)
                        touched.setdefault(ext.disk_id, False)
                    elif zero_range(fd, ext.offset, ext.length, io):
                        touched[ext.disk_id] = True
                    else:
                        touched.setdefault(ext.disk_id, False)
            for disk_id, punched in touched.items():
                (io.fsync if punched else io.fdatasync)(fds[disk_id])
        except FormatError as exc:
            raise CorruptDeltaError(f"policy {self._name}: committed delta is corrupt, "
                                    f"not applied: {exc}") from None
        except OSError as exc:
            raise storage_error(f"policy {self._name}: applying {path.name}", exc) from None
        try:
            h.undo.after_apply(lo, last_seq, newest_ns, undo_size, checkpoint)
        except OSError as exc:
            raise storage_error(f"policy {self._name}: recording restore point {last_seq}",
                                exc) from None
        # On StorageError (e.g. ENOSPC) the delta stays (redo is idempotent) and
        # applied_seq with it, so the next pass does not delete it as "applied".
        h.record_applied(last_seq)
        try:
            io.unlink(path)
        except OSError as exc:
            log.warning("cannot delete applied delta %s: %s", path, exc,
                        extra={"policy": self._name})
        self.retain()

    # ------------------------------------------------------------ corrupt deltas

    def _quarantine(self, path: Path, first: int, last: int, why: str) -> None:
        """Report (durably, through on_corrupt), move aside, apply as empty."""
        assert self.on_corrupt is not None
        h = self.host
        self.on_corrupt(first, last, why)
        qdir = h.dir / QUARANTINE_DIR
        try:
            h.io.makedirs(qdir)
            h.io.rename(path, qdir / path.name)
            h.io.fsync_dir(qdir)
            h.io.fsync_dir(h.deltas_dir)
        except OSError as exc:
            raise storage_error(f"policy {self._name}: cannot quarantine {path.name}",
                                exc) from None
        self._apply_empty(first, last)

    def _skip_quarantined(self, applied: int, upto: int) -> int:
        """Apply as empty every quarantined delta that follows applied (through upto)."""
        qdir = self.host.dir / QUARANTINE_DIR
        if not qdir.is_dir():
            return applied
        spans = sorted(s for s in (parse_delta_name(p.name) for p in qdir.iterdir()) if s)
        for first, last in spans:
            if first == applied + 1 and last <= upto:
                self._apply_empty(first, last)
                applied = last
        return applied

    def _apply_empty(self, first: int, last: int) -> None:
        """A quarantined delta: the replica is not touched; the restore-point chain
        and applied_seq go on (the gap marks the points inconsistent)."""
        h = self.host
        lo = first - 1
        try:
            size = h.undo.before_apply(lo, last, lambda: iter(()), h.fds)
            h.undo.after_apply(lo, last, 0, size)
        except OSError as exc:
            raise storage_error(f"policy {self._name}: recording restore point {last}",
                                exc) from None
        h.record_applied(last)

    def retain(self) -> None:
        """Apply retention now; failures are logged and retried on the next pass."""
        try:
            self.host.undo.retain(self.host.disk_sizes)
        except (OSError, FormatError) as exc:
            log.warning("retention failed: %s", exc, extra={"policy": self._name})
