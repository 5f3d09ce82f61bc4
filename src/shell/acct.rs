//! The netfilter side of REPLEX splits in the kernel, in the mangle table:
//!
//! * byte accounting: how much of the traffic to a peer's protected destinations the
//!   resilient nexthop group sent on the direct path (the part that never enters detour).
//!   One rule per destination in chain `DETOUR-ACCT`, jumped to from `POSTROUTING`,
//!   counting packets to the destination that do not leave through the peer's TUN;
//! * connection pinning: after a new connection's first packet has been routed (by the
//!   group), the same chain saves the path it took in the connection mark
//!   ([`PIN_DIRECT`] or [`PIN_OVERLAY`]); chain `DETOUR-PIN`, jumped to from `OUTPUT` and
//!   `PREROUTING`, restores it on every later packet, and the pin rules route it there.
//!   The group alone cannot keep a connection on its path: it only sees route lookups,
//!   and a local socket caches its route, so its bucket looks idle and may move.
//!
//! Detour's own packets (its firewall mark) are left alone. Both chains are removed at exit
//! and after a crash on the next start.

use crate::shell::netfilter;
use anyhow::{bail, Result};
use ipnet::IpNet;

use crate::kernel::{PIN_DIRECT, PIN_MASK, PIN_OVERLAY};

/// The accounting (and pin-saving) chain, in `POSTROUTING`.
pub fn chain() -> String {
    netfilter::named("DETOUR-ACCT")
}
/// The pin-restoring chain, in `OUTPUT` and `PREROUTING`.
pub fn pin_chain() -> String {
    netfilter::named("DETOUR-PIN")
}

/// One counting rule: bytes to `dst` not leaving through `tun`, for `peer`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Peer index.
    pub peer: usize,
    /// Destination.
    pub dst: IpNet,
    /// The peer's TUN.
    pub tun: String,
}

/// Removes the chains and the jumps to them; idempotent.
pub fn remove() {
    netfilter::remove_chains(&chains());
}

/// (table, chain) of every chain of this module.
pub fn chains() -> Vec<(&'static str, String)> {
    vec![("mangle", chain()), ("mangle", pin_chain())]
}

/// The accounting rules in the kernel.
#[derive(Debug, Default)]
pub struct Accounting {
    rules: Vec<Rule>,
    installed: bool,
    fwmark: u32,
}

impl Accounting {
    /// Creates the (empty) chains and the jumps to them; packets with `fwmark` (detour's
    /// own) are never pinned.
    ///
    /// # Errors
    /// If iptables is missing or refuses.
    pub fn install(&mut self, keeper: &netfilter::Keeper, fwmark: u32) -> Result<()> {
        self.fwmark = fwmark;
        let (c, p) = (chain(), pin_chain());
        let input = format!("*mangle\n:{c} - [0:0]\n:{p} - [0:0]\n-A POSTROUTING -j {c}\n-A OUTPUT -j {p}\n-A PREROUTING -j {p}\nCOMMIT\n");
        for v6 in [false, true] {
            if let Err(e) = keeper.restore(v6, &input) {
                remove();
                bail!("the accounting and pin chains were refused: {e:#}");
            }
        }
        self.installed = true;
        Ok(())
    }

