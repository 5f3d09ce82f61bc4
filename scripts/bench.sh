#!/usr/bin/env bash
# Benchmarks. `scripts/bench.sh NAME` runs one and prints one JSON object on its last line.
#
#   forwarding  single- and 4-stream TCP (iperf3) and ping RTT between the same two
#               namespaces over the bare underlay and through the overlay, in one run,
#               plus detourd's CPU time per Gbit carried.
#
# BENCH_SECONDS (default 10) sets the length of each iperf3 run. Run as root.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

usage() {
  echo "usage: $0 forwarding" >&2
  exit 2
}
[ $# -eq 1 ] || usage
NAME=$1
SECS=${BENCH_SECONDS:-10}
case "$NAME" in
  forwarding) ;;
  *) usage ;;
esac

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

case "$NAME" in
  forwarding) bench_forwarding ;;
  *) usage ;;
esac
