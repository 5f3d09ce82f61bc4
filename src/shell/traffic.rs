//! Traffic detection on the kernel's direct path, for idle probing
//! ([`crate::path::failover::Failover::handle_traffic`]).
//!
//! While a path is healthy, traffic to a peer's protected destinations never enters detour:
//! the kernel routes it straight to the peer. The kernel tells detour that it flows with one
//! rate-limited log rule per destination, in chain `DETOUR-SEEN` of `mangle`/`POSTROUTING`
//! (IPv4 and IPv6), jumped to for every packet without detour's own firewall mark:
//!
//! ```text
//! -A DETOUR-SEEN -d 198.51.100.0/24 -m limit --limit 2/sec --limit-burst 1 -j NFLOG --nflog-group 7720 --nflog-size 64
//! -A DETOUR-SEEN -d 198.51.100.0/24 -j RETURN
//! ```
//!
//! At most two packets per second per destination are copied (64 bytes each, the packet is
//! not held: unlike NFQUEUE, NFLOG never delays or reorders traffic), none while nothing
//! flows, so an idle node pays nothing. A thread reads the copies from netlink (nflog
//! messages, parsed by `netlink-packet-netfilter`) and reports the peer whose protected
//! destination the packet was sent to. Traffic through the overlay is reported by the data
//! path itself. The chain is removed at exit and after a crash on the next start.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ipnet::IpNet;
use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_netfilter::nflog::{config_request, ConfigCmd, ConfigMode, ConfigNla, PacketNla, ULogMessage};
use netlink_packet_netfilter::{NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket};
use tokio::sync::mpsc;

use crate::path::icmp::Filter;
use crate::shell::intercept::{Alarm, IcmpCounters};
use crate::shell::netfilter;

/// The chain detour owns, in `mangle`.
pub fn chain() -> String {
    netfilter::named("DETOUR-SEEN")
}
/// Packets copied per second and destination at most while traffic flows.
pub const PER_SECOND: u32 = 2;
/// Bytes copied of each packet: enough for the IPv6 header's destination.
const COPY_BYTES: u32 = 64;
/// A peer is reported at most this often.
const REPORT_EVERY: Duration = Duration::from_millis(250);

/// Removes the chain and its jump for both families; idempotent.
pub fn remove() {
    netfilter::remove_chains(&chains());
}

/// (table, chain) of every chain of this module.
pub fn chains() -> Vec<(&'static str, String)> {
    vec![("mangle", chain())]
}

/// The `iptables-restore --noflush` input for one family: the chain, two rules per
/// destination of that family (log at most [`PER_SECOND`], then return), and the jump
/// from `POSTROUTING` for packets without `fwmark`. `None` without destinations of the
/// family.
pub fn restore_input(dsts: &[IpNet], group: u16, fwmark: u32, v6: bool) -> Option<String> {
    let mine: Vec<&IpNet> = dsts.iter().filter(|d| d.addr().is_ipv6() == v6).collect();
    if mine.is_empty() {
        return None;
    }
    let c = chain();
    let mut s = format!("*mangle\n:{c} - [0:0]\n");
    for d in mine {
        s += &format!("-A {c} -d {d} -m limit --limit {PER_SECOND}/sec --limit-burst 1 -j NFLOG --nflog-group {group} --nflog-size {COPY_BYTES}\n");
        s += &format!("-A {c} -d {d} -j RETURN\n");
    }
    s += &format!("-A POSTROUTING -m mark ! --mark {fwmark} -j {c}\nCOMMIT\n");
    Some(s)
}

/// Installs the rules for `dsts` (the protected destinations of configured peers): one
/// `iptables-restore` per family (left-overs of an earlier run are removed at start).
///
/// # Errors
/// If iptables-restore is missing or refuses (the kernel lacks `NFLOG` or `limit`).
pub fn install(keeper: &netfilter::Keeper, dsts: &[IpNet], group: u16, fwmark: u32) -> Result<()> {
    for v6 in [false, true] {
        let Some(input) = restore_input(dsts, group, fwmark, v6) else { continue };
        if let Err(e) = keeper.restore(v6, &input) {
            remove();
            bail!("the {} rules were refused: {e:#}", chain());
        }
    }
    Ok(())
}

/// Replaces the rules with those for `dsts` (a reload changed the configured peers); runs
/// iptables, so it belongs on a blocking thread.
///
/// # Errors
/// As [`install`].
pub fn replace(keeper: &netfilter::Keeper, dsts: &[IpNet], group: u16, fwmark: u32) -> Result<()> {
    keeper.release(&chain());
    remove();
    install(keeper, dsts, group, fwmark)
}

/// The peer whose protected destination the IP packet `pkt` is sent to.
pub fn classify(filter: &Filter, pkt: &[u8]) -> Option<usize> {
    let (_, dst) = crate::wire::packet::addresses(pkt)?;
    filter.protected.lookup(dst).copied()
}

