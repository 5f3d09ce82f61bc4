#!/usr/bin/env python3
"""A probe stream for measuring outages, for the netns tests and benchmarks.

server PORT                         echo every UDP datagram back (IPv4 and IPv6)
client HOST PORT SECONDS [INTERVAL_MS]
                                    send a numbered datagram every INTERVAL_MS (default 10)
                                    for SECONDS, count the echoes, and print one JSON
                                    object: sent, received, outage_ms (the longest time
                                    without an echo), outage_at (seconds after the start)
"""
import json
import socket
import sys
import time

if sys.argv[1] == "server":
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", int(sys.argv[2])))
    while True:
        data, addr = s.recvfrom(2048)
        s.sendto(data, addr)
else:
    host, port, seconds = sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    interval = (float(sys.argv[5]) if len(sys.argv) > 5 else 10.0) / 1000
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.setblocking(False)
    start = time.monotonic()
    last_echo = start
    outage, outage_at = 0.0, 0.0
    sent = received = 0
    next_send = start
    while True:
        now = time.monotonic()
        if now - start >= seconds:
            break
        if now >= next_send:
            try:
                s.sendto(sent.to_bytes(8, "big") + b"x" * 56, (host, port))
            except OSError:
                pass  # e.g. EHOSTUNREACH while the route changes
            sent += 1
            next_send += interval
        try:
            while True:
                s.recv(2048)
                received += 1
                now = time.monotonic()
                if now - last_echo > outage:
                    outage, outage_at = now - last_echo, last_echo - start
                last_echo = now
        except (BlockingIOError, ConnectionRefusedError, OSError):
            pass
        time.sleep(0.001)
    now = time.monotonic()
    if now - last_echo > outage:
        outage, outage_at = now - last_echo, last_echo - start
    print(json.dumps({"sent": sent, "received": received, "outage_ms": round(outage * 1000, 1), "outage_at": round(outage_at, 3)}))
