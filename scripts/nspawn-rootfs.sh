#!/usr/bin/env bash
# Build (once) a Debian bookworm root file system that boots with systemd as
# PID 1 under systemd-nspawn, for the systemd test bed
# (tests/integration/test_systemd_nspawn.py), and print its path:
#   scripts/nspawn-rootfs.sh [CACHE_DIR]     # default /var/cache/cdp-test
# The tree is cached as CACHE_DIR/nspawn-<hash of this script>, so a change of
# the package list below builds a new one. It is built in a temporary
# directory and renamed into place only when complete, under a lock, so a
# failed or concurrent build never leaves a half tree where a test would boot
# it. Boot copies of it (systemd-nspawn --volatile=overlay), never the cache.
# It holds everything deploy/install-systemd.sh would fetch with apt
# (python3-venv, fuse3), because the container has no network: cdp itself
# comes from a wheelhouse (scripts/wheelhouse.sh). Needs root, debootstrap and
# a Debian mirror ($MIRROR, default deb.debian.org), once.
set -euo pipefail
cache=${1:-/var/cache/cdp-test}
mirror=${MIRROR:-http://deb.debian.org/debian}
packages=systemd,systemd-sysv,dbus,python3,python3-venv,fuse3,e2fsprogs,util-linux,procps,kmod,iproute2
hash="$(sha256sum "$0" | cut -c1-16)"
dest="$cache/nspawn-$hash"
say() { printf 'nspawn-rootfs: %s\n' "$*" >&2; }

[ "$(id -u)" -eq 0 ] || { say "needs root"; exit 77; }
command -v debootstrap >/dev/null || { say "needs debootstrap (apt-get install debootstrap)"; exit 77; }
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9
if [ -x "$dest/usr/lib/systemd/systemd" ]; then
    echo "$dest"
    exit 0
fi

tmp="$(mktemp -d "$cache/.build-XXXXXX")"
trap 'rm -rf --one-file-system "$tmp"' EXIT
say "debootstrap bookworm into $tmp ($packages)"
if ! debootstrap --variant=minbase --include="$packages" bookworm "$tmp/root" "$mirror" \
        >"$tmp/debootstrap.log" 2>&1; then
    tail -n 20 "$tmp/debootstrap.log" >&2
    say "debootstrap failed (no network or no mirror?)"
    exit 75
fi
root="$tmp/root"
# A quiet, quick boot: nothing waits for a network or a login.
rm -f "$root/etc/machine-id" "$root/var/lib/dbus/machine-id"
: >"$root/etc/machine-id"
echo cdp-nspawn >"$root/etc/hostname"
for unit in console-getty.service getty@.service systemd-networkd-wait-online.service \
        apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service \
        fstrim.timer systemd-timesyncd.service; do
    ln -sf /dev/null "$root/etc/systemd/system/$unit"
done
# The journal of the test run stays in RAM (the tree is booted as an overlay).
mkdir -p "$root/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\nRateLimitBurst=0\n' \
    >"$root/etc/systemd/journald.conf.d/cdp-test.conf"
apt-get -o RootDir="$root" clean 2>/dev/null || rm -rf "$root"/var/cache/apt/archives/*.deb
mv "$root" "$dest"
say "built $dest"
echo "$dest"
