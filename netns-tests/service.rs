//! Running detour as a service (issue 15): hot reload.

use std::time::{Duration, Instant};

use crate::lab::{bin, Lab};

const LONGSTREAM: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/netns-tests/helpers/longstream.py");

fn ctl(lab: &Lab, name: &str, args: &str) -> crate::lab::Out {
    let h = lab.host(name);
    lab.sh(&h.ns, &format!("{} {args} -s {}", bin("detourctl"), h.socket.display()))
}

fn ifindex(lab: &Lab, name: &str, dev: &str) -> String {
    lab.ok(name, &format!("cat /sys/class/net/{dev}/ifindex")).trim().to_string()
}

/// Alice runs with bob and dave as peers; a byte-checked TCP stream runs to bob's overlay
/// address through the overlay while alice's configuration is reloaded to add carol and
/// remove dave (`detourctl reload`), then refused twice (an invalid file, a port change),
/// then reloaded by SIGHUP with a new probe interval.
#[test]
fn a_reload_adds_and_removes_peers_without_touching_a_transfer_to_a_third_and_refuses_bad_files() {
    let mut lab = Lab::new(&["alice", "bob", "carol", "dave"]);
    let alice_old = lab.node_section("alice", "") + &lab.peer_section("bob", None, "") + &lab.peer_section("dave", None, "");
    lab.write_config("alice", &alice_old);
    for n in ["bob", "carol", "dave"] {
        let text = lab.node_section(n, "") + &lab.peer_section("alice", None, "");
        lab.write_config(n, &text);
    }
    lab.start_all();
    lab.wait_up("alice", &["bob", "dave"], Duration::from_secs(10));
    crate::ping(&lab, "alice", &lab.host("dave").overlay_v4());
    let bob_if = ifindex(&lab, "alice", "dt-bob");
    let bob_sessions = Lab::peer(&lab.status("alice"), "bob")["sessions"].as_u64().unwrap();

    // a stream alice -> bob through the overlay (bob's overlay address), every byte checked
    let out = lab.dir.path().join("stream.json");
    let bob_ns = lab.host("bob").ns.clone();
    lab.sh(&bob_ns, &format!("nohup python3 {LONGSTREAM} server 5201 {} >/dev/null 2>&1 &", out.display()));
    std::thread::sleep(Duration::from_millis(300));
    let alice_ns = lab.host("alice").ns.clone();
    let client = std::process::Command::new("ip")
        .args(["netns", "exec", &alice_ns, "python3", LONGSTREAM, "client", &lab.host("bob").overlay_v4(), "5201", "20", "2000000"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("stream client");
    std::thread::sleep(Duration::from_secs(2));

    // carol added, dave removed
    let alice_new = lab.node_section("alice", "") + &lab.peer_section("bob", None, "") + &lab.peer_section("carol", None, "");
    lab.write_config("alice", &alice_new);
    let r = ctl(&lab, "alice", "reload");
    assert!(r.ok, "reload failed: {}\n{}", r.stderr, lab.log("alice"));
    assert!(r.stdout.contains("peer carol: added") && r.stdout.contains("peer dave: removed"), "reload printed:\n{}", r.stdout);
    assert!(!r.stdout.contains("bob"), "bob did not change: {}", r.stdout);
    lab.wait_up("alice", &["bob", "carol"], Duration::from_secs(10));
    crate::ping(&lab, "alice", &lab.host("carol").overlay_v4());
    lab.ok("alice", "ip link show dt-carol >/dev/null");
    // dave is no longer a configured peer: its interface and the session alice held for
    // it are gone. It is still a member of the overlay (its signed record is in the
    // directory), so it may come back as a directory node, through the aggregate
    // interface, as any member can.
    lab.ok("alice", "! ip link show dt-dave 2>/dev/null");
    let st = lab.status("alice");
    let dave = st["peers"].as_array().unwrap().iter().find(|p| p["name"] == "dave");
    assert!(dave.is_none_or(|d| d["kind"] == "directory" && d["interface"] == "detour0"), "dave still configured: {st}");
    assert!(lab.log("alice").contains("reload: peer dave: removed"), "{}", lab.log("alice"));
    let routes = lab.ok("alice", "ip route show table 7720");
    assert!(!routes.contains("dt-dave"), "a route through dt-dave is left:\n{routes}");

    // an invalid file and a restart-only change are refused; nothing changes
    lab.write_config("alice", &(alice_new.clone() + "\n[failover]\nprobe_interval_ms = \"fast\"\n"));
    let r = ctl(&lab, "alice", "reload");
    assert!(!r.ok && r.stderr.contains("failover.probe_interval_ms"), "invalid file: {} / {}", r.stdout, r.stderr);
    lab.write_config("alice", &alice_new.replace("[node]\n", "[node]\ndata_port = 7800\n"));
    let r = ctl(&lab, "alice", "reload");
    assert!(!r.ok && r.stderr.contains("node.data_port") && r.stderr.contains("restart"), "port change: {} / {}", r.stdout, r.stderr);
    let st = lab.status("alice");
    assert_eq!(st["node"]["data_port"], 7720, "{st}");
    lab.ok("alice", &format!("ping -c 1 -W 2 {}", lab.host("carol").overlay_v4()));

    // SIGHUP applies a new probe interval and a new log level
    lab.write_config(
        "alice",
        &(alice_new.replace("log_level = \"info,detour=debug\"", "log_level = \"info\"").replace("[node]\n", "[node]\nmetrics_listen = \"127.0.0.1:9772\"\n")
            + "\n[failover]\nprobe_interval_ms = 40\n"),
    );
    lab.ok("alice", &format!("pkill -HUP -f 'detourd -c {}'", lab.host("alice").config.display()));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !lab.log("alice").contains("reload: failover.probe_interval_ms changed") {
        assert!(Instant::now() < deadline, "SIGHUP did not reload:\n{}", lab.log("alice"));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(lab.log("alice").contains("reload: node.log_level changed"));
    assert!(lab.log("alice").contains("reload: node.metrics_listen changed"));
    let metrics = lab.ok("alice", "curl -sf -m 5 http://127.0.0.1:9772/metrics");
    assert!(metrics.contains("detour_peer_up") || metrics.contains("detour_uptime_seconds"), "{metrics}");

    // the stream to bob was never disturbed: same session, same interface, every byte
    let o = client.wait_with_output().expect("stream client");
    let sent: serde_json::Value = serde_json::from_slice(&o.stdout).expect("client JSON");
    assert!(sent["error"].is_null(), "the client failed: {sent}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !out.exists() {
        assert!(Instant::now() < deadline, "no stream result");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(200));
    let got: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).expect("server JSON");
    assert_eq!(got["bytes"], sent["bytes"], "{got} / {sent}");
    assert_eq!(got["mismatches"], 0, "{got}");
    assert_eq!(got["reset"], false, "{got}");
    assert!(got["stall_ms"].as_f64().unwrap() < 500.0, "the stream stalled: {got}");
    assert_eq!(ifindex(&lab, "alice", "dt-bob"), bob_if, "bob's interface was recreated");
    assert_eq!(Lab::peer(&lab.status("alice"), "bob")["sessions"].as_u64().unwrap(), bob_sessions, "bob's session was renewed");
    assert!(lab.stop("alice"), "alice did not stop cleanly:\n{}", lab.log("alice"));
}

fn why(lab: &Lab, name: &str, dest: &str) -> serde_json::Value {
    let r = ctl(lab, name, &format!("why --json {dest}"));
    assert!(r.ok, "why {dest}: {}\n{}", r.stderr, lab.log(name));
    serde_json::from_str(&r.stdout).expect("why JSON")
}

/// `detourctl why` explains a destination before and during a cut of the direct path
/// (matched prefix, path and reason, relays, kernel route agreeing), and `detourctl ping`
/// shows the path of each reply and the change when the path is cut mid-run.
#[test]
fn why_and_ping_show_the_path_in_use_and_its_change_across_a_cut() {
    let mut lab = Lab::new(&["alice", "bob", "carol"]);
    lab.write_mesh();
    lab.start_all();
    lab.wait_up("alice", &["bob", "carol"], Duration::from_secs(10));
    lab.wait_up("carol", &["bob"], Duration::from_secs(10));
    let bob_underlay = lab.host("bob").underlay_v4();

    // healthy: bob's overlay address goes through dt-bob, its underlay address directly
    let w = why(&lab, "alice", "bob");
    assert_eq!(w["kind"], "overlay address", "{w}");
    assert_eq!(w["prefix"], format!("{}/32", lab.host("bob").overlay_v4()), "{w}");
    assert_eq!(w["peer"]["path"], "direct", "{w}");
    assert_eq!(w["through_overlay"], true, "{w}");
    assert!(w["kernel_route"].as_str().unwrap().contains("dev dt-bob"), "{w}");
    assert_eq!(w["kernel_matches"], true, "{w}");
    assert!(w["peer"]["relays"].as_array().unwrap().iter().any(|r| r["name"] == "carol"), "{w}");
    let w = why(&lab, "alice", &bob_underlay);
    assert_eq!(w["kind"], "protected underlay destination", "{w}");
    assert_eq!(w["through_overlay"], false, "{w}");
    assert!(w["kernel_route"].as_str().unwrap().contains("dev eth0"), "{w}");
    assert_eq!(w["kernel_matches"], true, "{w}");
    let w = why(&lab, "alice", "192.0.2.77");
    assert_eq!(w["kind"], "not routed by detour", "{w}");
    assert!(w["peer"].is_null(), "{w}");
    let r = ctl(&lab, "alice", "why nobody");
    assert!(!r.ok && r.stderr.contains("nobody"), "{} / {}", r.stdout, r.stderr);
    let text = ctl(&lab, "alice", "why bob");
    assert!(text.ok && text.stdout.contains("path in use: direct") && text.stdout.contains("kernel: dev dt-bob") && text.stdout.contains("matches"), "{}", text.stdout);

    let r = ctl(&lab, "alice", "ping -n 3 -i 100 bob");
    assert!(r.ok, "ping: {} / {}", r.stdout, r.stderr);
    assert_eq!(r.stdout.matches(" ms, path direct").count(), 3, "{}", r.stdout);
    assert!(r.stdout.contains("3 sent, 3 received, 0 path changes"), "{}", r.stdout);

    // a ping running while the direct path is cut shows the change to the relay
    let h = lab.host("alice");
    let child = std::process::Command::new("ip")
        .args(["netns", "exec", &h.ns, &bin("detourctl"), "ping", "--json", "-n", "30", "-i", "100", "bob", "-s"])
        .arg(&h.socket)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("detourctl ping");
    std::thread::sleep(Duration::from_millis(700));
    let (ua, ub) = (lab.host("alice").underlay_v4(), bob_underlay.clone());
    let r = lab.sh(&lab.router, &format!("iptables -I FORWARD -s {ua} -d {ub} -j DROP && iptables -I FORWARD -s {ub} -d {ua} -j DROP"));
    assert!(r.ok, "{}", r.stderr);
    let o = child.wait_with_output().expect("ping output");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).expect("ping JSON line")).collect();
    assert_eq!(lines.len(), 30, "{lines:?}");
    let change = lines.iter().find(|l| !l["path_change"].is_null()).unwrap_or_else(|| panic!("no path change: {lines:?}\n{}", lab.log("alice")));
    assert_eq!(change["path_change"], "direct -> via carol", "{change}");
    assert_eq!(lines.last().unwrap()["path"], "via carol", "{lines:?}");
    let answered = lines.iter().filter(|l| !l["rtt_ms"].is_null()).count();
    assert!(answered >= 27, "only {answered} of 30 answered: {lines:?}");

    // during the cut: bob's underlay address goes through the overlay, and the kernel agrees
    let w = why(&lab, "alice", &bob_underlay);
    assert_eq!(w["through_overlay"], true, "{w}");
    assert_eq!(w["peer"]["path"], "via carol", "{w}");
    assert_ne!(w["peer"]["reason"], "healthy", "{w}");
    assert_eq!(w["kernel_matches"], true, "{w}");
    assert!(w["paths"].as_array().unwrap().iter().any(|p| p["path"] == "direct" && p["state"] == "down"), "{w}");
}

