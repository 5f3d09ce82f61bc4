#!/usr/bin/env bash
# The main job: three hosts in network namespaces, joined through a router namespace,
# carry real traffic through detour. Installs what is missing, builds, runs, and removes
# everything at the end and on Ctrl-C. Run as root: sudo scripts/demo.sh
set -euo pipefail
source "$(dirname "$0")/lib.sh"

lab_begin demo
echo "== creating hosts alice, bob and carol behind a router; starting detourd on each"
mesh_start alice bob carol

A="${P}h1"
run() { echo "+ $*"; "$@"; }
echo
echo "== alice: detourctl status"
ip netns exec "$A" "$BIN/detourctl" status -s "$DIR/alice.sock"
echo
echo "== alice's interfaces and detour's routes (table 7720)"
ip -n "$A" -brief addr show | grep -E "dt-|detour0"
ip -n "$A" route show table 7720
ip -n "$A" -6 route show table 7720

echo
echo "== ping through the per-peer interface dt-bob (bob's overlay addresses)"
run ip netns exec "$A" ping -c 3 -i 0.2 10.77.0.2
run ip netns exec "$A" ping -c 3 -i 0.2 fd77::2
echo
echo "== ping through the aggregate interface detour0 (the network behind carol)"
run ip netns exec "$A" ping -c 3 -i 0.2 10.103.0.1
run ip netns exec "$A" ping -c 3 -i 0.2 fd10:3::1

echo
echo "== iperf3 (3 s) through the per-peer interface: alice -> bob"
ip netns exec "${P}h2" iperf3 -s -D -1 >/dev/null
sleep 0.3
run ip netns exec "$A" iperf3 -c 10.77.0.2 -t 3
echo
echo "== iperf3 (3 s) through the aggregate interface: alice -> carol's network (IPv6)"
ip netns exec "${P}h3" iperf3 -s -D -1 >/dev/null
sleep 0.3
run ip netns exec "$A" iperf3 -c fd10:3::1 -t 3

echo
echo "== alice: detourctl status after the traffic"
ip netns exec "$A" "$BIN/detourctl" status -s "$DIR/alice.sock"
echo
echo "demo complete"
