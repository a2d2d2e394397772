# Hostile and broken NBD clients against a Unix socket, each bounded in time; the caller
# checks afterwards that the daemon and the access still serve.
# usage: hostile.py SOCKET EXPORT
import socket
import struct
import sys
import time

sock_path, export = sys.argv[1:3]
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9


def conn(timeout=10):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(sock_path)
    return s


def recv_all(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError("closed after %d of %d bytes" % (len(b), n))
        b += c
    return b


def closed(s, what, limit=15):
    """The server must close the connection within `limit` seconds."""
    s.settimeout(limit)
    start = time.time()
    try:
        while s.recv(4096):
            pass
    except socket.timeout:
        sys.exit("%s: the server did not close the connection" % what)
    except ConnectionResetError:
        pass
    return time.time() - start


def greet(s):
    g = recv_all(s, 18)
    assert g[:8] == b"NBDMAGIC" and g[8:16] == b"IHAVEOPT", g
    s.sendall(struct.pack(">I", 3))


def option(s, opt, data=b""):
    s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)


def opt_reply(s):
    magic, opt, kind, n = struct.unpack(">QIII", recv_all(s, 20))
    assert magic == REPLY_MAGIC, hex(magic)
    return opt, kind, recv_all(s, n)


def go(s, name=export):
    d = struct.pack(">I", len(name)) + name.encode() + struct.pack(">H", 0)
    option(s, 7, d)
    while True:
        opt, kind, data = opt_reply(s)
        if kind == 1:
            return
        if kind & (1 << 31):
            raise RuntimeError("GO failed: %x" % kind)


def request(s, kind, offset, length, flags=0, cookie=1):
    s.sendall(struct.pack(">IHHQQI", 0x25609513, flags, kind, cookie, offset, length))


def simple_reply(s):
    magic, err, cookie = struct.unpack(">IIQ", recv_all(s, 16))
    assert magic == 0x67446698, hex(magic)
    return err


# 1. bad magic in the greeting reply and in an option: closed
s = conn(); greet(s); s.sendall(b"GARBAGE!" * 4); closed(s, "bad option magic")
s = conn(); recv_all(s, 18); s.sendall(struct.pack(">I", 0)); closed(s, "not fixed newstyle")
# 2. unknown options get NBD_REP_ERR_UNSUP, the negotiation goes on
s = conn(); greet(s)
for opt in (99, 12345, 0x7FFFFFFF):
    option(s, opt, b"xyz")
    o, kind, _ = opt_reply(s)
    assert kind == (1 << 31) + 1, (opt, hex(kind))
go(s)
# 3. in transmission: past the end, over 32 MiB, a write: errors, and the connection lives
request(s, 0, 1 << 40, 4096); assert simple_reply(s) == 22
request(s, 0, 0, (32 << 20) + 1); assert simple_reply(s) == 22
request(s, 0, (1 << 64) - 512, 1024); assert simple_reply(s) == 22
request(s, 1, 0, 512); s.sendall(b"w" * 512); assert simple_reply(s) == 1
request(s, 6, 0, 512); assert simple_reply(s) == 1
request(s, 99, 0, 512); assert simple_reply(s) == 22
request(s, 4, 1 << 40, 512); assert simple_reply(s) == 22
request(s, 0, 0, 4096)
assert simple_reply(s) == 0 and len(recv_all(s, 4096)) == 4096
# a write larger than 32 MiB: refused, then the connection ends
request(s, 1, 0, 0xFFFFFFFF); assert simple_reply(s) == 22; closed(s, "huge write")
# bad request magic: closed
s = conn(); greet(s); go(s); s.sendall(b"\0" * 28); closed(s, "bad request magic")
# 4. an option over the size limit: refused and closed without reading it
s = conn(); greet(s); s.sendall(struct.pack(">QII", IHAVEOPT, 7, 0xFFFFFFF0))
o, kind, _ = opt_reply(s); assert kind == (1 << 31) + 9, hex(kind); closed(s, "huge option")
# 5. a half-open handshake and a silent client are dropped after the handshake limit
s = conn(); greet(s); option(s, 7, b"\0\0")   # 2 of the option's declared bytes
t = closed(s, "half-open handshake"); assert t < 12, t
s = conn(); t = closed(s, "silent client"); assert t < 12, t
# 6. many connections at once: the ones over the limit are closed, nothing hangs
many = []
for i in range(200):
    try:
        many.append(conn(timeout=5))
    except OSError:
        break
alive = 0
for c in many:
    try:
        c.settimeout(5)
        if len(recv_all(c, 18)) == 18:
            alive += 1
    except (EOFError, OSError):
        pass
assert 0 < alive <= 64, alive
for c in many:
    c.close()
print("hostile clients handled; %d of %d connections served" % (alive, len(many)))
