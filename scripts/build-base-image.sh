#!/usr/bin/env bash
# Build the lab's base image offline-friendly: a Debian rootfs made with debootstrap from the
# machine's own apt mirror, with python3 and the project's runtime dependencies as Debian
# packages, imported into Docker. For hosts whose containers cannot reach PyPI (CI here);
# everyone else can use the default official Python image (see .env). It also carries Debian's
# redis-server and redis-tools: the compose lab's `redis` service (a stock service with no agent,
# ballooned through attach) and scenarios/redis_latency.py run it from this image offline.
#
#   scripts/build-base-image.sh [IMAGE_TAG]     (default balloonlab-base:bookworm; needs root)
set -euo pipefail
tag="${1:-balloonlab-base:bookworm}"
modules="zmq, msgpack, psutil, numpy, prometheus_client, rich, docker"
programs="redis-server redis-cli redis-benchmark"
if docker image inspect "$tag" >/dev/null 2>&1; then
    if docker run --rm --network none "$tag" sh -c "python3 -c 'import $modules' && for p in $programs; do command -v \$p || exit 1; done" \
            >/dev/null 2>&1; then
        echo "build-base-image: $tag already present"
        exit 0
    fi
    echo "build-base-image: $tag lacks some of $modules / $programs: rebuilding"
fi
command -v debootstrap >/dev/null || { echo "build-base-image: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }
mirror="${DEBIAN_MIRROR:-$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)}"
mirror="${mirror:-http://deb.debian.org/debian}"
rootfs="$(mktemp -d /var/tmp/balloonlab-rootfs.XXXXXX)"
trap 'rm -rf "$rootfs" "$rootfs.log"' EXIT
echo "build-base-image: debootstrap bookworm from $mirror (a few minutes)"
debootstrap --variant=minbase --include=python3,procps bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 \
    || { tail -30 "$rootfs.log" >&2; exit 1; }
# The modules through apt inside the new root (debootstrap's own --include fails to configure
# python3-zmq: its dependency order is apt's job), and redis. A policy-rc.d that exits 101 ("not
# allowed") keeps redis-server's postinst from starting a redis inside the chroot; it is removed
# before the image is made, so the image behaves as a stock Debian one.
cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
printf '#!/bin/sh\nexit 101\n' > "$rootfs/usr/sbin/policy-rc.d"
chmod 755 "$rootfs/usr/sbin/policy-rc.d"
chroot "$rootfs" sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    --no-install-recommends python3-zmq python3-msgpack python3-psutil python3-numpy \
    python3-prometheus-client python3-rich python3-docker redis-server redis-tools' >"$rootfs.log" 2>&1 \
    || { tail -30 "$rootfs.log" >&2; exit 1; }
chroot "$rootfs" sh -c "for p in $programs; do command -v \$p || exit 1; done" >/dev/null \
    || { echo "build-base-image: redis-server/redis-tools did not install" >&2; exit 1; }
rm -f "$rootfs.log" "$rootfs/etc/resolv.conf" "$rootfs/usr/sbin/policy-rc.d"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' - "$tag" >/dev/null
echo "build-base-image: $tag ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%d MiB", $1/1048576}'))"