/// A feature the configuration asks for that cannot be set up (here the management qdisc
/// on an interface that does not exist) stops the start with the reason and leaves
/// nothing behind; with `node.allow_degraded` the node starts and status and metrics show
/// what is missing.
#[test]
fn a_feature_that_cannot_be_set_up_stops_the_start_unless_degraded_is_allowed() {
    let mut lab = Lab::new(&["alice", "bob"]);
    let qdisc = "\n[management]\nqdisc_interface = \"nosuch0\"\nqdisc_rate = \"100mbit\"\n";
    lab.write_config("alice", &(lab.node_section("alice", "") + qdisc + &lab.peer_section("bob", None, "")));
    lab.write_config("bob", &(lab.node_section("bob", "") + &lab.peer_section("alice", None, "")));
    lab.start("alice");
    let st = lab.wait_exit("alice", Duration::from_secs(10)).expect("alice should stop by itself");
    assert!(!st.success(), "alice started without its qdisc");
    let log = lab.log("alice");
    assert!(log.contains("cannot set up what the configuration asks for") && log.contains("nosuch0") && log.contains("node.allow_degraded"), "{log}");
    let left = lab.ok("alice", "ip -brief link; ip rule; iptables-save | grep -c DETOUR || true");
    assert!(!left.contains("detour0") && !left.contains("dt-bob") && !left.contains("lookup 7720"), "left behind:\n{left}");

    lab.write_config("alice", &(lab.node_section("alice", "metrics_listen = \"127.0.0.1:9772\"\nallow_degraded = true") + qdisc + &lab.peer_section("bob", None, "")));
    lab.start_all();
    lab.wait_up("alice", &["bob"], Duration::from_secs(10));
    crate::ping(&lab, "alice", &lab.host("bob").overlay_v4());
    let st = lab.status("alice");
    assert!(st["degraded"]["management_qdisc"].as_str().unwrap_or("").contains("nosuch0"), "{st}");
    let text = ctl(&lab, "alice", "status");
    assert!(text.stdout.contains("DEGRADED: management_qdisc"), "{}", text.stdout);
    let metrics = lab.ok("alice", "curl -s http://127.0.0.1:9772/metrics");
    assert!(metrics.contains("detour_degraded{feature=\"management_qdisc\"} 1"), "{metrics}");
    assert!(lab.log("alice").contains("running degraded (node.allow_degraded)"));
}

