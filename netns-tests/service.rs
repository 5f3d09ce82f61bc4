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
    lab.write_config("alice", &(alice_new.replace("log_level = \"info,detour=debug\"", "log_level = \"info\"") + "\n[failover]\nprobe_interval_ms = 40\n"));
    lab.ok("alice", &format!("pkill -HUP -f 'detourd -c {}'", lab.host("alice").config.display()));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !lab.log("alice").contains("reload: failover.probe_interval_ms changed") {
        assert!(Instant::now() < deadline, "SIGHUP did not reload:\n{}", lab.log("alice"));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(lab.log("alice").contains("reload: node.log_level changed"));

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
