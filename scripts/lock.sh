#!/usr/bin/env bash
# Regenerate requirements.lock: every package `pip install -e '.[dev]'` pulls in,
# pinned to an exact version, resolved in a fresh virtualenv. Run after changing
# the dependencies in pyproject.toml; commit the result with the reason.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"${PYTHON:-python3}" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q -e '.[dev]'
{
    echo "# Exact versions of every dependency of cdp and its dev tools (scripts/lock.sh)."
    echo "# scripts/bootstrap.sh installs these, then cdp itself with --no-deps."
    "$tmp/venv/bin/python" -m pip freeze --exclude-editable | LC_ALL=C sort -f
} >requirements.lock
echo "requirements.lock: $(grep -vc '^#' requirements.lock) packages"
