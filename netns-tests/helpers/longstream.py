#!/usr/bin/env python3
"""A long TCP stream whose every byte is checked, for the chaos soak (scripts/soak.sh).

server PORT OUT       accept one connection and read it to EOF, checking each byte against
                      the pattern; write one JSON object to OUT: bytes, mismatches (bytes
                      that differ), reset (the connection ended with an error), stall_ms
                      (the longest time without data), stall_at (seconds after the start)
client HOST PORT SECONDS RATE
                      send the pattern at RATE bytes/s for SECONDS, then close; print one
                      JSON object: bytes, error (null or the error that ended it)

The pattern is byte i = (i * 131 + (i >> 16)) mod 251: no period a lost or repeated
segment could hide in.
"""
import json
import socket
import sys
import time


_ROW = bytes((j * 131) % 251 for j in range(251))
_BASE = _ROW * (65536 // 251 + 2)
_ADD = [bytes((x + c) % 251 for x in range(256)) for c in range(251)]


def pattern(start, n):
    """Bytes start..start+n of the pattern (i = k * 65536 + j: (j * 131 + c_k) mod 251)."""
    out = []
    while n > 0:
        k, j = start >> 16, start & 0xFFFF
        m = min(n, 65536 - j)
        c = (k * 65536 * 131 + k) % 251
        out.append(_BASE[j % 251 : j % 251 + m].translate(_ADD[c]))
        start, n = start + m, n - m
    return b"".join(out)


if sys.argv[1] == "server":
    port, out = int(sys.argv[2]), sys.argv[3]
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", port))
    s.listen(1)
    c, _ = s.accept()
    start = last = time.monotonic()
    n, bad, reset, stall, stall_at = 0, 0, False, 0.0, 0.0
    try:
        while True:
            b = c.recv(1 << 16)
            now = time.monotonic()
            if now - last > stall:
                stall, stall_at = now - last, last - start
            last = now
            if not b:
                break
            want = pattern(n, len(b))
            if b != want:
                bad += sum(1 for x, y in zip(b, want) if x != y)
            n += len(b)
    except OSError:
        reset = True
    with open(out, "w") as f:
        json.dump({"bytes": n, "mismatches": bad, "reset": reset, "stall_ms": round(stall * 1000, 1), "stall_at": round(stall_at, 1)}, f)
else:
    host, port, seconds, rate = sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    c = socket.socket(family, socket.SOCK_STREAM)
    n, err = 0, None
    try:
        c.connect((host, port))
        start = time.monotonic()
        chunk = 16384
        while time.monotonic() - start < seconds:
            due = start + n / rate
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            c.sendall(pattern(n, chunk))
            n += chunk
        c.shutdown(socket.SHUT_WR)
        c.recv(1)
        c.close()
    except OSError as e:
        err = str(e)
    print(json.dumps({"bytes": n, "error": err}))