/// Overlay B (`node.instance = 1`) of a host: its files in the lab's folder.
struct Second {
    key: std::path::PathBuf,
    config: std::path::PathBuf,
    socket: std::path::PathBuf,
    log: std::path::PathBuf,
}

fn second(lab: &Lab, name: &str) -> Second {
    let d = lab.dir.path();
    Second { key: d.join(format!("{name}-b.key")), config: d.join(format!("{name}-b.toml")), socket: d.join(format!("{name}-b.sock")), log: d.join(format!("{name}-b.log")) }
}

fn without_prefixes(section: &str) -> String {
    section.lines().filter(|l| !l.starts_with("prefixes")).map(|l| format!("{l}\n")).collect()
}

fn start_second(lab: &Lab, name: &str) -> std::process::Child {
    let (h, b) = (lab.host(name), second(lab, name));
    let log = std::fs::File::create(&b.log).expect("log");
    std::process::Command::new("ip").args(["netns", "exec", &h.ns, &bin("detourd"), "-c"]).arg(&b.config).stdout(log.try_clone().expect("log")).stderr(log).spawn().expect("detourd B")
}

fn status_of(lab: &Lab, name: &str, socket: &std::path::Path) -> serde_json::Value {
    let o = lab.sh(&lab.host(name).ns, &format!("{} status --json -s {}", bin("detourctl"), socket.display()));
    assert!(o.ok, "status: {}", o.stderr);
    serde_json::from_str(&o.stdout).expect("status JSON")
}

