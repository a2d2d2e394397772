#!/usr/bin/env bash
# `systemctl restart` keeps the disk: the keeper stores its /dev/fuse fds in systemd's
# file descriptor store (FDSTORE=1) and a keeper started again takes them over
# (LISTEN_FDS). systemd is played by a small python program that speaks the same
# protocol (a datagram socket with SCM_RIGHTS; fds 3.. with LISTEN_PID, LISTEN_FDS,
# LISTEN_FDNAMES), does what a restart does (SIGTERM to every process of the service,
# start again with the stored fds), and a stop (SIGTERM, then the store is dropped).
# A writer with fsync runs across the restart: no error, every acknowledged write kept.
source "$(dirname "$0")/lib.sh"
M=$((1 << 20))
head -c $((16 * M)) /dev/urandom >"$T/src.img"
mkdir -p "$T/m"
MOUNTS+=("$T/m")
python3 - "$FLEECEFS" "$T" <<'PY' || fail "fd store restart (see above)"
import array, fcntl, json, os, signal, socket, subprocess, sys, time

fleecefs, tmp = sys.argv[1:3]
mp, state, img = f"{tmp}/m", f"{tmp}/s", f"{tmp}/src.img"
notify = f"{tmp}/notify.sock"
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.bind(notify)
store = []  # (name, fd)

children = []  # processes to stop on failure (the writer runs in a session of its own)

def fail(msg):
    print("FAIL:", msg, file=sys.stderr)
    for c in children:
        c.kill()
    sys.exit(1)

def receive(timeout):
    sock.settimeout(timeout)
    while True:
        try:
            msg, anc, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(600 * 4))
        except socket.timeout:
            return
        fds = []
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(data[: len(data) - len(data) % 4])
                fds += list(a)
        fields = dict(l.split("=", 1) for l in msg.decode().splitlines() if "=" in l)
        if fields.get("FDSTORE") == "1":
            store.extend((fields.get("FDNAME", "stored"), fd) for fd in fds)

def status():
    out = subprocess.run([fleecefs, "status", mp, "--json"], capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else None

def start(log):
    env = dict(os.environ, NOTIFY_SOCKET=notify, FLEECEFS_FDSTORE="1")
    cmd = [fleecefs, "-v", "mount", mp, "--state-dir", state, "--device", f"d={img}", "--foreground"]
    keep = ()
    if store:
        # as systemd passes them: fds 3.., LISTEN_PID the service's own pid
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for _, fd in store]
        env.update(LISTEN_FDS=str(len(high)), LISTEN_FDNAMES=":".join(n for n, _ in store))
        place = ("import os, sys\n"
                 "high = [int(f) for f in sys.argv[1].split(',')]\n"
                 "for i, fd in enumerate(high): os.dup2(fd, 3 + i)\n"
                 "for fd in high: os.close(fd)\n"
                 "os.environ['LISTEN_PID'] = str(os.getpid())\n"
                 "os.execv(sys.argv[2], sys.argv[2:])\n")
        cmd = [sys.executable, "-c", place, ",".join(map(str, high))] + cmd
        keep = tuple(high)
    p = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=open(log, "w"), pass_fds=keep)
    for fd in keep:
        os.close(fd)
    deadline = time.time() + 20
    while time.time() < deadline:
        s = status()
        if s is not None and s.get("worker_pid"):
            return p, s
        if p.poll() is not None:
            fail(f"the service exited ({p.returncode}): {open(log).read()}")
        time.sleep(0.05)
    fail("the service does not answer")

def stop(p, s, log):
    """What systemd does to stop the service: SIGTERM to every process of it."""
    for pid in (s["keeper_pid"], s["worker_pid"]):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass  # the keeper already stopped its worker
    try:
        code = p.wait(60)
    except subprocess.TimeoutExpired:
        fail(f"the keeper did not exit on SIGTERM: {open(log).read()[-3000:]} {open(state + '/fleecefs.log').read()[-3000:] if os.path.exists(state + '/fleecefs.log') else ''}")
    if code != 0:
        fail(f"the keeper exited {code} on SIGTERM")

# a writer in a process of its own (the service manager must not hold files of the
# mount: its children would flush them at exec, while nobody serves): 64 KiB blocks,
# fsync after each, the offset and sequence logged once acknowledged
WRITER = r"""
import os, sys
mp, log = sys.argv[1:3]
fd = os.open(mp + "/live/d", os.O_RDWR)
out = open(log, "w", buffering=1)
seq = 0
while not os.path.exists(log + ".stop"):
    seq += 1
    off = (seq * 7 % 256) * 65536
    try:
        os.pwrite(fd, (b"%08d" % seq) * 8192, off)
        os.fsync(fd)
        out.write(f"ok {off} {seq}\n")
    except OSError as e:
        out.write(f"error {seq} {e}\n")
"""

p, s = start(f"{tmp}/service1.log")
receive(1.0)
names = [n for n, _ in store]
if names.count("fleecefs-fuse") != 8 or names.count("fleecefs-init") != 1:
    fail(f"stored fds: {names}")
wlog = f"{tmp}/writer.log"
w = subprocess.Popen([sys.executable, "-c", WRITER, mp, wlog])
children.append(w)
time.sleep(0.3)
# systemctl restart: stop (SIGTERM), start again with the stored fds
stop(p, s, f"{tmp}/service1.log")
if f" {mp} " not in open("/proc/mounts").read():
    fail("the mount went away when the service stopped for a restart")
p, s2 = start(f"{tmp}/service2.log")
if s2["keeper_pid"] == s["keeper_pid"]:
    fail("same keeper")
if "service restarted" not in (s2.get("last_restart") or {}).get("reason", ""):
    fail(f"last_restart: {s2.get('last_restart')}")
time.sleep(0.3)
open(wlog + ".stop", "w").close()
w.wait(20)
acked, errors = {}, []
for line in open(wlog):
    f = line.split()
    if f[0] == "ok":
        acked[int(f[1])] = (b"%08d" % int(f[2])) * 8192
    else:
        errors.append(line.strip())
if errors:
    fail(f"writer errors across the restart: {errors[:3]}")
if len(acked) < 10:
    fail(f"only {len(acked)} writes")
with open(img, "rb") as f:
    for off, data in acked.items():
        f.seek(off)
        if f.read(len(data)) != data:
            fail(f"acknowledged write at {off} lost")
# systemctl stop: SIGTERM, then systemd drops the store: the connection ends
stop(p, s2, f"{tmp}/service2.log")
for _, fd in store:
    os.close(fd)
time.sleep(0.2)
try:
    os.stat(f"{mp}/live/d")
    os.listdir(mp)
    fail("the mount still answers after a stop")
except OSError:
    pass
print(f"ok: {len(acked)} blocks acknowledged across the restart, all in the source")
PY
# the next start (here: a plain mount) recovers the stale mount
fmount "$T/m" --state-dir "$T/s" --device d=$T/src.img 2>/dev/null || fail "mount after the stop"
cmp "$T/m/live/d" "$T/src.img" || fail "live differs from the source"
"$FLEECEFS" unmount "$T/m"
echo "ok: systemctl restart (played) keeps the disk through the fd store; a stop ends the mount, the next mount recovers"
