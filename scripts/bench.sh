#!/usr/bin/env bash
# Benchmarks. `scripts/bench.sh NAME` runs one and prints one JSON object on its last line.
#
#   forwarding  single- and 4-stream TCP (iperf3) and ping RTT between the same two
#               namespaces over the bare underlay and through the overlay, in one run,
#               plus detourd's CPU time per Gbit carried.
#   failover    time from a failure of the direct path to traffic flowing again through a
#               relay, measured by a 10 ms probe stream, for silent failures and for
#               ICMP-signalled ones (BENCH_TRIALS each, default 10; for ICMP also from the
#               error's arrival at alice to the first packet bob receives through the
#               overlay, both seen on packet sockets); the probe overhead per peer;
#               healthy-path TCP throughput with and without detourd running (6 alternating
#               rounds, with the spread and detourd's CPU share); single-stream TCP through
#               a relay against the direct overlay path and the underlay, and the relay's
#               CPU per Gbit; route switches in a minute of a path that fails for 1 s every
#               6 s, without flap damping (hold-down capped at 3 s) and with it; goodput of
#               short TCP uploads over a direct path with 20 % loss, relieved and not; the
#               connect time of a new TCP connection to an outside host through an exit
#               right after an ICMP cut.
#   management  delivery ratio and latency (send to end-to-end acknowledgement) of
#               management messages between two hosts, idle and while the forwarding
#               overlay between them is saturated through a tbf bottleneck (with detourd's
#               HTB on the sender's underlay interface, and without it), in one run; then
#               directory convergence after a node joins overlays of 10 and 50 nodes.
#   replex      two paths from alice to bob: the direct one (20 Mbit/s, tbf in the router)
#               and one through carol over separate links (10 Mbit/s, tbf on alice's link to carol).
#               A closed loop of many short TCP uploads (flows.py) runs over the direct
#               path alone, the relay alone (direct path cut), an equal split, and REPLEX
#               (lambda 0.1, rounds every 2 s; BENCH_REPLEX_LAMBDA, BENCH_REPLEX_PERIOD_MS);
#               time to converge, final shares and costs, and throughput ratios.
#   scale       N = 10, 30 and 100 detourd (BENCH_SCALE_NODES) in namespaces behind one
#               router, each configured with one bootstrap peer (n1, which lists them all),
#               no traffic: time until every directory lists every node, idle CPU, RSS,
#               packets and bytes per node, ping and management messages between random
#               pairs, then 10 % of the nodes killed: neighbour-set recovery time and
#               delivery between live pairs (scripts/scale.py); then the management overlay
#               of 1,000 and 10,000 nodes in simulation (the sans-IO core with a simulated
#               clock and underlay: `cargo run --release --example scale_sim`).
#   flood       two nodes exchange acknowledged management messages (BENCH_MESSAGES, default
#               300, 20 ms apart) while a TCP transfer runs through the overlay, first idle,
#               then while a third namespace floods one of them: QUIC connection attempts at
#               the management port (BENCH_FLOOD_RATE per second, default 3000, from 200
#               source addresses; examples/flood.rs) and random datagrams at the data port
#               as fast as one core sends them. Delivery ratio and p99 of the messages, TCP
#               throughput with the flood over without, the flooded detourd's peak RSS, and
#               its admission counters.
#
# BENCH_SECONDS (default 10) sets the length of each iperf3 run; BENCH_KEEP_LOGS=DIR keeps
# the daemons' logs of the scale runs in DIR/N/. Run as root.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

usage() {
  echo "usage: $0 forwarding|failover|management|replex|scale|flood" >&2
  exit 2
}
[ $# -eq 1 ] || usage
NAME=$1
SECS=${BENCH_SECONDS:-10}
case "$NAME" in
  forwarding | failover | management | replex | scale | flood) ;;
  *) usage ;;
esac
TRIALS=${BENCH_TRIALS:-10}
STREAM="$DETOUR_ROOT/netns-tests/helpers/stream.py"
SNIFF="$DETOUR_ROOT/netns-tests/helpers/sniff.py"

lab_begin bench

# cpu_ticks PID...: utime+stime of all threads of the processes, in clock ticks.
cpu_ticks() {
  local total=0 pid
  for pid in "$@"; do
    total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat")))
  done
  echo "$total"
}

# iperf A_NS SERVER_IP STREAMS -> prints "bits_per_second bytes"
iperf() {
  ip netns exec "$1" iperf3 -c "$2" -t "$SECS" -P "$3" -J \
    | python3 -c 'import json,sys; e=json.load(sys.stdin)["end"]["sum_received"]; print(e["bits_per_second"], e["bytes"])'
}

# rtt NS IP -> average RTT in ms over 300 pings 10 ms apart
rtt() {
  ip netns exec "$1" ping -c 300 -i 0.01 -q "$2" | awk -F'/' '/^rtt/ {print $5}'
}