/// Two overlays on the same hosts (alice and bob each run overlay A, instance 0, on
/// 10.77.0.0/24 and overlay B, instance 1, on 10.78.0.0/24 with its own key, ports, table,
/// rule priorities, interfaces and chains): traffic flows in each, none of one enters the
/// other, an ICMP error about a destination only B protects is handed over by A's
/// interception (first in the hook) to B's, which reroutes it; B stopped, A is intact and
/// the multipath hash (REPLEX in both) stays until A stops too.
#[test]
fn two_overlays_on_the_same_hosts_are_isolated_and_hand_icmp_errors_to_each_other() {
    let mut lab = Lab::new(&["alice", "bob"]);
    let replex = "\n[replex]\nenabled = true\n";
    for (me, peer) in [("alice", "bob"), ("bob", "alice")] {
        let a = without_prefixes(&lab.node_section(me, "")) + replex + &without_prefixes(&lab.peer_section(peer, None, ""));
        lab.write_config(me, &a);
        let b = second(&lab, me);
        let o = std::process::Command::new(bin("detourctl")).arg("genkey").arg(&b.key).output().expect("genkey");
        assert!(o.status.success());
    }
    let bob_lan = "10.102.0.0/24";
    for (me, peer) in [("alice", "bob"), ("bob", "alice")] {
        let (b, pb) = (second(&lab, me), second(&lab, peer));
        let key = String::from_utf8(std::process::Command::new(bin("detourctl")).arg("pubkey").arg(&pb.key).output().unwrap().stdout).unwrap();
        let (i, pi) = (lab.host(me).index, lab.host(peer).index);
        let protected = if me == "alice" { format!("protected = [\"{bob_lan}\"]\n") } else { String::new() };
        let text = format!(
            "[node]\nname = \"{me}\"\ninstance = 1\nprivate_key = \"{}\"\noverlay_ipv4 = \"10.78.0.{i}/24\"\ncontrol_socket = \"{}\"\nlog_level = \"info,detour=debug\"\n{replex}\n[[peer]]\nname = \"{peer}\"\npublic_key = \"{}\"\nendpoints = [\"10.0.{pi}.2:7730\"]\noverlay_ipv4 = \"10.78.0.{pi}\"\n{protected}",
            b.key.display(),
            b.socket.display(),
            key.trim()
        );
        std::fs::write(&b.config, text).unwrap();
    }
    // The two overlays of one host do not collide (the check detourd makes against the
    // other configurations of its host, here copied into a folder per host); a third like
    // A collides, and every collision is named.
    let check = |dir: &std::path::Path, file: &str| {
        let o = std::process::Command::new(bin("detourd")).arg("--overlays").arg(dir).arg("--check-config").arg(dir.join(file)).output().unwrap();
        (o.status.success(), String::from_utf8_lossy(&o.stderr).to_string())
    };
    let etc = lab.dir.path().join("alice-etc");
    std::fs::create_dir(&etc).unwrap();
    std::fs::copy(&lab.host("alice").config, etc.join("detour.toml")).unwrap();
    std::fs::copy(second(&lab, "alice").config, etc.join("b.toml")).unwrap();
    for f in ["detour.toml", "b.toml"] {
        let (ok, err) = check(&etc, f);
        assert!(ok, "{f} collides: {err}");
    }
    std::fs::copy(&lab.host("alice").config, etc.join("clash.toml")).unwrap();
    let (ok, err) = check(&etc, "clash.toml");
    assert!(!ok && err.contains("node.instance: 0 is also the instance of") && err.contains("detour.toml") && err.contains("kernel.table"), "{err}");
    assert!(!err.contains("b.toml: "), "only A's collisions: {err}");

    // B first, then A: A's interception is first in the INPUT hook
    let mut b_daemons = vec![start_second(&lab, "alice"), start_second(&lab, "bob")];
    std::thread::sleep(Duration::from_millis(300));
    lab.start_all();
    lab.wait_up("alice", &["bob"], Duration::from_secs(10));
    let b_alice = second(&lab, "alice").socket;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Lab::peer(&status_of(&lab, "alice", &b_alice), "bob")["state"] != "up" {
        assert!(Instant::now() < deadline, "overlay B not up:\n{}", std::fs::read_to_string(second(&lab, "alice").log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(100));
    }
    crate::ping(&lab, "alice", "10.77.0.2");
    crate::ping(&lab, "alice", "10.78.0.2");
    // each overlay's routes, rules, interfaces and chains are its own
    let routes_a = lab.ok("alice", "ip route show table 7720");
    let routes_b = lab.ok("alice", "ip route show table 7730");
    assert!(routes_a.contains("10.77.0.2 dev dt-bob") && !routes_a.contains("10.78."), "A's table:\n{routes_a}");
    assert!(routes_b.contains("10.78.0.2 dev dt1-bob") && !routes_b.contains("10.77."), "B's table:\n{routes_b}");
    let rules = lab.ok("alice", "ip rule");
    assert!(rules.contains("lookup 7720") && rules.contains("lookup 7730"), "{rules}");
    let chains = lab.ok("alice", "iptables-save");
    assert!(chains.contains(":DETOUR-ICMP ") && chains.contains(":DETOUR-ICMP-1 ") && chains.contains(":DETOUR-PIN-1 "), "{chains}");
    assert_eq!(lab.ok("alice", "cat /proc/sys/net/ipv4/fib_multipath_hash_policy").trim(), "1");
    // no packet of one overlay enters the other
    let (b_tx, a_tx) = (lab.tx_packets("alice", "dt1-bob"), lab.tx_packets("alice", "dt-bob"));
    lab.ok("alice", "ping -c 20 -i 0.01 -q 10.77.0.2 >/dev/null");
    assert_eq!(lab.tx_packets("alice", "dt1-bob"), b_tx, "overlay A's pings went through overlay B");
    let a_tx_now = lab.tx_packets("alice", "dt-bob");
    assert!(a_tx_now >= a_tx + 20, "overlay A's pings did not use dt-bob");
    lab.ok("alice", "ping -c 20 -i 0.01 -q 10.78.0.2 >/dev/null");
    assert!(lab.tx_packets("alice", "dt-bob") < a_tx_now + 5, "overlay B's pings went through overlay A");
    assert!(lab.tx_packets("alice", "dt1-bob") >= b_tx + 20, "overlay B's pings did not use dt1-bob");

    // an ICMP host unreachable about bob's LAN, which only B protects: A's interception sees
    // it first, passes it on, B reroutes, and the connection is made through overlay B
    lab.sh(&lab.router, "ip route add 10.102.0.0/24 via 10.0.2.2");
    lab.ok("bob", "sysctl -qw net.ipv4.ip_forward=1");
    lab.sh(&lab.router, &format!("iptables -I FORWARD -d {bob_lan} -p tcp -j REJECT --reject-with icmp-host-unreachable"));
    lab.sh(&lab.host("bob").ns, "nohup python3 -c 'import socket; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((\"10.102.0.1\", 5400)); s.listen(1); c,_=s.accept(); c.sendall(b\"hello\"); c.close()' >/dev/null 2>&1 &");
    std::thread::sleep(Duration::from_millis(300));
    let got = lab.ok("alice", "python3 -c 'import socket; s=socket.create_connection((\"10.102.0.1\", 5400), timeout=5); print(s.recv(5).decode())'");
    assert_eq!(got.trim(), "hello");
    let (st_a, st_b) = (lab.status("alice"), status_of(&lab, "alice", &b_alice));
    assert!(st_a["icmp"]["ignored"]["not_protected"].as_u64().unwrap_or(0) >= 1, "A did not see the error: {}", st_a["icmp"]);
    assert!(st_b["icmp"]["rerouted"].as_u64().unwrap_or(0) >= 1, "B did not reroute: {}", st_b["icmp"]);
    assert_eq!(st_a["icmp"]["rerouted"], 0, "A rerouted: {}", st_a["icmp"]);

    // B stops: A keeps everything, the multipath hash stays (A still splits)
    for c in &mut b_daemons {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::Signal::SIGTERM);
        let _ = c.wait();
    }
    let after = lab.ok("alice", "iptables-save; ip rule; ip -brief link");
    assert!(!after.contains("DETOUR-ICMP-1") && !after.contains("lookup 7730") && !after.contains("dt1-bob") && !after.contains("detour1"), "B left:\n{after}");
    assert!(after.contains(":DETOUR-ICMP ") && after.contains("lookup 7720") && after.contains("dt-bob"), "A lost something:\n{after}");
    assert_eq!(lab.ok("alice", "cat /proc/sys/net/ipv4/fib_multipath_hash_policy").trim(), "1", "B put the hash policy back while A splits");
    crate::ping(&lab, "alice", "10.77.0.2");
    assert!(lab.stop("alice"));
    assert_eq!(lab.ok("alice", "cat /proc/sys/net/ipv4/fib_multipath_hash_policy").trim(), "0", "the last overlay to stop puts the hash policy back");
}
