//! Exits to hosts that do not run detour, sans I/O (spec A§1.1.2 context 3, A§3.6;
//! seeds-digest items 13, 70-73).
//!
//! An outside destination is either configured to go through an exit (`exit.always`), or
//! watched (`exit.watch`) and found unreachable: an ICMP net/host unreachable about it, or
//! a connection attempt to it that times out. Such a destination gets an [`ExitRoute`]
//! through the best node that offers exit to it: policy rank first (commitment class,
//! priority, lifespan), then cost. If that node replaces the source address, the route is
//! one of the new-connections table (`kernel::TABLE_NEW`): connections established before
//! keep their path, because the far end could not match their packets any more.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::config::ExitConfig;
use crate::node::policy::{Egress, Policy, RelayRank};

/// A route to an outside destination through an exit node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ExitRoute {
    /// The outside destination.
    pub dst: IpNet,
    /// The exit node (peer index).
    pub via: usize,
    /// The exit replaces the source address: only new connections may use the route.
    pub masquerade: bool,
    /// Preferred source address of new connections (this node's underlay address towards
    /// the exit); `None`: the kernel's choice.
    pub src: Option<IpAddr>,
}

/// A node that might serve as exit, as the engine sees it.
#[derive(Debug, Clone)]
pub struct ExitCandidate<'a> {
    /// Peer index.
    pub peer: usize,
    /// Its published policy.
    pub policy: &'a Policy,
    /// Its own networks (prefixes and networks behind it).
    pub own: Vec<IpNet>,
    /// The path to it works and traffic can be sent to it now.
    pub usable: bool,
    /// Cost of the path to it (ms), for ties.
    pub cost_ms: f64,
}

/// Outside destinations and their exits.
#[derive(Debug, Clone, Default)]
pub struct Exits {
    watch: Vec<IpNet>,
    always: Vec<IpNet>,
    hold: Duration,
    /// Watched destinations found unreachable, and until when they use an exit.
    failed: BTreeMap<IpAddr, Instant>,
}

impl Exits {
    /// State for `[exit]`.
    pub fn new(cfg: &ExitConfig) -> Exits {
        Exits { watch: cfg.watch.clone(), always: cfg.always.clone(), hold: cfg.hold, failed: BTreeMap::new() }
    }

    /// Whether any outside destination is configured.
    pub fn enabled(&self) -> bool {
        !self.watch.is_empty() || !self.always.is_empty()
    }

    /// `dst` was found unreachable at `now` (ICMP unreachable, a connection attempt that
    /// timed out). Returns whether it is watched and was not on an exit already; a repeat
    /// extends its hold.
    pub fn handle_unreachable(&mut self, now: Instant, dst: IpAddr) -> bool {
        if !self.watch.iter().any(|n| n.contains(&dst)) {
            return false;
        }
        self.failed.insert(dst, now + self.hold).is_none()
    }

    /// Forgets destinations whose hold ended; returns whether any did.
    pub fn expire(&mut self, now: Instant) -> bool {
        let before = self.failed.len();
        self.failed.retain(|_, until| now < *until);
        self.failed.len() != before
    }

    /// Destinations that use an exit now: the `always` prefixes and the failed ones.
    pub fn destinations(&self) -> Vec<IpNet> {
        let mut v = self.always.clone();
        v.extend(self.failed.keys().map(|a| IpNet::from(*a)));
        v
    }

    /// Failed destinations with the time left on their hold.
    pub fn failed(&self, now: Instant) -> Vec<(IpAddr, Duration)> {
        self.failed.iter().map(|(a, until)| (*a, until.saturating_duration_since(now))).collect()
    }

    /// The exit for `dst` among `candidates`, judged for traffic from `src` (this node's
    /// address): usable nodes that exit to `dst`, ranked by policy, then cost. Returns the
    /// peer and whether it masquerades.
    pub fn choose(candidates: &[ExitCandidate], src: IpAddr, dst: IpAddr, now_s: u64) -> Option<(usize, Egress)> {
        candidates
            .iter()
            .filter(|c| c.usable)
            .filter_map(|c| c.policy.egress(&c.own, src, dst).ok().map(|e| (c, e)))
            .min_by(|(a, _), (b, _)| RelayRank::of(a.policy, now_s).cmp(&RelayRank::of(b.policy, now_s)).then(a.cost_ms.total_cmp(&b.cost_ms)).then(a.peer.cmp(&b.peer)))
            .map(|(c, e)| (c.peer, e))
    }

