//! ICMP unreachable interception, the decision part (spec A§2.1.3, seeds-digest items 44–46).
//!
//! The kernel queues every ICMP destination-unreachable net/host (ICMPv6: no route, address
//! unreachable) to detour before any socket sees it. [`Filter::classify`] decides: an error
//! about a destination detour protects, quoting a packet this host really sent, is dropped
//! and the destination switched to the overlay at once; anything else goes on untouched.
//! ICMP is easy to forge, so the quoted header must be plausible: a complete IP header and
//! at least 8 bytes of a TCP, UDP or ICMP echo packet, sent from one of this host's addresses
//! to a protected destination, with the error addressed to that same local address. The
//! shell adds one more check for TCP: the quoted connection must exist.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};

use etherparse::{IpNumber, LaxNetSlice, LaxSlicedPacket, TransportSlice};

use crate::dataplane::routing::PrefixTable;

/// What to do with a queued ICMP error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Drop it and reroute the peer's protected destinations into the overlay (or, for
    /// [`OUTSIDE`], send new connections to `dst` through an exit).
    Reroute {
        /// Peer index, or [`OUTSIDE`] for a watched destination outside the overlay.
        peer: usize,
        /// The quoted destination.
        dst: IpAddr,
        /// The quoted TCP connection (local, remote), when the quoted packet is TCP; the
        /// shell checks that it exists.
        tcp: Option<(SocketAddr, SocketAddr)>,
    },
    /// Let it through unchanged.
    Accept(Ignored),
}

/// Why an ICMP error was let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ignored {
    /// Not a net/host unreachable (or ICMPv6 no route / address unreachable).
    OtherType,
    /// The packet or its quoted header could not be parsed.
    Malformed,
    /// The quoted destination is not protected by detour.
    NotProtected,
    /// The quoted source is not an address of this host, or the error is not addressed to
    /// it: forged or misdirected.
    NotOurs,
    /// The quoted packet is not TCP, UDP or ICMP echo.
    Protocol,
    /// The quoted TCP connection does not exist (checked by the shell).
    NoConnection,
}

impl Ignored {
    /// snake_case name for counters.
    pub fn as_str(self) -> &'static str {
        match self {
            Ignored::OtherType => "other_type",
            Ignored::Malformed => "malformed",
            Ignored::NotProtected => "not_protected",
            Ignored::NotOurs => "not_ours",
            Ignored::Protocol => "protocol",
            Ignored::NoConnection => "no_connection",
        }
    }
}

/// What the classifier knows: protected destinations and this host's addresses.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Protected destination prefix → peer index.
    pub protected: PrefixTable<usize>,
    /// This host's unicast addresses.
    pub local: HashSet<IpAddr>,
    /// Watched destinations outside the overlay (`exit.watch`).
    pub outside: PrefixTable<()>,
    /// Networks behind this router (`node.networks`): errors about their hosts'
    /// connections, which this node forwards, are acted on too.
    pub behind: PrefixTable<()>,
}

/// The "peer" of a [`Verdict::Reroute`] about a watched destination outside the overlay.
pub const OUTSIDE: usize = usize::MAX;

