"""One versioned JSON state file: load and save, for every daemon's small state.

Theory of operation
-------------------
A state file is one JSON object, replaced atomically (fsutil.write_file_atomic:
tmp + fsync + rename + directory fsync), so a crash leaves the old or the new
content, never a mix. On disk it is the caller's fields plus two of ours:

    {"kind": "<what this file is>", "version": <int >= 1>, ...the caller's fields}

`kind` catches a file put in the wrong place (a journal state where a target
state belongs); `version` lets a newer build refuse nothing it can read and an
older build refuse what it cannot. Files written before this module have no
`kind` (accepted as the expected kind) and maybe no `version` (accepted as 1).

`load` returns the caller's fields with `"version"` set to the file's version
(so a caller can migrate older files) and `kind` removed; `None` when the file
does not exist. Anything that does not decode -- bad UTF-8, bad JSON, not an
object, another kind, a version that is not a positive int or is newer than
the caller knows -- raises CorruptStateError (a FormatError) naming the file. An I/O failure other
than "no such file" raises StorageError naming the file.
"""

from __future__ import annotations

import json
import os
from typing import Any

from cdp_common.errors import CorruptStateError, StorageError
from cdp_common.fileio import OS_IO, FileIO, StrPath
from cdp_common.fsutil import pread_upto, write_file_atomic

KIND_KEY = "kind"
VERSION_KEY = "version"
_READ_CHUNK = 1 << 20


def _read(path: StrPath, io: FileIO) -> bytes | None:
    try:
        fd = io.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        return pread_upto(fd, None, io, _READ_CHUNK)
    finally:
        io.close(fd)


def load(path: StrPath, kind: str, version: int, io: FileIO = OS_IO) -> dict[str, Any] | None:
    """The state in `path` (see the module doc), or None when there is none.

    `version` is the newest version the caller understands.
    """
    where = os.fspath(path)
    try:
        raw = _read(path, io)
    except OSError as e:
        raise StorageError(f"{where}: cannot read state file: {e}") from e
    if raw is None:
        return None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptStateError(f"{where}: corrupt {kind} state file: {e}") from e
    if not isinstance(data, dict):
        raise CorruptStateError(f"{where}: corrupt {kind} state file: not a JSON object")
    found_kind = data.pop(KIND_KEY, kind)
    if found_kind != kind:
        raise CorruptStateError(f"{where}: is a {found_kind!r} state file, expected {kind!r}")
    found_version = data.get(VERSION_KEY, 1)
    if type(found_version) is not int or found_version < 1:
        raise CorruptStateError(f"{where}: {kind} state file has a bad version "
                                f"{found_version!r}")
    if found_version > version:
        raise CorruptStateError(f"{where}: {kind} state file version {found_version} is newer "
                                f"than "
                          f"this build understands ({version})")
    data[VERSION_KEY] = found_version
    return data


def save(path: StrPath, kind: str, version: int, data: dict[str, Any],
         io: FileIO = OS_IO) -> None:
    """Durably replace `path` with `data` tagged with `kind` and `version`.

    `data`'s own "kind"/"version" keys, if any, are overridden. Raises OSError
    (the old content stays); callers map it to their own error and message.
    """
    doc = {**data, KIND_KEY: kind, VERSION_KEY: version}
    write_file_atomic(path, json.dumps(doc, indent=1, sort_keys=True).encode(), io=io)
