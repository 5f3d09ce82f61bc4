# Shared helpers for scripts/demo.sh and scripts/bench.sh (sourced, not run).
#
# Topology: one router namespace "<P>r" and hosts "<P>h<i>" joined to it by veth pairs.
#   host i underlay: 10.0.<i>.2/24 and fd00:0:<i>::2/64, default routes via the router
#   host i LAN:      veth "lan0" with 10.<100+i>.0.1/24 and fd10:<i>::1/64 (announced)
#   host i overlay:  10.77.0.<i>/24 and fd77::<i>/64
# Everything created here is removed by topo_destroy, which the scripts call from a trap.

DETOUR_ROOT=${DETOUR_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
BIN=${BIN:-$DETOUR_ROOT/target/release}

need_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "this script creates network namespaces and must run as root" >&2
    exit 1
  fi
}

# Installs what is missing (Debian/Ubuntu), quietly.
install_deps() {
  local missing=()
  command -v ip >/dev/null || missing+=(iproute2)
  command -v iptables >/dev/null || missing+=(iptables)
  command -v iperf3 >/dev/null || missing+=(iperf3)
  command -v ping >/dev/null || missing+=(iputils-ping)
  command -v python3 >/dev/null || missing+=(python3)
  command -v pgrep >/dev/null || missing+=(procps)
  command -v curl >/dev/null || missing+=(curl)
  command -v nft >/dev/null || missing+=(nftables)
  command -v c++ >/dev/null || missing+=(g++)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  if ! command -v cargo >/dev/null; then
    echo "cargo is missing: install Rust from https://rustup.rs and run this again" >&2
    exit 1
  fi
}

build_release() {
  (cd "$DETOUR_ROOT" && cargo build --release --quiet --bins)
}

# topo_create PREFIX N: a router namespace and N hosts behind it.
topo_create() {
  local p=$1 n=$2 i
  ip netns add "${p}r"
  ip -n "${p}r" link set lo up
  ip netns exec "${p}r" sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
  for i in $(seq 1 "$n"); do
    topo_add_host "$p" "$i"
  done
}

# topo_add_host PREFIX I: host ${PREFIX}h<I> on the router's link r<I>, 10.0.<I>.2/24 and
# fd00:0:<I>::2/64, with a LAN (lan0, 10.<100+I>.0.1/24 and fd10:<I>::1/64).
topo_add_host() {
  local p=$1 i=$2
  local h="${p}h$i"
  ip netns add "$h"
  ip -n "$h" link set lo up
  ip link add "r$i" netns "${p}r" type veth peer name eth0 netns "$h"
  ip -n "${p}r" addr add "10.0.$i.1/24" dev "r$i"
  ip -n "${p}r" addr add "fd00:0:$i::1/64" dev "r$i" nodad
  ip -n "${p}r" link set "r$i" up
  ip -n "$h" addr add "10.0.$i.2/24" dev eth0
  ip -n "$h" addr add "fd00:0:$i::2/64" dev eth0 nodad
  ip -n "$h" link set eth0 up
  ip -n "$h" route add default via "10.0.$i.1"
  ip -n "$h" -6 route add default via "fd00:0:$i::1"
  # The kernel here has no dummy driver: a veth pair stands in for the LAN.
  ip -n "$h" link add lan0 type veth peer name lan0p
  ip -n "$h" addr add "10.$((100 + i)).0.1/24" dev lan0
  ip -n "$h" addr add "fd10:$i::1/64" dev lan0 nodad
  ip -n "$h" link set lan0p up
  ip -n "$h" link set lan0 up
}

# topo_destroy PREFIX: stops every process in the namespaces, then deletes them.
topo_destroy() {
  local p=$1 ns pids
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^${p}" || true); do
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    [ -n "$pids" ] && kill -TERM $pids 2>/dev/null || true
  done
  sleep 0.5
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^${p}" || true); do
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    [ -n "$pids" ] && kill -KILL $pids 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
}

