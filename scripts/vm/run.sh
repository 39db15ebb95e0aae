#!/usr/bin/env bash
# Boot the v2 guest (scripts/vm/build-image.sh, cached) under QEMU, run the v2 suite
# (tests/v2) inside it on the source tree as it is here, and bring pytest's JUnit XML and
# log out. Exits non-zero when a scenario fails, the guest does not boot, or the run takes
# longer than its bound. Needs root (the image build).
#
#   scripts/vm/run.sh [PYTEST_ARGS...]     e.g. scripts/vm/run.sh -k docker
#   BALLOONLAB_VM_TIMEOUT=SECONDS          the whole boot + suite (default 1500)
#   BALLOONLAB_VM_OUT=DIR                  results (default artifacts/v2): junit.xml, pytest.log, serial.log, ...
#   BALLOONLAB_VM_ACCEL=tcg|kvm            override the detection (KVM only with real VT-x/AMD-V)
#   V2_COMPOSE=1                           also the compose lab with Compose v2 (minutes more under TCG)
#   V2_ATTACH=0                            without `balloonctl attach` on v2 (in the lane by default)
#   BALLOONLAB_VM_MEMORY / _CPUS / _SWAP   guest RAM MiB (2048), vCPUs (2), swap disk MiB (2048)
set -euo pipefail
# shellcheck source=scripts/vm/common.sh
source "$(dirname "$0")/common.sh"
REPO="$(cd "$VM_DIR/../.." && pwd)"
TIMEOUT="${BALLOONLAB_VM_TIMEOUT:-1500}"
OUT="${BALLOONLAB_VM_OUT:-$REPO/artifacts/v2}"
MEMORY="${BALLOONLAB_VM_MEMORY:-2048}" CPUS="${BALLOONLAB_VM_CPUS:-2}" SWAP_MIB="${BALLOONLAB_VM_SWAP:-2048}"
T0=$(date +%s)

# The image, share-locked for the whole run (fd 8): a concurrent build of another recipe
# never removes it under this run (common.sh prune_images). Retried if it went in between.
for _ in 1 2 3; do
    IMAGE="$("$VM_DIR/build-image.sh")"
    exec 8<"$IMAGE/complete" && flock -s 8 && [ -e "$IMAGE/complete" ] && break
    exec 8<&-
    IMAGE=""
done
[ -n "$IMAGE" ] || { echo "vm: FAILED: the image kept being replaced under this run" >&2; exit 1; }
echo "vm: image $IMAGE ($(sed -n 's/^built //p' "$IMAGE/manifest.txt"))"
mkdir -p "$OUT"
rm -rf "${OUT:?}"/*
RUN="$(mktemp -d /var/tmp/balloonlab-vm-run.XXXXXX)"
QEMU_PID=""
cleanup() {
    [ -n "$QEMU_PID" ] && kill "$QEMU_PID" 2>/dev/null || true
    rm -rf "$RUN"
}
trap cleanup EXIT

# The job: the source tree as checked out here (tracked and new files, not ignored ones),
# plus the suite's settings. Boot and shutdown take a minute under TCG: the suite gets the rest.
SUITE_TIMEOUT=$(( TIMEOUT - 120 ))
mkdir -p "$RUN/job"
printf 'SUITE_TIMEOUT=%d\nPYTEST_ARGS=%q\nexport V2_COMPOSE=%q\nexport V2_ATTACH=%q\n' "$SUITE_TIMEOUT" "$*" "${V2_COMPOSE:-0}" "${V2_ATTACH:-1}" \
    > "$RUN/job/.balloonlab-v2-job"
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$REPO" && git ls-files -z --cached --others --exclude-standard | xargs -0 -r ls -d 2>/dev/null \
        | tar -cf "$RUN/src.tar" --no-recursion -T -)
else
    tar -C "$REPO" --exclude=.venv --exclude=.git --exclude=artifacts --exclude=__pycache__ -cf "$RUN/src.tar" .
fi
tar -C "$RUN/job" -rf "$RUN/src.tar" .balloonlab-v2-job
# The host's Compose v2 plugin (scripts/setup-docker.sh installs it) for the compose lab inside.
for plugin in /usr/local/lib/docker/cli-plugins /usr/libexec/docker/cli-plugins /usr/lib/docker/cli-plugins \
    "$HOME/.docker/cli-plugins"; do
    if [ -x "$plugin/docker-compose" ]; then
        tar -C "$plugin" -rf "$RUN/src.tar" --transform 's|^|.balloonlab-v2-extra/|' docker-compose
        echo "vm: handing in the Compose v2 plugin ($plugin/docker-compose)"
        break
    fi
done
truncate -s %1M "$RUN/src.tar"
truncate -s "${SWAP_MIB}M" "$RUN/swap.img" && mkswap -q "$RUN/swap.img" >/dev/null 2>&1 || mkswap "$RUN/swap.img" >/dev/null
truncate -s 64M "$RUN/results.img"

SERIAL="$OUT/serial.log"
echo "vm: booting ($(accelerator), $CPUS vCPUs, $MEMORY MiB, ${SWAP_MIB} MiB swap disk), bounded at ${TIMEOUT} s; serial: $SERIAL"
qemu_rc=0
BOOTED=$(date +%s)
boot_guest "$IMAGE" "file=$IMAGE/rootfs.ext4,if=virtio,format=raw,snapshot=on" "$RUN/src.tar" "$RUN/swap.img" \
    "$RUN/results.img" "$SERIAL" "$TIMEOUT" || qemu_rc=$?
WALL=$(( $(date +%s) - T0 )) GUEST_WALL=$(( $(date +%s) - BOOTED ))
tar -xf "$RUN/results.img" -C "$OUT" 2>/dev/null || true
if [ "$qemu_rc" = 124 ] || [ "$qemu_rc" = 137 ]; then
    echo "vm: FAILED: the guest did not finish within ${TIMEOUT} s (qemu killed)" >&2
    exit 1
fi
if [ ! -s "$OUT/rc" ]; then
    echo "vm: FAILED: no results from the guest (qemu rc $qemu_rc; did it boot? see $SERIAL)" >&2
    exit 1
fi
rc="$(cat "$OUT/rc")"
summary="$(grep -aE '^=+ .*(passed|failed|error|skipped).* =+$' "$OUT/pytest.log" | tail -1 || true)"
echo "vm: suite rc $rc in ${GUEST_WALL} s of guest (boot, suite and shutdown; ${WALL} s with the image):" \
     "${summary:-no pytest summary}; results in $OUT"
[ "$rc" = 0 ] || { echo "vm: FAILED: the v2 suite failed (pytest rc $rc)" >&2; exit 1; }
