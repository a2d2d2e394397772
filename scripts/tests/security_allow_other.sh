#!/usr/bin/env bash
# --allow-other shows nobody a file they could not reach at its source: a 0644 image in a
# 0700 directory is 0600 in live/ and snapshot/ (and the directories 0500), so another
# user can neither list nor read it; an image its owner may use is theirs through the
# mount too; --mode/--uid/--gid set owners and modes explicitly; a bad --mode is refused.
source "$(dirname "$0")/lib.sh"

other_user
chmod 755 "$T"

# 1. a 0644 image in a 0700 directory
mkdir -m 700 "$T/private"
head -c $((4 << 20)) /dev/urandom >"$T/private/a.img"
chmod 644 "$T/private/a.img"
fmount "$T/m1" --state-dir "$T/st1" --allow-other --device a="$T/private/a.img"
"$FLEECEFS" setup "$T/m1" --target t >/dev/null
[ "$(stat -c %a "$T/m1/live/a")" = 600 ] || fail "live/a is $(stat -c %a "$T/m1/live/a"), not 600"
[ "$(stat -c %a "$T/m1/snapshot/a")" = 600 ] || fail "snapshot/a is $(stat -c %a "$T/m1/snapshot/a")"
[ "$(stat -c %a "$T/m1/snapshot/a.dirty")" = 400 ] || fail "a.dirty is $(stat -c %a "$T/m1/snapshot/a.dirty")"
[ "$(stat -c %a "$T/m1/live")" = 500 ] || fail "live/ is $(stat -c %a "$T/m1/live"), not 500"
if as_user head -c 4096 "$T/m1/live/a" >/dev/null 2>&1; then fail "another user read live/a through the mount"; fi
if as_user head -c 4096 "$T/m1/snapshot/a" >/dev/null 2>&1; then fail "another user read snapshot/a"; fi
if as_user ls "$T/m1/live" >/dev/null 2>&1; then fail "another user listed live/"; fi
head -c 4096 "$T/m1/live/a" >/dev/null || fail "root cannot read live/a"
"$FLEECEFS" teardown "$T/m1" --target t --failure >/dev/null

# 2. an image the user owns (0600) in a directory everyone may search: theirs via the mount
mkdir -m 755 "$T/open"
head -c $((4 << 20)) /dev/urandom >"$T/open/u.img"
chown "$U" "$T/open/u.img"
chmod 600 "$T/open/u.img"
fmount "$T/m2" --state-dir "$T/st2" --allow-other --device u="$T/open/u.img"
[ "$(stat -c '%a %u' "$T/m2/live/u")" = "600 $UID_U" ] || fail "live/u is $(stat -c '%a %u' "$T/m2/live/u")"
[ "$(stat -c '%a %u' "$T/m2/live")" = "500 $UID_U" ] || fail "live/ is $(stat -c '%a %u' "$T/m2/live")"
as_user cmp -n 65536 "$T/m2/live/u" "$T/open/u.img" || fail "the owner cannot read live/u"

# 3. explicit --mode/--uid/--gid; a bad --mode is refused
expect_fail_with "'0999' is not a mode" "$FLEECEFS" mount "$T/m1" --state-dir "$T/st3" --allow-other --mode 0999 --device a="$T/private/a.img"
"$FLEECEFS" unmount "$T/m1"
fmount "$T/m3" --state-dir "$T/st3" --allow-other --mode 0640 --uid 0 --gid "$UID_U" --device a="$T/private/a.img"
[ "$(stat -c '%a %u %g' "$T/m3/live/a")" = "640 0 $UID_U" ] || fail "live/a is $(stat -c '%a %u %g' "$T/m3/live/a")"
[ "$(stat -c '%a' "$T/m3/live")" = 550 ] || fail "live/ is $(stat -c '%a' "$T/m3/live"), not 550"
setpriv --reuid="$UID_U" --regid="$UID_U" --groups="$UID_U" head -c 65536 "$T/m3/live/a" |
    cmp - <(head -c 65536 "$T/private/a.img") ||
    fail "the group of --gid cannot read live/a"
echo "security_allow_other: ok"