bench_forwarding() {
  mesh_start alice bob
  local pids
  pids=$(ip netns pids "${P}h1"; ip netns pids "${P}h2")
  ip netns exec "${P}h2" iperf3 -s -D >/dev/null
  sleep 0.5
  local A="${P}h1" UNDER=10.0.2.2 OVER=10.77.0.2
  ip netns exec "$A" ping -c 3 -i 0.2 -q "$OVER" >/dev/null

  # Idle latency first, alternating underlay and overlay, before any load.
  echo "ping, idle..." >&2
  local ru ro ru2 ro2
  ru=$(rtt "$A" "$UNDER")
  ro=$(rtt "$A" "$OVER")
  ru2=$(rtt "$A" "$UNDER")
  ro2=$(rtt "$A" "$OVER")
  ru=$(python3 -c "print(($ru + $ru2) / 2)")
  ro=$(python3 -c "print(($ro + $ro2) / 2)")

  # overlay STREAMS -> "bits_per_second bytes daemon_cpu_ticks"
  overlay() {
    local c0 c1 bps bytes
    c0=$(cpu_ticks $pids)
    read -r bps bytes < <(iperf "$A" "$OVER" "$1")
    c1=$(cpu_ticks $pids)
    echo "$bps $bytes $((c1 - c0))"
  }
  local t1u t1o b1o k1 t4u t4o b4o k4
  echo "tcp 1 stream, underlay..." >&2
  read -r t1u _ < <(iperf "$A" "$UNDER" 1)
  echo "tcp 1 stream, overlay..." >&2
  read -r t1o b1o k1 < <(overlay 1)
  echo "tcp 4 streams, underlay..." >&2
  read -r t4u _ < <(iperf "$A" "$UNDER" 4)
  echo "tcp 4 streams, overlay..." >&2
  read -r t4o b4o k4 < <(overlay 4)
  local hz
  hz=$(getconf CLK_TCK)
  python3 - "$t1u" "$t1o" "$t4u" "$t4o" "$ru" "$ro" "$((k1 + k4))" "$hz" "$b1o" "$b4o" "$SECS" <<'EOF'
import json, sys
t1u, t1o, t4u, t4o, ru, ro = (float(x) for x in sys.argv[1:7])
ticks, hz, b1, b4, secs = int(sys.argv[7]), int(sys.argv[8]), int(sys.argv[9]), int(sys.argv[10]), int(sys.argv[11])
gbit = (b1 + b4) * 8 / 1e9
cpu_s = ticks / hz
r = {
    "bench": "forwarding",
    "seconds_per_run": secs,
    "tcp_1_underlay_gbps": round(t1u / 1e9, 3),
    "tcp_1_overlay_gbps": round(t1o / 1e9, 3),
    "tcp_4_underlay_gbps": round(t4u / 1e9, 3),
    "tcp_4_overlay_gbps": round(t4o / 1e9, 3),
    "tcp_1_overlay_ratio": round(t1o / t1u, 4),
    "tcp_4_overlay_ratio": round(t4o / t4u, 4),
    "rtt_underlay_ms": round(ru, 3),
    "rtt_overlay_ms": round(ro, 3),
    "rtt_added_ms": round(ro - ru, 3),
    "detourd_cpu_s": round(cpu_s, 2),
    "detourd_cpu_s_per_gbit": round(cpu_s / gbit, 4) if gbit > 0 else None,
}
for k, v in r.items():
    print(f"{k:28} {v}", file=sys.stderr)
print(json.dumps(r))
EOF
}

# peer_field NS NAME PEER FIELD -> a field of PEER in NAME's status
peer_field() {
  ip netns exec "$1" "$BIN/detourctl" status --json -s "$DIR/$2.sock" \
    | python3 -c "import json,sys; print(next(p for p in json.load(sys.stdin)['peers'] if p['name']=='$3')['$4'])"
}

