//! The session-want policy: why a node wants a management session with a peer, which
//! sessions are watched closely, and when a link to a directory node starts or stops
//! carrying forwarding traffic (spec A§1.3.2, A§2.2; seeds-digest items 32-36).
//!
//! A peer is **wanted** for one or more reasons ([`want`]): it is configured (always), the
//! management overlay chose it as a neighbour, forwarding traffic uses the link (from the
//! first packet until [`crate::config::ManagementConfig::idle_timeout`] passes without
//! traffic), or a relay session this node serves needs it. The shell's session table
//! dials a wanted peer; these rules decide when it starts and stops and what it watches.

use std::time::{Duration, Instant};

use crate::overlay::session::{SilenceLimits, UNWATCHED, WATCHED};

/// Reasons a peer is wanted (bits of [`LinkState::want`]).
pub mod want {
    /// A configured peer.
    pub const CONFIGURED: u8 = 1;
    /// A management neighbour chosen by the overlay.
    pub const NEIGHBOUR: u8 = 2;
    /// Forwarding traffic uses the link.
    pub const DATA: u8 = 4;
    /// A relay session this node serves needs the link.
    pub const RELAY: u8 = 8;
}

/// What adding or removing a reason did to a peer's wanted-ness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WantChange {
    /// The reasons are as they were.
    Same,
    /// The reasons changed; the peer is wanted (`true`) or not.
    Changed(bool),
}

/// What a look at a link's traffic found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    /// Traffic moved since the last look: the link is in use (it gets a TUN, a session and
    /// path monitoring, or keeps them).
    Busy,
    /// A link in use saw no traffic for the idle timeout: it is released.
    Idle,
    /// Nothing to do.
    Quiet,
}

/// The session-want state of one peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkState {
    /// Why the peer is wanted ([`want`] bits).
    pub want: u8,
    /// Last time forwarding traffic was seen on the link.
    pub data_at: Option<Instant>,
    /// Traffic counter (bytes both ways) at the last look.
    pub bytes_seen: u64,
}

impl LinkState {
    /// Adds (`on`) or removes reason `bit`.
    pub fn set_want(&mut self, bit: u8, on: bool) -> WantChange {
        let before = self.want;
        if on {
            self.want |= bit;
        } else {
            self.want &= !bit;
        }
        if before == self.want {
            WantChange::Same
        } else {
            WantChange::Changed(self.want != 0)
        }
    }

    /// Whether the peer is wanted for any reason.
    pub fn wanted(&self) -> bool {
        self.want != 0
    }

    /// Forwarding traffic uses the link now; true the first time (the link becomes in use).
    pub fn traffic(&mut self, now: Instant) -> bool {
        self.data_at = Some(now);
        self.want & want::DATA == 0
    }

    /// The link is released: no traffic time any more.
    pub fn idle(&mut self) {
        self.data_at = None;
    }

    /// A look at the link's traffic counter (`bytes`, both ways, cumulative) at `now`:
    /// traffic that moved makes it busy; a link in use without traffic for `idle_timeout`
    /// becomes idle.
    pub fn look(&mut self, now: Instant, bytes: u64, idle_timeout: Duration) -> Activity {
        let moved = bytes != self.bytes_seen;
        self.bytes_seen = bytes;
        if moved {
            Activity::Busy
        } else if self.want & want::DATA != 0 && self.data_at.is_none_or(|t| now.saturating_duration_since(t) >= idle_timeout) {
            Activity::Idle
        } else {
            Activity::Quiet
        }
    }

    /// Whether the direct path to the peer is monitored by the failover (configured peers
    /// and links that carry traffic).
    pub fn monitored(&self) -> bool {
        self.want & (want::CONFIGURED | want::DATA) != 0
    }

    /// How a silent session is treated: a monitored one is closed after the failover's
    /// longer timeout; any other is polled when it falls silent and closed sooner.
    pub fn silence_limits(&self) -> SilenceLimits {
        if self.monitored() {
            WATCHED
        } else {
            UNWATCHED
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_add_up_and_only_the_last_one_gone_unwants_a_peer() {
        let mut l = LinkState::default();
        assert!(!l.wanted());
        assert_eq!(l.set_want(want::NEIGHBOUR, true), WantChange::Changed(true));
        assert_eq!(l.set_want(want::NEIGHBOUR, true), WantChange::Same);
        assert_eq!(l.set_want(want::RELAY, true), WantChange::Changed(true));
        assert_eq!(l.set_want(want::NEIGHBOUR, false), WantChange::Changed(true), "still wanted for the relay");
        assert_eq!(l.set_want(want::RELAY, false), WantChange::Changed(false));
        assert_eq!(l.set_want(want::DATA, false), WantChange::Same);
    }

    #[test]
    fn a_link_is_busy_while_traffic_moves_and_idle_after_the_timeout() {
        let t0 = Instant::now();
        let idle = Duration::from_secs(60);
        let mut l = LinkState::default();
        assert_eq!(l.look(t0, 0, idle), Activity::Quiet, "no traffic, not in use");
        assert_eq!(l.look(t0, 1500, idle), Activity::Busy);
        assert!(l.traffic(t0), "first use");
        l.set_want(want::DATA, true);
        assert!(!l.traffic(t0), "already in use");
        assert!(l.monitored());
        assert_eq!(l.silence_limits(), WATCHED);
        assert_eq!(l.look(t0 + Duration::from_secs(30), 1500, idle), Activity::Quiet, "quiet, within the timeout");
        assert_eq!(l.look(t0 + Duration::from_secs(59), 3000, idle), Activity::Busy);
        l.traffic(t0 + Duration::from_secs(59));
        assert_eq!(l.look(t0 + Duration::from_secs(100), 3000, idle), Activity::Quiet, "41 s after the last traffic");
        assert_eq!(l.look(t0 + Duration::from_secs(119), 3000, idle), Activity::Idle);
        l.idle();
        l.set_want(want::DATA, false);
        assert!(!l.monitored());
        assert_eq!(l.silence_limits(), UNWATCHED);
        assert_eq!(l.look(t0 + Duration::from_secs(200), 3000, idle), Activity::Quiet, "a released link stays quiet");
    }

    #[test]
    fn configured_peers_are_watched_closely() {
        let mut l = LinkState::default();
        l.set_want(want::CONFIGURED, true);
        assert!(l.monitored());
        assert_eq!(l.silence_limits(), WATCHED);
    }
}
