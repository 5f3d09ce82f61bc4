//! Relay policies, sans I/O: what a node offers to relay and exit, and how relays are
//! ranked (spec A§1.2 "participant classification", A§3.3 problem 1, A§3.6; seeds-digest
//! items 20–27, 62a, 70–73).
//!
//! A node publishes its [`Policy`] in its directory record. Requesters read it to decide
//! whom to ask ([`Policy::relay_check`], [`RelayRank`]); the node itself checks every request
//! against it and refuses, with a counted [`Refusal`], what it does not offer. The egress
//! of a packet that leaves the overlay for a host that is not a participant (an exit, or a
//! network behind a router) decides with [`Policy::egress`] whether the packet keeps its
//! source address or is masqueraded.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::overlay::directory::Uptime;

/// Commitment class (spec A§1.2.2, item 24): when a node relays for others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Commitment {
    /// (i) Relays any traffic at all times, also to spread load (REPLEX).
    Always,
    /// (ii) Relays only while a path has failed, not for mere performance.
    Failure,
    /// (iii) Relays only when no other participant can be used as the relay.
    LastResort,
    /// Never relays (`node.relay = false`).
    Never,
}

impl Commitment {
    /// Config and status spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Commitment::Always => "always",
            Commitment::Failure => "failure",
            Commitment::LastResort => "last_resort",
            Commitment::Never => "never",
        }
    }

    /// Whether a request for `purpose` falls within this commitment.
    pub fn accepts(self, purpose: Purpose) -> bool {
        match self {
            Commitment::Always => true,
            Commitment::Failure => purpose != Purpose::Performance,
            Commitment::LastResort => purpose == Purpose::LastResort,
            Commitment::Never => false,
        }
    }
}

/// Why a requester wants a relay; carried in the relay request so that the relay can
/// check it against its [`Commitment`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    /// To carry part of the traffic while the direct path works (REPLEX shares).
    Performance,
    /// Standby for, or use during, a failure of the direct path.
    #[default]
    Failover,
    /// The direct path failed and no other relay works.
    LastResort,
}

impl Purpose {
    /// Status spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Performance => "performance",
            Purpose::Failover => "failover",
            Purpose::LastResort => "last_resort",
        }
    }
}

/// Connectivity class (spec A§1.2.1, item 21): whether, and towards which destinations, a
/// node can send packets with a source address other than its own without the underlay
/// filtering them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Connectivity {
    /// (a) An individual host: only its own addresses; it can relay to outside hosts only
    /// by masquerading.
    Host,
    /// (b) A host in a broadcast domain: foreign sources only towards hosts of its own
    /// networks.
    BroadcastDomain,
    /// (c) A router whose upstream accepts only the sources of its own networks: foreign
    /// sources towards its own networks, its networks' sources upstream.
    SubnetRouter,
    /// (d) A router or machine whose packets are never filtered by source.
    Unrestricted,
    /// (e) Like (c), and besides its networks' sources the `source_prefixes` pass upstream.
    Partial,
}

impl Connectivity {
    /// Config and status spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Connectivity::Host => "host",
            Connectivity::BroadcastDomain => "broadcast_domain",
            Connectivity::SubnetRouter => "subnet_router",
            Connectivity::Unrestricted => "unrestricted",
            Connectivity::Partial => "partial",
        }
    }
}

/// Willingness by traffic destination (spec A§1.2.2, item 22).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Willing {
    /// Deliver overlay traffic to hosts of its own networks (its broadcast domain, the
    /// networks behind it).
    pub local: bool,
    /// Relay between other overlay nodes (end-to-end encrypted, never opened).
    pub overlay: bool,
    /// Send overlay traffic on to Internet hosts with the original source address.
    pub internet: bool,
    /// Send overlay traffic on to Internet hosts with its own address as the source
    /// (masquerade).
    pub internet_masquerade: bool,
}

impl Default for Willing {
    fn default() -> Self {
        Willing { local: true, overlay: true, internet: false, internet_masquerade: false }
    }
}

/// A node's published relay policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Commitment class.
    pub commitment: Commitment,
    /// Priority among relays of the same commitment class, 0..=255; higher is preferred
    /// (spec item 25).
    pub priority: u8,
    /// Connectivity class.
    pub connectivity: Connectivity,
    /// For [`Connectivity::Partial`]: foreign source prefixes its upstream lets through.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_prefixes: Vec<IpNet>,
    /// Willingness by destination.
    pub willing: Willing,
    /// Configured lifespan class.
    pub lifespan: Uptime,
    /// Unix time (s) the node's daemon started: its measured uptime.
    #[serde(default)]
    pub up_since: u64,
    /// Outside prefixes it exits to (empty: any), when it offers exit.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exit_prefixes: Vec<IpNet>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            commitment: Commitment::Always,
            priority: DEFAULT_PRIORITY,
            connectivity: Connectivity::Host,
            source_prefixes: Vec::new(),
            willing: Willing::default(),
            lifespan: Uptime::Stable,
            up_since: 0,
            exit_prefixes: Vec::new(),
        }
    }
}

