# Requests in flight when the vhost-user-blk worker dies are resubmitted by the next
# worker (the inflight region QEMU keeps), even when later requests completed before
# them. A VM (helpers/vm.sh) overwrites blocks of 4 files from 4 writers at once
# (O_DIRECT, on 2 queues); the worker is made to hold one request for 10 s (fault
# injection) and complete later ones first, and is killed while it holds it, 3 times.
# The new worker logs the resubmission, the guest sees no I/O error, and every block
# holds what the guest wrote last (read back in the guest with O_DIRECT, and from the
# image after the VM is off); e2fsck is clean.
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/helpers/vm.sh"

cat >"$T/init" <<'GUEST'
#!/bin/busybox sh
. /vm-boot # helpers/vm.sh: busybox, /proc /sys /dev /tmp, the modules, /dev/vda
mount -t ext4 /dev/vda /mnt || { echo "GUEST-IOERROR mount"; poweroff -f; }
# Four files whose blocks are then overwritten in place with O_DIRECT: each write is one
# request of its own that no other waits for (no journal), so requests complete out of
# order around a held one.
for j in 1 2 3 4; do
    dd if=/dev/zero of=/mnt/f$j bs=64k count=8 conv=fsync 2>/dev/null || echo "GUEST-IOERROR f$j"
done
sync
echo BOOTED
round=0
while read -r cmd arg; do
    case "$cmd" in
    burst)
        round=$((round + 1))
        for j in 1 2 3 4; do
            (
                k=0
                while [ $k -lt "$arg" ]; do
                    dd if=/dev/urandom of=/tmp/b$j bs=64k count=1 2>/dev/null
                    echo "SRC $(sha256sum /tmp/b$j | cut -d' ' -f1) f$j:$k"
                    dd if=/tmp/b$j of=/mnt/f$j bs=64k seek=$k count=1 conv=notrunc oflag=direct 2>/dev/null ||
                        echo "GUEST-IOERROR f$j:$k"
                    k=$((k + 1))
                done
            ) &
        done
        wait
        echo "BURST-DONE $round"
        ;;
    quit)
        for j in 1 2 3 4; do
            for k in 0 1 2 3 4 5 6 7; do
                echo "DISK $(dd if=/mnt/f$j bs=64k skip=$k count=1 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1) f$j:$k"
            done
        done
        umount /mnt || echo "GUEST-IOERROR umount"
        dmesg | grep -iE 'i/o error|blk_update_request|EXT4-fs error|Buffer I/O|virtio' | sed 's/^/GUEST-DMESG /'
        echo QUIT-DONE
        poweroff -f
        ;;
    esac
done
GUEST
vm_initramfs "$T/init"

ARM=$T/hold
FLEECEFS_FAULT_VHOST_HOLD=10000,$ARM vm_disk 64
LOG=$T/state/fleecefs.log
field() { status_json "$T/mnt" "$1"; }
held() { grep -c "holding request" "$LOG" || true; }
completed() { field 'd["vhost_user_blk"][0]["requests"]'; }
released() { grep -c "released request" "$LOG" || true; }
# wait_released N : until the workers completed more than N held requests
wait_released() {
    local i
    for i in $(seq 300); do
        [ "$(released)" -gt "$1" ] && return 0
        sleep 0.05
    done
    fail "the worker did not complete the request it held"
}
vm_start "$SOCK" 2
wait_console BOOTED 240

# --- kill the worker while a request is held and a later one has completed --------------
# Each attempt arms the hold and starts a burst of its own (its first request is held
# while the other writers go on); an attempt whose held request had no later one complete beside it (the
# burst ended, or the held request was one the others wait for) lets it go, waits for
# the burst's end, and tries again.
kills=0 bursts=0
for round in 1 2 3; do
    killed=
    for attempt in 1 2 3 4 5; do
        bursts=$((bursts + 1))
        before=$(held) released0=$(released)
        touch "$ARM" # the worker holds the next request it takes, for 10 s
        echo "burst 8" >&3
        for i in $(seq 100); do
            [ "$(held)" -gt "$before" ] && break
            sleep 0.05
        done
        [ "$(held)" -gt "$before" ] || fail "round $round: no request was held (the guest idle?)"
        pid=$(field 'd["worker_pid"]')
        done0=$(completed)
        # A later request completes while this one is held (within 5 s, half the hold).
        end=$(($(date +%s) + 5))
        while [ "$(completed)" -le "$done0" ] && [ "$(date +%s)" -lt "$end" ]; do sleep 0.05; done
        if [ "$(completed)" -gt "$done0" ]; then
            kill -9 "$pid"
            killed=1
            break
        fi
        wait_released "$released0"
        wait_console "BURST-DONE $bursts" 240
    done
    [ -n "$killed" ] || fail "round $round: no later request completed while one was held"
    kills=$((kills + 1))
    [ "$(released)" = "$released0" ] || fail "round $round: the held request completed before the kill"
    wait_new_worker "$T/mnt" "$pid"
    wait_console "BURST-DONE $bursts" 240
done
resubmitted=$(grep -c "resubmitting .* request(s) in flight" "$LOG" || true)
[ "$resubmitted" -ge "$kills" ] ||
    fail "$kills kills with requests held, $resubmitted resubmissions logged: $(grep -E 'resubmit|inflight' "$LOG" | tail -5)"

echo "quit" >&3
wait_console QUIT-DONE 120
wait "$QEMU_PID" 2>/dev/null || true
if grep -q GUEST-IOERROR "$T/console.log"; then
    fail "the guest saw I/O errors: $(grep GUEST-IOERROR "$T/console.log" | head -5)"
fi
if grep -qiE 'GUEST-DMESG.*(error|not a head|broken)' "$T/console.log"; then
    fail "the guest's kernel complained: $(grep GUEST-DMESG "$T/console.log" | head -5)"
fi
[ "$(field 'd["vhost_user_blk"][0]["errors"]')" = 0 ] || fail "the export counted errors"

# --- the data: the last write of every block is what the guest reads back (O_DIRECT) and
# what the image holds ----------------------------------------------------------------
grep '^SRC ' "$T/console.log" | tr -d '\r' | awk '{ last[$3] = $2 } END { for (b in last) print last[b], b }' |
    sort -k2 >"$T/src"
[ "$(wc -l <"$T/src")" = 32 ] || fail "expected 32 blocks written, $(wc -l <"$T/src")"
grep '^DISK ' "$T/console.log" | tr -d '\r' | sed 's/^DISK //' | sort -k2 | join -1 2 -2 2 -o 1.1,1.2 - "$T/src" >"$T/disk"
cmp -s "$T/src" "$T/disk" || fail "the guest reads back other data than it wrote last: $(diff "$T/src" "$T/disk" | head -5)"
"$FLEECEFS" unmount "$T/mnt" >/dev/null
e2fsck -fn "$T/vm.img" >"$T/fsck.log" 2>&1 || fail "e2fsck -fn of the image: $(tail -20 "$T/fsck.log")"
mkdir "$T/img"
LOOPS+=("$T/img")
mount -o ro,loop "$T/vm.img" "$T/img"
while read -r sum block; do
    f=${block%:*} k=${block#*:}
    [ "$(dd if="$T/img/$f" bs=64k skip="$k" count=1 2>/dev/null | sha256sum | cut -d' ' -f1)" = "$sum" ] ||
        fail "block $block of the image is not what the guest wrote last"
done <"$T/src"
umount "$T/img"
echo "ok: $kills worker kills with requests held behind completed ones; $resubmitted resubmissions, no guest I/O error, data intact"
