#!/usr/bin/env python3
"""Sends malformed, truncated and oversized requests to detourd's local API and checks
that each gets the right error, then that valid requests still work.

usage: apicheck.py PORT NODE_ID_OF_A_PEER
"""
import random
import socket
import struct
import sys

port, peer = int(sys.argv[1]), bytes.fromhex(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.connect(("127.0.0.1", port))
ERROR, ACCEPTED, DELIVERED, RESOLVED = 0x86, 0x81, 0x82, 0x87


def request(op, tag, addr=b"", kind=1, payload=b"", version=1, magic=0xD7, channel=1, flags=0):
    return struct.pack(">BBBBHIBB", magic, version, op, flags, channel, tag, kind if addr else 0, len(addr)) + addr + payload


def reply():
    d = s.recv(70000)
    assert len(d) >= 34 and d[0] == 0xD7, d
    kind, code, channel, tag = d[2], d[3], *struct.unpack(">HI", d[4:10])
    return kind, code, tag, d[10:26], d[34:]


def expect_error(data, code, tag=None, what=""):
    s.send(data)
    kind, got, rtag, _, body = reply()
    assert kind == ERROR and got == code, f"{what}: expected error {code}, got kind {kind:#x} code {got}: {body!r}"
    if tag is not None:
        assert rtag == tag, f"{what}: tag {rtag} != {tag}"
    print(f"ok   {what}: error {code} ({body.decode(errors='replace')})")


expect_error(b"\xd7\x01", 1, what="truncated header")
expect_error(b"\x00" * 12, 1, what="bad magic")
expect_error(request(1, 7, peer, version=9), 2, tag=7, what="unknown version")
expect_error(request(77, 8, peer), 3, tag=8, what="unknown operation")
expect_error(request(1, 9, peer, payload=b"x" * 16385), 5, tag=9, what="payload too large")
expect_error(request(1, 10, peer, payload=b"y" * 60000), 5, tag=10, what="oversized datagram")
expect_error(request(1, 11, b"\xee" * 16, payload=b"z"), 4, tag=11, what="unknown node")
expect_error(request(1, 12, payload=b"z"), 9, tag=12, what="no address")
expect_error(request(1, 13, peer)[:20], 1, what="truncated address")
expect_error(request(1, 14, b"nobody-has-this-name", kind=2, payload=b"z"), 4, tag=14, what="unknown name")
rng = random.Random(7)
for i in range(200):
    junk = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 80)))
    s.send(junk)
    kind, code, *_ = reply()
    assert kind != ACCEPTED or junk[:1] == b"\xd7", junk
print("ok   200 random datagrams answered")

# still serving: resolve the peer and send it a message
s.send(request(4, 20, peer, channel=0))
kind, code, tag, node, body = reply()
assert kind == RESOLVED and node == peer, (kind, code, body)
s.send(request(1, 21, peer, payload=b"still here", channel=99))
kinds = []
while DELIVERED not in kinds:
    kind, code, tag, node, body = reply()
    assert tag == 21, tag
    kinds.append(kind)
assert kinds == [ACCEPTED, DELIVERED], kinds
print("ok   resolve and send still work")
print("all checks passed")
