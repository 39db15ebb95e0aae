#!/usr/bin/env bash
# Enable a swap file when the host has less than 1 GiB of swap (root only).
# Ballooning pushes a guest's workload into swap: the real-cgroup tests need some.
# Usage: scripts/setup-swap.sh [SIZE_MIB]   (default 4096)
set -euo pipefail
size_mib=${1:-4096}
swapfile=${BALLOONLAB_SWAPFILE:-/var/tmp/balloonlab.swap}
have_kib=$(awk '/^SwapTotal:/ {print $2}' /proc/meminfo)
if [ "${have_kib:-0}" -ge 1048576 ]; then
    echo "setup-swap: $((have_kib / 1024)) MiB of swap already enabled"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "setup-swap: need root to enable swap" >&2
    exit 1
fi
if ! swapon --show=NAME --noheadings | grep -qx "$swapfile"; then
    rm -f "$swapfile"
    fallocate -l "${size_mib}M" "$swapfile" || dd if=/dev/zero of="$swapfile" bs=1M count="$size_mib" status=none
    chmod 600 "$swapfile"
    mkswap -q "$swapfile"
    swapon "$swapfile"
fi
echo "setup-swap: enabled ${size_mib} MiB at $swapfile"
