#!/usr/bin/env python3
"""Sends COUNT management messages to DEST through detourd's local API, INTERVAL seconds
apart, and reports each message's delivery time (from the send to the end-to-end
acknowledgement) as JSON: {"sent", "delivered", "failed", "latencies_ms"}.

usage: mgmtprobe.py PORT DEST COUNT INTERVAL [CRITICAL]

With PROBE_START (unix seconds) in the environment, the first message goes out then: probes
started together (scripts/scale.py starts 20 at once) do not measure each other's start.
"""
import os
import json
import select
import socket
import struct
import sys
import time

port, dest, count, interval = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
critical = len(sys.argv) > 5 and sys.argv[5] == "critical"
dest = bytes.fromhex(dest) if len(dest) == 32 else dest.encode()
kind = 1 if len(dest) == 16 else 2
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect(("127.0.0.1", port))
sent_at, lat, failed = {}, {}, 0
start = float(os.environ.get("PROBE_START", "0"))
if start > time.time():
    time.sleep(start - time.time())
t_next = time.monotonic()
deadline = None
tag = 0
while True:
    now = time.monotonic()
    if tag < count and now >= t_next:
        tag += 1
        sent_at[tag] = now
        s.send(struct.pack(">BBBBHIBB", 0xD7, 1, 1, 1 if critical else 0, 40, tag, kind, len(dest)) + dest + b"probe %d" % tag)
        t_next += interval
        if tag == count:
            deadline = now + 30
    if deadline and (len(lat) + failed >= count or now > deadline):
        break
    wait = max(0.0, min(t_next - now, 0.05)) if tag < count else 0.05
    r, _, _ = select.select([s], [], [], wait)
    if r:
        d = s.recv(70000)
        k, code, t = d[2], d[3], struct.unpack(">I", d[6:10])[0]
        if k == 0x82 and t in sent_at and t not in lat:
            lat[t] = (time.monotonic() - sent_at[t]) * 1000
        elif k in (0x83, 0x86):
            failed += 1
print(json.dumps({"sent": count, "delivered": len(lat), "failed": failed, "latencies_ms": [round(lat[t], 3) for t in sorted(lat)]}))
