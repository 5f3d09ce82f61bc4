//! End-to-end tests of the management overlay: the directory, delivery to node IDs, names,
//! the local API and the priority of management traffic.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::lab::{bin, Lab};
use crate::{tcp, UP};

const API_CHECK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/netns-tests/helpers/apicheck.py");
const API_EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/api-example.py");

/// Hosts configured as a star: `hub` has every other host as a peer, the others only
/// `hub` (their bootstrap contact). `extra` goes at the end of every `[node]` section.
fn star_configs(lab: &Lab, names: &[&str], hub: &str, extra: &str) {
    for h in names {
        let mut text = lab.node_section(h, extra);
        if *h == hub {
            for p in names.iter().filter(|p| *p != h) {
                text += &lab.peer_section(p, None, "");
            }
        } else {
            text += &lab.peer_section(hub, None, "");
        }
        lab.write_config(h, &text);
    }
}

/// Each host has the previous and the next host of the list as configured peers.
fn ring_configs(lab: &Lab, names: &[&str]) {
    let n = names.len();
    for (i, h) in names.iter().enumerate() {
        let mut text = lab.node_section(h, "");
        let mut peers = vec![(i + n - 1) % n, (i + 1) % n];
        peers.dedup();
        for j in peers.into_iter().filter(|j| *j != i) {
            text += &lab.peer_section(names[j], None, "");
        }
        lab.write_config(h, &text);
    }
}

/// The directory of a host (empty while its daemon is not answering yet).
fn nodes(lab: &Lab, host: &str) -> Vec<Value> {
    let h = lab.host(host);
    let o = lab.sh(&h.ns, &format!("{} nodes --json -s {}", bin("detourctl"), h.socket.display()));
    if !o.ok {
        return Vec::new();
    }
    serde_json::from_str::<Value>(&o.stdout).expect("nodes JSON").as_array().cloned().unwrap_or_default()
}

fn knows(lab: &Lab, host: &str, name: &str) -> bool {
    nodes(lab, host).iter().any(|n| n["name"] == name)
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
    t0.elapsed()
}

/// Waits until every host's directory lists `n` nodes.
fn wait_directory(lab: &Lab, hosts: &[&str], n: usize, timeout: Duration) -> Duration {
    wait_until(&format!("{n} nodes in every directory"), timeout, || hosts.iter().all(|h| nodes(lab, h).len() == n))
}

fn router(lab: &Lab, script: &str) {
    let o = lab.sh(&lab.router, script);
    assert!(o.ok, "router: `{script}`: {}", o.stderr);
}

/// Drops everything between `a` and `b` in the router, both ways, IPv4 and IPv6 (nodes
/// publish both underlay addresses).
fn cut(lab: &Lab, a: &str, b: &str) {
    let (ua, ub) = (lab.host(a).underlay_v4(), lab.host(b).underlay_v4());
    let (va, vb) = (lab.host(a).underlay_v6(), lab.host(b).underlay_v6());
    router(
        lab,
        &format!(
            "iptables -I FORWARD -s {ua} -d {ub} -j DROP; iptables -I FORWARD -s {ub} -d {ua} -j DROP; \
             ip6tables -I FORWARD -s {va} -d {vb} -j DROP; ip6tables -I FORWARD -s {vb} -d {va} -j DROP"
        ),
    );
}

