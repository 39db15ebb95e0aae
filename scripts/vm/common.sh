# Shared by scripts/vm/*.sh (sourced): the cache location, the image's cache key, host packages.
VM_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${BALLOONLAB_VM_CACHE:-/var/cache/balloonlab-vm}"
SUITE="${BALLOONLAB_VM_SUITE:-bookworm}"
MIRROR="${DEBIAN_MIRROR:-$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
APT=(apt-get -o DPkg::Lock::Timeout=900 -y -qq --no-install-recommends)
export DEBIAN_FRONTEND=noninteractive

# The image is keyed on its inputs: the package list, every recipe file here, the Debian
# suite. Any change gives a new key, so a new image (the old one is removed).
image_key() {
    (cd "$VM_DIR" && { echo "$SUITE"; cat packages.txt build-image.sh common.sh mkinitramfs.py \
        extract-vmlinux.py guest/*; } | sha256sum | cut -c1-16)
}

# qemu (with qboot), busybox-static for the initramfs, debootstrap and mkfs.ext4 on the host.
ensure_host_packages() {
    local need=()
    command -v qemu-system-x86_64 >/dev/null && [ -e /usr/share/qemu/qboot.rom ] || need+=(qemu-system-x86)
    [ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx switch_root || need+=(busybox-static)
    command -v debootstrap >/dev/null || need+=(debootstrap)
    command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
    if [ ${#need[@]} -gt 0 ]; then
        echo "vm: apt-get install ${need[*]}"
        apt-get -o DPkg::Lock::Timeout=900 update -qq
        "${APT[@]}" install "${need[@]}" >/dev/null
    fi
}

# TCG unless the CPU has real VT-x/AMD-V and /dev/kvm is a usable KVM (not PVM, which cannot
# run a stock kernel: see ../shared/reference/vm-lane.md).
accelerator() {
    if [ -n "${BALLOONLAB_VM_ACCEL:-}" ]; then echo "$BALLOONLAB_VM_ACCEL"; return; fi
    if [ -w /dev/kvm ] && grep -qwE 'vmx|svm' /proc/cpuinfo && [ ! -d /sys/module/kvm_pvm ] \
        && { [ -d /sys/module/kvm_intel ] || [ -d /sys/module/kvm_amd ]; }; then
        echo kvm
    else
        echo tcg
    fi
}
