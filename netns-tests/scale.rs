//! Many nodes that know each other only from the directory: every pair carries data.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::lab::{bin, Lab};

/// The set-up time documented for a link to a node learned from the directory: the first
/// packets wait in the data path while the session comes up (docs/design.md, "On-demand
/// links"), so a ping is answered within this time, normally at once.
const SETUP: Duration = Duration::from_secs(3);

fn directory_size(lab: &Lab, host: &str) -> usize {
    let h = lab.host(host);
    let o = lab.sh(&h.ns, &format!("{} nodes --json -s {}", bin("detourctl"), h.socket.display()));
    if !o.ok {
        return 0;
    }
    serde_json::from_str::<Value>(&o.stdout).ok().and_then(|v| v.as_array().map(|a| a.len())).unwrap_or(0)
}

/// From every host at once, pings each other host's overlay address in turn; returns per
/// ordered pair (from, to) the sequence number of the first reply (None: no reply within
/// [`SETUP`]), and whether the route to it then used the per-peer interface.
fn ping_all(lab: &Lab, names: &[String]) -> Vec<(String, String, Option<u32>, bool)> {
    let mut children = Vec::new();
    for a in names {
        let mut script = String::new();
        for b in names.iter().filter(|b| *b != a) {
            let addr = lab.host(b).overlay_v4();
            // 0.1 s apart for SETUP: the first reply's icmp_seq tells when the link carried data.
            script += &format!(
                "first=$(ping -n -c {count} -i 0.1 -W 1 -w {secs} {addr} | sed -n 's/.*icmp_seq=\\([0-9]*\\).*/\\1/p' | head -n 1)\n\
                 dev=$(ip route get {addr} | sed -n 's/.* dev \\([^ ]*\\).*/\\1/p')\n\
                 echo \"{b} ${{first:-none}} $dev\"\n",
                count = SETUP.as_secs() * 10,
                secs = SETUP.as_secs()
            );
        }
        let c = Command::new("ip").args(["netns", "exec", &lab.host(a).ns, "bash", "-c", &script]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("spawn ping script");
        children.push((a.clone(), c));
    }
    let mut out = Vec::new();
    for (a, c) in children {
        let o = c.wait_with_output().expect("ping script");
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 2 {
                continue;
            }
            let seq = f[1].parse::<u32>().ok();
            let dev = f.get(2).copied().unwrap_or("");
            out.push((a.clone(), f[0].to_string(), seq, dev == format!("dt-{}", f[0])));
        }
    }
    out
}

#[test]
fn twelve_nodes_with_one_bootstrap_peer_each_ping_every_pair() {
    let names: Vec<String> = (1..=12).map(|i| format!("n{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut lab = Lab::new(&refs);
    // n1 lists every node; every other node lists only n1 and learns the rest from the
    // directory.
    for h in &names {
        let mut text = lab.node_section(h, "");
        if h == "n1" {
            for p in names.iter().filter(|p| *p != h) {
                text += &lab.peer_section(p, None, "");
            }
        } else {
            text += &lab.peer_section("n1", None, "");
        }
        lab.write_config(h, &text);
    }
    lab.start_all();
    let t0 = Instant::now();
    while !names.iter().all(|h| directory_size(&lab, h) == names.len()) {
        assert!(t0.elapsed() < Duration::from_secs(30), "directories incomplete after 30 s");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Through the aggregate interface: each ping opens an on-demand link.
    let first = ping_all(&lab, &names);
    assert_eq!(first.len(), 12 * 11, "{first:?}");
    let failed: Vec<_> = first.iter().filter(|r| r.2.is_none()).map(|r| (&r.0, &r.1)).collect();
    let at_once = first.iter().filter(|r| r.2 == Some(1)).count();
    let slowest = first.iter().filter_map(|r| r.2).max().unwrap_or(0);
    eprintln!("first ping answered for {at_once}/132 pairs; slowest first reply: icmp_seq {slowest}");
    assert!(failed.is_empty(), "pairs without a reply within {SETUP:?}: {failed:?}\n--- n2 log ---\n{}", lab.log("n2"));
    // Now over the per-peer links that the traffic opened: every pair again, routed through
    // the link's own interface, answered at once.
    let second = ping_all(&lab, &names);
    assert_eq!(second.len(), 12 * 11);
    let failed: Vec<_> = second.iter().filter(|r| r.2.is_none()).map(|r| (&r.0, &r.1)).collect();
    assert!(failed.is_empty(), "pairs without a reply over their per-peer link: {failed:?}");
    let not_per_peer: Vec<_> = second.iter().filter(|r| !r.3).map(|r| (&r.0, &r.1)).collect();
    assert!(not_per_peer.is_empty(), "pairs not routed over their per-peer interface: {not_per_peer:?}");
    let late: Vec<_> = second.iter().filter(|r| r.2 != Some(1)).map(|r| (&r.0, &r.1, r.2)).collect();
    assert!(late.is_empty(), "pairs whose first ping over an open link went unanswered: {late:?}");
    // No session was set up and torn down in a loop meanwhile.
    for h in ["n1", "n2", "n7"] {
        let st = lab.status(h);
        let per_min = st["management_handshakes_last_minute"].as_u64().unwrap();
        assert!(per_min <= 60, "{h}: {per_min} handshakes in the last minute");
    }
    for h in &names {
        assert!(lab.stop(h), "{h} did not stop cleanly");
    }
}
