#!/usr/bin/env python3
"""Measures an idle overlay of N detourd instances that `scripts/bench.sh scale` started
(host i runs node n<i> in namespace <P>h<i>, control socket DIR/n<i>.sock, overlay address
10.77.0.<i>; node n1 is every other node's only configured peer).

usage: scale.py N PREFIX DIR BIN START_UNIX_TIME
prints one JSON object with the figures for this N (keys scale_<N>_...), progress on stderr.

Phases:
  converge  time from START until every directory lists every node
  idle      after a settle time, CPU of every detourd, RSS, UDP datagrams and bytes sent per
            namespace, over IDLE seconds (no traffic)
  ping      PAIRS random ordered pairs ping each other's overlay address (aggregate
            interface, on-demand links): success within 3 s and the first reply's time
  messages  the same pairs send MESSAGES acknowledged management messages each
  recover   10 % of the nodes (never n1) are killed with SIGKILL; then time until every
            live node's chosen neighbours are all up again, and message delivery between
            random live pairs
"""
import json
import os
import random
import socket
import statistics
import struct
import subprocess
import sys
import time

N, P, DIR, BIN, START = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])
SETTLE = float(os.environ.get("BENCH_SCALE_SETTLE", "30"))
IDLE = float(os.environ.get("BENCH_SCALE_IDLE", "20"))
PAIRS = int(os.environ.get("BENCH_SCALE_PAIRS", "20"))
MESSAGES = int(os.environ.get("BENCH_SCALE_MESSAGES", "10"))
CONVERGE_TIMEOUT = float(os.environ.get("BENCH_SCALE_CONVERGE_TIMEOUT", "240"))
rng = random.Random(int(os.environ.get("BENCH_SEED", "1")))
HZ = os.sysconf("SC_CLK_TCK")


def log(*a):
    print(f"[scale {N}]", *a, file=sys.stderr, flush=True)


def ns(i):
    return f"{P}h{i}"


def sock(i):
    return f"{DIR}/n{i}.sock"


def ctl(i, cmd, timeout=5.0):
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(timeout)
    try:
        c.connect(sock(i))
        c.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            b = c.recv(1 << 20)
            if not b:
                break
            buf += b
        return json.loads(buf)
    except (OSError, ValueError):
        return None
    finally:
        c.close()


def pids_of(nodes):
    """node → detourd PID, from one pgrep (one per node took 10 s at N = 100 on a box busy
    with the start, and delayed the first converge poll by as much)."""
    found = {}
    for line in subprocess.run(["pgrep", "-af", "detourd -c"], capture_output=True, text=True).stdout.splitlines():
        pid, _, cmd = line.partition(" ")
        for i in nodes:
            if cmd.endswith(f"detourd -c {DIR}/n{i}.toml"):
                found[i] = int(pid)
    return {i: found.get(i) for i in nodes}


def cpu_ticks(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except OSError:
        return None


def rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def net_counters(i):
    """(UDP datagrams sent, bytes sent on eth0) of namespace i."""
    out = subprocess.run(["ip", "netns", "exec", ns(i), "cat", "/proc/net/snmp", "/proc/net/snmp6", "/proc/net/dev"], capture_output=True, text=True).stdout
    lines = out.splitlines()
    dgrams = 0
    for a, b in zip(lines, lines[1:]):
        if a.startswith("Udp:") and b.startswith("Udp:") and not b.split()[1].isalpha():
            head, vals = a.split(), b.split()
            dgrams += int(vals[head.index("OutDatagrams")])
    for line in lines:
        if line.startswith("Udp6OutDatagrams"):
            dgrams += int(line.split()[1])
    tx = 0
    for line in lines:
        if line.strip().startswith("eth0:"):
            tx = int(line.split(":", 1)[1].split()[8])
    return dgrams, tx


def pct(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))] if v else None


