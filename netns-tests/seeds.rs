//! Fuzz seeds from real packets (issue 13): three daemons run with
//! `DETOUR_CAPTURE_SEEDS` while pings, a TCP transfer, management messages, bad API
//! datagrams, an ICMP host unreachable and a relayed path exercise every parser that sees
//! bytes from outside; each captured input is checked against its parser. With
//! `DETOUR_SEEDS_TO=DIR` (`scripts/fuzz.sh --capture`) the seeds are copied to
//! `DIR/TARGET/real-*` (the committed corpus is `fuzz/seeds/`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use detour::config::Config;
use detour::overlay::api;
use detour::path::failover::Probe;
use detour::path::icmp::{Filter, Verdict};
use detour::shell::{nexthop, sockdiag};
use detour::wire::mgmt;

use crate::lab::{bin, Lab};

const UP: Duration = Duration::from_secs(15);
const TCPCHECK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/netns-tests/helpers/tcpcheck.py");
const API_CHECK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/netns-tests/helpers/apicheck.py");
const TARGETS: [&str; 8] = ["decapsulate", "probe", "mgmt_frame", "api", "icmp", "sock_diag", "nexthop", "config"];

fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(dir).map(|r| r.flatten().map(|e| (e.path(), std::fs::read(e.path()).unwrap_or_default())).collect()).unwrap_or_default();
    v.sort();
    v
}

#[test]
fn fuzz_seeds_are_captured_from_a_real_run() {
    let mut lab = Lab::new(&["alice", "bob", "carol"]);
    lab.write_mesh();
    let dir = std::env::temp_dir().join(format!("detour-seeds-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let d = dir.display().to_string();
    // nexthop objects a crashed run left on alice (a next hop and a resilient group, proto
    // 157, IDs of instance 0: 0xd7000042, 0xd7000043): the start's dump reads them from the
    // kernel, and they are removed
    lab.ok("alice", "ip link add dtt-seed type veth peer name dtt-seed1 && ip link set dtt-seed up && ip link set dtt-seed1 up && ip nexthop add id 3607101506 dev dtt-seed proto 157 && ip nexthop add id 3607101507 group 3607101506,3 type resilient buckets 16 proto 157");
    for n in ["alice", "bob", "carol"] {
        lab.start_with_env(n, &[("DETOUR_CAPTURE_SEEDS", &d)]);
    }
    for (n, others) in [("alice", ["bob", "carol"]), ("bob", ["alice", "carol"]), ("carol", ["alice", "bob"])] {
        lab.wait_up(n, &others, UP);
    }
    assert_eq!(lab.ok("alice", "ip nexthop show proto 157").trim(), "", "the crashed run's nexthops are still there");
    let (bob_ns, bob_key) = (lab.host("bob").ns.clone(), lab.host("bob").key.clone());
    lab.ok("alice", &format!("ping -c 5 -i 0.1 -W 2 {}", lab.host("bob").overlay_v4()));
    lab.ok("alice", &format!("ping -c 3 -i 0.1 -s 1200 -W 2 {}", lab.host("bob").overlay_v6()));

    // management messages and bad API datagrams
    let bob_id = String::from_utf8(std::process::Command::new(bin("detourctl")).arg("nodeid").arg(&bob_key).output().unwrap().stdout).unwrap().trim().to_string();
    let out = lab.ok("alice", &format!("python3 {API_CHECK} 7722 {bob_id}"));
    assert!(out.contains("all checks passed"), "{out}");

    // TCP to bob's port 9100 is rejected with host unreachable in the router: the ICMP
    // error goes through NFQUEUE, the connection is looked up with sock_diag and moved
    // to a relay (carol forwards)
    let (a, b) = (lab.host("alice").underlay_v4(), lab.host("bob").underlay_v4());
    let o = lab.sh(&lab.router, &format!("iptables -I FORWARD -s {a} -d {b} -p tcp --dport 9100 -j REJECT --reject-with icmp-host-unreachable"));
    assert!(o.ok, "{}", o.stderr);
    let mut sink = std::process::Command::new("ip").args(["netns", "exec", &bob_ns, "python3", TCPCHECK, "server", "9100"]).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(400));
    let o = lab.sh(&lab.host("alice").ns, &format!("python3 {TCPCHECK} client {b} 9100 300000"));
    let _ = sink.kill();
    let _ = sink.wait();
    assert!(o.ok && o.stdout.starts_with("ok"), "{}{}", o.stdout, o.stderr);
    for n in ["alice", "bob", "carol"] {
        assert!(lab.stop(n), "{n} did not stop cleanly");
    }

    // every target got real inputs, and each is what its parser expects
    let mut count = HashMap::new();
    for t in TARGETS {
        let seeds = files(&dir.join(t));
        assert!(!seeds.is_empty(), "no {t} input was captured: {:?}", std::fs::read_dir(&dir).map(|r| r.flatten().map(|e| e.file_name()).collect::<Vec<_>>()));
        count.insert(t, seeds.len());
        let ok = seeds
            .iter()
            .filter(|(_, s)| match t {
                // mode byte 0, then a datagram of a known version and kind
                "decapsulate" => s.len() > 1 + detour::wire::OVERHEAD && s[0] == 0 && detour::wire::Header::decode(&s[1..]).is_ok(),
                "probe" => Probe::decode(s).is_ok(),
                "mgmt_frame" => mgmt::decode(s).is_ok(),
                "api" => api::parse(s).is_ok(),
                "icmp" => {
                    let mut f = Filter::default();
                    f.protected.insert(format!("{b}/32").parse().unwrap(), 0);
                    f.local.insert(a.parse().unwrap());
                    matches!(f.classify(s), Verdict::Reroute { .. })
                }
                "sock_diag" => {
                    let mut conns = Vec::new();
                    !matches!(sockdiag::parse_batch(&s[1..], s[0] == 1, &mut conns), sockdiag::Step::Failed(_))
                }
                "nexthop" => s.len() > 2 && nexthop::decode(u16::from_le_bytes([s[0], s[1]]), &s[2..], &HashMap::new()).is_some(),
                "config" => std::str::from_utf8(s).is_ok_and(|text| Config::parse(text, "seed.toml").is_ok()),
                _ => unreachable!(),
            })
            .count();
        // the API check sends bad datagrams on purpose; everything else must parse
        if t == "api" || t == "icmp" || t == "sock_diag" {
            assert!(ok >= 1, "no captured {t} input parses: {seeds:?}");
        } else {
            assert_eq!(ok, seeds.len(), "captured {t} inputs that do not parse");
        }
    }
    println!("captured seeds per target: {count:?}");

    if let Ok(to) = std::env::var("DETOUR_SEEDS_TO") {
        for t in TARGETS {
            let out = Path::new(&to).join(t);
            std::fs::create_dir_all(&out).unwrap();
            for old in files(&out).into_iter().filter(|(p, _)| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("real-"))) {
                std::fs::remove_file(old.0).unwrap();
            }
            for (k, (_, data)) in files(&dir.join(t)).into_iter().enumerate() {
                std::fs::write(out.join(format!("real-{k:02}")), data).unwrap();
            }
        }
        println!("seeds written to {to}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
