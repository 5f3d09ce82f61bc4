#!/usr/bin/env python3
"""Chaos soak driver, run by scripts/soak.sh once 8 detourd (n1..n8, full mesh) are up in
the namespaces <P>h1..<P>h8 behind the router <P>r.

usage: soak.py P DIR BIN SECONDS SEED

n1..n4 are the endpoints: three long TCP streams (n1 -> n2 and n3 -> n4 to the underlay
address, protected by detour; n2 -> n3 to the overlay address) whose every byte is
checked (netns-tests/helpers/longstream.py), and acknowledged critical management messages
between random pairs of them (netns-tests/helpers/mgmtprobe.py). n5..n8 are relays.
Faults follow a schedule drawn from SEED, one after another: silent cuts and one-way cuts
between endpoints, 5-30 % loss on a pair, a relay killed with SIGKILL and restarted, a relay
stopped and started again (directory churn), and a cut together with a relay kill. Every 5
s every running node's `detourctl status --json` is scraped. The last 15 s are quiet.

Prints one JSON line; exits 1 when a message was lost, a stream was reset or corrupted, a
daemon panicked or left kernel objects, or the RSS of an endpoint grew by more than
RSS_BOUND_MB.
"""
import json
import os
import random
import subprocess
import sys
import threading
import time

P, DIR, BIN, SECONDS, SEED = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5])
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPERS = os.path.join(ROOT, "netns-tests", "helpers")
NODES = list(range(1, 9))
ENDPOINTS, RELAYS = [1, 2, 3, 4], [5, 6, 7, 8]
QUIET_S = 15
# An endpoint's RSS may grow by this much over the soak (allocator warm-up, the directory,
# path state; measured: see docs/performance.md "Chaos soak").
RSS_BOUND_MB = 16
STREAM_RATE = 1_000_000  # bytes/s per stream

rng = random.Random(SEED)
lock = threading.Lock()
down = set()  # nodes stopped or killed on purpose
restarted_at = {}
stop = threading.Event()


def ns(i):
    return f"{P}h{i}"


def run(args, check=True, timeout=30):
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{args}: {r.stderr}")
    return r.stdout


def router(cmd):
    run(["ip", "netns", "exec", f"{P}r", "bash", "-c", cmd])


def pid(i):
    r = subprocess.run(["pgrep", "-f", f"detourd -c {DIR}/n{i}.toml"], capture_output=True, text=True)
    return int(r.stdout.split()[0]) if r.stdout.split() else None


