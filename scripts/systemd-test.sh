#!/usr/bin/env bash
# The shipped unit under a real systemd: boots Debian 12 (systemd 252) in a container
# (systemd-nspawn, its own network namespace, /dev/net/tun bound in), installs the package
# built by scripts/package.sh there, and checks, with the nft and then the legacy iptables
# backend: the unit stays inactive without a configuration; it starts (READY) under its
# confinement; detourctl status answers; ICMP interception, REPLEX's rules and the
# multipath hash policy are in place; warnings reach the journal at priority 4; nothing is
# refused (read-only /proc/sys, missing capabilities); the watchdog keeps it alive for
# 60 s; systemctl reload applies a new peer; systemctl stop leaves nothing behind; and two
# overlays on the host (detourd.service and detourd@corp.service) run side by side and stop
# without touching each other.
#
# The Debian root (debootstrap, ~300 MB) is cached in /var/cache/detour between runs; each
# run boots a fresh copy. Needs root. Usage: scripts/systemd-test.sh [PACKAGE.deb]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEB=${1:-$(ls -t "$ROOT"/dist/detour_*.deb 2>/dev/null | head -1)}
[ -f "$DEB" ] || { echo "no package: run scripts/package.sh first" >&2; exit 1; }
CACHE=/var/cache/detour/rootfs-bookworm
missing=()
command -v systemd-nspawn >/dev/null || missing+=(systemd-container)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ ! -x "$CACHE/usr/lib/systemd/systemd" ]; then
  echo "== debootstrap of Debian 12 into $CACHE (once; cached)" >&2
  rm -rf "$CACHE.tmp"
  mkdir -p "$(dirname "$CACHE")"
  debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,iproute2,iptables,nftables,procps \
    bookworm "$CACHE.tmp" http://deb.debian.org/debian >/dev/null
  mv "$CACHE.tmp" "$CACHE"
fi

WORK=$(mktemp -d /tmp/detour-systemd.XXXXXX)
NSPAWN=""
cleanup() {
  if [ -n "$NSPAWN" ] && kill -0 "$NSPAWN" 2>/dev/null; then
    kill "$NSPAWN" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$NSPAWN" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$NSPAWN" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
echo "== booting a copy of $CACHE" >&2
cp -a "$CACHE" "$WORK/root"
cp "$DEB" "$WORK/root/root/detour.deb"
SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 systemd-nspawn -q -b -D "$WORK/root" --register=no --keep-unit --private-network \
  --bind=/dev/net/tun -M "detour-test-$$" >"$WORK/console.log" 2>&1 &
NSPAWN=$!
LEADER=""
for _ in $(seq 1 100); do
  LEADER=$(pgrep -P "$(pgrep -P "$NSPAWN" -x systemd-nspawn || echo "$NSPAWN")" -x systemd || true)
  [ -n "$LEADER" ] && break
  sleep 0.1
done
[ -n "$LEADER" ] || { cat "$WORK/console.log" >&2; echo "the container did not boot" >&2; exit 1; }
c() { nsenter -t "$LEADER" -a "$@"; }
for _ in $(seq 1 300); do
  state=$(c systemctl is-system-running 2>/dev/null || true)
  case "$state" in running | degraded) break ;; esac
  sleep 0.2
done
echo "== systemd $(c systemctl --version | head -1 | cut -d' ' -f2) is $state" >&2

fail() {
  echo "FAIL: $*" >&2
  echo "--- journal of detourd ---" >&2
  c journalctl -u detourd --no-pager -o short-precise | tail -40 >&2 || true
  exit 1
}
check() { # check DESCRIPTION COMMAND...: the command must succeed in the container
  local what=$1
  shift
  if c sh -c "$*" >/dev/null 2>&1; then echo "ok: $what"; else fail "$what ($*)"; fi
}

