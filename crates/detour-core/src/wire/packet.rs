//! Inner IP packet helpers: address extraction and the ICMP errors detour generates.
//!
//! The fast-path readers look at fixed header offsets only. ICMP errors are built with
//! etherparse and follow RFC 792/1812 (IPv4: fragmentation needed, net unreachable) and
//! RFC 4443 (IPv6: packet too big, no route), including the rules that keep a router from
//! answering errors with errors.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{icmpv4, icmpv6, Icmpv4Type, Icmpv6Type, PacketBuilder};

/// IP protocol number of ICMP.
const PROTO_ICMP: u8 = 1;
/// IPv6 next-header number of ICMPv6.
const PROTO_ICMPV6: u8 = 58;

/// Source and destination of an IPv4 or IPv6 packet, or `None` if it is too short or of
/// another version.
pub fn addresses(pkt: &[u8]) -> Option<(IpAddr, IpAddr)> {
    match pkt.first()? >> 4 {
        4 if pkt.len() >= 20 => {
            let src = Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]);
            let dst = Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]);
            Some((IpAddr::V4(src), IpAddr::V4(dst)))
        }
        6 if pkt.len() >= 40 => {
            let src: [u8; 16] = pkt[8..24].try_into().ok()?;
            let dst: [u8; 16] = pkt[24..40].try_into().ok()?;
            Some((IpAddr::V6(Ipv6Addr::from(src)), IpAddr::V6(Ipv6Addr::from(dst))))
        }
        _ => None,
    }
}

/// A flow's 5-tuple as bytes (addresses, protocol, ports), for hashing flows onto routes.
/// Ports are read for TCP and UDP in unfragmented IPv4 and in IPv6 without extension
/// headers; other packets hash by addresses and protocol. `None` if not IP.
pub fn flow_key(pkt: &[u8]) -> Option<FlowKey> {
    let mut k = FlowKey { bytes: [0; 37], len: 0 };
    match pkt.first()? >> 4 {
        4 if pkt.len() >= 20 => {
            let ihl = usize::from(pkt[0] & 0x0f) * 4;
            let proto = pkt[9];
            k.bytes[..8].copy_from_slice(&pkt[12..20]);
            k.bytes[8] = proto;
            let unfragmented = u16::from_be_bytes([pkt[6], pkt[7]]) & 0x3fff == 0;
            if unfragmented && matches!(proto, 6 | 17) && pkt.len() >= ihl + 4 && ihl >= 20 {
                k.bytes[9..13].copy_from_slice(&pkt[ihl..ihl + 4]);
            }
            k.len = 13;
        }
        6 if pkt.len() >= 40 => {
            let proto = pkt[6];
            k.bytes[..32].copy_from_slice(&pkt[8..40]);
            k.bytes[32] = proto;
            if matches!(proto, 6 | 17) && pkt.len() >= 44 {
                k.bytes[33..37].copy_from_slice(&pkt[40..44]);
            }
            k.len = 37;
        }
        _ => return None,
    }
    Some(k)
}

/// See [`flow_key`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    bytes: [u8; 37],
    len: u8,
}

impl FlowKey {
    /// A 64-bit hash of the flow, salted (FNV-1a over salt and key).
    pub fn hash(&self, salt: u64) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ salt;
        for b in &self.bytes[..usize::from(self.len)] {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        // final avalanche, so that the low bits (the bucket) depend on every byte
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^ (h >> 33)
    }
}

/// Destination address only (see [`addresses`]).
pub fn destination(pkt: &[u8]) -> Option<IpAddr> {
    addresses(pkt).map(|(_, d)| d)
}

/// True for multicast and limited-broadcast destinations, which detour does not carry.
pub fn is_multicast(dst: &IpAddr) -> bool {
    match dst {
        IpAddr::V4(a) => a.is_multicast() || a.is_broadcast(),
        IpAddr::V6(a) => a.is_multicast(),
    }
}

/// True if `pkt` is IPv4 with the Don't Fragment bit set.
pub fn ipv4_dont_fragment(pkt: &[u8]) -> bool {
    pkt.len() >= 20 && pkt[0] >> 4 == 4 && pkt[6] & 0x40 != 0
}

/// Whether an ICMP error may be sent about `pkt` (RFC 1812 §4.3.2.7, RFC 4443 §2.4(e)):
/// not about ICMP errors, not about non-first fragments, not to multicast, broadcast or
/// unspecified sources.
fn may_answer(pkt: &[u8]) -> bool {
    let Some((src, dst)) = addresses(pkt) else { return false };
    if src.is_unspecified() || is_multicast(&src) || src.is_loopback() {
        return false;
    }
    match pkt[0] >> 4 {
        4 => {
            let ihl = usize::from(pkt[0] & 0x0f) * 4;
            let frag_offset = u16::from_be_bytes([pkt[6], pkt[7]]) & 0x1fff;
            if frag_offset != 0 || ihl < 20 || is_multicast(&dst) {
                return false;
            }
            if pkt[9] == PROTO_ICMP {
                // Only answer ICMP queries (echo request 8, timestamp 13, ...); type < 3 or
                // error types are never answered.
                let t = pkt.get(ihl).copied().unwrap_or(0);
                return matches!(t, 8 | 13 | 15 | 17);
            }
            true
        }
        6 => {
            if pkt[6] == PROTO_ICMPV6 {
                // Error messages have types < 128.
                return pkt.get(40).is_some_and(|&t| t >= 128);
            }
            true
        }
        _ => false,
    }
}

