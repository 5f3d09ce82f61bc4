#!/usr/bin/env bash
# The main job: hosts in network namespaces, joined through a router namespace, carry real
# traffic through detour; a fourth host joins through the directory and exchanges
# management messages; then a TCP transfer and a ping survive a cut of the path they use,
# with `detourctl why` before, during and after. Installs what is missing, builds, runs, and removes everything at
# the end and on Ctrl-C. Run as root: sudo scripts/demo.sh
set -euo pipefail
source "$(dirname "$0")/lib.sh"

lab_begin demo
echo "== creating hosts alice, bob, carol and dave behind a router; starting detourd on the first three"
topo_create "$P" 4
for n in alice bob carol dave; do "$BIN/detourctl" genkey "$DIR/$n.key" >/dev/null 2>&1; done
# alice, bob and carol are peers of each other; dave knows only bob (and bob dave).
write_config "$DIR" alice 1 bob:2 carol:3
write_config "$DIR" bob 2 alice:1 carol:3 dave:4
write_config "$DIR" carol 3 alice:1 bob:2
write_config "$DIR" dave 4 bob:2
for n in alice bob carol dave; do "$BIN/detourd" --check-config "$DIR/$n.toml" >&2; done
start_daemon "${P}h1" "$DIR" alice
start_daemon "${P}h2" "$DIR" bob
start_daemon "${P}h3" "$DIR" carol
wait_up "${P}h1" "$DIR" alice 2
wait_up "${P}h2" "$DIR" bob 2
wait_up "${P}h3" "$DIR" carol 2
sleep 1   # let the directory settle before the first status

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
echo "== dave joins, configured with bob only; alice learns of it through the directory"
start_daemon "${P}h4" "$DIR" dave
for t in $(seq 1 100); do
  ip netns exec "$A" "$BIN/detourctl" nodes -s "$DIR/alice.sock" | grep -q '^dave ' && break
  sleep 0.1
done
run ip netns exec "$A" "$BIN/detourctl" nodes -s "$DIR/alice.sock"
echo
echo "== alice pings dave's overlay address: the link to dave is opened on demand"
run ip netns exec "$A" ping -c 4 -i 0.3 10.77.0.4 || true
run ip -n "$A" -brief link show dt-dave
echo
echo "== a management message from alice to dave (by name), acknowledged end to end"
ip netns exec "${P}h4" "$BIN/detourctl" listen --port 7722 --channel 5 --count 1 --timeout 10 &
listener=$!
sleep 0.5
run ip netns exec "$A" "$BIN/detourctl" send --port 7722 --channel 5 dave "hello dave, from alice"
wait "$listener" || true

echo
echo "== alice: detourctl status after the traffic"
ip netns exec "$A" "$BIN/detourctl" status -s "$DIR/alice.sock"

echo
echo "== failover: a TCP transfer (every byte checked) and a 10 ms ping from alice to bob's"
echo "   underlay address 10.0.2.2, which alice normally reaches directly, not through detour;"
echo "   the alice-bob path is cut silently in the router (both directions) and healed"
R="${P}r"
STREAM="$DETOUR_ROOT/netns-tests/helpers/longstream.py"
ip netns exec "${P}h2" python3 "$STREAM" server 5301 "$DIR/stream.json" &
sleep 0.3
ip netns exec "$A" python3 "$STREAM" client 10.0.2.2 5301 12 2000000 >"$DIR/client.json" &
client=$!
ip netns exec "$A" ping -q -i 0.01 -c 1100 10.0.2.2 >"$DIR/ping.txt" 2>&1 &
pinger=$!
sleep 2
run ip netns exec "$A" "$BIN/detourctl" why -s "$DIR/alice.sock" 10.0.2.2
echo "+ cut: ip netns exec $R iptables -I FORWARD -s 10.0.1.2 -d 10.0.2.2 -j DROP (and back)"
ip netns exec "$R" iptables -I FORWARD -s 10.0.1.2 -d 10.0.2.2 -j DROP
ip netns exec "$R" iptables -I FORWARD -s 10.0.2.2 -d 10.0.1.2 -j DROP
sleep 1.5
echo
echo "== during the cut"
run ip netns exec "$A" "$BIN/detourctl" why -s "$DIR/alice.sock" 10.0.2.2
sleep 1.5
echo "+ heal: the two DROP rules removed"
ip netns exec "$R" iptables -D FORWARD -s 10.0.1.2 -d 10.0.2.2 -j DROP
ip netns exec "$R" iptables -D FORWARD -s 10.0.2.2 -d 10.0.1.2 -j DROP
echo "   (a repaired path must stay healthy for failover.hold_down_ms, 3 s, before traffic returns)"
for t in $(seq 1 100); do
  ip netns exec "$A" "$BIN/detourctl" why --json -s "$DIR/alice.sock" 10.0.2.2 | grep -q '"through_overlay": false' && break
  sleep 0.1
done
echo
echo "== after the return to the direct path"
run ip netns exec "$A" "$BIN/detourctl" why -s "$DIR/alice.sock" 10.0.2.2
wait "$client" || true
wait "$pinger" || true
for t in $(seq 1 50); do [ -s "$DIR/stream.json" ] && break; sleep 0.1; done
echo
echo "== what the applications saw"
python3 - "$DIR/client.json" "$DIR/stream.json" "$DIR/ping.txt" <<'PYEOF2'
import json, re, sys
sent = json.load(open(sys.argv[1]))
got = json.load(open(sys.argv[2]))
ping = open(sys.argv[3]).read()
m = re.search(r"(\d+) packets transmitted, (\d+) received", ping)
tx, rx = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
print(f"TCP transfer: {got['bytes']:,} of {sent['bytes']:,} bytes arrived, {got['mismatches']} wrong, "
      f"{'reset' if got['reset'] else 'never reset'}; longest stall {got['stall_ms']:.0f} ms")
print(f"ping every 10 ms: {tx} sent, {tx - rx} lost (about {(tx - rx) * 10} ms without an answer)")
PYEOF2
echo
echo "demo complete"