bench_failover() {
  # Trials repeat the same cut: flap damping would rightly keep traffic off a path that
  # fails every few seconds, so it is capped at the base hold-down here.
  EXTRA_CONFIG=$'[failover]\nmax_hold_down_ms = 3000'
  mesh_start alice bob carol
  EXTRA_CONFIG=""
  local A="${P}h1" B="${P}h2" R="${P}r" UA=10.0.1.2 UB=10.0.2.2
  ip netns exec "$B" python3 "$STREAM" server 9200 &
  local echo_pid=$!
  sleep 1

  # Probe overhead: what alice sends to bob per second while everything is healthy.
  local p0 p1
  p0=$(peer_field "$A" alice bob probe_tx_bytes)
  sleep 10
  p1=$(peer_field "$A" alice bob probe_tx_bytes)
  local probe_bps=$(((p1 - p0) / 10))
  # ... and while traffic to bob flows (the 10 ms probe stream): its paths are probed fast.
  ip netns exec "$A" python3 "$STREAM" client "$UB" 9200 13 >/dev/null &
  local sp=$!
  sleep 2
  p0=$(peer_field "$A" alice bob probe_tx_bytes)
  sleep 10
  p1=$(peer_field "$A" alice bob probe_tx_bytes)
  local probe_active_bps=$(((p1 - p0) / 10))
  wait "$sp" || true

  # Waits until alice sends to bob on the direct path again (after a hold-down).
  wait_direct() {
    local t
    for t in $(seq 1 200); do
      [ "$(peer_field "$A" alice bob path)" = direct ] && [ "$(peer_field "$A" alice bob protected)" = False ] && return 0
      sleep 0.1
    done
    echo "alice did not return to the direct path" >&2
    return 1
  }

  # trial silent|icmp -> outage in ms
  trial() {
    wait_direct
    local out
    out=$(mktemp)
    ip netns exec "$A" python3 "$STREAM" client "$UB" 9200 3 >"$out" &
    local client=$!
    # For an ICMP cut, the time from the error's arrival at alice to the first packet of the
    # stream that bob receives through the overlay (from its TUN for alice).
    local s_icmp s_relay sniffers=()
    if [ "$1" = icmp ]; then
      s_icmp=$(mktemp)
      s_relay=$(mktemp)
      ip netns exec "$A" python3 "$SNIFF" eth0 icmp-unreachable 4 >"$s_icmp" 2>/dev/null &
      sniffers+=($!)
      ip netns exec "$B" python3 "$SNIFF" dt-alice udp:9200 4 >"$s_relay" 2>/dev/null &
      sniffers+=($!)
    fi
    sleep 1
    if [ "$1" = silent ]; then
      ip netns exec "$R" iptables -I FORWARD -s "$UA" -d "$UB" -j DROP
      ip netns exec "$R" iptables -I FORWARD -s "$UB" -d "$UA" -j DROP
    else
      ip netns exec "$R" iptables -I FORWARD -s "$UA" -d "$UB" -j REJECT --reject-with icmp-host-unreachable
      ip netns exec "$R" iptables -I FORWARD -s "$UB" -d "$UA" -j REJECT --reject-with icmp-host-unreachable
    fi
    wait "$client"
    ip netns exec "$R" iptables -F FORWARD
    if [ "$1" = icmp ]; then
      wait "${sniffers[@]}" || true
      python3 -c "
import json
t0, t1 = open('$s_icmp').read().strip(), open('$s_relay').read().strip()
arrival = round((float(t1) - float(t0)) * 1000, 1) if 'none' not in (t0, t1) and t0 and t1 else -1
print(json.load(open('$out'))['outage_ms'], arrival)"
      rm -f "$s_icmp" "$s_relay"
    else
      python3 -c "import json; print(json.load(open('$out'))['outage_ms'])"
    fi
    rm -f "$out"
  }
  local silent=() icmp=() icmp_arrival=() i o a
  for i in $(seq 1 "$TRIALS"); do
    echo "trial $i/$TRIALS..." >&2
    silent+=("$(trial silent)")
    read -r o a < <(trial icmp)
    icmp+=("$o")
    icmp_arrival+=("$a")
  done
  kill "$echo_pid" 2>/dev/null || true

  # Healthy path: TCP on the underlay addresses with and without detourd, alternating
  # BENCH_HEALTHY_ROUNDS times (default 6) in an order that changes every round (with
  # first, then without first), so that drift cannot decide the ratio.
  wait_direct
  ip netns exec "$B" iperf3 -s -D >/dev/null
  sleep 0.5
  local rounds=${BENCH_HEALTHY_ROUNDS:-6} k with_all=() without_all=() w o
  restart_all() {
    start_daemon "${P}h1" "$DIR" alice
    start_daemon "${P}h2" "$DIR" bob
    start_daemon "${P}h3" "$DIR" carol
    wait_up "${P}h1" "$DIR" alice 2
    wait_direct
  }
  stop_all() {
    kill -TERM $(pgrep -f "detourd -c $DIR") 2>/dev/null || true
    sleep 1
  }
  # with_detourd -> bits/s, and adds the daemons' CPU ticks during the run to healthy_ticks.
  local healthy_ticks=0
  with_detourd() {
    local dp c0 c1 bps
    dp=$(pgrep -f "detourd -c $DIR" | tr '\n' ' ')
    c0=$(cpu_ticks $dp)
    read -r bps _ < <(iperf "$A" "$UB" 1)
    c1=$(cpu_ticks $dp)
    healthy_ticks=$((healthy_ticks + c1 - c0))
    w=$bps
  }
  for k in $(seq 1 "$rounds"); do
    echo "healthy path, round $k/$rounds..." >&2
    if [ $((k % 2)) = 1 ]; then
      with_detourd
      stop_all
      read -r o _ < <(iperf "$A" "$UB" 1)
      restart_all
    else
      stop_all
      read -r o _ < <(iperf "$A" "$UB" 1)
      restart_all
      with_detourd
    fi
    with_all+=("$w")
    without_all+=("$o")
  done

  # Through a relay: single-stream TCP to bob's overlay address on the direct path, then
  # with the direct path cut (alice -> carol -> bob), beside the bare underlay, in
  # BENCH_RELAY_ROUNDS rounds (default 3) of the three; carol's CPU time per Gbit relayed
  # (detourd's; what the kernel spends forwarding is not in it). First with the defaults
  # (carol forwards in the kernel), then with kernel.relay_forwarding = false on carol
  # (its data thread forwards): direct and relayed again.
  # relay_round -> "underlay direct relayed relayed_bytes carol_ticks"
  relay_round() {
    local u d r rb c0 c1 cpid
    cpid=$(pgrep -f "detourd -c $DIR/carol.toml")
    wait_direct
    read -r u _ < <(iperf "$A" "$UB" 1)
    read -r d _ < <(iperf "$A" "$OB" 1)
    ip netns exec "$R" iptables -I FORWARD -s "$UA" -d "$UB" -j DROP
    ip netns exec "$R" iptables -I FORWARD -s "$UB" -d "$UA" -j DROP
    for t in $(seq 1 50); do
      [ "$(peer_field "$A" alice bob path)" != direct ] && break
      sleep 0.1
    done
    c0=$(cpu_ticks "$cpid")
    read -r r rb < <(iperf "$A" "$OB" 1)
    c1=$(cpu_ticks "$cpid")
    ip netns exec "$R" iptables -F FORWARD
    echo "$u $d $r $rb $((c1 - c0))"
  }
  # relay_rounds WHAT -> BENCH_RELAY_ROUNDS (default 3) relay_round lines, ";"-separated
  relay_rounds() {
    local k rows=()
    ip netns exec "$A" ping -c 3 -i 0.2 -q "$OB" >/dev/null
    for k in $(seq 1 "${BENCH_RELAY_ROUNDS:-3}"); do
      echo "through a relay (forwarding $1), round $k..." >&2
      rows+=("$(relay_round)")
    done
    (IFS=';'; echo "${rows[*]}")
  }
  local OB=10.77.0.2 relay_kernel relay_user
  restart_all
  relay_kernel=$(relay_rounds "in the kernel")
  stop_all
  printf '\n[kernel]\nrelay_forwarding = false\n' >>"$DIR/carol.toml"
  restart_all
  relay_user=$(relay_rounds "in user space")
  sed -i -e '/^\[kernel\]$/d' -e '/^relay_forwarding = false$/d' "$DIR/carol.toml"
  stop_all

  # Flapping: the direct path cut for 1 s and healed for 5 s, 10 times (a minute), while a
  # probe stream runs; route changes of alice towards bob, with the hold-down capped at its
  # base (no damping) and then with the default damping, same minute apart.
  flap_phase() {
    local c0 c1 f1 k
    restart_all
    ip netns exec "$B" python3 "$STREAM" server 9201 &
    local ep=$!
    sleep 0.5
    ip netns exec "$A" python3 "$STREAM" client "$UB" 9201 64 >/dev/null &
    local sp=$!
    sleep 2
    c0=$(peer_field "$A" alice bob route_changes)
    for k in $(seq 1 10); do
      ip netns exec "$R" iptables -I FORWARD -s "$UA" -d "$UB" -j DROP
      ip netns exec "$R" iptables -I FORWARD -s "$UB" -d "$UA" -j DROP
      sleep 1
      ip netns exec "$R" iptables -F FORWARD
      sleep 5
    done
    c1=$(peer_field "$A" alice bob route_changes)
    f1=$(peer_field "$A" alice bob flaps)
    kill "$sp" "$ep" 2>/dev/null || true
    stop_all
    echo "$((c1 - c0)) $f1"
  }
  echo "flapping path, hold-down capped at 3 s (no damping)..." >&2
  local flap_undamped flap_damped
  flap_undamped=$(flap_phase)
  sed -i -e '/^\[failover\]$/d' -e '/^max_hold_down_ms = 3000$/d' "$DIR"/alice.toml "$DIR"/bob.toml "$DIR"/carol.toml
  echo "flapping path, damped (defaults)..." >&2
  flap_damped=$(flap_phase)

  # A degraded direct path: 20 % loss each way while a closed loop of short TCP uploads
  # (flows.py, 8 at once, 200 kB each) runs for BENCH_SECONDS x 2; goodput with detour
  # relieving the path (defaults) against staying on it (relief and failure by loss off).
  degraded_phase() {
    restart_all
    ip netns exec "$B" python3 "$FLOWS" server 9202 &
    local fp=$!
    ip netns exec "$R" iptables -I FORWARD -s "$UA" -d "$UB" -m statistic --mode random --probability 0.2 -j DROP
    ip netns exec "$R" iptables -I FORWARD -s "$UB" -d "$UA" -m statistic --mode random --probability 0.2 -j DROP
    sleep 6
    ip netns exec "$A" python3 "$FLOWS" client "$UB" 9202 8 200000 $((SECS * 2)) | python3 -c 'import json,sys; print(json.load(sys.stdin)["mbit_s"])'
    echo "relief: $(peer_field "$A" alice bob relief_share)" >&2
    ip netns exec "$R" iptables -F FORWARD
    kill "$fp" 2>/dev/null || true
    stop_all
  }
  local FLOWS="$DETOUR_ROOT/netns-tests/helpers/flows.py" deg_off deg_on
  for n in alice bob carol; do printf '\n[failover]\ndegraded_loss = 0.9\nfailed_loss = 0.9\nrecover_loss = 0.5\n' >>"$DIR/$n.toml"; done
  echo "degraded path (20 % loss), staying on it..." >&2
  deg_off=$(degraded_phase)
  sed -i -e '/^\[failover\]$/,$d' "$DIR"/alice.toml "$DIR"/bob.toml "$DIR"/carol.toml
  echo "degraded path (20 % loss), relieved (defaults)..." >&2
  deg_on=$(degraded_phase)

  # A new connection to an outside host (a fourth namespace without detour) after the router
  # answers alice's TCP to it with host unreachable: alice watches it as an exit
  # destination, carol is the exit (masquerading). Connect time of a fresh TCP connection
  # (the SYN drew the error), BENCH_EXIT_TRIALS times (default 5), daemons restarted each
  # time so that no exit route is left from the trial before.
  topo_add_host "$P" 4
  local X=10.0.4.2 exit_ms=()
  ip netns exec "${P}h4" python3 -m http.server 8080 --bind "$X" >/dev/null 2>&1 &
  local http_pid=$!
  printf '\n[exit]\nwatch = ["%s/32"]\nhold_s = 120\n' "$X" >>"$DIR/alice.toml"
  printf '\n[policy]\nconnectivity = "host"\ninternet_masquerade = true\n' >>"$DIR/carol.toml"
  ip netns exec "${P}h3" sysctl -qw net.ipv4.ip_forward=1
  local connect="import socket,time; t=time.monotonic(); s=socket.create_connection(('$X', 8080), timeout=10); ms=(time.monotonic()-t)*1000; s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); s.recv(100); print(round(ms, 1))"
  for k in $(seq 1 "${BENCH_EXIT_TRIALS:-5}"); do
    echo "new connection through an exit after an ICMP cut, trial $k..." >&2
    restart_all
    ip netns exec "$A" curl -sf -m 5 -o /dev/null "http://$X:8080/"
    ip netns exec "$R" iptables -I FORWARD -s "$UA" -d "$X" -p tcp -j REJECT --reject-with icmp-host-unreachable
    exit_ms+=("$(ip netns exec "$A" python3 -c "$connect")")
    ip netns exec "$R" iptables -F FORWARD
    stop_all
  done
  kill "$http_pid" 2>/dev/null || true

  python3 - "$probe_bps" "${with_all[*]}" "${without_all[*]}" "" "" "${silent[*]}" "${icmp[*]}" "$flap_undamped" "$flap_damped" "$deg_off" "$deg_on" "$probe_active_bps" \
    "${icmp_arrival[*]}" "$relay_kernel" "$relay_user" "${exit_ms[*]}" \
    "$(python3 -c "print($healthy_ticks / $(getconf CLK_TCK) / ($rounds * $SECS * $(nproc)))")" "$(getconf CLK_TCK)" <<'EOF'
import json, statistics, sys
arrival = [float(x) for x in sys.argv[13].split() if float(x) >= 0]
hz = int(sys.argv[18])
def relay(arg):
    """relay_round rows -> (underlay, direct, relayed) bit/s lists, relay CPU s per Gbit"""
    rows = [[float(x) for x in row.split()] for row in arg.split(";")]
    under, direct, via, nbytes, ticks = (list(col) for col in zip(*rows))
    return under, direct, via, round(sum(ticks) / hz / (sum(nbytes) * 8 / 1e9), 4)
r_under, r_direct, r_via, r_cpu = relay(sys.argv[14])
_, u_direct, u_via, u_cpu = relay(sys.argv[15])
exit_ms = [float(x) for x in sys.argv[16].split()]
probe = int(sys.argv[1])
with_all = [float(x) for x in sys.argv[2].split()]
without_all = [float(x) for x in sys.argv[3].split()]
pair = [w / o for w, o in zip(with_all, without_all)]
(und_changes, und_flaps), (dam_changes, dam_flaps) = (map(int, x.split()) for x in sys.argv[8:10])
silent = [float(x) for x in sys.argv[6].split()]
icmp = [float(x) for x in sys.argv[7].split()]
def pct(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]
r = {
    "bench": "failover",
    "trials": len(silent),
    "failover_silent_ms_p50": round(statistics.median(silent), 1),
    "failover_silent_ms_p95": round(pct(silent, 0.95), 1),
    "failover_icmp_ms_p50": round(statistics.median(arrival), 1) if arrival else None,
    "failover_icmp_ms_p95": round(pct(arrival, 0.95), 1) if arrival else None,
    "failover_icmp_from_first_lost_ms_p50": round(statistics.median(icmp), 1),
    "failover_icmp_from_first_lost_ms_p95": round(pct(icmp, 0.95), 1),
    "failover_silent_ms": silent,
    "failover_icmp_ms": arrival,
    "failover_icmp_from_first_lost_ms": icmp,
    "probe_bytes_per_s_idle_peer": probe,
    "probe_bytes_per_s_active_peer": int(sys.argv[12]),
    "healthy_gbps_with_detourd": [round(w / 1e9, 3) for w in with_all],
    "healthy_gbps_without_detourd": [round(o / 1e9, 3) for o in without_all],
    "healthy_throughput_ratio": round(sum(with_all) / sum(without_all), 4),
    "healthy_ratio_per_round_min_max": [round(min(pair), 4), round(max(pair), 4)],
    "healthy_ratio_per_round_median": round(statistics.median(pair), 4),
    "healthy_detourd_cpu_share": round(float(sys.argv[17]), 5),
    "relay_tcp1_gbps": [round(x / 1e9, 3) for x in r_via],
    "direct_overlay_tcp1_gbps": [round(x / 1e9, 3) for x in r_direct],
    "underlay_tcp1_gbps": [round(x / 1e9, 3) for x in r_under],
    "relay_tcp1_vs_direct_overlay": round(sum(r_via) / sum(r_direct), 4),
    "relay_tcp1_vs_direct_overlay_per_round": [round(v / d, 4) for v, d in zip(r_via, r_direct)],
    "relay_tcp1_vs_underlay": round(sum(r_via) / sum(r_under), 4),
    "relay_cpu_s_per_gbit": r_cpu,
    "relay_user_space_tcp1_gbps": [round(x / 1e9, 3) for x in u_via],
    "relay_user_space_direct_overlay_tcp1_gbps": [round(x / 1e9, 3) for x in u_direct],
    "relay_user_space_tcp1_vs_direct_overlay": round(sum(u_via) / sum(u_direct), 4),
    "relay_user_space_cpu_s_per_gbit": u_cpu,
    "exit_connect_after_cut_ms": round(statistics.median(exit_ms), 1),
    "exit_connect_after_cut_ms_all": exit_ms,
    "flap_cycles_per_min": 10,
    "flap_failures_counted": dam_flaps,
    "flap_switches_per_min": dam_changes,
    "flap_switches_per_min_undamped": und_changes,
    "degraded_goodput_mbit_s_staying": float(sys.argv[10]),
    "degraded_goodput_mbit_s_relieved": float(sys.argv[11]),
    "degraded_goodput_ratio": round(float(sys.argv[11]) / max(float(sys.argv[10]), 1e-9), 3),
}
for k, v in r.items():
    print(f"{k:32} {v}", file=sys.stderr)
print(json.dumps(r))
EOF
}

