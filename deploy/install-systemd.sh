#!/usr/bin/env bash
# Install cdp as systemd services from this source tree (Debian/Ubuntu, as root):
#   - system packages the daemons need (python3-venv, fuse3; compilers for pyfuse3
#     unless installing from a wheelhouse)
#   - a venv in $PREFIX (default /opt/cdp) with cdp and exactly the versions of
#     requirements.lock, every file checked against its locked sha256
#     (scripts/install-locked.sh), docs in $PREFIX/share/doc
#   - a system user "cdp" (coordinator, proxies and target run as it; the filter runs as root)
#   - the units in /etc/systemd/system, example configs in /etc/cdp/examples
# It never overwrites a config in /etc/cdp and enables nothing: pick the daemons
# of this host, write their configs, then `systemctl enable --now cdp-...`.
#
#   sudo deploy/install-systemd.sh            # or: sudo make install-systemd
#   DESTDIR=/tmp/stage deploy/install-systemd.sh   # staged look at the files; no apt, useradd,
#                                                 # systemctl (the staged venv only runs from there)
#   WHEELHOUSE=DIR deploy/install-systemd.sh       # offline, from `scripts/wheelhouse.sh DIR`
#                                                 # built on a machine with network
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
PREFIX=${PREFIX:-/opt/cdp}
DESTDIR=${DESTDIR:-}
say() { printf 'install: %s\n' "$*"; }
[ "$(id -u)" -eq 0 ] || [ -n "$DESTDIR" ] || { echo "run as root (or set DESTDIR for a staged install)" >&2; exit 64; }

if [ -z "$DESTDIR" ]; then
    need=(python3-venv fuse3)
    [ -n "${WHEELHOUSE:-}" ] || need+=(libfuse3-dev pkg-config gcc python3-dev)
    missing=()
    for p in "${need[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p"); done
    if ((${#missing[@]})); then
        say "apt-get install ${missing[*]}"
        apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null
    fi
fi

say "venv and cdp in $DESTDIR$PREFIX: the locked versions (requirements.lock), hash-checked"
"$root/scripts/install-locked.sh" "$DESTDIR$PREFIX"
install -d "$DESTDIR$PREFIX/share/doc"
install -m 0644 "$root"/docs/*.md "$root/README.md" "$DESTDIR$PREFIX/share/doc/"

say "units in $DESTDIR/etc/systemd/system"
install -d "$DESTDIR/etc/systemd/system"
for u in "$root"/deploy/systemd/*.service; do
    sed "s#/opt/cdp/#$PREFIX/#g" "$u" > "$DESTDIR/etc/systemd/system/$(basename "$u")"
    chmod 0644 "$DESTDIR/etc/systemd/system/$(basename "$u")"
done

say "example configs in $DESTDIR/etc/cdp/examples"
install -d -m 0750 "$DESTDIR/etc/cdp" "$DESTDIR/etc/cdp/examples"
install -m 0640 "$root"/deploy/examples/*.toml "$DESTDIR/etc/cdp/examples/"

if [ -z "$DESTDIR" ]; then
    if ! id cdp >/dev/null 2>&1; then
        say "system user cdp"
        useradd --system --home-dir /var/lib/cdp --no-create-home --shell /usr/sbin/nologin cdp
    fi
    chgrp -R cdp /etc/cdp
    if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
    install -m 0755 /dev/stdin /usr/local/bin/cdpctl <<EOS
#!/bin/sh
exec $PREFIX/bin/cdpctl "\$@"
EOS
    # a minimal system (no bash-completion package) has no such directory
    if [ -d /etc/bash_completion.d ]; then
        "$PREFIX/bin/cdpctl" completion bash > /etc/bash_completion.d/cdpctl 2>/dev/null || true
    fi
fi
say "done. Next: docs/OPERATIONS.md, section 'Install with systemd'."
