//! Lifecycle of the management session with one peer, sans I/O.
//!
//! Both ends dial whenever they have no session, with exponential backoff capped at a few
//! seconds. When two connections exist at once (simultaneous dials, or a peer that
//! restarted), both ends keep the same one: the connection initiated by the lower node ID;
//! between two initiated by the same node, the newer one. The shell opens and closes QUIC
//! connections as told and reports what happened; time and randomness come in as arguments.

use std::time::{Duration, Instant};

use crate::identity::NodeId;

/// Timers of the session lifecycle.
#[derive(Debug, Clone, Copy)]
pub struct SessionTimers {
    /// First retry delay after a failure.
    pub initial_backoff: Duration,
    /// Largest retry delay ("capped at a few seconds").
    pub max_backoff: Duration,
}

impl Default for SessionTimers {
    fn default() -> Self {
        SessionTimers { initial_backoff: Duration::from_millis(200), max_backoff: Duration::from_secs(3) }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Idle { next_dial: Instant },
    Dialing { since: Instant },
    Up { conn: u64, initiator: NodeId, since: Instant, ready: bool },
}

/// What to do with a connection that just completed its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Use it; close the replaced connection if any.
    Adopt {
        /// The previous session's connection, to be closed.
        replaced: Option<u64>,
    },
    /// Close it: the current session wins the tie-break.
    Refuse,
}

/// The management session state of one peer.
#[derive(Debug, Clone)]
pub struct PeerSession {
    local: NodeId,
    timers: SessionTimers,
    state: State,
    backoff: Duration,
    dialing: bool,
    /// Number of sessions established so far.
    pub established: u64,
}

impl PeerSession {
    /// A new session that will dial at `first_dial` (at once when that is now or past).
    pub fn new(local: NodeId, timers: SessionTimers, first_dial: Instant) -> PeerSession {
        PeerSession { local, timers, state: State::Idle { next_dial: first_dial }, backoff: timers.initial_backoff, dialing: false, established: 0 }
    }

    /// Returns true when the shell should start a dial now (at most one at a time).
    pub fn poll_dial(&mut self, now: Instant) -> bool {
        match self.state {
            State::Idle { next_dial } if now >= next_dial && !self.dialing => {
                self.state = State::Dialing { since: now };
                self.dialing = true;
                true
            }
            _ => false,
        }
    }

    /// When [`PeerSession::poll_dial`] should be called next.
    pub fn next_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Idle { next_dial } if !self.dialing => Some(next_dial),
            _ => None,
        }
    }

    /// A dial failed (every endpoint tried). `jitter` in [0, 1) spreads retries.
    pub fn on_dial_failed(&mut self, now: Instant, jitter: f64) {
        self.dialing = false;
        if let State::Dialing { .. } = self.state {
            self.retry_later(now, jitter);
        }
    }

    /// A connection to this peer completed its handshake; `initiator` is the node that
    /// dialled it. `from_own_dial` marks the end of the dial started by `poll_dial`.
    pub fn on_connection(&mut self, now: Instant, conn: u64, initiator: NodeId, from_own_dial: bool) -> Verdict {
        if from_own_dial {
            self.dialing = false;
        }
        match self.state {
            State::Up { conn: old, initiator: old_init, .. } => {
                // Lower initiator wins; the same initiator means a redial: the newer wins.
                if initiator <= old_init {
                    self.state = State::Up { conn, initiator, since: now, ready: false };
                    self.established += 1;
                    Verdict::Adopt { replaced: Some(old) }
                } else {
                    Verdict::Refuse
                }
            }
            _ => {
                self.state = State::Up { conn, initiator, since: now, ready: false };
                self.established += 1;
                Verdict::Adopt { replaced: None }
            }
        }
    }

    /// The session on `conn` completed its Hello and carries traffic: the next failure
    /// retries quickly again.
    pub fn on_ready(&mut self, conn: u64) {
        if let State::Up { conn: cur, ref mut ready, .. } = self.state {
            if cur == conn {
                *ready = true;
                self.backoff = self.timers.initial_backoff;
            }
        }
    }

    /// A connection closed. Only the current session's closing matters. After a session
    /// that was ready, the next dial comes after the initial backoff; a connection that
    /// closed before it was ready (the peer refused this node's key after the handshake,
    /// or the Hello failed) counts as a failed dial and the backoff keeps growing. A TLS 1.3
    /// client completes its handshake before the server has checked the client's
    /// certificate, so a peer that does not know this node yet refuses only afterwards:
    /// with the backoff reset at every such attempt, a node redialled a refusing peer
    /// every 300 ms (issue 11: 1,886 refused handshakes in the first 26 s of 100 nodes).
    /// Returns true when the current connection closed before it was ready.
    pub fn on_closed(&mut self, now: Instant, conn: u64, jitter: f64) -> bool {
        if let State::Up { conn: cur, ready, .. } = self.state {
            if cur == conn {
                if ready {
                    self.backoff = self.timers.initial_backoff;
                }
                self.retry_later(now, jitter);
                return !ready;
            }
        }
        false
    }

    fn retry_later(&mut self, now: Instant, jitter: f64) {
        let j = 0.75 + 0.5 * jitter.clamp(0.0, 1.0);
        let delay = self.backoff.mul_f64(j).min(self.timers.max_backoff);
        self.state = State::Idle { next_dial: now + delay };
        self.backoff = (self.backoff * 2).min(self.timers.max_backoff);
    }

    /// The current connection and since when it is up.
    pub fn current(&self) -> Option<(u64, Instant)> {
        match self.state {
            State::Up { conn, since, .. } => Some((conn, since)),
            _ => None,
        }
    }

    /// "up", "connecting" or "down" (waiting to retry).
    pub fn state_name(&self) -> &'static str {
        match self.state {
            State::Up { .. } => "up",
            State::Dialing { .. } => "connecting",
            State::Idle { .. } if self.dialing => "connecting",
            State::Idle { .. } => "down",
        }
    }

    /// This node's ID (the tie-break compares against it).
    pub fn local(&self) -> NodeId {
        self.local
    }
}

