//! REPLEX multipath (issue 5): two rate-limited paths from alice to bob, the direct one
//! through the router (20 Mbit/s) and one through carol over links of their own
//! (10 Mbit/s), under many short TCP uploads arriving at random (28 Mbit/s offered: more
//! than either path carries, less than both).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::lab::Lab;

const UP: Duration = Duration::from_secs(15);
const FLOWS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/netns-tests/helpers/flows.py");
const BADPACKETS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/netns-tests/helpers/badpackets.py");
/// The direct path's tbf rate, Mbit/s: no load can get more through it alone.
const DIRECT_MBIT: f64 = 20.0;

/// One route in alice's view of bob: (path, target share, realized share, cost ms).
type Route = (String, f64, f64, Option<f64>);
/// One second of alice's view of bob.
type Sample = Vec<Route>;

fn lab() -> Lab {
    lab_with(Some(DIRECT_MBIT), "10mbit", 50, "")
}

/// The three hosts, the direct path limited to `direct_mbit` (none: not limited) and
/// alice's link to carol to `relay_rate` by tbf with a queue of `relay_queue_ms`, and
/// `replex` more of alice's `[replex]` section.
fn lab_with(direct_mbit: Option<f64>, relay_rate: &str, relay_queue_ms: u32, replex: &str) -> Lab {
    let mut lab = Lab::new(&["alice", "bob", "carol"]);
    let (a, b, c) = (lab.host("alice").ns.clone(), lab.host("bob").ns.clone(), lab.host("carol").ns.clone());
    let links = format!(
        "set -e
ip link add ac0 netns {a} type veth peer name ca0 netns {c}
ip link add cb0 netns {c} type veth peer name bc0 netns {b}
ip -n {a} addr add 10.9.1.1/30 dev ac0
ip -n {c} addr add 10.9.1.2/30 dev ca0
ip -n {c} addr add 10.9.2.1/30 dev cb0
ip -n {b} addr add 10.9.2.2/30 dev bc0
for x in '{a} ac0' '{c} ca0' '{c} cb0' '{b} bc0'; do set -- $x; ip -n $1 link set $2 up; done
ip netns exec {a} tc qdisc add dev ac0 root tbf rate {relay_rate} burst 32kb latency {relay_queue_ms}ms
{direct}",
        direct = direct_mbit.map(|m| format!("ip netns exec {} tc qdisc add dev r2 root tbf rate {m}mbit burst 32kb latency 50ms\n", lab.router)).unwrap_or_default()
    );
    let o = crate::lab::host_sh(&links);
    assert!(o.ok, "relay links: {}", o.stderr);
    let alice = lab.node_section("alice", "metrics_listen = \"127.0.0.1:9772\"")
        + &lab.peer_section("bob", None, "")
        + &lab.peer_section("carol", Some("10.9.1.2"), "")
        + "\n[replex]\nenabled = true\n"
        + replex;
    let bob = lab.node_section("bob", "") + &lab.peer_section("alice", None, "") + &lab.peer_section("carol", Some("10.9.2.1"), "");
    let carol = lab.node_section("carol", "") + &lab.peer_section("alice", Some("10.9.1.1"), "") + &lab.peer_section("bob", Some("10.9.2.2"), "");
    lab.write_config("alice", &alice);
    lab.write_config("bob", &bob);
    lab.write_config("carol", &carol);
    lab.start_all();
    lab.wait_up("alice", &["bob", "carol"], UP);
    lab.wait_up("bob", &["alice", "carol"], UP);
    lab
}

fn sample(lab: &Lab) -> Sample {
    let s = lab.status("alice");
    Lab::peer(&s, "bob")["shares"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["status"] == "live")
        .map(|r| (r["path"].as_str().unwrap_or("").to_string(), r["target_share"].as_f64().unwrap_or(0.0), r["realized_share"].as_f64().unwrap_or(0.0), r["cost_ms"].as_f64()))
        .collect()
}

fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = v.collect();
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

