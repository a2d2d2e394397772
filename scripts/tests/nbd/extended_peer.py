# Requests with extended headers, well-formed and hostile, against an NBD server on a
# Unix socket; prints one line per case: what the server answered (ok, the errno, the
# number of extents) or that it closed the connection. Run against qemu-nbd and against
# fleecefs over the same image, the two outputs must be equal.
# usage: extended_peer.py SOCKET EXPORT
import socket
import struct
import sys

sock_path, export = sys.argv[1:3]
IHAVEOPT = 0x49484156454F5054
EXT_REQ = 0x21E41C71
EXT_REPLY = 0x6E8A278C
READ, WRITE, DISC, FLUSH, TRIM, BLOCK_STATUS = 0, 1, 2, 3, 4, 7
FUA, REQ_ONE, PAYLOAD_LEN = 1, 1 << 3, 1 << 5
FLAG_BLOCK_STATUS_PAYLOAD = 1 << 12
GIB = 1 << 30


def recv_all(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError
        b += c
    return b


def option(s, opt, data=b""):
    s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)
    replies = []
    while True:
        magic, o, kind, n = struct.unpack(">QIII", recv_all(s, 20))
        replies.append((kind, recv_all(s, n)))
        if kind == 1 or kind & (1 << 31):
            return replies


def connect(contexts=("base:allocation",)):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(sock_path)
    recv_all(s, 18)
    s.sendall(struct.pack(">I", 3))
    assert option(s, 11)[-1][0] == 1, "extended headers refused"
    ids = {}
    if contexts:
        d = struct.pack(">I", len(export)) + export.encode() + struct.pack(">I", len(contexts))
        for c in contexts:
            d += struct.pack(">I", len(c)) + c.encode()
        for kind, data in option(s, 10, d):
            if kind == 4:
                ids[data[4:].decode()] = struct.unpack(">I", data[:4])[0]
    flags = None
    for kind, data in option(s, 7, struct.pack(">I", len(export)) + export.encode() + b"\0\0"):
        if kind == 3 and data[:2] == b"\0\0":
            flags = struct.unpack(">H", data[10:12])[0]
        assert not kind & (1 << 31), hex(kind)
    return s, ids, flags


def request(s, flags, kind, offset, length, payload=b"", cookie=7):
    s.sendall(struct.pack(">IHHQQQ", EXT_REQ, flags, kind, cookie, offset, length) + payload)


def answer(s, cookie=7):
    """'ok', 'ok N extents', 'errno N', or 'closed' (EOF before the final chunk)."""
    extents = 0
    try:
        while True:
            magic, flags, kind, c, offset, n = struct.unpack(">IHHQQQ", recv_all(s, 32))
            assert magic == EXT_REPLY, hex(magic)
            assert c == cookie, c
            payload = recv_all(s, n)
            if kind & (1 << 15):
                return "errno %d" % struct.unpack(">I", payload[:4])[0]
            if kind == 6:
                extents += struct.unpack(">I", payload[4:8])[0]
            if flags & 1:
                return "ok %d extents" % extents if extents else "ok"
    except (EOFError, ConnectionResetError, socket.timeout):
        return "closed"


def closes(s):
    """Whether the server ends the connection (replies before that are ignored)."""
    try:
        while s.recv(4096):
            pass
        return "closed"
    except ConnectionResetError:
        return "closed"
    except socket.timeout:
        return "still open"


# meta context queries: a namespace alone lists its contexts, but selects none
c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
c.settimeout(10)
c.connect(sock_path)
recv_all(c, 18)
c.sendall(struct.pack(">I", 3))
assert option(c, 11)[-1][0] == 1, "extended headers refused"
for q in ("base:", "qemu:", "qemu:dirty-bitmap:", "", "BASE:allocation", "base:allocation"):
    for opt, what in ((9, "list"), (10, "set")):
        d = struct.pack(">I", len(export)) + export.encode() + struct.pack(">I", 1)
        d += struct.pack(">I", len(q)) + q.encode()
        names = [data[4:].decode() for kind, data in option(c, opt, d) if kind == 4]
        # (qemu-nbd has no dirty bitmap here: only what both servers have is compared)
        names = [n for n in names if not n.startswith("qemu:dirty-bitmap:")]
        print("%s meta context %r: %s" % (what, q, names))