    /// The six iptables rules of one destination, as (IPv6, arguments after `-t mangle
    /// -A|-D`): counting, the two pin-saving ones, the two pinning connections that were
    /// established before the split to the direct path, pin-restoring.
    fn specs(&self, r: &Rule) -> Vec<(bool, Vec<String>)> {
        let own = self.fwmark.to_string();
        let mask = format!("{PIN_MASK:#x}");
        let unpinned = format!("0x0/{PIN_MASK:#x}");
        let v6 = r.dst.addr().is_ipv6();
        let dst = r.dst.to_string();
        let v = |a: &[&str]| a.iter().map(|x| x.to_string()).collect::<Vec<String>>();
        let (acct, pin) = (chain(), pin_chain());
        let (acct, pin) = (acct.as_str(), pin.as_str());
        let save = |out: &[&str], pin: u32| {
            let mut a = v(&[acct, "-d", &dst]);
            a.extend(v(out));
            a.extend(v(&["-m", "mark", "!", "--mark", &own, "-m", "connmark", "--mark", &unpinned, "-j", "CONNMARK", "--set-xmark", &format!("{pin:#x}/{PIN_MASK:#x}")]));
            a
        };
        // Pins unpinned connections in conntrack state `state` (and matching `matches`) to
        // the direct path.
        let keep_direct = |matches: &[&str], state: &str| {
            let mut a = v(&[pin, "-d", &dst]);
            a.extend(v(matches));
            a.extend(v(&[
                "-m",
                "mark",
                "!",
                "--mark",
                &own,
                "-m",
                "conntrack",
                "--ctstate",
                state,
                "-m",
                "connmark",
                "--mark",
                &unpinned,
                "-j",
                "CONNMARK",
                "--set-xmark",
                &format!("{PIN_DIRECT:#x}/{PIN_MASK:#x}"),
            ]));
            a
        };
        vec![
            (v6, v(&[acct, "-d", &dst, "!", "-o", &r.tun])),
            (v6, save(&["-o", &r.tun], PIN_OVERLAY)),
            (v6, save(&["!", "-o", &r.tun], PIN_DIRECT)),
            // A connection established before the split began is unpinned: it stays on the
            // direct path (only new connections are split) instead of following whichever
            // bucket its next packet hashes to.
            (v6, keep_direct(&[], "ESTABLISHED,RELATED")),
            // The same for a TCP connection that connection tracking only picks up now, in
            // the middle (conntrack runs in a namespace only once a rule needs it, and these
            // are the first): its first packet seen is NEW, but not a SYN.
            (v6, keep_direct(&["-p", "tcp", "!", "--syn"], "NEW")),
            (v6, v(&[pin, "-d", &dst, "-m", "mark", "!", "--mark", &own, "-j", "CONNMARK", "--restore-mark", "--nfmask", &mask, "--ctmask", &mask])),
        ]
    }

    /// The `iptables-restore --noflush` input that turns the rules of family `v6` from
    /// `old` into `new`: `-D` for the destinations gone, `-A` for the new ones; `None`
    /// when nothing changes in that family. The destinations kept keep their counters and
    /// their pins without a gap.
    pub fn diff_script(&self, old: &[Rule], new: &[Rule], v6: bool) -> Option<String> {
        let mut lines = Vec::new();
        for r in old.iter().filter(|r| r.dst.addr().is_ipv6() == v6 && !new.contains(r)) {
            lines.extend(self.specs(r).into_iter().map(|(_, spec)| format!("-D {}", spec.join(" "))));
        }
        for r in new.iter().filter(|r| r.dst.addr().is_ipv6() == v6 && !old.contains(r)) {
            lines.extend(self.specs(r).into_iter().map(|(_, spec)| format!("-A {}", spec.join(" "))));
        }
        (!lines.is_empty()).then(|| format!("*mangle\n{}\nCOMMIT\n", lines.join("\n")))
    }

    /// The input that rebuilds both chains of family `v6` with exactly `rules` (after
    /// someone changed them by hand, so that a `-D` no longer matched).
    pub fn rebuild_script(&self, rules: &[Rule], v6: bool) -> String {
        let mut s = format!("*mangle\n-F {}\n-F {}\n", chain(), pin_chain());
        for r in rules.iter().filter(|r| r.dst.addr().is_ipv6() == v6) {
            for (_, spec) in self.specs(r) {
                s += &format!("-A {}\n", spec.join(" "));
            }
        }
        s + "COMMIT\n"
    }

    /// Makes the chains hold exactly the rules of `rules`, changing only the destinations
    /// that changed, in one atomic `iptables-restore` per family (rebuilding the chains
    /// when the change does not apply). Blocks for as long as iptables waits for its lock:
    /// run it on the accounting thread ([`Worker`]), never on the control loop.
    ///
    /// # Errors
    /// iptables failures (the change is tried again at the next call).
    pub fn set(&mut self, rules: Vec<Rule>) -> Result<()> {
        if !self.installed || rules == self.rules {
            return Ok(());
        }
        for v6 in [false, true] {
            let Some(script) = self.diff_script(&self.rules, &rules, v6) else { continue };
            if let Err(e) = netfilter::restore(v6, &script) {
                tracing::debug!("accounting: {e:#}; rebuilding the chains");
                netfilter::restore(v6, &self.rebuild_script(&rules, v6))?;
            }
        }
        self.rules = rules;
        Ok(())
    }

