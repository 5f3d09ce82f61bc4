//! Relay forwarding in the kernel (`kernel.relay_forwarding`, issue 14 item 4).
//!
//! A relay forwards a datagram for another node without opening it: by the header's
//! source and destination node IDs (`docs/wire.md`) to the destination's underlay address.
//! The data thread does that with GRO and GSO, but every byte still crosses into user space
//! and back (two copies and a wake-up per batch: 0.12 CPU s per Gbit, and on a small machine
//! that CPU is taken from the endpoints). This module mirrors the relay pairs the node
//! agreed ([`DataCommand::SetRelay`], [`DataCommand::ClearRelay`]) into one nftables table
//! of family `netdev`: per direction, one rule on the ingress hook of the interface the
//! source is reached through matches the source's address, this node's data port and both
//! node IDs, rewrites the addresses and ports (the kernel updates the checksums) and sends
//! the datagram out of the interface towards the destination (`fwd ... to NEXT_HOP device
//! DEV`). detourd is never woken. Datagrams no rule matches (another address family on the
//! two sides, an asymmetric route, a new pair before its rule is in) still reach the data
//! thread, which forwards them as before; the hop limit is not decremented in the kernel,
//! which cannot loop: the rule sends to the destination node itself.
//!
//! The table is rebuilt whole, in one `nft -f` transaction, whenever a pair comes or goes, on
//! a thread of its own (nft blocks). Its rule counters are read once a second and added to
//! the node's relayed packet and byte counters, so `detourctl status` and the metrics count
//! both paths (the kernel counts whole IP packets). The table is removed at exit and, after
//! a crash, at the next start.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::dataplane::{DataCommand, NodeCounters};
use crate::identity::NodeId;

/// The table's name for a node whose data port is `port` (one table per daemon).
pub fn table_name(port: u16) -> String {
    format!("detour-relay-{port}")
}

/// Removes the table of `port` if it exists; idempotent.
pub fn remove(port: u16) {
    let _ = nft(&script(&table_name(port), port, &[]));
}

/// One direction of an agreed relay pair, with the routes it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Source node ID (header bytes 4..20).
    pub src: NodeId,
    /// Destination node ID (header bytes 20..36).
    pub dst: NodeId,
    /// The source's underlay address (datagrams must come from it).
    pub from: IpAddr,
    /// The interface datagrams from `from` arrive on.
    pub in_dev: String,
    /// The destination's underlay address and port.
    pub to: SocketAddr,
    /// This node's address towards `to` (the new source address).
    pub via_src: IpAddr,
    /// The next hop towards `to` (`to` itself when directly connected).
    pub next_hop: IpAddr,
    /// The interface towards `to`.
    pub out_dev: String,
}

fn hex(id: &NodeId) -> String {
    id.0.iter().map(|b| format!("{b:02x}")).collect()
}

/// The `nft -f` input that replaces table `table` with `rules` (for data port `port`), in
/// one transaction; with no rules, the table is removed. Rules whose addresses mix
/// families are left out (user space forwards them).
pub fn script(table: &str, port: u16, rules: &[Rule]) -> String {
    let mut s = format!("add table netdev {table}\ndelete table netdev {table}\n");
    let rules: Vec<&Rule> = rules.iter().filter(|r| [r.to.ip(), r.via_src, r.next_hop].iter().all(|a| a.is_ipv4() == r.from.is_ipv4())).collect();
    if rules.is_empty() {
        return s;
    }
    let mut by_dev: BTreeMap<&str, Vec<&Rule>> = BTreeMap::new();
    for r in rules {
        by_dev.entry(r.in_dev.as_str()).or_default().push(r);
    }
    let _ = writeln!(s, "table netdev {table} {{");
    for (i, (dev, rules)) in by_dev.into_iter().enumerate() {
        let _ = writeln!(s, "  chain in{i} {{\n    type filter hook ingress device \"{dev}\" priority -500; policy accept;");
        for r in rules {
            let (fam, fwd) = if r.from.is_ipv4() { ("ip", "ip") } else { ("ip6", "ip6") };
            // Transport-header offsets in bits: the UDP header is 8 bytes; the node IDs
            // follow 4 bytes of version, type, flags and hop limit.
            let _ = writeln!(
                s,
                "    {fam} saddr {from} udp dport {port} @th,96,128 0x{src} @th,224,128 0x{dst} counter {fam} saddr set {via} {fam} daddr set {to} udp sport set {port} udp dport set {to_port} fwd {fwd} to {nh} device \"{out}\"",
                from = r.from,
                src = hex(&r.src),
                dst = hex(&r.dst),
                via = r.via_src,
                to = r.to.ip(),
                to_port = r.to.port(),
                nh = r.next_hop,
                out = r.out_dev,
            );
        }
        let _ = writeln!(s, "  }}");
    }
    s + "}\n"
}