fn spawn(lab: &Lab, host: &str, script: &str) -> Child {
    Command::new("ip").args(["netns", "exec", &lab.host(host).ns, "bash", "-c", script]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn")
}

fn finish(c: Child) -> (bool, String, String) {
    let o = c.wait_with_output().expect("wait");
    (o.status.success(), String::from_utf8_lossy(&o.stdout).into(), String::from_utf8_lossy(&o.stderr).into())
}

/// `detourctl send` from `host`; returns its output line when delivered.
fn send(lab: &Lab, host: &str, dest: &str, channel: u16, text: &str, critical: bool) -> Result<String, String> {
    let crit = if critical { "--critical" } else { "" };
    let o = lab.sh(&lab.host(host).ns, &format!("{} send --port 7722 --channel {channel} {crit} --timeout 15 {dest} '{text}'", bin("detourctl")));
    if o.ok {
        Ok(o.stdout.trim().to_string())
    } else {
        Err(o.stderr)
    }
}

fn listen(lab: &Lab, host: &str, channel: u16, count: usize, secs: u64) -> Child {
    let c = spawn(lab, host, &format!("{} listen --port 7722 --channel {channel} --json --count {count} --timeout {secs}", bin("detourctl")));
    std::thread::sleep(Duration::from_millis(400));
    c
}

fn received(c: Child) -> Vec<Value> {
    let (_, out, _) = finish(c);
    out.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

fn node_id(lab: &Lab, host: &str) -> String {
    let o = Command::new(bin("detourctl")).arg("nodeid").arg(&lab.host(host).key).output().expect("nodeid");
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn management(lab: &Lab, host: &str) -> Value {
    lab.status(host)["management"].clone()
}

#[test]
fn nodes_not_in_each_others_config_find_each_other_and_carry_traffic() {
    let mut lab = Lab::new(&["alice", "bob", "carol"]);
    star_configs(&lab, &["alice", "bob", "carol"], "bob", "\n[management]\nidle_timeout_s = 5\n");
    lab.start_all();
    lab.wait_up("bob", &["alice", "carol"], UP);
    wait_directory(&lab, &["alice", "bob", "carol"], 3, Duration::from_secs(10));
    let carol = nodes(&lab, "alice").into_iter().find(|n| n["name"] == "carol").expect("carol in alice's directory");
    assert_eq!(carol["endpoints"][0], format!("{}:7720", lab.host("carol").underlay_v4()));
    // Forwarding traffic between alice and carol: the first packet asks for a session.
    let c4 = lab.host("carol").overlay_v4();
    let _ = lab.sh(&lab.host("alice").ns, &format!("ping -c 4 -i 0.25 -W 1 {c4}"));
    lab.ok("alice", &format!("ping -c 3 -i 0.1 -W 2 {c4}"));
    // The link is in use: carol has a per-peer interface on alice, and TCP works, also
    // to the prefix behind carol and over IPv6.
    let st = lab.status("alice");
    let p = Lab::peer(&st, "carol");
    assert_eq!(p["kind"], "directory");
    assert_eq!(p["interface"], "dt-carol");
    lab.ok("alice", "ip link show dt-carol");
    tcp(&lab, "alice", "carol", &c4);
    lab.ok("alice", &format!("ping -c 3 -i 0.1 -W 2 {}", lab.host("carol").lan_v4()));
    lab.ok("alice", &format!("ping -c 3 -i 0.1 -W 2 {}", lab.host("carol").overlay_v6()));
    // Idle links close: the interface goes, the directory stays.
    wait_until("the idle link to close", Duration::from_secs(20), || !lab.sh(&lab.host("alice").ns, "ip link show dt-carol").ok);
    assert!(knows(&lab, "alice", "carol"));
    let routes = lab.ok("alice", "ip route show table 7720");
    assert!(!routes.contains("dt-carol"), "{routes}");
    // and it comes back on demand
    let _ = lab.sh(&lab.host("alice").ns, &format!("ping -c 3 -i 0.25 -W 1 {c4}"));
    lab.ok("alice", &format!("ping -c 2 -i 0.1 -W 2 {c4}"));
    assert!(lab.stop("alice") && lab.stop("bob") && lab.stop("carol"));
}

#[test]
fn messages_reach_a_node_whose_direct_path_is_cut_and_critical_ones_survive_a_path_failure() {
    let mut lab = Lab::new(&["alice", "bob", "carol", "dave"]);
    lab.write_mesh();
    lab.start_all();
    for h in ["alice", "bob", "carol", "dave"] {
        let others: Vec<&str> = ["alice", "bob", "carol", "dave"].into_iter().filter(|x| *x != h).collect();
        lab.wait_up(h, &others, UP);
    }
    wait_directory(&lab, &["alice", "bob", "carol", "dave"], 4, Duration::from_secs(10));
    // The second path needs the links of the others: a record can reach alice only by an
    // announcement while the flood tree forms (it asks for it 500 ms later).
    wait_until("every link in alice's directory", Duration::from_secs(10), || {
        let n = nodes(&lab, "alice");
        n.len() == 4 && n.iter().all(|r| r["neighbours"] == 3)
    });
    let l = listen(&lab, "bob", 7, 3, 30);
    // A silent cut: the sessions between alice and bob still look alive.
    cut(&lab, "alice", "bob");
    let before = management(&lab, "alice")["retransmissions"].as_u64().unwrap();
    let out = send(&lab, "alice", "bob", 7, "critical one", true).expect("critical message delivered");
    assert!(out.starts_with("delivered"), "{out}");
    let after = management(&lab, "alice")["retransmissions"].as_u64().unwrap();
    assert_eq!(after, before, "the critical message arrived on its second path without a retransmission");
    // A plain message is retransmitted on another path after the timeout.
    let out = send(&lab, "alice", "bob", 7, "plain two", false).expect("plain message delivered");
    assert!(out.starts_with("delivered"), "{out}");
    // By name and by node ID alike.
    let out = send(&lab, "alice", &node_id(&lab, "bob"), 7, "three by id", false).expect("delivered by node ID");
    assert!(out.starts_with("delivered"), "{out}");
    let got = received(l);
    let texts: Vec<&str> = got.iter().filter_map(|m| m["text"].as_str()).collect();
    assert_eq!(texts, vec!["critical one", "plain two", "three by id"], "{got:?}");
    assert!(got.iter().all(|m| m["from"] == node_id(&lab, "alice") && m["channel"] == 7));
}

#[test]
fn churn_loses_no_acknowledged_message() {
    let names = ["alice", "bob", "carol", "dave", "eve"];
    let mut lab = Lab::new(&names);
    ring_configs(&lab, &names);
    lab.start_all();
    wait_directory(&lab, &names, 5, Duration::from_secs(15));
    let l = listen(&lab, "eve", 9, 1000, 60);
    let victims = ["bob", "carol", "dave"];
    let mut acked = Vec::new();
    let mut sent = 0;
    let mut down: Option<&str> = None;
    for i in 0..18 {
        if i % 3 == 0 {
            if let Some(v) = down.take() {
                lab.start(v);
            }
            let v = victims[(i / 3) % victims.len()];
            lab.kill9(v);
            down = Some(v);
        }
        sent += 1;
        let text = format!("m{i}");
        if let Ok(out) = send(&lab, "alice", "eve", 9, &text, false) {
            if out.starts_with("delivered") {
                acked.push(text);
            }
        }
    }
    if let Some(v) = down {
        lab.start(v);
    }
    std::thread::sleep(Duration::from_secs(1));
    let _ = lab.sh(&lab.host("eve").ns, "pkill -f 'detourctl listen' || true");
    let got = received(l);
    let texts: Vec<String> = got.iter().filter_map(|m| m["text"].as_str().map(String::from)).collect();
    for a in &acked {
        assert!(texts.contains(a), "{a} was acknowledged but never delivered; got {texts:?}");
    }
    assert!(acked.len() * 10 >= sent * 7, "only {} of {sent} messages got through the churn", acked.len());
    println!("churn: {} of {sent} acknowledged, {} received", acked.len(), texts.len());
}

#[test]
fn a_partition_that_heals_merges_the_directory() {
    let names = ["a1", "a2", "b1", "b2", "newcomer"];
    let mut lab = Lab::new(&names);
    ring_configs(&lab, &["a1", "a2", "b1", "b2"]);
    let mut text = lab.node_section("newcomer", "");
    text += &lab.peer_section("a1", None, "");
    lab.write_config("newcomer", &text);
    let mut a1 = std::fs::read_to_string(&lab.host("a1").config).unwrap();
    a1 += &lab.peer_section("newcomer", None, "");
    lab.write_config("a1", &a1);
    for h in ["a1", "a2", "b1", "b2"] {
        lab.start(h);
    }
    wait_directory(&lab, &["a1", "a2", "b1", "b2"], 4, Duration::from_secs(15));
    // Partition {a1, a2, newcomer} from {b1, b2} long enough for their sessions to time
    // out.
    for x in ["a1", "a2", "newcomer"] {
        for y in ["b1", "b2"] {
            cut(&lab, x, y);
        }
    }
    std::thread::sleep(Duration::from_secs(8));
    lab.start("newcomer");
    wait_until("the newcomer known on its side", Duration::from_secs(15), || knows(&lab, "a1", "newcomer") && knows(&lab, "a2", "newcomer"));
    std::thread::sleep(Duration::from_secs(2));
    assert!(!knows(&lab, "b1", "newcomer") && !knows(&lab, "b2", "newcomer"), "the partition leaked");
    // Heal.
    router(&lab, "iptables -F FORWARD; ip6tables -F FORWARD");
    let t = wait_directory(&lab, &names, 5, Duration::from_secs(20));
    println!("directories merged {t:?} after the partition healed");
}

#[test]
fn a_second_key_cannot_register_a_held_name() {
    let mut lab = Lab::new(&["alice", "bob", "carol"]);
    star_configs(&lab, &["alice", "bob", "carol"], "bob", "");
    lab.start_all();
    wait_directory(&lab, &["alice", "bob", "carol"], 3, Duration::from_secs(10));
    let d = bin("detourctl");
    lab.ok("alice", &format!("{d} register --port 7722 sip:office"));
    let alice = node_id(&lab, "alice");
    wait_until("carol resolving the name", Duration::from_secs(10), || {
        let o = lab.sh(&lab.host("carol").ns, &format!("{d} resolve --port 7722 sip:office"));
        o.ok && o.stdout.contains(&alice)
    });
    let o = lab.sh(&lab.host("carol").ns, &format!("{d} register --port 7722 sip:office"));
    assert!(!o.ok && o.stderr.contains("name_taken") && o.stderr.contains(&alice), "{}{}", o.stdout, o.stderr);
    // every node still resolves it to alice, and its own names to itself
    std::thread::sleep(Duration::from_secs(1));
    for h in ["alice", "bob", "carol"] {
        let out = lab.ok(h, &format!("{d} resolve --port 7722 sip:office"));
        assert!(out.contains(&alice), "{h}: {out}");
    }
    let out = lab.ok("alice", &format!("{d} resolve --port 7722 carol"));
    let rec: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rec["node_id"], node_id(&lab, "carol"));
    assert_eq!(rec["endpoints"][0], format!("{}:7720", lab.host("carol").underlay_v4()));
}

#[test]
fn the_api_answers_bad_datagrams_with_errors_and_keeps_serving() {
    let mut lab = Lab::new(&["alice", "bob"]);
    lab.write_mesh();
    lab.start_all();
    lab.wait_up("alice", &["bob"], UP);
    wait_directory(&lab, &["alice", "bob"], 2, Duration::from_secs(10));
    let out = lab.ok("alice", &format!("python3 {API_CHECK} 7722 {}", node_id(&lab, "bob")));
    println!("{out}");
    assert!(out.contains("all checks passed"), "{out}");
    std::thread::sleep(Duration::from_secs(1));
    let errs = &management(&lab, "alice")["api"]["errors"];
    for code in ["malformed", "version", "unknown_op", "too_large", "unknown_node", "no_address"] {
        assert!(errs[code].as_u64().unwrap_or(0) >= 1, "{code} not counted: {errs}");
    }
    // The example client talks to it as well: bob listens, alice sends.
    let l = spawn(&lab, "bob", &format!("python3 {API_EXAMPLE} listen 12"));
    std::thread::sleep(Duration::from_millis(500));
    let o = lab.ok("alice", &format!("python3 {API_EXAMPLE} send bob 12 'hello from python'"));
    assert!(o.contains("delivered"), "{o}");
    let (_, text, err) = finish(l);
    assert!(text.contains("hello from python") && text.contains(&node_id(&lab, "alice")), "{text}{err}");
}

#[test]
fn management_traffic_is_marked_and_shaped_first_and_the_setup_is_removed() {
    let mut lab = Lab::new(&["alice", "bob"]);
    lab.write_mesh();
    let mut a = lab.node_section("alice", "\n[management]\nqdisc_interface = \"eth0\"\nqdisc_rate = \"200mbit\"\n");
    a += &lab.peer_section("bob", None, "");
    lab.write_config("alice", &a);
    lab.start_all();
    lab.wait_up("alice", &["bob"], UP);
    std::thread::sleep(Duration::from_secs(2));
    let rules = lab.ok("alice", "iptables -t mangle -S DETOUR-MGMT; ip6tables -t mangle -S DETOUR-MGMT");
    assert!(rules.contains("--sport 7721") && rules.contains("DSCP --set-dscp 0x30"), "{rules}");
    let counted = lab.ok("alice", "iptables -t mangle -L DETOUR-MGMT -v -n -x | awk '/DSCP/ {print $1}'");
    assert!(counted.trim().parse::<u64>().unwrap_or(0) > 0, "no management packet was marked: {counted}");
    let tc = lab.ok("alice", "tc -s class show dev eth0");
    assert!(tc.contains("class htb d7:10"), "{tc}");
    let mgmt_bytes: u64 =
        tc.split("class htb ").find(|c| c.starts_with("d7:10")).and_then(|c| c.split("Sent ").nth(1)).and_then(|s| s.split_whitespace().next()).and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(mgmt_bytes > 0, "nothing went through the management class:\n{tc}");
    let st = lab.status("alice");
    assert!(st["management"]["neighbours"].as_array().unwrap().iter().any(|n| n["name"] == "bob" && n["rtt_ms"].as_f64().is_some()));
    assert!(lab.stop("alice"));
    let left = lab.ok("alice", "tc qdisc show dev eth0; (iptables-save -t mangle; ip6tables-save -t mangle) | grep -i detour || true");
    assert!(!left.contains("htb") && !left.contains("DETOUR"), "{left}");
}

/// Runs `f` on a thread inside network namespace `ns`.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).expect("netns file");
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("netns thread")
}

#[test]
fn forged_replayed_and_stale_records_are_rejected_and_counted() {
    use detour::overlay::directory::SignedRecord;
    use detour::shell::quic::{self, Management};
    use detour::shell::tls::AllowedKeys;
    use detour::wire::mgmt::{Frame, Message};
    use std::sync::Arc;

    let mut lab = Lab::new(&["alice", "bob", "mallory"]);
    let mut a = lab.node_section("alice", "");
    a += &lab.peer_section("bob", None, "");
    // mallory is a pinned peer of alice's (a member), without an endpoint: she dials
    a += &format!("\n[[peer]]\nname = \"mallory\"\npublic_key = \"{}\"\noverlay_ipv4 = \"10.77.0.3\"\n", lab.pubkey("mallory"));
    lab.write_config("alice", &a);
    let mut b = lab.node_section("bob", "");
    b += &lab.peer_section("alice", None, "");
    lab.write_config("bob", &b);
    lab.start("alice");
    lab.start("bob");
    wait_directory(&lab, &["alice", "bob"], 2, Duration::from_secs(10));
    let bob_before = nodes(&lab, "alice").into_iter().find(|n| n["name"] == "bob").unwrap();

    let mallory = detour::shell::files::read_key(&lab.host("mallory").key).unwrap();
    let bob = detour::shell::files::read_key(&lab.host("bob").key).unwrap();
    let alice = detour::shell::files::read_key(&lab.host("alice").key).unwrap();
    let alice_addr: std::net::SocketAddr = format!("{}:7721", lab.host("alice").underlay_v4()).parse().unwrap();
    let ns = lab.host("mallory").ns.clone();
    let sent = in_netns(&ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            let m = Management::new(&mallory, "mallory", 7720, Arc::new(AllowedKeys::new([alice.public_key()])), vec![sock]).unwrap();
            let conn = m.dial(alice.public_key(), &[alice_addr]).await.expect("mallory's session");
            m.hello(&conn, alice.node_id(), true).await.expect("hello");
            let frame = |message| Frame { src: mallory.node_id(), dst: alice.node_id(), hop_limit: 0, message };
            // Fetch bob's current signed record from alice.
            quic::send_frame(&conn, &frame(Message::Want { nodes: vec![bob.node_id()] })).await.unwrap();
            let current = tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    let mut r = conn.accept_uni().await.unwrap();
                    if let Ok(f) = quic::read_frame(&mut r).await {
                        if let Message::Records { records, .. } = f.message {
                            if let Some(r) = records.into_iter().find(|r| r.peek().is_some_and(|(id, _)| id == bob.node_id())) {
                                return r;
                            }
                        }
                    }
                }
            })
            .await
            .expect("bob's record");
            let rec = current.verify().unwrap();
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
            let evil = |r: &mut detour::overlay::directory::NodeRecord| r.endpoints = vec!["192.0.2.66:7720".parse().unwrap()];
            // bob's node ID with mallory's key: the ID is not the hash of the key
            let mut forged = rec.clone();
            forged.public_key = mallory.public_key().to_string();
            forged.seq += 1000;
            evil(&mut forged);
            // bob's key, signed by mallory: the signature does not verify
            let mut badsig = rec.clone();
            badsig.seq += 1000;
            evil(&mut badsig);
            // bob's own signatures (the test holds his key), but older, and expired
            let mut stale = rec.clone();
            stale.seq -= 1;
            evil(&mut stale);
            let mut expired = rec.clone();
            expired.seq += 2000;
            expired.expires = now - 10;
            evil(&mut expired);
            let records = vec![SignedRecord::sign(&forged, &mallory), SignedRecord::sign(&badsig, &mallory), SignedRecord::sign(&stale, &bob), SignedRecord::sign(&expired, &bob), current.clone()];
            quic::send_frame(&conn, &frame(Message::Records { records, push: true })).await.unwrap();
            tokio::time::sleep(Duration::from_millis(500)).await;
            conn.close(0u32.into(), b"done");
            5
        })
    });
    assert_eq!(sent, 5);
    std::thread::sleep(Duration::from_secs(1));
    let m = management(&lab, "alice");
    let rej = &m["rejected_records"];
    for why in ["key_mismatch", "bad_signature", "stale", "expired"] {
        assert!(rej[why].as_u64().unwrap_or(0) >= 1, "{why} not counted: {m}");
    }
    assert!(m["duplicate_records"].as_u64().unwrap() >= 1, "the replay was not counted: {m}");
    let bob_after = nodes(&lab, "alice").into_iter().find(|n| n["name"] == "bob").unwrap();
    assert_eq!(bob_after["endpoints"], bob_before["endpoints"], "a rejected record changed the directory");
    assert!(!bob_after["endpoints"].to_string().contains("192.0.2.66"));
    // the daemon is fine
    lab.wait_up("alice", &["bob"], UP);
}

