#!/usr/bin/env python3
"""Sends bad datagrams to a detour data port, for the netns tests.

usage: badpackets.py IFACE DST_IP PORT SRC_NODE_ID DST_NODE_ID COUNT

1. Sniffs COUNT data datagrams to DST_IP:PORT on IFACE (AF_PACKET, in the namespace where
   it runs), while the test sends pings through the tunnel.
2. Replays each captured datagram (-> replay).
3. Sends each with a fresh counter and a flipped payload bit (-> auth_failed).
4. Forges datagrams: the real source and destination node IDs with an unknown key ID
   (-> no_session), an unknown source node (-> unknown_peer), a wrong version
   (-> bad_version), and short garbage (-> malformed).
Prints one JSON object with how many of each were sent.
"""
import json
import os
import socket
import struct
import sys
import time

iface, dst_ip, port, src_hex, dst_hex, count = sys.argv[1:7]
port, count = int(port), int(count)
src_id, dst_id = bytes.fromhex(src_hex), bytes.fromhex(dst_hex)

ETH_P_ALL, ETH_P_IP = 0x0003, 0x0800
# Forwarded (outgoing) frames reach only ETH_P_ALL packet sockets.
sniff = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.ntohs(ETH_P_ALL))
sniff.bind((iface, ETH_P_ALL))
sniff.settimeout(0.5)
want = socket.inet_aton(dst_ip)
captured = []
deadline = time.time() + 10
while len(captured) < count and time.time() < deadline:
    try:
        pkt, addr = sniff.recvfrom(65535)
    except socket.timeout:
        continue
    if addr[1] != ETH_P_IP or len(pkt) < 28 or pkt[0] >> 4 != 4 or pkt[9] != 17 or pkt[16:20] != want:
        continue
    ihl = (pkt[0] & 0x0F) * 4
    dport = struct.unpack("!H", pkt[ihl + 2 : ihl + 4])[0]
    payload = pkt[ihl + 8 :]
    # a data packet (version 1, type 0) from SRC to DST
    if dport == port and len(payload) >= 64 and payload[0] == 0x10 and payload[4:20] == src_id:
        captured.append(bytes(payload))
sniff.close()

out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
target = (dst_ip, port)
sent = {"captured": len(captured), "replay": 0, "auth_failed": 0, "no_session": 0, "unknown_peer": 0, "bad_version": 0, "malformed": 0}
for d in captured:
    out.sendto(d, target)
    sent["replay"] += 1
for k, d in enumerate(captured):
    b = bytearray(d)
    b[40:48] = struct.pack("!Q", (1 << 62) + k)  # a counter never used
    b[60] ^= 0x01  # inside the sealed payload
    out.sendto(bytes(b), target)
    sent["auth_failed"] += 1
hdr = lambda ver_type, s, d, key: bytes([ver_type, 0, 4, 0]) + s + d + struct.pack("!IQ", key, 7)
out.sendto(hdr(0x10, src_id, dst_id, 0xDEADBEEF) + os.urandom(100), target)
sent["no_session"] += 1
out.sendto(hdr(0x10, os.urandom(16), dst_id, 1) + os.urandom(100), target)
sent["unknown_peer"] += 1
out.sendto(hdr(0x70, src_id, dst_id, 1) + os.urandom(100), target)
sent["bad_version"] += 1
out.sendto(os.urandom(20), target)
sent["malformed"] += 1
time.sleep(0.2)
print(json.dumps(sent))
