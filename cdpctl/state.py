"""lab.json: the state file of a running lab (see cdpctl.labplan for its fields)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cdp_common.errors import CdpError

STATE_FILE = "lab.json"


class UsageError(CdpError):
    """The command line is incomplete or contradictory."""

    exit_code = 64


def state_path(lab_dir: Path) -> Path:
    return lab_dir / STATE_FILE


def load_state(lab_dir: Path) -> dict[str, Any] | None:
    """The lab.json of `lab_dir`, or None when there is none."""
    path = state_path(lab_dir)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CdpError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CdpError(f"{path}: not valid JSON ({exc}); remove it if no lab is running") from None
    if not isinstance(data, dict) or "processes" not in data:
        raise CdpError(f"{path}: not a cdpctl lab state file")
    return data


def save_state(lab_dir: Path, data: dict[str, Any]) -> None:
    """Write lab.json atomically (a reader never sees half a file)."""
    path = state_path(lab_dir)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
