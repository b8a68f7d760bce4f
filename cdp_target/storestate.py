"""What a policy's replica store knows about itself, and the rules every store obeys.

Theory of operation: this is the pure part shared by every `ReplicaStore`
(cdp_target.service): the durable counters (`StoreState`), the disks a
policy's replicas were made for (`DiskSpec`), and the three rules of the
receive path, as plain functions so the file store (cdp_target.store) and
the in-memory one (cdp_target.memstore) cannot drift apart:

- `check_disks`: announced disks must agree with the recorded ones (same
  name and size per id, names unique); new ids are added.
- `check_epoch`: an epoch older than the one already seen is fenced.
- `classify_delta`: a delta ending at or below durable_seq is a duplicate
  (acked, not stored); one that does not start at durable_seq + 1 is a gap.

``state.json`` (kind "target-policy", version 1; cdp_common.statefile):
``{"kind", "version": 1, "epoch", "durable_seq", "applied_seq",
"newest_time_ns", "bytes_replicated", "captured_seq",
"disks": {"<disk_id>": {"name", "size_bytes"}}}``. Files written before the
kind field existed are read alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdp_common import statefile
from cdp_common.errors import FencedError, FormatError, InvalidRequestError, ProtocolError
from cdp_common.fileio import OS_IO, FileIO
from cdp_common.names import NAME_RE

STATE_FILE = "state.json"
STATE_KIND = "target-policy"
STATE_VERSION = 1
_DISK_NAME = NAME_RE


class DiskMismatchError(ProtocolError, grpc_status="FAILED_PRECONDITION"):
    """The disks announced for a policy contradict the disks its replicas were made for."""


class DeltaOrderError(ProtocolError, grpc_status="ABORTED", transient=True):
    """A delta out of order: a seq gap or overlap, a chunk or commit outside a delta.
    The sender reconnects and resends from the durable seq."""


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

    def copy(self) -> StoreState:
        return StoreState(self.epoch, self.durable_seq, self.applied_seq, self.newest_time_ns,
                          self.bytes_replicated, self.captured_seq, dict(self.disks))

    @property
    def disk_sizes(self) -> dict[int, int]:
        return {i: d.size_bytes for i, d in self.disks.items()}

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


def load_state(directory: Path, io: FileIO = OS_IO) -> StoreState | None:
    """The state file of a policy directory; None when there is none (FormatError)."""
    path = directory / STATE_FILE
    data = statefile.load(path, STATE_KIND, STATE_VERSION, io)
    return None if data is None else StoreState.from_json(data, str(path))


def save_state(directory: Path, state: StoreState, io: FileIO = OS_IO) -> None:
    """Durably replace the state file (raises OSError; the old one stays)."""
    statefile.save(directory / STATE_FILE, STATE_KIND, STATE_VERSION, state.to_json(), io)


# ---------------------------------------------------------------- the rules

def check_disks(where: str, recorded: Mapping[int, DiskSpec],
                announced: Mapping[int, DiskSpec]) -> dict[int, DiskSpec]:
    """The announced disks not recorded yet, or grown (same id and name, larger);
    DiskMismatchError when they contradict (renamed, shrunk, a name used twice)."""
    for disk_id, spec in announced.items():
        if not _DISK_NAME.match(spec.name):
            raise DiskMismatchError(f"disk {disk_id}: {spec.name!r} is not a valid disk name")
        if spec.size_bytes <= 0:
            raise DiskMismatchError(f"disk {disk_id} ({spec.name}): size must be positive")
        old = recorded.get(disk_id)
        if old is not None and old != spec and not (old.name == spec.name
                                                     and spec.size_bytes > old.size_bytes):
            raise DiskMismatchError(
                f"policy store {where}: disk {disk_id} was {old.name!r} of "
                f"{old.size_bytes} bytes, now announced as {spec.name!r} of "
                f"{spec.size_bytes} bytes; shrinking or renaming a protected disk "
                f"needs a new policy or a resync")
    names = {d.name: i for i, d in recorded.items()}
    for disk_id, spec in announced.items():
        if names.get(spec.name, disk_id) != disk_id:
            raise DiskMismatchError(f"disk name {spec.name!r} is already used by disk "
                                    f"{names[spec.name]}")
    return {i: s for i, s in announced.items() if recorded.get(i) != s}


def check_disk_bounds(policy: str, disks: Mapping[int, DiskSpec], max_disk_bytes: int) -> None:
    """Announced disk sizes are positive multiples of 4096, at most `max_disk_bytes`
    (InvalidRequestError), checked before any store is opened or created."""
    for disk_id, spec in sorted(disks.items()):
        if spec.size_bytes > max_disk_bytes:
            raise InvalidRequestError(
                f"policy {policy}: disk {disk_id} ({spec.name!r}) of {spec.size_bytes} bytes "
                f"is larger than this target's max_disk_bytes ({max_disk_bytes})")
        if spec.size_bytes <= 0 or spec.size_bytes % 4096:
            raise InvalidRequestError(
                f"policy {policy}: disk {disk_id} ({spec.name!r}): size must be a positive "
                f"multiple of 4096, got {spec.size_bytes}")


def check_epoch(policy: str, epoch: int, seen: int) -> bool:
    """True when `epoch` is newer than `seen` (persist it); FencedError when older."""
    if epoch < seen:
        raise FencedError(f"policy {policy}: epoch {epoch} is older than "
                          f"epoch {seen} already seen")
    return epoch > seen


def classify_delta(policy: str, first_seq: int, last_seq: int, durable_seq: int) -> bool:
    """True for a new delta, False for a duplicate; ProtocolError for a bad range or a gap."""
    if first_seq < 1 or last_seq < first_seq:
        raise DeltaOrderError(f"policy {policy}: bad seq range [{first_seq}, {last_seq}]")
    if last_seq <= durable_seq:
        return False
    if first_seq != durable_seq + 1:
        raise DeltaOrderError(f"policy {policy}: delta [{first_seq}, {last_seq}] "
                              f"does not follow durable seq {durable_seq} (gap or overlap)")
    return True
