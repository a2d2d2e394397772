# A small VM on a vhost-user-blk export, for the shell tests (source it after lib.sh):
# qemu-system-x86_64 (TCG: this machine's nested KVM is not dependable) boots Debian's
# kernel with a busybox initramfs built here around the test's own /init; its disk is
# the export's socket (`reconnect=1`, so QEMU comes back to a new worker).
#   vm_initramfs INIT       $T/initrd.gz: busybox, the virtio and ext4 modules, INIT as /init
#                           (INIT starts with `. /vm-boot`: applets, mounts, modules, /dev/vda)
#   vm_disk MIB             the VM's disk: an ext4 image $T/vm.img of MIB MiB, served as
#                           device vm at $T/mnt (state $T/state), exported at SOCK=$T/vm.sock
#   vm_start SOCKET QUEUES  boots it (QEMU_PID); the console is $T/console.log, fd 3 its input
#   wait_console TEXT SECS  until the guest printed TEXT
#   wait_connected MNT      until a VMM is connected to MNT's first export
#   wait_new_worker MNT PID until a worker other than PID serves MNT (10 s at most), then
#                           wait_connected MNT
QEMU=$(command -v qemu-system-x86_64) || fail "qemu-system-x86_64 is not installed"
BUSYBOX=$(command -v busybox) || fail "busybox is not installed (busybox-static)"
! ldd "$BUSYBOX" >/dev/null 2>&1 || fail "$BUSYBOX is not static (install busybox-static)"
KERNEL=$(ls -1v /boot/vmlinuz-* 2>/dev/null | tail -1)
[ -n "$KERNEL" ] || fail "no kernel in /boot (linux-image-amd64)"
KVER=${KERNEL#/boot/vmlinuz-}

vm_initramfs() {
    local init=$1 R=$T/initramfs ko
    mkdir -p "$R/bin" "$R/lib" "$R/proc" "$R/sys" "$R/dev" "$R/mnt" "$R/tmp"
    cp "$BUSYBOX" "$R/bin/busybox"
    for m in virtio_pci virtio_blk ext4; do
        modprobe -S "$KVER" --show-depends "$m" 2>/dev/null | awk '$1 == "insmod" { print $2 }'
    done | awk '!seen[$0]++' >"$T/modules"
    [ -s "$T/modules" ] || fail "no modules found for kernel $KVER"
    : >"$R/modules"
    while read -r ko; do
        case "$ko" in
        *.ko) cp "$ko" "$R/lib/" ;;
        *.ko.xz) xz -dc "$ko" >"$R/lib/$(basename "${ko%.xz}")"; ko=${ko%.xz} ;;
        *.ko.zst) zstd -qdc "$ko" >"$R/lib/$(basename "${ko%.zst}")"; ko=${ko%.zst} ;;
        *) fail "module $ko: unknown format" ;;
        esac
        basename "$ko" >>"$R/modules"
    done <"$T/modules"
    # What every test's /init does first (`. /vm-boot`): the shell's applets, the kernel's
    # filesystems, the modules, and the disk.
    cat >"$R/vm-boot" <<'BOOT'
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
for m in $(cat /modules); do insmod /lib/$m 2>/dev/null; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i + 1)); done
BOOT
    cp "$init" "$R/init"
    chmod +x "$R/init"
    (cd "$R" && find . | "$BUSYBOX" cpio -o -H newc 2>/dev/null | gzip -1) >"$T/initrd.gz"
}

vm_disk() {
    truncate -s $(($1 << 20)) "$T/vm.img"
    mkfs.ext4 -q -F "$T/vm.img"
    SOCK=$T/vm.sock
    fmount "$T/mnt" --state-dir "$T/state" --device vm="$T/vm.img" --vhost-user-blk vm="$SOCK"
}

vm_start() {
    local sock=$1 queues=$2
    mkfifo "$T/console.in"
    "$QEMU" -machine q35,accel=tcg -cpu qemu64 -smp 2 -m 256 -nodefaults -no-reboot \
        -object memory-backend-memfd,id=mem,size=256M,share=on -numa node,memdev=mem \
        -kernel "$KERNEL" -initrd "$T/initrd.gz" -append "console=ttyS0 panic=-1 quiet" \
        -chardev socket,id=disk,path="$sock",reconnect=1 \
        -device vhost-user-blk-pci,chardev=disk,num-queues="$queues" \
        -display none -serial stdio -monitor none \
        <"$T/console.in" >"$T/console.log" 2>"$T/qemu.err" &
    QEMU_PID=$!
    exec 3>"$T/console.in"
    # (cleanup exits with the status it finds: the test's, not the kill's)
    trap 'rc=$?; kill -9 "$QEMU_PID" 2>/dev/null || true; (exit $rc); cleanup' EXIT
}

wait_console() {
    local i
    for i in $(seq $(($2 * 10))); do
        grep -q "$1" "$T/console.log" && return 0
        kill -0 "$QEMU_PID" 2>/dev/null || fail "qemu exited: $(tail -5 "$T/qemu.err") $(tail -20 "$T/console.log")"
        sleep 0.1
    done
    fail "the guest did not print '$1' within $2 s: $(tail -20 "$T/console.log")"
}

wait_connected() {
    local i
    for i in $(seq 200); do
        [ "$(status_json "$1" 'd["vhost_user_blk"][0]["connected"]' 2>/dev/null)" = True ] && return 0
        sleep 0.05
    done
    fail "the VMM did not reconnect within 10 s"
}

wait_new_worker() {
    local i new
    for i in $(seq 200); do
        new=$(status_json "$1" 'd["worker_pid"]' 2>/dev/null || true)
        [ -n "$new" ] && [ "$new" != "$2" ] && break
        sleep 0.05
    done
    wait_connected "$1"
}
