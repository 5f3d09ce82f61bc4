#!/usr/bin/env bash
# The main job: three hosts in network namespaces, joined through a router namespace,
# carry real traffic through detour. Installs what is missing, builds, runs, and removes
# everything at the end and on Ctrl-C. Run as root: sudo scripts/demo.sh
set -euo pipefail
source "$(dirname "$0")/lib.sh"

need_root
install_deps
echo "== building detour (release)"
build_release

P="dd$$"
DIR=$(mktemp -d /tmp/detour-demo.XXXXXX)
cleanup() {
  trap - EXIT INT TERM
  echo "== cleaning up"
  topo_destroy "$P"
  rm -rf "$DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

NAMES=(alice bob carol)
echo "== creating hosts ${NAMES[*]} behind router ${P}r"
topo_create "$P" 3
for n in "${NAMES[@]}"; do
  "$BIN/detourctl" genkey "$DIR/$n.key" >/dev/null 2>&1
done
write_config "$DIR" alice 1 bob:2 carol:3
write_config "$DIR" bob 2 alice:1 carol:3
write_config "$DIR" carol 3 alice:1 bob:2
for i in 1 2 3; do
  "$BIN/detourd" --check-config "$DIR/${NAMES[$((i - 1))]}.toml"
done

echo "== starting detourd on each host"
for i in 1 2 3; do
  start_daemon "${P}h$i" "$DIR" "${NAMES[$((i - 1))]}"
done
for i in 1 2 3; do
  wait_up "${P}h$i" "$DIR" "${NAMES[$((i - 1))]}" 2
done

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
