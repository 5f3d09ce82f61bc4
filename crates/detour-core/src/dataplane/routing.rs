//! The overlay routing table: destination prefix → value (usually the index of a node), by
//! longest-prefix match. It is the application-layer routing plane of spec A§2.1.2
//! (seeds-digest item 42); `kernel` keeps the IP routing plane consistent with it (item 43).
//!
//! Lookup is one hash probe per distinct prefix length present, longest first, so its cost
//! does not grow with the number of prefixes.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// A hash map for the per-packet lookups of the data plane: ahash with its fixed keys
/// (deterministic, no OS randomness), several times cheaper than std's SipHash on the
/// 4- to 32-byte keys here. Keyed hashing against collision floods is not needed: the
/// entries come from the configuration and the directory, never from a packet; a packet
/// only looks one up.
pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<ahash::AHasher>>;

/// A longest-prefix-match table for IPv4 and IPv6.
#[derive(Debug, Clone)]
pub struct PrefixTable<V> {
    v4: Vec<(u8, FastMap<u32, V>)>,
    v6: Vec<(u8, FastMap<u128, V>)>,
}

impl<V> Default for PrefixTable<V> {
    fn default() -> Self {
        PrefixTable { v4: Vec::new(), v6: Vec::new() }
    }
}

fn mask4(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    }
}

fn mask6(len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len))
    }
}

fn slot<K, V>(levels: &mut Vec<(u8, FastMap<K, V>)>, len: u8) -> &mut FastMap<K, V> {
    let pos = match levels.binary_search_by(|(l, _)| len.cmp(l)) {
        Ok(p) => p,
        Err(p) => {
            levels.insert(p, (len, FastMap::default()));
            p
        }
    };
    &mut levels[pos].1
}

impl<V> PrefixTable<V> {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts or replaces the value for `net` (host bits are ignored). Returns the old value.
    pub fn insert(&mut self, net: IpNet, value: V) -> Option<V> {
        match net {
            IpNet::V4(n) => {
                let key = u32::from(n.addr()) & mask4(n.prefix_len());
                slot(&mut self.v4, n.prefix_len()).insert(key, value)
            }
            IpNet::V6(n) => {
                let key = u128::from(n.addr()) & mask6(n.prefix_len());
                slot(&mut self.v6, n.prefix_len()).insert(key, value)
            }
        }
    }

    /// The value stored for exactly `net` (host bits are ignored), not a covering prefix's.
    pub fn get(&self, net: &IpNet) -> Option<&V> {
        match net {
            IpNet::V4(n) => {
                let key = u32::from(n.addr()) & mask4(n.prefix_len());
                self.v4.iter().find(|(l, _)| *l == n.prefix_len()).and_then(|(_, m)| m.get(&key))
            }
            IpNet::V6(n) => {
                let key = u128::from(n.addr()) & mask6(n.prefix_len());
                self.v6.iter().find(|(l, _)| *l == n.prefix_len()).and_then(|(_, m)| m.get(&key))
            }
        }
    }

    /// Removes `net`; returns its value if present.
    pub fn remove(&mut self, net: &IpNet) -> Option<V> {
        let out = match net {
            IpNet::V4(n) => {
                let key = u32::from(n.addr()) & mask4(n.prefix_len());
                self.v4.iter_mut().find(|(l, _)| *l == n.prefix_len()).and_then(|(_, m)| m.remove(&key))
            }
            IpNet::V6(n) => {
                let key = u128::from(n.addr()) & mask6(n.prefix_len());
                self.v6.iter_mut().find(|(l, _)| *l == n.prefix_len()).and_then(|(_, m)| m.remove(&key))
            }
        };
        self.v4.retain(|(_, m)| !m.is_empty());
        self.v6.retain(|(_, m)| !m.is_empty());
        out
    }

    /// The value of the longest prefix containing `addr`.
    pub fn lookup(&self, addr: IpAddr) -> Option<&V> {
        match addr {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                self.v4.iter().find_map(|(l, m)| m.get(&(a & mask4(*l))))
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                self.v6.iter().find_map(|(l, m)| m.get(&(a & mask6(*l))))
            }
        }
    }

    /// True when some prefix contains `addr`.
    pub fn contains(&self, addr: IpAddr) -> bool {
        self.lookup(addr).is_some()
    }

    /// Every (prefix, value) pair, longest prefixes first.
    pub fn iter(&self) -> impl Iterator<Item = (IpNet, &V)> {
        let v4 = self.v4.iter().flat_map(|(l, m)| m.iter().map(move |(k, v)| (IpNet::V4(Ipv4Net::new(Ipv4Addr::from(*k), *l).expect("len ≤ 32")), v)));
        let v6 = self.v6.iter().flat_map(|(l, m)| m.iter().map(move |(k, v)| (IpNet::V6(Ipv6Net::new(Ipv6Addr::from(*k), *l).expect("len ≤ 128")), v)));
        v4.chain(v6)
    }

    /// Number of prefixes.
    pub fn len(&self) -> usize {
        self.v4.iter().map(|(_, m)| m.len()).sum::<usize>() + self.v6.iter().map(|(_, m)| m.len()).sum::<usize>()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn n(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins() {
        let mut t = PrefixTable::new();
        t.insert(n("10.0.0.0/8"), 1);
        t.insert(n("10.1.0.0/16"), 2);
        t.insert(n("10.1.2.3/32"), 3);
        t.insert(n("0.0.0.0/0"), 0);
        t.insert(n("fd00::/8"), 6);
        assert_eq!(t.lookup("10.1.2.3".parse().unwrap()), Some(&3));
        assert_eq!(t.lookup("10.1.2.4".parse().unwrap()), Some(&2));
        assert_eq!(t.lookup("10.9.9.9".parse().unwrap()), Some(&1));
        assert_eq!(t.lookup("192.0.2.1".parse().unwrap()), Some(&0));
        assert_eq!(t.lookup("fd77::1".parse().unwrap()), Some(&6));
        assert_eq!(t.lookup("2001:db8::1".parse().unwrap()), None);
        assert_eq!(t.remove(&n("10.1.0.0/16")), Some(2));
        assert_eq!(t.lookup("10.1.2.4".parse().unwrap()), Some(&1));
        assert_eq!(t.len(), 4);
    }

    proptest! {
        /// Lookup agrees with a linear scan for the longest containing prefix.
        #[test]
        fn agrees_with_linear_scan(
            prefixes in proptest::collection::vec((any::<u32>(), 0u8..=32), 0..40),
            probes in proptest::collection::vec(any::<u32>(), 1..40),
        ) {
            let mut t = PrefixTable::new();
            let mut list: Vec<(Ipv4Net, usize)> = Vec::new();
            for (i, (a, l)) in prefixes.iter().enumerate() {
                let net = Ipv4Net::new(Ipv4Addr::from(*a), *l).unwrap().trunc();
                t.insert(IpNet::V4(net), i);
                list.retain(|(p, _)| *p != net);
                list.push((net, i));
            }
            for p in probes {
                let addr = Ipv4Addr::from(p);
                let expect = list.iter().filter(|(net, _)| net.contains(&addr)).max_by_key(|(net, _)| net.prefix_len()).map(|(_, v)| *v);
                prop_assert_eq!(t.lookup(IpAddr::V4(addr)).copied(), expect);
            }
        }
    }
}
