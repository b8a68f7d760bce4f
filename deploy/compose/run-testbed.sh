#!/usr/bin/env bash
# The compose test bed in one command: build the image, bring up the two sites,
# run deploy/compose/scenario.py against them (a write replicated byte for byte;
# dependent writes on two filters restored together from a restore point of a
# consistency group; a source proxy killed and the policy rebound to the other;
# a partition between the sites past the lease, during which health must not
# say OK; restores of an earlier and of the latest point compared with the
# source as it was), and tear everything down (containers, networks, volumes),
# whatever happened.
#
#   deploy/compose/run-testbed.sh                  # uses $DOCKER_HOST or the default engine
#   BASE_IMAGE=cdp-base:bookworm deploy/compose/run-testbed.sh
#   KEEP=1 deploy/compose/run-testbed.sh           # leave it running to look around
#
# Environment: BASE_IMAGE (default python:3.11-slim-bookworm), COMPOSE
# (default: docker-compose, else "docker compose"), WRITE_MIB (default 8),
# TIMEOUT_S for each wait (default 90), WHEELS=1 to build a wheelhouse of the
# project and its locked dependencies on this host first (offline image build),
# PYTHON for the scenario (any python3 >= 3.11).
# Exit codes: 0 every check held, 1 a check failed, 2 set-up failed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
project=${PROJECT:-cdp-testbed}
write_mib=${WRITE_MIB:-8}
timeout_s=${TIMEOUT_S:-90}
if [ -z "${COMPOSE:-}" ]; then
    if command -v docker-compose >/dev/null; then COMPOSE=docker-compose; else COMPOSE="docker compose"; fi
fi
export BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim-bookworm}
dc() { $COMPOSE -p "$project" -f "$here/compose.yaml" "$@"; }
say() { printf '[testbed] %s\n' "$*"; }

teardown() {
    if [ "${KEEP:-0}" = 1 ]; then say "KEEP=1: left running; stop with: $COMPOSE -p $project -f $here/compose.yaml down -v"; return; fi
    say "tearing down"
    dc logs --no-color >"${LOG_DIR:-/tmp}/cdp-testbed.log" 2>&1 || true
    dc down -v --remove-orphans >/dev/null 2>&1 || true
}

if [ "${WHEELS:-0}" = 1 ]; then
    say "building the wheelhouse deploy/compose/wheels (the locked versions, hash-checked)"
    PYTHON=${PYTHON:-$root/.venv/bin/python} "$root/scripts/wheelhouse.sh" "$here/wheels" >/dev/null
fi

say "building the image (BASE_IMAGE=$BASE_IMAGE)"
dc build -q >/dev/null || { echo "image build failed" >&2; exit 2; }
trap teardown EXIT
say "starting coordinator, two filters, two source proxies, target proxy, target"
dc up -d >/dev/null || { dc logs --no-color | tail -40 >&2; exit 2; }

# wait until the filters' disks exist and the policy testbed and both members of
# the group app have both proxies assigned
conn="--coordinator 198.51.100.5:7000 --ca /etc/cdp/secrets/pki/ca.pem \
      --cert /etc/cdp/secrets/pki/cdpctl.pem --key /etc/cdp/secrets/pki/cdpctl.key"
assigned='import json,sys
d = {p["name"]: p for p in json.load(sys.stdin)["policies"]}
want = ("testbed", "app..filter-1", "app..filter-2")
sys.exit(0 if all(d.get(n, {}).get("source_proxy") and d[n].get("target_proxy") for n in want) else 1)'
deadline=$((SECONDS + 60))
until dc exec -T coordinator sh -c "cdpctl status --json $conn" 2>/dev/null \
        | python3 -c "$assigned" 2>/dev/null \
      && dc exec -T filter test -e /run/cdp/disks/disk0 -a -e /run/cdp/disks/app-data \
      && dc exec -T filter-2 test -e /run/cdp/disks/app-log; do
    if [ $SECONDS -ge $deadline ]; then
        echo "the test bed did not come up within 60 s" >&2
        dc ps >&2; dc logs --no-color --tail 30 >&2; exit 2
    fi
    sleep 1
done
say "up: policy testbed and group app assigned; running the scenario (deploy/compose/scenario.py)"
COMPOSE_CMD="$COMPOSE -p $project -f $here/compose.yaml" TIMEOUT_S=$timeout_s WRITE_MIB=$write_mib \
    "${PYTHON:-python3}" "$here/scenario.py"
