#!/usr/bin/env bash
# Install cdp and exactly its locked runtime dependencies into a virtualenv:
#   scripts/install-locked.sh VENV                 # from PyPI, every file hash-checked
#   WHEELHOUSE=DIR scripts/install-locked.sh VENV  # offline, from scripts/wheelhouse.sh DIR
# From PyPI, pyfuse3 is built from its sdist (gcc, pkg-config, libfuse3-dev and
# python3-dev must be there) with the build tools of requirements-build.lock.
# deploy/install-systemd.sh and the compose image (deploy/compose/Dockerfile)
# install this way.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv=${1:?usage: scripts/install-locked.sh VENV}
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)

if [ -n "${WHEELHOUSE:-}" ]; then
    [ -f "$WHEELHOUSE/requirements.lock" ] || {
        echo "install-locked: $WHEELHOUSE is not a wheelhouse (no requirements.lock; build one with scripts/wheelhouse.sh)" >&2
        exit 66; }
    "${pip[@]}" --no-index --find-links "$WHEELHOUSE" --require-hashes \
        -r "$WHEELHOUSE/requirements.lock"
    wheels=("$WHEELHOUSE"/cdp-*.whl)
    "${pip[@]}" --no-index --no-deps --force-reinstall "${wheels[@]}"
    exit 0
fi

"${pip[@]}" --require-hashes -r "$root/requirements-build.lock"
"${pip[@]}" --require-hashes --no-build-isolation -r "$root/requirements.lock"
if [ ! -f "$root/cdp_common/pb/cdp/v1/coordinator_pb2.py" ]; then
    # The generated modules are not committed: make them with the locked
    # grpcio-tools in a throwaway venv, not in the installed one.
    tools="$(mktemp -d)"
    trap 'rm -rf "$tools"' EXIT
    "${PYTHON:-python3}" -m venv "$tools/venv"
    # the entries of grpcio-tools and what it needs, out of the dev lock
    awk -v want=" grpcio-tools grpcio protobuf setuptools typing-extensions " '
        /^[A-Za-z0-9]/ { split($1, nv, "=="); name = tolower(nv[1]); gsub(/[_.]/, "-", name)
                         keep = index(want, " " name " ") > 0 }
        /^ *#/ { next }
        keep' "$root/requirements-dev.lock" >"$tools/tools.lock"
    "$tools/venv/bin/python" -m pip install -q --disable-pip-version-check \
        --no-deps --require-hashes -r "$tools/tools.lock"
    PYTHON="$tools/venv/bin/python" "$root/scripts/gen_proto.sh"
fi
"${pip[@]}" --no-deps --no-build-isolation --force-reinstall "$root"
