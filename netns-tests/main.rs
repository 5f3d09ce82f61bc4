//! End-to-end tests with real kernels, TUNs, ping, TCP and iperf3, each in network
//! namespaces it creates and removes. Run as root (scripts/test.sh does).

mod failover;
mod lab;
mod management;
mod policies;
mod replex;
mod scale;
mod seeds;
mod service;

use std::time::{Duration, Instant};

use lab::{bin, host_sh, Lab};

const UP: Duration = Duration::from_secs(15);

fn ping(lab: &Lab, from: &str, to: &str) {
    lab.ok(from, &format!("ping -c 3 -i 0.1 -W 2 {to}"));
}

const TCPCHECK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/netns-tests/helpers/tcpcheck.py");

/// A 4 MB TCP transfer from `from` to `to` (served on host `server`), checked end to end
/// by byte count and SHA-256.
fn tcp(lab: &Lab, from: &str, server: &str, to: &str) {
    tcp_bound(lab, from, server, to, None);
}

fn tcp_bound(lab: &Lab, from: &str, server: &str, to: &str, bind: Option<&str>) {
    let ns = lab.host(server).ns.clone();
    let mut srv = std::process::Command::new("ip").args(["netns", "exec", &ns, "python3", TCPCHECK, "server", "9100"]).spawn().expect("tcp server");
    std::thread::sleep(Duration::from_millis(300));
    let out = lab.sh(&lab.host(from).ns, &format!("python3 {TCPCHECK} client {to} 9100 4000000 {}", bind.unwrap_or("")));
    let _ = srv.kill();
    let _ = srv.wait();
    assert!(out.ok && out.stdout.starts_with("ok"), "TCP {from} -> {to}: {}{}", out.stdout, out.stderr);
}

#[test]
fn peers_authenticate_and_carry_tcp_and_ping_over_per_peer_and_aggregate_interfaces() {
    let mut lab = Lab::new(&["alice", "bob", "carol"]);
    lab.write_mesh();
    // alice and carol reach each other over the IPv6 underlay
    let carol_v6 = format!("[{}]:7720", lab.host("carol").underlay_v6());
    let alice_v6 = format!("[{}]:7720", lab.host("alice").underlay_v6());
    let mut a = lab.node_section("alice", "");
    a += &lab.peer_section("bob", None, "");
    a += &lab.peer_section("carol", Some(&carol_v6), "");
    lab.write_config("alice", &a);
    let mut c = lab.node_section("carol", "");
    c += &lab.peer_section("alice", Some(&alice_v6), "");
    c += &lab.peer_section("bob", None, "");
    lab.write_config("carol", &c);
    lab.start_all();
    lab.wait_up("alice", &["bob", "carol"], UP);
    lab.wait_up("bob", &["alice", "carol"], UP);
    lab.wait_up("carol", &["alice", "bob"], UP);

    let st = lab.status("alice");
    assert_eq!(Lab::peer(&st, "carol")["endpoint"], format!("[{}]:7720", lab.host("carol").underlay_v6()));
    assert!(Lab::peer(&st, "bob")["rtt_ms"].as_f64().is_some());

    // per-peer interfaces: the peers' own overlay addresses
    let (bob4, bob6) = (lab.host("bob").overlay_v4(), lab.host("bob").overlay_v6());
    let (carol4, carol6) = (lab.host("carol").overlay_v4(), lab.host("carol").overlay_v6());
    let before = lab.tx_packets("alice", "dt-bob");
    ping(&lab, "alice", &bob4);
    ping(&lab, "alice", &bob6);
    ping(&lab, "alice", &carol4);
    ping(&lab, "alice", &carol6);
    tcp(&lab, "alice", "bob", &bob4);
    tcp(&lab, "alice", "carol", &carol6);
    assert!(lab.tx_packets("alice", "dt-bob") > before + 6, "per-peer traffic did not use dt-bob");

    // aggregate interface: the networks behind the peers
    let agg = lab.tx_packets("alice", "detour0");
    let (lan_b4, lan_c6) = (lab.host("bob").lan_v4(), lab.host("carol").lan_v6());
    ping(&lab, "alice", &lan_b4);
    ping(&lab, "alice", &lan_c6);
    ping(&lab, "alice", &lab.host("carol").lan_v4());
    ping(&lab, "alice", &lab.host("bob").lan_v6());
    tcp(&lab, "alice", "bob", &lan_b4);
    tcp(&lab, "alice", "carol", &lan_c6);
    assert!(lab.tx_packets("alice", "detour0") > agg + 12, "aggregate traffic did not use detour0");
    let route = lab.ok("alice", &format!("ip route get {lan_b4}"));
    assert!(route.contains("dev detour0"), "{route}");

    // traffic shows up in status
    let st = lab.status("alice");
    let bob = Lab::peer(&st, "bob");
    assert!(bob["tx_bytes"].as_u64().unwrap() > 4_000_000);
    assert!(bob["rx_packets"].as_u64().unwrap() > 0);
    assert_eq!(bob["path"], "direct");

    // an overlay address no node owns gets "no route" back at once instead of a timeout
    let o = lab.sh(&lab.host("alice").ns, "ping -c 1 -W 2 10.77.0.99");
    assert!(o.stdout.contains("Destination Net Unreachable"), "{}", o.stdout);
}

