#!/usr/bin/env bash
# Regenerate the lock files, every entry pinned to one version with the sha256
# of every file PyPI has for it, so pip installs them in --require-hashes mode:
#   requirements.lock        cdp's runtime dependencies (the Docker image,
#                            deploy/install-systemd.sh)
#   requirements-dev.lock    the runtime ones plus the dev tools (.venv, CI);
#                            the same version of every package the two share
#   requirements-build.lock  what building from source needs (cdp itself and
#                            pyfuse3, which PyPI has only as an sdist); pip
#                            installs these first, then the rest without build
#                            isolation, so no build step fetches unlocked code
# Versions already in a lock are kept (uv prefers them); pass --upgrade to move
# everything to the newest release, or --upgrade-package NAME for one. Run it
# after changing the dependencies in pyproject.toml or scripts/build-requirements.in
# and commit the three files with the reason (docs/OPERATIONS.md, "Updating the
# lock files"); tests/unit/test_lockfile.py fails while they and pyproject.toml
# disagree.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
UV_VERSION=${UV_VERSION:-0.13.9}
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"${PYTHON:-python3}" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q "uv==$UV_VERSION"
uv="$tmp/venv/bin/uv"
# PyPI only (this machine's pip.conf may add local indexes whose files PyPI
# does not have), for the Python every deployment target runs: 3.11 on Linux.
compile=("$uv" pip compile --quiet --generate-hashes --index-url https://pypi.org/simple
         --python-version 3.11 --python-platform x86_64-unknown-linux-gnu
         --custom-compile-command scripts/lock.sh --annotation-style line "$@")
# Written in place: uv keeps the versions an existing output file holds.
"${compile[@]}" pyproject.toml --extra dev -o requirements-dev.lock
"${compile[@]}" pyproject.toml --constraint requirements-dev.lock -o requirements.lock
"${compile[@]}" scripts/build-requirements.in --constraint requirements-dev.lock \
    -o requirements-build.lock
for f in requirements.lock requirements-dev.lock requirements-build.lock; do
    echo "$f: $(grep -c '^[A-Za-z0-9]' "$f") packages"
done
