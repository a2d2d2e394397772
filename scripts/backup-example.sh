#!/usr/bin/env bash
# Incremental backups of one fleecefs device with plain shell tools.
# Usage: backup-example.sh MOUNTPOINT DEVICE BACKUP_DIR [TARGET]
# The first run writes a full image BACKUP_DIR/DEVICE.img; later runs copy only the ranges
# written since the last successful run onto it (bitmap TARGET). If anything fails, the
# access is torn down with --failure: the bitmap keeps every change and the next run
# copies them again, which also repairs an image left half-updated.
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: $0 MOUNTPOINT DEVICE BACKUP_DIR [TARGET]" >&2; exit 2; }
MP=$1 DEV=$2 DIR=$3 TARGET=${4:-backup-example}
FLEECEFS=${FLEECEFS:-fleecefs}
IMG=$DIR/$DEV.img SNAP=$MP/snapshot/$DEV
ACTIVE=
trap '[ -z "$ACTIVE" ] || "$FLEECEFS" teardown "$MP" --target "$TARGET" --failure >&2' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
setup=$("$FLEECEFS" setup "$MP" --target "$TARGET" --devices "$DEV" --bitmap "$TARGET" --json)
ACTIVE=1
action=$(sed -n 's/.*"bitmap_action": *"\([a-z-]*\)".*/\1/p' <<<"$setup")
if [ "$action" = used ]; then   # incremental: dirty ranges onto the previous image
    [ -f "$IMG" ] || { echo "$IMG is missing; run: $FLEECEFS bitmap remove $MP --target $TARGET" >&2; exit 1; }
    OUT=$IMG CONV=notrunc
else                            # full: a new sparse image, renamed over the old one at the end
    OUT=$IMG.new CONV=notrunc,sparse
    rm -f "$OUT" && truncate -s "$(stat -c %s "$SNAP")" "$OUT"
fi
while read -r off len; do       # copy a range, make it durable, then discard it (fallocate -p)
    dd if="$SNAP" of="$OUT" bs=4M iflag=skip_bytes,count_bytes oflag=seek_bytes \
        skip="$off" seek="$off" count="$len" conv="$CONV,fsync" status=none
    fallocate -p -o "$off" -l "$len" "$SNAP"
done <"$SNAP.dirty"
[ "$OUT" = "$IMG" ] || mv "$OUT" "$IMG"
sync "$IMG" "$DIR"
"$FLEECEFS" teardown "$MP" --target "$TARGET" --success >/dev/null
ACTIVE=
echo "$DEV: $([ "$action" = used ] && echo incremental || echo "full ($action)") backup in $IMG"
