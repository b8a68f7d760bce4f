"""Per-policy replica store of the target: durable deltas, replica images, state.

Theory of operation
-------------------
A policy (consistency group) owns one directory::

    <data_dir>/<policy>/
        state.json                      durable counters (below), replaced atomically
        replicas/<disk name>.img        replica image per disk: the latest applied state
        deltas/<first:020d>-<last:020d>.delta   committed, not yet applied deltas
        deltas/incoming-<first:020d>-<last:020d>.tmp   the delta being received

A delta covers the exact seq range ``[first_seq, last_seq]`` of the policy's
write stream. Receiving one is ``begin`` → ``add_chunk``* → ``commit``:

1. chunks are checked with ``cdp_common.delta.decode_chunk`` against the disk
   sizes and appended to the ``incoming-*`` temp file;
2. ``commit`` writes the trailer (with a CRC32C over the whole file), fsyncs
   the file, renames it to its final name, fsyncs ``deltas/``;
3. then ``state.json`` is replaced (tmp + fsync + rename + dir fsync) with
   ``durable_seq = last_seq``. Only now may the caller ack ``last_seq``.

``apply_pending`` then redoes every committed delta with ``last_seq >
applied_seq``, in seq order: verify its CRC, pwrite data extents, punch (or
write) zero extents, fdatasync the replicas, persist ``applied_seq`` and
delete the delta file. Redo is idempotent: a delta is a set of absolute
extents, so applying it twice gives the same bytes.

Invariants
- ``applied_seq <= durable_seq``; every seq in ``(applied_seq, durable_seq]``
  is in exactly one committed delta file, and those files chain without gaps.
- A delta with ``last_seq <= durable_seq`` is a duplicate: ignored, acked with
  ``durable_seq`` (idempotence). A delta whose ``first_seq != durable_seq + 1``
  is a gap: ``ProtocolError``.
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

Delta file format (version 1, little-endian)
--------------------------------------------
::

    header  = magic u32 0x44504443 ("CDPD") || version u8 1 || flags u8 0 ||
              reserved u16 0 || first_seq u64 || last_seq u64                 (24 bytes)
    chunk   = length u32 (≤ 256 MiB) || extents[length]
              (extents = a received DeltaChunk.extents, docs/FORMAT.md "Delta extents")
    trailer = magic u32 0x54504443 ("CDPT") || chunk_count u32 ||
              payload_bytes u64 || newest_time_ns u64 || crc32c u32           (28 bytes)

    file    = header || chunk* || trailer

``payload_bytes`` is the sum of the chunk lengths; ``crc32c`` (Castagnoli) is
computed over every byte of the file before it. A reader checks the size, both
magics, the version, the CRC, then that the chunk lengths exactly fill the
space between header and trailer and agree with ``chunk_count`` and
``payload_bytes``, before it decodes any extent.

``state.json`` (version 1): ``{"version": 1, "epoch", "durable_seq",
"applied_seq", "newest_time_ns", "bytes_replicated", "captured_seq",
"disks": {"<disk_id>": {"name", "size_bytes"}}}``.

All methods are blocking file I/O; the gRPC shell runs them in threads. A
receive (begin/add_chunk/commit/abort) and ``apply_pending`` may run
concurrently in two threads; the state file is updated under one lock.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import logging
import os
import re
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import crc32c as _crc32c

from cdp_common.delta import Extent, decode_chunk
from cdp_common.errors import FencedError, FormatError, ProtocolError, StorageError
from cdp_common.fsutil import fsync_dir, pwrite_all, write_file_atomic
from cdp_common.records import crc32c

log = logging.getLogger("target.store")

DELTA_MAGIC = 0x44504443  # b"CDPD" little-endian
TRAILER_MAGIC = 0x54504443  # b"CDPT" little-endian
DELTA_VERSION = 1
HEADER = struct.Struct("<IBBHQQ")
HEADER_SIZE = HEADER.size  # 24
CHUNK_LEN = struct.Struct("<I")
TRAILER = struct.Struct("<IIQQI")
TRAILER_SIZE = TRAILER.size  # 28
MAX_CHUNK_BYTES = 256 * 1024 * 1024
STATE_VERSION = 1

STATE_FILE = "state.json"
STATE_TMP = "state.json.tmp"
INCOMING_PREFIX = "incoming"
_DELTA_NAME = re.compile(r"^(\d{20})-(\d{20})\.delta\Z")
_DISK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
_ZERO_BLOCK = bytes(1 << 20)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


QUARANTINE_DIR = "quarantine"


class CorruptDeltaError(StorageError):
    """A committed delta failed its check at apply (never applied)."""


class DiskMismatchError(ProtocolError):
    """The disks announced for a policy contradict the disks its replicas were made for."""


@dataclass(frozen=True, slots=True)
class DiskSpec:
    name: str
    size_bytes: int


@dataclass
class StoreState:
    epoch: int = 0
    durable_seq: int = 0
    applied_seq: int = 0
    newest_time_ns: int = 0
    bytes_replicated: int = 0
    captured_seq: int = 0
    disks: dict[int, DiskSpec] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "durable_seq": self.durable_seq,
            "applied_seq": self.applied_seq,
            "newest_time_ns": self.newest_time_ns,
            "bytes_replicated": self.bytes_replicated,
            "captured_seq": self.captured_seq,
            "disks": {str(i): {"name": d.name, "size_bytes": d.size_bytes}
                      for i, d in sorted(self.disks.items())},
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> StoreState:
        try:
            if data.get("version") != STATE_VERSION:
                raise FormatError(f"{where}: unsupported state version {data.get('version')!r}")
            ints = {k: int(data[k]) for k in ("epoch", "durable_seq", "applied_seq",
                                              "newest_time_ns", "bytes_replicated",
                                              "captured_seq")}
            disks = {int(k): DiskSpec(str(v["name"]), int(v["size_bytes"]))
                     for k, v in data["disks"].items()}
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"{where}: malformed state ({exc!r})") from None
        state = cls(disks=disks, **ints)
        if state.applied_seq > state.durable_seq:
            raise FormatError(f"{where}: applied_seq {state.applied_seq} is beyond "
                              f"durable_seq {state.durable_seq}")
        return state


@dataclass(frozen=True, slots=True)
class DeltaInfo:
    """What a delta file's header and trailer say."""

    first_seq: int
    last_seq: int
    chunk_count: int
    payload_bytes: int
    newest_time_ns: int