#[test]
fn shares_move_off_the_congested_path_aggregate_beats_it_and_no_flow_changes_path() {
    let mut lab = lab();
    // bob marks each upload connection by where its packets arrive: 1 through the overlay
    // (alice's TUN), 2 straight from alice's underlay address. A connection marked 3 was
    // spread over both paths.
    lab.ok(
        "bob",
        "iptables -t mangle -A PREROUTING -p tcp --dport 9200 -i dt-alice -j CONNMARK --or-mark 0x1
iptables -t mangle -A PREROUTING -p tcp --dport 9200 -i eth0 -s 10.0.1.2 -j CONNMARK --or-mark 0x2
iptables -t mangle -A PREROUTING -p tcp --dport 9200 -m connmark --mark 0x3/0x3",
    );
    // REPLEX needs both routes live before it can split.
    let t0 = Instant::now();
    while sample(&lab).len() < 2 {
        assert!(t0.elapsed() < Duration::from_secs(30), "the relay route never became live:\n{}", lab.log("alice"));
        std::thread::sleep(Duration::from_millis(200));
    }
    let bob_ns = lab.host("bob").ns.clone();
    let recv = lab.dir.path().join("recv");
    let recv_path = recv.display().to_string();
    let mut server = Command::new("ip").args(["netns", "exec", &bob_ns, "python3", FLOWS, "server", "9200", &recv_path]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("flow server");
    std::thread::sleep(Duration::from_millis(500));
    const SECONDS: u64 = 80;
    let client = Command::new("ip")
        .args(["netns", "exec", &lab.host("alice").ns, "python3", FLOWS, "client", "10.0.2.2", "9200", "64", "1000000", &SECONDS.to_string(), "3.5"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("flow client");
    let mut samples: Vec<Sample> = Vec::new();
    // (time, bytes bob received so far), once a second
    let mut received: Vec<(f64, u64)> = Vec::new();
    let mut group_seen = false;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(SECONDS - 2) {
        std::thread::sleep(Duration::from_secs(1));
        samples.push(sample(&lab));
        if let Some((t, n)) = std::fs::read_to_string(&recv).ok().and_then(|x| {
            let mut it = x.split_whitespace();
            Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
        }) {
            received.push((t, n));
        }
        if !group_seen {
            group_seen = lab.ok("alice", "ip nexthop show").contains("type resilient");
        }
    }
    let out = client.wait_with_output().expect("flow client output");
    let _ = server.kill();
    let _ = server.wait();
    assert!(out.status.success(), "flows: {}", String::from_utf8_lossy(&out.stderr));
    let log = lab.log("alice");
    let load: Value = serde_json::from_slice(&out.stdout).expect("flows JSON");
    let trace: Vec<String> = samples.iter().map(|s| format!("{s:?}")).collect();
    let trace = trace.join("\n");

    // The kernel split the direct share with a resilient nexthop group.
    assert!(group_seen, "no resilient nexthop group appeared\n{trace}");
    // Shares moved off the congested direct path, and traffic followed them.
    let tail = &samples[samples.len() - 40..];
    let relay = |s: &Sample, f: fn(&Route) -> f64| s.iter().filter(|r| r.0.starts_with("via ")).map(f).sum::<f64>();
    let relay_target = mean(tail.iter().map(|s| relay(s, |r| r.1)));
    let relay_realized = mean(tail.iter().map(|s| relay(s, |r| r.2)));
    assert!(relay_target > 0.15 && relay_target < 0.85, "relay target share {relay_target:.3} at the end\n{trace}");
    assert!(relay_realized > 0.1, "relay realized share {relay_realized:.3} at the end\n{trace}");
    // The measured costs came close: from a factor of more than 4 at some second of the
    // first five (an empty relay path against a filling direct queue) to within a factor
    // of 2 on the last 40-second means. The start is judged second by second: the kernel
    // group sends a few flows into the overlay from the first round (weight 2 of 256), and
    // one 1 MB upload that lands on the relay fills its 10 Mbit/s queue for a second, so
    // 5-second means of the start were close in some runs (spreads 1.5 and 2.5 against 9
    // and more than 30 in their first second). The costs are RTTs of nearly full queues
    // (28 Mbit/s offered to 30 Mbit/s of paths): they swing second by second, and how close
    // they get in 80 s varies (spreads of 0.39 and 0.51 in two runs of the same commit on a
    // 2-core box). The benchmark, longer, checks 20 % on 60-second means.
    let cost = |samples: &[Sample], path: &str| mean(samples.iter().flat_map(|s| s.iter().filter(|r| (r.0 == "direct") == (path == "direct")).filter_map(|r| r.3)));
    let spread_of = |samples: &[Sample]| {
        let (d, r) = (cost(samples, "direct"), cost(samples, "relay"));
        (d, r, d.max(r) / d.min(r) - 1.0)
    };
    let (cd, cr, spread) = spread_of(tail);
    let first = samples[..5].iter().map(|s| spread_of(std::slice::from_ref(s)).2).fold(0.0, f64::max);
    assert!(first > 4.0, "costs were close in each of the first five seconds (largest spread {first:.2}): the test's paths are not what it assumes\n{trace}");
    assert!(spread < 1.0, "costs {cd:.1} ms direct, {cr:.1} ms via the relay (spread {spread:.2}, {first:.1} at the start)\n{trace}");
    // More got through than the direct path alone can carry: bob's goodput over the last
    // 30 s.
    assert!(received.len() > 40, "bob's byte counts: {received:?}");
    let (a, b) = (received[received.len() - 31], received[received.len() - 1]);
    let steady = (b.1 - a.1) as f64 * 8.0 / (b.0 - a.0) / 1e6;
    eprintln!(
        "replex test: relay target {relay_target:.3}, realized {relay_realized:.3}, costs {cd:.1}/{cr:.1} ms (spread {spread:.2}, {first:.1} at the start), aggregate {steady:.1} Mbit/s, {load}"
    );
    assert!(steady > DIRECT_MBIT, "aggregate {steady:.1} Mbit/s over the last 30 s, the direct path alone carries at most {DIRECT_MBIT}\n{load}\n{trace}");
    assert!(load["flows"].as_u64().unwrap_or(0) > 100, "{load}");
    // Both paths carried connections, and no connection was spread over both.
    let counters: Vec<u64> = lab.ok("bob", "iptables -t mangle -L PREROUTING -v -n -x | awk '/dpt:9200/ {print $1}'").lines().filter_map(|l| l.trim().parse().ok()).collect();
    assert_eq!(counters.len(), 3, "bob's marking rules: {counters:?}");
    assert!(counters[0] > 0 && counters[1] > 0, "packets through the overlay / direct: {counters:?}");
    let events: Vec<&str> = log.lines().filter(|l| l.contains(" INFO ") || l.contains(" WARN ")).collect::<Vec<_>>();
    let events = events.join("\n");
    assert_eq!(counters[2], 0, "packets of connections that arrived over both paths: {counters:?}\n{events}\n{trace}");

    // The metrics show each route's target share, realized share and cost.
    let metrics = lab.ok("alice", "python3 -c 'import urllib.request; print(urllib.request.urlopen(\"http://127.0.0.1:9772/metrics\").read().decode())'");
    let value = |name: &str, path: &str| -> Option<f64> { metrics.lines().find(|l| l.starts_with(&format!("detour_{name}{{peer=\"bob\",path=\"{path}\"")))?.rsplit(' ').next()?.parse().ok() };
    for path in ["direct", "via carol"] {
        for name in ["route_target_share", "route_realized_share", "route_cost_seconds"] {
            assert!(value(name, path).is_some_and(|v| v >= 0.0), "no {name} for {path} in the metrics:\n{metrics}");
        }
    }
    let total = value("route_target_share", "direct").unwrap_or(0.0) + value("route_target_share", "via carol").unwrap_or(0.0);
    assert!((total - 1.0).abs() < 1e-6, "target shares sum to {total}\n{metrics}");

    // At exit: no nexthops, no accounting chain, the hash policy as it was.
    assert!(lab.stop("alice"), "alice did not exit cleanly");
    assert_eq!(lab.ok("alice", "ip nexthop show").trim(), "", "nexthops left behind");
    assert!(!lab.ok("alice", "iptables -t mangle -S").contains("DETOUR-ACCT"), "accounting chain left behind");
    assert_eq!(lab.ok("alice", "cat /proc/sys/net/ipv4/fib_multipath_hash_policy").trim(), "0");
}

#[test]
fn traffic_split_over_a_fast_path_and_a_slow_relay_is_not_taken_for_replays() {
    // All paths of a session share one counter space: with REPLEX sending some flows to bob
    // directly (fast) and some through carol over a link whose tbf queue holds up to
    // 300 ms, the relayed packets arrive (rate x delay) counters behind. The replay window
    // must take them (at ~400 Mbit/s and 300 ms, about 10,000 counters: a 4,096-counter
    // window dropped 94 in 8 s). Real replays are still dropped.
    let lab = lab_with(None, "50mbit", 300, "mode = \"equal\"\n");
    // Both routes live, each with its equal share of new flows.
    let t0 = Instant::now();
    while !sample(&lab).iter().any(|r| r.0.starts_with("via ") && r.1 > 0.3) {
        assert!(t0.elapsed() < Duration::from_secs(30), "the relay route never got its share: {:?}\n{}", sample(&lab), lab.log("alice"));
        std::thread::sleep(Duration::from_millis(200));
    }
    let replays = |lab: &Lab| Lab::peer(&lab.status("bob"), "alice")["drops"]["replay"].as_u64().unwrap_or(0);
    // Read once the kernel's forwarding is counted (carol adds it once a second).
    let relayed = |lab: &Lab| {
        std::thread::sleep(Duration::from_millis(1200));
        lab.status("carol")["relayed_bytes"].as_u64().unwrap_or(0)
    };
    let (r0, c0) = (replays(&lab), relayed(&lab));
    let bob = lab.host("bob").overlay_v4();
    let mut server = Command::new("ip").args(["netns", "exec", &lab.host("bob").ns, "iperf3", "-s", "-1", "-p", "5301"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("iperf3 server");
    std::thread::sleep(Duration::from_millis(500));
    // A real replay during the transfer: datagrams alice sends bob directly, captured on
    // the router and sent again, are still dropped.
    let alice_id = lab.status("alice")["node"]["node_id"].as_str().unwrap().to_string();
    let bob_id = lab.status("bob")["node"]["node_id"].as_str().unwrap().to_string();
    let sniffer = Command::new("ip")
        .args(["netns", "exec", &lab.router, "python3", BADPACKETS, "r2", &lab.host("bob").underlay_v4(), "7720", &alice_id, &bob_id, "4"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("sniffer");
    let out = lab.ok("alice", &format!("iperf3 -c {bob} -p 5301 -P 8 -t 8 -J"));
    let _ = server.wait();
    let injected: Value = serde_json::from_slice(&sniffer.wait_with_output().expect("sniffer output").stdout).expect("sniffer JSON");
    assert_eq!(injected["replay"], 4, "{injected}");
    let v: Value = serde_json::from_str(&out).expect("iperf3 JSON");
    let mbit = v["end"]["sum_received"]["bits_per_second"].as_f64().unwrap_or(0.0) / 1e6;
    let (r1, c1) = (replays(&lab), relayed(&lab));
    let retrans = v["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
    eprintln!("split transfer: {mbit:.0} Mbit/s in all, {} bytes through carol, {} replay drops (4 replayed on purpose), {retrans} retransmissions", c1 - c0, r1 - r0);
    if c1 - c0 < 5_000_000 {
        eprintln!("alice: {}\nbob: {}", Lab::peer(&lab.status("alice"), "bob"), Lab::peer(&lab.status("bob"), "alice"));
    }
    assert!(c1 - c0 > 5_000_000, "the relay carried little of the traffic ({} bytes): no split to test", c1 - c0);
    assert_eq!(r1 - r0, 4, "replay drops: the 4 replayed datagrams, and no legitimate packet of the slower path ({mbit:.0} Mbit/s)");
}