def converge(live):
    """Seconds from START until every node's directory lists every node. The nodes are
    asked concurrently (asked one after the other, 100 daemons busy with their start took
    up to 10 s per round, and the round's length was measured, not the overlay). A node
    whose directory is complete is not asked again (a directory only grows while nobody
    fails)."""
    from concurrent.futures import ThreadPoolExecutor

    def known(i):
        r = ctl(i, "nodes")
        return len(r.get("nodes", [])) if r else 0

    t_done = None
    waiting = list(live)
    next_report = 5
    with ThreadPoolExecutor(max_workers=16) as pool:
        while time.time() - START < CONVERGE_TIMEOUT:
            counts = dict(zip(waiting, pool.map(known, waiting)))
            waiting = [i for i in waiting if counts[i] < len(live)]
            if time.time() - START >= next_report and waiting:
                log(f"after {time.time() - START:.0f} s, {len(waiting)} directories incomplete: " + ", ".join(f"n{i} ({counts[i]})" for i in waiting[:10]))
                next_report += 10
            if not waiting:
                t_done = time.time() - START
                break
            time.sleep(0.1)
    return t_done


def idle(pids):
    log(f"idle for {SETTLE:.0f} s, then measuring {IDLE:.0f} s")
    time.sleep(SETTLE)
    # Each counter is read with its own clock: reading a hundred namespaces' counters
    # takes seconds on a loaded box.
    n0 = {i: (time.time(), net_counters(i)) for i in pids}
    c0 = {i: (time.time(), cpu_ticks(p)) for i, p in pids.items()}
    time.sleep(IDLE)
    c1 = {i: (time.time(), cpu_ticks(p)) for i, p in pids.items()}
    n1 = {i: (time.time(), net_counters(i)) for i in pids}
    cores = {i: (c1[i][1] - c0[i][1]) / HZ / (c1[i][0] - c0[i][0]) for i in pids if c0[i][1] is not None and c1[i][1] is not None}
    pkts = {i: (n1[i][1][0] - n0[i][1][0]) / (n1[i][0] - n0[i][0]) for i in pids}
    byts = {i: (n1[i][1][1] - n0[i][1][1]) / (n1[i][0] - n0[i][0]) for i in pids}
    rss = {i: rss_kb(p) for i, p in pids.items()}
    return cores, pkts, byts, rss


def ping_pairs(pairs):
    """Each pair pings 30 times 0.1 s apart (3 s): ok when a reply came, first reply in ms."""
    procs = []
    for a, b in pairs:
        cmd = ["ip", "netns", "exec", ns(a), "ping", "-n", "-c", "30", "-i", "0.1", "-W", "1", "-w", "4", f"10.77.0.{b}"]
        procs.append((a, b, time.time(), subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)))
    results = []
    for a, b, t0, p in procs:
        out, _ = p.communicate()
        first = None
        for line in out.splitlines():
            if "bytes from" in line and "icmp_seq=" in line:
                seq = int(line.split("icmp_seq=")[1].split()[0])
                rtt = float(line.split("time=")[1].split()[0]) if "time=" in line else 0.0
                first = (seq - 1) * 100.0 + rtt
                break
        results.append({"from": a, "to": b, "ok": first is not None, "first_reply_ms": first})
    return results


def send_messages(pairs, count):
    """Each pair sends COUNT messages 50 ms apart through the sender's local API. The
    probes start 2 s after they are launched, all at once: the first messages of the first
    probes went out while the others were still starting their interpreters (20 Python
    start-ups on two cores), and the slowest of them set the p99."""
    procs = []
    probe = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "netns-tests", "helpers", "mgmtprobe.py")
    env = dict(os.environ, PROBE_START=str(time.time() + 2.0))
    for a, b in pairs:
        cmd = ["ip", "netns", "exec", ns(a), "python3", probe, "7722", f"n{b}", str(count), "0.05"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env))
    sent, delivered, lat = 0, 0, []
    for p in procs:
        out, _ = p.communicate()
        try:
            r = json.loads(out)
        except ValueError:
            sent += count
            continue
        sent += r["sent"]
        delivered += r["delivered"]
        lat += r["latencies_ms"]
    return sent, delivered, lat