    /// The exit routes for every destination that uses an exit now.
    pub fn plan(&self, candidates: &[ExitCandidate], src_v4: Option<IpAddr>, src_v6: Option<IpAddr>, now_s: u64) -> Vec<ExitRoute> {
        let mut v = Vec::new();
        for dst in self.destinations() {
            let Some(src) = (if dst.addr().is_ipv4() { src_v4 } else { src_v6 }) else { continue };
            if let Some((via, e)) = Exits::choose(candidates, src, dst.addr(), now_s) {
                v.push(ExitRoute { dst, via, masquerade: e == Egress::Masquerade, src: None });
            }
        }
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::policy::{Commitment, Connectivity, Willing};

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn cfg() -> ExitConfig {
        ExitConfig { watch: vec![net("203.0.113.0/24")], always: vec![net("198.51.100.0/24")], hold: Duration::from_secs(60) }
    }

    #[test]
    fn watched_destinations_use_an_exit_for_their_hold() {
        let now = Instant::now();
        let mut e = Exits::new(&cfg());
        assert!(e.enabled());
        assert!(!e.handle_unreachable(now, "192.0.2.1".parse().unwrap()), "not watched");
        assert!(e.handle_unreachable(now, "203.0.113.9".parse().unwrap()));
        assert!(!e.handle_unreachable(now, "203.0.113.9".parse().unwrap()), "already on the exit");
        assert_eq!(e.destinations(), vec![net("198.51.100.0/24"), net("203.0.113.9/32")]);
        assert!(!e.expire(now + Duration::from_secs(59)));
        assert!(e.expire(now + Duration::from_secs(61)));
        assert_eq!(e.destinations(), vec![net("198.51.100.0/24")]);
    }

    #[test]
    fn the_exit_is_chosen_by_policy_then_cost_and_says_whether_it_masquerades() {
        let masq = Policy { willing: Willing { internet_masquerade: true, ..Willing::default() }, ..Policy::default() };
        let open = Policy { connectivity: Connectivity::Unrestricted, willing: Willing { internet: true, ..Willing::default() }, priority: 50, ..Policy::default() };
        let none = Policy::default();
        let last = Policy { commitment: Commitment::LastResort, ..masq.clone() };
        let c = |peer, policy, usable, cost_ms| ExitCandidate { peer, policy, own: vec![], usable, cost_ms };
        let src: IpAddr = "10.77.0.1".parse().unwrap();
        let dst: IpAddr = "203.0.113.9".parse().unwrap();
        // A node without exit is never chosen; priority before cost.
        assert_eq!(Exits::choose(&[c(0, &none, true, 1.0), c(1, &open, true, 1.0), c(2, &masq, true, 50.0)], src, dst, 0), Some((2, Egress::Masquerade)));
        assert_eq!(Exits::choose(&[c(1, &open, true, 1.0), c(2, &masq, false, 50.0)], src, dst, 0), Some((1, Egress::Keep)));
        // Class before priority: the last resort only when nothing else.
        let last_hi = Policy { priority: 255, ..last };
        assert_eq!(Exits::choose(&[c(3, &last_hi, true, 1.0), c(1, &open, true, 9.0)], src, dst, 0), Some((1, Egress::Keep)));
        assert_eq!(Exits::choose(&[c(3, &last_hi, true, 1.0), c(1, &open, false, 9.0)], src, dst, 0), Some((3, Egress::Masquerade)));
        assert_eq!(Exits::choose(&[c(0, &none, true, 1.0)], src, dst, 0), None);
        let mut e = Exits::new(&cfg());
        e.handle_unreachable(Instant::now(), dst);
        let plan = e.plan(&[c(2, &masq, true, 5.0)], Some(src), None, 0);
        assert_eq!(plan, vec![ExitRoute { dst: net("198.51.100.0/24"), via: 2, masquerade: true, src: None }, ExitRoute { dst: net("203.0.113.9/32"), via: 2, masquerade: true, src: None }]);
    }
}
