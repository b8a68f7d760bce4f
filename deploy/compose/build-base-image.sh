#!/usr/bin/env bash
# Build the compose test bed's base image locally, for machines that cannot pull
# images: debootstrap a minimal Debian bookworm with python3, fuse3 and
# etcd-server (the etcd variant's members, compose.etcd.yaml), then `docker
# import` it as $IMAGE (default cdp-base:bookworm). Idempotent: does nothing
# when the image exists and has etcd (an older one without it is rebuilt).
# Needs root, debootstrap and a Debian mirror (apt's own, $DEBIAN_MIRROR,
# default http://deb.debian.org/debian).
#
#   deploy/compose/build-base-image.sh            # -> cdp-base:bookworm
#   IMAGE=my/base:1 deploy/compose/build-base-image.sh
set -euo pipefail
IMAGE=${IMAGE:-cdp-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DOCKER=${DOCKER:-docker}
if $DOCKER image inspect "$IMAGE" >/dev/null 2>&1; then
    if $DOCKER run --rm --network none "$IMAGE" sh -c 'command -v etcd' >/dev/null 2>&1; then
        echo "base image $IMAGE exists"
        exit 0
    fi
    echo "base image $IMAGE has no etcd: building it again"
fi
command -v debootstrap >/dev/null || { echo "debootstrap missing (apt-get install debootstrap)" >&2; exit 1; }
ROOTFS=$(mktemp -d /var/tmp/cdp-rootfs.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT
echo "debootstrap bookworm into $ROOTFS (a few minutes)"
debootstrap --variant=minbase \
    --include=python3,python3-venv,fuse3,ca-certificates,util-linux,e2fsprogs,procps,etcd-server \
    bookworm "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 || {
    tail -20 "$ROOTFS.log" >&2; exit 1; }
rm -f "$ROOTFS.log"
# keep the image small: no apt lists, docs or caches
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/usr/share/doc/* \
       "$ROOTFS"/usr/share/man/*
tar -C "$ROOTFS" -c . | $DOCKER import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' - "$IMAGE"
echo "built base image $IMAGE"
