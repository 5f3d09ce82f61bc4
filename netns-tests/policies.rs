//! Relay policies, exits and networks behind routers (issue 6): real daemons, real TCP,
//! an HTTP server on a host that does not run detour, failures made in the router with
//! netfilter drops.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::lab::Lab;

const UP: Duration = Duration::from_secs(15);
const TCPCHECK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/netns-tests/helpers/tcpcheck.py");

fn router(lab: &Lab, script: &str) {
    let o = lab.sh(&lab.router, script);
    assert!(o.ok, "router: `{script}`: {}", o.stderr);
}

/// Drops everything between `a` and `b` in the router, both ways.
fn cut(lab: &Lab, a: &str, b: &str) {
    let (ua, ub) = (lab.host(a).underlay_v4(), lab.host(b).underlay_v4());
    cut_nets(lab, &ua, &ub);
}

fn cut_nets(lab: &Lab, a: &str, b: &str) {
    router(lab, &format!("iptables -I FORWARD -s {a} -d {b} -j DROP; iptables -I FORWARD -s {b} -d {a} -j DROP"));
}

fn heal(lab: &Lab) {
    router(lab, "iptables -F FORWARD");
}

fn spawn(_lab: &Lab, ns: &str, args: &[&str]) -> Child {
    Command::new("ip").args(["netns", "exec", ns]).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawning a helper")
}

