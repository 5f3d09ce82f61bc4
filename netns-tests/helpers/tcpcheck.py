#!/usr/bin/env python3
"""A TCP transfer whose integrity is checked end to end, for the netns tests.

server PORT          accept one connection, read to EOF, answer "<bytes> <sha256>"
client HOST PORT N [BIND_ADDR] [SECONDS]
                     send N pseudo-random bytes (spread evenly over SECONDS when given),
                     check the server's count and digest, print "ok <bytes>" (exit 1 on
                     any mismatch or error, e.g. a reset)
"""
import hashlib
import random
import socket
import sys

if sys.argv[1] == "server":
    port = int(sys.argv[2])
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", port))
    s.listen(1)
    s.settimeout(30)
    c, _ = s.accept()
    h, n = hashlib.sha256(), 0
    while True:
        b = c.recv(1 << 16)
        if not b:
            break
        h.update(b)
        n += len(b)
    c.sendall(f"{n} {h.hexdigest()}".encode())
    c.close()
else:
    host, port, total = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    bind = sys.argv[5] if len(sys.argv) > 5 and sys.argv[5] else None
    seconds = float(sys.argv[6]) if len(sys.argv) > 6 else 0.0
    rng = random.Random(total)
    data = rng.randbytes(total)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    c = socket.socket(family, socket.SOCK_STREAM)
    c.settimeout(60)
    if bind:
        c.bind((bind, 0))
    c.connect((host, port))
    if seconds > 0:
        import time
        chunk = 16384
        start = time.monotonic()
        for off in range(0, total, chunk):
            due = start + seconds * off / total
            while time.monotonic() < due:
                time.sleep(0.001)
            c.sendall(data[off:off + chunk])
    else:
        c.sendall(data)
    c.shutdown(socket.SHUT_WR)
    answer = b""
    while True:
        b = c.recv(4096)
        if not b:
            break
        answer += b
    expected = f"{total} {hashlib.sha256(data).hexdigest()}"
    if answer.decode() != expected:
        print(f"mismatch: sent {expected}, server saw {answer.decode()}")
        sys.exit(1)
    print(f"ok {total}")
