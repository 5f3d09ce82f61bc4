#!/usr/bin/env python3
"""Prints the wall-clock time of the first packet of one kind seen on an interface.

sniff.py IFACE KIND SECONDS

KIND is `icmp-unreachable` (an ICMPv4 destination unreachable arriving) or `udp:PORT` (a
UDP datagram to PORT, either direction). The interface is read with a packet socket
(AF_PACKET, before netfilter: an ICMP error that detour takes into its queue is still
seen). Prints the time in seconds since the epoch (CLOCK_REALTIME, the same in every
network namespace, so times from two namespaces compare), or `none` after SECONDS.
Used by `scripts/bench.sh failover` to time a failover from the ICMP error's arrival.
"""
import select
import socket
import struct
import sys
import time

ETH_P_ALL = 0x0003


def matches(kind, pkt):
    if len(pkt) < 20 or pkt[0] >> 4 != 4:
        return False
    ihl = (pkt[0] & 0x0F) * 4
    proto = pkt[9]
    l4 = pkt[ihl:]
    if kind == "icmp-unreachable":
        return proto == 1 and len(l4) >= 1 and l4[0] == 3
    if kind.startswith("udp:"):
        port = int(kind[4:])
        if proto != 17 or len(l4) < 4:
            return False
        sport, dport = struct.unpack("!HH", l4[:4])
        return port in (sport, dport)
    raise SystemExit(f"unknown kind {kind}")


def main():
    iface, kind, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    # SOCK_DGRAM: the link-layer header is removed, on Ethernet and on a TUN alike.
    s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
    s.bind((iface, 0))
    end = time.monotonic() + seconds
    while True:
        left = end - time.monotonic()
        if left <= 0:
            print("none")
            return
        r, _, _ = select.select([s], [], [], left)
        if not r:
            continue
        pkt = s.recv(65535)
        t = time.time()
        if matches(kind, pkt):
            print(f"{t:.6f}")
            return


if __name__ == "__main__":
    main()
