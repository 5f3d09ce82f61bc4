//! Underlay sockets: bound to the configured listen addresses, marked with detour's
//! firewall mark (so the `not fwmark` rule keeps them out of detour's own routes), with
//! large buffers.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::sync::Arc;

use anyhow::{Context, Result};
use socket2::{Domain, Protocol, Socket, Type};

use crate::shell::datapath::DataSocket;

/// Socket buffer size requested for data sockets (bytes; forced past `rmem_max` as root).
pub const DATA_BUFFER: usize = 8 << 20;

/// Socket buffer size requested for management sockets (bytes). The default (208 KiB
/// here) overflowed at a node with 99 configured peers when they all started at once: 3,930
/// datagrams dropped in its first 40 s (`RcvbufErrors`), QUIC handshakes and Hellos timed
/// out and were retried, feeding the overload (issue 11).
pub const MGMT_BUFFER: usize = 4 << 20;

/// A bound underlay UDP socket with its family capabilities.
pub struct Bound {
    /// The socket.
    pub socket: UdpSocket,
    /// Carries IPv4.
    pub v4: bool,
    /// Carries IPv6.
    pub v6: bool,
}

/// Binds one UDP socket per listen address on `port`. An empty list means every address:
/// a dual-stack `[::]` socket, or `0.0.0.0` when IPv6 is unavailable.
///
/// # Errors
/// Bind failures, naming the address.
pub fn bind_all(listen: &[IpAddr], port: u16, fwmark: u32, buffer: Option<usize>) -> Result<Vec<Bound>> {
    if listen.is_empty() {
        return match bind_one(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port, fwmark, buffer) {
            Ok(b) => Ok(vec![b]),
            Err(e) if e.downcast_ref::<std::io::Error>().and_then(|e| e.raw_os_error()) == Some(libc::EAFNOSUPPORT) => Ok(vec![bind_one(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port, fwmark, buffer)?]),
            Err(e) => Err(e),
        };
    }
    listen.iter().map(|a| bind_one(*a, port, fwmark, buffer)).collect()
}

fn bind_one(addr: IpAddr, port: u16, fwmark: u32, buffer: Option<usize>) -> Result<Bound> {
    let domain = if addr.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 };
    let sock = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    let dual = addr == IpAddr::V6(Ipv6Addr::UNSPECIFIED);
    if addr.is_ipv6() {
        sock.set_only_v6(!dual)?;
    }
    sock.set_mark(fwmark).context("setting SO_MARK (needs CAP_NET_ADMIN)")?;
    if let Some(size) = buffer {
        let fd = sock.as_fd();
        if nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::RcvBufForce, &size).is_err() {
            let _ = sock.set_recv_buffer_size(size);
        }
        if nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::SndBufForce, &size).is_err() {
            let _ = sock.set_send_buffer_size(size);
        }
    }
    sock.set_nonblocking(true)?;
    sock.bind(&SocketAddr::new(addr, port).into()).map_err(anyhow::Error::from).with_context(|| format!("binding UDP {}", SocketAddr::new(addr, port)))?;
    Ok(Bound { socket: sock.into(), v4: addr.is_ipv4() || dual, v6: addr.is_ipv6() })
}

/// Wraps bound sockets for the data path (quinn-udp enables GRO and checks GSO here).
///
/// # Errors
/// If quinn-udp cannot set up a socket.
pub fn data_sockets(bound: Vec<Bound>) -> Result<Vec<DataSocket>> {
    bound
        .into_iter()
        .map(|b| {
            let state = quinn_udp::UdpSocketState::new((&b.socket).into()).context("setting up the data socket")?;
            Ok(DataSocket { socket: b.socket, state: Arc::new(state), carries_v4: b.v4, carries_v6: b.v6 })
        })
        .collect()
}

/// Datagrams the kernel dropped for a full receive buffer on the UDP sockets bound to
/// `port` in this network namespace, from `/proc/net/udp` and `/proc/net/udp6` (their
/// `drops` column).
pub fn udp_drops(port: u16) -> u64 {
    ["/proc/net/udp", "/proc/net/udp6"].iter().filter_map(|f| std::fs::read_to_string(f).ok()).map(|t| parse_udp_drops(&t, port)).sum()
}

/// The sum of the `drops` column of the sockets bound to local `port` in a
/// `/proc/net/udp` table.
pub fn parse_udp_drops(table: &str, port: u16) -> u64 {
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let local = cols.get(1)?;
            let p = u16::from_str_radix(local.rsplit(':').next()?, 16).ok()?;
            (p == port).then(|| cols.last()?.parse::<u64>().ok()).flatten()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_drops_are_summed_per_local_port() {
        let t = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  1: 0100007F:1E28 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 123 2 0000000000000000 7
  2: 00000000:1E28 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 124 2 0000000000000000 5
  3: 00000000:1E29 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 125 2 0000000000000000 100
garbage line
";
        assert_eq!(parse_udp_drops(t, 7720), 12);
        assert_eq!(parse_udp_drops(t, 7721), 100);
        assert_eq!(parse_udp_drops(t, 9), 0);
    }
}

/// Raw sockets that send complete IP packets (`IPPROTO_RAW`: the header is the caller's),
/// for SYNs sent again after a reroute ([`crate::shell::engine::Engine::take_syns`]). They
/// carry no firewall mark, so the packets take the routes detour installed, like the
/// connection's own.
#[derive(Debug)]
pub struct RawSender {
    v4: Option<Socket>,
    v6: Option<Socket>,
}

impl RawSender {
    /// Opens the sockets; a family that cannot be opened (no IPv6) is left out.
    pub fn new() -> RawSender {
        let open = |d: Domain| {
            let s = Socket::new(d, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW))).ok()?;
            s.set_nonblocking(true).ok()?;
            Some(s)
        };
        RawSender { v4: open(Domain::IPV4), v6: open(Domain::IPV6) }
    }

    /// Sends one IPv4 or IPv6 packet to its own destination address.
    ///
    /// # Errors
    /// Not an IP packet, no socket for its family, or the kernel's send error.
    pub fn send(&self, pkt: &[u8]) -> std::io::Result<usize> {
        let bad = || std::io::Error::new(std::io::ErrorKind::InvalidInput, "not an IP packet");
        let (sock, dst) = match pkt.first().map(|b| b >> 4) {
            Some(4) if pkt.len() >= 20 => (&self.v4, IpAddr::V4(Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]))),
            Some(6) if pkt.len() >= 40 => (&self.v6, IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&pkt[24..40]).map_err(|_| bad())?))),
            _ => return Err(bad()),
        };
        let sock = sock.as_ref().ok_or_else(|| std::io::Error::new(std::io::ErrorKind::Unsupported, "no raw socket for this family"))?;
        sock.send_to(pkt, &SocketAddr::new(dst, 0).into())
    }
}

impl Default for RawSender {
    fn default() -> Self {
        RawSender::new()
    }
}