def delta_name(first_seq: int, last_seq: int) -> str:
    return f"{first_seq:020d}-{last_seq:020d}.delta"


# ---------------------------------------------------------------- small file helpers

def _storage(what: str, exc: OSError) -> StorageError:
    return StorageError(f"{what}: {exc.strerror or exc}")


_libc: Any = None


def _punch_hole(fd: int, offset: int, length: int) -> bool:
    """fallocate(PUNCH_HOLE|KEEP_SIZE); False when the file system cannot."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int,
                                        ctypes.c_longlong, ctypes.c_longlong]
        except (OSError, AttributeError):
            _libc = False
    if _libc is False:
        return False
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


def _write_zeros(fd: int, offset: int, length: int) -> None:
    end = offset + length
    while offset < end:
        n = os.pwrite(fd, memoryview(_ZERO_BLOCK)[: min(len(_ZERO_BLOCK), end - offset)], offset)
        offset += n


# ---------------------------------------------------------------- delta file reading

class DeltaReader:
    """A verified delta file, read back one chunk at a time.

    Opening checks the CRC and the framing (a first pass over the file), so
    nothing is handed out from a corrupt file; chunks are then read one by
    one, so memory stays bounded by the largest chunk. Raises FormatError for
    a corrupt file, StorageError when it cannot be read.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._f: BinaryIO = open(path, "rb")  # noqa: SIM115 - closed by close()
        except OSError as exc:
            raise _storage(f"{path}: cannot open", exc) from None
        try:
            self.info = _verify(self._f, path)
        except OSError as exc:
            self._f.close()
            raise _storage(f"{path}: cannot read", exc) from None
        except BaseException:
            self._f.close()
            raise

    def chunks(self) -> Iterator[bytes]:
        self._f.seek(HEADER_SIZE)
        for _ in range(self.info.chunk_count):
            (length,) = CHUNK_LEN.unpack(self._f.read(CHUNK_LEN.size))
            chunk = self._f.read(length)
            if len(chunk) != length:
                raise FormatError(f"{self.path}: chunk cut short")
            yield chunk

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> DeltaReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _verify(f: BinaryIO, path: Path) -> DeltaInfo:
    size = os.fstat(f.fileno()).st_size
    if size < HEADER_SIZE + TRAILER_SIZE:
        raise FormatError(f"{path}: delta file cut short ({size} bytes)")
    f.seek(size - TRAILER_SIZE)
    tmagic, count, payload, newest, stored_crc = TRAILER.unpack(f.read(TRAILER_SIZE))
    f.seek(0)
    head = f.read(HEADER_SIZE)
    magic, version, _flags, _res, first, last = HEADER.unpack(head)
    if magic != DELTA_MAGIC or tmagic != TRAILER_MAGIC:
        raise FormatError(f"{path}: not a delta file (bad magic)")
    if version != DELTA_VERSION:
        raise FormatError(f"{path}: unsupported delta version {version}")
    crc = crc32c(head)
    remaining = size - 4 - HEADER_SIZE
    while remaining:
        block = f.read(min(remaining, 1 << 20))
        if not block:
            raise FormatError(f"{path}: delta file shrank while reading")
        crc = _crc_continue(crc, block)
        remaining -= len(block)
    if crc != stored_crc:
        raise FormatError(f"{path}: delta checksum mismatch")
    # Framing: chunk lengths must exactly fill the body.
    pos, n, total = HEADER_SIZE, 0, 0
    end = size - TRAILER_SIZE
    while pos < end:
        if end - pos < CHUNK_LEN.size:
            raise FormatError(f"{path}: chunk length cut short at byte {pos}")
        f.seek(pos)
        (length,) = CHUNK_LEN.unpack(f.read(CHUNK_LEN.size))
        if length > MAX_CHUNK_BYTES or pos + CHUNK_LEN.size + length > end:
            raise FormatError(f"{path}: bad chunk length {length} at byte {pos}")
        pos += CHUNK_LEN.size + length
        n += 1
        total += length
    if n != count or total != payload:
        raise FormatError(f"{path}: trailer says {count} chunks / {payload} bytes, "
                          f"file holds {n} / {total}")
    if first < 1 or last < first:
        raise FormatError(f"{path}: bad seq range [{first}, {last}]")
    return DeltaInfo(first, last, count, payload, newest)


