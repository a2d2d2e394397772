# A real VM on a vhost-user-blk export (helpers/vm.sh): its disk is
# `--vhost-user-blk vm=SOCKET` over an ext4 image. The guest writes files with sync
# (each checked) while the worker is killed three times and restarted once (QEMU
# reconnects, the new worker resubmits the requests in flight), then while a backup
# copies snapshot/vm. The guest sees no I/O error, the disk's serial is the device name,
# a resize shows in the guest, and the backup is a clean ext4 (after replaying its
# journal at most) holding every file synced before setup.
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/helpers/vm.sh"

cat >"$T/init" <<'EOF'
#!/bin/busybox sh
. /vm-boot # helpers/vm.sh: busybox, /proc /sys /dev /tmp, the modules, /dev/vda
echo "SERIAL $(cat /sys/block/vda/serial 2>/dev/null)"
mount -t ext4 /dev/vda /mnt || { echo "GUEST-IOERROR mount"; poweroff -f; }
for i in 1 2 3 4 5 6 7 8; do
    dd if=/dev/urandom of=/mnt/pre$i bs=64k count=4 conv=fsync 2>/dev/null || echo "GUEST-IOERROR pre$i"
done
sync
(cd /mnt && sha256sum pre*) | sed 's/^/SUM /'
echo PRE-DONE
n=0
while read -r cmd arg; do
    case "$cmd" in
    write)
        k=0
        while [ $k -lt "$arg" ]; do
            n=$((n + 1)); k=$((k + 1))
            dd if=/dev/urandom of=/mnt/d$n bs=4k count=32 conv=fsync 2>/dev/null || echo "GUEST-IOERROR d$n"
            sync || echo "GUEST-IOERROR sync"
            cat /mnt/d$n >/dev/null || echo "GUEST-IOERROR read d$n"
        done
        echo "WROTE $n"
        ;;
    size)
        echo "SIZE $(cat /sys/block/vda/size)"
        ;;
    quit)
        umount /mnt || echo "GUEST-IOERROR umount"
        dmesg | grep -iE 'i/o error|blk_update_request|EXT4-fs error|Buffer I/O' | sed 's/^/GUEST-IOERROR dmesg /'
        echo QUIT-DONE
        poweroff -f
        ;;
    esac
done
EOF
vm_initramfs "$T/init"

# --- the export --------------------------------------------------------------------------
M=$((1 << 20))
vm_disk 128
field() { status_json "$T/mnt" "$1"; }

vm_start "$SOCK" 2

wait_console PRE-DONE 240
grep -q "^SERIAL vm" "$T/console.log" || fail "the disk's serial is not the device name: $(grep SERIAL "$T/console.log")"
grep '^SUM ' "$T/console.log" | sed 's/^SUM //; s/\r$//' >"$T/sums"
[ "$(wc -l <"$T/sums")" = 8 ] || fail "expected 8 checksums from the guest"

# --- phase 1: the worker killed three times while the guest writes ----------------------
echo "write 30" >&3
for k in 1 2 3; do
    sleep 0.5
    pid=$(field 'd["worker_pid"]')
    kill -9 "$pid"
    wait_new_worker "$T/mnt" "$pid"
done
# and a planned restart: the requests being served are drained first
sleep 0.5
"$FLEECEFS" restart "$T/mnt" >/dev/null || fail "fleecefs restart failed"
wait_connected "$T/mnt"
wait_console "WROTE 30" 240
[ "$(field 'd["worker_restarts"]')" = 4 ] || fail "expected 4 worker restarts"

# --- phase 2: a backup while the guest writes --------------------------------------------
"$FLEECEFS" setup "$T/mnt" --target t >/dev/null
echo "write 20" >&3
cp --sparse=always "$T/mnt/snapshot/vm" "$T/backup.img"
wait_console "WROTE 50" 240
"$FLEECEFS" teardown "$T/mnt" --target t --success >/dev/null
# --- a resize: the guest sees the new capacity without a reboot ---------------------------
"$FLEECEFS" resize "$T/mnt" vm +64M >/dev/null
for i in $(seq 100); do
    echo "size" >&3
    sleep 0.2
    grep -q "^SIZE $((192 * M / 512))" "$T/console.log" && break
done
grep -q "^SIZE $((192 * M / 512))" "$T/console.log" ||
    fail "the guest does not see the new size: $(grep '^SIZE' "$T/console.log" | tail -1)"
echo "quit" >&3
wait_console QUIT-DONE 60
wait $QEMU_PID 2>/dev/null || true
if grep -q GUEST-IOERROR "$T/console.log"; then
    fail "the guest saw I/O errors: $(grep GUEST-IOERROR "$T/console.log" | head -5)"
fi
[ "$(field 'd["vhost_user_blk"][0]["errors"]')" = 0 ] || fail "the export counted errors"

# --- the backup: clean ext4 (a journal to replay at most), the files synced before setup --
if dumpe2fs -h "$T/backup.img" 2>/dev/null | grep -q '^Filesystem features:.*needs_recovery'; then
    rcy=0
    e2fsck -E journal_only -y "$T/backup.img" >"$T/fsck-y.log" 2>&1 || rcy=$?
    [ "$rcy" -lt 4 ] || fail "replaying the backup's journal failed (exit $rcy): $(tail -20 "$T/fsck-y.log")"
fi
e2fsck -fn "$T/backup.img" >"$T/fsck.log" 2>&1 || fail "e2fsck -fn of the backup: $(tail -20 "$T/fsck.log")"
mkdir "$T/b"
LOOPS+=("$T/b")
mount -o ro,loop "$T/backup.img" "$T/b"
(cd "$T/b" && sha256sum --quiet -c "$T/sums") >"$T/sums.log" 2>&1 ||
    fail "files synced before setup differ in the backup: $(head "$T/sums.log")"
umount "$T/b"
echo "ok: a VM on the vhost-user-blk export: 3 worker kills, a restart and a backup during guest writes, no guest I/O error, backup clean"