# write_config DIR NAME INDEX PEERS... ; PEERS are "name:index" of the other hosts.
# Keys must exist as DIR/<name>.key. Peers are reached on their IPv4 underlay address.
# $EXTRA_CONFIG (TOML sections) is appended to every config.
write_config() {
  local dir=$1 name=$2 i=$3
  shift 3
  cat > "$dir/$name.toml" <<EOF
[node]
name = "$name"
private_key = "$dir/$name.key"
overlay_ipv4 = "10.77.0.$i/24"
overlay_ipv6 = "fd77::$i/64"
prefixes = ["10.$((100 + i)).0.0/24", "fd10:$i::/64"]
control_socket = "$dir/$name.sock"
EOF
  printf '%s\n' "${EXTRA_CONFIG:-}" >> "$dir/$name.toml"
  local peer pname pi
  for peer in "$@"; do
    pname=${peer%%:*}
    pi=${peer##*:}
    cat >> "$dir/$name.toml" <<EOF

[[peer]]
name = "$pname"
public_key = "$("$BIN/detourctl" pubkey "$dir/$pname.key")"
endpoints = ["10.0.$pi.2"]
overlay_ipv4 = "10.77.0.$pi"
overlay_ipv6 = "fd77::$pi"
prefixes = ["10.$((100 + pi)).0.0/24", "fd10:$pi::/64"]
EOF
  done
}

# start_daemon NS DIR NAME: runs detourd in the namespace, log in DIR/NAME.log.
start_daemon() {
  ip netns exec "$1" "$BIN/detourd" -c "$2/$3.toml" >"$2/$3.log" 2>&1 &
}

# wait_up NS DIR NAME COUNT: waits until COUNT peers of NAME are up (10 s at most).
wait_up() {
  local ns=$1 dir=$2 name=$3 count=$4 up t
  for t in $(seq 1 100); do
    up=$(ip netns exec "$ns" "$BIN/detourctl" status --json -s "$dir/$name.sock" 2>/dev/null \
      | python3 -c 'import json,sys; print(sum(p["state"]=="up" and p["endpoint"] is not None for p in json.load(sys.stdin)["peers"]))' 2>/dev/null || echo 0)
    [ "$up" -ge "$count" ] && return 0
    sleep 0.1
  done
  echo "timed out waiting for $name's sessions; log:" >&2
  cat "$dir/$name.log" >&2
  return 1
}

# lab_begin TAG: checks root, installs what is missing, builds, and sets $P (namespace
# prefix) and $DIR (work directory); both are removed on exit and on Ctrl-C. With
# DETOUR_NO_BUILD set, the binaries in $BIN are used as they are (the test suite runs the
# soak with its debug build).
lab_begin() {
  need_root
  install_deps
  if [ -z "${DETOUR_NO_BUILD:-}" ]; then
    echo "== building detour (release)" >&2
    build_release
  fi
  P="$1$$"
  DIR=$(mktemp -d "/tmp/detour-$1.XXXXXX")
  trap lab_end EXIT
  trap 'exit 130' INT TERM
}

lab_end() {
  trap - EXIT INT TERM
  echo "== cleaning up" >&2
  topo_destroy "$P"
  rm -rf "$DIR"
}

# mesh_start NAME...: host i (${P}h<i>) runs detourd as the i-th NAME, every host a peer of
# every other; returns when every session is up.
mesh_start() {
  local names=("$@") n=$# i j
  topo_create "$P" "$n"
  for i in $(seq 1 "$n"); do
    "$BIN/detourctl" genkey "$DIR/${names[$((i - 1))]}.key" >/dev/null 2>&1
  done
  for i in $(seq 1 "$n"); do
    local peers=()
    for j in $(seq 1 "$n"); do
      [ "$j" != "$i" ] && peers+=("${names[$((j - 1))]}:$j")
    done
    write_config "$DIR" "${names[$((i - 1))]}" "$i" "${peers[@]}"
    "$BIN/detourd" --check-config "$DIR/${names[$((i - 1))]}.toml" >&2
  done
  for i in $(seq 1 "$n"); do
    start_daemon "${P}h$i" "$DIR" "${names[$((i - 1))]}"
  done
  for i in $(seq 1 "$n"); do
    wait_up "${P}h$i" "$DIR" "${names[$((i - 1))]}" $((n - 1))
  done
}