#[test]
fn a_peer_with_an_unknown_key_is_refused() {
    let mut lab = Lab::new(&["alice", "bob", "mallory"]);
    let mut a = lab.node_section("alice", "");
    a += &lab.peer_section("bob", None, "");
    lab.write_config("alice", &a);
    let mut b = lab.node_section("bob", "");
    b += &lab.peer_section("alice", None, "");
    lab.write_config("bob", &b);
    // mallory claims to be a peer of alice; alice never pinned mallory's key
    let mut m = lab.node_section("mallory", "");
    m += &lab.peer_section("alice", None, "");
    lab.write_config("mallory", &m);
    lab.start_all();
    lab.wait_up("alice", &["bob"], UP);
    std::thread::sleep(Duration::from_secs(2));

    let st = lab.status("alice");
    assert!(st["refused_handshakes"].as_u64().unwrap() >= 1, "{st}");
    assert!(st["management_errors"].as_u64().unwrap() >= 1, "{st}");
    let key = lab.pubkey("mallory");
    assert!(st["last_refused_key"].as_str().unwrap().contains(&key), "{st}");
    assert!(lab.log("alice").contains(&key), "alice's log does not name the key mallory presented");
    let ms = lab.status("mallory");
    assert_ne!(Lab::peer(&ms, "alice")["state"], "up");
    assert!(Lab::peer(&ms, "alice")["endpoint"].is_null());
    // nothing mallory sends gets through
    let o = lab.sh(&lab.host("mallory").ns, "ping -c 2 -W 1 10.77.0.1");
    assert!(!o.ok);
    ping(&lab, "alice", &lab.host("bob").overlay_v4());
}

#[test]
fn binding_to_a_per_peer_link_address_uses_that_link() {
    let mut lab = Lab::new(&["alice", "bob", "carol"]);
    lab.write_mesh();
    lab.start_all();
    lab.wait_up("alice", &["bob", "carol"], UP);
    lab.wait_up("bob", &["alice"], UP);
    let st = lab.status("alice");
    let bob = Lab::peer(&st, "bob");
    let links: Vec<String> = bob["link_addresses"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    let link4 = links.iter().find(|a| !a.contains(':')).expect("an IPv4 link address").clone();
    let bs = lab.status("bob");
    let bob_links: Vec<String> = Lab::peer(&bs, "alice")["link_addresses"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    let bob_link4 = bob_links.iter().find(|a| !a.contains(':')).unwrap().clone();
    let bob_ll6 = bob_links.iter().find(|a| a.contains(':')).unwrap().split('%').next().unwrap().to_string();

    // ping bound to the link address, to the peer's end of the link
    let before = lab.tx_packets("alice", "dt-bob");
    lab.ok("alice", &format!("ping -c 3 -i 0.1 -W 2 -I {link4} {bob_link4}"));
    lab.ok("alice", &format!("ping -c 3 -i 0.1 -W 2 {bob_ll6}%dt-bob"));
    assert!(lab.tx_packets("alice", "dt-bob") >= before + 6);

    // a TCP client bound to the link address reaches bob through dt-bob, and bob sees the
    // link address as the source
    let server = r#"
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 9000)); s.listen(1)
c, addr = s.accept(); c.sendall(addr[0].encode()); c.close()
"#;
    let bob_ns = lab.host("bob").ns.clone();
    let srv = std::process::Command::new("ip").args(["netns", "exec", &bob_ns, "python3", "-c", server]).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let agg_before = lab.tx_packets("alice", "detour0");
    let peer_before = lab.tx_packets("alice", "dt-bob");
    let seen =
        lab.ok("alice", &format!("python3 -c 'import socket; s=socket.socket(); s.bind((\"{link4}\", 0)); s.connect((\"{}\", 9000)); print(s.recv(100).decode())'", lab.host("bob").overlay_v4()));
    let mut srv = srv;
    let _ = srv.wait();
    assert_eq!(seen.trim(), link4, "bob saw the connection from {seen}");
    assert!(lab.tx_packets("alice", "dt-bob") > peer_before);
    assert_eq!(lab.tx_packets("alice", "detour0"), agg_before, "the bound connection leaked onto the aggregate");
}