PROBE="$DETOUR_ROOT/netns-tests/helpers/mgmtprobe.py"
DIRWATCH="$DETOUR_ROOT/netns-tests/helpers/dirwatch.py"

# ring_configs N: keys and configurations for N hosts, each with the previous and the
# next host on a ring as its configured peers (bootstrap contacts).
ring_configs() {
  local n=$1 i prev next
  for i in $(seq 1 "$n"); do
    "$BIN/detourctl" genkey "$DIR/n$i.key" >/dev/null 2>&1
  done
  for i in $(seq 1 "$n"); do
    prev=$(((i + n - 2) % n + 1))
    next=$((i % n + 1))
    if [ "$prev" = "$next" ]; then
      write_config "$DIR" "n$i" "$i" "n$next:$next"
    else
      write_config "$DIR" "n$i" "$i" "n$prev:$prev" "n$next:$next"
    fi
  done
}

# join N -> seconds until every one of N-1 running nodes lists node N after it started
join() {
  local n=$1 i socks=()
  topo_create "$P" "$n"
  ring_configs "$n"
  for i in $(seq 1 $((n - 1))); do
    start_daemon "${P}h$i" "$DIR" "n$i"
    socks+=("$DIR/n$i.sock")
  done
  # Wait until the first n-1 nodes know each other.
  python3 "$DIRWATCH" 120 "n$((n - 1))" "${socks[@]}" >/dev/null
  python3 "$DIRWATCH" 120 "n1" "${socks[@]}" >/dev/null
  sleep 2
  start_daemon "${P}h$n" "$DIR" "n$n"
  python3 "$DIRWATCH" 60 "n$n" "${socks[@]}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["all"])'
  topo_destroy "$P"
  rm -f "$DIR"/n*.sock
}

