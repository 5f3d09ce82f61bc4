//! Admission of management handshakes under flood, sans I/O: what to do with each QUIC
//! connection attempt arriving on the management port before any cryptographic work is
//! spent on it.
//!
//! Modelled on kernel WireGuard's handshake defences (`drivers/net/wireguard/ratelimiter.c`
//! and `cookie.c`: 20 handshakes/s per source with a burst of 5, IPv6 sources grouped by
//! /64; cookie replies once 512 handshakes are queued) with QUIC's own tool for the second
//! part, address validation by a Retry packet (RFC 9000 §8.1.2):
//!
//! 1. More than [`AdmissionConfig::max_pending`] handshakes in progress: the attempt is
//!    dropped unanswered ([`Refusal::PendingFull`]).
//! 2. The source (an IPv4 address, an IPv6 /64) is over its token bucket
//!    ([`AdmissionConfig::rate`] per second, bursts of [`AdmissionConfig::burst`]): dropped
//!    ([`Refusal::RateLimited`]). Every attempt takes a token, Retry or not, so a forged
//!    source cannot make the node send a victim more than that rate of Retry packets.
//! 3. More than [`AdmissionConfig::retry_above`] handshakes in progress and the source's
//!    address not yet validated: answered with a Retry ([`Admit::Retry`]), which costs the
//!    node no state; only a source that really receives at its address comes back with
//!    the token (a legitimate handshake then takes two tokens).
//! 4. Otherwise the handshake goes ahead ([`Admit::Accept`]).
//!
//! Keys that are neither configured nor in the directory never get a session: the TLS
//! handshake refuses them (the shell's `refused` counter), so their cap is 0.
//!
//! The shell counts the handshakes in progress and passes the count in; this module keeps
//! the per-source buckets (at most [`MAX_SOURCES`] of them) and the counters.

use std::net::IpAddr;
use std::time::Instant;

use crate::overlay::api::RateLimiter;

/// Limits of [`Admission`] (`[management]` handshake_* settings).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdmissionConfig {
    /// Handshakes in progress above which new attempts are dropped (default 512).
    pub max_pending: usize,
    /// Handshakes in progress above which unvalidated sources get a Retry (default 64).
    pub retry_above: usize,
    /// Handshakes per second admitted from one source (default 20).
    pub rate: u32,
    /// Burst of handshakes from one source (default 5).
    pub burst: u32,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig { max_pending: 512, retry_above: 64, rate: 20, burst: 5 }
    }
}

/// Sources tracked at most; past it, buckets that have refilled are forgotten first, and
/// if none has, the table is cleared (a flood from more sources than this is handled by
/// the pending cap and Retry).
pub const MAX_SOURCES: usize = 16_384;

/// What to do with one connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Go on with the handshake.
    Accept,
    /// Answer with a QUIC Retry (address validation).
    Retry,
    /// Drop it unanswered.
    Refuse(Refusal),
}

/// Why an attempt was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Too many handshakes in progress.
    PendingFull,
    /// The source is over its handshake rate.
    RateLimited,
}

/// Counts of [`Admission`]'s decisions since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AdmissionCounters {
    /// Handshakes let through.
    pub accepted: u64,
    /// Retry packets sent.
    pub retried: u64,
    /// Attempts dropped because the source was over its rate.
    pub rate_limited: u64,
    /// Attempts dropped because too many handshakes were in progress.
    pub pending_full: u64,
}

/// The admission state: per-source token buckets and counters.
#[derive(Debug)]
pub struct Admission {
    cfg: AdmissionConfig,
    /// Token buckets per source key.
    buckets: RateLimiter<SourceKey>,
    counters: AdmissionCounters,
}

/// An IPv4 address, or the /64 of an IPv6 one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum SourceKey {
    V4(u32),
    V6(u64),
}

impl SourceKey {
    fn of(ip: IpAddr) -> SourceKey {
        match ip {
            IpAddr::V4(a) => SourceKey::V4(u32::from(a)),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => SourceKey::V4(u32::from(v4)),
                None => SourceKey::V6((u128::from(a) >> 64) as u64),
            },
        }
    }
}

impl Admission {
    /// An admission state with the given limits (`rate` and `burst` at least 1).
    pub fn new(cfg: AdmissionConfig) -> Admission {
        Admission { cfg, buckets: RateLimiter::with_burst(cfg.rate, cfg.burst, MAX_SOURCES), counters: AdmissionCounters::default() }
    }

    /// Decides on an attempt from `src` at `now`; `validated`: the attempt carries a valid
    /// Retry token (its source address is proven); `pending`: handshakes in progress.
    pub fn admit(&mut self, now: Instant, src: IpAddr, validated: bool, pending: usize) -> Admit {
        let verdict = if pending >= self.cfg.max_pending {
            Admit::Refuse(Refusal::PendingFull)
        } else if !self.buckets.allow(now, SourceKey::of(src)) {
            // Before the Retry: a source cannot make the node send more than its rate of
            // Retry packets (to a victim whose address it forges).
            Admit::Refuse(Refusal::RateLimited)
        } else if pending >= self.cfg.retry_above && !validated {
            Admit::Retry
        } else {
            Admit::Accept
        };
        match verdict {
            Admit::Accept => self.counters.accepted += 1,
            Admit::Retry => self.counters.retried += 1,
            Admit::Refuse(Refusal::PendingFull) => self.counters.pending_full += 1,
            Admit::Refuse(Refusal::RateLimited) => self.counters.rate_limited += 1,
        }
        verdict
    }