/// The flood generator (`examples/flood.rs`; scripts/test.sh builds it).
fn flood_bin() -> String {
    let p = std::path::Path::new(env!("CARGO_BIN_EXE_detourd")).parent().unwrap().join("examples/flood");
    assert!(p.exists(), "{} is missing: cargo build --example flood", p.display());
    p.display().to_string()
}

#[test]
fn a_handshake_and_datagram_flood_is_limited_and_counted_while_sessions_and_messages_go_on() {
    let mut lab = Lab::new(&["alice", "bob", "mallory"]);
    lab.write_config("alice", &(lab.node_section("alice", "") + &lab.peer_section("bob", None, "")));
    lab.write_config("bob", &(lab.node_section("bob", "") + &lab.peer_section("alice", None, "")));
    lab.start("alice");
    lab.start("bob");
    lab.wait_up("alice", &["bob"], UP);
    lab.wait_up("bob", &["alice"], UP);
    let sessions = Lab::peer(&lab.status("bob"), "alice")["sessions"].as_u64().unwrap();
    // mallory floods bob from 40 addresses: 2,000 QUIC connection attempts per second
    // (50 per address, over the 20/s rate) at the management port, and random datagrams at
    // the data port
    let sources: Vec<String> = (10..50).map(|i| format!("10.0.3.{i}")).collect();
    lab.ok("mallory", &sources.iter().map(|s| format!("ip addr add {s}/24 dev eth0")).collect::<Vec<_>>().join(" && "));
    let bob = lab.host("bob").underlay_v4();
    let quic = spawn(&lab, "mallory", &format!("{} quic {bob}:7721 2000 5 {}", flood_bin(), sources.join(" ")));
    let udp = spawn(&lab, "mallory", &format!("{} udp {bob}:7720 5", flood_bin()));
    std::thread::sleep(Duration::from_millis(1500));
    // management messages are delivered and acknowledged during the flood
    for k in 0..5 {
        send(&lab, "alice", "bob", 31, &format!("during the flood {k}"), true).unwrap_or_else(|e| panic!("message {k} not delivered: {e}"));
    }
    let (ok, out, err) = finish(quic);
    assert!(ok, "quic flood: {out}{err}");
    println!("quic flood: {out}");
    let (ok, out, err) = finish(udp);
    assert!(ok, "udp flood: {out}{err}");
    println!("udp flood: {out}");

    let st = lab.status("bob");
    let h = &st["incoming_handshakes"];
    println!("incoming handshakes: {h}, pending {}, refused {}", st["pending_handshakes"], st["refused_handshakes"]);
    // the sources went over their rate, and past 64 pending handshakes the rest had to
    // prove their address first
    assert!(h["rate_limited"].as_u64().unwrap() > 0, "{h}");
    assert!(h["retried"].as_u64().unwrap() > 0, "{h}");
    assert!(st["pending_handshakes"].as_u64().unwrap() <= 512, "{st}");
    // the random datagrams were dropped and counted
    let drops: u64 = st["drops"].as_object().unwrap().values().filter_map(Value::as_u64).sum();
    assert!(drops > 1000, "{st}");
    // the session with alice was never disturbed and traffic still flows
    assert_eq!(Lab::peer(&st, "alice")["state"], "up");
    assert_eq!(Lab::peer(&st, "alice")["sessions"].as_u64().unwrap(), sessions, "{st}");
    lab.ok("alice", &format!("ping -c 3 -i 0.1 -W 2 {}", lab.host("bob").overlay_v4()));
}
