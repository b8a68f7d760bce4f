"""Per-policy replica store of the target: receive and commit deltas, own the replicas.

Theory of operation
-------------------
A policy (consistency group) owns one directory::

    <data_dir>/<policy>/
        state.json                      durable counters (cdp_target.storestate)
        replicas/<disk name>.img        replica image per disk: the latest applied state
        deltas/<first:020d>-<last:020d>.delta   committed, not yet applied deltas
        deltas/incoming-<first:020d>-<last:020d>.tmp   the delta being received
        points.log, retention.json, undo/       restore points (cdp_target.undostore)
        quarantine/                     corrupt committed deltas (cdp_target.applier)

A delta covers the exact seq range ``[first_seq, last_seq]`` of the policy's
write stream, in the delta-file format (cdp_target.deltafile). Receiving one
is ``begin`` → ``add_chunk``* → ``commit``:

1. chunks are checked with ``cdp_common.delta.decode_chunk`` against the disk
   sizes and appended to the ``incoming-*`` temp file;
2. ``commit`` writes the trailer, fsyncs the file, renames it to its final
   name, fsyncs ``deltas/`` (DeltaWriter.finish);
3. then ``state.json`` is replaced (tmp + fsync + rename + dir fsync) with
   ``durable_seq = last_seq``. Only now may the caller ack ``last_seq``.

``apply_pending`` then redoes the committed deltas onto the replicas, with
their undo segments first (cdp_target.applier).

Invariants
- ``applied_seq <= durable_seq``; every seq in ``(applied_seq, durable_seq]``
  is in exactly one committed delta file, and those files chain without gaps.
- A delta with ``last_seq <= durable_seq`` is a duplicate: ignored, acked with
  ``durable_seq`` (idempotence). A delta whose ``first_seq != durable_seq + 1``
  is a gap: ``ProtocolError`` (cdp_target.storestate.classify_delta).
- An ``incoming-*`` file is never committed: a broken stream or a crash
  leaves it behind and ``open`` deletes it.
- Crash recovery (``open``): leftover temp files are removed; a committed delta
  file beyond ``durable_seq`` (crash between its rename and the state update)
  is rolled forward when it verifies and chains (its content was fsynced
  before the rename), else deleted (it was never acked); delta files at or
  below ``applied_seq`` (crash between the state update and the unlink) are
  deleted; then pending deltas are applied.
- Epoch fencing: ``open_session(epoch)`` refuses ``epoch < state.epoch`` and
  persists a newer epoch before anything of that session is accepted.

Every file write, fsync, rename and unlink goes through the injected FileIO
(`io`, default OS_IO), the undo store's too, so a test can crash the store at
any step or cut its power (cdp_common.fileio_sim).

All methods are blocking file I/O; the gRPC shell runs them in threads. A
receive (begin/add_chunk/commit/abort) and ``apply_pending`` may run
concurrently in two threads; the state file is updated under one lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from cdp_common.delta import Extent, decode_chunk
from cdp_common.errors import FormatError, StorageError
from cdp_common.fileio import OS_IO, FileIO
from cdp_common.names import NAME_RE
from cdp_target.applier import (
    QUARANTINE_DIR,
    Applier,
    CorruptDeltaError,
    OnCorrupt,
    storage_error,
)
from cdp_target.deltafile import (
    MAX_CHUNK_BYTES,
    DeltaReader,
    DeltaWriter,
    delta_files,
    delta_name,
)
from cdp_target.storestate import (
    STATE_FILE,
    DeltaOrderError,
    DiskMismatchError,
    DiskSpec,
    StoreState,
    check_disks,
    check_epoch,
    classify_delta,
    load_state,
    save_state,
)
from cdp_target.undostore import RETENTION_FILE, RetentionOverride, UndoStore

__all__ = ["POLICY_NAME", "QUARANTINE_DIR", "STATE_FILE", "CorruptDeltaError", "DeltaReader",
           "DiskMismatchError", "DiskSpec", "LocalStores", "PolicyStore", "StoreState",
           "delta_name"]

log = logging.getLogger("target.store")

STATE_TMP = STATE_FILE + ".tmp"
INCOMING_PREFIX = "incoming"
POLICY_NAME = NAME_RE  # policy directories are named by the one name rule


@dataclass
class _Incoming:
    first_seq: int
    last_seq: int
    duplicate: bool
    writer: DeltaWriter | None = None


class PolicyStore:
    """The durable store of one policy. See the module docstring for the contract.

    Implements `cdp_target.service.ReplicaStore` (the file-backed one).
    """

    def __init__(self, directory: Path, state: StoreState, undo: UndoStore,
                 io: FileIO = OS_IO) -> None:
        self.dir = directory
        self.deltas_dir = directory / "deltas"
        self.replicas_dir = directory / "replicas"
        self.state = state
        self.undo = undo
        self.io = io
        self.applier = Applier(self)
        self._state_lock = threading.Lock()
        self._rx_lock = threading.Lock()
        self._apply_lock = threading.Lock()
        self._incoming: _Incoming | None = None
        self._fds: dict[int, int] = {}
        self._closed = False
        self._pause = 0
        self.frozen = False
        """True after a committed failover: deltas are no longer applied."""

    @property
    def on_corrupt(self) -> OnCorrupt | None:
        """The applier's repair hook (cdp_target.applier.Applier.on_corrupt)."""
        return self.applier.on_corrupt

    @on_corrupt.setter
    def on_corrupt(self, hook: OnCorrupt | None) -> None:
        self.applier.on_corrupt = hook

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def durable_seq(self) -> int:
        return self.state.durable_seq

    @property
    def epoch(self) -> int:
        return self.state.epoch

    # ------------------------------------------------------------ open / close

    @classmethod
    def open(cls, directory: str | Path, disks: Mapping[int, DiskSpec] | None = None,
             apply: bool = True, *, io: FileIO = OS_IO,
             retention_override: RetentionOverride | None = None,
             undo: UndoStore | None = None) -> PolicyStore:
        """Open (or create) a policy directory, recover from a crash, apply pending deltas.

        `disks` (disk_id → name, size) must agree with the disks of a previous
        open; new disk ids are added. None keeps the recorded disks.
        `retention_override` is the target-wide retention (UndoStore); `undo`
        replaces the whole undo store (tests).
        """
        directory = Path(directory)
        try:
            for d in (directory, directory / "deltas", directory / "replicas"):
                io.makedirs(d)
            with contextlib.suppress(FileNotFoundError):
                io.unlink(directory / STATE_TMP)
            loaded = load_state(directory, io)
        except OSError as exc:
            raise storage_error(f"{directory}: cannot open policy store", exc) from None
        state = loaded if loaded is not None else StoreState()
        if undo is None:
            undo = UndoStore(directory, io=io, override=retention_override)
        store = cls(directory, state, undo, io)
        try:
            store._recover()
            store.set_disks(disks or {})
            if loaded is None:
                store._write_state()
            store.undo.recover(store.state.applied_seq, store.state.newest_time_ns)
            if apply:
                store.apply_pending()
        except BaseException:
            store.close()
            raise
        return store

    def close(self) -> None:
        with self._rx_lock:
            self._drop_incoming()
        with self._apply_lock:
            for fd in self._fds.values():
                with contextlib.suppress(OSError):
                    self.io.close(fd)
            self._fds.clear()
            self._closed = True

    def set_disks(self, disks: Mapping[int, DiskSpec]) -> None:
        """Check announced disks against the recorded ones, add new ones, grow grown
        ones, open replicas."""
        changed = check_disks(str(self.dir), self.state.disks, disks)
        added = {i: s for i, s in changed.items() if i not in self.state.disks}
        grown = {i: s for i, s in changed.items() if i in self.state.disks}
        with self._apply_lock:  # replicas first: a disk that cannot be made is never recorded
            for disk_id, spec in {**self.state.disks, **added}.items():
                if disk_id not in self._fds:
                    self._fds[disk_id] = self._open_replica(spec, create=disk_id in added)
            if grown:
                # The state first: a replica shorter than recorded is grown on open,
                # one longer would be refused (quarantined) as not ours.
                with self._state_lock:
                    self.state.disks.update(grown)
                    self._write_state_locked()
                for disk_id, spec in grown.items():
                    try:
                        self.io.ftruncate(self._fds[disk_id], spec.size_bytes)  # sparse
                        self.io.fsync(self._fds[disk_id])
                    except OSError as exc:
                        raise storage_error(f"{self.replica_path(disk_id)}: cannot grow to "
                                            f"{spec.size_bytes} bytes", exc) from None
                    log.info("disk %s grown to %d bytes", spec.name, spec.size_bytes,
                             extra={"policy": self.name})
        if added:
            with self._state_lock:
                self.state.disks.update(added)
                self._write_state_locked()

    def _open_replica(self, spec: DiskSpec, create: bool = False) -> int:
        """Open a disk's replica; only a disk not recorded yet (`create`) may make one:
        a recorded disk's replica was made (and fsynced) before the state named it,
        so a missing one is an error (the store is quarantined), never silent zeros."""
        path = self.replicas_dir / f"{spec.name}.img"
        io = self.io
        try:
            fd = io.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o600)
            size = os.fstat(fd).st_size
            if size < spec.size_bytes:
                io.ftruncate(fd, spec.size_bytes)  # sparse
                io.fsync(fd)
                io.fsync_dir(self.replicas_dir)
            elif size > spec.size_bytes:
                io.close(fd)
                raise StorageError(f"{path}: replica is {size} bytes, larger than the disk "
                                   f"({spec.size_bytes} bytes)")
        except OSError as exc:
            raise storage_error(f"{path}: cannot open replica", exc) from None
        return fd

    def replica_path(self, disk_id: int) -> Path:
        return self.replicas_dir / f"{self.state.disks[disk_id].name}.img"

    @property
    def disk_sizes(self) -> dict[int, int]:
        return self.state.disk_sizes

    # ------------------------------------------------------------ recovery

    def _recover(self) -> None:
        io = self.io
        changed = False
        for p in self.deltas_dir.iterdir():
            if p.name.startswith(INCOMING_PREFIX):
                log.info("discarding incomplete delta %s", p.name, extra={"policy": self.name})
                io.unlink(p)
                changed = True
        st = self.state
        for first, last, path in delta_files(self.deltas_dir):
            if last <= st.applied_seq:
                io.unlink(path)  # applied; the crash came before its unlink
                changed = True
            elif last > st.durable_seq:
                # Renamed but the state update did not happen: never acked.
                try:
                    with DeltaReader(path, io) as reader:
                        info = reader.info
                    ok = info.first_seq == first == st.durable_seq + 1 and info.last_seq == last
                except FormatError as exc:
                    log.warning("%s", exc, extra={"policy": self.name})
                    ok = False
                if ok:
                    st.durable_seq = info.last_seq
                    st.newest_time_ns = max(st.newest_time_ns, info.newest_time_ns)
                    st.bytes_replicated += info.payload_bytes
                    log.info("rolled forward committed delta %s", path.name,
                             extra={"policy": self.name, "seq": last})
                else:
                    log.warning("discarding unacked delta %s", path.name,
                                extra={"policy": self.name})
                    io.unlink(path)
                changed = True
        if changed:
            io.fsync_dir(self.deltas_dir)
            self._write_state()

    # ------------------------------------------------------------ state

    def _write_state(self) -> None:
        with self._state_lock:
            self._write_state_locked()

    def _write_state_locked(self) -> None:
        try:
            save_state(self.dir, self.state, self.io)
        except OSError as exc:
            raise storage_error(f"{self.dir / STATE_FILE}: cannot write state", exc) from None

    def record_applied(self, seq: int) -> None:
        """Persist applied_seq (for the applier); unchanged when the write fails."""
        with self._state_lock:
            before = self.state.applied_seq
            self.state.applied_seq = max(before, seq)
            try:
                self._write_state_locked()
            except StorageError:
                self.state.applied_seq = before
                raise

    def snapshot(self) -> StoreState:
        with self._state_lock:
            return self.state.copy()

    def open_session(self, epoch: int) -> int:
        """Fence older epochs, persist a newer one; returns durable_seq."""
        with self._state_lock:
            if check_epoch(self.name, epoch, self.state.epoch):
                self.state.epoch = epoch
                self._write_state_locked()
            return self.state.durable_seq

    def note_captured(self, captured_seq: int) -> None:
        """Remember the source's captured seq (persisted with the next state write)."""
        with self._state_lock:
            self.state.captured_seq = max(self.state.captured_seq, captured_seq)

    # ------------------------------------------------------------ receiving

    def begin(self, first_seq: int, last_seq: int, checkpoint_id: int = 0) -> bool:
        """Start receiving delta [first_seq, last_seq]; False if it is a duplicate.

        A duplicate's chunks are checked but not stored, and commit() returns
        durable_seq. A gap raises ProtocolError. Any delta still being
        received is discarded first. `checkpoint_id` (nonzero: the delta ends
        at that checkpoint's marker) is written into the delta file, so it is
        durable with the delta, before the ack, and its point carries it.
        """
        with self._rx_lock:
            self._drop_incoming()
            if not classify_delta(self.name, first_seq, last_seq, self.state.durable_seq):
                self._incoming = _Incoming(first_seq, last_seq, duplicate=True)
                return False
            path = self.deltas_dir / f"{INCOMING_PREFIX}-{first_seq:020d}-{last_seq:020d}.tmp"
            try:
                writer = DeltaWriter(path, first_seq, last_seq, io=self.io,
                                     checkpoint_id=checkpoint_id)
            except OSError as exc:
                raise storage_error(f"{path}: cannot create", exc) from None
            self._incoming = _Incoming(first_seq, last_seq, duplicate=False, writer=writer)
            return True

    def add_chunk(self, extents: bytes) -> list[Extent]:
        """Check one chunk of delta extents and append it; returns the decoded extents.

        Raises FormatError (bad chunk: the partial delta is discarded) or
        ProtocolError (no delta begun).
        """
        with self._rx_lock:
            inc = self._incoming
            if inc is None:
                raise DeltaOrderError(f"policy {self.name}: chunk outside a delta")
            if len(extents) > MAX_CHUNK_BYTES:
                self._drop_incoming()
                raise FormatError(f"delta chunk of {len(extents)} bytes is too large")
            try:
                decoded = decode_chunk(extents, self.disk_sizes)
            except FormatError:
                self._drop_incoming()
                raise
            if inc.writer is None:
                return decoded
            try:
                inc.writer.add(extents)
            except OSError as exc:
                self._drop_incoming()
                raise storage_error(f"{inc.writer.tmp}: cannot write", exc) from None
            return decoded

    def commit(self, newest_time_ns: int) -> int:
        """Make the delta durable and record it; returns durable_seq to ack."""
        with self._rx_lock:
            inc = self._incoming
            if inc is None:
                raise DeltaOrderError(f"policy {self.name}: commit outside a delta")
            self._incoming = None
            if inc.writer is None:
                return self.state.durable_seq
            final = self.deltas_dir / delta_name(inc.first_seq, inc.last_seq)
            try:
                inc.writer.finish(final, newest_time_ns)
            except OSError as exc:
                inc.writer.discard()
                raise storage_error(f"{final}: cannot commit delta", exc) from None
            with self._state_lock:
                st = self.state
                st.durable_seq = inc.last_seq
                st.newest_time_ns = max(st.newest_time_ns, newest_time_ns)
                st.bytes_replicated += inc.writer.payload
                self._write_state_locked()
                return st.durable_seq

    def abort(self) -> None:
        """Discard the delta being received, if any."""
        with self._rx_lock:
            self._drop_incoming()

    def _drop_incoming(self) -> None:
        inc, self._incoming = self._incoming, None
        if inc is not None and inc.writer is not None:
            inc.writer.discard()

    # ------------------------------------------------------------ apply

    def apply_pending(self, stop: Callable[[], bool] | None = None,
                      on_applied: Callable[[int, float], None] | None = None) -> int:
        """Apply every committed delta beyond applied_seq, in order; returns applied_seq.

        `stop()` is checked between deltas so a shutdown can abandon the rest
        (redo on the next open picks them up); `on_applied(last_seq, seconds)`
        is called after each delta (for metrics). A corrupt or missing delta
        raises StorageError and is left in place, not applied.
        """
        def stop_now() -> bool:  # a restore pausing apply counts as a stop
            return bool(self._pause) or (stop is not None and stop())

        with self._apply_lock:
            if self._closed:
                raise StorageError(f"policy store {self.dir} is closed")
            with self._state_lock:
                durable = self.state.durable_seq
                applied = self.state.applied_seq
            if self.frozen:
                return applied
            return self.applier.apply_pending(durable, applied, stop_now, on_applied)

    # ------------------------------------------------------------ restore points

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hold apply (and retention) still: the replica and undo segments do not change.

        An apply in progress stops after its current delta. Receiving and
        acking deltas goes on; they wait, durable, until the caller is done.
        """
        self._pause += 1
        try:
            with self._apply_lock:
                if self._closed:
                    raise StorageError(f"policy store {self.dir} is closed")
                yield
        finally:
            self._pause -= 1

    @property
    def fds(self) -> Mapping[int, int]:
        """Replica fds by disk id (use under `paused()`)."""
        return self._fds

    def reopen_replicas(self) -> None:
        """Reopen every replica image (they were replaced by rename); call under `paused()`."""
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                self.io.close(fd)
        self._fds = {i: self._open_replica(spec) for i, spec in self.state.disks.items()}


class LocalStores:
    """The policy stores under one data dir (`cdp_target.service.ReplicaStores`)."""

    def __init__(self, data_dir: Path, io: FileIO = OS_IO,
                 retention_override: RetentionOverride | None = None) -> None:
        self.data_dir = data_dir
        self.io = io
        self.retention_override = retention_override

    def existing(self) -> list[str]:
        try:
            self.io.makedirs(self.data_dir)
            return sorted(p.name for p in self.data_dir.iterdir()
                          if p.is_dir() and (p / STATE_FILE).exists()
                          and POLICY_NAME.match(p.name))
        except OSError as exc:
            raise storage_error(f"{self.data_dir}: cannot open data dir", exc) from None

    def open(self, policy: str, disks: Mapping[int, DiskSpec] | None) -> PolicyStore:
        """Open a policy's store; creating a new one that fails leaves nothing behind
        (its directory is removed), so a refused policy cannot break the next start."""
        directory = self.data_dir / policy
        new = not (directory / STATE_FILE).exists()
        existed = directory.exists()
        try:
            return PolicyStore.open(directory, disks, False, io=self.io,
                                    retention_override=self.retention_override)
        except BaseException:
            if new:
                self._discard_new(directory, existed)
            raise

    def remove(self, policy: str) -> bool:
        """Delete a closed policy store's directory (after a purge); False if none."""
        directory = self.data_dir / policy
        if not POLICY_NAME.match(policy) or not directory.is_dir():
            return False
        try:
            shutil.rmtree(directory)
            self.io.fsync_dir(self.data_dir)
        except OSError as exc:
            raise storage_error(f"{directory}: cannot delete the policy store", exc) from None
        return True

    def _discard_new(self, directory: Path, existed: bool) -> None:
        """Remove what a failed creation made: everything, or (when the directory held
        a retention.json already, cdp_target.restore_service) all but that."""
        with contextlib.suppress(OSError):
            if not existed:
                shutil.rmtree(directory)
            else:
                for p in directory.iterdir():
                    if p.name == RETENTION_FILE:
                        continue
                    if p.is_dir() and not p.is_symlink():
                        shutil.rmtree(p)
                    else:
                        p.unlink()
            self.io.fsync_dir(self.data_dir)
