#!/usr/bin/env bash
# The rows of the errno table in docs/usage.md that no other test
# checks, on a real mount, plus the restore commands the docs give (and `cp` onto
# live/NAME failing with EPERM, as documented). The other rows and their tests:
#   live write ENOSPC / short count: fidelity_end; source's errno (not a device error),
#   fallocate ENOSPC past the end, other modes EOPNOTSUPP: fidelity_blockdev;
#   break-guest-write errnos: policy_fleecing_errors (ENOSPC), engine_timeout (ETIMEDOUT,
#   also discard ETIMEDOUT); live read EIO on a shrunken source: core_sources_and_crashes;
#   truncate EPERM/EROFS, snapshot write EROFS, open ENOENT, fallocate EOPNOTSUPP,
#   .dirty open EROFS, ESTALE reads: mount_core errnos_of_snapshot_live_and_dirty_map;
#   snapshot read EACCES: core_discard_fallocate; read EIO when broken:
#   policy_fleecing_errors; fstat ESTALE, mmap SIGBUS: fidelity_mmap; other user EACCES:
#   control_hardening; lseek: fidelity_seek.
source "$(dirname "$0")/lib.sh"

M=$((1 << 20))
head -c $((4 * M)) /dev/urandom >"$T/a.img"
fmount "$T/mp" --state-dir "$T/st" --device d="$T/a.img"
"$FLEECEFS" setup "$T/mp" --target t >/dev/null
python3 - "$T/mp" "$FLEECEFS" <<'PY' || fail "an errno differs from docs/usage.md"
import errno, os, subprocess, sys
mp, fleecefs = sys.argv[1], sys.argv[2]
live, snap, dirty = f"{mp}/live/d", f"{mp}/snapshot/d", f"{mp}/snapshot/d.dirty"
bad = 0
def expect(what, want, f):
    global bad
    try:
        f()
        got = None
    except OSError as e:
        got = e.errno
    name = lambda n: "success" if n is None else errno.errorcode.get(n, str(n))
    ok = got == want
    print(f"{'ok ' if ok else 'BAD'} {what}: {name(got)} (want {name(want)})")
    bad += not ok
def fallocate(fd, mode, off, n):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.fallocate(fd, mode, ctypes.c_long(off), ctypes.c_long(n)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
PUNCH = 0x02 | 0x01
# live/NAME
expect("live chmod", errno.EPERM, lambda: os.chmod(live, 0o600))
expect("live chown", errno.EPERM, lambda: os.chown(live, 1, 1))
expect("live utime", None, lambda: os.utime(live, (1, 1)))
expect("live truncate to the same size", None, lambda: os.truncate(live, 4 << 20))
expect("live SEEK_DATA at the end", errno.ENXIO, lambda: os.lseek(os.open(live, os.O_RDONLY), 4 << 20, os.SEEK_DATA))
# snapshot/NAME
expect("snapshot chmod", errno.EPERM, lambda: os.chmod(snap, 0o400))
expect("snapshot chown", errno.EPERM, lambda: os.chown(snap, 1, 1))
expect("snapshot utime", None, lambda: os.utime(snap, (1, 1)))
fd = os.open(snap, os.O_RDONLY)
expect("snapshot fsync", None, lambda: os.fsync(fd))
expect("snapshot SEEK_HOLE past the end", errno.ENXIO, lambda: os.lseek(fd, 5 << 20, os.SEEK_HOLE))
# snapshot/NAME.dirty
expect("dirty map truncate", errno.EROFS, lambda: os.truncate(dirty, 0))
expect("dirty map utime", None, lambda: os.utime(dirty, (1, 1)))
expect("dirty map chmod", errno.EPERM, lambda: os.chmod(dirty, 0o400))
# directories: the tree is fixed
for what, f in [
    ("create", lambda: os.close(os.open(f"{mp}/live/new", os.O_CREAT | os.O_WRONLY, 0o600))),
    ("mkdir", lambda: os.mkdir(f"{mp}/snapshot/x")),
    ("mknod", lambda: os.mknod(f"{mp}/live/n", 0o600 | 0o010000)),
    ("mkfifo", lambda: os.mkfifo(f"{mp}/x")),
    ("link", lambda: os.link(live, f"{mp}/live/e")),
    ("symlink", lambda: os.symlink("d", f"{mp}/live/s")),
    ("unlink", lambda: os.unlink(live)),
    ("rmdir", lambda: os.rmdir(f"{mp}/live")),
    ("rename", lambda: os.rename(live, f"{mp}/live/e")),
]:
    expect(f"directory {what}", errno.EPERM, f)
# extended attributes
expect("getxattr", errno.EOPNOTSUPP, lambda: os.getxattr(live, "user.x"))
expect("listxattr", errno.EOPNOTSUPP, lambda: os.listxattr(live))
expect("setxattr", errno.EOPNOTSUPP, lambda: os.setxattr(live, "user.x", b"1"))
# handles of an ended access: ESTALE for read, discard and fstat
rw = os.open(snap, os.O_RDWR)
dfd = os.open(dirty, os.O_RDONLY)
subprocess.run([fleecefs, "teardown", mp, "--target", "t", "--failure"], check=True, capture_output=True)
expect("snapshot read after teardown", errno.ESTALE, lambda: os.pread(rw, 4096, 0))
expect("snapshot discard after teardown", errno.ESTALE, lambda: fallocate(rw, PUNCH, 0, 65536))
expect("snapshot fstat after teardown", errno.ESTALE, lambda: os.fstat(rw))
expect("snapshot lseek after teardown", errno.ESTALE, lambda: os.lseek(rw, 0, os.SEEK_DATA))
expect("dirty map read after teardown", errno.ESTALE, lambda: os.pread(dfd, 100, 0))
expect("snapshot open after teardown", errno.ENOENT, lambda: os.open(snap, os.O_RDONLY))
sys.exit(1 if bad else 0)
PY

# restore: `dd conv=notrunc` and `qemu-img convert -n` write an image back onto
# live/NAME; `cp` fails with EPERM (it truncates the target first)
head -c $((4 * M)) /dev/urandom >"$T/backup.img"
dd if="$T/backup.img" of="$T/mp/live/d" bs=1M conv=notrunc,fsync status=none || fail "dd restore failed"
cmp "$T/backup.img" "$T/a.img" || fail "dd restore wrote something else"
head -c $((4 * M)) /dev/urandom >"$T/backup2.img"
truncate -s $((1 * M)) "$T/backup2.img" && truncate -s $((4 * M)) "$T/backup2.img" # a hole at the end
qemu-img convert -n -f raw -O raw "$T/backup2.img" "$T/mp/live/d" || fail "qemu-img convert -n restore failed"
cmp "$T/backup2.img" "$T/a.img" || fail "qemu-img convert -n restore wrote something else"
expect_fail_with "Operation not permitted" cp "$T/backup.img" "$T/mp/live/d"
cmp "$T/backup2.img" "$T/a.img" || fail "a refused cp changed the image"
echo "fidelity_errnos: ok"
