#!/usr/bin/env python3
"""Polls the control sockets of many detourd instances (`{"cmd":"nodes"}`) and reports
when each first lists a given node.

usage: dirwatch.py TIMEOUT NODE_NAME SOCKET...
prints JSON: {"seconds": {socket: seconds until it listed NODE_NAME}, "all": seconds|null}
(time counted from the start of this program)
"""
import json
import socket
import sys
import time

timeout, name, socks = float(sys.argv[1]), sys.argv[2], sys.argv[3:]
t0 = time.monotonic()
seen = {}


def nodes(path):
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(2)
    try:
        c.connect(path)
        c.sendall(b'{"cmd":"nodes"}\n')
        buf = b""
        while not buf.endswith(b"\n"):
            b = c.recv(1 << 20)
            if not b:
                break
            buf += b
        return json.loads(buf).get("nodes", [])
    except (OSError, ValueError):
        return []
    finally:
        c.close()


while len(seen) < len(socks) and time.monotonic() - t0 < timeout:
    for p in socks:
        if p not in seen and any(n.get("name") == name for n in nodes(p)):
            seen[p] = time.monotonic() - t0
    time.sleep(0.01)
print(json.dumps({"seconds": seen, "all": max(seen.values()) if len(seen) == len(socks) else None}))