echo "== installing the package" >&2
c dpkg -i /root/detour.deb >/dev/null
check "the unit is enabled" "systemctl is-enabled detourd"
c systemctl start detourd || true
check "without a configuration the unit does not start" "[ \"\$(systemctl show -p ConditionResult --value detourd)\" = no ] && ! systemctl is-active detourd"

# An underlay for the container (a veth pair), a key, a peer that never answers.
c sh -c 'ip link add eth0 type veth peer name eth1 && ip addr add 192.0.2.10/24 dev eth0 && ip link set eth1 up && ip link set eth0 up && ip link set lo up && ip route add default via 192.0.2.1'
c detourctl genkey /etc/detour/private.key >/dev/null 2>&1
c detourctl genkey /root/bob.key >/dev/null 2>&1
c detourctl genkey /root/carol.key >/dev/null 2>&1
BOB=$(c detourctl pubkey /root/bob.key)
CAROL=$(c detourctl pubkey /root/carol.key)
# Readable by others: detourd warns, which must reach the journal at priority 4.
c chmod 0644 /etc/detour/private.key
CONFIG="[node]
name = \"alice\"
private_key = \"/etc/detour/private.key\"
overlay_ipv4 = \"10.77.0.1/24\"
metrics_listen = \"127.0.0.1:9772\"

[replex]
enabled = true

