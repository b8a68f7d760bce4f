"""In-memory twin of the policy store: a `ReplicaStore` for tests of the service logic.

Theory of operation: `MemoryDisk` is what a restart keeps (the durable
counters, the committed deltas not yet applied, the replica images); a
`MemoryStore` is one "process" over it, holding only the delta being
received. Everything a call commits is durable the moment it returns, so a
crash is simply dropping the `MemoryStore` without `close()` and opening a
new one over the same disk: the partial delta is gone, every ack is kept.
The receive rules are the file store's own (cdp_target.storestate), so the
two cannot disagree; tests/unit/test_replicastore_conformance.py holds both
to the `ReplicaStore` contract (cdp_target.service).
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cdp_common.delta import Extent, decode_chunk
from cdp_common.errors import FormatError, StorageError
from cdp_target.applier import OnCorrupt
from cdp_target.deltafile import MAX_CHUNK_BYTES
from cdp_target.storestate import (
    DeltaOrderError,
    DiskSpec,
    StoreState,
    check_disks,
    check_epoch,
    classify_delta,
)


@dataclass
class MemoryDisk:
    """The durable part of one policy's in-memory store (survives a 'crash')."""

    state: StoreState = field(default_factory=StoreState)
    deltas: dict[int, tuple[int, list[Extent]]] = field(default_factory=dict)
    """Committed, unapplied deltas: last_seq -> (first_seq, extents)."""
    images: dict[int, bytearray] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class _Incoming:
    first_seq: int
    last_seq: int
    duplicate: bool
    extents: list[Extent] = field(default_factory=list)
    payload: int = 0


class MemoryStore:
    """A `ReplicaStore` (cdp_target.service) held in a `MemoryDisk`."""

    def __init__(self, name: str, disk: MemoryDisk, side_dir: Path) -> None:
        self.name = name
        self.disk = disk
        self.dir = side_dir
        self.on_corrupt: OnCorrupt | None = None
        self._incoming: _Incoming | None = None
        self._closed = False

    @property
    def durable_seq(self) -> int:
        return self.disk.state.durable_seq

    @property
    def epoch(self) -> int:
        return self.disk.state.epoch

    def snapshot(self) -> StoreState:
        with self.disk.lock:
            return self.disk.state.copy()

    def image(self, disk_id: int) -> bytes:
        """The replica image of a disk, as applied so far (for tests)."""
        with self.disk.lock:
            return bytes(self.disk.images[disk_id])

    def set_disks(self, disks: Mapping[int, DiskSpec]) -> None:
        with self.disk.lock:
            changed = check_disks(self.name, self.disk.state.disks, disks)
            self.disk.state.disks.update(changed)
            for disk_id, spec in changed.items():   # added, or grown (zeros at the end)
                image = self.disk.images.setdefault(disk_id, bytearray())
                image.extend(bytes(spec.size_bytes - len(image)))

    def open_session(self, epoch: int) -> int:
        with self.disk.lock:
            st = self.disk.state
            if check_epoch(self.name, epoch, st.epoch):
                st.epoch = epoch
            return st.durable_seq

    def note_captured(self, captured_seq: int) -> None:
        with self.disk.lock:
            st = self.disk.state
            st.captured_seq = max(st.captured_seq, captured_seq)

    # ------------------------------------------------------------ receiving

    def begin(self, first_seq: int, last_seq: int, checkpoint_id: int = 0) -> bool:
        # no restore points in memory: the checkpoint id has nowhere to go
        self._incoming = None
        fresh = classify_delta(self.name, first_seq, last_seq, self.durable_seq)
        self._incoming = _Incoming(first_seq, last_seq, duplicate=not fresh)
        return fresh

    def add_chunk(self, extents: bytes) -> list[Extent]:
        inc = self._incoming
        if inc is None:
            raise DeltaOrderError(f"policy {self.name}: chunk outside a delta")
        try:
            if len(extents) > MAX_CHUNK_BYTES:
                raise FormatError(f"delta chunk of {len(extents)} bytes is too large")
            decoded = decode_chunk(extents, self.disk.state.disk_sizes)
        except FormatError:
            self._incoming = None
            raise
        if not inc.duplicate:
            inc.extents += decoded
            inc.payload += len(extents)
        return decoded

    def commit(self, newest_time_ns: int) -> int:
        inc, self._incoming = self._incoming, None
        if inc is None:
            raise DeltaOrderError(f"policy {self.name}: commit outside a delta")
        with self.disk.lock:
            st = self.disk.state
            if not inc.duplicate:
                self.disk.deltas[inc.last_seq] = (inc.first_seq, inc.extents)
                st.durable_seq = inc.last_seq
                st.newest_time_ns = max(st.newest_time_ns, newest_time_ns)
                st.bytes_replicated += inc.payload
            return st.durable_seq

    def abort(self) -> None:
        self._incoming = None

    # ------------------------------------------------------------ apply

    def apply_pending(self, stop: Callable[[], bool] | None = None,
                      on_applied: Callable[[int, float], None] | None = None) -> int:
        with self.disk.lock:
            if self._closed:
                raise StorageError(f"policy store {self.name} is closed")
            st = self.disk.state
            for last in sorted(self.disk.deltas):
                if stop is not None and stop():
                    break
                first, extents = self.disk.deltas.pop(last)
                assert first == st.applied_seq + 1, "committed deltas chain"
                for e in extents:
                    self.disk.images[e.disk_id][e.offset:e.offset + e.length] = (
                        e.data if e.data is not None else bytes(e.length))
                st.applied_seq = last
                if on_applied is not None:
                    on_applied(last, 0.0)
            return st.applied_seq

    def close(self) -> None:
        self._incoming = None
        self._closed = True


class MemoryStores:
    """`ReplicaStores` (cdp_target.service) in memory; `side_dir` holds the side files
    (gaps.json, repair.json) of each policy, under its name."""

    def __init__(self, side_dir: Path) -> None:
        self.side_dir = side_dir
        self.disks: dict[str, MemoryDisk] = {}
        self._lock = threading.Lock()

    def existing(self) -> list[str]:
        with self._lock:
            return sorted(self.disks)

    def open(self, policy: str, disks: Mapping[int, DiskSpec] | None) -> MemoryStore:
        with self._lock:
            disk = self.disks.get(policy)
            if disk is None:
                if not disks:
                    raise StorageError(f"policy {policy}: no store and no disks to make one")
                disk = self.disks[policy] = MemoryDisk()
        side = self.side_dir / policy
        side.mkdir(parents=True, exist_ok=True)
        store = MemoryStore(policy, disk, side)
        store.set_disks(disks or {})
        return store

    def remove(self, policy: str) -> bool:
        with self._lock:
            had = self.disks.pop(policy, None) is not None
        shutil.rmtree(self.side_dir / policy, ignore_errors=True)
        return had