def neighbour_state(i, gone, live):
    """(full, why) for node i: full when it has sessions with all the neighbours it chose,
    as many as it wants up (or every other live node), and no usable session with a dead
    node any more."""
    s = ctl(i, "status")
    if not s or s.get("result") != "status":
        return False, "no status"
    m = s["management"]
    # A session with a dead node may linger until QUIC gives up on it (6 s), marked
    # unusable once the failover finds its path down: it carries nothing and is not
    # part of the working neighbour set.
    stale = [r["name"] for r in m["neighbours"] if r["name"] in gone and r["state"] == "up"]
    up = sum(1 for r in m["neighbours"] if r["role"] in ("configured", "neighbour") and r["state"] == "up")
    want = min(m["target_neighbours"], len(live) - 1)
    if m.get("neighbours_missing", 0) > 0 or stale or up < want:
        return False, f"up {up}/{want}, missing {m.get('neighbours_missing', 0)}, dead still up {stale}"
    return True, ""


def neighbour_sets_full(live, dead, pool, since=None):
    """Every live node's neighbour set is full (see neighbour_state). The nodes are asked
    concurrently (one after the other, a round took seconds, and its length was measured
    instead of the overlay). `since`, when given, maps node → seconds after the kill at
    which it was first seen full, and the reasons of the others."""
    gone = {f"n{i}" for i in dead}
    states = list(pool.map(lambda i: neighbour_state(i, gone, live), live))
    if since is not None:
        t = time.time() - since["t0"]
        for i, (ok, why) in zip(live, states):
            if ok:
                since["full"].setdefault(i, round(t, 1))
            else:
                since["full"].pop(i, None)
                since["why"][i] = (round(t, 1), why)
    return all(ok for ok, _ in states)


