#!/usr/bin/env bash
# Build the cgroup-v2 guest for the v2 lane from Debian's packages only, cached and keyed on
# its inputs (packages.txt and the recipe files in scripts/vm): Debian's own kernel (unpacked
# with dpkg-deb, never installed on the host) booted as an uncompressed vmlinux, a busybox
# initramfs, and an ext4 root made by debootstrap with systemd as init, Debian's python3
# packages and docker.io; then booted once, writable, to import Docker's images the suite
# uses (guest/balloonlab-v2-provision), so that no test run pays for that. Needs root.
#
#   scripts/vm/build-image.sh          prints the image directory (reuses it when inputs match)
#   BALLOONLAB_VM_CACHE=DIR            cache location (default /var/cache/balloonlab-vm)
set -euo pipefail
# shellcheck source=scripts/vm/common.sh
source "$(dirname "$0")/common.sh"
KEY="$(image_key)"
IMAGE="$CACHE/image-$KEY"
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9   # one builder at a time; a second caller waits, then reuses what the first built
if [ -e "$IMAGE/complete" ]; then
    echo "$IMAGE"
    exit 0
fi
ensure_host_packages >&2
T0=$(date +%s)
step() { echo "vm-build [$(( $(date +%s) - T0 )) s] $*" >&2; }
BUILD="$CACHE/build-$KEY"
rm -rf "$BUILD"
mkdir -p "$BUILD"/{debs,kernel}
QEMU_PID=""
cleanup() {
    [ -n "$QEMU_PID" ] && kill "$QEMU_PID" 2>/dev/null || true
    umount "$BUILD/rootfs/proc" 2>/dev/null || true
    rm -rf "$BUILD"
}
trap cleanup EXIT
LOG="$BUILD/build.log"
fail() { tail -40 "$LOG" >&2; echo "vm-build: $*" >&2; exit 1; }
packages() { sed -n "s/^$1: *//p" "$VM_DIR/packages.txt" | tr -s ' \n' ' '; }

step "guest kernel: apt-get download linux-image-amd64 ($SUITE)"
apt-get -o DPkg::Lock::Timeout=900 update -qq
versioned="$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')"
(cd "$BUILD/debs" && apt-get download -qq "$versioned") >>"$LOG" 2>&1 || fail "apt-get download $versioned"
dpkg-deb -x "$BUILD"/debs/linux-image-*.deb "$BUILD/kx"
KV="$(ls "$BUILD/kx/lib/modules")"
python3 "$VM_DIR/extract-vmlinux.py" "$BUILD"/kx/boot/vmlinuz-"$KV" "$BUILD/kernel/vmlinux"

step "root filesystem: debootstrap --variant=minbase $SUITE from $MIRROR"
R="$BUILD/rootfs"
include="$(packages stage1 | tr ' ' ',' | sed 's/,$//')"
debootstrap --variant=minbase --include="$include" "$SUITE" "$R" "$MIRROR" >>"$LOG" 2>&1 || fail "debootstrap"
step "root filesystem: apt-get install $(packages stage2)"
cp /etc/resolv.conf "$R/etc/resolv.conf"
printf '#!/bin/sh\nexit 101\n' > "$R/usr/sbin/policy-rc.d"; chmod +x "$R/usr/sbin/policy-rc.d"
mount -t proc proc "$R/proc"
# shellcheck disable=SC2046
chroot "$R" sh -c "apt-get -o Acquire::Languages=none update -qq && apt-get install -y -qq --no-install-recommends \
    $(packages stage2)" >>"$LOG" 2>&1 || fail "apt-get install in the guest root"
