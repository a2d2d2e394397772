#!/usr/bin/env bash
# copy and restore run as root and never follow another user's symlink to a file:
# `copy --incremental DEST` refuses a symlink at DEST, a symlink owned by a user on the
# way to it, a DEST with a second hard link (before: a user's symlink grew a 17-byte
# root file to the device's size) and a DEST of neither the device's size nor its size
# at a previous backup; a full copy refuses a user's symlinked directory;
# `restore` refuses a backup that is a user's symlink (it would write a root file into
# the disk), also as the backing file a qcow2 backup names, and a backing file outside
# the backup's directory unless the operator allows it with --backing-dir. The files they
# point to are left as they were.
source "$(dirname "$0")/lib.sh"

other_user
chmod 755 "$T"
mkdir -m 1777 "$T/pub"
mkdir -m 700 "$T/root"
printf 'root file 17 byte' >"$T/root/victim"
head -c $((4 << 20)) /dev/urandom >"$T/root/secret.img"
intact() {
    [ "$(cat "$T/root/victim")" = "root file 17 byte" ] || fail "$1: the root file was changed"
}

head -c $((4 << 20)) /dev/urandom >"$T/src.img"
cp "$T/src.img" "$T/orig.img"
fmount "$T/mnt" --state-dir "$T/state" --device disk="$T/src.img"
# A new bitmap: the dirty map covers the whole device, so an incremental copy onto a
# smaller file would grow it to the device's size.
"$FLEECEFS" setup "$T/mnt" --target t --bitmap b >/dev/null
as_user mkdir "$T/pub/u"
as_user ln -s "$T/root/victim" "$T/pub/u/img"
expect_fail_with "is a symlink" "$FLEECEFS" copy --incremental "$T/mnt" disk "$T/pub/u/img"
intact "symlink at DEST"
as_user ln -s "$T/root" "$T/pub/u/dir"
expect_fail_with "$T/pub/u/dir is a symlink owned by uid $UID_U" \
    "$FLEECEFS" copy --incremental "$T/mnt" disk "$T/pub/u/dir/victim"
intact "user's symlink on the way to DEST"
expect_fail_with "symlink owned by uid $UID_U" "$FLEECEFS" copy "$T/mnt" disk "$T/pub/u/dir/new.img"
[ ! -e "$T/root/new.img" ] || fail "a full copy created a file through a user's symlink"
ln "$T/root/victim" "$T/pub/u/hard" # as protected_hardlinks=0 would let the user
expect_fail_with "hard links" "$FLEECEFS" copy --incremental "$T/mnt" disk "$T/pub/u/hard"
intact "hard link at DEST"
# Even named directly, a regular file of neither the device's size nor a size the device
# had at a previous backup is refused (the dirty map covers the whole device: no
# previous backup), not grown.
printf 'root file 17 byte' >"$T/root/small"
expect_fail_with "is 17 bytes but the device is $((4 << 20)) bytes (the dirty map covers the whole device" \
    "$FLEECEFS" copy --incremental "$T/mnt" disk "$T/root/small"
[ "$(cat "$T/root/small")" = "root file 17 byte" ] || fail "a small regular file as DEST was changed"
# the real thing still works
"$FLEECEFS" copy "$T/mnt" disk "$T/full.img" >/dev/null
cmp "$T/full.img" "$T/orig.img" || fail "full copy differs"
"$FLEECEFS" teardown "$T/mnt" --target t --success >/dev/null

# restore: a backup that is a user's symlink to a root file is refused, the disk unchanged
as_user ln -s "$T/root/secret.img" "$T/pub/u/backup.img"
expect_fail_with "is a symlink" "$FLEECEFS" restore "$T/mnt" disk "$T/pub/u/backup.img"
expect_fail_with "symlink owned by uid $UID_U" "$FLEECEFS" restore "$T/mnt" disk "$T/pub/u/dir/secret.img"
# ... and so is a qcow2 backup whose backing file (named in its header) is such a symlink
qemu-img create -q -f qcow2 -b "$T/pub/u/backup.img" -F raw "$T/root/top.qcow2"
expect_fail_with "is a symlink" "$FLEECEFS" restore "$T/mnt" disk "$T/root/top.qcow2" --backing-dir "$T/pub/u"
# ... and a qcow2 backup whose header names a root file outside its own directory (no
# symlink at all): the header is the image writer's word, not the operator's
qemu-img create -q -f qcow2 -b "$T/root/secret.img" -F raw "$T/pub/u/evil.qcow2"
expect_fail_with "is not in the directory of the image that names it nor in a --backing-dir" \
    "$FLEECEFS" restore "$T/mnt" disk "$T/pub/u/evil.qcow2"
cmp "$T/mnt/live/disk" "$T/orig.img" || fail "a refused restore changed the disk"
# the operator may allow that directory
"$FLEECEFS" restore "$T/mnt" disk "$T/pub/u/evil.qcow2" --backing-dir "$T/root" >/dev/null ||
    fail "restore with --backing-dir was refused"
cmp "$T/mnt/live/disk" "$T/root/secret.img" || fail "restore with --backing-dir differs"
"$FLEECEFS" restore "$T/mnt" disk "$T/full.img" >/dev/null
echo "security_copy_paths: ok"