def _crc_continue(crc: int, block: bytes) -> int:
    return int(_crc32c.crc32c(block, crc))


# ---------------------------------------------------------------- the store

@dataclass
class _Incoming:
    first_seq: int
    last_seq: int
    duplicate: bool
    path: Path | None = None
    file: BinaryIO | None = None
    crc: int = 0
    chunks: int = 0
    payload: int = 0


class PolicyStore:
    """The durable store of one policy. See the module docstring for the contract."""

    def __init__(self, directory: Path, state: StoreState) -> None:
        self.dir = directory
        self.deltas_dir = directory / "deltas"
        self.replicas_dir = directory / "replicas"
        self.state = state
        self._state_lock = threading.Lock()
        self._rx_lock = threading.Lock()
        self._apply_lock = threading.Lock()
        self._incoming: _Incoming | None = None
        self._fds: dict[int, int] = {}
        self._closed = False
        self._pause = 0
        self.frozen = False
        """True after a committed failover: deltas are no longer applied."""
        self.on_corrupt: Callable[[int, int, str], None] | None = None
        """Repair hook (cdp_target.repair): when set, a committed delta that fails its
        check is reported to it (it must persist the need for a resync and the gap),
        moved to quarantine/ and applied as an empty delta; when None, apply stops
        at it with CorruptDeltaError."""
        from cdp_target.undostore import UndoStore  # it builds on this module
        self.undo = UndoStore(directory)

    # ------------------------------------------------------------ open / close

    @classmethod
    def open(cls, directory: str | Path, disks: Mapping[int, DiskSpec] | None = None,
             apply: bool = True) -> PolicyStore:
        """Open (or create) a policy directory, recover from a crash, apply pending deltas.

        `disks` (disk_id → name, size) must agree with the disks of a previous
        open; new disk ids are added. None keeps the recorded disks.
        """
        directory = Path(directory)
        try:
            for d in (directory, directory / "deltas", directory / "replicas"):
                d.mkdir(parents=True, exist_ok=True)
            state_path = directory / STATE_FILE
            with contextlib.suppress(FileNotFoundError):
                (directory / STATE_TMP).unlink()
            if state_path.exists():
                try:
                    data = json.loads(state_path.read_text())
                except (ValueError, UnicodeDecodeError) as exc:
                    raise FormatError(f"{state_path}: not valid JSON ({exc})") from None
                state = StoreState.from_json(data, str(state_path))
            else:
                state = StoreState()
        except OSError as exc:
            raise _storage(f"{directory}: cannot open policy store", exc) from None
        store = cls(directory, state)
        try:
            store._recover()
            store.set_disks(disks or {})
            if not state_path.exists():
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
                    os.close(fd)
            self._fds.clear()
            self._closed = True

    def set_disks(self, disks: Mapping[int, DiskSpec]) -> None:
        """Check announced disks against the recorded ones, add new ones, open replicas."""
        for disk_id, spec in disks.items():
            if not _DISK_NAME.match(spec.name):
                raise DiskMismatchError(f"disk {disk_id}: {spec.name!r} is not a valid disk name")
            if spec.size_bytes <= 0:
                raise DiskMismatchError(f"disk {disk_id} ({spec.name}): size must be positive")
            old = self.state.disks.get(disk_id)
            if old is not None and old != spec:
                raise DiskMismatchError(
                    f"policy store {self.dir}: disk {disk_id} was {old.name!r} of "
                    f"{old.size_bytes} bytes, now announced as {spec.name!r} of "
                    f"{spec.size_bytes} bytes; resizing or renaming a protected disk "
                    f"needs a new policy or a resync")
        names = {d.name: i for i, d in self.state.disks.items()}
        for disk_id, spec in disks.items():
            if names.get(spec.name, disk_id) != disk_id:
                raise DiskMismatchError(f"disk name {spec.name!r} is already used by disk "
                                        f"{names[spec.name]}")
        added = {i: s for i, s in disks.items() if i not in self.state.disks}
        if added:
            with self._state_lock:
                self.state.disks.update(added)
                self._write_state_locked()
        with self._apply_lock:
            for disk_id, spec in self.state.disks.items():
                if disk_id not in self._fds:
                    self._fds[disk_id] = self._open_replica(spec)

    def _open_replica(self, spec: DiskSpec) -> int:
        path = self.replicas_dir / f"{spec.name}.img"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            size = os.fstat(fd).st_size
            if size < spec.size_bytes:
                os.ftruncate(fd, spec.size_bytes)  # sparse
                os.fsync(fd)
                fsync_dir(self.replicas_dir)
            elif size > spec.size_bytes:
                os.close(fd)
                raise StorageError(f"{path}: replica is {size} bytes, larger than the disk "
                                   f"({spec.size_bytes} bytes)")
        except OSError as exc:
            raise _storage(f"{path}: cannot open replica", exc) from None
        return fd

    def replica_path(self, disk_id: int) -> Path:
        return self.replicas_dir / f"{self.state.disks[disk_id].name}.img"

    @property
    def disk_sizes(self) -> dict[int, int]:
        return {i: d.size_bytes for i, d in self.state.disks.items()}

    # ------------------------------------------------------------ recovery

    def _delta_files(self) -> list[tuple[int, int, Path]]:
        out = []
        for p in self.deltas_dir.iterdir():
            m = _DELTA_NAME.match(p.name)
            if m:
                out.append((int(m.group(1)), int(m.group(2)), p))
        out.sort()
        return out

    def _recover(self) -> None:
        changed = False
        for p in self.deltas_dir.iterdir():
            if p.name.startswith(INCOMING_PREFIX):
                log.info("discarding incomplete delta %s", p.name, extra={"policy": self.dir.name})
                p.unlink()
                changed = True
        st = self.state
        for first, last, path in self._delta_files():
            if last <= st.applied_seq:
                path.unlink()  # applied; the crash came before its unlink
                changed = True
            elif last > st.durable_seq:
                # Renamed but the state update did not happen: never acked.
                try:
                    with DeltaReader(path) as reader:
                        info = reader.info
                    ok = info.first_seq == first == st.durable_seq + 1 and info.last_seq == last
                except FormatError as exc:
                    log.warning("%s", exc, extra={"policy": self.dir.name})
                    ok = False
                if ok:
                    st.durable_seq = info.last_seq
                    st.newest_time_ns = max(st.newest_time_ns, info.newest_time_ns)
                    st.bytes_replicated += info.payload_bytes
                    log.info("rolled forward committed delta %s", path.name,
                             extra={"policy": self.dir.name, "seq": last})
                else:
                    log.warning("discarding unacked delta %s", path.name,
                                extra={"policy": self.dir.name})
                    path.unlink()
                changed = True
        if changed:
            fsync_dir(self.deltas_dir)
            self._write_state()

    # ------------------------------------------------------------ state

    def _write_state(self) -> None:
        with self._state_lock:
            self._write_state_locked()

    def _write_state_locked(self) -> None:
        data = json.dumps(self.state.to_json(), indent=1).encode()
        try:
            write_file_atomic(self.dir / STATE_FILE, data, tmp=self.dir / STATE_TMP)
        except OSError as exc:
            raise _storage(f"{self.dir / STATE_FILE}: cannot write state", exc) from None

    def snapshot(self) -> StoreState:
        with self._state_lock:
            s = self.state
            return StoreState(s.epoch, s.durable_seq, s.applied_seq, s.newest_time_ns,
                              s.bytes_replicated, s.captured_seq, dict(s.disks))

    def open_session(self, epoch: int) -> int:
        """Fence older epochs, persist a newer one; returns durable_seq."""
        with self._state_lock:
            if epoch < self.state.epoch:
                raise FencedError(f"policy {self.dir.name}: epoch {epoch} is older than "
                                  f"epoch {self.state.epoch} already seen")
            if epoch > self.state.epoch:
                self.state.epoch = epoch
                self._write_state_locked()
            return self.state.durable_seq

    def note_captured(self, captured_seq: int) -> None:
        """Remember the source's captured seq (persisted with the next state write)."""
        with self._state_lock:
            self.state.captured_seq = max(self.state.captured_seq, captured_seq)

    # ------------------------------------------------------------ receiving

    def begin(self, first_seq: int, last_seq: int) -> bool:
        """Start receiving delta [first_seq, last_seq]; False if it is a duplicate.

        A duplicate's chunks are checked but not stored, and commit() returns
        durable_seq. A gap raises ProtocolError. Any delta still being
        received is discarded first.
        """
        with self._rx_lock:
            self._drop_incoming()
            if first_seq < 1 or last_seq < first_seq:
                raise ProtocolError(f"policy {self.dir.name}: bad seq range "
                                    f"[{first_seq}, {last_seq}]")
            durable = self.state.durable_seq
            if last_seq <= durable:
                self._incoming = _Incoming(first_seq, last_seq, duplicate=True)
                return False
            if first_seq != durable + 1:
                raise ProtocolError(f"policy {self.dir.name}: delta [{first_seq}, {last_seq}] "
                                    f"does not follow durable seq {durable} (gap or overlap)")
            path = self.deltas_dir / f"{INCOMING_PREFIX}-{first_seq:020d}-{last_seq:020d}.tmp"
            header = HEADER.pack(DELTA_MAGIC, DELTA_VERSION, 0, 0, first_seq, last_seq)
            try:
                f = open(path, "wb", buffering=1 << 20)  # noqa: SIM115 - kept until commit
                f.write(header)
            except OSError as exc:
                raise _storage(f"{path}: cannot create", exc) from None
            self._incoming = _Incoming(first_seq, last_seq, duplicate=False, path=path,
                                       file=f, crc=crc32c(header))
            return True

    def add_chunk(self, extents: bytes) -> list[Extent]:
        """Check one chunk of delta extents and append it; returns the decoded extents.

        Raises FormatError (bad chunk: the partial delta is discarded) or
        ProtocolError (no delta begun).
        """
        with self._rx_lock:
            inc = self._incoming
            if inc is None:
                raise ProtocolError(f"policy {self.dir.name}: chunk outside a delta")
            if len(extents) > MAX_CHUNK_BYTES:
                self._drop_incoming()
                raise FormatError(f"delta chunk of {len(extents)} bytes is too large")
            try:
                decoded = decode_chunk(extents, self.disk_sizes)
            except FormatError:
                self._drop_incoming()
                raise
            if inc.duplicate:
                return decoded
            assert inc.file is not None
            head = CHUNK_LEN.pack(len(extents))
            try:
                inc.file.write(head)
                inc.file.write(extents)
            except OSError as exc:
                self._drop_incoming()
                raise _storage(f"{inc.path}: cannot write", exc) from None
            inc.crc = _crc_continue(_crc_continue(inc.crc, head), extents)
            inc.chunks += 1
            inc.payload += len(extents)
            return decoded

    def commit(self, newest_time_ns: int) -> int:
        """Make the delta durable and record it; returns durable_seq to ack."""
        with self._rx_lock:
            inc = self._incoming
            if inc is None:
                raise ProtocolError(f"policy {self.dir.name}: commit outside a delta")
            self._incoming = None
            if inc.duplicate:
                return self.state.durable_seq
            assert inc.file is not None and inc.path is not None
            final = self.deltas_dir / delta_name(inc.first_seq, inc.last_seq)
            trailer = TRAILER.pack(TRAILER_MAGIC, inc.chunks, inc.payload, newest_time_ns, 0)
            crc = _crc_continue(inc.crc, trailer[:-4])
            try:
                with inc.file as f:
                    f.write(trailer[:-4] + crc.to_bytes(4, "little"))
                    f.flush()
                    os.fsync(f.fileno())
                os.rename(inc.path, final)
                fsync_dir(self.deltas_dir)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    inc.path.unlink()
                raise _storage(f"{final}: cannot commit delta", exc) from None
            with self._state_lock:
                st = self.state
                st.durable_seq = inc.last_seq
                st.newest_time_ns = max(st.newest_time_ns, newest_time_ns)
                st.bytes_replicated += inc.payload
                self._write_state_locked()
                return st.durable_seq

    def abort(self) -> None:
        """Discard the delta being received, if any."""
        with self._rx_lock:
            self._drop_incoming()

    def _drop_incoming(self) -> None:
        inc, self._incoming = self._incoming, None
        if inc is None or inc.duplicate:
            return
        assert inc.file is not None and inc.path is not None
        with contextlib.suppress(OSError):
            inc.file.close()
        with contextlib.suppress(OSError):
            inc.path.unlink()

    # ------------------------------------------------------------ apply

    def apply_pending(self, stop: Callable[[], bool] | None = None,
                      on_applied: Callable[[int, float], None] | None = None) -> int:
        """Apply every committed delta beyond applied_seq, in order; returns applied_seq.

        `stop()` is checked between deltas so a shutdown can abandon the rest
        (redo on the next open picks them up); `on_applied(last_seq, seconds)`
        is called after each delta (for metrics). A corrupt or missing delta
        raises StorageError and is left in place, not applied.
        """
        user_stop = stop

        def stop_now() -> bool:  # a restore pausing apply counts as a stop
            return bool(self._pause) or (user_stop is not None and user_stop())

        stop = stop_now
        with self._apply_lock:
            if self._closed:
                raise StorageError(f"policy store {self.dir} is closed")
            with self._state_lock:
                durable = self.state.durable_seq
                applied = self.state.applied_seq
            if self.frozen:
                return applied
            for first, last, path in self._delta_files():
                if last > durable:
                    break  # being committed right now
                if last <= applied:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                    continue
                if stop is not None and stop():
                    break
                if first != applied + 1:
                    applied = self._skip_quarantined(applied, first - 1)
                if first != applied + 1:
                    raise StorageError(f"policy {self.dir.name}: delta for seqs "
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
            if applied < durable and (stop is None or not stop()):
                applied = self._skip_quarantined(applied, durable)
            if applied < durable and (stop is None or not stop()):
                raise StorageError(f"policy {self.dir.name}: deltas for seqs "
                                   f"{applied + 1}..{durable} are missing")
            self._retain()   # also when idle: expired points go even without new data
            return applied

    def _apply_one(self, path: Path, last_seq: int) -> None:
        """Redo one delta onto the replicas, then persist applied_seq and delete it.

        Kept separate so that undo segments (saving the bytes about to be
        overwritten) can be inserted here later.
        """
        try:
            touched: dict[int, bool] = {}  # disk id -> hole punched (needs a full fsync)
            with DeltaReader(path) as reader:
                lo, newest_ns = reader.info.first_seq - 1, reader.info.newest_time_ns

                def extents() -> Iterator[Extent]:
                    for chunk in reader.chunks():
                        yield from decode_chunk(chunk, self.disk_sizes)
                # Undo first (durable), then the replica (cdp_target.undostore).
                undo_size = self.undo.before_apply(lo, last_seq, extents, self._fds)
                for chunk in reader.chunks():
                    for ext in decode_chunk(chunk, self.disk_sizes):
                        fd = self._fds[ext.disk_id]
                        if ext.data is not None:
                            pwrite_all(fd, ext.data, ext.offset)
                            touched.setdefault(ext.disk_id, False)
                        elif _punch_hole(fd, ext.offset, ext.length):
                            touched[ext.disk_id] = True
                        else:
                            _write_zeros(fd, ext.offset, ext.length)
                            touched.setdefault(ext.disk_id, False)
            for disk_id, punched in touched.items():
                (os.fsync if punched else os.fdatasync)(self._fds[disk_id])
        except FormatError as exc:
            raise CorruptDeltaError(f"policy {self.dir.name}: committed delta is corrupt, "
                                    f"not applied: {exc}") from None
        except OSError as exc:
            raise _storage(f"policy {self.dir.name}: applying {path.name}", exc) from None
        try:
            self.undo.after_apply(lo, last_seq, newest_ns, undo_size)
        except OSError as exc:
            raise _storage(f"policy {self.dir.name}: recording restore point {last_seq}",
                           exc) from None
        with self._state_lock:
            before = self.state.applied_seq
            self.state.applied_seq = last_seq
            try:
                self._write_state_locked()
            except StorageError:
                # e.g. ENOSPC: keep the delta (redo is idempotent) and do not let
                # the next pass delete it as "applied" while state.json says otherwise.
                self.state.applied_seq = before
                raise
        try:
            path.unlink()
        except OSError as exc:
            log.warning("cannot delete applied delta %s: %s", path, exc,
                        extra={"policy": self.dir.name})
        self._retain()

    # ------------------------------------------------------------ corrupt deltas

    def _quarantine(self, path: Path, first: int, last: int, why: str) -> None:
        """Report (durably, through on_corrupt), move aside, apply as empty. Each step
        is redone after a crash: the file is still in deltas/ (corrupt again) or
        already in quarantine/ (`_skip_quarantined`)."""
        assert self.on_corrupt is not None
        self.on_corrupt(first, last, why)
        qdir = self.dir / QUARANTINE_DIR
        try:
            qdir.mkdir(exist_ok=True)
            os.rename(path, qdir / path.name)
            fsync_dir(qdir)
            fsync_dir(self.deltas_dir)
        except OSError as exc:
            raise _storage(f"policy {self.dir.name}: cannot quarantine {path.name}",
                           exc) from None
        self._apply_empty(first, last)

    def _skip_quarantined(self, applied: int, upto: int) -> int:
        """Apply as empty every quarantined delta that follows applied (through upto)."""
        qdir = self.dir / QUARANTINE_DIR
        if not qdir.is_dir():
            return applied
        spans = sorted((int(m.group(1)), int(m.group(2))) for m in
                       (_DELTA_NAME.match(p.name) for p in qdir.iterdir()) if m)
        for first, last in spans:
            if first == applied + 1 and last <= upto:
                self._apply_empty(first, last)
                applied = last
        return applied

    def _apply_empty(self, first: int, last: int) -> None:
        """A quarantined delta: the replica is not touched; the restore-point chain
        and applied_seq go on (the gap marks the points inconsistent)."""
        lo = first - 1
        try:
            size = self.undo.before_apply(lo, last, lambda: iter(()), self._fds)
            self.undo.after_apply(lo, last, 0, size)
        except OSError as exc:
            raise _storage(f"policy {self.dir.name}: recording restore point {last}",
                           exc) from None
        with self._state_lock:
            before = self.state.applied_seq
            self.state.applied_seq = max(before, last)
            try:
                self._write_state_locked()
            except StorageError:
                self.state.applied_seq = before
                raise

    def _retain(self) -> None:
        try:
            self.undo.retain(self.disk_sizes)
        except (OSError, FormatError) as exc:
            # Retried after the next delta; no listed point is lost meanwhile.
            log.warning("retention failed: %s", exc, extra={"policy": self.dir.name})

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
                os.close(fd)
        self._fds = {i: self._open_replica(spec) for i, spec in self.state.disks.items()}