umount "$R/proc"
rm -f "$R/usr/sbin/policy-rc.d" "$R/etc/resolv.conf"
rm -rf "$R"/var/cache/apt/archives/*.deb "$R"/var/lib/apt/lists/*
chroot "$R" dpkg-query -W -f '${Package} ${Version}\n' > "$BUILD/kernel/packages.txt"

step "guest setup: kernel modules ($KV), the suite's service, systemd quieted"
M="$R/lib/modules/$KV"
mkdir -p "$M/kernel/drivers"
cp "$BUILD/kx/lib/modules/$KV"/modules.* "$M/"
for d in arch block crypto fs lib mm net virt; do cp -a "$BUILD/kx/lib/modules/$KV/kernel/$d" "$M/kernel/"; done
for d in virtio block char net md; do cp -a "$BUILD/kx/lib/modules/$KV/kernel/drivers/$d" "$M/kernel/drivers/"; done
rm -rf "$M"/kernel/drivers/net/{wireless,ethernet,usb,can}
chroot "$R" depmod "$KV"
install -m 755 "$VM_DIR/guest/balloonlab-v2-run" "$R/usr/local/sbin/balloonlab-v2-run"
install -m 755 "$VM_DIR/guest/balloonlab-v2-provision" "$R/usr/local/sbin/balloonlab-v2-provision"
install -m 644 "$VM_DIR/guest/balloonlab-v2.service" "$R/etc/systemd/system/balloonlab-v2.service"
mkdir -p "$R/etc/systemd/system/multi-user.target.wants"
ln -sf /etc/systemd/system/balloonlab-v2.service "$R/etc/systemd/system/multi-user.target.wants/"
# Docker starts when a test asks for it (systemctl start docker), not at every boot.
chroot "$R" systemctl disable docker.service docker.socket containerd.service >>"$LOG" 2>&1 || true
for unit in serial-getty@ttyS0.service getty@tty1.service apt-daily.timer apt-daily-upgrade.timer \
    e2scrub_all.timer fstrim.timer systemd-timesyncd.service; do
    ln -sf /dev/null "$R/etc/systemd/system/$unit"
done
echo v2guest > "$R/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 v2guest\n' > "$R/etc/hosts"
printf '/dev/vda / ext4 rw,relatime 0 1\n' > "$R/etc/fstab"
chroot "$R" passwd -d root >/dev/null

step "initramfs: busybox + virtio_pci, virtio_blk, ext4"
I="$BUILD/initramfs"
mkdir -p "$I"/{bin,proc,sys,dev,newroot}
cp /bin/busybox "$I/bin/busybox"
install -m 755 "$VM_DIR/guest/initramfs-init" "$I/init"
python3 "$VM_DIR/mkinitramfs.py" "$KV" "$R" "$I" virtio_pci virtio_blk ext4 crc32c_intel >>"$LOG"
(cd "$I" && find . | /bin/busybox cpio -o -H newc 2>/dev/null | gzip -1 > "$BUILD/kernel/initrd.gz")

step "root image: mkfs.ext4 -d"
mkfs.ext4 -q -F -L root -d "$R" "$BUILD/kernel/rootfs.ext4" 4G >>"$LOG" 2>&1 || fail "mkfs.ext4"
rm -rf "$R"

step "provisioning boot (writable root): Docker's images for the suite"
P="$BUILD/provision"
mkdir -p "$P/job"
touch "$P/job/.balloonlab-v2-provision"
tar -C "$P/job" -cf "$P/job.tar" ./.balloonlab-v2-provision && truncate -s %1M "$P/job.tar"
truncate -s 256M "$P/swap.img" && mkswap "$P/swap.img" >/dev/null
truncate -s 16M "$P/results.img"
boot_guest "$BUILD/kernel" "file=$BUILD/kernel/rootfs.ext4,if=virtio,format=raw" "$P/job.tar" "$P/swap.img" \
    "$P/results.img" "$P/serial.log" "${BALLOONLAB_VM_PROVISION_TIMEOUT:-2400}" >&2 || true
mkdir -p "$P/results" && tar -xf "$P/results.img" -C "$P/results" 2>/dev/null || true
[ "$(cat "$P/results/rc" 2>/dev/null)" = 0 ] || { cat "$P/serial.log" >> "$LOG"; fail "the provisioning boot failed"; }
fsck_rc=0
e2fsck -f -y "$BUILD/kernel/rootfs.ext4" >>"$LOG" 2>&1 || fsck_rc=$?
[ "$fsck_rc" -le 1 ] || fail "e2fsck after the provisioning boot (rc $fsck_rc)"
rm -rf "$P"

{ echo "key $KEY"; echo "kernel $KV"; echo "suite $SUITE"; echo "mirror $MIRROR"; echo "built $(date -u +%FT%TZ) in $(( $(date +%s) - T0 )) s"; } \
    > "$BUILD/kernel/manifest.txt"
touch "$BUILD/kernel/complete"
rm -rf "$IMAGE"
mv "$BUILD/kernel" "$IMAGE"
prune_images "$IMAGE"
step "image $IMAGE ($(du -sh "$IMAGE" | cut -f1))"
echo "$IMAGE"