    /// Bytes counted per peer (cumulative since the rules were last rebuilt), as
    /// (peer, bytes) per rule, from `iptables-save -c` (no lock needed).
    ///
    /// # Errors
    /// iptables failures.
    pub fn read(&self) -> Result<Vec<(usize, u64)>> {
        let mut out = Vec::new();
        for v6 in [false, true] {
            let rules: Vec<Rule> = self.rules.iter().filter(|r| r.dst.addr().is_ipv6() == v6).cloned().collect();
            if rules.is_empty() {
                continue;
            }
            out.extend(counts(&netfilter::save_counters(v6, "mangle")?, &rules));
        }
        Ok(out)
    }
}

/// The byte counts of the counting rules of `rules` in `iptables-save -c` output `save`,
/// as (peer, bytes): a counting rule is `[packets:bytes] -A DETOUR-ACCT -d DST ! -o TUN`
/// with no target. Rules someone else added to the chain, and the pin-saving rules, are
/// not counted; a rule missing from `save` counts nothing.
pub fn counts(save: &str, rules: &[Rule]) -> Vec<(usize, u64)> {
    let mut found: Vec<(String, u64)> = Vec::new();
    for line in save.lines() {
        let Some(rest) = line.strip_prefix('[') else { continue };
        let Some((ctr, rule)) = rest.split_once("] ") else { continue };
        let Some(bytes) = ctr.split_once(':').and_then(|(_, b)| b.parse::<u64>().ok()) else { continue };
        if rule.starts_with(&format!("-A {} ", chain())) && !rule.contains(" -j ") {
            found.push((rule.to_string(), bytes));
        }
    }
    rules
        .iter()
        .filter_map(|r| {
            let want = format!("-A {} -d {} ! -o {}", chain(), r.dst, r.tun);
            found.iter().find(|(rule, _)| *rule == want).map(|(_, b)| (r.peer, *b))
        })
        .collect()
}

/// What the accounting thread reports after applying a set of rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The rules now in the kernel (their pins are in place: a split of their
    /// destinations may be routed).
    pub installed: Vec<Rule>,
    /// Bytes counted per rule, as (peer, bytes); `None` when the counters could not be read.
    pub counts: Option<Vec<(usize, u64)>>,
}

/// The accounting thread: keeps the rules in step with the REPLEX splits and reads the
/// counters, off the control loop (iptables may wait for its lock for
/// [`netfilter::XTABLES_WAIT_S`]). The control loop hands it the rules it wants and takes
/// the reports when they come; neither side ever waits for the other.
pub struct Worker {
    want: std::sync::mpsc::Sender<Vec<Rule>>,
}

