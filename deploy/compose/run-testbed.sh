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
# VARIANT=etcd runs the etcd variant instead (compose.etcd.yaml over
# compose.yaml): two coordinators, leader and standby, on a 3-member etcd
# cluster, every node given the list of both; its scenario writes, kills the
# leading coordinator's container with SIGKILL, checks that the standby leads,
# that `cdpctl status` through the list answers with every assignment's epoch
# unchanged, and that the next write replicates.
#
#   deploy/compose/run-testbed.sh                  # uses $DOCKER_HOST or the default engine
#   BASE_IMAGE=cdp-base:bookworm deploy/compose/run-testbed.sh
#   KEEP=1 deploy/compose/run-testbed.sh           # leave it running to look around
#   VARIANT=etcd deploy/compose/run-testbed.sh     # standby coordinators on etcd
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
variant=${VARIANT:-}
case "$variant" in
"") files=(-f "$here/compose.yaml"); project=${PROJECT:-cdp-testbed} ;;
etcd) files=(-f "$here/compose.yaml" -f "$here/compose.etcd.yaml"); project=${PROJECT:-cdp-testbed-etcd} ;;
*) echo "VARIANT: \"\" or etcd, not $variant" >&2; exit 2 ;;
esac
write_mib=${WRITE_MIB:-8}
timeout_s=${TIMEOUT_S:-90}
if [ -z "${COMPOSE:-}" ]; then
    if command -v docker-compose >/dev/null; then COMPOSE=docker-compose; else COMPOSE="docker compose"; fi
fi
export BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim-bookworm}
dc() { $COMPOSE -p "$project" "${files[@]}" "$@"; }
say() { printf '[testbed] %s\n' "$*"; }

teardown() {
    if [ "${KEEP:-0}" = 1 ]; then say "KEEP=1: left running; stop with: $COMPOSE -p $project ${files[*]} down -v"; return; fi
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
if [ "$variant" = etcd ]; then
    say "starting two coordinators on three etcd members, two filters, two source proxies, target proxy, target"
else
    say "starting coordinator, two filters, two source proxies, target proxy, target"
fi
dc up -d >/dev/null || { dc logs --no-color | tail -40 >&2; exit 2; }

# wait until the filters' disks exist and the policy testbed and both members of
# the group app have both proxies assigned
# (the etcd variant: cdpctl in the filter's container, through the list of both
# coordinators, since the scenario kills one of them)
ctl=coordinator coordinators=198.51.100.5:7000
[ "$variant" = etcd ] && ctl=filter coordinators=198.51.100.5:7000,198.51.100.6:7000
conn="--coordinator $coordinators --ca /etc/cdp/secrets/pki/ca.pem \
      --cert /etc/cdp/secrets/pki/cdpctl.pem --key /etc/cdp/secrets/pki/cdpctl.key"
assigned='import json,sys
d = {p["name"]: p for p in json.load(sys.stdin)["policies"]}
want = ("testbed", "app..filter-1", "app..filter-2")
sys.exit(0 if all(d.get(n, {}).get("source_proxy") and d[n].get("target_proxy") for n in want) else 1)'
deadline=$((SECONDS + 60))
until dc exec -T "$ctl" sh -c "cdpctl status --json $conn" 2>/dev/null \
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
COMPOSE_CMD="$COMPOSE -p $project ${files[*]}" SCENARIO=${variant:-default} TIMEOUT_S=$timeout_s WRITE_MIB=$write_mib \
    "${PYTHON:-python3}" "$here/scenario.py"