impl Filter {
    /// Classifies one queued packet (an IPv4 or IPv6 packet carrying ICMP). Never panics.
    pub fn classify(&self, pkt: &[u8]) -> Verdict {
        let Ok(outer) = LaxSlicedPacket::from_ip(pkt) else { return Verdict::Accept(Ignored::Malformed) };
        let outer_dst = match &outer.net {
            Some(LaxNetSlice::Ipv4(ip)) => IpAddr::V4(ip.header().destination_addr()),
            Some(LaxNetSlice::Ipv6(ip)) => IpAddr::V6(ip.header().destination_addr()),
            _ => return Verdict::Accept(Ignored::Malformed),
        };
        let quoted = match &outer.transport {
            Some(TransportSlice::Icmpv4(icmp)) => {
                // type 3 (destination unreachable), code 0 (net) or 1 (host)
                if icmp.type_u8() != 3 || icmp.code_u8() > 1 {
                    return Verdict::Accept(Ignored::OtherType);
                }
                icmp.payload()
            }
            Some(TransportSlice::Icmpv6(icmp)) => {
                // type 1 (destination unreachable), code 0 (no route) or 3 (address)
                if icmp.type_u8() != 1 || !matches!(icmp.code_u8(), 0 | 3) {
                    return Verdict::Accept(Ignored::OtherType);
                }
                icmp.payload()
            }
            _ => return Verdict::Accept(Ignored::OtherType),
        };
        let Ok(inner) = LaxSlicedPacket::from_ip(quoted) else { return Verdict::Accept(Ignored::Malformed) };
        let (src, dst) = match &inner.net {
            Some(LaxNetSlice::Ipv4(ip)) => (IpAddr::V4(ip.header().source_addr()), IpAddr::V4(ip.header().destination_addr())),
            Some(LaxNetSlice::Ipv6(ip)) => (IpAddr::V6(ip.header().source_addr()), IpAddr::V6(ip.header().destination_addr())),
            _ => return Verdict::Accept(Ignored::Malformed),
        };
        let peer = match self.protected.lookup(dst) {
            Some(&peer) => peer,
            None if self.outside.contains(dst) => OUTSIDE,
            None => return Verdict::Accept(Ignored::NotProtected),
        };
        let forwarded = !self.local.contains(&src) && self.behind.contains(src);
        if !(self.local.contains(&src) || forwarded) || outer_dst != src {
            return Verdict::Accept(Ignored::NotOurs);
        }
        if forwarded {
            // A host behind this router: its connection is not a local socket, so there
            // is nothing for sock_diag to check.
            return match &inner.transport {
                Some(TransportSlice::Tcp(_) | TransportSlice::Udp(_)) => Verdict::Reroute { peer, dst, tcp: None },
                Some(TransportSlice::Icmpv4(i)) if i.type_u8() == 8 => Verdict::Reroute { peer, dst, tcp: None },
                Some(TransportSlice::Icmpv6(i)) if i.type_u8() == 128 => Verdict::Reroute { peer, dst, tcp: None },
                None if inner.net.as_ref().and_then(|n| n.ip_payload_ref()).is_some_and(|p| matches!(p.ip_number, IpNumber::TCP | IpNumber::UDP) && p.payload.len() >= 8) => {
                    Verdict::Reroute { peer, dst, tcp: None }
                }
                _ => Verdict::Accept(Ignored::Protocol),
            };
        }
        match &inner.transport {
            Some(TransportSlice::Tcp(tcp)) => Verdict::Reroute { peer, dst, tcp: Some((SocketAddr::new(src, tcp.source_port()), SocketAddr::new(dst, tcp.destination_port()))) },
            Some(TransportSlice::Udp(_)) => Verdict::Reroute { peer, dst, tcp: None },
            Some(TransportSlice::Icmpv4(i)) if i.type_u8() == 8 => Verdict::Reroute { peer, dst, tcp: None },
            Some(TransportSlice::Icmpv6(i)) if i.type_u8() == 128 => Verdict::Reroute { peer, dst, tcp: None },
            None => {
                // A TCP header truncated below 20 bytes still quotes its ports (8 bytes).
                let proto = inner.net.as_ref().and_then(|n| n.ip_payload_ref()).map(|p| (p.ip_number, p.payload));
                match proto {
                    Some((IpNumber::TCP, p)) if p.len() >= 8 => {
                        let sp = u16::from_be_bytes([p[0], p[1]]);
                        let dp = u16::from_be_bytes([p[2], p[3]]);
                        Verdict::Reroute { peer, dst, tcp: Some((SocketAddr::new(src, sp), SocketAddr::new(dst, dp))) }
                    }
                    Some((IpNumber::UDP, p)) if p.len() >= 8 => Verdict::Reroute { peer, dst, tcp: None },
                    Some(_) => Verdict::Accept(Ignored::Protocol),
                    None => Verdict::Accept(Ignored::Malformed),
                }
            }
            _ => Verdict::Accept(Ignored::Protocol),
        }
    }
}

