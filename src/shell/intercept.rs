//! ICMP interception (NFQUEUE) and TCP-stall monitoring: the I/O around
//! [`crate::path::icmp::Filter`].
//!
//! On this kernel NFQUEUE exists only through iptables (`NFT_QUEUE` is off), so detour puts
//! its rules in chains of its own, `DETOUR-ICMP` in `filter`/`INPUT` for IPv4 and IPv6, with
//! `--queue-bypass`: when detourd is not running, ICMP flows as if the rules did not exist.
//! The chains are removed on stop, and left-overs from a crash on the next start.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::shell::netfilter;
use anyhow::{bail, Context, Result};
use tokio::sync::mpsc;

use crate::path::icmp::{Filter, Ignored, Verdict};
use crate::shell::sockdiag;

/// The iptables chain detour owns ([`netfilter::named`] for this overlay instance).
pub fn chain() -> String {
    netfilter::named("DETOUR-ICMP")
}

/// What the interception and monitoring threads report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Alarm {
    /// An ICMP unreachable about one of the peer's protected destinations was caught.
    Icmp {
        /// Peer index.
        peer: usize,
        /// When the packet reached detour.
        at: Instant,
        /// The TCP SYN of a local connection the error quotes in full, to be sent again once
        /// the destination is rerouted ([`crate::path::icmp::quoted_syn`]).
        syn: Option<Vec<u8>>,
    },
    /// TCP connections to the peer's protected destinations keep timing out.
    TcpStall {
        /// Peer index.
        peer: usize,
    },
    /// Traffic to one of the peer's protected destinations left on the kernel's direct
    /// path (a rate-limited copy, see [`crate::shell::traffic`]).
    Traffic {
        /// Peer index.
        peer: usize,
    },
    /// A watched destination outside the overlay is unreachable (an ICMP unreachable about
    /// it, or a connection attempt that timed out).
    Outside {
        /// The destination.
        dst: IpAddr,
        /// As for [`Alarm::Icmp`].
        syn: Option<Vec<u8>>,
    },
}

/// Counters of the interception, for status output.
#[derive(Debug, Default)]
pub struct IcmpCounters {
    /// Errors dropped and acted on.
    pub rerouted: AtomicU64,
    /// Errors let through, by reason (see [`Ignored`]).
    pub ignored: [AtomicU64; 6],
    /// TCP stalls reported.
    pub tcp_stalls: AtomicU64,
    /// Traffic on the direct path reported for a peer ([`crate::shell::traffic`]).
    pub traffic_reports: AtomicU64,
    /// Packet copies from the traffic rules that matched no protected destination.
    pub traffic_ignored: AtomicU64,
}

impl IcmpCounters {
    fn ignore(&self, why: Ignored) {
        self.ignored[why as usize].fetch_add(1, Relaxed);
    }