/// Default relay priority.
pub const DEFAULT_PRIORITY: u8 = 100;
/// A node up this long counts as stable whatever its configured lifespan (spec A§1.2.3:
/// stable hosts have uptimes of "days to years").
pub const STABLE_AFTER_S: u64 = 24 * 3600;

/// Why a node refuses a request (counted per reason by the refusing node, and shown by
/// the requester).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Refusal {
    /// Its commitment is `never` (or `node.relay = false`).
    NoRelay,
    /// Failure-only: not for performance (REPLEX).
    NotForPerformance,
    /// Last resort only, and the request was not one.
    LastResortOnly,
    /// It does not relay between overlay nodes.
    NoOverlay,
    /// It does not exit to Internet hosts (in this way, or to this prefix).
    NoExit,
    /// It does not deliver to its own networks for others.
    NoLocal,
}

impl Refusal {
    /// Status and metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::NoRelay => "no_relay",
            Refusal::NotForPerformance => "failure_only",
            Refusal::LastResortOnly => "last_resort_only",
            Refusal::NoOverlay => "no_overlay",
            Refusal::NoExit => "no_exit",
            Refusal::NoLocal => "no_local",
        }
    }

    /// Every reason, for metrics.
    pub const ALL: [Refusal; 6] = [Refusal::NoRelay, Refusal::NotForPerformance, Refusal::LastResortOnly, Refusal::NoOverlay, Refusal::NoExit, Refusal::NoLocal];
}

/// How a packet leaves the overlay at its egress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Egress {
    /// With its own source address.
    Keep,
    /// With the egress node's address (kernel NAT; return traffic is translated back).
    Masquerade,
}

impl Policy {
    /// The commitment-class check of a relay request between overlay nodes: `Ok` or why
    /// not.
    pub fn relay_check(&self, purpose: Purpose) -> Result<(), Refusal> {
        if self.commitment == Commitment::Never {
            return Err(Refusal::NoRelay);
        }
        if !self.willing.overlay {
            return Err(Refusal::NoOverlay);
        }
        if self.commitment.accepts(purpose) {
            return Ok(());
        }
        Err(match self.commitment {
            Commitment::Failure => Refusal::NotForPerformance,
            _ => Refusal::LastResortOnly,
        })
    }

    /// Whether it is willing to exit at all (either way), and to `dst` (its exit prefixes).
    pub fn exits_to(&self, dst: IpAddr) -> bool {
        (self.willing.internet || self.willing.internet_masquerade) && self.commitment != Commitment::Never && (self.exit_prefixes.is_empty() || self.exit_prefixes.iter().any(|n| n.contains(&dst)))
    }

    /// Whether this node may send a packet with the foreign source `src` towards `dst`
    /// without the underlay filtering it; `own` are its own networks (prefixes behind it,
    /// its broadcast domain).
    pub fn can_keep_source(&self, own: &[IpNet], src: IpAddr, dst: IpAddr) -> bool {
        let dst_local = own.iter().any(|n| n.contains(&dst));
        let src_own = own.iter().any(|n| n.contains(&src));
        match self.connectivity {
            Connectivity::Host => false,
            Connectivity::BroadcastDomain => dst_local,
            Connectivity::SubnetRouter => dst_local || src_own,
            Connectivity::Unrestricted => true,
            Connectivity::Partial => dst_local || src_own || self.source_prefixes.iter().any(|n| n.contains(&src)),
        }
    }