/// The TCP SYN an ICMP destination-unreachable error quotes, when the quote holds all of
/// it (Linux and RFC 1812 routers quote up to 576 bytes; a quote cut short gives `None`):
/// the IP packet, ready to be sent again. Whether the error is acted on at all is
/// [`Filter::classify`]'s decision; once the destination is rerouted, the shell sends the
/// SYN again so that the connection is set up at once, not at the SYN's retransmission
/// timer (1 s, RFC 6298) — issue 14, item 6.
pub fn quoted_syn(pkt: &[u8]) -> Option<Vec<u8>> {
    let outer = LaxSlicedPacket::from_ip(pkt).ok()?;
    let quoted = match &outer.transport {
        Some(TransportSlice::Icmpv4(icmp)) if icmp.type_u8() == 3 => icmp.payload(),
        Some(TransportSlice::Icmpv6(icmp)) if icmp.type_u8() == 1 => icmp.payload(),
        _ => return None,
    };
    // Strict parsing: the whole quoted packet must be there.
    let inner = etherparse::SlicedPacket::from_ip(quoted).ok()?;
    let len = match &inner.net {
        Some(etherparse::NetSlice::Ipv4(ip)) => {
            if ip.header().is_fragmenting_payload() {
                return None;
            }
            usize::from(ip.header().total_len())
        }
        Some(etherparse::NetSlice::Ipv6(ip)) => 40 + usize::from(ip.header().payload_length()),
        _ => return None,
    };
    let Some(TransportSlice::Tcp(tcp)) = &inner.transport else { return None };
    if !tcp.syn() || tcp.ack() || tcp.rst() || tcp.fin() || !tcp.payload().is_empty() || len > quoted.len() {
        return None;
    }
    // The quote may carry a checksum the sender's NIC (or veth) was to finish (checksum
    // offload): computed again here, or the peer drops the SYN.
    let header = tcp.to_header();
    let sum = match &inner.net {
        Some(etherparse::NetSlice::Ipv4(ip)) => header.calc_checksum_ipv4_raw(ip.header().source(), ip.header().destination(), &[]).ok()?,
        Some(etherparse::NetSlice::Ipv6(ip)) => header.calc_checksum_ipv6_raw(ip.header().source(), ip.header().destination(), &[]).ok()?,
        _ => return None,
    };
    let at = len - header.header_len() + 16;
    let mut out = quoted[..len].to_vec();
    out[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{icmpv4, icmpv6, Icmpv4Type, Icmpv6Type, PacketBuilder};
    use proptest::prelude::*;

    fn filter() -> Filter {
        let mut f = Filter::default();
        f.protected.insert("10.0.2.2/32".parse().unwrap(), 0);
        f.protected.insert("198.51.100.0/24".parse().unwrap(), 1);
        f.protected.insert("fd00:0:2::2/128".parse().unwrap(), 0);
        f.local.insert("10.0.1.2".parse().unwrap());
        f.local.insert("fd00:0:1::2".parse().unwrap());
        f
    }

    fn tcp4(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ipv4(src, dst, 64).tcp(40000, 80, 1, 1000).write(&mut out, &[]).unwrap();
        out
    }

    fn icmp4(to: [u8; 4], code: icmpv4::DestUnreachableHeader, quoted: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ipv4([10, 0, 1, 1], to, 64).icmpv4(Icmpv4Type::DestinationUnreachable(code)).write(&mut out, &quoted[..28.min(quoted.len())]).unwrap();
        out
    }

    #[test]
    fn a_complete_quoted_syn_is_returned_for_sending_again_and_nothing_else() {
        let mut syn = Vec::new();
        PacketBuilder::ipv4([10, 0, 1, 2], [203, 0, 113, 5], 64)
            .tcp(40000, 80, 7, 64240)
            .syn()
            .options(&[etherparse::TcpOptionElement::MaximumSegmentSize(1460)])
            .unwrap()
            .write(&mut syn, &[])
            .unwrap();
        let whole = |q: &[u8]| {
            let mut out = Vec::new();
            PacketBuilder::ipv4([10, 0, 1, 1], [10, 0, 1, 2], 64).icmpv4(Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Host)).write(&mut out, q).unwrap();
            out
        };
        assert_eq!(quoted_syn(&whole(&syn)), Some(syn.clone()));
        // a checksum left for the NIC to finish (offload) is computed again
        let mut partial = syn.clone();
        partial[36] ^= 0x5a;
        assert_eq!(quoted_syn(&whole(&partial)), Some(syn.clone()));
        // cut short (the 28 bytes many routers quote), or not a SYN
        assert_eq!(quoted_syn(&whole(&syn[..28])), None);
        assert_eq!(quoted_syn(&whole(&tcp4([10, 0, 1, 2], [203, 0, 113, 5]))), None);
        let mut synack = Vec::new();
        PacketBuilder::ipv4([10, 0, 1, 2], [203, 0, 113, 5], 64).tcp(40000, 80, 7, 64240).syn().ack(9).write(&mut synack, &[]).unwrap();
        assert_eq!(quoted_syn(&whole(&synack)), None);
        // IPv6
        let mut syn6 = Vec::new();
        PacketBuilder::ipv6([0xfd; 16], [0xfe; 16], 64).tcp(40000, 80, 7, 64240).syn().write(&mut syn6, &[]).unwrap();
        let mut err6 = Vec::new();
        PacketBuilder::ipv6([0xfc; 16], [0xfd; 16], 64).icmpv6(Icmpv6Type::DestinationUnreachable(icmpv6::DestUnreachableCode::Address)).write(&mut err6, &syn6).unwrap();
        assert_eq!(quoted_syn(&err6), Some(syn6));
        // garbage
        assert_eq!(quoted_syn(&[0x45, 0, 0]), None);
    }

    proptest! {
        #[test]
        fn quoted_syn_never_panics(data in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = quoted_syn(&data);
        }
    }

    #[test]
    fn host_unreachable_about_a_protected_peer_reroutes() {
        let q = tcp4([10, 0, 1, 2], [10, 0, 2, 2]);
        let v = filter().classify(&icmp4([10, 0, 1, 2], icmpv4::DestUnreachableHeader::Host, &q));
        assert_eq!(v, Verdict::Reroute { peer: 0, dst: "10.0.2.2".parse().unwrap(), tcp: Some(("10.0.1.2:40000".parse().unwrap(), "10.0.2.2:80".parse().unwrap())) });
        let q = tcp4([10, 0, 1, 2], [198, 51, 100, 7]);
        assert!(matches!(filter().classify(&icmp4([10, 0, 1, 2], icmpv4::DestUnreachableHeader::Network, &q)), Verdict::Reroute { peer: 1, .. }));
    }

    #[test]
    fn errors_for_hosts_behind_this_router_are_acted_on_without_a_socket_check() {
        let mut f = filter();
        f.behind.insert("172.16.1.0/24".parse().unwrap(), ());
        // A host behind this router connects to a protected destination; the error is
        // addressed to it (this node forwards it).
        let q = tcp4([172, 16, 1, 2], [10, 0, 2, 2]);
        assert_eq!(f.classify(&icmp4([172, 16, 1, 2], icmpv4::DestUnreachableHeader::Host, &q)), Verdict::Reroute { peer: 0, dst: "10.0.2.2".parse().unwrap(), tcp: None });
        // Addressed to someone else than the quoted sender, or from a host not behind it.
        assert_eq!(f.classify(&icmp4([172, 16, 1, 3], icmpv4::DestUnreachableHeader::Host, &q)), Verdict::Accept(Ignored::NotOurs));
        let q = tcp4([172, 16, 9, 2], [10, 0, 2, 2]);
        assert_eq!(f.classify(&icmp4([172, 16, 9, 2], icmpv4::DestUnreachableHeader::Host, &q)), Verdict::Accept(Ignored::NotOurs));
    }

    #[test]
    fn unreachable_about_a_watched_outside_destination_names_it() {
        let mut f = filter();
        f.outside.insert("203.0.113.0/24".parse().unwrap(), ());
        let q = tcp4([10, 0, 1, 2], [203, 0, 113, 5]);
        let v = f.classify(&icmp4([10, 0, 1, 2], icmpv4::DestUnreachableHeader::Host, &q));
        assert!(matches!(v, Verdict::Reroute { peer: OUTSIDE, dst, .. } if dst == "203.0.113.5".parse::<IpAddr>().unwrap()), "{v:?}");
        // A forged one (quoted source not ours) still passes untouched.
        let q = tcp4([10, 9, 9, 9], [203, 0, 113, 5]);
        assert_eq!(f.classify(&icmp4([10, 0, 1, 2], icmpv4::DestUnreachableHeader::Host, &q)), Verdict::Accept(Ignored::NotOurs));
    }

    #[test]
    fn forged_or_unrelated_errors_pass_untouched() {
        let f = filter();
        // not protected
        let q = tcp4([10, 0, 1, 2], [192, 0, 2, 9]);
        assert_eq!(f.classify(&icmp4([10, 0, 1, 2], icmpv4::DestUnreachableHeader::Host, &q)), Verdict::Accept(Ignored::NotProtected));
        // quoted source is not ours
        let q = tcp4([10, 9, 9, 9], [10, 0, 2, 2]);
        assert_eq!(f.classify(&icmp4([10, 0, 1, 2], icmpv4::DestUnreachableHeader::Host, &q)), Verdict::Accept(Ignored::NotOurs));
        // error not addressed to the quoted sender
        let q = tcp4([10, 0, 1, 2], [10, 0, 2, 2]);
        assert_eq!(f.classify(&icmp4([10, 0, 1, 9], icmpv4::DestUnreachableHeader::Host, &q)), Verdict::Accept(Ignored::NotOurs));
        // other codes (port unreachable, fragmentation needed)
        assert_eq!(f.classify(&icmp4([10, 0, 1, 2], icmpv4::DestUnreachableHeader::Port, &q)), Verdict::Accept(Ignored::OtherType));
        // garbage quote
        assert_eq!(f.classify(&icmp4([10, 0, 1, 2], icmpv4::DestUnreachableHeader::Host, &[0x45, 0, 0])), Verdict::Accept(Ignored::Malformed));
        assert_eq!(f.classify(&[1, 2, 3]), Verdict::Accept(Ignored::Malformed));
    }

    #[test]
    fn icmpv6_no_route_and_address_unreachable() {
        let mut q = Vec::new();
        PacketBuilder::ipv6("fd00:0:1::2".parse::<std::net::Ipv6Addr>().unwrap().octets(), "fd00:0:2::2".parse::<std::net::Ipv6Addr>().unwrap().octets(), 64)
            .udp(5000, 53)
            .write(&mut q, &[1, 2, 3])
            .unwrap();
        for code in [icmpv6::DestUnreachableCode::NoRoute, icmpv6::DestUnreachableCode::Address] {
            let mut e = Vec::new();
            PacketBuilder::ipv6("fd00:0:1::1".parse::<std::net::Ipv6Addr>().unwrap().octets(), "fd00:0:1::2".parse::<std::net::Ipv6Addr>().unwrap().octets(), 64)
                .icmpv6(Icmpv6Type::DestinationUnreachable(code))
                .write(&mut e, &q)
                .unwrap();
            assert_eq!(filter().classify(&e), Verdict::Reroute { peer: 0, dst: "fd00:0:2::2".parse().unwrap(), tcp: None });
        }
        let mut e = Vec::new();
        PacketBuilder::ipv6("fd00:0:1::1".parse::<std::net::Ipv6Addr>().unwrap().octets(), "fd00:0:1::2".parse::<std::net::Ipv6Addr>().unwrap().octets(), 64)
            .icmpv6(Icmpv6Type::DestinationUnreachable(icmpv6::DestUnreachableCode::Port))
            .write(&mut e, &q)
            .unwrap();
        assert_eq!(filter().classify(&e), Verdict::Accept(Ignored::OtherType));
    }

    proptest! {
        #[test]
        fn classify_never_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = filter().classify(&data);
        }
    }
}
