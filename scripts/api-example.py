#!/usr/bin/env python3
"""Example client of detour's local management API (docs/management-api.md).

  api-example.py send DEST CHANNEL TEXT   send TEXT to a node (name or node ID), wait for the ack
  api-example.py listen CHANNEL           print the messages that arrive on CHANNEL (one, then exit)
"""
import socket, struct, sys

API = ("127.0.0.1", 7722)                      # management.api_port (data port + 2)
SEND, SUBSCRIBE = 1, 2                         # operations
ACCEPTED, DELIVERED, FAILED, MESSAGE, OK, ERROR = 0x81, 0x82, 0x83, 0x84, 0x85, 0x86

def request(op, channel, tag, dest=b"", payload=b""):
    kind = 0 if not dest else (1 if len(dest) == 16 else 2)    # node ID or name
    return struct.pack(">BBBBHIBB", 0xD7, 1, op, 0, channel, tag, kind, len(dest)) + dest + payload

def reply(sock):
    d = sock.recv(70000)                       # header: magic ver kind code channel tag node(16) msgid(8)
    kind, code, channel, tag = d[2], d[3], *struct.unpack(">HI", d[4:10])
    return kind, code, channel, d[10:26].hex(), d[34:]

sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.connect(API)
if sys.argv[1] == "send":
    dest, channel, text = sys.argv[2], int(sys.argv[3]), sys.argv[4]
    dest = bytes.fromhex(dest) if len(dest) == 32 else dest.encode()
    sock.send(request(SEND, channel, 1, dest, text.encode()))
    while True:
        kind, code, _, node, body = reply(sock)
        if kind == DELIVERED: print("delivered to", node); break
        if kind in (FAILED, ERROR): sys.exit(f"failed: code {code} {body.decode()}")
else:
    sock.send(request(SUBSCRIBE, int(sys.argv[2]), 1))
    while True:
        kind, code, channel, node, body = reply(sock)
        if kind == MESSAGE: print(f"from {node} channel {channel}: {body.decode()}"); break
        if kind == ERROR: sys.exit(f"error {code}: {body.decode()}")