# malformed or odd negotiation data: the type of each reply
for what, opt, data in [
    ("an export name with a NUL", 6,
     struct.pack(">I", len(export) + 2) + export.encode() + b"\0x" + b"\0\0"),
    ("a meta context query with a NUL", 9,
     struct.pack(">I", len(export)) + export.encode() + struct.pack(">II", 1, 3) + b"a\0b"),
    ("a meta context query over 4096 bytes", 9,
     struct.pack(">I", len(export)) + export.encode() + struct.pack(">II", 1, 5000) + b"a" * 5000),
    ("an info request count past the data", 6,
     struct.pack(">I", len(export)) + export.encode() + struct.pack(">H", 5)),
    ("an unknown option with data", 99, b"abc"),
]:
    print("%s: %s" % (what, [hex(kind) for kind, _ in option(c, opt, data)][-1]))
option(c, 2)
c.close()
s, ids, flags = connect()
alloc = ids["base:allocation"]
size = 64 << 20
print("block status payload offered:", bool(flags & FLAG_BLOCK_STATUS_PAYLOAD))
cases = [
    ("read", 0, READ, 0, 65536),
    ("read of length 0", 0, READ, 4096, 0),
    ("read past the end", 0, READ, size - 4096, 8192),
    ("read whose end overflows", 0, READ, (1 << 64) - 512, 1024),
    ("read over 32 MiB", 0, READ, 0, (32 << 20) + 1),
    ("read of 5 GiB", 0, READ, 0, 5 * GIB),
    ("read with an unknown flag", 1 << 6, READ, 0, 512),
    ("block status", 0, BLOCK_STATUS, 0, size),
    ("block status, one extent", REQ_ONE, BLOCK_STATUS, 0, size),
    ("block status of length 0", 0, BLOCK_STATUS, 0, 0),
    ("block status past the end", 0, BLOCK_STATUS, 4096, size),
    ("block status whose end overflows", 0, BLOCK_STATUS, 4096, (1 << 64) - 1),
    ("trim past the end", 0, TRIM, size, 4096),
    ("trim whose end overflows", 0, TRIM, 4096, (1 << 64) - 4096),
    ("unknown command", 0, 99, 0, 512),
    ("flush", 0, FLUSH, 0, 0),
    ("flush with FUA", FUA, FLUSH, 0, 0),
    ("flush with an offset and a length", 0, FLUSH, 4096, 4096),
    ("flush past the end", 0, FLUSH, size, 4096),
    ("flush with an unknown flag", 1 << 6, FLUSH, 0, 0),
    ("read with FUA", FUA, READ, 0, 4096),
    ("block status with FUA", FUA, BLOCK_STATUS, 0, 4096),
]
for name, fl, kind, offset, length in cases:
    request(s, fl, kind, offset, length)
    print("%s: %s" % (name, answer(s)))
# payloads
p = struct.pack(">Q", size)
for name, fl, kind, payload in [
    ("read with a payload", PAYLOAD_LEN, READ, b"x" * 100),
    ("block status payload", PAYLOAD_LEN, BLOCK_STATUS, p + struct.pack(">I", alloc)),
    ("block status payload, one extent", PAYLOAD_LEN | REQ_ONE, BLOCK_STATUS,
     p + struct.pack(">I", alloc)),
    ("block status payload without ids", PAYLOAD_LEN, BLOCK_STATUS, p),
    ("block status payload, an unknown id", PAYLOAD_LEN, BLOCK_STATUS, p + struct.pack(">I", 77)),
    ("block status payload, an id twice", PAYLOAD_LEN, BLOCK_STATUS,
     p + struct.pack(">II", alloc, alloc)),
    ("block status payload of 10 bytes", PAYLOAD_LEN, BLOCK_STATUS, b"\0" * 10),
    ("block status payload past the end", PAYLOAD_LEN, BLOCK_STATUS,
     struct.pack(">QI", size + 1, alloc)),
]:
    request(s, fl, kind, 0, len(payload), payload)
    print("%s: %s" % (name, answer(s)))
print("read after them: %s" % (request(s, 0, READ, 0, 4096) or answer(s)))
# a payload too large to skip
request(s, PAYLOAD_LEN, READ, 0, 1 << 40)
print("read with a 1 TiB payload: %s, then %s" % (answer(s), closes(s)))
# a compact request header after extended headers (and 4 bytes more)
s, _, _ = connect()
s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, READ, 7, 0, 512) + b"\0" * 4)
print("compact request after extended headers:", closes(s))
# block status without meta contexts
s, _, flags = connect(contexts=())
print("block status payload offered without contexts:", bool(flags & FLAG_BLOCK_STATUS_PAYLOAD))
request(s, 0, BLOCK_STATUS, 0, 4096)
print("block status without contexts: %s" % answer(s))
request(s, 0, DISC, 0, 0)
print("disconnect:", closes(s))
