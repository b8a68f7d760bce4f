"""lab.json: the state file of a running lab (see cdpctl.labplan for its fields)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cdp_common import statefile
from cdp_common.errors import EXIT_USAGE, CdpError, CorruptStateError, StorageError

STATE_FILE = "lab.json"
KIND = "lab"
VERSION = 1


class UsageError(CdpError, exit_code=EXIT_USAGE):
    """The command line is incomplete or contradictory."""


def state_path(lab_dir: Path) -> Path:
    return lab_dir / STATE_FILE


def load_state(lab_dir: Path) -> dict[str, Any] | None:
    """The lab.json of `lab_dir`, or None when there is none (CorruptStateError, exit
    code 4, when it does not decode)."""
    path = state_path(lab_dir)
    try:
        data = statefile.load(path, KIND, VERSION)
    except CorruptStateError as exc:
        raise CorruptStateError(f"{path}: not valid JSON or not a lab state file ({exc}); "
                                "remove it if no lab is running") from None
    except StorageError as exc:
        raise CdpError(f"{path}: cannot read ({exc})") from None
    if data is not None and "processes" not in data:
        raise CorruptStateError(f"{path}: not a cdpctl lab state file")
    return data


def save_state(lab_dir: Path, data: dict[str, Any]) -> None:
    """Write lab.json durably and atomically (a reader never sees half a file)."""
    statefile.save(state_path(lab_dir), KIND, VERSION, data)