fn send_config(sock: &Socket, group: u16, nlas: Vec<ConfigNla>) -> Result<()> {
    let msg = config_request(NetfilterProtoFamily::Unspec, group, nlas);
    let mut buf = vec![0u8; msg.header.length as usize];
    msg.serialize(&mut buf[..]);
    sock.send(&buf, 0).context("sending an nflog configuration")?;
    let mut rx = vec![0u8; 4096];
    let n = sock.recv(&mut &mut rx[..], 0).context("reading the nflog answer")?;
    match NetlinkMessage::<NetfilterMessage>::deserialize(&rx[..n]) {
        Ok(NetlinkMessage { payload: NetlinkPayload::Error(e), .. }) => match e.code {
            None => Ok(()),
            Some(code) => bail!("nflog group {group}: the kernel refused ({})", std::io::Error::from_raw_os_error(-code.get())),
        },
        Ok(_) => Ok(()),
        Err(e) => bail!("nflog group {group}: unreadable answer: {e}"),
    }
}

/// Binds nflog group `group` and starts the thread that turns packet copies into
/// [`Alarm::Traffic`]. It lives until the process exits.
///
/// # Errors
/// If the netlink socket cannot be opened or the group cannot be bound (another program
/// holds it).
pub fn start(group: u16, filter: Arc<RwLock<Filter>>, counters: Arc<IcmpCounters>, alarms: mpsc::UnboundedSender<Alarm>) -> Result<()> {
    let mut sock = Socket::new(NETLINK_NETFILTER).context("opening a netfilter netlink socket")?;
    sock.bind_auto().context("binding the netlink socket")?;
    // Copy the first bytes of each packet and pass each copy on at once (no batching).
    send_config(&sock, group, vec![ConfigCmd::Bind.into(), ConfigMode::new_packet(COPY_BYTES).into(), ConfigNla::QThresh(1)])?;
    std::thread::Builder::new()
        .name("detour-traffic".into())
        .spawn(move || {
            let mut buf = vec![0u8; 65_536];
            let mut last: HashMap<usize, Instant> = HashMap::new();
            loop {
                let n = match sock.recv(&mut &mut buf[..], 0) {
                    Ok(n) => n,
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => continue,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                if alarms.is_closed() {
                    return;
                }
                let mut off = 0;
                while off < n {
                    let Ok(msg) = NetlinkMessage::<NetfilterMessage>::deserialize(&buf[off..n]) else { break };
                    let len = msg.header.length as usize;
                    if let NetlinkPayload::InnerMessage(NetfilterMessage { inner: NetfilterMessageInner::ULog(ULogMessage::Packet(nlas)), .. }) = &msg.payload {
                        let peer = nlas.iter().find_map(|a| match a {
                            PacketNla::Payload(p) => filter.read().ok().and_then(|f| classify(&f, p)),
                            _ => None,
                        });
                        match peer {
                            Some(peer) => {
                                let now = Instant::now();
                                if last.get(&peer).is_none_or(|t| now >= *t + REPORT_EVERY) {
                                    last.insert(peer, now);
                                    counters.traffic_reports.fetch_add(1, Relaxed);
                                    let _ = alarms.send(Alarm::Traffic { peer });
                                }
                            }
                            None => {
                                counters.traffic_ignored.fetch_add(1, Relaxed);
                            }
                        }
                    }
                    if len == 0 {
                        break;
                    }
                    off += (len + 3) & !3;
                }
            }
        })
        .context("starting the traffic thread")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_input_has_a_log_and_a_return_rule_per_destination_of_the_family() {
        let dsts: Vec<IpNet> = vec!["10.0.0.0/24".parse().unwrap(), "2001:db8::/64".parse().unwrap(), "192.0.2.7/32".parse().unwrap()];
        let v4 = restore_input(&dsts, 7720, 0x1234, false).unwrap();
        assert_eq!(v4.lines().filter(|l| l.contains("-j NFLOG --nflog-group 7720")).count(), 2);
        assert_eq!(v4.lines().filter(|l| l.ends_with("-j RETURN")).count(), 2);
        assert!(v4.contains("-A POSTROUTING -m mark ! --mark 4660 -j DETOUR-SEEN"));
        assert!(v4.starts_with("*mangle\n:DETOUR-SEEN - [0:0]\n") && v4.ends_with("COMMIT\n"));
        assert!(!v4.contains("2001:db8"));
        let v6 = restore_input(&dsts, 7720, 0x1234, true).unwrap();
        assert_eq!(v6.lines().filter(|l| l.contains("NFLOG")).count(), 1);
        assert!(restore_input(&dsts[..1], 1, 1, true).is_none());
    }

    #[test]
    fn classify_finds_the_peer_of_the_destination_and_ignores_garbage() {
        let mut f = Filter::default();
        f.protected.insert("10.0.0.0/24".parse().unwrap(), 3);
        let mut pkt = vec![0u8; 20];
        pkt[0] = 0x45;
        pkt[2..4].copy_from_slice(&20u16.to_be_bytes());
        pkt[12..16].copy_from_slice(&[192, 0, 2, 1]);
        pkt[16..20].copy_from_slice(&[10, 0, 0, 9]);
        assert_eq!(classify(&f, &pkt), Some(3));
        pkt[16] = 11;
        assert_eq!(classify(&f, &pkt), None);
        assert_eq!(classify(&f, &[]), None);
        assert_eq!(classify(&f, &[0x60; 10]), None);
    }
}