def rss_mb(i):
    p = pid(i)
    if p is None:
        return None
    with open(f"/proc/{p}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return None


def start(i):
    log = open(f"{DIR}/n{i}.log", "a")
    subprocess.Popen(["ip", "netns", "exec", ns(i), f"{BIN}/detourd", "-c", f"{DIR}/n{i}.toml"], stdout=log, stderr=log)
    restarted_at[i] = time.monotonic()


def status(i):
    out = run(["ip", "netns", "exec", ns(i), f"{BIN}/detourctl", "status", "--json", "-s", f"{DIR}/n{i}.sock"], timeout=10)
    return json.loads(out)


def u4(i):
    return f"10.0.{i}.2"


def u6(i):
    return f"fd00:0:{i}::2"


def drop_rules(a, b, extra=""):
    """iptables/ip6tables rule bodies dropping a -> b."""
    return [f"iptables {{}} FORWARD -s {u4(a)} -d {u4(b)} {extra} -j DROP", f"ip6tables {{}} FORWARD -s {u6(a)} -d {u6(b)} {extra} -j DROP"]


def apply(rules, op):
    for r in rules:
        router(r.format(op))


# --- the workload -------------------------------------------------------------------

streams = [(1, 2, u4(2), 9301), (3, 4, u4(4), 9302), (2, 3, "10.77.0.3", 9303)]
servers, clients = [], []
for src, dst, addr, port in streams:
    out = f"{DIR}/stream-{port}.json"
    servers.append((subprocess.Popen(["ip", "netns", "exec", ns(dst), "python3", f"{HELPERS}/longstream.py", "server", str(port), out]), out))
time.sleep(0.5)
t0 = time.monotonic()
for src, dst, addr, port in streams:
    clients.append(subprocess.Popen(["ip", "netns", "exec", ns(src), "python3", f"{HELPERS}/longstream.py", "client", addr, str(port), str(SECONDS), str(STREAM_RATE)], stdout=subprocess.PIPE, text=True))

msgs = {"sent": 0, "delivered": 0, "failed": 0, "latencies": []}


def messages():
    mrng = random.Random(SEED + 1)
    while not stop.is_set():
        a, b = mrng.sample(ENDPOINTS, 2)
        out = run(["ip", "netns", "exec", ns(a), "python3", f"{HELPERS}/mgmtprobe.py", "7722", f"n{b}", "10", "0.1", "critical"], check=False, timeout=60)
        try:
            r = json.loads(out)
        except ValueError:
            r = {"sent": 10, "delivered": 0, "failed": 10, "latencies_ms": []}
        with lock:
            msgs["sent"] += r["sent"]
            msgs["delivered"] += r["delivered"]
            msgs["failed"] += r["failed"]
            msgs["latencies"] += r["latencies_ms"]


scrapes = {"ok": 0, "failed": 0, "errors": []}


def scraper():
    while not stop.wait(5):
        for i in NODES:
            with lock:
                skip = i in down or time.monotonic() - restarted_at.get(i, -1e9) < 5
            if skip:
                continue
            try:
                status(i)
                scrapes["ok"] += 1
            except Exception as e:  # noqa: BLE001 - any failure to answer counts
                with lock:
                    if i in down:
                        continue
                scrapes["failed"] += 1
                scrapes["errors"].append(f"n{i}: {e}"[:200])


rss_start = {}
time.sleep(min(20, SECONDS / 6))
for i in NODES:
    rss_start[i] = rss_mb(i)

threads = [threading.Thread(target=messages, daemon=True), threading.Thread(target=scraper, daemon=True)]
for t in threads:
    t.start()

# --- the faults ---------------------------------------------------------------------

faults = {"cut": 0, "oneway": 0, "loss": 0, "kill": 0, "churn": 0, "cut_and_kill": 0}
schedule = []
while time.monotonic() - t0 < SECONDS - QUIET_S - 12:
    kind = rng.choice(list(faults))
    faults[kind] += 1
    a, b = rng.sample(ENDPOINTS, 2)
    r = rng.choice(RELAYS)
    hold = rng.uniform(4, 12)
    schedule.append({"at_s": round(time.monotonic() - t0, 1), "kind": kind, "pair": f"n{a}-n{b}", "relay": f"n{r}", "hold_s": round(hold, 1)})
    rules = []
    if kind in ("cut", "cut_and_kill"):
        rules = drop_rules(a, b) + drop_rules(b, a)
    elif kind == "oneway":
        rules = drop_rules(a, b)
    elif kind == "loss":
        p = rng.uniform(0.05, 0.30)
        schedule[-1]["loss"] = round(p, 3)
        rules = drop_rules(a, b, f"-m statistic --mode random --probability {p:.3f}") + drop_rules(b, a, f"-m statistic --mode random --probability {p:.3f}")
    apply(rules, "-I")
    if kind in ("kill", "cut_and_kill", "churn"):
        with lock:
            down.add(r)
        p = pid(r)
        if p:
            os.kill(p, 9 if kind != "churn" else 15)
    time.sleep(hold)
    apply(rules, "-D")
    if kind in ("kill", "cut_and_kill", "churn"):
        # a stopped relay must be gone before it starts again
        for _ in range(100):
            if pid(r) is None:
                break
            time.sleep(0.1)
        start(r)
        with lock:
            down.discard(r)
    time.sleep(rng.uniform(2, 6))

# --- quiet end, results -------------------------------------------------------------

stop.set()
stream_out = []
for c in clients:
    out, _ = c.communicate(timeout=SECONDS + 120)
    stream_out.append(json.loads(out or '{"bytes": 0, "error": "no output"}'))
stream_in = []
for s, path in servers:
    try:
        s.wait(timeout=60)
    except subprocess.TimeoutExpired:
        s.kill()
    try:
        with open(path) as f:
            stream_in.append(json.load(f))
    except (OSError, ValueError):
        stream_in.append({"bytes": 0, "mismatches": 0, "reset": True, "stall_ms": None})
for t in threads:
    t.join(timeout=90)

rss_end = {i: rss_mb(i) for i in NODES}
logs = ""
for i in NODES:
    with open(f"{DIR}/n{i}.log", errors="replace") as f:
        logs += f.read()
panics = logs.count("panicked")

# stop every daemon, then count what they left in the kernel
for i in NODES:
    p = pid(i)
    if p:
        os.kill(p, 15)
for _ in range(100):
    if all(pid(i) is None for i in NODES):
        break
    time.sleep(0.1)
left = {}
check = (
    "ip -o link show | grep -cE ' (dt-|detour0)' ; ip rule show | grep -c 'proto 157' ; ip -6 rule show | grep -c 'proto 157' ; "
    "ip route show table all proto 157 | grep -c . ; ip -6 route show table all proto 157 | grep -c . ; ip nexthop show proto 157 2>/dev/null | grep -c . ; "
    "iptables-save 2>/dev/null | grep -ci detour ; ip6tables-save 2>/dev/null | grep -ci detour ; tc qdisc show dev eth0 | grep -c htb ; "
    "nft list tables 2>/dev/null | grep -c detour"
)
for i in NODES:
    out = subprocess.run(["ip", "netns", "exec", ns(i), "bash", "-c", check], capture_output=True, text=True).stdout
    n = sum(int(x) for x in out.split() if x.isdigit())
    if n:
        left[f"n{i}"] = n

lat = sorted(msgs["latencies"])
growth = {f"n{i}": round(rss_end[i] - rss_start[i], 1) for i in ENDPOINTS if rss_start.get(i) and rss_end.get(i)}
result = {
    "bench": "soak",
    "seconds": round(time.monotonic() - t0),
    "seed": SEED,
    "faults": faults,
    "messages_sent": msgs["sent"],
    "messages_acknowledged": msgs["delivered"],
    "messages_lost": msgs["sent"] - msgs["delivered"],
    "message_p50_ms": round(lat[len(lat) // 2], 1) if lat else None,
    "message_p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 1) if lat else None,
    "tcp_streams": len(streams),
    "tcp_bytes_checked": sum(s["bytes"] for s in stream_in),
    "tcp_bytes_sent": sum(s["bytes"] for s in stream_out),
    "tcp_mismatches": sum(s["mismatches"] for s in stream_in),
    "tcp_resets": sum(1 for s, o in zip(stream_in, stream_out) if s["reset"] or o["error"]),
    "longest_stall_ms": max((s["stall_ms"] or 0) for s in stream_in),
    "status_scrapes": scrapes["ok"],
    "status_failures": scrapes["failed"],
    "panics": panics,
    "rss_mb_start": {f"n{i}": round(v, 1) for i, v in rss_start.items() if v},
    "rss_mb_end": {f"n{i}": round(v, 1) for i, v in rss_end.items() if v},
    "endpoint_rss_growth_mb_max": max(growth.values()) if growth else None,
    "rss_bound_mb": RSS_BOUND_MB,
    "kernel_objects_left": sum(left.values()),
}
print(json.dumps(result))
if os.environ.get("SOAK_VERBOSE"):
    print(json.dumps({"schedule": schedule, "streams_in": stream_in, "streams_out": stream_out, "scrape_errors": scrapes["errors"][:10], "left": left}), file=sys.stderr)
bad = (
    result["messages_lost"] > 0
    or result["tcp_resets"] > 0
    or result["tcp_mismatches"] > 0
    or result["tcp_bytes_checked"] != result["tcp_bytes_sent"]
    or panics > 0
    or result["kernel_objects_left"] > 0
    or result["status_failures"] > 0
    or (result["endpoint_rss_growth_mb_max"] or 0) > RSS_BOUND_MB
)
if bad:
    print(json.dumps({"schedule": schedule, "streams_in": stream_in, "streams_out": stream_out, "scrape_errors": scrapes["errors"][:10], "left": left}), file=sys.stderr)
sys.exit(1 if bad else 0)