/// How long a session may stay silent before it counts as dead, and whether it is polled
/// on the way ([`Silence::check`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SilenceLimits {
    /// Silent this long (nothing received): dead.
    pub timeout: Duration,
    /// Silent this long: the session is polled (the shell sends something the peer must
    /// acknowledge at once), and again every [`POLL_EVERY`] until it hears something.
    /// `None`: never polled.
    pub poll_after: Option<Duration>,
}

/// Time between two polls of the same silence.
pub const POLL_EVERY: Duration = Duration::from_secs(1);

/// Limits for a session whose path the failover monitors (a configured peer, a link that
/// carries traffic): the failover notices a broken path within about a second and moves
/// the session's datagrams through a relay, so the session only has to outlive the repair
/// (the QUIC idle timeout, RFC 9000 §10.1). Ending it sooner would tear down the peer's
/// keys and paths, also in a direction that still works (a one-way cut).
pub const WATCHED: SilenceLimits = SilenceLimits { timeout: Duration::from_secs(6), poll_after: None };

/// Limits for a session nothing else watches (a management neighbour, a relay session, a
/// session another node opened): its own silence is the only sign that the peer failed,
/// and the overlay replaces a failed neighbour only once it is noticed. On a live session a
/// datagram arrives at least every keepalive interval (2 s); a session silent for 2.5 s is
/// polled (a lost keepalive is answered by the poll's acknowledgement within one RTT), and
/// one silent for 4 s — a keepalive and two polls unanswered — is dead (issue 11: after
/// 10 % of 100 nodes were killed, the last neighbour sets were complete again 10.4 s
/// later, 6-7 s of it waiting for the dead sessions to time out).
pub const UNWATCHED: SilenceLimits = SilenceLimits { timeout: Duration::from_secs(4), poll_after: Some(Duration::from_millis(2500)) };

/// What one [`Silence::check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heard {
    /// Nothing to do.
    Recently,
    /// Silent for [`SilenceLimits::poll_after`]: send something the peer acknowledges.
    Poll,
    /// Silent for [`SilenceLimits::timeout`]: close the session.
    Dead,
}

/// Liveness of an established session judged by what it receives, sans I/O.
///
/// QUIC's idle timeout (RFC 9000 §10.1) restarts when an endpoint sends an ack-eliciting
/// packet after the last one it received, so an end that sends anything (a link report, a
/// digest) after its peer died waits up to twice the timeout: at N = 100, after 10 % of the
/// nodes were killed, neighbours still held sessions with them 10.4 s later (issue 11). The
/// dialler sends a keepalive every 2 s and the other end acknowledges it, so on a live
/// session both ends receive a datagram at least that often; a session that received nothing
/// for the timeout of its [`SilenceLimits`] is dead. The shell feeds the session's count of
/// received datagrams (`quinn::ConnectionStats::udp_rx`) every half second or so.
///
/// A node that was itself late (its check ran more than `late_after` after the previous one,
/// because its event loop was starved) cannot tell a silent peer from its own lateness: the
/// watch starts over instead of blaming the session.
#[derive(Debug, Clone, Copy)]
pub struct Silence {
    late_after: Duration,
    conn: Option<u64>,
    count: u64,
    since: Option<Instant>,
    checked: Option<Instant>,
    polled: Option<Instant>,
}

impl Silence {
    /// A watch that discounts checks more than `late_after` apart.
    pub fn new(late_after: Duration) -> Silence {
        Silence { late_after, conn: None, count: 0, since: None, checked: None, polled: None }
    }