fn icmp_payload(pkt: &[u8], max_total: usize, header: usize) -> &[u8] {
    let room = max_total.saturating_sub(header);
    &pkt[..pkt.len().min(room)]
}

/// Builds the "too big" error for `pkt`: ICMPv4 fragmentation needed (type 3 code 4) with
/// the next-hop MTU, or ICMPv6 packet too big (type 2) with the MTU; `from` is this node's
/// address of the same family. `None` when no error may be sent (see RFC rules above).
pub fn too_big(pkt: &[u8], mtu: u16, from: IpAddr) -> Option<Vec<u8>> {
    if !may_answer(pkt) {
        return None;
    }
    let (src, _) = addresses(pkt)?;
    build_error(pkt, src, from, IcmpKind::TooBig(mtu))
}

/// Builds "destination unreachable, no route": ICMPv4 type 3 code 0 (net unreachable) or
/// ICMPv6 type 1 code 0 (no route to destination).
pub fn unreachable(pkt: &[u8], from: IpAddr) -> Option<Vec<u8>> {
    if !may_answer(pkt) {
        return None;
    }
    let (src, _) = addresses(pkt)?;
    build_error(pkt, src, from, IcmpKind::NoRoute)
}

enum IcmpKind {
    TooBig(u16),
    NoRoute,
}

fn build_error(pkt: &[u8], to: IpAddr, from: IpAddr, kind: IcmpKind) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(600);
    match (to, from) {
        (IpAddr::V4(to), IpAddr::V4(from)) => {
            let t = match kind {
                IcmpKind::TooBig(mtu) => icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: mtu },
                IcmpKind::NoRoute => icmpv4::DestUnreachableHeader::Network,
            };
            // RFC 1812 §4.3.2.3: quote as much as fits in 576 bytes.
            let payload = icmp_payload(pkt, 576, 20 + 8);
            PacketBuilder::ipv4(from.octets(), to.octets(), 64).icmpv4(Icmpv4Type::DestinationUnreachable(t)).write(&mut out, payload).ok()?;
        }
        (IpAddr::V6(to), IpAddr::V6(from)) => {
            let t = match kind {
                IcmpKind::TooBig(mtu) => Icmpv6Type::PacketTooBig { mtu: u32::from(mtu) },
                IcmpKind::NoRoute => Icmpv6Type::DestinationUnreachable(icmpv6::DestUnreachableCode::NoRoute),
            };
            // RFC 4443 §2.4(c): the error must not exceed the minimum IPv6 MTU.
            let payload = icmp_payload(pkt, 1280, 40 + 8);
            PacketBuilder::ipv6(from.octets(), to.octets(), 64).icmpv6(t).write(&mut out, payload).ok()?;
        }
        _ => return None,
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};

    fn udp4(df: bool, len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64).udp(1000, 2000).write(&mut out, &vec![7u8; len]).unwrap();
        // etherparse sets DF; clear it when asked (the header checksum is not checked here).
        if !df {
            out[6] &= !0x40;
        }
        out
    }

    #[test]
    fn reads_addresses() {
        let p = udp4(true, 10);
        assert_eq!(addresses(&p), Some(("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap())));
        assert!(ipv4_dont_fragment(&p));
        assert_eq!(addresses(&[0x45, 0]), None);
        assert_eq!(addresses(&[]), None);
    }

    #[test]
    fn too_big_v4_quotes_original_and_carries_mtu() {
        let p = udp4(true, 1400);
        let e = too_big(&p, 1300, "10.77.0.1".parse().unwrap()).unwrap();
        assert!(e.len() <= 576);
        let s = SlicedPacket::from_ip(&e).unwrap();
        match s.net {
            Some(NetSlice::Ipv4(ip)) => {
                assert_eq!(ip.header().destination(), [10, 0, 0, 1]);
                assert_eq!(ip.header().source(), [10, 77, 0, 1]);
            }
            _ => panic!("not ipv4"),
        }
        match s.transport {
            Some(TransportSlice::Icmpv4(i)) => assert_eq!(i.icmp_type(), Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1300 })),
            _ => panic!("not icmp"),
        }
    }

    #[test]
    fn too_big_v6() {
        let mut p = Vec::new();
        PacketBuilder::ipv6([0xfd, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], [0xfd, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2], 64).udp(1, 2).write(&mut p, &[0u8; 1400]).unwrap();
        let e = too_big(&p, 1280, "fd77::9".parse().unwrap()).unwrap();
        assert!(e.len() <= 1280);
        let s = SlicedPacket::from_ip(&e).unwrap();
        match s.transport {
            Some(TransportSlice::Icmpv6(i)) => assert_eq!(i.icmp_type(), Icmpv6Type::PacketTooBig { mtu: 1280 }),
            _ => panic!("not icmpv6"),
        }
    }

    #[test]
    fn never_answers_errors_or_fragments() {
        let p = udp4(true, 100);
        let err = too_big(&p, 1000, "10.77.0.1".parse().unwrap()).unwrap();
        assert!(too_big(&err, 1000, "10.77.0.1".parse().unwrap()).is_none());
        let mut frag = udp4(false, 100);
        frag[7] = 1; // fragment offset 8
        assert!(unreachable(&frag, "10.77.0.1".parse().unwrap()).is_none());
        assert!(unreachable(&[0x45; 3], "10.77.0.1".parse().unwrap()).is_none());
        // family mismatch yields nothing
        assert!(unreachable(&p, "fd77::1".parse().unwrap()).is_none());
    }
}