def totals(nodes):
    """Sums over the nodes of the counters that tell what the start cost: sessions set up,
    failed and refused handshakes, late loops, records published, flood grafts and prunes,
    relay sessions served."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=16) as pool:
        st = [s for s in pool.map(lambda i: ctl(i, "status"), nodes) if s and s.get("result") == "status"]
    keys = ["management_handshakes", "management_errors", "refused_handshakes", "late_loops"]
    t = {k: sum(s.get(k, 0) for s in st) for k in keys}
    for k in ["records_published", "flood_grafts", "flood_prunes"]:
        t[k] = sum(s["management"].get(k, 0) for s in st)
    t["relaying"] = sum(len(s.get("relaying", [])) for s in st)
    t["sessions"] = sum(len(s["management"]["neighbours"]) for s in st)
    return t


def random_pairs(nodes, k):
    pairs = set()
    while len(pairs) < min(k, len(nodes) * (len(nodes) - 1)):
        a, b = rng.sample(nodes, 2)
        pairs.add((a, b))
    return sorted(pairs)


def main():
    nodes = list(range(1, N + 1))
    log("waiting for every directory to list every node")
    conv = converge(nodes)
    log(f"converged in {conv} s" if conv is not None else "did not converge")
    pids = pids_of(nodes)
    start_cpu = sorted((cpu_ticks(p) or 0) / HZ for p in pids.values() if p)
    if start_cpu:
        log(f"CPU used so far: {sum(start_cpu):.1f} s by all daemons, median {statistics.median(start_cpu):.2f} s, max {start_cpu[-1]:.2f} s")
    log("at convergence, summed over the nodes: " + ", ".join(f"{k} {v}" for k, v in totals(nodes).items()))
    missing = [i for i, p in pids.items() if p is None]
    if missing:
        log(f"detourd not running on {missing}")
    cores, pkts, byts, rss = idle({i: p for i, p in pids.items() if p})
    total = sum(cores.values())
    log(f"idle: {total:.3f} cores in all, median {statistics.median(cores.values()):.4f}, max {max(cores.values()):.4f} (n{max(cores, key=cores.get)})")
    pairs = random_pairs(nodes, PAIRS)
    log(f"ping between {len(pairs)} random pairs")
    pings = ping_pairs(pairs)
    ok = [p for p in pings if p["ok"]]
    log(f"ping: {len(ok)}/{len(pings)}; failed: {[(p['from'], p['to']) for p in pings if not p['ok']]}")
    log(f"messages between the same pairs ({MESSAGES} each)")
    sent, delivered, lat = send_messages(pairs, MESSAGES)
    log(f"messages: {delivered}/{sent}, p99 {pct(lat, 0.99)} ms")
    # 10 % of the nodes fail (never n1, every other node's bootstrap contact).
    dead = sorted(rng.sample(nodes[1:], max(1, N // 10))) if N > 2 else []
    for i in dead:
        if pids.get(i):
            os.kill(pids[i], 9)
    t_kill = time.time()
    live = [i for i in nodes if i not in dead]
    log(f"killed {dead}; waiting for every live node's neighbour set")
    recover = None
    from concurrent.futures import ThreadPoolExecutor

    seen = {"t0": t_kill, "full": {}, "why": {}}
    with ThreadPoolExecutor(max_workers=16) as pool:
        while time.time() - t_kill < 120:
            if neighbour_sets_full(live, dead, pool, seen):
                recover = time.time() - t_kill
                break
            time.sleep(0.2)
    log(f"neighbour sets full again after {recover} s")
    last = sorted(seen["full"].items(), key=lambda kv: -kv[1])[:5]
    log("last to be full: " + ", ".join(f"n{i} at {t} s (before: {seen['why'].get(i, ('-', ''))[1]} at {seen['why'].get(i, ('-', ''))[0]} s)" for i, t in last))
    after_pairs = random_pairs(live, PAIRS)
    a_sent, a_delivered, a_lat = send_messages(after_pairs, MESSAGES)
    log(f"messages after the failures: {a_delivered}/{a_sent}, p99 {pct(a_lat, 0.99)} ms")
    k = f"scale_{N}_"
    r = {
        k + "converge_s": round(conv, 2) if conv is not None else None,
        k + "idle_cores_all": round(total, 4),
        k + "idle_cores_per_node": round(total / len(cores), 5),
        k + "idle_cores_per_node_median": round(statistics.median(cores.values()), 5),
        k + "idle_cores_max_node": round(max(cores.values()), 5),
        k + "rss_mb_per_node": round(statistics.median(v for v in rss.values() if v) / 1024, 1),
        k + "rss_mb_max_node": round(max(v for v in rss.values() if v) / 1024, 1),
        k + "udp_pkts_per_s_per_node": round(statistics.median(pkts.values()), 1),
        k + "udp_pkts_per_s_max_node": round(max(pkts.values()), 1),
        k + "tx_bytes_per_s_per_node": round(statistics.median(byts.values())),
        k + "tx_bytes_per_s_max_node": round(max(byts.values())),
        k + "ping_ok_ratio": round(len(ok) / len(pings), 3) if pings else None,
        k + "ping_first_reply_ms_p50": round(pct([p["first_reply_ms"] for p in ok], 0.5), 1) if ok else None,
        k + "ping_first_reply_ms_max": round(max(p["first_reply_ms"] for p in ok), 1) if ok else None,
        k + "msg_delivery_ratio": round(delivered / sent, 4) if sent else None,
        k + "msg_p99_ms": round(pct(lat, 0.99), 1) if lat else None,
        k + "recover_s": round(recover, 1) if recover is not None else None,
        k + "msg_delivery_ratio_after_failures": round(a_delivered / a_sent, 4) if a_sent else None,
        k + "msg_p99_ms_after_failures": round(pct(a_lat, 0.99), 1) if a_lat else None,
    }
    print(json.dumps(r))


main()