# star_configs N: keys and configurations for N hosts; n1 lists every other host, each
# other host lists only n1 (its bootstrap contact) and learns the rest from the directory.
star_configs() {
  local n=$1 i peers=()
  for i in $(seq 1 "$n"); do
    "$BIN/detourctl" genkey "$DIR/n$i.key" >/dev/null 2>&1
  done
  for i in $(seq 2 "$n"); do
    peers+=("n$i:$i")
    write_config "$DIR" "n$i" "$i" "n1:1"
  done
  write_config "$DIR" n1 1 "${peers[@]}"
}

bench_scale() {
  local n i start out=()
  for n in ${BENCH_SCALE_NODES:-10 30 100}; do
    echo "scale: $n nodes..." >&2
    topo_create "$P" "$n"
    star_configs "$n"
    start=$(date +%s.%N)
    for i in $(seq 1 "$n"); do
      start_daemon "${P}h$i" "$DIR" "n$i"
    done
    out+=("$(python3 "$DETOUR_ROOT/scripts/scale.py" "$n" "$P" "$DIR" "$BIN" "$start")")
    if [ -n "${BENCH_KEEP_LOGS-}" ]; then
      mkdir -p "$BENCH_KEEP_LOGS/$n" && cp "$DIR"/n*.log "$BENCH_KEEP_LOGS/$n/"
    fi
    topo_destroy "$P"
    rm -f "$DIR"/n*.sock "$DIR"/n*.toml "$DIR"/n*.key
  done
  if [ -n "${BENCH_SIM_NODES-1000 10000}" ]; then
    echo "scale: management overlay in simulation..." >&2
    out+=("$(cd "$DETOUR_ROOT" && cargo run --release --quiet --example scale_sim -- ${BENCH_SIM_NODES:-1000 10000})")
  fi
  python3 - "${out[@]}" <<'EOF'
import json, sys
r = {"bench": "scale"}
for x in sys.argv[1:]:
    r.update(json.loads(x.strip().splitlines()[-1]))
for k, v in r.items():
    print(f"{k:48} {v}", file=sys.stderr)
print(json.dumps(r))
EOF
}