impl Worker {
    /// Starts the thread with `accounting` (installed). Each set of rules handed to
    /// [`Worker::update`] is applied (only the newest of those waiting), then the counts
    /// are read, and both are sent to `reports`.
    ///
    /// # Errors
    /// If the thread cannot be started.
    pub fn start(mut accounting: Accounting, reports: tokio::sync::mpsc::UnboundedSender<Report>) -> Result<Worker> {
        let (want, rx) = std::sync::mpsc::channel::<Vec<Rule>>();
        std::thread::Builder::new()
            .name("detour-acct".into())
            .spawn(move || {
                while let Ok(mut rules) = rx.recv() {
                    while let Ok(newer) = rx.try_recv() {
                        rules = newer;
                    }
                    if let Err(e) = accounting.set(rules) {
                        tracing::debug!("accounting: {e:#}");
                        continue;
                    }
                    let counts = accounting.read().map_err(|e| tracing::debug!("accounting: {e:#}")).ok();
                    if reports.send(Report { installed: accounting.rules.clone(), counts }).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| anyhow::anyhow!("starting the accounting thread: {e}"))?;
        Ok(Worker { want })
    }

    /// Hands the rules wanted now to the thread; never blocks.
    pub fn update(&self, rules: Vec<Rule>) {
        let _ = self.want.send(rules);
    }
}

/// The sysctls that choose how the kernel hashes a packet onto a multipath nexthop.
const HASH_POLICY: [&str; 2] = ["/proc/sys/net/ipv4/fib_multipath_hash_policy", "/proc/sys/net/ipv6/fib_multipath_hash_policy"];

/// Makes the kernel hash flows by their ports too (policy 1, layer 4), so that the
/// connections between two hosts spread over a resilient group's buckets: with the
/// default (policy 0, addresses only) every connection to a peer would share one bucket.
/// Only a policy of 0 is changed; returns the sysctls changed (their original values are
/// in [`crate::shell::sysctl`]'s state file, which puts them back) and why one could not
/// be set.
pub fn set_hash_policy() -> (Vec<&'static str>, Option<String>) {
    let mut changed = Vec::new();
    let mut failed: Vec<String> = Vec::new();
    for p in HASH_POLICY {
        // Only a policy of 0 is changed (1 may be another overlay instance's, shared).
        if std::fs::read_to_string(p).map(|v| !matches!(v.trim(), "0" | "1")).unwrap_or(true) {
            continue;
        }
        // The original value is recorded first (crate::shell::sysctl): a crash does not
        // leave it changed past the next start.
        match crate::shell::sysctl::set(p, "1") {
            Ok(true) => changed.push(p),
            Ok(false) => {}
            Err(e) => failed.push(format!("cannot set {p} to 1 (layer-4 hashing): {e:#}")),
        }
    }
    let failed = (!failed.is_empty()).then(|| format!("{}; all connections to a peer would share one kernel bucket", failed.join("; ")));
    (changed, failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(peer: usize, dst: &str, tun: &str) -> Rule {
        Rule { peer, dst: dst.parse().unwrap(), tun: tun.into() }
    }

    #[test]
    fn counters_come_from_the_saved_rules_of_the_chain_whatever_else_is_in_it() {
        let save = "*mangle\n:DETOUR-ACCT - [0:0]\n\
[3:300] -A DETOUR-ACCT -d 10.1.0.0/24 ! -o dt-bob\n\
[1:60] -A DETOUR-ACCT -d 10.1.0.0/24 -o dt-bob -m mark ! --mark 0x5 -j CONNMARK --set-xmark 0x1/0x3\n\
[9:999] -A DETOUR-ACCT -s 1.2.3.4/32\n\
[7:7000] -A DETOUR-ACCT -d 10.2.0.0/24 ! -o dt-carol\n\
[5:500] -A OTHER -d 10.1.0.0/24 ! -o dt-bob\nCOMMIT\n";
        let rules = [rule(0, "10.2.0.0/24", "dt-carol"), rule(1, "10.1.0.0/24", "dt-bob"), rule(2, "10.3.0.0/24", "dt-dave")];
        assert_eq!(counts(save, &rules), vec![(0, 7000), (1, 300)]);
        assert!(counts("garbage\n[x:y] -A DETOUR-ACCT\n[1:] -A\n", &rules).is_empty());
    }

    #[test]
    fn a_change_of_the_splits_touches_only_the_destinations_that_changed() {
        let a = Accounting { rules: Vec::new(), installed: true, fwmark: 7 };
        let old = [rule(0, "10.1.0.0/24", "dt-bob"), rule(1, "fd10:2::/64", "dt-carol")];
        let new = [rule(0, "10.1.0.0/24", "dt-bob"), rule(2, "10.3.0.0/24", "dt-dave")];
        let v4 = a.diff_script(&old, &new, false).unwrap();
        assert!(v4.starts_with("*mangle\n") && v4.ends_with("COMMIT\n"), "{v4}");
        assert_eq!(v4.lines().filter(|l| l.starts_with("-A ")).count(), 6, "six rules for the new destination: {v4}");
        assert!(v4.lines().filter(|l| l.starts_with("-A ")).all(|l| l.contains("10.3.0.0/24")), "{v4}");
        assert!(!v4.contains("-D "), "{v4}");
        let v6 = a.diff_script(&old, &new, true).unwrap();
        assert_eq!(v6.lines().filter(|l| l.starts_with("-D ")).count(), 6, "{v6}");
        assert!(!v6.contains("-A "), "{v6}");
        assert_eq!(a.diff_script(&new, &new, false), None);
        let rebuilt = a.rebuild_script(&new, false);
        assert!(rebuilt.contains(&format!("-F {}\n-F {}\n", chain(), pin_chain())), "{rebuilt}");
        assert_eq!(rebuilt.lines().filter(|l| l.starts_with("-A ")).count(), 12, "{rebuilt}");
        // the counting rule is written as iptables-save shows it, so counts() finds it
        assert!(rebuilt.contains("-A DETOUR-ACCT -d 10.3.0.0/24 ! -o dt-dave\n"), "{rebuilt}");
    }
}
