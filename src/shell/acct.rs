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
pub const CHAIN: &str = "DETOUR-ACCT";
/// The pin-restoring chain, in `OUTPUT` and `PREROUTING`.
pub const PIN_CHAIN: &str = "DETOUR-PIN";

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
    netfilter::remove_chains(&CHAINS);
}

/// (table, chain) of every chain of this module.
pub const CHAINS: [(&str, &str); 2] = [("mangle", CHAIN), ("mangle", PIN_CHAIN)];

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
    pub fn install(&mut self, fwmark: u32) -> Result<()> {
        self.fwmark = fwmark;
        let input = format!("*mangle\n:{CHAIN} - [0:0]\n:{PIN_CHAIN} - [0:0]\n-A POSTROUTING -j {CHAIN}\n-A OUTPUT -j {PIN_CHAIN}\n-A PREROUTING -j {PIN_CHAIN}\nCOMMIT\n");
        for v6 in [false, true] {
            if let Err(e) = netfilter::restore(v6, &input) {
                remove();
                bail!("the accounting and pin chains were refused: {e:#}");
            }
        }
        self.installed = true;
        Ok(())
    }

    /// The four iptables rules of one destination, as (IPv6, arguments after `-t mangle
    /// -A|-D`): counting, the two pin-saving ones, pin-restoring.
    fn specs(&self, r: &Rule) -> Vec<(bool, Vec<String>)> {
        let own = self.fwmark.to_string();
        let mask = format!("{PIN_MASK:#x}");
        let unpinned = format!("0x0/{PIN_MASK:#x}");
        let v6 = r.dst.addr().is_ipv6();
        let dst = r.dst.to_string();
        let v = |a: &[&str]| a.iter().map(|x| x.to_string()).collect::<Vec<String>>();
        let save = |out: &[&str], pin: u32| {
            let mut a = v(&[CHAIN, "-d", &dst]);
            a.extend(v(out));
            a.extend(v(&["-m", "mark", "!", "--mark", &own, "-m", "connmark", "--mark", &unpinned, "-j", "CONNMARK", "--set-xmark", &format!("{pin:#x}/{PIN_MASK:#x}")]));
            a
        };
        vec![
            (v6, v(&[CHAIN, "-d", &dst, "!", "-o", &r.tun])),
            (v6, save(&["-o", &r.tun], PIN_OVERLAY)),
            (v6, save(&["!", "-o", &r.tun], PIN_DIRECT)),
            (v6, v(&[PIN_CHAIN, "-d", &dst, "-m", "mark", "!", "--mark", &own, "-j", "CONNMARK", "--restore-mark", "--nfmask", &mask, "--ctmask", &mask])),
        ]
    }

    /// Makes the chains hold exactly the rules of `rules`, changing only the destinations
    /// that changed: the others keep their counters, and their pins are restored without
    /// a gap.
    ///
    /// # Errors
    /// iptables failures (what failed is retried at the next call).
    pub fn set(&mut self, rules: Vec<Rule>) -> Result<()> {
        if !self.installed || rules == self.rules {
            return Ok(());
        }
        let run = |v6: bool, op: &str, spec: &[String]| -> Result<()> {
            let mut a: Vec<&str> = vec!["-t", "mangle", op];
            a.extend(spec.iter().map(String::as_str));
            let o = netfilter::run(v6, &a)?;
            if !o.status.success() {
                bail!("iptables {}: {}", a.join(" "), String::from_utf8_lossy(&o.stderr).trim());
            }
            Ok(())
        };
        let gone: Vec<Rule> = self.rules.iter().filter(|r| !rules.contains(r)).cloned().collect();
        for r in gone {
            for (v6, spec) in self.specs(&r) {
                let _ = run(v6, "-D", &spec);
            }
            self.rules.retain(|x| *x != r);
        }
        for r in rules {
            if self.rules.contains(&r) {
                continue;
            }
            let specs = self.specs(&r);
            for (k, (v6, spec)) in specs.iter().enumerate() {
                if let Err(e) = run(*v6, "-A", spec) {
                    for (v6, spec) in &specs[..k] {
                        let _ = run(*v6, "-D", spec);
                    }
                    return Err(e);
                }
            }
            self.rules.push(r);
        }
        Ok(())
    }

    /// Bytes counted per peer (cumulative since the rules were last rebuilt), as
    /// (peer, bytes) per rule.
    ///
    /// # Errors
    /// iptables failures.
    pub fn read(&self) -> Result<Vec<(usize, u64)>> {
        let mut out = Vec::new();
        for v6 in [false, true] {
            let rules: Vec<&Rule> = self.rules.iter().filter(|r| r.dst.addr().is_ipv6() == v6).collect();
            if rules.is_empty() {
                continue;
            }
            let o = netfilter::run(v6, &["-t", "mangle", "-L", CHAIN, "-v", "-x", "-n"])?;
            let text = String::from_utf8_lossy(&o.stdout);
            // Two header lines, then one line per rule in order: pkts bytes ...; the
            // counting rules are the ones without a target, in the order they were added.
            let counts: Vec<u64> = text.lines().skip(2).filter(|l| !l.contains("CONNMARK")).filter_map(|l| l.split_whitespace().nth(1)?.parse().ok()).collect();
            for (r, b) in rules.iter().zip(counts) {
                out.push((r.peer, b));
            }
        }
        Ok(out)
    }
}

/// The sysctls that choose how the kernel hashes a packet onto a multipath nexthop.
const HASH_POLICY: [&str; 2] = ["/proc/sys/net/ipv4/fib_multipath_hash_policy", "/proc/sys/net/ipv6/fib_multipath_hash_policy"];

/// Makes the kernel hash flows by their ports too (policy 1, layer 4), so that the
/// connections between two hosts spread over a resilient group's buckets: with the
/// default (policy 0, addresses only) every connection to a peer would share one bucket.
/// Only a policy of 0 is changed; returns the sysctls changed, for
/// [`restore_hash_policy`].
pub fn set_hash_policy() -> Vec<&'static str> {
    let mut changed = Vec::new();
    for p in HASH_POLICY {
        match std::fs::read_to_string(p) {
            Ok(v) if v.trim() == "0" => match std::fs::write(p, "1") {
                Ok(()) => changed.push(p),
                Err(e) => tracing::warn!("REPLEX: cannot set {p} to 1 (layer-4 hashing): {e}; all connections to a peer will share one kernel bucket"),
            },
            Ok(_) => {}
            Err(e) => tracing::debug!("{p}: {e}"),
        }
    }
    changed
}

/// Puts back the policy [`set_hash_policy`] changed.
pub fn restore_hash_policy(changed: &[&str]) {
    for p in changed {
        if let Err(e) = std::fs::write(p, "0") {
            tracing::warn!("cleanup: restoring {p}: {e}");
        }
    }
}