    /// The counters so far.
    pub fn counters(&self) -> AdmissionCounters {
        self.counters
    }

    /// Sources with a bucket.
    pub fn sources(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;
    use std::time::Duration;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_source_gets_its_burst_then_its_rate() {
        let mut a = Admission::new(AdmissionConfig::default());
        let t0 = Instant::now();
        for _ in 0..5 {
            assert_eq!(a.admit(t0, ip("192.0.2.1"), false, 0), Admit::Accept);
        }
        assert_eq!(a.admit(t0, ip("192.0.2.1"), false, 0), Admit::Refuse(Refusal::RateLimited));
        // another source is not affected
        assert_eq!(a.admit(t0, ip("192.0.2.2"), false, 0), Admit::Accept);
        // 20/s: one more token after 50 ms
        assert_eq!(a.admit(t0 + Duration::from_millis(50), ip("192.0.2.1"), false, 0), Admit::Accept);
        assert_eq!(a.admit(t0 + Duration::from_millis(51), ip("192.0.2.1"), false, 0), Admit::Refuse(Refusal::RateLimited));
        let c = a.counters();
        assert_eq!((c.accepted, c.rate_limited), (7, 2));
    }

    #[test]
    fn ipv6_sources_share_a_bucket_per_64_and_mapped_addresses_count_as_ipv4() {
        let mut a = Admission::new(AdmissionConfig { burst: 2, ..AdmissionConfig::default() });
        let t0 = Instant::now();
        assert_eq!(a.admit(t0, ip("2001:db8:1:2::1"), false, 0), Admit::Accept);
        assert_eq!(a.admit(t0, ip("2001:db8:1:2::ffff"), false, 0), Admit::Accept);
        assert_eq!(a.admit(t0, ip("2001:db8:1:2:abcd::1"), false, 0), Admit::Refuse(Refusal::RateLimited));
        assert_eq!(a.admit(t0, ip("2001:db8:1:3::1"), false, 0), Admit::Accept);
        assert_eq!(a.admit(t0, ip("192.0.2.9"), false, 0), Admit::Accept);
        assert_eq!(a.admit(t0, ip("::ffff:192.0.2.9"), false, 0), Admit::Accept);
        assert_eq!(a.admit(t0, ip("192.0.2.9"), false, 0), Admit::Refuse(Refusal::RateLimited));
    }

    #[test]
    fn past_the_retry_threshold_only_validated_sources_go_ahead_and_past_the_cap_none() {
        let cfg = AdmissionConfig { max_pending: 10, retry_above: 4, rate: 1000, burst: 1000 };
        let mut a = Admission::new(cfg);
        let t0 = Instant::now();
        assert_eq!(a.admit(t0, ip("192.0.2.1"), false, 3), Admit::Accept);
        assert_eq!(a.admit(t0, ip("192.0.2.1"), false, 4), Admit::Retry);
        assert_eq!(a.admit(t0, ip("192.0.2.1"), true, 4), Admit::Accept);
        assert_eq!(a.admit(t0, ip("192.0.2.1"), true, 10), Admit::Refuse(Refusal::PendingFull));
        assert_eq!(a.admit(t0, ip("192.0.2.1"), false, 11), Admit::Refuse(Refusal::PendingFull));
        assert_eq!(a.counters(), AdmissionCounters { accepted: 2, retried: 1, rate_limited: 0, pending_full: 2 });
    }

    #[test]
    fn a_source_gets_no_more_retries_than_its_rate() {
        let cfg = AdmissionConfig { max_pending: 100, retry_above: 0, rate: 1, burst: 2 };
        let mut a = Admission::new(cfg);
        let t0 = Instant::now();
        assert_eq!(a.admit(t0, ip("192.0.2.1"), false, 0), Admit::Retry);
        assert_eq!(a.admit(t0, ip("192.0.2.1"), true, 0), Admit::Accept);
        for _ in 0..10 {
            assert_eq!(a.admit(t0, ip("192.0.2.1"), false, 0), Admit::Refuse(Refusal::RateLimited));
        }
        assert_eq!(a.counters(), AdmissionCounters { accepted: 1, retried: 1, rate_limited: 10, pending_full: 0 });
    }

    proptest! {
        /// Whatever the sources and timing: the table stays bounded, nothing is accepted
        /// past the cap, and no source gets more than its burst plus its rate over time.
        #[test]
        fn bounded_and_fair(steps in prop::collection::vec((any::<u32>(), 0u64..50, any::<bool>(), 0usize..700), 1..3000)) {
            let cfg = AdmissionConfig::default();
            let mut a = Admission::new(cfg);
            let t0 = Instant::now();
            let mut t = t0;
            let mut per_source: HashMap<u32, u64> = HashMap::new();
            for (src, dt, validated, pending) in steps {
                t += Duration::from_millis(dt);
                let src = src % 64;
                let v = a.admit(t, IpAddr::V4(src.into()), validated, pending);
                prop_assert!(a.sources() <= MAX_SOURCES);
                if pending >= cfg.max_pending {
                    prop_assert_eq!(v, Admit::Refuse(Refusal::PendingFull));
                }
                if v == Admit::Accept {
                    prop_assert!(pending < cfg.max_pending && (validated || pending < cfg.retry_above));
                    *per_source.entry(src).or_default() += 1;
                }
            }
            let secs = t.duration_since(t0).as_secs_f64();
            for (_, n) in per_source {
                prop_assert!(n as f64 <= f64::from(cfg.burst) + secs * f64::from(cfg.rate) + 1e-9);
            }
        }
    }
}
