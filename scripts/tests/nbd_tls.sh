#!/usr/bin/env bash
# NBD over TCP on 127.0.0.1: TLS with test certificates made here (openssl): a client with
# a certificate the CA signed reads the export (nbdcopy, and qemu-img with extended headers
# after STARTTLS, equal snapshot/NAME); without TLS it is refused (NBD_REP_ERR_TLS_REQD);
# with a certificate another CA signed it is refused in the TLS handshake. The mount
# refuses TCP without TLS credentials or --nbd-insecure, and --nbd-insecure serves clear
# text. A Unix socket in a directory other users can write is refused. TLS handshakes
# that never finish are closed at the negotiation's time limit. An idle TLS connection is
# closed by the teardown.
source "$(dirname "$0")/lib.sh"

M=$((1 << 20))
port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# cert DIR NAME CA_DIR [SAN] : a key and a certificate NAME signed by CA_DIR's CA
ca() {
    mkdir -p "$1"
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=test CA $(basename "$1")" \
        -keyout "$1/ca-key.pem" -out "$1/ca-cert.pem" 2>/dev/null
}
cert() {
    local dir=$1 name=$2 ca=$3 san=${4:-}
    openssl req -newkey rsa:2048 -nodes -subj "/CN=$name" -keyout "$dir/$name-key.pem" \
        -out "$T/$name.csr" 2>/dev/null
    printf 'basicConstraints=CA:FALSE\n%s\n' "${san:+subjectAltName=$san}" >"$T/$name.ext"
    openssl x509 -req -in "$T/$name.csr" -CA "$ca/ca-cert.pem" -CAkey "$ca/ca-key.pem" \
        -CAcreateserial -days 2 -extfile "$T/$name.ext" -out "$dir/$name-cert.pem" 2>/dev/null
}
ca "$T/ca"
ca "$T/rogue"
mkdir -p "$T/server" "$T/client" "$T/badclient"
cert "$T/server" server "$T/ca" "IP:127.0.0.1"
cp "$T/ca/ca-cert.pem" "$T/server/"
cert "$T/client" client "$T/ca"
cp "$T/ca/ca-cert.pem" "$T/client/"
cert "$T/badclient" client "$T/rogue"
cp "$T/ca/ca-cert.pem" "$T/badclient/"

truncate -s $((16 * M)) "$T/src.img"
random_mib "$T/src.img" 0 4
mkdir -p "$T/mnt"
P=$(port)
expect_fail_with "needs TLS" "$FLEECEFS" mount "$T/mnt" --state-dir "$T/state" \
    --device disk="$T/src.img" --nbd "tcp:127.0.0.1:$P"
expect_fail_with "not a socket" "$FLEECEFS" mount "$T/mnt" --state-dir "$T/state" \
    --device disk="$T/src.img" --nbd "unix:$T/src.img"
mkdir -m 0777 "$T/open"
expect_fail_with "socket directory" "$FLEECEFS" mount "$T/mnt" --state-dir "$T/state" \
    --device disk="$T/src.img" --nbd "unix:$T/open/s.sock"
expect_fail_with "server-cert.pem" "$FLEECEFS" mount "$T/mnt" --state-dir "$T/state" \
    --device disk="$T/src.img" --nbd "tcp:127.0.0.1:$P" --nbd-tls-creds "$T/client"
fmount "$T/mnt" --state-dir "$T/state" --device disk="$T/src.img" \
    --nbd "tcp:127.0.0.1:$P" --nbd-tls-creds "$T/server"
"$FLEECEFS" setup "$T/mnt" --target t >/dev/null

nbdcopy "nbds://127.0.0.1:$P/disk?tls-certificates=$T/client" "$T/copy.img" ||
    fail "a client with a certificate the CA signed cannot read"
cmp "$T/copy.img" "$T/mnt/snapshot/disk" || fail "the copy over TLS differs from the snapshot"
nbdinfo "nbds://127.0.0.1:$P/disk?tls-certificates=$T/client" | grep -q "with TLS" ||
    fail "nbdinfo does not report TLS"
expect_fail_with "" nbdinfo "nbd://127.0.0.1:$P/disk"
# QEMU's client (its x509 layout: ca-cert.pem, client-cert.pem, client-key.pem): STARTTLS,
# then extended headers over TLS
qemu-img --trace 'nbd_receive_option_reply' convert \
    --object "tls-creds-x509,id=tls0,dir=$T/client,endpoint=client" -O raw --image-opts \
    "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=$P,export=disk,tls-creds=tls0" \
    "$T/copy_qemu.img" 2>"$T/trace" || fail "qemu-img over TLS failed: $(cat "$T/trace")"
grep -q 'option reply 5 (starttls), type 1 (ack)' "$T/trace" &&
    grep -q 'option reply 11 (extended headers), type 1 (ack)' "$T/trace" ||
    fail "no extended headers after STARTTLS: $(cat "$T/trace")"