    /// How a packet from another node (`src`, not this node's address) to `dst`, a host
    /// that does not run detour, leaves the overlay here, or why it may not. Towards its
    /// own networks (`own`) it needs `willing.local`; towards the Internet it exits when
    /// the node offers exit to `dst`, keeping the source where both `willing.internet` and
    /// the connectivity class allow it, masquerading otherwise (`willing.internet_masquerade`).
    /// A node that cannot keep the source towards its own networks masquerades there.
    pub fn egress(&self, own: &[IpNet], src: IpAddr, dst: IpAddr) -> Result<Egress, Refusal> {
        if own.iter().any(|n| n.contains(&dst)) {
            if !self.willing.local {
                return Err(Refusal::NoLocal);
            }
            return Ok(if self.can_keep_source(own, src, dst) { Egress::Keep } else { Egress::Masquerade });
        }
        if !self.exits_to(dst) {
            return Err(Refusal::NoExit);
        }
        if self.willing.internet && self.can_keep_source(own, src, dst) {
            return Ok(Egress::Keep);
        }
        if self.willing.internet_masquerade {
            return Ok(Egress::Masquerade);
        }
        Err(Refusal::NoExit)
    }

    /// The policy in words for status, at unix time `now_s`: commitment, priority,
    /// effective lifespan, connectivity class and what it lets through.
    pub fn describe(&self, now_s: u64) -> String {
        let w = &self.willing;
        let offers: Vec<&str> = [(w.overlay && self.commitment != Commitment::Never, "relay"), (w.local, "local delivery"), (w.internet, "exit"), (w.internet_masquerade, "masquerading exit")]
            .into_iter()
            .filter_map(|(on, what)| on.then_some(what))
            .collect();
        format!("{}, connectivity {}; offers {}", self.summary(now_s), self.connectivity.as_str(), if offers.is_empty() { "nothing".to_string() } else { offers.join(", ") })
    }

    /// What ranks it as a relay, in words: `always priority 100 stable`.
    pub fn summary(&self, now_s: u64) -> String {
        format!("{} priority {} {}", self.commitment.as_str(), self.priority, self.lifespan_at(now_s).as_str())
    }

    /// Effective lifespan at unix time `now_s`: the configured class, except that a node
    /// up for [`STABLE_AFTER_S`] counts as stable.
    pub fn lifespan_at(&self, now_s: u64) -> Uptime {
        if self.lifespan == Uptime::Stable || (self.up_since > 0 && now_s.saturating_sub(self.up_since) >= STABLE_AFTER_S) {
            Uptime::Stable
        } else {
            Uptime::Ephemeral
        }
    }
}

/// The policy part of a relay's rank: lower sorts first. Among acceptable relays the
/// commitment class comes first (always, then failure-only, then last resort), then the
/// priority (higher first), then stable before ephemeral; measured quality only orders
/// relays equal in all three (spec items 24–26, 62).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelayRank {
    /// Commitment class.
    pub commitment: Commitment,
    /// 255 − priority.
    pub inv_priority: u8,
    /// 0 stable, 1 ephemeral.
    pub ephemeral: u8,
}

impl RelayRank {
    /// The rank of a relay with `policy` at unix time `now_s`; a node unwilling to relay
    /// between overlay nodes ranks as `never`, so it is never asked.
    pub fn of(policy: &Policy, now_s: u64) -> RelayRank {
        let commitment = if policy.willing.overlay { policy.commitment } else { Commitment::Never };
        RelayRank { commitment, inv_priority: 255 - policy.priority, ephemeral: u8::from(policy.lifespan_at(now_s) == Uptime::Ephemeral) }
    }
}