fn finish(child: Child) -> (bool, String) {
    let out = child.wait_with_output().expect("helper output");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn path(lab: &Lab, name: &str, peer: &str) -> String {
    Lab::peer(&lab.status(name), peer)["path"].as_str().unwrap_or("").to_string()
}

/// Bytes `name` relayed, read once what it forwarded so far is counted: a relay that
/// forwards in the kernel adds its rules' counters to the status once a second.
fn relayed_bytes(lab: &Lab, name: &str) -> u64 {
    std::thread::sleep(Duration::from_millis(1200));
    lab.status(name)["relayed_bytes"].as_u64().unwrap_or(0)
}

/// Every host peers with every other; `extra(name)` goes into the node's config.
fn mesh_with(names: &[&str], extra: impl Fn(&str) -> String) -> Lab {
    let mut lab = Lab::new(names);
    for n in names {
        let mut text = lab.node_section(n, "");
        text += &extra(n);
        for p in names.iter().filter(|p| *p != n) {
            text += &lab.peer_section(p, None, "");
        }
        lab.write_config(n, &text);
    }
    lab.start_all();
    for n in names {
        let others: Vec<&str> = names.iter().copied().filter(|x| x != n).collect();
        lab.wait_up(n, &others, UP);
    }
    lab
}

fn policy(commitment: &str, priority: u8, lifespan: &str) -> String {
    format!("\n[policy]\ncommitment = \"{commitment}\"\npriority = {priority}\nlifespan = \"{lifespan}\"\n")
}

/// A 4 MB TCP transfer from `from` to `to`'s underlay address, checked end to end.
fn transfer(lab: &Lab, from: &str, to: &str) {
    transfer_bytes(lab, from, to, 4_000_000);
}

fn transfer_bytes(lab: &Lab, from: &str, to: &str, bytes: u64) {
    let dst = lab.host(to).underlay_v4();
    let mut srv = spawn(lab, &lab.host(to).ns, &["python3", TCPCHECK, "server", "9100"]);
    std::thread::sleep(Duration::from_millis(300));
    let out = lab.sh(&lab.host(from).ns, &format!("python3 {TCPCHECK} client {dst} 9100 {bytes}"));
    let _ = srv.kill();
    let _ = srv.wait();
    assert!(out.ok && out.stdout.starts_with("ok"), "TCP {from} -> {to}: {}{}", out.stdout, out.stderr);
}

#[test]
fn a_failure_only_relay_carries_nothing_while_the_path_works_and_a_node_that_never_relays_never_does() {
    // REPLEX in "equal" mode spreads alice's traffic to bob evenly over every path it may
    // use for performance: the always-relay takes its share, the failure-only relay none.
    let lab = mesh_with(&["alice", "bob", "alw", "fail", "never"], |n| match n {
        "alice" => "\n[replex]\nenabled = true\nmode = \"equal\"\n\n[failover]\nrelay_candidates = 3\n".into(),
        "alw" => policy("always", 100, "stable"),
        "fail" => policy("failure", 200, "stable"),
        "never" => policy("never", 255, "stable"),
        _ => String::new(),
    });
    // The relays are ready, and the split is in place.
    wait_until("alice's relay paths through alw and fail", Duration::from_secs(20), || {
        let s = lab.status("alice");
        let relays = Lab::peer(&s, "bob")["relays"].as_array().cloned().unwrap_or_default();
        let active = |n: &str| relays.iter().any(|r| r["name"] == n && r["state"] == "active");
        active("alw") && active("fail")
    });
    std::thread::sleep(Duration::from_secs(5));
    let (alw0, fail0) = (relayed_bytes(&lab, "alw"), relayed_bytes(&lab, "fail"));
    // Twelve connections (each hashed to a path on its own), 1 MB each.
    for _ in 0..12 {
        transfer_bytes(&lab, "alice", "bob", 1_000_000);
    }
    let (alw1, fail1) = (relayed_bytes(&lab, "alw"), relayed_bytes(&lab, "fail"));
    println!("healthy path, 12 x 1 MB: always-relay {} bytes, failure-only relay {} bytes (probes only)", alw1 - alw0, fail1 - fail0);
    assert!(alw1 - alw0 > 1_000_000, "REPLEX should spread load over the always-relay: {} bytes", alw1 - alw0);
    assert!(fail1 - fail0 < 200_000, "the failure-only relay carried traffic while the path worked: {} bytes", fail1 - fail0);
    // Status says why.
    let s = lab.status("alice");
    let relays = Lab::peer(&s, "bob")["relays"].as_array().cloned().unwrap();
    let row = |n: &str| relays.iter().find(|r| r["name"] == n).cloned().unwrap_or_else(|| panic!("no relay row {n}: {relays:?}"));
    assert_eq!(row("fail")["performance"], "failure_only");
    assert!(row("fail")["failover"].is_null());
    assert_eq!(row("never")["failover"], "no_relay");
    assert_eq!(row("never")["state"], "not asked");
    // The direct path and the always-relay fail: the failure-only relay takes over.
    cut(&lab, "alice", "bob");
    cut(&lab, "alice", "alw");
    wait_until("alice -> bob via fail", Duration::from_secs(15), || path(&lab, "alice", "bob") == "via fail");
    transfer(&lab, "alice", "bob");
    let fail2 = relayed_bytes(&lab, "fail");
    assert!(fail2 - fail1 > 4_000_000, "the failure-only relay did not carry the traffic after the failure: {}", fail2 - fail1);
    // The node that never relays was never asked and never relayed.
    let n = lab.status("never");
    assert_eq!(n["relayed_packets"], 0, "{n}");
    assert!(n["relaying"].as_array().unwrap().is_empty(), "{n}");
}

#[test]
fn relays_are_chosen_by_priority_then_lifespan_and_a_last_resort_only_when_nothing_else_works() {
    let lab = mesh_with(&["alice", "bob", "hi", "lo", "eph", "lr"], |n| match n {
        "hi" => policy("always", 200, "ephemeral"),
        "lo" => policy("always", 50, "stable"),
        "eph" => policy("always", 50, "ephemeral"),
        "lr" => policy("last_resort", 255, "stable"),
        _ => String::new(),
    });
    std::thread::sleep(Duration::from_secs(3));
    cut(&lab, "alice", "bob");
    // Priority first (hi is ephemeral, but 200 beats 50).
    wait_until("alice -> bob via hi", Duration::from_secs(15), || path(&lab, "alice", "bob") == "via hi");
    transfer(&lab, "alice", "bob");
    // Equal priority: the stable relay before the ephemeral one.
    cut(&lab, "alice", "hi");
    wait_until("alice -> bob via lo", Duration::from_secs(20), || path(&lab, "alice", "bob") == "via lo");
    let s = lab.status("alice");
    let rows = Lab::peer(&s, "bob")["relays"].as_array().cloned().unwrap();
    let order: Vec<&str> = rows.iter().filter_map(|r| r["name"].as_str()).collect();
    assert_eq!(order[..4], ["hi", "lo", "eph", "lr"], "status lists relays in policy order: {rows:?}");
    assert_eq!(relayed_bytes(&lab, "lr"), 0, "the last resort relayed while others worked");
    // Then the ephemeral one; the last resort still waits.
    cut(&lab, "alice", "lo");
    wait_until("alice -> bob via eph", Duration::from_secs(20), || path(&lab, "alice", "bob") == "via eph");
    transfer(&lab, "alice", "bob");
    assert_eq!(relayed_bytes(&lab, "lr"), 0, "the last resort relayed while others worked");
    // Nothing else works: the last resort.
    cut(&lab, "alice", "eph");
    wait_until("alice -> bob via lr", Duration::from_secs(20), || path(&lab, "alice", "bob") == "via lr");
    transfer(&lab, "alice", "bob");
    let lr_bytes = relayed_bytes(&lab, "lr");
    assert!(lr_bytes > 4_000_000, "lr relayed {lr_bytes} bytes; lr: {}", lab.status("lr"));
    // Another relay works again: traffic leaves the last resort.
    heal(&lab);
    cut(&lab, "alice", "bob");
    wait_until("alice -> bob off the last resort", Duration::from_secs(30), || path(&lab, "alice", "bob") == "via hi");
}

/// `ns` runs `python3 -m http.server` on `port`; returns the child.
fn http_server(lab: &Lab, ns: &str, port: u16) -> Child {
    let c = spawn(lab, ns, &["python3", "-m", "http.server", &port.to_string(), "--bind", "0.0.0.0", "--directory", "/"]);
    std::thread::sleep(Duration::from_millis(500));
    c
}

fn iptables_has(lab: &Lab, name: &str, table: &str, chain: &str) -> bool {
    lab.sh(&lab.host(name).ns, &format!("iptables -t {table} -S {chain}")).ok
}

fn counter(lab: &Lab, name: &str, table: &str, chain: &str, needle: &str) -> u64 {
    let out = lab.ok(name, &format!("iptables -t {table} -L {chain} -v -x -n"));
    out.lines().filter(|l| l.contains(needle)).filter_map(|l| l.split_whitespace().next().and_then(|n| n.parse::<u64>().ok())).sum()
}

/// alice, with `x` (a plain host that runs no detour) watched, and `exit`, which offers
/// exit and masquerades; both sessions up. Returns the lab and x's underlay address.
fn exit_lab() -> (Lab, String) {
    let names = ["alice", "exit", "x"];
    let mut lab = Lab::new(&names);
    let x = lab.host("x").underlay_v4();
    let alice_cfg = lab.node_section("alice", "") + &format!("\n[exit]\nwatch = [\"{x}/32\"]\nhold_s = 120\n") + &lab.peer_section("exit", None, "");
    let exit_cfg = lab.node_section("exit", "") + "\n[policy]\nconnectivity = \"host\"\ninternet_masquerade = true\n" + &lab.peer_section("alice", None, "");
    lab.write_config("alice", &alice_cfg);
    lab.write_config("exit", &exit_cfg);
    lab.ok("exit", "sysctl -qw net.ipv4.ip_forward=1");
    lab.start("alice");
    lab.start("exit");
    lab.wait_up("alice", &["exit"], UP);
    lab.wait_up("exit", &["alice"], UP);
    (lab, x)
}

#[test]
fn an_exit_masquerades_new_connections_to_an_outside_host_never_established_ones_and_nothing_unsolicited() {
    // x runs no detour: a plain host with an HTTP server.
    let (mut lab, x) = exit_lab();
    let x_ns = lab.host("x").ns.clone();
    let mut http = http_server(&lab, &x_ns, 8080);
    let mut sink = spawn(&lab, &x_ns, &["python3", TCPCHECK, "server", "9100"]);
    std::thread::sleep(Duration::from_millis(300));
    // Works directly first.
    lab.ok("alice", &format!("curl -sf -m 5 -o /dev/null http://{x}:8080/"));
    // An established connection: 6 MB over 14 s. It must never be moved to the exit.
    let established = spawn(&lab, &lab.host("alice").ns, &["python3", TCPCHECK, "client", &x, "9100", "6000000", "", "14"]);
    lab.ok("exit", "iptables -t mangle -I PREROUTING -p tcp --dport 9100 -m comment --comment established-probe");
    std::thread::sleep(Duration::from_secs(2));
    cut(&lab, "alice", "x");
    // A new connection finds its way through the exit (the SYN times out once, or an ICMP
    // unreachable says so; then it goes through the exit, which masquerades it).
    let t0 = Instant::now();
    let body = lab.ok("alice", &format!("curl -sf -m 20 http://{x}:8080/etc/hostname || curl -sf -m 20 http://{x}:8080/etc/hostname"));
    println!("curl through the exit after {:.1} s: {} bytes", t0.elapsed().as_secs_f64(), body.len());
    let s = lab.status("alice");
    let exits = s["node"]["exits"].as_array().cloned().unwrap_or_default();
    assert!(exits.iter().any(|e| e.as_str().is_some_and(|e| e.contains(&x) && e.contains("via exit") && e.contains("new connections only"))), "{exits:?}");
    assert!(counter(&lab, "exit", "nat", "DETOUR-NAT", "MASQUERADE") > 0, "the exit did not masquerade");
    // The established connection stayed off the exit: it stalls, and finishes once the path
    // is back, with its own address.
    assert_eq!(counter(&lab, "exit", "mangle", "PREROUTING", "established-probe"), 0, "packets of the established connection reached the exit");
    heal(&lab);
    let (ok, text) = finish(established);
    assert!(ok && text.starts_with("ok"), "the established connection did not survive: {text}");
    assert_eq!(counter(&lab, "exit", "mangle", "PREROUTING", "established-probe"), 0);
    // Unsolicited: x sends to alice's overlay address through the exit; nothing arrives.
    let exit_u = lab.host("exit").underlay_v4();
    let alice_o = lab.host("alice").overlay_v4();
    router(&lab, &format!("ip route replace {alice_o}/32 via {exit_u}"));
    let drops0 = counter(&lab, "exit", "filter", "DETOUR-FWD", "DROP");
    let rx0 = Lab::peer(&lab.status("alice"), "exit")["rx_packets"].as_u64().unwrap();
    let o = lab.sh(&x_ns, &format!("ping -c 3 -i 0.2 -W 1 {alice_o}"));
    assert!(!o.ok, "x reached alice's overlay address through the exit");
    assert!(counter(&lab, "exit", "filter", "DETOUR-FWD", "DROP") > drops0, "the exit did not drop the unsolicited packets");
    let rx1 = Lab::peer(&lab.status("alice"), "exit")["rx_packets"].as_u64().unwrap();
    assert!(rx1 - rx0 < 3, "unsolicited packets reached alice through the overlay: {}", rx1 - rx0);
    // Stopping detourd on the exit removes its NAT and the other rules.
    assert!(iptables_has(&lab, "exit", "nat", "DETOUR-NAT"));
    assert!(lab.stop("exit"), "detourd on exit did not exit cleanly");
    for (table, chain) in [("nat", "DETOUR-NAT"), ("mangle", "DETOUR-EGRESS"), ("filter", "DETOUR-FWD")] {
        assert!(!iptables_has(&lab, "exit", table, chain), "{table} {chain} left behind");
    }
    let nat = lab.ok("exit", "iptables -t nat -S POSTROUTING");
    assert!(!nat.contains("DETOUR"), "{nat}");
    assert!(lab.stop("alice"));
    assert!(!iptables_has(&lab, "alice", "mangle", "DETOUR-CLASS"));
    let rules = lab.ok("alice", "ip rule");
    assert!(!rules.contains("0x400000"), "{rules}");
    // The outside host saw alice before the cut, and the exit (masquerading) after.
    let _ = http.kill();
    let _ = sink.kill();
    let _ = sink.wait();
    let (_, log) = finish(http);
    let requests: Vec<&str> = log.lines().filter(|l| l.contains("GET /")).collect();
    assert!(requests.first().is_some_and(|l| l.starts_with(&lab.host("alice").underlay_v4())), "{requests:?}");
    let exit_addr = lab.host("exit").underlay_v4();
    assert!(requests.iter().any(|l| l.starts_with(&exit_addr) && l.contains("/etc/hostname")), "x never saw the exit's address: {requests:?}");
}

#[test]
fn a_new_connection_through_an_exit_after_an_icmp_cut_does_not_wait_for_a_syn_retransmission() {
    let (lab, x) = exit_lab();
    let x_ns = lab.host("x").ns.clone();
    let mut http = http_server(&lab, &x_ns, 8080);
    std::thread::sleep(Duration::from_millis(300));
    lab.ok("alice", &format!("curl -sf -m 5 -o /dev/null http://{x}:8080/"));
    let why = |lab: &Lab| -> serde_json::Value {
        let h = lab.host("alice");
        serde_json::from_str(&lab.ok("alice", &format!("{} why --json -s {} {x}", crate::lab::bin("detourctl"), h.socket.display()))).expect("why JSON")
    };
    let w = why(&lab);
    assert!(w["kind"].as_str().unwrap().starts_with("outside destination watched by [exit]"), "{w}");
    assert_eq!(w["through_overlay"], false, "{w}");
    // The router answers alice's TCP to x with host unreachable (ICMP), as a router that
    // lost its route does. The SYN is lost; the error quotes it.
    let a = lab.host("alice").underlay_v4();
    router(&lab, &format!("iptables -I FORWARD -s {a} -d {x} -p tcp -j REJECT --reject-with icmp-host-unreachable"));
    let connect = format!("python3 -c 'import socket,time; t=time.monotonic(); s=socket.create_connection((\"{x}\", 8080), timeout=10); ms=round((time.monotonic()-t)*1000); s.sendall(b\"GET /etc/hostname HTTP/1.0\\r\\n\\r\\n\"); s.recv(100); print(ms)'");
    let ms: u64 = lab.ok("alice", &connect).trim().parse().unwrap();
    println!("connect to {x} through the exit after the ICMP error: {ms} ms");
    let st = lab.status("alice");
    assert!(st["icmp"]["rerouted"].as_u64().unwrap() >= 1, "{}", st["icmp"]);
    // The SYN's retransmission timer is 1 s: the connection came up well before it.
    assert!(ms < 700, "the connection waited for a SYN retransmission: {ms} ms");
    // detourctl why names the exit, and that only new connections take it
    let w = why(&lab);
    assert_eq!(w["kind"], "outside destination through exit node exit (masquerading: new connections only)", "{w}");
    assert_eq!((&w["through_overlay"], &w["peer"]["name"], &w["kernel_matches"]), (&serde_json::json!(true), &serde_json::json!("exit"), &serde_json::json!(true)), "{w}");
    // and it went through the exit
    let _ = http.kill();
    let (_, log) = finish(http);
    let exit_addr = lab.host("exit").underlay_v4();
    assert!(log.lines().any(|l| l.starts_with(&exit_addr) && l.contains("/etc/hostname")), "x never saw the exit's address:\n{log}");
}

#[test]
fn hosts_behind_two_routers_keep_their_connection_and_addresses_while_the_routers_path_is_cut() {
    let names = ["h", "i", "relay"];
    let mut lab = Lab::new(&names);
    // h1 behind h (172.16.1.0/24), i1 behind i (172.16.2.0/24).
    let (hn, inn, r) = (lab.host("h").ns.clone(), lab.host("i").ns.clone(), lab.router.clone());
    let (hu, iu) = (lab.host("h").underlay_v4(), lab.host("i").underlay_v4());
    let (h1, i1) = (format!("{}-h1", lab.prefix), format!("{}-i1", lab.prefix));
    let script = format!(
        "set -e
ip netns add {h1}; ip netns add {i1}
ip -n {h1} link set lo up; ip -n {i1} link set lo up
ip link add b0 netns {hn} type veth peer name eth0 netns {h1}
ip link add b0 netns {inn} type veth peer name eth0 netns {i1}
ip -n {hn} addr add 172.16.1.1/24 dev b0; ip -n {hn} link set b0 up
ip -n {inn} addr add 172.16.2.1/24 dev b0; ip -n {inn} link set b0 up
ip -n {h1} addr add 172.16.1.2/24 dev eth0; ip -n {h1} link set eth0 up; ip -n {h1} route add default via 172.16.1.1
ip -n {i1} addr add 172.16.2.2/24 dev eth0; ip -n {i1} link set eth0 up; ip -n {i1} route add default via 172.16.2.1
ip netns exec {hn} sysctl -qw net.ipv4.ip_forward=1
ip netns exec {inn} sysctl -qw net.ipv4.ip_forward=1
ip -n {r} route add 172.16.1.0/24 via {hu}
ip -n {r} route add 172.16.2.0/24 via {iu}
"
    );
    let o = crate::lab::host_sh(&script);
    assert!(o.ok, "{}", o.stderr);
    let cleanup = format!("ip netns del {h1}; ip netns del {i1}");
    let router_policy = |net: &str| format!("networks = [\"{net}\"]\n\n[policy]\nconnectivity = \"subnet_router\"\n");
    for (n, extra) in [("h", router_policy("172.16.1.0/24")), ("i", router_policy("172.16.2.0/24")), ("relay", String::new())] {
        let mut text = lab.node_section(n, "");
        // `networks` belongs to [node]: put it before the [policy] section.
        if let Some((net, pol)) = extra.split_once("\n\n") {
            text = text + net + "\n" + pol;
        }
        for p in names.iter().filter(|p| **p != n) {
            text += &lab.peer_section(p, None, "");
        }
        lab.write_config(n, &text);
    }
    lab.start_all();
    for n in names {
        let others: Vec<&str> = names.iter().copied().filter(|x| *x != n).collect();
        lab.wait_up(n, &others, UP);
    }
    let o = lab.sh(&h1, "ping -c 2 -i 0.2 -W 2 172.16.2.2");
    assert!(o.ok, "h1 cannot reach i1 directly: {}", o.stderr);
    // An ICMP host unreachable about i's network on its way to h1 is caught at h (which
    // forwards it): h1's new connection goes through the overlay instead of failing.
    // (h has learned i's network from i's record by now.)
    std::thread::sleep(Duration::from_secs(3));
    let reject = "FORWARD -s 172.16.1.0/24 -d 172.16.2.0/24 -p tcp --dport 9101 -j REJECT --reject-with icmp-host-unreachable";
    router(&lab, &format!("iptables -I {reject}"));
    let mut srv = spawn(&lab, &i1, &["python3", TCPCHECK, "server", "9101"]);
    std::thread::sleep(Duration::from_millis(300));
    let o = lab.sh(&h1, &format!("python3 {TCPCHECK} client 172.16.2.2 9101 100000"));
    let _ = srv.kill();
    let _ = srv.wait();
    assert!(o.ok && o.stdout.starts_with("ok"), "h1's connect did not survive the ICMP unreachable: {}{}", o.stdout, o.stderr);
    assert!(lab.status("h")["icmp"]["rerouted"].as_u64().unwrap_or(0) >= 1, "h did not catch the forwarded ICMP error");
    router(&lab, &format!("iptables -D {reject}"));
    std::thread::sleep(Duration::from_secs(4));
    let mut srv = spawn(&lab, &i1, &["python3", TCPCHECK, "server", "9100"]);
    std::thread::sleep(Duration::from_millis(300));
    let client = spawn(&lab, &h1, &["python3", TCPCHECK, "client", "172.16.2.2", "9100", "8000000", "", "10"]);
    std::thread::sleep(Duration::from_secs(3));
    // Cut everything between h's side and i's side.
    for a in [hu.as_str(), "172.16.1.0/24"] {
        for b in [iu.as_str(), "172.16.2.0/24"] {
            cut_nets(&lab, a, b);
        }
    }
    std::thread::sleep(Duration::from_secs(3));
    // i1 sees h1's own address on the connection, now carried by the overlay.
    let seen = lab.sh(&i1, "ss -Htn state established '( sport = :9100 )'").stdout;
    assert!(seen.contains("172.16.1.2"), "i1 sees: {seen}");
    let st = Lab::peer(&lab.status("h"), "i").clone();
    assert_eq!(st["protected"], true, "{st}");
    assert_eq!(st["path"], "via relay", "{st}");
    let (ok, text) = finish(client);
    let _ = srv.kill();
    let _ = srv.wait();
    assert!(ok && text.starts_with("ok"), "h1 -> i1 did not survive the cut: {text}");
    assert!(relayed_bytes(&lab, "relay") > 2_000_000, "the relay did not carry it");
    // The route for i's network went through the overlay.
    let rt = lab.ok("h", "ip route get 172.16.2.2 from 172.16.1.2 iif b0");
    assert!(rt.contains("detour0"), "{rt}");
    drop(lab);
    let _ = crate::lab::host_sh(&cleanup);
}