cmp "$T/copy_qemu.img" "$T/mnt/snapshot/disk" || fail "the qemu-img copy over TLS differs from the snapshot"
# without TLS, NBD_OPT_GO gets NBD_REP_ERR_TLS_REQD
/usr/bin/python3 - "$P" <<'PY' || fail "a clear-text GO was not refused with NBD_REP_ERR_TLS_REQD"
import socket, struct, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
assert s.recv(18, socket.MSG_WAITALL)[:8] == b"NBDMAGIC"
s.sendall(struct.pack(">I", 3))
d = struct.pack(">I", 4) + b"disk" + struct.pack(">H", 0)
s.sendall(struct.pack(">QII", 0x49484156454F5054, 7, len(d)) + d)
magic, opt, kind, n = struct.unpack(">QIII", s.recv(20, socket.MSG_WAITALL))
assert kind == (1 << 31) + 5, hex(kind)
PY
# NBD_CMD_DISC over TLS: the server shuts the TLS session down (close_notify) before it
# closes the connection, as the protocol asks (an EOF without it is a truncation the
# client cannot tell from an attack)
/usr/bin/python3 - "$P" "$T/client" <<'PY' || fail "the TLS session was not shut down cleanly"
import socket, ssl, struct, sys
def recv_all(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        assert c, "EOF"
        b += c
    return b
raw = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
assert recv_all(raw, 18)[:8] == b"NBDMAGIC"
raw.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 5, 0))
assert struct.unpack(">QIII", recv_all(raw, 20))[2] == 1
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_verify_locations(sys.argv[2] + "/ca-cert.pem")
ctx.load_cert_chain(sys.argv[2] + "/client-cert.pem", sys.argv[2] + "/client-key.pem")
ctx.options &= ~ssl.OP_IGNORE_UNEXPECTED_EOF   # an EOF without close_notify: SSLEOFError
s = ctx.wrap_socket(raw, server_hostname="127.0.0.1", suppress_ragged_eofs=False)
d = struct.pack(">I", 4) + b"disk" + struct.pack(">H", 0)
s.sendall(struct.pack(">QII", 0x49484156454F5054, 7, len(d)) + d)
while True:
    magic, opt, kind, n = struct.unpack(">QIII", recv_all(s, 20))
    recv_all(s, n)
    assert kind < (1 << 31), hex(kind)
    if kind == 1:
        break
s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 1, 0, 0))   # NBD_CMD_DISC
try:
    assert s.recv(1) == b"", "data after NBD_CMD_DISC"
except ssl.SSLError as e:
    sys.exit("the connection ended without close_notify: %s" % e)
PY
# TLS handshakes that never finish (nothing after STARTTLS, or half a ClientHello): the
# server closes them at the negotiation's time limit (5 s), the export unharmed
/usr/bin/python3 - "$P" <<'PY' || fail "a TLS handshake that never finishes was not closed in time"
import socket, struct, sys, time
def starttls():
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=30)
    assert s.recv(18, socket.MSG_WAITALL)[:8] == b"NBDMAGIC"
    s.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 5, 0))
    magic, opt, kind, n = struct.unpack(">QIII", s.recv(20, socket.MSG_WAITALL))
    assert kind == 1, hex(kind)
    return s
silent, half = starttls(), starttls()
half.sendall(bytes([0x16, 3, 1, 0x02, 0x00, 0x01, 0x00]))   # a record header and a few bytes
start = time.monotonic()
for s in (silent, half):
    while s.recv(4096):
        pass
assert time.monotonic() - start < 15, time.monotonic() - start
PY
expect_fail_with "" nbdinfo "nbds://127.0.0.1:$P/disk?tls-certificates=$T/badclient"
for _ in $(seq 300); do   # the daemon logs it after the client has gone
    grep -q "negotiation failed: .*[Cc]ert" "$T/state/fleecefs.log" && break
    sleep 0.1
done
grep -q "negotiation failed: .*[Cc]ert" "$T/state/fleecefs.log" ||
    fail "the rogue client certificate was not refused in the TLS handshake: $(grep NBD "$T/state/fleecefs.log")"
# after the refusals the export still serves
nbdinfo "nbds://127.0.0.1:$P/disk?tls-certificates=$T/client" >/dev/null || fail "no longer serves"
# an idle TLS connection is ended by the teardown too
/usr/bin/python3 - "$P" "$T/client" "$T/held" >"$T/held.out" 2>&1 <<'PY' &
import nbd, os, sys, time
h = nbd.NBD()
h.set_tls(nbd.TLS_REQUIRE)
h.set_tls_certificates(sys.argv[2])
h.set_export_name("disk")
h.connect_tcp("127.0.0.1", sys.argv[1])
h.pread(4096, 0)
open(sys.argv[3], "w").close()
while os.path.exists(sys.argv[3]):
    time.sleep(0.01)
try:
    h.pread(4096, 0)
    sys.exit("a read after teardown returned data")
except nbd.Error as e:
    print("closed:", e)
PY
HELD=$!
while [ ! -e "$T/held" ]; do kill -0 $HELD 2>/dev/null || fail "the TLS client did not connect: $(cat "$T/held.out")"; sleep 0.01; done
"$FLEECEFS" teardown "$T/mnt" --target t --success >/dev/null
sleep 1.5
[ "$(status_json "$T/mnt" 'd["nbd"]["connections"]')" = 0 ] || fail "the idle TLS connection outlived the teardown"
rm "$T/held"
timeout 20 tail --pid=$HELD -f /dev/null || fail "the TLS client hung"
wait $HELD || fail "$(cat "$T/held.out")"
"$FLEECEFS" unmount "$T/mnt"

# --nbd-insecure: clear text on TCP
P=$(port)
fmount "$T/mnt" --state-dir "$T/state" --device disk="$T/src.img" --nbd "tcp:127.0.0.1:$P" --nbd-insecure
"$FLEECEFS" setup "$T/mnt" --target t >/dev/null
nbdcopy "nbd://127.0.0.1:$P/disk" "$T/copy2.img"
cmp "$T/copy2.img" "$T/src.img" || fail "the clear-text copy differs"
[ "$(status_json "$T/mnt" 'd["nbd"]["listeners"]')" = "['tcp:127.0.0.1:$P']" ] || fail "status listeners"
"$FLEECEFS" teardown "$T/mnt" --target t --success >/dev/null
echo "nbd_tls: ok"