impl Default for RelayRank {
    fn default() -> Self {
        RelayRank::of(&Policy::default(), 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }
    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn commitment_classes_accept_their_purposes() {
        use Purpose::*;
        let p = |c| Policy { commitment: c, ..Policy::default() };
        assert_eq!(p(Commitment::Always).relay_check(Performance), Ok(()));
        assert_eq!(p(Commitment::Failure).relay_check(Performance), Err(Refusal::NotForPerformance));
        assert_eq!(p(Commitment::Failure).relay_check(Failover), Ok(()));
        assert_eq!(p(Commitment::LastResort).relay_check(Failover), Err(Refusal::LastResortOnly));
        assert_eq!(p(Commitment::LastResort).relay_check(LastResort), Ok(()));
        assert_eq!(p(Commitment::Never).relay_check(LastResort), Err(Refusal::NoRelay));
        let no_overlay = Policy { willing: Willing { overlay: false, ..Willing::default() }, ..Policy::default() };
        assert_eq!(no_overlay.relay_check(Failover), Err(Refusal::NoOverlay));
        assert!(p(Commitment::Failure).relay_check(Performance).is_err());
        assert!(p(Commitment::Failure).relay_check(Failover).is_ok());
    }

    #[test]
    fn rank_orders_class_then_priority_then_lifespan() {
        let now = 1_000_000;
        let r = |c, prio, life| RelayRank::of(&Policy { commitment: c, priority: prio, lifespan: life, up_since: now - 10, ..Policy::default() }, now);
        assert!(r(Commitment::Always, 0, Uptime::Ephemeral) < r(Commitment::Failure, 255, Uptime::Stable));
        assert!(r(Commitment::Failure, 0, Uptime::Ephemeral) < r(Commitment::LastResort, 255, Uptime::Stable));
        assert!(r(Commitment::Always, 200, Uptime::Ephemeral) < r(Commitment::Always, 100, Uptime::Stable));
        assert!(r(Commitment::Always, 100, Uptime::Stable) < r(Commitment::Always, 100, Uptime::Ephemeral));
        // A long-running ephemeral node counts as stable.
        let old = Policy { lifespan: Uptime::Ephemeral, up_since: now - STABLE_AFTER_S, ..Policy::default() };
        assert_eq!(old.lifespan_at(now), Uptime::Stable);
        assert_eq!(Policy { up_since: now - 5, ..old }.lifespan_at(now), Uptime::Ephemeral);
        // Unwilling to relay between overlay nodes: never asked, whatever its commitment.
        let exit_only = Policy { willing: Willing { overlay: false, internet_masquerade: true, ..Willing::default() }, ..Policy::default() };
        assert_eq!(RelayRank::of(&exit_only, now).commitment, Commitment::Never);
    }

    #[test]
    fn connectivity_classes_decide_the_source() {
        let own = [net("192.168.1.0/24")];
        let (foreign, lan, inet) = (ip("198.51.100.7"), ip("192.168.1.9"), ip("203.0.113.5"));
        let p = |c| Policy { connectivity: c, source_prefixes: vec![net("198.51.100.0/24")], ..Policy::default() };
        // (a) host: never a foreign source.
        assert!(!p(Connectivity::Host).can_keep_source(&own, foreign, lan));
        // (b) only towards its broadcast domain.
        assert!(p(Connectivity::BroadcastDomain).can_keep_source(&own, foreign, lan));
        assert!(!p(Connectivity::BroadcastDomain).can_keep_source(&own, foreign, inet));
        // (c) towards its networks, and its networks' sources upstream.
        assert!(p(Connectivity::SubnetRouter).can_keep_source(&own, foreign, lan));
        assert!(p(Connectivity::SubnetRouter).can_keep_source(&own, lan, inet));
        assert!(!p(Connectivity::SubnetRouter).can_keep_source(&own, foreign, inet));
        // (d) anything.
        assert!(p(Connectivity::Unrestricted).can_keep_source(&own, foreign, inet));
        // (e) the listed foreign prefixes too.
        assert!(p(Connectivity::Partial).can_keep_source(&own, foreign, inet));
        assert!(!p(Connectivity::Partial).can_keep_source(&own, ip("203.0.113.99"), inet));
    }

    #[test]
    fn egress_keeps_masquerades_or_refuses() {
        let own = [net("192.168.1.0/24")];
        let (src, lan, inet) = (ip("198.51.100.7"), ip("192.168.1.9"), ip("203.0.113.5"));
        let router = Policy { connectivity: Connectivity::SubnetRouter, ..Policy::default() };
        assert_eq!(router.egress(&own, src, lan), Ok(Egress::Keep));
        assert_eq!(router.egress(&own, src, inet), Err(Refusal::NoExit));
        let host = Policy { connectivity: Connectivity::Host, ..Policy::default() };
        assert_eq!(host.egress(&own, src, lan), Ok(Egress::Masquerade));
        let no_local = Policy { willing: Willing { local: false, ..Willing::default() }, ..router.clone() };
        assert_eq!(no_local.egress(&own, src, lan), Err(Refusal::NoLocal));
        let exit = Policy { willing: Willing { internet_masquerade: true, ..Willing::default() }, ..host.clone() };
        assert_eq!(exit.egress(&own, src, inet), Ok(Egress::Masquerade));
        let open = Policy { connectivity: Connectivity::Unrestricted, willing: Willing { internet: true, internet_masquerade: true, ..Willing::default() }, ..Policy::default() };
        assert_eq!(open.egress(&own, src, inet), Ok(Egress::Keep));
        let scoped = Policy { exit_prefixes: vec![net("203.0.113.0/24")], ..exit.clone() };
        assert_eq!(scoped.egress(&own, src, inet), Ok(Egress::Masquerade));
        assert_eq!(scoped.egress(&own, src, ip("8.8.8.8")), Err(Refusal::NoExit));
        let never = Policy { commitment: Commitment::Never, ..exit };
        assert_eq!(never.egress(&own, src, inet), Err(Refusal::NoExit));
    }
}
