"""The one rule for names of nodes, policies and disks (also file and metric label safe)."""

from __future__ import annotations

import re

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
"""1-64 characters: letters, digits, '_', '.', '-'; not starting with a punctuation mark.
`\\Z`, not `$`: a trailing newline is not part of a valid name."""

NAME_RULE = "1-64 of A-Z a-z 0-9 _ . -, starting with a letter or digit"


def is_name(value: str) -> bool:
    return NAME_RE.match(value) is not None
