#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian/Ubuntu machine for cdp:
#   1. system packages (installed only when missing, non-interactively),
#   2. the virtualenv .venv: the exact versions and hashes of requirements-build.lock
#      and requirements-dev.lock, then cdp itself editable (re-run only when
#      pyproject.toml or a lock changed),
#   3. the generated protobuf/gRPC modules (re-run only when a .proto changed).
# Safe to run again at any time; `make setup`, `make lab` and `make test` do.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

say() { printf 'bootstrap: %s\n' "$*"; }

# ---------------------------------------------------------------- 1. packages
packages=(python3-venv fuse3 libfuse3-dev pkg-config e2fsprogs util-linux sqlite3 gcc python3-dev)
# the compose test bed (tests/integration/test_compose.py) and the systemd unit
# check (systemd-analyze): a Docker engine started by the test, compose v1,
# debootstrap for the locally built base image
packages+=(docker.io docker-compose debootstrap systemd)
# the units booted under a real systemd (tests/integration/test_systemd_nspawn.py):
# systemd-nspawn, over a root file system that debootstrap (above) builds
# (scripts/nspawn-rootfs.sh)
packages+=(systemd-container)
# the two-site network fault tests (tests/integration/test_netns_faults.py)
packages+=(iproute2 iptables)
# shell completion tests check the generated zsh script with zsh itself
packages+=(zsh)
# etcd, the coordinator's distributed state store: tests/etcdfixture.py runs its
# own etcd processes on free ports (the package's etcd.service is not needed)
packages+=(etcd-server)
# promtool: the alert rules and exported metrics of deploy/monitoring are
# checked with it (tests/unit/test_monitoring.py)
packages+=(prometheus)
# the peers bench/bench_peers.py measures cdp against: the C pipeline
# zstd | openssl enc | socat (TCP) | openssl -d | zstd -d | dd, and rsync (bench_sync.py)
packages+=(zstd openssl socat rsync)
missing=()
for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]]; then
        sudo=()
    elif command -v sudo >/dev/null; then
        sudo=(sudo)
    else
        say "missing packages ${missing[*]} and not root (no sudo): install them first" >&2
        exit 1
    fi
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -q
    "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null
else
    say "system packages present"
fi

# ---------------------------------------------------------------- 2. venv
python="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
    say "creating .venv with $($python --version)"
    "$python" -m venv .venv
fi
stamp=.venv/.cdp-installed
locks=(requirements-build.lock requirements-dev.lock)
want="$(cat pyproject.toml "${locks[@]}" | sha256sum | cut -d' ' -f1)"
if [[ ! -f $stamp || "$(cat "$stamp")" != "$want" ]] || ! .venv/bin/python -c "import cdpctl" 2>/dev/null; then
    # Exactly the locked versions, each file checked against its locked sha256
    # (scripts/lock.sh): first the build tools, then everything else built with
    # those (no build isolation, so no build fetches an unlocked setuptools or
    # Cython), then cdp itself, editable, without resolving anything again.
    say "installing the locked dependencies (hash-checked) and cdp (editable) into .venv"
    pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
    "${pip[@]}" --require-hashes -r requirements-build.lock
    "${pip[@]}" --require-hashes --no-build-isolation -r requirements-dev.lock
    "${pip[@]}" --no-deps --no-build-isolation -e .
    echo "$want" >"$stamp"
else
    say ".venv up to date"
fi

# ---------------------------------------------------------------- 3. protos
generated=cdp_common/pb/cdp/v1/coordinator_pb2.py
# (the etcd stubs too: either tree missing, or a .proto newer, regenerates both)
if [[ ! -f $generated ]] || [[ ! -f cdp_common/pb/etcd/etcdserverpb/rpc_pb2.py ]] \
        || [[ -n "$(find proto -name '*.proto' -newer "$generated")" ]]; then
    say "generating protobuf modules"
    PYTHON=.venv/bin/python scripts/gen_proto.sh
else
    say "protobuf modules up to date"
fi
say "done"
