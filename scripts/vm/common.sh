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

# Boot the guest once: boot_guest KERNEL_DIR ROOT_DRIVE JOB_TAR SWAP_IMG RESULTS_IMG SERIAL
# TIMEOUT_S. KERNEL_DIR holds vmlinux and initrd.gz; ROOT_DRIVE is the -drive option of the
# root image (snapshot=on for a test run, writable for the image build's provisioning boot). Disks in the guest: vda root, vdb the
# job (a tar), vdc swap, vdd results (a tar the guest writes). Sets QEMU_PID while it runs, so
# the caller's EXIT trap can stop it; returns qemu's exit code (124/137: killed at TIMEOUT_S).
boot_guest() {
    local image_dir="$1" root_drive="$2" job="$3" swap="$4" results="$5" serial="$6" timeout_s="$7"
    local accel_args rc=0
    if [ "$(accelerator)" = kvm ]; then accel_args=(-enable-kvm -cpu host)
    else accel_args=(-accel tcg,thread=multi,tb-size=256 -cpu max); fi
    timeout -k 10 "$timeout_s" qemu-system-x86_64 "${accel_args[@]}" -smp "${CPUS:-2}" -m "${MEMORY:-2048}" \
        -display none -no-reboot -nodefaults -nic none -serial "file:$serial" \
        -bios /usr/share/qemu/qboot.rom -kernel "$image_dir/vmlinux" -initrd "$image_dir/initrd.gz" \
        -append "console=ttyS0 root=/dev/vda rw init=/lib/systemd/systemd quiet loglevel=4 panic=1 psi=1 \
systemd.unified_cgroup_hierarchy=1 systemd.mask=serial-getty@ttyS0.service systemd.show_status=auto apparmor=0" \
        -drive "$root_drive" \
        -drive "file=$job,if=virtio,format=raw,readonly=on" \
        -drive "file=$swap,if=virtio,format=raw,cache=unsafe" \
        -drive "file=$results,if=virtio,format=raw" &
    QEMU_PID=$!
    touch "$serial"
    tail -n +1 -f --pid="$QEMU_PID" "$serial" | sed -u 's/^/vm| /' &
    wait "$QEMU_PID" || rc=$?
    QEMU_PID=""
    sleep 0.5   # tail's last lines
    return "$rc"
}

# Images in use are share-locked (flock -s on their `complete` file) by every run for as long
# as it boots from them; a builder removes an old image only when it can take that lock
# exclusively, and keeps the KEEP_IMAGES newest (two trees with different recipes, e.g. main
# and a branch, then do not rebuild each other's image on every run).
KEEP_IMAGES="${BALLOONLAB_VM_KEEP_IMAGES:-3}"
prune_images() {
    local keep="$1" dir n=0
    for dir in $(ls -dt "$CACHE"/image-* 2>/dev/null); do
        [ "$dir" = "$keep" ] && continue
        n=$((n + 1))
        [ "$n" -lt "$KEEP_IMAGES" ] && continue
        if [ ! -e "$dir/complete" ]; then rm -rf "$dir"; continue; fi
        ( flock -n -x 7 || exit 0; rm -rf "$dir"; echo "vm-build: removed the old image $dir" >&2 ) 7<"$dir/complete"
    done
}