[[peer]]
name = \"bob\"
public_key = \"$BOB\"
endpoints = [\"192.0.2.20\"]
overlay_ipv4 = \"10.77.0.2\"
protected = [\"198.51.100.0/24\"]
"
c sh -c "cat >/etc/detour/detour.toml" <<<"$CONFIG"

for backend in nft legacy; do
  echo "== iptables backend: $backend" >&2
  c update-alternatives --quiet --set iptables "/usr/sbin/iptables-$backend"
  c update-alternatives --quiet --set ip6tables "/usr/sbin/ip6tables-$backend"
  since=$(c date '+%Y-%m-%d %H:%M:%S')
  sleep 1
  c systemctl start detourd || fail "systemctl start"
  check "active after start (READY)" "systemctl is-active detourd"
  check "detourctl status answers" "detourctl status | grep -q 'node: alice'"
  check "ICMP interception rules" "iptables-save | grep -q 'DETOUR-ICMP.*NFQUEUE' && ip6tables-save | grep -q 'DETOUR-ICMP.*NFQUEUE'"
  check "REPLEX connection pinning and accounting chains" "iptables-save -t mangle | grep -q ':DETOUR-PIN' && iptables-save -t mangle | grep -q ':DETOUR-ACCT'"
  check "layer-4 multipath hash set" "[ \$(cat /proc/sys/net/ipv4/fib_multipath_hash_policy) = 1 ]"
  check "policy rules and interfaces" "ip rule | grep -q 'lookup 7720' && ip link show dt-bob && ip link show detour0"
  check "status shows no degraded feature and ICMP interception active" "detourctl status --json | grep -q '\"degraded\": {}' && detourctl status --json | grep -A1 '\"icmp\"' | grep -q '\"active\": true'"
  check "a warning reaches the journal at priority warning" "journalctl -u detourd -p warning --since '$since' --no-pager | grep -q 'can be read by other users'"
  check "info messages are below warning" "! journalctl -u detourd -p warning --since '$since' --no-pager | grep -q 'detourd up'"
  check "nothing refused by the confinement" "! journalctl -u detourd --since '$since' --no-pager | grep -Eqi 'read-only file system|permission denied|operation not permitted'"
  if [ "$backend" = nft ]; then
    pid=$(c systemctl show -p MainPID --value detourd)
    echo "   watchdog: $(c systemctl show -p WatchdogUSec --value detourd); waiting 60 s" >&2
    sleep 60
    check "alive after 60 s under the watchdog, never restarted" "systemctl is-active detourd && [ \$(systemctl show -p MainPID --value detourd) = $pid ] && [ \$(systemctl show -p NRestarts --value detourd) = 0 ]"
    c sh -c "cat >>/etc/detour/detour.toml" <<<"
[[peer]]
name = \"carol\"
public_key = \"$CAROL\"
endpoints = [\"192.0.2.30\"]
overlay_ipv4 = \"10.77.0.3\"
"
    c systemctl reload detourd || fail "systemctl reload"
    for _ in $(seq 1 50); do c sh -c "journalctl -u detourd --no-pager | grep -q 'reload: peer carol: added'" && break; sleep 0.1; done
    check "systemctl reload adds a peer without a restart" "journalctl -u detourd --no-pager | grep -q 'reload: peer carol: added' && ip link show dt-carol && [ \$(systemctl show -p MainPID --value detourd) = $pid ]"
  fi
  c systemctl stop detourd || fail "systemctl stop"
  check "stopped" "! systemctl is-active detourd"
  check "no interface left" "! ip -brief link | grep -Eq 'dt-|detour0'"
  check "no rule or route left" "! ip rule | grep -q 7720 && [ -z \"\$(ip route show table 7720)\" ]"
  check "no netfilter chain left" "! iptables-save | grep -q DETOUR && ! ip6tables-save | grep -q DETOUR"
  check "the multipath hash put back" "[ \$(cat /proc/sys/net/ipv4/fib_multipath_hash_policy) = 0 ]"
done
echo "== two overlays on this host: detourd.service and detourd@corp.service (node.instance = 1)" >&2
c detourctl genkey /etc/detour/corp.key >/dev/null 2>&1
c detourctl genkey /root/bob2.key >/dev/null 2>&1
BOB2=$(c detourctl pubkey /root/bob2.key)
c sh -c "cat >/etc/detour/corp.toml" <<<"[node]
name = \"alice\"
instance = 1
private_key = \"/etc/detour/corp.key\"
overlay_ipv4 = \"10.78.0.1/24\"

[[peer]]
name = \"bob\"
public_key = \"$BOB2\"
endpoints = [\"192.0.2.20:7730\"]
overlay_ipv4 = \"10.78.0.2\"
"
c systemctl start detourd detourd@corp || fail "starting both overlays"
check "both overlays active" "systemctl is-active detourd && systemctl is-active detourd@corp"
check "detourctl --overlay corp reaches the second daemon" "detourctl --overlay corp status | grep -q 'ports: data 7730'"
check "each overlay's chains, rules and interfaces" "iptables-save | grep -q ':DETOUR-ICMP ' && iptables-save | grep -q ':DETOUR-ICMP-1 ' && ip rule | grep -q 'lookup 7720' && ip rule | grep -q 'lookup 7730' && ip link show detour0 && ip link show detour1 && ip link show dt1-bob"
c cp /etc/detour/detour.toml /etc/detour/clash.toml
check "a configuration that collides with another overlay is refused, naming it" "! detourd --check-config /etc/detour/clash.toml 2>/tmp/clash.err && grep -q 'node.instance: 0 is also the instance of /etc/detour/detour.toml' /tmp/clash.err"
c rm /etc/detour/clash.toml
c systemctl stop detourd@corp || fail "stopping detourd@corp"
check "the other overlay is untouched by the stop" "systemctl is-active detourd && iptables-save | grep -q ':DETOUR-ICMP ' && ! iptables-save | grep -q 'DETOUR-ICMP-1' && ip link show detour0 && ! ip link show detour1 && ip rule | grep -q 'lookup 7720' && ! ip rule | grep -q 'lookup 7730'"
c systemctl stop detourd || fail "stopping detourd"
check "nothing left of either overlay" "! ip -brief link | grep -Eq 'dt-|dt1-|detour' && ! iptables-save | grep -q DETOUR && ! ip rule | grep -Eq '77[23]0'"

c dpkg --purge detour >/dev/null
check "the package purged" "! dpkg -s detour"
echo "systemd test: passed"