bench_management() {
  # Two hosts; the router limits the path towards bob to 50 Mbit/s (tbf). alice's detourd
  # shapes its underlay interface to 45 Mbit/s with management first (HTB).
  topo_create "$P" 2
  "$BIN/detourctl" genkey "$DIR/alice.key" >/dev/null 2>&1
  "$BIN/detourctl" genkey "$DIR/bob.key" >/dev/null 2>&1
  write_config "$DIR" alice 1 bob:2
  write_config "$DIR" bob 2 alice:1
  printf '\n[management]\nqdisc_interface = "eth0"\nqdisc_rate = "45mbit"\n' >>"$DIR/alice.toml"
  start_daemon "${P}h1" "$DIR" alice
  start_daemon "${P}h2" "$DIR" bob
  wait_up "${P}h1" "$DIR" alice 1
  ip netns exec "${P}r" tc qdisc add dev r2 root tbf rate 50mbit burst 64kb latency 400ms
  local A="${P}h1" B="${P}h2" N=${BENCH_MESSAGES:-300}
  ip netns exec "$B" iperf3 -s -D >/dev/null
  sleep 1
  echo "management messages, idle..." >&2
  local idle sat unshaped
  idle=$(ip netns exec "$A" python3 "$PROBE" 7722 bob "$N" 0.02)
  echo "management messages, forwarding overlay saturated..." >&2
  ip netns exec "$A" iperf3 -c 10.77.0.2 -P 4 -t $((N / 50 + 8)) >/dev/null &
  local ip1=$!
  sleep 3
  sat=$(ip netns exec "$A" python3 "$PROBE" 7722 bob "$N" 0.02)
  wait "$ip1" || true
  echo "management messages, saturated, without detour's HTB..." >&2
  ip netns exec "$A" tc qdisc del dev eth0 root
  ip netns exec "$A" iperf3 -c 10.77.0.2 -P 4 -t $((N / 50 + 8)) >/dev/null &
  local ip2=$!
  sleep 3
  unshaped=$(ip netns exec "$A" python3 "$PROBE" 7722 bob "$N" 0.02)
  wait "$ip2" || true
  kill -TERM $(pgrep -f "detourd -c $DIR") 2>/dev/null || true
  sleep 1
  topo_destroy "$P"
  echo "join, 10 nodes..." >&2
  local j10 j50
  j10=$(join 10)
  echo "join, 50 nodes..." >&2
  j50=$(join 50)
  python3 - "$idle" "$sat" "$unshaped" "$j10" "$j50" <<'EOF'
import json, sys
idle, sat, unshaped = (json.loads(x) for x in sys.argv[1:4])
j10, j50 = (None if x == "None" else float(x) for x in sys.argv[4:6])
def p(v, q):
    v = sorted(v)
    return round(v[min(len(v) - 1, int(round(q * (len(v) - 1))))], 3) if v else None
r = {
    "bench": "management",
    "messages_per_phase": idle["sent"],
    "mgmt_idle_p50_ms": p(idle["latencies_ms"], 0.5),
    "mgmt_idle_p99_ms": p(idle["latencies_ms"], 0.99),
    "mgmt_idle_delivery_ratio": round(idle["delivered"] / idle["sent"], 4),
    "mgmt_saturated_p50_ms": p(sat["latencies_ms"], 0.5),
    "mgmt_saturated_p99_ms": p(sat["latencies_ms"], 0.99),
    "mgmt_saturated_delivery_ratio": round(sat["delivered"] / sat["sent"], 4),
    "mgmt_saturated_p99_over_idle": round(p(sat["latencies_ms"], 0.99) / p(idle["latencies_ms"], 0.99), 2) if sat["latencies_ms"] else None,
    "mgmt_saturated_unshaped_p50_ms": p(unshaped["latencies_ms"], 0.5),
    "mgmt_saturated_unshaped_p99_ms": p(unshaped["latencies_ms"], 0.99),
    "mgmt_saturated_unshaped_delivery_ratio": round(unshaped["delivered"] / unshaped["sent"], 4),
    "join_convergence_10_s": round(j10, 3) if j10 is not None else None,
    "join_convergence_50_s": round(j50, 3) if j50 is not None else None,
}
for k, v in r.items():
    print(f"{k:40} {v}", file=sys.stderr)
print(json.dumps(r))
EOF
}