    /// Non-zero "ignored" counters by name.
    pub fn ignored_snapshot(&self) -> Vec<(&'static str, u64)> {
        [Ignored::OtherType, Ignored::Malformed, Ignored::NotProtected, Ignored::NotOurs, Ignored::Protocol, Ignored::NoConnection]
            .iter()
            .map(|w| (w.as_str(), self.ignored[*w as usize].load(Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

/// Removes detour's chains (and the jumps to them) for both families; idempotent.
pub fn remove_rules() {
    netfilter::remove_chains(&chains());
}

/// (table, chain) of every chain of this module.
pub fn chains() -> Vec<(&'static str, String)> {
    vec![("filter", chain())]
}

/// Installs the rules that queue ICMP net/host unreachable (ICMPv6 no route / address
/// unreachable) to `queue` (left-overs of an earlier run are removed at start): the errors this
/// host receives (`INPUT`), and with `forward` (a router with networks behind it) the
/// errors it forwards to their hosts (`FORWARD`).
///
/// # Errors
/// If iptables is missing or refuses a rule.
pub fn install_rules(keeper: &netfilter::Keeper, queue: u16, mark: u32, forward: bool) -> Result<()> {
    let v4 = ["-p icmp --icmp-type network-unreachable", "-p icmp --icmp-type host-unreachable"];
    let v6 = ["-p ipv6-icmp --icmpv6-type no-route", "-p ipv6-icmp --icmpv6-type address-unreachable"];
    let c = chain();
    for (is_v6, matches) in [(false, v4), (true, v6)] {
        let mut input = format!("*filter\n:{c} - [0:0]\n");
        for m in matches {
            // An error another overlay's detourd on this host passed on (not one of its
            // destinations) carries that overlay's mark bit; this one's bit means it has
            // been here already.
            input += &format!("-A {c} -m mark ! --mark {mark:#x}/{mark:#x} {m} -j NFQUEUE --queue-num {queue} --queue-bypass\n");
        }
        for hook in if forward { &["INPUT", "FORWARD"][..] } else { &["INPUT"][..] } {
            input += &format!("-I {hook} 1 -j {c}\n");
        }
        input += "COMMIT\n";
        if let Err(e) = keeper.restore(is_v6, &input) {
            bail!("cannot add the NFQUEUE rules (is the kernel's NFQUEUE target available?): {e:#}");
        }
    }
    Ok(())
}

/// Starts the NFQUEUE thread. It lives until the process exits (its rules carry
/// `--queue-bypass`, so a stopped daemon never holds ICMP back). An error it does not act
/// on is handed back to the kernel with this overlay's bit `mark` set in the packet mark
/// and traversed again (`NF_REPEAT`): this overlay's rule now skips it, and the next
/// overlay's interception on this host sees it.
///
/// # Errors
/// If the queue cannot be opened or bound.
pub fn start_queue(queue: u16, mark: u32, filter: Arc<RwLock<Filter>>, counters: Arc<IcmpCounters>, alarms: mpsc::UnboundedSender<Alarm>) -> Result<()> {
    let mut q = nfq::Queue::open().context("opening NFQUEUE")?;
    q.bind(queue).with_context(|| format!("binding NFQUEUE {queue}"))?;
    q.set_fail_open(queue, true).context("NFQUEUE fail-open")?;
    q.set_copy_range(queue, 1024).context("NFQUEUE copy range")?;
    std::thread::Builder::new()
        .name("detour-icmp".into())
        .spawn(move || loop {
            let Ok(mut msg) = q.recv() else {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            };
            let at = Instant::now();
            super::capture::sample(super::capture::Target::Icmp, &[msg.get_payload()]);
            let verdict = filter.read().map(|f| f.classify(msg.get_payload())).unwrap_or(Verdict::Accept(Ignored::Malformed));
            let verdict = match verdict {
                // One more plausibility check: the quoted TCP connection must exist.
                Verdict::Reroute { tcp: Some((local, remote)), .. } if !sockdiag::tcp_exists(local, remote).unwrap_or(true) => Verdict::Accept(Ignored::NoConnection),
                v => v,
            };
            match verdict {
                Verdict::Reroute { peer, dst, tcp } => {
                    counters.rerouted.fetch_add(1, Relaxed);
                    // Only the SYN of a local connection (checked above with sock_diag) is
                    // sent again: a forged error cannot make this node send anything new.
                    let syn = tcp.and_then(|_| crate::path::icmp::quoted_syn(msg.get_payload()));
                    msg.set_verdict(nfq::Verdict::Drop);
                    let _ = alarms.send(if peer == crate::path::icmp::OUTSIDE { Alarm::Outside { dst, syn } } else { Alarm::Icmp { peer, at, syn } });
                }
                Verdict::Accept(why) => {
                    counters.ignore(why);
                    let m = msg.get_nfmark();
                    msg.set_nfmark(m | mark);
                    msg.set_verdict(nfq::Verdict::Repeat);
                }
            }
            if let Err(e) = q.verdict(msg) {
                tracing::warn!("NFQUEUE verdict: {e}");
            }
        })
        .context("starting the ICMP thread")?;
    Ok(())
}

/// How often the TCP monitor looks while no peer carries traffic (it looks every `every`
/// while one does, or while a stalled connection is seen): a stall needs traffic, and
/// reading `/proc/net/snmp` four times a second was a tenth of an idle node's CPU (issue 11).
pub const TCP_IDLE_POLL: Duration = Duration::from_secs(1);

/// Starts the TCP monitor thread: every `every` (every [`TCP_IDLE_POLL`] while no peer
/// carries traffic, `traffic`, which the engine keeps) it reads the host's
/// TCP connections and reports peers whose protected destinations have a connection that
/// timed out twice in a row (a SYN once), at most once a second per peer.
///
/// # Errors
/// If the thread cannot be started.
pub fn start_tcp_monitor(every: Duration, traffic: Arc<std::sync::atomic::AtomicBool>, filter: Arc<RwLock<Filter>>, counters: Arc<IcmpCounters>, alarms: mpsc::UnboundedSender<Alarm>) -> Result<()> {
    std::thread::Builder::new()
        .name("detour-tcpmon".into())
        .spawn(move || {
            let mut last: HashMap<usize, Instant> = HashMap::new();
            let mut outside_last: HashMap<IpAddr, Instant> = HashMap::new();
            // The counter as it stands at start: a first poll that found "moved" would dump
            // every socket of the host (sock_diag walks the kernel's whole connection hash,
            // shared by all namespaces: 2-4 ms of CPU), at every start of every daemon.
            let mut timeouts_seen = rto_timeouts();
            let mut watching = false;
            loop {
                let fast = watching || traffic.load(Relaxed);
                std::thread::sleep(if fast { every } else { every.max(TCP_IDLE_POLL) });
                if alarms.is_closed() {
                    return;
                }
                // A connection only stalls by retransmission timeouts: the kernel's count of
                // them (a cheap read) gates the socket dump, which walks the kernel's whole
                // connection hash (shared by all namespaces) and cost about 1.7 % of a core
                // when every fast retransmission of a busy healthy transfer triggered it. While a
                // stalled connection is seen, every poll dumps.
                let timeouts = rto_timeouts();
                let moved = timeouts.is_none() || timeouts != timeouts_seen;
                timeouts_seen = timeouts;
                if !moved && !watching {
                    continue;
                }
                let Ok(conns) = sockdiag::tcp_connections() else { continue };
                let Ok(f) = filter.read() else { continue };
                watching = false;
                for c in conns {
                    let stalled = match c.state {
                        sockdiag::TCP_ESTABLISHED => c.retransmits >= 2,
                        sockdiag::TCP_SYN_SENT => c.retransmits >= 1,
                        _ => false,
                    };
                    if !stalled {
                        continue;
                    }
                    watching = true;
                    let peer = match f.protected.lookup(c.remote.ip()) {
                        Some(&peer) => peer,
                        // A connection attempt to a watched outside destination: only new
                        // connections may move to an exit that masquerades.
                        None if c.state == sockdiag::TCP_SYN_SENT && f.outside.contains(c.remote.ip()) => {
                            let now = Instant::now();
                            if outside_last.get(&c.remote.ip()).is_some_and(|t| now < *t + Duration::from_secs(1)) {
                                continue;
                            }
                            outside_last.insert(c.remote.ip(), now);
                            counters.tcp_stalls.fetch_add(1, Relaxed);
                            let _ = alarms.send(Alarm::Outside { dst: c.remote.ip(), syn: None });
                            continue;
                        }
                        None => continue,
                    };
                    let now = Instant::now();
                    if last.get(&peer).is_some_and(|t| now < *t + Duration::from_secs(1)) {
                        continue;
                    }
                    last.insert(peer, now);
                    counters.tcp_stalls.fetch_add(1, Relaxed);
                    let _ = alarms.send(Alarm::TcpStall { peer });
                }
            }
        })
        .context("starting the TCP monitor")?;
    Ok(())
}

/// The namespace's count of TCP retransmission timeouts (`TCPTimeouts` in
/// /proc/net/netstat, IPv4 and IPv6 together, SYNs included); `None` if it cannot be read.
fn rto_timeouts() -> Option<u64> {
    tcp_ext_counter(&std::fs::read_to_string("/proc/net/netstat").ok()?, "TCPTimeouts")
}

/// Counter `name` of the `TcpExt:` lines of /proc/net/netstat text (a line of names, then a
/// line of values).
fn tcp_ext_counter(text: &str, name: &str) -> Option<u64> {
    let mut ext = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (head, values) = (ext.next()?, ext.next()?);
    let i = head.split_whitespace().position(|h| h == name)?;
    values.split_whitespace().nth(i)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timeout_counter_is_read_from_the_tcp_ext_lines() {
        let text = "TcpExt: SyncookiesSent TCPTimeouts TCPLossProbes\nTcpExt: 0 17 4\nIpExt: InNoRoutes TCPTimeouts\nIpExt: 0 99\n";
        assert_eq!(tcp_ext_counter(text, "TCPTimeouts"), Some(17));
        assert_eq!(tcp_ext_counter(text, "Missing"), None);
        assert_eq!(tcp_ext_counter("TcpExt: TCPTimeouts\n", "TCPTimeouts"), None);
        assert_eq!(tcp_ext_counter("TcpExt: TCPTimeouts\nTcpExt: x\n", "TCPTimeouts"), None);
        // This machine's own file has the counter.
        assert!(rto_timeouts().is_some());
    }
}