/// Packets and bytes counted by all rules of `json` (`nft -j list table ...` output).
pub fn counted(json: &str) -> Option<(u64, u64)> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let mut total = (0, 0);
    for item in v.get("nftables")?.as_array()? {
        let Some(exprs) = item.get("rule").and_then(|r| r.get("expr")).and_then(|e| e.as_array()) else { continue };
        for e in exprs {
            if let Some(c) = e.get("counter") {
                total.0 += c.get("packets").and_then(|p| p.as_u64()).unwrap_or(0);
                total.1 += c.get("bytes").and_then(|p| p.as_u64()).unwrap_or(0);
            }
        }
    }
    Some(total)
}

fn nft(input: &str) -> Result<()> {
    let mut child = Command::new("nft").args(["-f", "-"]).stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().context("running nft")?;
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write;
        stdin.write_all(input.as_bytes()).context("writing to nft")?;
    }
    let out = child.wait_with_output().context("running nft")?;
    if !out.status.success() {
        bail!("nft refused: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// The route detour's own packets (firewall mark `fwmark`) take to `to`: (device, next hop,
/// source address), from `ip -j route get`.
fn route(to: IpAddr, fwmark: u32) -> Result<(String, IpAddr, IpAddr)> {
    let out = Command::new("ip").args(["-j", "route", "get", &to.to_string(), "mark", &fwmark.to_string()]).output().context("running ip")?;
    if !out.status.success() {
        bail!("no route to {to}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("reading ip's route")?;
    let r = v.get(0).context("no route")?;
    let field = |k: &str| r.get(k).and_then(|x| x.as_str());
    if field("type").is_some_and(|t| t != "unicast") {
        bail!("{to} is not reached through a unicast route");
    }
    let dev = field("dev").context("route without a device")?.to_string();
    let next_hop = field("gateway").map(|g| g.parse()).transpose().context("gateway")?.unwrap_or(to);
    let src = field("prefsrc").context("route without a source address")?.parse().context("prefsrc")?;
    Ok((dev, next_hop, src))
}

enum Msg {
    Set { a: NodeId, a_addr: SocketAddr, b: NodeId, b_addr: SocketAddr },
    Clear { a: NodeId, b: NodeId },
}

/// The thread that keeps the table in step with the node's relay pairs.
pub struct KernelRelay {
    tx: mpsc::Sender<Msg>,
}

impl KernelRelay {
    /// Removes a table left by an earlier run and starts the thread; `port` is the data
    /// port, `fwmark` detour's own firewall mark (its packets follow the main table),
    /// `node` the counters the kernel's forwarding is added to.
    ///
    /// # Errors
    /// If nft is missing or the kernel refuses a `netdev` table (then user space relays).
    pub fn start(port: u16, fwmark: u32, node: Arc<NodeCounters>) -> Result<KernelRelay> {
        nft(&script(&table_name(port), port, &[])).context("nftables netdev tables")?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new().name("detour-kfwd".into()).spawn(move || run(port, fwmark, node, rx)).context("starting the kernel relay thread")?;
        Ok(KernelRelay { tx })
    }

    /// Looks at a command for the data thread: relay pairs are mirrored into the kernel.
    pub fn observe(&self, cmd: &DataCommand) {
        let msg = match cmd {
            DataCommand::SetRelay { a, a_addr, b, b_addr } => Msg::Set { a: *a, a_addr: *a_addr, b: *b, b_addr: *b_addr },
            DataCommand::ClearRelay { a, b } => Msg::Clear { a: *a, b: *b },
            _ => return,
        };
        let _ = self.tx.send(msg);
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

fn run(port: u16, fwmark: u32, node: Arc<NodeCounters>, rx: mpsc::Receiver<Msg>) {
    let table = table_name(port);
    let mut pairs: BTreeMap<(NodeId, NodeId), (SocketAddr, SocketAddr)> = BTreeMap::new();
    let mut last = (0u64, 0u64);
    let mut installed = false;
    // Adds what the rules counted since the last look to the node's counters.
    let harvest = |last: &mut (u64, u64)| {
        let Ok(out) = Command::new("nft").args(["-j", "list", "table", "netdev", &table]).output() else { return };
        let Some((p, b)) = counted(&String::from_utf8_lossy(&out.stdout)) else { return };
        node.relayed_packets.fetch_add(p.saturating_sub(last.0), Relaxed);
        node.relayed_bytes.fetch_add(b.saturating_sub(last.1), Relaxed);
        *last = (p, b);
    };
    loop {
        let mut changed = false;
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(m) => {
                let mut apply = |m: Msg| match m {
                    Msg::Set { a, a_addr, b, b_addr } => pairs.insert((a, b), (canonical(a_addr), canonical(b_addr))).is_none_or(|old| old != (canonical(a_addr), canonical(b_addr))),
                    Msg::Clear { a, b } => pairs.remove(&(a, b)).is_some(),
                };
                changed |= apply(m);
                while let Ok(m) = rx.try_recv() {
                    changed |= apply(m);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                if installed {
                    harvest(&mut last);
                }
                remove(port);
                return;
            }
        }
        if !changed {
            if installed {
                harvest(&mut last);
            }
            continue;
        }
        let mut rules = Vec::new();
        for (&(a, b), &(a_addr, b_addr)) in &pairs {
            for (src, dst, from, to) in [(a, b, a_addr, b_addr), (b, a, b_addr, a_addr)] {
                let routes = route(from.ip(), fwmark).and_then(|(in_dev, _, _)| route(to.ip(), fwmark).map(|out| (in_dev, out)));
                match routes {
                    Ok((in_dev, (out_dev, next_hop, via_src))) => rules.push(Rule { src, dst, from: from.ip(), in_dev, to, via_src, next_hop, out_dev }),
                    Err(e) => tracing::debug!("kernel relay {from} -> {to}: {e:#}; the data thread forwards it"),
                }
            }
        }
        // What the old rules counted while the routes were looked up (one `ip route get`
        // per end: tens of ms with many pairs) is taken right before the rebuild resets it.
        if installed {
            harvest(&mut last);
        }
        match nft(&script(&table, port, &rules)) {
            Ok(()) => {
                installed = !rules.is_empty();
                last = (0, 0);
                tracing::debug!("kernel relay: {} rules", rules.len());
            }
            Err(e) => tracing::warn!("kernel relay: {e:#}; the data thread forwards"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(from: &str, to: &str) -> Rule {
        Rule {
            src: NodeId([0x11; 16]),
            dst: NodeId([0xab; 16]),
            from: from.parse().unwrap(),
            in_dev: "eth0".into(),
            to: to.parse().unwrap(),
            via_src: if from.contains(':') { "fd00::3".parse().unwrap() } else { "10.0.3.2".parse().unwrap() },
            next_hop: if from.contains(':') { "fd00::1".parse().unwrap() } else { "10.0.3.1".parse().unwrap() },
            out_dev: "eth1".into(),
        }
    }

    #[test]
    fn the_script_replaces_the_table_with_one_rule_per_direction() {
        let s = script("detour-relay-7720", 7720, &[rule("10.0.1.2", "10.0.2.2:7720"), rule("fd00::2", "[fd00::5]:7000")]);
        assert!(s.starts_with("add table netdev detour-relay-7720\ndelete table netdev detour-relay-7720\ntable netdev detour-relay-7720 {\n"), "{s}");
        assert!(s.contains("chain in0 {\n    type filter hook ingress device \"eth0\" priority -500; policy accept;"), "{s}");
        let src = "11".repeat(16);
        let dst = "ab".repeat(16);
        assert!(s.contains(&format!("ip saddr 10.0.1.2 udp dport 7720 @th,96,128 0x{src} @th,224,128 0x{dst} counter ip saddr set 10.0.3.2 ip daddr set 10.0.2.2 udp sport set 7720 udp dport set 7720 fwd ip to 10.0.3.1 device \"eth1\"")), "{s}");
        assert!(s.contains("ip6 saddr fd00::2 udp dport 7720") && s.contains("ip6 daddr set fd00::5 udp sport set 7720 udp dport set 7000 fwd ip6 to fd00::1 device \"eth1\""), "{s}");
        assert_eq!(s.matches("counter").count(), 2);
    }

    #[test]
    fn no_rules_or_mixed_families_leave_only_the_removal() {
        let mut mixed = rule("10.0.1.2", "[fd00::5]:7720");
        mixed.via_src = "fd00::3".parse().unwrap();
        for rules in [vec![], vec![mixed]] {
            assert_eq!(script("t", 7720, &rules), "add table netdev t\ndelete table netdev t\n");
        }
    }

    #[test]
    fn counters_are_summed_over_the_rules() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"table": {"family": "netdev", "name": "t"}},
            {"rule": {"expr": [{"match": {}}, {"counter": {"packets": 3, "bytes": 4500}}, {"fwd": {}}]}},
            {"rule": {"expr": [{"counter": {"packets": 2, "bytes": 100}}]}}]}"#;
        assert_eq!(counted(json), Some((5, 4600)));
        assert_eq!(counted("garbage"), None);
        assert_eq!(counted(r#"{"nftables": []}"#), Some((0, 0)));
    }
}