bench_replex() {
  local A="${P}h1" B="${P}h2" C="${P}h3" R="${P}r"
  local FLOWS="$DETOUR_ROOT/netns-tests/helpers/flows.py"
  # Open loop: 1 MB uploads arriving at random, 3.5 per second (28 Mbit/s offered: more than
  # either path, less than both), at most 64 at once.
  local WORKERS=${BENCH_FLOW_WORKERS:-64} SIZE=${BENCH_FLOW_BYTES:-1000000} RATE=${BENCH_FLOW_RATE:-3.5}
  local BASE=${BENCH_REPLEX_BASE_SECONDS:-30} RUN=${BENCH_REPLEX_SECONDS:-240}
  topo_create "$P" 3
  # The relay path: alice - carol - bob over their own veth links (not the router).
  ip link add ac0 netns "$A" type veth peer name ca0 netns "$C"
  ip link add cb0 netns "$C" type veth peer name bc0 netns "$B"
  ip -n "$A" addr add 10.9.1.1/30 dev ac0
  ip -n "$C" addr add 10.9.1.2/30 dev ca0
  ip -n "$C" addr add 10.9.2.1/30 dev cb0
  ip -n "$B" addr add 10.9.2.2/30 dev bc0
  ip -n "$A" link set ac0 up; ip -n "$C" link set ca0 up; ip -n "$C" link set cb0 up; ip -n "$B" link set bc0 up
  ip netns exec "$R" tc qdisc add dev r2 root tbf rate 20mbit burst 32kb latency 50ms
  ip netns exec "$A" tc qdisc add dev ac0 root tbf rate 10mbit burst 32kb latency 50ms
  local n
  for n in alice bob carol; do "$BIN/detourctl" genkey "$DIR/$n.key" >/dev/null 2>&1; done
  write_config "$DIR" bob 2 alice:1
  write_config "$DIR" carol 3 alice:1 bob:2
  write_config "$DIR" alice 1 bob:2
  # carol is reached (and reaches) over the relay links.
  sed -i 's/"10.0.1.2"/"10.9.1.1"/; s/"10.0.2.2"/"10.9.2.2"/' "$DIR/carol.toml"
  cp "$DIR/alice.toml" "$DIR/alice.base"
  printf '\n[[peer]]\nname = "carol"\npublic_key = "%s"\nendpoints = ["10.9.1.2"]\noverlay_ipv4 = "10.77.0.3"\n' "$("$BIN/detourctl" pubkey "$DIR/carol.key")" >>"$DIR/alice.base"
  printf '\n[[peer]]\nname = "carol"\npublic_key = "%s"\nendpoints = ["10.9.2.1"]\noverlay_ipv4 = "10.77.0.3"\n' "$("$BIN/detourctl" pubkey "$DIR/carol.key")" >>"$DIR/bob.toml"
  cp "$DIR/alice.base" "$DIR/alice.toml"
  start_daemon "$B" "$DIR" bob
  start_daemon "$C" "$DIR" carol
  ip netns exec "$B" python3 "$FLOWS" server 9200 "$DIR/recv" &
  # alice_with REPLEX_SECTION: (re)starts alice's detourd with that [replex] section.
  alice_with() {
    local pid
    pid=$(pgrep -f "detourd -c $DIR/alice.toml" || true)
    if [ -n "$pid" ]; then kill -TERM $pid; while kill -0 $pid 2>/dev/null; do sleep 0.1; done; fi
    { cat "$DIR/alice.base"; printf '\n%s\n' "$1"; } >"$DIR/alice.toml"
    start_daemon "$A" "$DIR" alice
    wait_up "$A" "$DIR" alice 2
  }
  # ready: waits until alice's REPLEX has both routes live (30 s at most).
  ready() {
    local t
    for t in $(seq 1 300); do
      ip netns exec "$A" "$BIN/detourctl" status --json -s "$DIR/alice.sock" | python3 -c '
import json, sys
p = [p for p in json.load(sys.stdin)["peers"] if p["name"] == "bob"][0]
sys.exit(0 if sum(r["status"] == "live" for r in p["shares"]) >= 2 else 1)' && return 0
      sleep 0.1
    done
    return 1
  }
  load() { ip netns exec "$A" python3 "$FLOWS" client 10.0.2.2 9200 "$WORKERS" "$SIZE" "$1" "$RATE"; }
  # measure SECONDS: runs the load and adds the goodput bob received after the first 5 s.
  measure() {
    load "$1" >"$DIR/load.json" &
    local p=$! a b
    sleep 5
    a=$(cat "$DIR/recv")
    sleep $(($1 - 5))
    b=$(cat "$DIR/recv")
    wait "$p"
    python3 -c 'import json, sys
r = json.load(open(sys.argv[1])); a = sys.argv[2].split(); b = sys.argv[3].split()
r["goodput_mbit_s"] = (int(b[1]) - int(a[1])) * 8 / (float(b[0]) - float(a[0])) / 1e6
print(json.dumps(r))' "$DIR/load.json" "$a" "$b"
  }
  local direct relay equal adaptive
  echo "direct path only..." >&2
  alice_with ""
  sleep 2
  direct=$(measure "$BASE")
  echo "relay path only (direct path cut)..." >&2
  ip netns exec "$R" iptables -I FORWARD -s 10.0.1.2 -d 10.0.2.2 -j DROP
  sleep 3
  relay=$(measure "$BASE")
  ip netns exec "$R" iptables -D FORWARD -s 10.0.1.2 -d 10.0.2.2 -j DROP
  echo "equal split..." >&2
  alice_with $'[replex]\nenabled = true\nmode = "equal"'
  ready
  sleep 2
  equal=$(measure "$BASE")
  echo "REPLEX, ${RUN} s..." >&2
  local extra=""
  [ -n "${BENCH_REPLEX_LAMBDA:-}" ] && extra+=$'\nlambda = '"$BENCH_REPLEX_LAMBDA"
  # Flows of a second or more: rounds every 2 s (replex-spec.md §3.7: longer periods for
  # longer flows), so that a round sees the effect of the last one.
  extra+=$'\nperiod_ms = '"${BENCH_REPLEX_PERIOD_MS:-2000}"
  alice_with $'[replex]\nenabled = true'"$extra"
  ready
  load "$RUN" >"$DIR/adaptive.json" &
  local lpid=$! t0=$SECONDS
  : >"$DIR/samples"
  : >"$DIR/recvs"
  # One sample a second while flows arrive (not while the last ones drain).
  while [ $((SECONDS - t0)) -lt "$RUN" ]; do
    sleep 1
    cat "$DIR/recv" >>"$DIR/recvs"
    ip netns exec "$A" "$BIN/detourctl" status --json -s "$DIR/alice.sock" | python3 -c '
import json, sys
s = json.load(sys.stdin)
print(json.dumps(s))
p = [p for p in s["peers"] if p["name"] == "bob"][0]
print(" | ".join("%s %.0f%% (realized %.0f%%, %s ms)" % (r["path"], 100 * r["target_share"], 100 * r["realized_share"], r["cost_ms"] and round(r["cost_ms"], 1)) for r in p["shares"]), file=sys.stderr)' >>"$DIR/samples" || true
  done
  wait "$lpid"
  adaptive=$(python3 -c 'import json, sys
r = json.load(open(sys.argv[1])); v = [l.split() for l in open(sys.argv[2]) if l.strip()]
a, b = v[max(0, len(v) - 1 - int(sys.argv[3]))], v[-1]
r["goodput_mbit_s"] = (int(b[1]) - int(a[1])) * 8 / (float(b[0]) - float(a[0])) / 1e6
print(json.dumps(r))' "$DIR/adaptive.json" "$DIR/recvs" "$BASE")
  [ -n "${BENCH_SAMPLES:-}" ] && cp "$DIR/samples" "$BENCH_SAMPLES"
  python3 - "$direct" "$relay" "$equal" "$adaptive" "$DIR/samples" "$BASE" "$RATE" "$SIZE" <<'EOF'
import json, sys
direct, relay, equal, adaptive = (json.loads(x) for x in sys.argv[1:5])
base = int(sys.argv[6])
samples = []
for line in open(sys.argv[5]):
    try:
        p = [p for p in json.loads(line)["peers"] if p["name"] == "bob"][0]
    except (ValueError, IndexError, KeyError):
        continue
    samples.append([r for r in p["shares"] if r["status"] == "live"])
W = 60  # seconds of the final state
last = samples[-W:]
def mean(v):
    v = [x for x in v if x is not None]
    return sum(v) / len(v) if v else None
def costs(window):
    """Mean cost of each route used (target share > 2 %) over a window of samples."""
    acc = {}
    for s in window:
        for r in s:
            if r["cost_ms"] is not None:
                acc.setdefault(r["path"], []).append((r["cost_ms"], r["target_share"]))
    return {k: sum(c for c, _ in v) / len(v) for k, v in acc.items() if sum(x for _, x in v) / len(v) > 0.02}
def spread(window):
    c = list(costs(window).values())
    return max(c) / max(min(c), 1e-9) - 1 if len(c) >= 2 else None
def share(s, path):
    return sum(r["target_share"] for r in s if r["path"] == path)
# Converged: from this second on, the direct route's target share stays within 10
# percentage points of its final value (mean over the last 60 s). Costs are RTTs of
# filled queues and swing second by second; they are compared on 60-second means.
final_direct = mean([share(s, "direct") for s in last])
conv = None
for i in range(len(samples)):
    if all(abs(share(s, "direct") - final_direct) <= 0.1 for s in samples[i:]):
        conv = i + 1
        break
final = {}
for s in last:
    for r in s:
        f = final.setdefault(r["path"], {"target": [], "realized": [], "cost": []})
        f["target"].append(r["target_share"]); f["realized"].append(r["realized_share"]); f["cost"].append(r["cost_ms"])
# Rates: goodput bob received, after the first 5 s (baselines) or over the last BASE
# seconds (REPLEX, converged).
def rate(run):
    return run.get("goodput_mbit_s", run["mbit_s"])
d_rate, r_rate, e_rate = rate(direct), rate(relay), rate(equal)
steady_rate = rate(adaptive)
best = max(d_rate, r_rate)
r = {
    "bench": "replex",
    "offered_mbit_s": round(float(sys.argv[7]) * float(sys.argv[8]) * 8 / 1e6, 3),
    "direct_only_mbit_s": round(d_rate, 3),
    "relay_only_mbit_s": round(r_rate, 3),
    "equal_split_mbit_s": round(e_rate, 3),
    "replex_mbit_s": round(steady_rate, 3),
    "replex_converge_s": conv,
    "replex_vs_best_single_ratio": round(steady_rate / best, 3),
    "replex_vs_equal_split_ratio": round(steady_rate / e_rate, 3),
    "replex_final_cost_spread": round(spread(last), 3) if spread(last) is not None else None,
    "replex_final": {k: {"target_share": round(mean(v["target"]), 3), "realized_share": round(mean(v["realized"]), 3), "cost_ms": round(mean(v["cost"]), 2)} for k, v in final.items()},
    "replex_flows_failed": adaptive["failed"],
    "replex_flows_rejected": adaptive.get("rejected", 0),
}
print(json.dumps(r))
EOF
}

bench_flood() {
  (cd "$DETOUR_ROOT" && cargo build --release --quiet --example flood)
  local FLOOD="$DETOUR_ROOT/target/release/examples/flood" RATE=${BENCH_FLOOD_RATE:-3000} N=${BENCH_MESSAGES:-300}
  topo_create "$P" 3
  "$BIN/detourctl" genkey "$DIR/alice.key" >/dev/null 2>&1
  "$BIN/detourctl" genkey "$DIR/bob.key" >/dev/null 2>&1
  write_config "$DIR" alice 1 bob:2
  write_config "$DIR" bob 2 alice:1
  start_daemon "${P}h1" "$DIR" alice
  start_daemon "${P}h2" "$DIR" bob
  wait_up "${P}h1" "$DIR" alice 1
  wait_up "${P}h2" "$DIR" bob 1
  local A="${P}h1" B="${P}h2" M="${P}h3" i srcs=()
  for i in $(seq 10 209); do
    ip -n "$M" addr add "10.0.3.$i/24" dev eth0
    srcs+=("10.0.3.$i")
  done
  local bob_pid
  bob_pid=$(pgrep -f "detourd -c $DIR/bob.toml")
  ip netns exec "$B" iperf3 -s -D >/dev/null
  sleep 1
  # phase NAME: the TCP transfer through the overlay and the messages at once
  phase() {
    ip netns exec "$A" iperf3 -c 10.77.0.2 -t "$SECS" -J >"$DIR/$1.iperf" &
    local ip=$!
    sleep 1
    ip netns exec "$A" python3 "$PROBE" 7722 bob "$N" 0.02 >"$DIR/$1.probe"
    wait "$ip" || true
  }
  echo "idle: TCP through the overlay and $N management messages..." >&2
  local rss0
  rss0=$(awk '/VmRSS/ {print $2}' "/proc/$bob_pid/status")
  phase idle
  echo "flood: $RATE QUIC attempts/s from ${#srcs[@]} addresses and random datagrams at bob..." >&2
  ip netns exec "$M" "$FLOOD" quic 10.0.2.2:7721 "$RATE" $((SECS + 6)) "${srcs[@]}" >"$DIR/quic.out" &
  local fq=$!
  ip netns exec "$M" "$FLOOD" udp 10.0.2.2:7720 $((SECS + 6)) >"$DIR/udp.out" &
  local fu=$!
  # bob's peak RSS while flooded
  (
    peak=0
    while kill -0 "$fq" 2>/dev/null; do
      r=$(awk '/VmRSS/ {print $2}' "/proc/$bob_pid/status")
      [ "$r" -gt "$peak" ] && peak=$r
      echo "$peak" >"$DIR/rss.peak"
      sleep 0.5
    done
  ) &
  local watcher=$!
  sleep 2
  phase flood
  wait "$fq" "$fu" || true
  wait "$watcher" || true
  ip netns exec "$B" "$BIN/detourctl" status --json -s "$DIR/bob.sock" >"$DIR/bob.status"
  kill -TERM "$(pgrep -f "detourd -c $DIR/alice.toml")" "$bob_pid" 2>/dev/null || true
  sleep 1
  python3 - "$DIR" "$rss0" <<'EOF'
import json, sys
d, rss0 = sys.argv[1], int(sys.argv[2])
def load(name):
    with open(f"{d}/{name}") as f:
        return json.load(f)
def p(v, q):
    v = sorted(v)
    return round(v[min(len(v) - 1, int(round(q * (len(v) - 1))))], 3) if v else None
idle_tcp = load("idle.iperf")["end"]["sum_received"]["bits_per_second"]
flood_tcp = load("flood.iperf")["end"]["sum_received"]["bits_per_second"]
idle, flood = load("idle.probe"), load("flood.probe")
quic, udp, st = load("quic.out"), load("udp.out"), load("bob.status")
peak = int(open(f"{d}/rss.peak").read().strip() or 0)
r = {
    "bench": "flood",
    "flood_quic_attempts_per_s": quic["rate"],
    "flood_udp_datagrams_per_s": udp["rate"],
    "messages_per_phase": flood["sent"],
    "idle_mgmt_delivery_ratio": round(idle["delivered"] / idle["sent"], 4),
    "idle_mgmt_p99_ms": p(idle["latencies_ms"], 0.99),
    "flood_mgmt_delivery_ratio": round(flood["delivered"] / flood["sent"], 4),
    "flood_mgmt_p50_ms": p(flood["latencies_ms"], 0.5),
    "flood_mgmt_p99_ms": p(flood["latencies_ms"], 0.99),
    "idle_tcp_mbit_s": round(idle_tcp / 1e6, 1),
    "flood_tcp_mbit_s": round(flood_tcp / 1e6, 1),
    "flood_tcp_ratio": round(flood_tcp / idle_tcp, 3),
    "idle_detourd_rss_mb": round(rss0 / 1024, 1),
    "flood_detourd_rss_mb": round(peak / 1024, 1),
    "incoming_handshakes": st["incoming_handshakes"],
    "pending_handshakes_at_end": st["pending_handshakes"],
    "refused_handshakes": st["refused_handshakes"],
    "data_port_drops": sum(st["drops"].values()),
    "socket_drops": st["socket_drops"],
}
print(json.dumps(r))
EOF
}

case "$NAME" in
  forwarding) bench_forwarding ;;
  failover) bench_failover ;;
  management) bench_management ;;
  replex) bench_replex ;;
  scale) bench_scale ;;
  flood) bench_flood ;;
esac

