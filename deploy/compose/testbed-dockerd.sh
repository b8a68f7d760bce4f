#!/usr/bin/env bash
# Start or stop a private Docker engine for the compose test bed, for machines
# where none runs (CI, lab VMs without systemd). It listens on its own socket
# ($SOCK), keeps its pid in $PIDFILE and never touches the host firewall or
# sysctls (--iptables=false, --ip-forward=false, --ip-masq=false); the sites
# talk over the compose file's own networks. Every address is in TEST-NET-2
# (198.51.100.0/24): on this project's CI machines 192.0.2.0/24 is the host's
# own network and 203.0.113.0/24 holds the package mirror, so a bridge there
# would cut the machine off.
#   docker0 (default bridge)      198.51.100.161/27
#   default pool for new networks 198.51.100.192/26 in /28s
#   compose networks (compose.yaml) .0/26 "source", .64/26 "dr", .128/27 "wan"
#
#   eval "$(deploy/compose/testbed-dockerd.sh start)"   # exports DOCKER_HOST
#   deploy/compose/testbed-dockerd.sh stop
set -euo pipefail
SOCK=${CDP_DOCKERD_SOCK:-/run/cdp-testbed-docker.sock}
PIDFILE=${CDP_DOCKERD_PIDFILE:-/run/cdp-testbed-dockerd.pid}
DATA_ROOT=${CDP_DOCKERD_DATA_ROOT:-/var/lib/docker}
EXEC_ROOT=${CDP_DOCKERD_EXEC_ROOT:-/run/cdp-testbed-docker}
LOG=${CDP_DOCKERD_LOG:-/var/log/cdp-testbed-dockerd.log}
BIP=${CDP_DOCKERD_BIP:-198.51.100.161/27}
POOL=${CDP_DOCKERD_POOL:-base=198.51.100.192/26,size=28}
DOCKER=${DOCKER:-docker}

alive() { [ -s "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

case "${1:-}" in
start)
    if ! alive; then
        command -v dockerd >/dev/null || { echo "dockerd missing (apt-get install docker.io)" >&2; exit 1; }
        mkdir -p "$DATA_ROOT" "$EXEC_ROOT"
        setsid dockerd --host "unix://$SOCK" --pidfile "$PIDFILE" --data-root "$DATA_ROOT" \
            --exec-root "$EXEC_ROOT" --bip "$BIP" --default-address-pool "$POOL" \
            --iptables=false --ip-forward=false --ip-masq=false \
            >>"$LOG" 2>&1 </dev/null &
        for _ in $(seq 1 60); do
            DOCKER_HOST="unix://$SOCK" $DOCKER version >/dev/null 2>&1 && break
            sleep 0.5
        done
        DOCKER_HOST="unix://$SOCK" $DOCKER version >/dev/null 2>&1 || {
            echo "dockerd did not come up; last lines of $LOG:" >&2; tail -15 "$LOG" >&2; exit 1; }
    fi
    echo "export DOCKER_HOST=unix://$SOCK"
    ;;
stop)
    if alive; then
        pid=$(cat "$PIDFILE")
        kill "$pid"
        for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$PIDFILE"
    # dockerd leaves docker0 behind; its route would shadow real addresses
    ip link del docker0 2>/dev/null || true
    ;;
status)
    if alive; then echo "running (pid $(cat "$PIDFILE"), DOCKER_HOST=unix://$SOCK)"; else echo "stopped"; exit 3; fi
    ;;
*)
    echo "usage: $0 start|stop|status" >&2; exit 64 ;;
esac
