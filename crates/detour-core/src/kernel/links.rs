//! Addresses of the per-peer virtual links (spec A§2.1.1, seeds-digest item 41a).
//!
//! Every per-peer TUN carries two local addresses that belong to that link alone, so that an
//! application that `bind()`s to one of them uses the link:
//! * IPv6: the link-local address `fe80::/64` + the first 8 bytes of the node ID (with the
//!   universal/local bit cleared). The peer's end is its own link-local address, derived
//!   the same way from its node ID, so both ends agree without signalling.
//! * IPv4: an address from the link pool (default `169.254.0.0/16`), chosen by hashing the
//!   ordered pair (this node ID, peer node ID); the peer's end is the hash of the reversed
//!   pair. On a collision with an address already in use, the later peer (by node ID) gets
//!   no IPv4 link address and a warning is logged; IPv6 link-local always works.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::Ipv4Net;
use sha2::{Digest, Sha256};

use crate::identity::NodeId;

/// The IPv6 link-local address of a node on any of its per-peer links.
pub fn link_local_v6(id: &NodeId) -> Ipv6Addr {
    let mut b = [0u8; 16];
    b[0] = 0xfe;
    b[1] = 0x80;
    b[8..16].copy_from_slice(&id.0[..8]);
    b[8] &= !0x02;
    Ipv6Addr::from(b)
}

/// The IPv4 address node `from` uses on its link to node `to`, inside `pool` (never the
/// first or last 256 addresses of the pool, which RFC 3927 reserves in 169.254/16).
pub fn link_v4(pool: Ipv4Net, from: &NodeId, to: &NodeId) -> Ipv4Addr {
    let mut h = Sha256::new();
    h.update(b"detour-link-v4");
    h.update(from.0);
    h.update(to.0);
    let d = h.finalize();
    let x = u32::from_be_bytes([d[0], d[1], d[2], d[3]]);
    let size: u64 = 1u64 << (32 - u32::from(pool.prefix_len()));
    let (lo, span) = if size > 1024 { (256u64, size - 512) } else { (1, size - 2) };
    let off = lo + u64::from(x) % span;
    Ipv4Addr::from(u32::from(pool.network()) + off as u32)
}

/// The addresses of one per-peer link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkAddrs {
    /// This node's IPv4 address on the link, if it got one.
    pub local_v4: Option<Ipv4Addr>,
    /// The peer's IPv4 address on the link (reached through the link).
    pub remote_v4: Option<Ipv4Addr>,
    /// This node's IPv6 link-local address.
    pub local_v6: Ipv6Addr,
    /// The peer's IPv6 link-local address.
    pub remote_v6: Ipv6Addr,
}

/// Plans the link addresses for `peers` (in config order). `in_use` are addresses already
/// taken on this host by detour (overlay addresses). Returns one entry per peer and the
/// warnings for peers that got no IPv4 link address.
pub fn plan(local: &NodeId, peers: &[(String, NodeId)], pool: Ipv4Net, in_use: &[IpAddr]) -> (Vec<LinkAddrs>, Vec<String>) {
    let mut taken: HashSet<Ipv4Addr> = in_use
        .iter()
        .filter_map(|a| match a {
            IpAddr::V4(v) => Some(*v),
            _ => None,
        })
        .collect();
    let mut order: Vec<usize> = (0..peers.len()).collect();
    order.sort_by_key(|&i| peers[i].1);
    let mut out = vec![None; peers.len()];
    let mut warnings = Vec::new();
    for i in order {
        let (name, id) = &peers[i];
        let (l, w) = assign(local, name, id, pool, &mut taken);
        warnings.extend(w);
        out[i] = Some(l);
    }
    (out.into_iter().map(|x| x.expect("every peer planned")).collect(), warnings)
}

/// The link addresses of one more peer, avoiding the IPv4 addresses in `taken` (which gets
/// the new ones). Returns a warning when the peer gets no IPv4 link address.
pub fn assign(local: &NodeId, name: &str, id: &NodeId, pool: Ipv4Net, taken: &mut HashSet<Ipv4Addr>) -> (LinkAddrs, Option<String>) {
    let l = link_v4(pool, local, id);
    let r = link_v4(pool, id, local);
    let (v4, warning) = if l != r && !taken.contains(&l) && !taken.contains(&r) {
        taken.insert(l);
        taken.insert(r);
        (Some((l, r)), None)
    } else {
        (None, Some(format!("peer {name}: its IPv4 link addresses {l}/{r} collide with another link; the link to {name} has no IPv4 link address (its IPv6 link-local address works)")))
    };
    (LinkAddrs { local_v4: v4.map(|(l, _)| l), remote_v4: v4.map(|(_, r)| r), local_v6: link_local_v6(local), remote_v6: link_local_v6(id) }, warning)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(b: u8) -> NodeId {
        NodeId([b; 16])
    }

    #[test]
    fn both_ends_agree() {
        let pool: Ipv4Net = "169.254.0.0/16".parse().unwrap();
        let (a_side, _) = plan(&id(1), &[("b".into(), id(2))], pool, &[]);
        let (b_side, _) = plan(&id(2), &[("a".into(), id(1))], pool, &[]);
        assert_eq!(a_side[0].local_v4, b_side[0].remote_v4);
        assert_eq!(a_side[0].remote_v4, b_side[0].local_v4);
        assert_eq!(a_side[0].local_v6, b_side[0].remote_v6);
        let l = a_side[0].local_v4.unwrap();
        assert!(pool.contains(&l) && l.octets()[2] != 0 && l.octets()[2] != 255);
        assert!(a_side[0].local_v6.segments()[0] == 0xfe80);
    }

    #[test]
    fn collisions_leave_the_later_peer_without_v4() {
        // A /22 pool of 1024 addresses (no reserved margin): with enough peers some collide.
        let pool: Ipv4Net = "10.250.0.0/22".parse().unwrap();
        let peers: Vec<(String, NodeId)> = (0..200u8).map(|i| (format!("p{i}"), id(i.wrapping_add(3)))).collect();
        let (links, warnings) = plan(&id(1), &peers, pool, &[]);
        let mut seen = HashSet::new();
        for l in &links {
            if let (Some(a), Some(b)) = (l.local_v4, l.remote_v4) {
                assert!(seen.insert(a) && seen.insert(b), "duplicate link address");
            }
        }
        assert_eq!(links.iter().filter(|l| l.local_v4.is_none()).count(), warnings.len());
        assert!(!warnings.is_empty());
    }
}