fn node_drop(st: &serde_json::Value, reason: &str) -> u64 {
    st["drops"][reason].as_u64().unwrap_or(0)
}

#[test]
fn corrupted_replayed_and_forged_packets_are_dropped_and_counted() {
    let mut lab = Lab::new(&["alice", "bob"]);
    lab.write_mesh();
    lab.start_all();
    lab.wait_up("alice", &["bob"], UP);
    lab.wait_up("bob", &["alice"], UP);
    let alice_id = lab.status("alice")["node"]["node_id"].as_str().unwrap().to_string();
    let bob_id = lab.status("bob")["node"]["node_id"].as_str().unwrap().to_string();
    let helper = concat!(env!("CARGO_MANIFEST_DIR"), "/netns-tests/helpers/badpackets.py");
    // sniff alice -> bob on the router's link to bob while alice pings bob
    let router = lab.router.clone();
    let sniffer = std::process::Command::new("ip")
        .args(["netns", "exec", &router, "python3", helper, "r2", &lab.host("bob").underlay_v4(), "7720", &alice_id, &bob_id, "4"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    lab.ok("alice", &format!("ping -c 8 -i 0.1 {}", lab.host("bob").overlay_v4()));
    let out = sniffer.wait_with_output().unwrap();
    let sent: serde_json::Value = serde_json::from_slice(&out.stdout).expect("helper output");
    assert_eq!(sent["captured"], 4, "{sent}");

    let st = lab.status("bob");
    let drops = &Lab::peer(&st, "alice")["drops"];
    assert!(drops["replay"].as_u64().unwrap_or(0) >= 4, "{st}");
    assert!(drops["auth_failed"].as_u64().unwrap_or(0) >= 4, "{st}");
    assert!(drops["no_session"].as_u64().unwrap_or(0) >= 1, "{st}");
    assert!(node_drop(&st, "unknown_peer") >= 1, "{st}");
    assert!(node_drop(&st, "bad_version") >= 1, "{st}");
    assert!(node_drop(&st, "malformed") >= 1, "{st}");
    // empty datagrams on the data port are counted too
    let malformed = node_drop(&st, "malformed");
    lab.ok("alice", &format!("python3 -c 'import socket; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); [s.sendto(b\"\",(\"{}\",7720)) for _ in range(3)]'", lab.host("bob").underlay_v4()));
    std::thread::sleep(Duration::from_millis(300));
    let st = lab.status("bob");
    assert_eq!(node_drop(&st, "malformed"), malformed + 3, "{st}");

    // garbage on the management port and the control socket (none counted so far: the
    // sessions' own QUIC packets are not garbage)
    assert_eq!(st["management_garbage"], 0, "{st}");
    let sessions = Lab::peer(&st, "alice")["sessions"].as_u64().unwrap();
    lab.ok(
        "alice",
        &format!("python3 -c 'import os,socket; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); [s.sendto(os.urandom(n),(\"{}\",7721)) for n in (1,20,1200,1500)]'", lab.host("bob").underlay_v4()),
    );
    let bob_sock = lab.host("bob").socket.clone();
    for junk in ["garbage\\n", "{\\\"cmd\\\":\\\"reboot\\\"}\\n", "\\x00\\xff\\n"] {
        let reply = lab.ok("bob", &format!("python3 -c 'import socket; s=socket.socket(socket.AF_UNIX); s.connect(\"{}\"); s.sendall(b\"{junk}\"); print(s.recv(4096).decode())'", bob_sock.display()));
        assert!(reply.contains("\"error\""), "control socket answered {reply}");
    }

    // the garbage on the management port is counted (the 1- and 20-byte datagrams at
    // least: they cannot be QUIC; the longer ones only when their fixed bit is clear)
    std::thread::sleep(Duration::from_millis(300));
    let st = lab.status("bob");
    assert!(st["management_garbage"].as_u64().unwrap_or(0) >= 2, "{st}");
    for socket in ["data", "management", "api"] {
        assert!(st["socket_drops"][socket].is_u64(), "no socket drop count for {socket}: {st}");
    }
    // API datagrams lost to a full socket buffer are counted: bob's detourd is stopped
    // (SIGSTOP) while a program sends it 20,000 datagrams, more than the buffer holds
    let api_drops = st["socket_drops"]["api"].as_u64().unwrap();
    let bob_cfg = lab.host("bob").config.display().to_string();
    host_sh(&format!("pkill -STOP -f 'detourd -c {bob_cfg}'"));
    let sent = lab.sh(
        &lab.host("bob").ns.clone(),
        "python3 -c 'import socket; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); [s.sendto(b\"\\xd7\\x01\\x09junk\",(\"127.0.0.1\",7722)) for _ in range(20000)]'",
    );
    host_sh(&format!("pkill -CONT -f 'detourd -c {bob_cfg}'"));
    assert!(sent.ok, "{}", sent.stderr);
    std::thread::sleep(Duration::from_millis(500));
    let st = lab.status("bob");
    assert!(st["socket_drops"]["api"].as_u64().unwrap() > api_drops, "no API socket drops counted: {}", st["socket_drops"]);

    // the tunnel keeps working and the session was not disturbed
    ping(&lab, "alice", &lab.host("bob").overlay_v4());
    let st = lab.status("bob");
    assert_eq!(Lab::peer(&st, "alice")["state"], "up");
    assert_eq!(Lab::peer(&st, "alice")["sessions"].as_u64().unwrap(), sessions);
}

fn kernel_state(lab: &Lab, name: &str) -> String {
    lab.ok(
        name,
        "ip rule; ip -6 rule; ip route show table 7720; ip -6 route show table 7720; \
         ip -o addr show | grep -E 'dt-|detour0' | awk '{print $2, $3, $4}'; ip -o link show | grep -E 'dt-|detour0' | awk '{print $2}'",
    )
}

#[test]
fn kill_9_and_restart_leave_no_stale_or_duplicate_kernel_state() {
    let mut lab = Lab::new(&["alice", "bob"]);
    lab.write_mesh();
    lab.start_all();
    lab.wait_up("alice", &["bob"], UP);
    lab.wait_up("bob", &["alice"], UP);
    let before = kernel_state(&lab, "alice");
    assert!(before.contains("lookup 7720"), "{before}");
    lab.kill9("alice");
    // the rule outlives the process; the TUNs and their routes do not
    let crashed = kernel_state(&lab, "alice");
    assert!(crashed.contains("lookup 7720"), "{crashed}");
    assert!(!crashed.contains("detour0"), "{crashed}");
    lab.start("alice");
    lab.wait_up("alice", &["bob"], UP);
    lab.wait_up("bob", &["alice"], UP);
    std::thread::sleep(Duration::from_millis(300));
    let after = kernel_state(&lab, "alice");
    assert_eq!(before, after, "kernel state differs after kill -9 and restart");
    assert_eq!(after.matches("lookup 7720").count(), 2, "one rule per family: {after}");
    ping(&lab, "alice", &lab.host("bob").overlay_v4());
    ping(&lab, "bob", &lab.host("alice").overlay_v6());
    assert!(lab.log("alice").contains("left by an earlier run"));
}

#[test]
fn a_sysctl_changed_by_a_run_that_crashed_is_put_back_at_the_next_start() {
    // REPLEX (and the relief of degraded paths) sets fib_multipath_hash_policy to 1; the
    // original value is recorded under /run/detour first, so that a kill -9 does not leave
    // it changed past the next start (which here runs without REPLEX and with relief off,
    // and would not touch it otherwise).
    let mut lab = Lab::new(&["alice", "bob"]);
    lab.write_mesh();
    let mesh = std::fs::read_to_string(&lab.host("alice").config).expect("config") + "\n[failover]\nfailed_loss = 0.05\n";
    let mut a = lab.node_section("alice", "\n[replex]\nenabled = true\n");
    a += &lab.peer_section("bob", None, "");
    lab.write_config("alice", &a);
    let policy = |lab: &Lab| lab.ok("alice", "cat /proc/sys/net/ipv4/fib_multipath_hash_policy").trim().to_string();
    assert_eq!(policy(&lab), "0");
    lab.start_all();
    lab.wait_up("alice", &["bob"], UP);
    assert_eq!(policy(&lab), "1");
    let state = lab.ok("alice", "cat /run/detour/sysctls-net$(stat -L -c %i /proc/self/ns/net)");
    assert!(state.contains("/proc/sys/net/ipv4/fib_multipath_hash_policy 0"), "{state}");
    lab.kill9("alice");
    assert_eq!(policy(&lab), "1", "a crash leaves it changed");
    lab.write_config("alice", &mesh);
    lab.start("alice");
    lab.wait_up("alice", &["bob"], UP);
    assert_eq!(policy(&lab), "0", "put back at the next start");
    assert!(lab.log("alice").contains("sysctls an earlier run changed"), "{}", lab.log("alice"));
    let left = lab.ok("alice", "ls /run/detour/sysctls-net$(stat -L -c %i /proc/self/ns/net) 2>/dev/null || true");
    assert_eq!(left.trim(), "", "the state file is gone");
    assert!(lab.stop("alice"));
}

#[test]
fn routes_and_rules_removed_by_hand_are_restored_within_seconds() {
    // The kernel is reconciled when it reports a change (netlink notifications), not on a
    // timer: an idle daemon does no periodic dumps, and what someone removes comes back
    // within the 2 s a pass may wait for the previous one (RECONCILE_INTERVAL), long before
    // the 30 s safety pass.
    let mut lab = Lab::new(&["alice", "bob"]);
    lab.write_mesh();
    lab.start_all();
    lab.wait_up("alice", &["bob"], UP);
    std::thread::sleep(Duration::from_secs(3));
    let before = kernel_state(&lab, "alice");
    assert!(before.contains("lookup 7720"), "{before}");
    let routes = lab.ok("alice", "ip route show table 7720");
    let first = routes.lines().next().expect("a route in detour's table").to_string();
    lab.ok("alice", &format!("ip route del {first} table 7720; ip rule del lookup 7720; ip -6 rule del lookup 7720"));
    let gone = kernel_state(&lab, "alice");
    assert!(!gone.contains("lookup 7720"), "{gone}");
    let t0 = Instant::now();
    while kernel_state(&lab, "alice") != before {
        assert!(t0.elapsed() < Duration::from_secs(5), "not restored after 5 s:\n{}\nwanted:\n{before}", kernel_state(&lab, "alice"));
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("restored after {:?}", t0.elapsed());
    assert!(lab.log("alice").contains("kernel state drifted, repairing"), "{}", lab.log("alice"));
    ping(&lab, "alice", &lab.host("bob").overlay_v4());
}

#[test]
fn netfilter_rules_flushed_or_unhooked_by_hand_are_put_back() {
    // detour's netfilter rules are desired state too: a firewall reload or an `iptables -F`
    // that takes them away is repaired within NETFILTER_REPAIR (10 s), without a restart.
    let mut lab = Lab::new(&["alice", "bob"]);
    lab.write_mesh();
    lab.start_all();
    lab.wait_up("alice", &["bob"], UP);
    let rules = |lab: &Lab| lab.ok("alice", "iptables-save -t filter | grep -c DETOUR-ICMP || true").trim().parse::<u32>().unwrap_or(0);
    let before = rules(&lab);
    assert!(before >= 4, "chain, its rules and the INPUT jump: {before}");
    lab.ok("alice", "iptables -D INPUT -j DETOUR-ICMP; iptables -F DETOUR-ICMP");
    assert!(rules(&lab) < before);
    let t0 = Instant::now();
    while rules(&lab) < before {
        assert!(t0.elapsed() < Duration::from_secs(15), "not put back after 15 s:\n{}", lab.ok("alice", "iptables-save -t filter"));
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("netfilter rules put back after {:?}", t0.elapsed());
    assert_eq!(rules(&lab), before);
    assert!(lab.log("alice").contains("were changed by someone else: restored"), "{}", lab.log("alice"));
    // and a clean stop still removes them all
    assert!(lab.stop("alice"));
    let left = leftovers(&lab, "alice");
    assert_eq!(left.trim(), "", "left behind after stop:\n{left}");
}

#[test]
fn the_management_qdisc_and_a_sysctl_reset_by_hand_are_put_back() {
    // The qdisc and the sysctls detour sets are desired state like its netfilter rules:
    // `tc qdisc del` or `sysctl -w` by someone else is repaired within NETFILTER_REPAIR
    // (10 s), and a clean stop still removes the qdisc and restores the sysctl.
    let mut lab = Lab::new(&["alice", "bob"]);
    lab.write_mesh();
    let mut a = lab.node_section("alice", "\n[management]\nqdisc_interface = \"eth0\"\nqdisc_rate = \"200mbit\"\n\n[replex]\nenabled = true\n");
    a += &lab.peer_section("bob", None, "");
    lab.write_config("alice", &a);
    lab.start_all();
    lab.wait_up("alice", &["bob"], UP);
    let htb = |lab: &Lab| lab.ok("alice", "tc qdisc show dev eth0 root").contains("htb d7:");
    let policy = |lab: &Lab| lab.ok("alice", "cat /proc/sys/net/ipv4/fib_multipath_hash_policy").trim().to_string();
    assert!(htb(&lab), "{}", lab.ok("alice", "tc qdisc show dev eth0"));
    assert_eq!(policy(&lab), "1", "REPLEX hashes by ports");
    lab.ok("alice", "tc qdisc del dev eth0 root; sysctl -qw net.ipv4.fib_multipath_hash_policy=0");
    assert!(!htb(&lab) && policy(&lab) == "0");
    let t0 = Instant::now();
    while !(htb(&lab) && policy(&lab) == "1") {
        assert!(t0.elapsed() < Duration::from_secs(15), "not put back after 15 s: qdisc {}, policy {}", lab.ok("alice", "tc qdisc show dev eth0"), policy(&lab));
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("qdisc and sysctl put back after {:?}", t0.elapsed());
    let log = lab.log("alice");
    assert!(log.contains("the management qdisc on eth0 was changed by someone else: restored"), "{log}");
    assert!(log.contains("net.ipv4.fib_multipath_hash_policy was changed by someone else: restored"), "{log}");
    let tc = lab.ok("alice", "tc class show dev eth0");
    assert!(tc.contains("class htb d7:10") && tc.contains("class htb d7:20"), "{tc}");
    assert!(lab.stop("alice"));
    assert!(!htb(&lab), "the qdisc stays after stop");
    assert_eq!(policy(&lab), "0", "the sysctl is restored at stop");
}

#[test]
fn stop_removes_every_interface_route_rule_and_netfilter_rule() {
    let mut lab = Lab::new(&["alice", "bob"]);
    lab.write_mesh();
    lab.start_all();
    lab.wait_up("alice", &["bob"], UP);
    assert!(lab.stop("alice"), "detourd did not exit cleanly on SIGTERM:\n{}", lab.log("alice"));
    let left = lab.ok(
        "alice",
        "ip -o link show type tun; ip rule | grep -E '7720|proto 157' || true; ip -6 rule | grep -E '7720|proto 157' || true; \
         ip route show table 7720; ip -6 route show table 7720; ip route show proto 157; ip -6 route show proto 157; \
         (iptables-save; ip6tables-save) 2>/dev/null | grep -i detour || true",
    );
    assert_eq!(left.trim(), "", "left behind after stop:\n{left}");
    assert!(!lab.host("alice").socket.exists(), "control socket left behind");
    // and detourctl says the daemon is not running
    let h = lab.host("alice");
    let o = lab.sh(&h.ns, &format!("{} status -s {}", bin("detourctl"), h.socket.display()));
    assert!(!o.ok && o.stderr.contains("not running"), "{}", o.stderr);
}

/// What detour leaves on a host after it stopped (empty when it cleaned up).
fn leftovers(lab: &Lab, name: &str) -> String {
    lab.ok(
        name,
        "ip -o link show type tun; ip rule | grep -E '7720|proto 157' || true; ip -6 rule | grep -E '7720|proto 157' || true; \
         ip route show table 7720; ip -6 route show table 7720; ip route show proto 157; ip -6 route show proto 157; \
         (iptables-save; ip6tables-save) 2>/dev/null | grep -i detour || true",
    )
}

#[test]
fn a_panic_in_the_data_thread_or_a_task_stops_detourd_non_zero_with_the_reason() {
    // Supervision: a part that panics takes the daemon down (so that systemd's
    // Restart=on-failure restarts it) instead of leaving a node that looks healthy; the
    // host is cleaned as at a normal stop. The panics come from the test-only hook
    // DETOURD_TEST_PANIC.
    let mut lab = Lab::new(&["alice", "bob"]);
    lab.write_mesh();
    lab.start("bob");
    for (part, words) in [("data", "the data thread panics on purpose"), ("engine", "the failover engine panics on purpose"), ("overlay", "the management overlay panics on purpose")] {
        let before = lab.log("alice").len();
        lab.start_with_env("alice", &[("DETOURD_TEST_PANIC", &format!("{part}:2500"))]);
        lab.wait_up("alice", &["bob"], UP);
        let st = lab.wait_exit("alice", Duration::from_secs(15)).unwrap_or_else(|| panic!("{part}: detourd still runs after the panic:\n{}", lab.log("alice")));
        let log = lab.log("alice")[before..].to_string();
        assert!(!st.success(), "{part}: detourd exited with success after a panic:\n{log}");
        assert!(log.contains(words) && log.contains("panicked") && log.contains("stopping:"), "{part}: the reason is not in the log:\n{log}");
        let left = leftovers(&lab, "alice");
        assert_eq!(left.trim(), "", "{part}: left behind after the panic:\n{left}");
    }
    // A normal start afterwards works.
    lab.start("alice");
    lab.wait_up("alice", &["bob"], UP);
    ping(&lab, "alice", &lab.host("bob").overlay_v4());
}

#[test]
fn path_mtu_discovery_works_through_the_overlay() {
    let mut lab = Lab::new(&["alice", "bob", "carol"]);
    lab.write_mesh();
    // the path to bob has a 1400-byte underlay MTU; to carol the default 1500
    let mut a = lab.node_section("alice", "");
    a += &lab.peer_section("bob", None, "underlay_mtu = 1400");
    a += &lab.peer_section("carol", None, "");
    lab.write_config("alice", &a);
    lab.start_all();
    lab.wait_up("alice", &["bob", "carol"], UP);
    lab.wait_up("bob", &["alice"], UP);
    assert!(lab.ok("alice", "ip link show dt-bob").contains("mtu 1288"));
    assert!(lab.ok("alice", "ip link show detour0").contains("mtu 1388"));
    // through the aggregate, a 1350-byte packet fits detour0 but not the path to bob:
    // detour answers with the path MTU and the kernel learns it
    let lan4 = lab.host("bob").lan_v4();
    let o = lab.sh(&lab.host("alice").ns, &format!("ping -c 2 -i 0.3 -W 1 -M do -s 1322 {lan4}"));
    let text = o.stdout.clone() + &o.stderr;
    assert!(text.contains("mtu = 1288") || text.contains("mtu=1288"), "{text}");
    let route = lab.ok("alice", &format!("ip route get {lan4}"));
    assert!(route.contains("mtu 1288"), "PMTU not learned: {route}");
    lab.ok("alice", &format!("ping -c 2 -i 0.2 -W 2 -M do -s 1260 {lan4}"));
    let lan6 = lab.host("bob").lan_v6();
    let o = lab.sh(&lab.host("alice").ns, &format!("ping -c 2 -i 0.3 -W 1 -s 1302 {lan6}"));
    let text = o.stdout.clone() + &o.stderr;
    assert!(text.contains("mtu=1288") || text.contains("mtu = 1288") || text.contains("Packet too big"), "{text}");
    // TCP adapts: a bulk transfer to bob's network completes
    tcp(&lab, "alice", "bob", &lan4);
}

#[test]
fn an_invalid_config_is_refused_and_changes_nothing() {
    let lab = Lab::new(&["alice"]);
    let mut text = lab.node_section("alice", "");
    text += "\n[[peer]]\nname = \"bob\"\npublic_key = \"not-a-key\"\noverlay_ipv4 = \"10.77.0.2/24\"\n";
    lab.write_config("alice", &text);
    let h = lab.host("alice");
    let check = lab.sh(&h.ns, &format!("{} --check-config {}", bin("detourd"), h.config.display()));
    assert!(!check.ok);
    let file = h.config.display().to_string();
    assert!(check.stderr.contains(&format!("{file}: peer[0].public_key:")), "{}", check.stderr);
    assert!(check.stderr.contains(&format!("{file}: peer[0].overlay_ipv4: expected")), "{}", check.stderr);
    let before = lab.ok("alice", "ip link; ip rule; ip route show table all");
    let run = lab.sh(&h.ns, &format!("{} -c {}", bin("detourd"), h.config.display()));
    assert!(!run.ok);
    assert!(run.stderr.contains("peer[0].public_key"), "{}", run.stderr);
    assert_eq!(before, lab.ok("alice", "ip link; ip rule; ip route show table all"), "an invalid config changed the host");
    assert!(!h.socket.exists());

    // a valid config passes the check without touching the host
    let good = lab.node_section("alice", "");
    lab.write_config("alice", &good);
    let ok = lab.sh(&h.ns, &format!("{} --check-config {}", bin("detourd"), h.config.display()));
    assert!(ok.ok && ok.stdout.contains("OK"), "{}{}", ok.stdout, ok.stderr);
    assert_eq!(before, lab.ok("alice", "ip link; ip rule; ip route show table all"));
}

#[test]
fn systemd_notify_ready_watchdog_and_stopping() {
    let mut lab = Lab::new(&["alice", "bob"]);
    lab.write_mesh();
    let sock = lab.dir.path().join("notify.sock");
    let listen = r#"
import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1]); s.settimeout(20)
t0 = time.time()
while True:
    m = s.recv(4096).decode()
    for line in m.split("\n"):
        if line:
            print(f"{time.time() - t0:.3f} {line}", flush=True)
    if "STOPPING=1" in m:
        break
"#;
    let listener = std::process::Command::new("python3").args(["-c", listen]).arg(&sock).stdout(std::process::Stdio::piped()).spawn().unwrap();
    for _ in 0..100 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let path = sock.display().to_string();
    lab.start_with_env("alice", &[("NOTIFY_SOCKET", &path), ("WATCHDOG_USEC", "200000")]);
    lab.start("bob");
    lab.wait_up("alice", &["bob"], UP);
    std::thread::sleep(Duration::from_millis(600));
    assert!(lab.stop("alice"));
    let out = listener.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().map(|l| l.split_once(' ').unwrap().1).collect();
    assert_eq!(lines.first(), Some(&"READY=1"), "{text}");
    assert_eq!(lines.last(), Some(&"STOPPING=1"), "{text}");
    assert!(lines.iter().filter(|l| **l == "WATCHDOG=1").count() >= 3, "{text}");
}