    /// One check of session `conn`, which has received `count` datagrams so far, against
    /// `limits` (which may change from check to check: a neighbour's link that starts to
    /// carry traffic becomes watched). A new `conn` starts the watch over.
    pub fn check(&mut self, now: Instant, conn: u64, count: u64, limits: SilenceLimits) -> Heard {
        let late = self.checked.is_some_and(|t| now.saturating_duration_since(t) > self.late_after);
        self.checked = Some(now);
        match self.since {
            Some(since) if self.conn == Some(conn) && count == self.count && !late => {
                let silent = now.saturating_duration_since(since);
                if silent >= limits.timeout {
                    Heard::Dead
                } else if limits.poll_after.is_some_and(|p| silent >= p) && self.polled.is_none_or(|t| now.saturating_duration_since(t) >= POLL_EVERY) {
                    self.polled = Some(now);
                    Heard::Poll
                } else {
                    Heard::Recently
                }
            }
            _ => {
                self.conn = Some(conn);
                self.count = count;
                self.since = Some(now);
                self.polled = None;
                Heard::Recently
            }
        }
    }

    /// The session ended: the next check starts over.
    pub fn reset(&mut self) {
        self.conn = None;
        self.since = None;
        self.checked = None;
        self.polled = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: NodeId = NodeId([1; 16]);
    const B: NodeId = NodeId([2; 16]);

    #[test]
    fn backoff_grows_and_is_capped() {
        let t0 = Instant::now();
        let mut s = PeerSession::new(A, SessionTimers::default(), t0);
        let mut now = t0;
        let mut delays = Vec::new();
        for _ in 0..8 {
            assert!(s.poll_dial(now));
            assert!(!s.poll_dial(now), "one dial at a time");
            s.on_dial_failed(now, 0.5);
            let next = s.next_timeout().unwrap();
            delays.push(next - now);
            now = next;
        }
        assert_eq!(delays[0], Duration::from_millis(200));
        assert_eq!(delays[1], Duration::from_millis(400));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(3)));
        assert_eq!(*delays.last().unwrap(), Duration::from_secs(3));
    }

    #[test]
    fn simultaneous_dials_converge_on_the_lower_initiator() {
        let t = Instant::now();
        let mut a = PeerSession::new(A, SessionTimers::default(), t);
        let mut b = PeerSession::new(B, SessionTimers::default(), t);
        assert!(a.poll_dial(t) && b.poll_dial(t));
        // A sees B's dial (conn 2) first, then its own (conn 1); B the other way round.
        assert_eq!(a.on_connection(t, 2, B, false), Verdict::Adopt { replaced: None });
        assert_eq!(a.on_connection(t, 1, A, true), Verdict::Adopt { replaced: Some(2) });
        assert_eq!(b.on_connection(t, 1, A, false), Verdict::Adopt { replaced: None });
        assert_eq!(b.on_connection(t, 2, B, true), Verdict::Refuse);
        assert_eq!(a.current().unwrap().0, 1);
        assert_eq!(b.current().unwrap().0, 1);
        // the refused connection closing does not disturb the session
        b.on_closed(t, 2, 0.0);
        assert_eq!(b.state_name(), "up");
    }

    #[test]
    fn a_restarted_peer_redial_replaces_the_old_session() {
        let t = Instant::now();
        let mut a = PeerSession::new(A, SessionTimers::default(), t);
        a.on_connection(t, 1, B, false);
        assert_eq!(a.on_connection(t, 7, B, false), Verdict::Adopt { replaced: Some(1) });
    }

    #[test]
    fn closing_the_session_schedules_a_quick_redial() {
        let t = Instant::now();
        let mut a = PeerSession::new(A, SessionTimers::default(), t);
        assert!(a.poll_dial(t));
        a.on_connection(t, 1, A, true);
        a.on_ready(1);
        assert!(!a.on_closed(t, 1, 0.0));
        assert_eq!(a.state_name(), "down");
        assert!(a.next_timeout().unwrap() <= t + Duration::from_millis(200));
    }

    #[test]
    fn a_connection_refused_after_its_handshake_backs_off_like_a_failed_dial() {
        // The peer does not know this node's key yet: each dial completes its handshake
        // here and is closed by the peer before the Hello.
        let t0 = Instant::now();
        let mut a = PeerSession::new(A, SessionTimers::default(), t0);
        let mut now = t0;
        let mut delays = Vec::new();
        for conn in 1..=6 {
            assert!(a.poll_dial(now));
            a.on_connection(now, conn, A, true);
            assert!(a.on_closed(now, conn, 0.5), "closed before it was ready");
            let next = a.next_timeout().unwrap();
            delays.push(next - now);
            now = next;
        }
        assert_eq!(delays[0], Duration::from_millis(200));
        assert!(delays.windows(2).all(|w| w[1] >= w[0]), "{delays:?}");
        assert_eq!(*delays.last().unwrap(), Duration::from_secs(3));
        // Once a session was ready, its loss is retried quickly again.
        assert!(a.poll_dial(now));
        a.on_connection(now, 9, A, true);
        a.on_ready(9);
        assert!(!a.on_closed(now, 9, 0.5));
        assert_eq!(a.next_timeout().unwrap() - now, Duration::from_millis(200));
    }
    #[test]
    fn a_session_that_receives_nothing_for_the_timeout_is_dead_and_one_that_receives_is_not() {
        let t0 = Instant::now();
        let s = |t| t0 + Duration::from_secs(t);
        let mut w = Silence::new(Duration::from_secs(2));
        let dead = |w: &mut Silence, t, conn, count| w.check(s(t), conn, count, WATCHED) == Heard::Dead;
        // Keepalives every 2 s: datagrams keep arriving.
        for t in 0..20 {
            assert_eq!(w.check(s(t), 7, t / 2, WATCHED), Heard::Recently, "live at {t} s");
        }
        // The last datagram was counted at 18 s (the peer died then): dead 6 s later, not
        // before, and a watched session is never polled.
        for t in 20..24 {
            assert_eq!(w.check(s(t), 7, 9, WATCHED), Heard::Recently, "not yet at {t} s");
        }
        assert!(dead(&mut w, 24, 7, 9));
        // A new session starts the watch over.
        for t in 25..31 {
            assert!(!dead(&mut w, t, 8, 9), "new session, not yet at {t} s");
        }
        assert!(dead(&mut w, 31, 8, 9));
    }

    #[test]
    fn an_unwatched_session_is_polled_when_silent_and_dead_sooner() {
        let t0 = Instant::now();
        let ms = |t| t0 + Duration::from_millis(t);
        let mut w = Silence::new(Duration::from_secs(2));
        // Checked every 500 ms; a datagram every 2 s until 10 s.
        let mut heard = Vec::new();
        for k in 0..40u64 {
            let t = k * 500;
            let count = t.min(10_000) / 2000;
            heard.push((t, w.check(ms(t), 1, count, UNWATCHED)));
        }
        let at = |h: Heard| heard.iter().filter(|(_, x)| *x == h).map(|(t, _)| *t).collect::<Vec<_>>();
        // Nothing while keepalives arrive; after the last one (at 10 s): polled at 12.5 s and
        // again a second later, dead at 14 s (and at every later check until the shell
        // closes the session).
        assert_eq!(at(Heard::Poll), vec![12_500, 13_500]);
        assert_eq!(at(Heard::Dead).first(), Some(&14_000));
        // A poll that is answered (a datagram arrives) starts the watch over: no second poll.
        let mut w = Silence::new(Duration::from_secs(2));
        let mut check = |t: u64, count: u64, limits: SilenceLimits| w.check(ms(t), 1, count, limits);
        for t in (0..2500).step_by(500) {
            assert_eq!(check(t, 0, UNWATCHED), Heard::Recently, "at {t} ms");
        }
        assert_eq!(check(2500, 0, UNWATCHED), Heard::Poll);
        assert_eq!(check(3000, 1, UNWATCHED), Heard::Recently);
        for t in (3500..5500).step_by(500) {
            assert_eq!(check(t, 1, UNWATCHED), Heard::Recently, "at {t} ms");
        }
        assert_eq!(check(5500, 1, UNWATCHED), Heard::Poll);
        // The same silence judged as watched (the link began to carry traffic) waits the
        // full timeout, unpolled.
        for t in (6000..9000).step_by(500) {
            assert_eq!(check(t, 1, WATCHED), Heard::Recently, "at {t} ms");
        }
        assert_eq!(check(9000, 1, WATCHED), Heard::Dead);
    }

    #[test]
    fn a_node_whose_own_checks_are_late_does_not_blame_a_silent_session() {
        let t0 = Instant::now();
        let s = |t| t0 + Duration::from_secs(t);
        let mut w = Silence::new(Duration::from_secs(2));
        let dead = |w: &mut Silence, t| w.check(s(t), 1, 5, WATCHED) == Heard::Dead;
        assert!(!dead(&mut w, 0));
        assert!(!dead(&mut w, 1));
        // The event loop was starved for 5 s: the silence is not the peer's.
        assert!(!dead(&mut w, 6));
        assert!(!dead(&mut w, 7));
        for t in 8..12 {
            assert!(!dead(&mut w, t), "counted from the late check, not at {t} s");
        }
        assert!(dead(&mut w, 12));
        w.reset();
        assert!(!dead(&mut w, 30), "after a reset the watch starts over");
    }
}
