//! Path monitoring, failure detection and relay choice, sans I/O (spec A§2.1.3, A§3.3,
//! A§3.4; seeds-digest items 8–13, 44–47, 56–65).
//!
//! For every peer detour watches the **direct path** and a few **relay paths** (one hop
//! through another peer, RON/SOSR-style). Each node sends authenticated probes on every
//! path; the receiver echoes each probe on the same path and, in every probe and echo it
//! sends, reports which probes it received on each path. So each *direction* is judged by
//! what its receiver saw, and a report that travels back over a relay still tells a sender
//! that its direct packets arrive when only the reverse direction is broken (item 10).
//!
//! A path is **down** when no probe sent in the last `down_after` is known to have arrived,
//! **degraded** when its smoothed loss stays above `degraded_loss` or its smoothed RTT more
//! than `degraded_rtt` above its lowest, for `degraded_after` (until loss falls below
//! `recover_loss`), and up otherwise; a degraded path with loss above `failed_loss` counts
//! as failed. ICMP unreachable and TCP stalls (from the shell) take the direct path down at
//! once or after a quick probe check. The route for a peer is the direct path while it is
//! usable (up, or degraded but not failed); otherwise the best usable relay path (lowest
//! cost: smoothed RTT plus a loss penalty), and back to direct after it has been up for the
//! hold-down, which grows with the path's recent failures ([`FlapDamping`]). While the
//! direct path is degraded, [`Failover::relief`] names a relay and the share of new
//! connections to move to it. Relay candidates are ranked by this node's cost to the relay plus the
//! relay's reported cost to the peer (RON); when nothing is known, random relays are asked
//! at once (SOSR's random-4).
//!
//! Everything is driven by [`Failover::handle_tick`] and the `handle_*` events, with `now`
//! passed in and randomness from a seed; outputs are [`Action`]s.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use crate::identity::{NodeId, NODE_ID_LEN};
use crate::node::policy::{Commitment, Purpose, RelayRank};

/// A path to a peer: direct, or through one relay node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PathId {
    /// The underlay path straight to the peer.
    Direct,
    /// Through the relay with this node ID.
    Relay(NodeId),
}

impl PathId {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            PathId::Direct => out.extend_from_slice(&[0u8; NODE_ID_LEN]),
            PathId::Relay(id) => out.extend_from_slice(&id.0),
        }
    }
    fn decode(b: &[u8]) -> Option<PathId> {
        let id: [u8; NODE_ID_LEN] = b.get(..NODE_ID_LEN)?.try_into().ok()?;
        Some(if id == [0u8; NODE_ID_LEN] { PathId::Direct } else { PathId::Relay(NodeId(id)) })
    }
}

impl std::fmt::Display for PathId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PathId::Direct => f.write_str("direct"),
            PathId::Relay(id) => write!(f, "via {}", id.short()),
        }
    }
}

/// Tunables; with the defaults a silent failure of a peer that carries traffic is detected
/// in well under a second, of an idle one in about 1.5 s.
#[derive(Debug, Clone, Copy)]
pub struct FailoverConfig {
    /// Probe interval on the direct path and on the relay path in use.
    pub probe_interval: Duration,
    /// Probe interval on standby relay paths.
    pub standby_interval: Duration,
    /// A path with no delivered probe among those sent this long ago is down.
    pub down_after: Duration,
    /// The direct path must be up this long before traffic returns to it.
    pub hold_down: Duration,
    /// Smoothed loss above which (sustained for `degraded_after`) a path is degraded: a
    /// share of new connections moves off it ([`Failover::relief`]).
    pub degraded_loss: f64,
    /// Smoothed loss below which a degraded path is up again.
    pub recover_loss: f64,
    /// Smoothed loss above which a path counts as failed: all traffic moves, as when it
    /// is down.
    pub failed_loss: f64,
    /// A smoothed RTT this far above the path's lowest (sustained for `degraded_after`)
    /// also makes it degraded; zero turns the RTT rule off.
    pub degraded_rtt: Duration,
    /// How long loss or RTT must stay over their thresholds before the path is degraded.
    pub degraded_after: Duration,
    /// Relay paths kept ready per peer.
    pub relay_candidates: usize,
    /// Relays asked at once when a path fails and no relay is known to work (SOSR).
    pub sosr_fanout: usize,
    /// How long a relay that refused (or failed) is not asked again.
    pub relay_retry: Duration,
    /// How long a TCP-stall check waits for probes to be delivered.
    pub check_timeout: Duration,
    /// Loss penalty in the path cost: cost = srtt + loss × this.
    pub loss_penalty: Duration,
    /// Probe interval on every path of a peer that carries no traffic (see
    /// [`Failover::handle_traffic`]). A probe of such a path that is not answered in time is
    /// confirmed at the fast rate (`probe_interval`, `standby_interval`), and silence is
    /// judged after `idle_interval + down_after`. Equal to `probe_interval`: every peer is
    /// probed fast, traffic or not.
    pub idle_interval: Duration,
    /// How long a peer counts as carrying traffic after the last sign of it.
    pub traffic_hold: Duration,
    /// Ceiling of the damped hold-down ([`FlapDamping`]).
    pub max_hold_down: Duration,
    /// Half-life of a peer's flap penalty ([`FlapDamping`]).
    pub flap_half_life: Duration,
    /// Silence after which a path that carries the traffic of a peer that has traffic (its
    /// direct path, the relay path in use, a path with a REPLEX share) is down, once enough
    /// confirmation probes went unanswered too ([`confirmations_needed`]): the fast rule,
    /// after BFD's detection time (RFC 5880 §6.8.4: detect multiplier × interval; 3 × 50
    /// ms is the common fast setting). Zero, or not below `down_after`, turns it off.
    pub fast_down_after: Duration,
    /// Probe interval on such a path while its latest probes go unanswered past their
    /// allowance (the confirmation burst).
    pub confirm_interval: Duration,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        FailoverConfig {
            probe_interval: Duration::from_millis(50),
            standby_interval: Duration::from_millis(200),
            down_after: Duration::from_millis(500),
            hold_down: Duration::from_secs(3),
            degraded_loss: 0.05,
            recover_loss: 0.02,
            failed_loss: 0.5,
            degraded_rtt: Duration::from_millis(100),
            degraded_after: Duration::from_secs(2),
            relay_candidates: 2,
            sosr_fanout: 4,
            relay_retry: Duration::from_secs(10),
            check_timeout: Duration::from_millis(300),
            loss_penalty: Duration::from_millis(500),
            idle_interval: Duration::from_secs(1),
            traffic_hold: Duration::from_secs(10),
            max_hold_down: Duration::from_secs(60),
            flap_half_life: Duration::from_secs(60),
            fast_down_after: Duration::from_millis(100),
            confirm_interval: Duration::from_millis(10),
        }
    }
}

impl FailoverConfig {
    /// Whether the fast rule ([`FailoverConfig::fast_down_after`]) is on.
    pub fn fast_rule(&self) -> bool {
        !self.fast_down_after.is_zero() && self.fast_down_after < self.down_after
    }
}

/// Fewest unanswered probes before the fast rule may declare a path down.
pub const MIN_CONFIRMATIONS: usize = 3;
/// Most unanswered probes the fast rule waits for (at very high loss the slow rule,
/// `down_after`, decides first anyway).
pub const MAX_CONFIRMATIONS: usize = 24;
/// The chance, per confirmation burst, that a path that still works is declared down by
/// the fast rule because every probe of the burst (or its answer) was lost.
pub const FALSE_DOWN_CHANCE: f64 = 1e-6;

/// How many consecutive probes must go unanswered before the fast rule declares a path
/// with smoothed one-way loss `loss` (0..1) down: the fewest `n` with `q^n ≤`
/// [`FALSE_DOWN_CHANCE`], where `q = 1 − (1 − loss)²` is the chance that a probe or its
/// answer is lost; at least [`MIN_CONFIRMATIONS`] (BFD's usual detect multiplier), at most
/// [`MAX_CONFIRMATIONS`]. Loss-free: 3; 5 % loss: 6; 20 % loss: 14.
pub fn confirmations_needed(loss: f64) -> usize {
    let loss = if loss.is_finite() { loss.clamp(0.0, 0.99) } else { 0.99 };
    let q = 1.0 - (1.0 - loss) * (1.0 - loss);
    if q <= 1e-9 {
        return MIN_CONFIRMATIONS;
    }
    let n = (FALSE_DOWN_CHANCE.ln() / q.ln()).ceil();
    if n.is_finite() && n >= 0.0 {
        (n as usize).clamp(MIN_CONFIRMATIONS, MAX_CONFIRMATIONS)
    } else {
        MAX_CONFIRMATIONS
    }
}

/// Health of one direction of a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathState {
    /// Probes arrive.
    Up,
    /// Probes arrive, but the smoothed loss is too high.
    Degraded,
    /// No probe arrives.
    Down,
}

impl PathState {
    /// Lower-case name for status output.
    pub fn as_str(self) -> &'static str {
        match self {
            PathState::Up => "up",
            PathState::Degraded => "degraded",
            PathState::Down => "down",
        }
    }
}

/// Why traffic to a peer left the direct path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The direct path is healthy (or nothing better exists).
    Healthy,
    /// Probes on the direct path stopped arriving.
    ProbeLoss,
    /// Too much loss on the direct path.
    Degraded,
    /// An ICMP net/host unreachable about the peer.
    Icmp,
    /// TCP connections to the peer stalled and probes confirmed it.
    TcpStall,
}

impl Reason {
    /// snake_case name for status output.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Healthy => "healthy",
            Reason::ProbeLoss => "probe_loss",
            Reason::Degraded => "loss",
            Reason::Icmp => "icmp_unreachable",
            Reason::TcpStall => "tcp_stall",
        }
    }
}

/// An instruction to the shell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Seal `payload` as a probe-type packet to `peer` and send it on `path` (to the peer's
    /// endpoint, or to the relay's endpoint).
    Send {
        /// Peer index.
        peer: usize,
        /// Path to send on.
        path: PathId,
        /// Probe payload.
        payload: Vec<u8>,
    },
    /// Send the peer's traffic on this path.
    UsePath {
        /// Peer index.
        peer: usize,
        /// The path.
        path: PathId,
    },
    /// Route the peer's protected destinations into the overlay (`true`) or leave them to
    /// the kernel's normal routes (`false`).
    Protect {
        /// Peer index.
        peer: usize,
        /// On or off.
        on: bool,
    },
    /// Ask relay `relay` (a peer index) to relay between this node and `peer`.
    RequestRelay {
        /// Why (the relay checks it against its commitment class).
        purpose: crate::node::policy::Purpose,
        /// Relay's peer index.
        relay: usize,
        /// The peer to reach through it.
        peer: usize,
    },
    /// Tell `relay` it is no longer needed for `peer`.
    ReleaseRelay {
        /// Relay's peer index.
        relay: usize,
        /// The peer.
        peer: usize,
    },
}

/// What a node tells its peers about its own direct paths (RON-style link state, one hop).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkInfo {
    /// The far end of the link.
    pub node: NodeId,
    /// Whether the direct path is up (not down or degraded).
    pub up: bool,
    /// Smoothed RTT in milliseconds, if measured.
    pub rtt_ms: Option<f64>,
    /// Smoothed loss (0..1).
    pub loss: f64,
}

/// Malformed probe payloads are reported, never panicked on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// Too short or an unknown kind.
    #[error("malformed probe")]
    Malformed,
}

const KIND_PROBE: u8 = 1;
const KIND_ECHO: u8 = 2;
/// Probes remembered per path for loss and delivery accounting.
const SENT_WINDOW: usize = 64;
/// Reports carried per probe at most.
const MAX_REPORTS: usize = 8;
/// Smoothing of the loss estimate (EWMA weight of one probe outcome).
const LOSS_ALPHA: f64 = 1.0 / 32.0;

/// A decoded probe or echo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// True for an echo.
    pub echo: bool,
    /// The path the original probe was sent on.
    pub path: PathId,
    /// Probe sequence number on that path.
    pub seq: u32,
    /// Sender's clock at sending, µs (echoed unchanged).
    pub sent_us: u64,
    /// Echo only: µs between the probe's arrival and the echo's sending.
    pub hold_us: u32,
    /// Reception reports: (path, highest seq received, bitmap of the 64 seqs up to it).
    pub reports: Vec<(PathId, u32, u64)>,
}

impl Probe {
    /// Encodes: kind (1) | path (16) | seq (4) | sent_us (8) | hold_us (4) | n (1) |
    /// n × (path (16) | highest (4) | bitmap (8)). Big-endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(34 + 28 * self.reports.len());
        out.push(if self.echo { KIND_ECHO } else { KIND_PROBE });
        self.path.encode(&mut out);
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.sent_us.to_be_bytes());
        out.extend_from_slice(&self.hold_us.to_be_bytes());
        let n = self.reports.len().min(MAX_REPORTS);
        out.push(n as u8);
        for (p, h, b) in &self.reports[..n] {
            p.encode(&mut out);
            out.extend_from_slice(&h.to_be_bytes());
            out.extend_from_slice(&b.to_be_bytes());
        }
        out
    }

    /// Decodes a probe payload.
    ///
    /// # Errors
    /// [`ProbeError::Malformed`] for anything that is not a complete probe.
    pub fn decode(b: &[u8]) -> Result<Probe, ProbeError> {
        let m = ProbeError::Malformed;
        let echo = match b.first() {
            Some(&KIND_PROBE) => false,
            Some(&KIND_ECHO) => true,
            _ => return Err(m),
        };
        let path = PathId::decode(b.get(1..17).ok_or(m)?).ok_or(m)?;
        let seq = u32::from_be_bytes(b.get(17..21).ok_or(m)?.try_into().map_err(|_| m)?);
        let sent_us = u64::from_be_bytes(b.get(21..29).ok_or(m)?.try_into().map_err(|_| m)?);
        let hold_us = u32::from_be_bytes(b.get(29..33).ok_or(m)?.try_into().map_err(|_| m)?);
        let n = *b.get(33).ok_or(m)? as usize;
        if n > MAX_REPORTS {
            return Err(m);
        }
        let mut reports = Vec::with_capacity(n);
        for i in 0..n {
            let at = 34 + i * 28;
            let r = b.get(at..at + 28).ok_or(m)?;
            let p = PathId::decode(&r[..16]).ok_or(m)?;
            let h = u32::from_be_bytes(r[16..20].try_into().map_err(|_| m)?);
            let bm = u64::from_be_bytes(r[20..28].try_into().map_err(|_| m)?);
            reports.push((p, h, bm));
        }
        Ok(Probe { echo, path, seq, sent_us, hold_us, reports })
    }
}

#[derive(Debug, Clone)]
struct Sent {
    seq: u32,
    at: Instant,
    delivered: bool,
    resolved: bool,
}

/// One path to one peer, both directions' bookkeeping.
#[derive(Debug, Clone)]
struct Path {
    id: PathId,
    // outgoing
    next_seq: u32,
    sent: VecDeque<Sent>,
    last_sent: Option<Instant>,
    last_delivered_sent_at: Option<Instant>,
    started: Instant,
    srtt: Option<Duration>,
    rttvar: Duration,
    loss: f64,
    state: PathState,
    state_since: Instant,
    reason: Reason,
    /// Probes answered since the path last went down (REPLEX's sample count).
    answered: u32,
    /// The lowest smoothed RTT since the path last came up: the base an RTT jump is
    /// measured against.
    base_rtt: Option<Duration>,
    /// Since when loss or RTT is over the degraded thresholds.
    impaired_since: Option<Instant>,
    /// When this node last learned that one more of its probes on the path arrived (an
    /// echo, or a reception report through any path): the fast rule's silence is counted
    /// from here, as BFD's detection time runs from the last packet received.
    last_news: Option<Instant>,
    /// The latest RTT sample.
    last_rtt: Duration,
    /// When the peer's latest probe arrived on this path (the other direction).
    last_rx: Option<Instant>,
    // incoming
    rx_highest: Option<u32>,
    rx_bitmap: u64,
}

impl Path {
    fn new(id: PathId, now: Instant, initial: PathState) -> Path {
        Path {
            id,
            next_seq: 0,
            sent: VecDeque::new(),
            last_sent: None,
            last_delivered_sent_at: None,
            started: now,
            srtt: None,
            rttvar: Duration::ZERO,
            loss: 0.0,
            state: initial,
            state_since: now,
            reason: Reason::Healthy,
            answered: 0,
            base_rtt: None,
            impaired_since: None,
            last_news: None,
            last_rtt: Duration::ZERO,
            last_rx: None,
            rx_highest: None,
            rx_bitmap: 0,
        }
    }

    fn mark_delivered(&mut self, now: Instant, seq: u32) {
        if let Some(s) = self.sent.iter_mut().find(|s| s.seq == seq) {
            if !s.delivered {
                s.delivered = true;
                self.last_news = Some(now);
                self.answered = self.answered.saturating_add(1);
                if !s.resolved {
                    s.resolved = true;
                    self.loss += LOSS_ALPHA * (0.0 - self.loss);
                }
                let at = s.at;
                if self.last_delivered_sent_at.is_none_or(|t| at > t) {
                    self.last_delivered_sent_at = Some(at);
                }
            }
        }
    }

    fn rtt_sample(&mut self, rtt: Duration) {
        self.last_rtt = rtt;
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
            Some(s) => {
                let diff = s.abs_diff(rtt);
                self.rttvar = (self.rttvar * 3 + diff) / 4;
                self.srtt = Some((s * 7 + rtt) / 8);
            }
        }
        if let Some(s) = self.srtt {
            self.base_rtt = Some(self.base_rtt.map_or(s, |b| b.min(s)));
        }
    }

    /// How far the smoothed RTT is above its base.
    fn rtt_rise(&self) -> Duration {
        match (self.srtt, self.base_rtt) {
            (Some(s), Some(b)) => s.saturating_sub(b),
            _ => Duration::ZERO,
        }
    }

    /// Whether traffic may use the path: up, or degraded but not failed.
    fn usable(&self, cfg: &FailoverConfig) -> bool {
        self.state == PathState::Up || (self.state == PathState::Degraded && self.loss < cfg.failed_loss)
    }

    /// The send time of the latest answered probe, or the path's (re)start.
    fn evidence(&self) -> Instant {
        self.last_delivered_sent_at.unwrap_or(self.started).max(self.started)
    }

    /// The probes sent after [`Path::evidence`], oldest first: none of them is answered.
    fn unanswered(&self) -> impl Iterator<Item = &Sent> {
        let e = self.evidence();
        self.sent.iter().filter(move |s| s.at > e && !s.delivered)
    }

    /// Time after which an unanswered probe counts as lost, and silence is judged.
    fn allowance(&self) -> Duration {
        let base = self.srtt.map(|s| s + self.rttvar * 4).unwrap_or(Duration::from_millis(50));
        base.clamp(Duration::from_millis(20), Duration::from_millis(300))
    }

    fn record_rx(&mut self, seq: u32) {
        match self.rx_highest {
            None => {
                self.rx_highest = Some(seq);
                self.rx_bitmap = 1;
            }
            Some(h) if seq > h => {
                let shift = seq - h;
                self.rx_bitmap = if shift >= 64 { 1 } else { (self.rx_bitmap << shift) | 1 };
                self.rx_highest = Some(seq);
            }
            Some(h) => {
                let back = h - seq;
                if back < 64 {
                    self.rx_bitmap |= 1 << back;
                }
            }
        }
    }

    fn cost(&self, penalty: Duration) -> Duration {
        self.srtt.unwrap_or(Duration::from_millis(100)) + penalty.mul_f64(self.loss.clamp(0.0, 1.0))
    }
}

/// When path `x` of peer `p` is probed next. Paths that carry the peer's traffic are
/// probed every `probe_interval`, standby relay paths every `standby_interval`, while the
/// peer carries traffic; otherwise every `idle_interval`, except that an idle probe not yet
/// answered when its answer was due is confirmed at the fast rate (a path already down
/// stays at the idle rate).
fn next_probe(cfg: &FailoverConfig, epoch: Instant, p: &Peer, x: &Path) -> Instant {
    let primary = is_primary(p, x);
    let fast = if primary { cfg.probe_interval } else { cfg.standby_interval };
    let Some(last) = x.last_sent else { return epoch.min(x.started) };
    let regular = next_regular_probe(cfg, epoch, p, x, last, fast);
    match cross_check_at(cfg, p, x) {
        Some(t) => t.min(regular),
        None => regular,
    }
}

/// [`next_probe`] without cross-checks, for a path last probed at `last`.
fn next_regular_probe(cfg: &FailoverConfig, epoch: Instant, p: &Peer, x: &Path, last: Instant, fast: Duration) -> Instant {
    if cfg.idle_interval <= fast || p.active_until.is_some_and(|u| last + fast <= u) {
        if fast_watched(p, x) && cfg.fast_rule() && x.state != PathState::Down {
            // The confirmation burst: once the oldest unanswered probe is past its
            // allowance, probe every `confirm_interval` until one is answered.
            if let Some(first) = x.unanswered().next() {
                return (last + cfg.confirm_interval).max(first.at + x.allowance()).min(last + fast);
            }
        }
        return last + fast;
    }
    if x.state != PathState::Down && x.sent.back().is_some_and(|s| !s.delivered) {
        return last + fast.max(x.allowance());
    }
    // Idle probes go out on the node's idle grid: all of them share one wake-up per
    // interval, and a path leaving the fast rate joins the grid within 0.5–1.5 intervals.
    on_grid(epoch, cfg.idle_interval, last + cfg.idle_interval / 2)
}

/// Whether path `x` carries peer `p`'s traffic: the direct path, the route's path, or a
/// path with a REPLEX share.
fn is_primary(p: &Peer, x: &Path) -> bool {
    x.id == PathId::Direct || x.id == p.route.path || p.busy.contains(&x.id)
}

/// Whether the fast rule watches path `x` of peer `p`: the direct path and the route's
/// path. A relay path that only carries a REPLEX share is left to the slow rule: REPLEX
/// spreads traffic over paths because they congest, and a relay's queue that fills in an
/// instant (a burst into a slow link) looked like a cut to the fast rule.
fn fast_watched(p: &Peer, x: &Path) -> bool {
    x.id == PathId::Direct || x.id == p.route.path
}

/// When path `x` of peer `p` counts as silent by the fast rule
/// ([`FailoverConfig::fast_down_after`]) if none of the probes already sent is answered:
/// `fast_down_after` after the send time of its latest answered probe, and not before
/// [`confirmations_needed`] probes sent since went unanswered past their allowance.
/// `None` when the rule does not apply: it is off, the path is down or carries none of the
/// peer's traffic, too few probes are out yet, or the peer will have stopped carrying
/// traffic by then.
fn fast_silence(cfg: &FailoverConfig, p: &Peer, x: &Path) -> Option<Instant> {
    let since = suspect_since(cfg, p, x)?;
    let nth = x.unanswered().nth(confirmations_needed(x.loss) - 1)?;
    // Cross-checked: a probe sent on another path that is up since the suspicion began
    // was answered, and its answer carried the peer's reception reports, which still
    // do not show this path's probes. Without it a one-way failure of the other
    // direction would look the same from here (the peer's reports about this path then
    // come only through other paths). With no other path up there is nothing to wait for.
    let mut others_up = p.paths.iter().filter(|y| y.id != x.id && y.state == PathState::Up && y.last_sent.is_some()).peekable();
    if others_up.peek().is_some() && !others_up.any(|y| y.last_delivered_sent_at.is_some_and(|t| t >= since)) {
        return None;
    }
    // Silence counts from the last news of a delivery, not from the send time of the
    // last probe delivered: probes that wait in a filling queue still bring news, a cut
    // path brings none. The latest RTT sample widens the margin while the delay grows.
    // The other direction must be silent too: the peer's own probes on this path still
    // arriving mean a path that is slow one way (a filling queue on this node's uplink,
    // bufferbloat), or broken one way only, not a cut; the slow rule judges those.
    let news = x.last_news.unwrap_or(x.started).max(x.started).max(x.last_rx.unwrap_or(x.started));
    let t = (news + cfg.fast_down_after + x.allowance().max(x.last_rtt)).max(nth.at + x.allowance());
    p.active_until.is_some_and(|u| t <= u).then_some(t)
}

/// Since when path `x` of peer `p` is suspect under the fast rule: its oldest unanswered
/// probe went past its allowance then. `None` when the rule does not apply to it (off,
/// the path is down or carries none of the peer's traffic) or every probe is answered.
fn suspect_since(cfg: &FailoverConfig, p: &Peer, x: &Path) -> Option<Instant> {
    if !cfg.fast_rule() || x.state == PathState::Down || !fast_watched(p, x) {
        return None;
    }
    let first = x.unanswered().next()?;
    p.active_until.is_some_and(|u| first.at <= u).then(|| first.at + x.allowance())
}

/// When path `x` must carry a cross-check probe for a suspect path of the same peer
/// ([`fast_silence`]): at the moment the suspicion began, unless `x` was probed since.
fn cross_check_at(cfg: &FailoverConfig, p: &Peer, x: &Path) -> Option<Instant> {
    if x.state != PathState::Up {
        return None;
    }
    let since = p.paths.iter().filter(|y| y.id != x.id).filter_map(|y| suspect_since(cfg, p, y)).min()?;
    x.last_sent.is_none_or(|l| l < since).then_some(since)
}

/// The first instant `epoch + k × every` (k ≥ 0) at or after `t`.
fn on_grid(epoch: Instant, every: Duration, t: Instant) -> Instant {
    let step = every.as_nanos().max(1);
    let k = t.saturating_duration_since(epoch).as_nanos().div_ceil(step);
    epoch + Duration::from_nanos(u64::try_from(k * step).unwrap_or(u64::MAX))
}

/// The moment after which path `x` counts as silent (down): `down_after` plus the path's
/// allowance after the send time of its last answered probe (or its fresh start), and one
/// `idle_interval` more when that moment falls after the peer stopped carrying traffic
/// (`active_until`), since idle probes are that far apart. Standby relay paths are probed
/// at the same idle rate as the direct path: under a one-way cut from the peer, the peer's
/// reception reports reach this node only through them, and probing them every 3 s let the
/// working direction be judged silent (unit test
/// `a_one_way_failure_of_an_idle_peer_reroutes_only_the_broken_direction`).
fn silence_limit(cfg: &FailoverConfig, active_until: Option<Instant>, x: &Path) -> Instant {
    let fast = x.evidence() + cfg.down_after + x.allowance();
    if cfg.idle_interval <= cfg.probe_interval || active_until.is_some_and(|u| fast < u) {
        fast
    } else {
        fast + cfg.idle_interval
    }
}

/// When the relay upkeep of peer `p` runs next after it last ran at `last`: 500 ms later
/// while its traffic is in the overlay, a second later while it carries traffic, and about
/// five seconds later (on the idle probe grid, sharing their wake-up) while idle.
fn next_upkeep(cfg: &FailoverConfig, epoch: Instant, p: &Peer, last: Instant) -> Instant {
    if p.route.protect {
        last + Duration::from_millis(500)
    } else if cfg.idle_interval <= cfg.probe_interval || p.active_until.is_some_and(|u| last + Duration::from_secs(1) <= u) {
        last + Duration::from_secs(1)
    } else {
        on_grid(epoch, cfg.idle_interval, last + Duration::from_secs(5) - cfg.idle_interval / 2)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Candidate {
    Requested(Instant),
    /// Refused for a moment (the relay has no session with the peer yet and is opening
    /// one): the same relay is asked again at this instant, once, and no other is asked
    /// meanwhile. Asking the next candidate instead made every relay asked open a session
    /// that nobody used (issue 11: a hub with 99 peers had leaves open 20 relay sessions
    /// each in their first two minutes, and serve two).
    Retry(Instant),
    Active,
    Refused(Instant),
}

/// Standby relay requests (for a path that works: protection set up in advance) a node
/// makes at once; see [`STANDBY_REQUESTS_PER_S`].
pub const STANDBY_BURST: f64 = 10.0;
/// Standby relay requests a node makes per second after its burst. Each request makes the
/// relay open a session to the peer it does not know yet: a hub with 99 peers asked 198
/// relays within its first second, 198 handshakes among nodes that were still starting
/// (issue 11: in the slow starts of 100 nodes, 150-180 relay sessions were set up before
/// the directories were complete). Requests for a path that failed are never held back.
pub const STANDBY_REQUESTS_PER_S: f64 = 10.0;

/// The route chosen for a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The path traffic uses.
    pub path: PathId,
    /// Whether the peer's protected destinations are routed into the overlay.
    pub protect: bool,
    /// Why the direct path is not used (or `Healthy`).
    pub reason: Reason,
    /// Since when this route holds.
    pub since: Instant,
}

/// Flap damping of a peer's direct path (after BGP route flap damping, RFC 2439, and
/// BFD's advice to dampen flapping sessions, RFC 5882 §3.2): each failure of the direct
/// path (up or degraded to down, whatever told: probes, ICMP, a TCP stall) adds 1 to a
/// penalty that halves every `flap_half_life` (default 60 s). Traffic returns to the
/// direct path only after it has been up for
///
/// `hold_down × 2^(penalty − 1)`, at most `max_hold_down`,
///
/// so the first failure keeps today's hold-down (3 s), and a path that fails again soon
/// after waits 6, 12, 24, 48 and then 60 s (the defaults). The penalty stops growing one
/// step past the ceiling, so a path that stops flapping is trusted at the base hold-down
/// again a few half-lives later.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FlapDamping {
    /// Failures of the direct path since start.
    pub flaps: u64,
    penalty: f64,
    at: Option<Instant>,
}

impl FlapDamping {
    /// The penalty at `now` (decayed).
    pub fn penalty(&self, cfg: &FailoverConfig, now: Instant) -> f64 {
        match self.at {
            None => 0.0,
            Some(at) => {
                let half = cfg.flap_half_life.as_secs_f64().max(1e-3);
                self.penalty * (-(now.saturating_duration_since(at).as_secs_f64() / half) * std::f64::consts::LN_2).exp()
            }
        }
    }

    /// The hold-down that applies at `now`.
    pub fn hold_down(&self, cfg: &FailoverConfig, now: Instant) -> Duration {
        let steps = (self.penalty(cfg, now) - 1.0).max(0.0);
        let f = 2f64.powf(steps.min(30.0));
        cfg.hold_down.mul_f64(f).min(cfg.max_hold_down.max(cfg.hold_down))
    }

    /// Counts one failure of the direct path at `now`.
    fn flap(&mut self, cfg: &FailoverConfig, now: Instant) {
        let ceiling = if cfg.hold_down.is_zero() { 1.0 } else { (cfg.max_hold_down.as_secs_f64() / cfg.hold_down.as_secs_f64()).max(1.0).log2() + 2.0 };
        self.penalty = (self.penalty(cfg, now) + 1.0).min(ceiling);
        self.at = Some(now);
        self.flaps += 1;
    }
}

#[derive(Debug, Clone)]
struct Peer {
    id: NodeId,
    direct_known: bool,
    /// Paths that carry a traffic share (REPLEX) besides the route: probed fast.
    busy: Vec<PathId>,
    paths: Vec<Path>,
    route: Route,
    relays: BTreeMap<usize, Candidate>,
    /// Relays asked again after a transient refusal ([`Candidate::Retry`]): a second one
    /// counts as a refusal.
    reasked: BTreeSet<usize>,
    check: Option<(Instant, Instant)>,
    last_candidates: Option<Instant>,
    changes: u64,
    damping: FlapDamping,
    /// This node's policy rank as a relay for others (from its record).
    rank: RelayRank,
    /// Until then the peer carries traffic: its paths are probed at the fast rates.
    active_until: Option<Instant>,
    /// The peer lacks standby relays and waits for the pace ([`STANDBY_REQUESTS_PER_S`]):
    /// its relay upkeep runs again then.
    standby_wait: Option<Instant>,
}

impl Peer {
    fn path(&self, id: PathId) -> Option<&Path> {
        self.paths.iter().find(|p| p.id == id)
    }
    fn path_mut(&mut self, id: PathId) -> Option<&mut Path> {
        self.paths.iter_mut().find(|p| p.id == id)
    }
}

/// A read-only view of one path, for status output.
#[derive(Debug, Clone)]
pub struct PathView {
    /// Which path.
    pub id: PathId,
    /// Outgoing state.
    pub state: PathState,
    /// Since when.
    pub since: Instant,
    /// Smoothed RTT.
    pub srtt: Option<Duration>,
    /// Smoothed loss (0..1).
    pub loss: f64,
    /// Whether traffic uses it now.
    pub in_use: bool,
    /// Probes answered since it last went down.
    pub samples: u32,
    /// For a relay path: the relay agreed to relay (its session is active).
    pub active: bool,
    /// Traffic may use it: up, or degraded but not failed.
    pub usable: bool,
    /// How far its smoothed RTT is above the lowest seen since it came up.
    pub rtt_rise: Duration,
}

/// The failover state machine for all peers.
pub struct Failover {
    local: NodeId,
    cfg: FailoverConfig,
    peers: Vec<Peer>,
    by_id: BTreeMap<NodeId, usize>,
    links: BTreeMap<(usize, NodeId), (LinkInfo, Instant)>,
    rng: crate::rng::Rng,
    epoch: Instant,
    actions: VecDeque<Action>,
    /// The previous [`Failover::handle_tick`].
    last_tick: Option<Instant>,
    /// Until then silence and unanswered probes are not held against any path: this node
    /// itself was late (see [`Failover::handle_late`]).
    grace_until: Option<Instant>,
    /// Times this node found itself late.
    late: u64,
    /// When the last [`Failover::handle_tick`] asked to be called next.
    due: Option<Instant>,
    /// Each peer's next wake-up ([`Failover::peer_deadline`]), kept between calls of
    /// [`Failover::poll_timeout`]: an event about one peer recomputes only that peer's
    /// (issue 11: recomputing every path of every peer after each probe was half of the
    /// CPU of a hub with 99 idle peers).
    deadlines: Vec<Option<Instant>>,
    /// Peers whose deadline must be recomputed.
    stale: Vec<usize>,
    /// Every deadline of a [`Failover::live`] peer must be recomputed (a tick, a change
    /// that concerns all peers).
    all_stale: bool,
    /// The peers that may have a deadline or work in a tick: those whose direct path is
    /// known or that have paths. The others (directory nodes without a monitored link,
    /// most of a large overlay) cost nothing per tick.
    live: BTreeSet<usize>,
    /// Peers whose direct path is degraded ([`Failover::relief`]).
    degraded: BTreeSet<usize>,
    /// Standby relay requests this node may make now, and when that was last topped up
    /// ([`STANDBY_REQUESTS_PER_S`]).
    standby_tokens: f64,
    standby_at: Instant,
    /// Calls of [`Failover::poll_timeout`] and peer deadlines they recomputed.
    polls: u64,
    deadline_evals: u64,
}

impl Failover {
    /// Creates the state for `peers` (node IDs, in config order). `seed` drives the random
    /// relay choice; `now` is the clock origin for probe timestamps.
    pub fn new(local: NodeId, peers: &[NodeId], cfg: FailoverConfig, seed: u64, now: Instant) -> Failover {
        let mut f = Failover {
            local,
            cfg,
            peers: Vec::new(),
            by_id: BTreeMap::new(),
            links: BTreeMap::new(),
            rng: crate::rng::Rng::new(seed),
            epoch: now,
            actions: VecDeque::new(),
            last_tick: None,
            grace_until: None,
            late: 0,
            due: None,
            deadlines: Vec::new(),
            stale: Vec::new(),
            all_stale: true,
            live: BTreeSet::new(),
            degraded: BTreeSet::new(),
            standby_tokens: STANDBY_BURST,
            standby_at: now,
            polls: 0,
            deadline_evals: 0,
        };
        for id in peers {
            f.add_peer(*id, now);
        }
        f
    }

    /// Adds a peer (a node learned from the directory) at the next index, which it returns.
    pub fn add_peer(&mut self, id: NodeId, now: Instant) -> usize {
        let i = self.peers.len();
        self.peers.push(Peer {
            id,
            direct_known: false,
            busy: Vec::new(),
            paths: Vec::new(),
            route: Route { path: PathId::Direct, protect: false, reason: Reason::Healthy, since: now },
            relays: BTreeMap::new(),
            reasked: BTreeSet::new(),
            rank: RelayRank::default(),
            check: None,
            last_candidates: None,
            changes: 0,
            damping: FlapDamping::default(),
            active_until: None,
            standby_wait: None,
        });
        self.by_id.insert(id, i);
        // A new node may be a relay on other peers' paths.
        self.all_stale = true;
        i
    }

    /// Peer `peer`'s next wake-up may have moved.
    fn touch(&mut self, peer: usize) {
        if self.stale.len() >= self.peers.len() {
            self.all_stale = true;
            self.stale.clear();
        }
        if !self.all_stale {
            self.stale.push(peer);
        }
    }

    /// The paths that carry a traffic share of `peer` besides its route (REPLEX): they are
    /// probed at the fast rate, like the path in use.
    pub fn set_busy(&mut self, peer: usize, paths: Vec<PathId>) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.busy = paths;
            self.touch(peer);
        }
    }

    /// Traffic for `peer` was seen at `now`: a packet to one of its protected destinations
    /// on the kernel's direct path, a packet through the overlay to it, or a connection to
    /// it that stalls. Its paths are probed at the fast rates until `traffic_hold` after the
    /// last such sign, the rest of the time at `idle_interval` (issue 11: idle cost that
    /// does not grow with the overlay; BFD's demand mode, RFC 5880 §6.6, has the same aim).
    /// A peer that was idle starts afresh: silence on its paths is judged from `now` at the
    /// fast rate's `down_after`, not from its last idle probe. Unknown peers are ignored.
    pub fn handle_traffic(&mut self, now: Instant, peer: usize) {
        let hold = self.cfg.traffic_hold;
        let idle_mode = self.idle_mode();
        self.touch(peer);
        let Some(p) = self.peers.get_mut(peer) else { return };
        let was = p.active_until.is_some_and(|u| now < u);
        p.active_until = Some(p.active_until.map_or(now + hold, |u| u.max(now + hold)));
        if !was && idle_mode {
            for x in p.paths.iter_mut().filter(|x| x.state != PathState::Down) {
                x.started = x.started.max(now);
            }
        }
    }

    /// Whether `peer` counts as carrying traffic at `now` ([`Failover::handle_traffic`]).
    pub fn is_active(&self, now: Instant, peer: usize) -> bool {
        self.peers.get(peer).is_some_and(|p| p.active_until.is_some_and(|u| now < u))
    }

    /// True when idle peers are probed more slowly than busy ones.
    fn idle_mode(&self) -> bool {
        self.cfg.idle_interval > self.cfg.probe_interval
    }

    /// Number of peers.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// True without peers.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Stops monitoring a peer whose session was closed on purpose (an idle on-demand
    /// link): its relay sessions are released, its route returns to direct without
    /// protection, and it no longer serves as a relay for others. It is monitored again
    /// after the next [`Failover::handle_direct_known`].
    pub fn forget(&mut self, now: Instant, peer: usize) {
        // Other peers lose it as a relay.
        self.all_stale = true;
        let Some(p) = self.peers.get_mut(peer) else { return };
        if !p.direct_known {
            return;
        }
        p.direct_known = false;
        p.paths.clear();
        p.check = None;
        self.live.remove(&peer);
        if let Some(d) = self.deadlines.get_mut(peer) {
            *d = None;
        }
        let p = &mut self.peers[peer];
        p.last_candidates = None;
        let was_protected = p.route.protect;
        let was_path = p.route.path;
        p.route = Route { path: PathId::Direct, protect: false, reason: Reason::Healthy, since: now };
        let active: Vec<usize> = p.relays.iter().filter(|(_, c)| **c == Candidate::Active).map(|(r, _)| *r).collect();
        p.relays.clear();
        for relay in active {
            self.actions.push_back(Action::ReleaseRelay { relay, peer });
        }
        if was_path != PathId::Direct {
            self.actions.push_back(Action::UsePath { peer, path: PathId::Direct });
        }
        if was_protected {
            self.actions.push_back(Action::Protect { peer, on: false });
        }
        // Other peers stop using it as a relay.
        let id = self.peers[peer].id;
        for q in 0..self.peers.len() {
            if let Some(c) = self.peers[q].relays.remove(&peer) {
                if c == Candidate::Active {
                    self.actions.push_back(Action::ReleaseRelay { relay: peer, peer: q });
                }
                self.peers[q].paths.retain(|x| x.id != PathId::Relay(id));
            }
        }
        self.links.retain(|(r, _), _| *r != peer);
    }

    /// The configuration in use.
    pub fn config(&self) -> &FailoverConfig {
        &self.cfg
    }

    /// New settings (a configuration reload): path states, measurements and flap
    /// penalties stay; probe times and deadlines follow the new intervals from the next
    /// tick on.
    pub fn set_config(&mut self, cfg: FailoverConfig) {
        self.cfg = cfg;
        self.all_stale = true;
    }

    fn random(&mut self) -> u64 {
        self.rng.next_u64()
    }

    fn micros(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_micros() as u64
    }

    /// The peer now has an underlay endpoint and keys (a management session came up): the
    /// direct path is monitored from now on, assumed healthy until probes say otherwise.
    pub fn handle_direct_known(&mut self, now: Instant, peer: usize) {
        self.touch(peer);
        let Some(p) = self.peers.get_mut(peer) else { return };
        if !p.direct_known {
            p.direct_known = true;
            p.paths.retain(|x| x.id != PathId::Direct);
            p.paths.insert(0, Path::new(PathId::Direct, now, PathState::Up));
            self.live.insert(peer);
        }
    }

    /// Next action for the shell.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The route of a peer.
    pub fn route(&self, peer: usize) -> Option<Route> {
        self.peers.get(peer).map(|p| p.route)
    }

    /// How many times the route of a peer changed.
    pub fn route_changes(&self, peer: usize) -> u64 {
        self.peers.get(peer).map(|p| p.changes).unwrap_or(0)
    }

    /// Flap damping of peer `peer`'s direct path: (failures since start, penalty at `now`,
    /// the hold-down that applies at `now`).
    pub fn damping(&self, peer: usize, now: Instant) -> (u64, f64, Duration) {
        self.peers.get(peer).map_or((0, 0.0, self.cfg.hold_down), |p| (p.damping.flaps, p.damping.penalty(&self.cfg, now), p.damping.hold_down(&self.cfg, now)))
    }

    /// Every monitored path of a peer.
    pub fn paths(&self, peer: usize) -> Vec<PathView> {
        let Some(p) = self.peers.get(peer) else { return Vec::new() };
        p.paths
            .iter()
            .map(|x| PathView {
                id: x.id,
                state: x.state,
                since: x.state_since,
                srtt: x.srtt,
                loss: x.loss,
                in_use: x.id == p.route.path || p.busy.contains(&x.id),
                samples: x.answered,
                active: match x.id {
                    PathId::Direct => p.direct_known,
                    PathId::Relay(r) => self.by_id.get(&r).and_then(|ri| p.relays.get(ri)) == Some(&Candidate::Active),
                },
                usable: x.usable(&self.cfg),
                rtt_rise: x.rtt_rise(),
            })
            .collect()
    }

    /// Peers whose direct path is degraded now (candidates for [`Failover::relief`]).
    pub fn degraded_peers(&self) -> impl Iterator<Item = usize> + '_ {
        self.degraded.iter().copied()
    }

    /// Partial relief of a degraded direct path (issue 14): while the peer's traffic is on
    /// its direct path and that path is degraded, the best usable relay path that costs
    /// less and the share of new connections to move to it, in proportion to the
    /// impairment: loss between `recover_loss` and `failed_loss` maps to 0..1, an RTT rise
    /// of four times `degraded_rtt` to 1; the larger, in eighths, between 1/8 and 7/8.
    /// `None` when nothing is to move.
    pub fn relief(&self, peer: usize) -> Option<(PathId, f64)> {
        let cfg = &self.cfg;
        let p = self.peers.get(peer)?;
        if p.route.protect || p.route.path != PathId::Direct || cfg.failed_loss <= cfg.degraded_loss {
            return None;
        }
        let d = p.path(PathId::Direct)?;
        if d.state != PathState::Degraded || !d.usable(cfg) {
            return None;
        }
        let relay = self.best_relay(peer)?;
        let r = p.path(relay)?;
        if r.cost(cfg.loss_penalty) >= d.cost(cfg.loss_penalty) {
            return None;
        }
        let by_loss = ((d.loss - cfg.recover_loss) / (cfg.failed_loss - cfg.recover_loss).max(1e-6)).clamp(0.0, 1.0);
        let by_rtt = if cfg.degraded_rtt.is_zero() { 0.0 } else { (d.rtt_rise().as_secs_f64() / (cfg.degraded_rtt.as_secs_f64() * 4.0)).clamp(0.0, 1.0) };
        let share = (by_loss.max(by_rtt) * 8.0).round().clamp(1.0, 7.0) / 8.0;
        Some((relay, share))
    }

    /// This node's direct links, to share with its peers.
    pub fn link_report(&self) -> Vec<LinkInfo> {
        self.peers
            .iter()
            .filter_map(|p| {
                let d = p.path(PathId::Direct)?;
                Some(LinkInfo { node: p.id, up: d.usable(&self.cfg), rtt_ms: d.srtt.map(|s| s.as_secs_f64() * 1000.0), loss: d.loss })
            })
            .collect()
    }

    /// A relay (peer index) reports its direct links.
    pub fn handle_link_report(&mut self, now: Instant, relay: usize, links: &[LinkInfo]) {
        self.all_stale = true;
        self.links.retain(|(r, _), _| *r != relay);
        for l in links {
            if l.node != self.local {
                self.links.insert((relay, l.node), (*l, now));
            }
        }
    }

    /// A relay answered a relay request for `peer`.
    pub fn handle_relay_response(&mut self, now: Instant, relay: usize, peer: usize, accepted: bool) {
        self.handle_relay_answer(now, relay, peer, accepted, false);
    }

    /// A relay answered a relay request for `peer`; a `transient` refusal (the relay has no
    /// session to the peer yet) is retried after a second instead of `relay_retry`.
    pub fn handle_relay_answer(&mut self, now: Instant, relay: usize, peer: usize, accepted: bool, transient: bool) {
        let Some(relay_id) = self.peers.get(relay).map(|r| r.id) else { return };
        self.touch(peer);
        let Some(p) = self.peers.get_mut(peer) else { return };
        if accepted {
            p.reasked.remove(&relay);
            p.relays.insert(relay, Candidate::Active);
            let id = PathId::Relay(relay_id);
            if p.path(id).is_none() {
                // A new relay path must prove itself before it is used.
                let mut path = Path::new(id, now, PathState::Down);
                path.reason = Reason::Healthy;
                p.paths.push(path);
                self.live.insert(peer);
            }
        } else {
            let retry = if transient { self.cfg.relay_retry.min(Duration::from_secs(1)) } else { self.cfg.relay_retry };
            if transient && matches!(p.relays.get(&relay), Some(Candidate::Requested(_))) && p.reasked.insert(relay) {
                p.relays.insert(relay, Candidate::Retry(now + retry));
            } else {
                p.reasked.remove(&relay);
                p.relays.insert(relay, Candidate::Refused(now + retry));
            }
            p.paths.retain(|x| x.id != PathId::Relay(relay_id));
        }
    }

    /// ICMP net/host unreachable about one of the peer's protected destinations: the
    /// direct path is down now.
    pub fn handle_icmp(&mut self, now: Instant, peer: usize) {
        self.handle_traffic(now, peer);
        self.touch(peer);
        let cfg = self.cfg;
        let Some(p) = self.peers.get_mut(peer) else { return };
        if let Some(d) = p.paths.iter_mut().find(|x| x.id == PathId::Direct) {
            if d.state != PathState::Down {
                d.state = PathState::Down;
                d.state_since = now;
                d.reason = Reason::Icmp;
                p.damping.flap(&cfg, now);
            }
            // Only probes sent after the ICMP count as recovery.
            d.last_delivered_sent_at = None;
            d.started = now;
        }
        self.decide(now, peer);
    }

    /// TCP connections to the peer's destinations keep timing out: check the direct path
    /// with a burst of probes and take it down if none arrives within `check_timeout`.
    pub fn handle_tcp_stall(&mut self, now: Instant, peer: usize) {
        // A stalling connection is traffic: the peer is probed fast from now on.
        self.handle_traffic(now, peer);
        let timeout = self.cfg.check_timeout;
        self.touch(peer);
        let Some(p) = self.peers.get_mut(peer) else { return };
        if p.check.is_some() || p.path(PathId::Direct).is_none_or(|d| d.state == PathState::Down) {
            return;
        }
        p.check = Some((now, now + timeout));
        for _ in 0..3 {
            self.send_probe(now, peer, PathId::Direct);
        }
    }

    /// A probe-type packet from `peer` arrived at `now`. Returns the echo to send back to
    /// the address the probe came from, if it was a probe.
    ///
    /// # Errors
    /// [`ProbeError::Malformed`]; nothing changes then.
    pub fn handle_probe(&mut self, now: Instant, peer: usize, payload: &[u8]) -> Result<Option<Vec<u8>>, ProbeError> {
        let probe = Probe::decode(payload)?;
        if peer >= self.peers.len() {
            return Err(ProbeError::Malformed);
        }
        self.touch(peer);
        if probe.echo {
            // The RTT sample first: the echo's own reports also cover this probe.
            let rtt_us = self.micros(now).saturating_sub(probe.sent_us).saturating_sub(u64::from(probe.hold_us));
            let p = &mut self.peers[peer];
            if let Some(path) = p.path_mut(probe.path) {
                let fresh = path.sent.iter().any(|s| s.seq == probe.seq && !s.delivered);
                path.mark_delivered(now, probe.seq);
                if fresh && rtt_us < 10_000_000 {
                    path.rtt_sample(Duration::from_micros(rtt_us));
                }
            }
            self.apply_reports(now, peer, &probe.reports);
            self.evaluate(now, peer);
            return Ok(None);
        }
        self.apply_reports(now, peer, &probe.reports);
        // A probe: note its arrival on that path and echo it with our reports.
        let p = &mut self.peers[peer];
        let path = match p.path_mut(probe.path) {
            Some(path) => path,
            None => {
                // Incoming-only path (the peer uses a relay we do not): track reception.
                self.live.insert(peer);
                p.paths.push(Path::new(probe.path, now, PathState::Down));
                p.paths.last_mut().expect("just pushed")
            }
        };
        path.record_rx(probe.seq);
        path.last_rx = Some(now);
        let echo = Probe { echo: true, path: probe.path, seq: probe.seq, sent_us: probe.sent_us, hold_us: 0, reports: self.reports(peer) };
        Ok(Some(echo.encode()))
    }

    fn reports(&self, peer: usize) -> Vec<(PathId, u32, u64)> {
        self.peers[peer].paths.iter().filter_map(|x| x.rx_highest.map(|h| (x.id, h, x.rx_bitmap))).take(MAX_REPORTS).collect()
    }

    fn apply_reports(&mut self, now: Instant, peer: usize, reports: &[(PathId, u32, u64)]) {
        let p = &mut self.peers[peer];
        for (id, highest, bitmap) in reports {
            if let Some(path) = p.path_mut(*id) {
                for i in 0..64u32 {
                    if bitmap & (1u64 << i) != 0 {
                        if let Some(seq) = highest.checked_sub(i) {
                            path.mark_delivered(now, seq);
                        }
                    }
                }
            }
        }
    }

    fn send_probe(&mut self, now: Instant, peer: usize, path: PathId) {
        let reports = self.reports(peer);
        let sent_us = self.micros(now);
        let Some(x) = self.peers[peer].path_mut(path) else { return };
        let seq = x.next_seq;
        x.next_seq = x.next_seq.wrapping_add(1);
        x.sent.push_back(Sent { seq, at: now, delivered: false, resolved: false });
        while x.sent.len() > SENT_WINDOW {
            x.sent.pop_front();
        }
        x.last_sent = Some(now);
        let payload = Probe { echo: false, path, seq, sent_us, hold_us: 0, reports }.encode();
        self.actions.push_back(Action::Send { peer, path, payload });
    }

    /// This node was late by `lag`: its loop ran a tick that long after it was due, or it
    /// took a probe out of its queue that long after the probe arrived. Probe loss is
    /// judged against the node's own lateness: for [`FailoverConfig::down_after`] from now
    /// no path goes down for silence and no unanswered probe counts as lost, so an
    /// overloaded node slows down instead of rerouting healthy paths. Lags of up to two
    /// probe intervals are normal scheduling noise and ignored.
    pub fn handle_late(&mut self, now: Instant, lag: Duration) {
        if lag <= self.cfg.probe_interval * 2 {
            return;
        }
        self.late += 1;
        let until = now + self.cfg.down_after.max(lag);
        self.grace_until = Some(self.grace_until.map_or(until, |g| g.max(until)));
        // Every judgement waits for the grace to end.
        self.all_stale = true;
    }

    /// How many times this node found itself late ([`Failover::handle_late`]).
    pub fn late_count(&self) -> u64 {
        self.late
    }

    /// When [`Failover::handle_tick`] must run next: the next probe due on a monitored
    /// path, the moment a path's silence or an unanswered probe would count, the end of a
    /// hold-down, a TCP-stall check or a relay request, and the periodic relay upkeep of
    /// each monitored peer (once a second). `None` without monitored peers. Between
    /// these, nothing changes unless an event comes in (a probe, an ICMP, a relay answer),
    /// so an idle node wakes only for its probes.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        let n = self.peers.len();
        self.polls += 1;
        self.deadlines.resize(n, None);
        if self.all_stale {
            for &i in &self.live {
                self.deadlines[i] = self.peer_deadline(i);
            }
            self.deadline_evals += self.live.len() as u64;
            self.all_stale = false;
            self.stale.clear();
        } else {
            for i in std::mem::take(&mut self.stale) {
                if i < n {
                    self.deadlines[i] = self.peer_deadline(i);
                    self.deadline_evals += 1;
                }
            }
        }
        let next = self.live.iter().filter_map(|&i| self.deadlines[i]).chain(self.grace_until).min();
        // Checked at every 8th call in debug builds (the check recomputes every deadline).
        debug_assert!(self.polls % 8 != 0 || next == self.grace_until.into_iter().chain(self.live.iter().filter_map(|&i| self.peer_deadline(i))).min(), "a cached deadline went stale");
        next
    }

    /// When peer `i` needs [`Failover::handle_tick`] next (see [`Failover::poll_timeout`]);
    /// `None` for a peer that is not monitored.
    fn peer_deadline(&self, i: usize) -> Option<Instant> {
        let cfg = &self.cfg;
        let grace = self.grace_until;
        let mut next: Option<Instant> = None;
        let mut at = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        // Silence and loss are not judged while this node is late: not before that ends.
        let judged = |t: Instant| grace.map_or(t, |g| t.max(g));
        let p = &self.peers[i];
        if !p.direct_known && p.paths.is_empty() {
            return None;
        }
        for x in &p.paths {
            let active = match x.id {
                PathId::Direct => p.direct_known,
                PathId::Relay(r) => self.by_id.get(&r).and_then(|ri| p.relays.get(ri)) == Some(&Candidate::Active),
            };
            if active {
                at(next_probe(cfg, self.epoch, p, x));
            }
            if x.last_sent.is_some() {
                let allowance = x.allowance();
                if x.state != PathState::Down {
                    at(judged(silence_limit(cfg, p.active_until, x) + Duration::from_millis(1)));
                }
                if let Some(t) = fast_silence(cfg, p, x) {
                    at(judged(t));
                }
                if let Some(s) = x.sent.iter().find(|s| !s.resolved) {
                    at(judged(s.at + allowance + cfg.probe_interval * 4));
                }
            }
        }
        if let Some((_, deadline)) = p.check {
            at(deadline);
        }
        if p.route.protect {
            if let Some(d) = p.path(PathId::Direct).filter(|d| d.state == PathState::Up) {
                // The damped hold-down only shrinks as the penalty decays: asking at the
                // one that applies now is never too early.
                at(d.state_since + p.damping.hold_down(cfg, d.state_since.max(self.last_tick.unwrap_or(d.state_since))));
            }
        }
        if p.direct_known {
            match p.last_candidates {
                Some(t) => at(next_upkeep(cfg, self.epoch, p, t)),
                None => at(self.epoch),
            }
            if let Some(w) = p.standby_wait {
                at(w);
            }
            for c in p.relays.values() {
                match *c {
                    Candidate::Requested(t) => at(t + Duration::from_secs(2)),
                    Candidate::Refused(until) | Candidate::Retry(until) => at(until),
                    Candidate::Active => {}
                }
            }
        }
        next
    }

    /// Advances time: sends due probes, judges paths, chooses routes and relays. Call it
    /// at [`Failover::poll_timeout`] (or more often); a tick that comes much later than it
    /// asked counts as this node's own lateness ([`Failover::handle_late`]). Only monitored
    /// peers (and paths that only receive) cost anything here.
    pub fn handle_tick(&mut self, now: Instant) {
        if let Some(due) = self.due {
            let base = self.last_tick.map_or(due, |t| due.max(t));
            if now.saturating_duration_since(base) > self.cfg.probe_interval * 2 {
                // Late against the later of what the last tick asked for and what the state
                // asks for now: an event since (an echo that arrived, traffic that started)
                // may have moved the wake-up either way, and neither is this node's lateness.
                let asked = self.poll_timeout().map_or(base, |t| t.max(base));
                self.handle_late(now, now.saturating_duration_since(asked));
            }
        }
        self.last_tick = Some(now);
        // A tick may change any peer.
        self.all_stale = true;
        if self.grace_until.is_some_and(|g| now >= g) {
            // Over: poll_timeout must not keep returning it.
            self.grace_until = None;
        }
        for peer in self.live.clone() {
            if !self.peers[peer].direct_known && self.peers[peer].paths.is_empty() {
                continue;
            }
            let due: Vec<PathId> = {
                let p = &self.peers[peer];
                p.paths
                    .iter()
                    .filter(|x| x.id != PathId::Direct || p.direct_known)
                    .filter(|x| {
                        let active = match x.id {
                            PathId::Direct => true,
                            PathId::Relay(r) => self.by_id.get(&r).and_then(|ri| p.relays.get(ri)) == Some(&Candidate::Active),
                        };
                        active && now >= next_probe(&self.cfg, self.epoch, p, x)
                    })
                    .map(|x| x.id)
                    .collect()
            };
            for path in due {
                self.send_probe(now, peer, path);
            }
            self.evaluate(now, peer);
            self.manage_relays(now, peer);
        }
        self.due = self.poll_timeout();
    }

    /// Judges every path of a peer and then its route.
    fn evaluate(&mut self, now: Instant, peer: usize) {
        let cfg = self.cfg;
        let excused = self.grace_until.is_some_and(|g| now < g);
        let p = &mut self.peers[peer];
        let active_until = p.active_until;
        let mut direct_failed = false;
        let fast: Vec<Option<Instant>> = p.paths.iter().map(|x| fast_silence(&cfg, p, x)).collect();
        for (x, fast) in p.paths.iter_mut().zip(fast) {
            if x.last_sent.is_none() {
                continue;
            }
            let allowance = x.allowance();
            // Unanswered probes old enough count as lost (not while this node is late: their
            // echoes may wait in its own queue).
            for s in x.sent.iter_mut().filter(|_| !excused) {
                if !s.resolved && now >= s.at + allowance + cfg.probe_interval * 4 {
                    s.resolved = true;
                    x.loss += LOSS_ALPHA * (1.0 - x.loss);
                }
            }
            let silent = !excused && (now > silence_limit(&cfg, active_until, x) || fast.is_some_and(|t| now >= t));
            let recovered_probes = x.last_delivered_sent_at.is_some_and(|t| t >= x.state_since);
            // Degraded: loss or an RTT rise over their thresholds for `degraded_after`;
            // up again once both are well below (loss under `recover_loss`, the RTT rise
            // under half its threshold).
            let rtt_on = !cfg.degraded_rtt.is_zero();
            let over = x.loss > cfg.degraded_loss || (rtt_on && x.rtt_rise() > cfg.degraded_rtt);
            let under = x.loss < cfg.recover_loss && !(rtt_on && x.rtt_rise() > cfg.degraded_rtt / 2);
            if over {
                x.impaired_since.get_or_insert(now);
            } else {
                x.impaired_since = None;
            }
            let sustained = x.impaired_since.is_some_and(|t| now.saturating_duration_since(t) >= cfg.degraded_after) || x.loss >= cfg.failed_loss;
            let new = match x.state {
                _ if silent => PathState::Down,
                PathState::Down if recovered_probes => {
                    // The losses counted while the path was down describe the outage, not
                    // the quality of the path that came back, and its RTT starts afresh.
                    x.loss = 0.0;
                    // Probes of the outage not yet resolved are its losses too (with the
                    // fast rule the path is back before they are old enough to count).
                    let back = x.last_delivered_sent_at.unwrap_or(now);
                    for s in x.sent.iter_mut().filter(|s| s.at < back) {
                        s.resolved = true;
                    }
                    x.base_rtt = x.srtt;
                    x.impaired_since = None;
                    PathState::Up
                }
                PathState::Down => PathState::Down,
                PathState::Up if sustained => PathState::Degraded,
                PathState::Degraded if under => PathState::Up,
                s => s,
            };
            if new != x.state {
                if new == PathState::Down {
                    x.answered = 0;
                    direct_failed |= x.id == PathId::Direct;
                }
                x.reason = match new {
                    PathState::Down => Reason::ProbeLoss,
                    PathState::Degraded => Reason::Degraded,
                    PathState::Up => Reason::Healthy,
                };
                tracing::debug!(
                    "peer {peer}: path {} {} -> {} (loss {:.3}, srtt {:?}, last news {:?} ago, fast rule {})",
                    x.id,
                    x.state.as_str(),
                    new.as_str(),
                    x.loss,
                    x.srtt,
                    x.last_news.map(|t| now.saturating_duration_since(t)),
                    fast.is_some_and(|t| now >= t)
                );
                x.state = new;
                x.state_since = now;
            }
        }
        if direct_failed {
            p.damping.flap(&cfg, now);
        }
        if let Some((started, deadline)) = p.check {
            let delivered = p.path(PathId::Direct).and_then(|d| d.last_delivered_sent_at).is_some_and(|t| t >= started);
            if delivered {
                p.check = None;
            } else if now >= deadline {
                p.check = None;
                if let Some(d) = p.paths.iter_mut().find(|x| x.id == PathId::Direct) {
                    let was_down = d.state == PathState::Down;
                    d.state = PathState::Down;
                    d.state_since = now;
                    d.reason = Reason::TcpStall;
                    if !was_down {
                        p.damping.flap(&cfg, now);
                    }
                    d.started = now;
                    d.last_delivered_sent_at = None;
                }
            }
        }
        if self.peers[peer].path(PathId::Direct).is_some_and(|d| d.state == PathState::Degraded) {
            self.degraded.insert(peer);
        } else {
            self.degraded.remove(&peer);
        }
        self.decide(now, peer);
    }

    /// The best relay path that is up: policy rank first (commitment class, priority,
    /// lifespan), then cost.
    fn best_relay(&self, peer: usize) -> Option<PathId> {
        let p = &self.peers[peer];
        p.paths
            .iter()
            .filter(|x| matches!(x.id, PathId::Relay(_)) && x.usable(&self.cfg))
            .filter(|x| match x.id {
                PathId::Relay(r) => self.by_id.get(&r).and_then(|ri| p.relays.get(ri)) == Some(&Candidate::Active),
                PathId::Direct => false,
            })
            .min_by_key(|x| (self.rank_of(x.id), x.cost(self.cfg.loss_penalty)))
            .map(|x| x.id)
    }

    /// The policy rank of a path's relay (the direct path ranks first).
    fn rank_of(&self, path: PathId) -> RelayRank {
        match path {
            PathId::Direct => RelayRank { commitment: Commitment::Always, inv_priority: 0, ephemeral: 0 },
            PathId::Relay(r) => self.by_id.get(&r).map(|&i| self.peers[i].rank).unwrap_or_default(),
        }
    }

    /// Sets the policy rank of peer `peer` as a relay (from its directory record). A peer
    /// of commitment `never` is never asked; one of `last_resort` only when no other relay
    /// works.
    pub fn set_rank(&mut self, peer: usize, rank: RelayRank) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.rank = rank;
        }
    }

    /// Peer `peer`'s policy rank as a relay.
    pub fn rank(&self, peer: usize) -> RelayRank {
        self.peers.get(peer).map(|p| p.rank).unwrap_or_default()
    }

    fn decide(&mut self, now: Instant, peer: usize) {
        let best = self.best_relay(peer);
        let best_rank = best.map(|b| self.rank_of(b)).unwrap_or_default();
        let cur_rank = self.rank_of(self.peers[peer].route.path);
        let cfg = self.cfg;
        let p = &mut self.peers[peer];
        if !p.direct_known {
            return;
        }
        let Some(direct) = p.path(PathId::Direct) else { return };
        // A degraded path keeps the route (a share of new connections moves instead, see
        // `relief`); a failed one (loss over `failed_loss`) loses it like a dead one. Back
        // to direct only once it is up again for the hold-down.
        let direct_up = direct.usable(&cfg);
        let direct_healthy = direct.state == PathState::Up;
        let direct_settled = direct_healthy && now.saturating_duration_since(direct.state_since) >= p.damping.hold_down(&cfg, now);
        let cur = p.route;
        let current_ok = match cur.path {
            PathId::Direct => direct_up,
            id => p.path(id).is_some_and(|x| x.usable(&cfg)),
        };
        let next = if cur.path == PathId::Direct && !cur.protect && direct_up {
            cur
        } else if cur.protect && direct_settled {
            Route { path: PathId::Direct, protect: false, reason: Reason::Healthy, since: now }
        } else if cur.path == PathId::Direct && !cur.protect {
            // The direct path just failed.
            Route { path: best.unwrap_or(PathId::Direct), protect: true, reason: direct.reason, since: now }
        } else if !current_ok || cur.path == PathId::Direct {
            // On the overlay: the relay in use failed, or none was usable yet. The reason
            // stays why traffic left the direct path.
            match best {
                Some(b) if b != cur.path => Route { path: b, protect: true, reason: cur.reason, since: now },
                _ => cur,
            }
        } else {
            // Prefer a relay of a better policy rank, or a clearly cheaper one of the same.
            match (best, p.path(cur.path)) {
                (Some(b), Some(c)) if b != cur.path => {
                    let bc = p.path(b).expect("best exists").cost(cfg.loss_penalty);
                    if best_rank < cur_rank || (best_rank == cur_rank && bc.mul_f64(1.25) < c.cost(cfg.loss_penalty)) {
                        Route { path: b, ..cur }
                    } else {
                        cur
                    }
                }
                _ => cur,
            }
        };
        if next.path != cur.path || next.protect != cur.protect {
            p.route = next;
            p.changes += 1;
            if next.path != cur.path {
                self.actions.push_back(Action::UsePath { peer, path: next.path });
            }
            if next.protect != cur.protect {
                self.actions.push_back(Action::Protect { peer, on: next.protect });
            }
        } else if next.reason != cur.reason {
            p.route.reason = next.reason;
        }
    }

    /// Keeps `relay_candidates` relay sessions ready per peer (best known first, RON), and
    /// asks `sosr_fanout` random relays at once when traffic needs a relay and none works.
    fn manage_relays(&mut self, now: Instant, peer: usize) {
        let n = self.peers.len();
        if !self.peers[peer].direct_known {
            return;
        }
        // Expire refusals and requests that got no answer.
        let retry = self.cfg.relay_retry;
        let mut again = Vec::new();
        let mut unanswered = Vec::new();
        for (r, c) in self.peers[peer].relays.iter_mut() {
            match *c {
                Candidate::Requested(at) if now >= at + Duration::from_secs(2) => {
                    *c = Candidate::Refused(now + retry);
                    unanswered.push(*r);
                }
                Candidate::Retry(at) if now >= at => {
                    *c = Candidate::Requested(now);
                    again.push(*r);
                }
                _ => {}
            }
        }
        for r in unanswered {
            self.peers[peer].reasked.remove(&r);
        }
        for r in again {
            let purpose = if self.peers[r].rank.commitment == Commitment::LastResort { Purpose::LastResort } else { Purpose::Failover };
            self.actions.push_back(Action::RequestRelay { relay: r, peer, purpose });
        }
        self.peers[peer].relays.retain(|_, c| !matches!(c, Candidate::Refused(until) if now >= *until));
        // Relay paths that died lose their session; it is asked for again later.
        let dead: Vec<usize> = {
            let p = &self.peers[peer];
            p.relays
                .iter()
                .filter(|(r, c)| {
                    **c == Candidate::Active && p.path(PathId::Relay(self.peers[**r].id)).is_some_and(|x| x.state == PathState::Down && now.saturating_duration_since(x.state_since) > retry)
                })
                .map(|(r, _)| *r)
                .collect()
        };
        for r in dead {
            let rid = self.peers[r].id;
            self.peers[peer].relays.insert(r, Candidate::Refused(now + retry));
            self.peers[peer].paths.retain(|x| x.id != PathId::Relay(rid));
        }
        let needs_relay = self.peers[peer].route.protect;
        let best = self.best_relay(peer);
        let working = best.is_some_and(|b| self.rank_of(b).commitment != Commitment::LastResort);
        // Last-resort relays are released once another relay works again.
        if working || !needs_relay {
            let lr: Vec<usize> = self.peers[peer]
                .relays
                .iter()
                .filter(|(r, c)| self.peers[**r].rank.commitment == Commitment::LastResort && matches!(c, Candidate::Active | Candidate::Requested(_) | Candidate::Retry(_)))
                .map(|(r, _)| *r)
                .collect();
            for r in lr {
                self.release_relay(peer, r);
            }
        }
        let last = self.peers[peer].last_candidates;
        let urgent = needs_relay && !working;
        let waited = self.peers[peer].standby_wait.is_some_and(|w| now >= w);
        if !urgent && !waited && last.is_some_and(|t| now < next_upkeep(&self.cfg, self.epoch, &self.peers[peer], t)) {
            return;
        }
        self.peers[peer].standby_wait = None;
        if urgent && last.is_some_and(|t| now < t + Duration::from_millis(500)) {
            return;
        }
        self.peers[peer].last_candidates = Some(now);
        let target = self.peers[peer].id;
        // Rank every other peer as a relay for `target`: policy first (a peer that never
        // relays is not asked, a last-resort one only when nothing else works), then the
        // known cost, then at random.
        let mut ranked: Vec<(RelayRank, Duration, u64, usize)> = Vec::new();
        for r in 0..n {
            if r == peer {
                continue;
            }
            let rank = self.peers[r].rank;
            if rank.commitment == Commitment::Never || (rank.commitment == Commitment::LastResort && !urgent) {
                continue;
            }
            let Some(to_relay) = self.peers[r].path(PathId::Direct) else { continue };
            if !self.peers[r].direct_known || to_relay.state == PathState::Down {
                continue;
            }
            let known = self.links.get(&(r, target)).map(|(l, _)| *l);
            if known.is_some_and(|l| !l.up) {
                continue;
            }
            let cost = match known {
                Some(l) => to_relay.cost(self.cfg.loss_penalty) + Duration::from_secs_f64(l.rtt_ms.unwrap_or(100.0) / 1000.0) + self.cfg.loss_penalty.mul_f64(l.loss),
                None => Duration::from_secs(3600),
            };
            let tiebreak = self.random();
            ranked.push((rank, cost, tiebreak, r));
        }
        ranked.sort();
        // A last-resort relay only once no other could still work: none asked and waiting,
        // none ready whose path is not down, none not asked yet.
        if urgent {
            let p = &self.peers[peer];
            let other_pending = p.relays.iter().any(|(r, c)| {
                self.peers[*r].rank.commitment != Commitment::LastResort
                    && match c {
                        Candidate::Requested(_) | Candidate::Retry(_) => true,
                        Candidate::Active => p.path(PathId::Relay(self.peers[*r].id)).is_none_or(|x| x.state != PathState::Down),
                        Candidate::Refused(_) => false,
                    }
            });
            let other_unasked = ranked.iter().any(|(rank, _, _, r)| rank.commitment != Commitment::LastResort && !p.relays.contains_key(r));
            if other_pending || other_unasked {
                ranked.retain(|(rank, _, _, _)| rank.commitment != Commitment::LastResort);
            }
        }
        let want = if urgent { self.cfg.relay_candidates + self.cfg.sosr_fanout } else { self.cfg.relay_candidates };
        // A better-ranked relay than a standby one (its policy became known, or it came
        // back): swap the worst standby for it, one per round.
        {
            let p = &self.peers[peer];
            let in_use = p.route.path;
            let worst = p
                .relays
                .iter()
                .filter(|(r, c)| matches!(c, Candidate::Active | Candidate::Requested(_) | Candidate::Retry(_)) && PathId::Relay(self.peers[**r].id) != in_use)
                .map(|(r, _)| (self.peers[*r].rank, *r))
                .max();
            let have = p.relays.values().filter(|c| matches!(c, Candidate::Active | Candidate::Requested(_) | Candidate::Retry(_))).count();
            let better = ranked.iter().find(|(_, _, _, r)| !p.relays.contains_key(r)).map(|(rank, _, _, r)| (*rank, *r));
            if let (Some((wr, w)), Some((br, _))) = (worst, better) {
                if have >= want && br < wr {
                    self.release_relay(peer, w);
                }
            }
        }
        if !urgent {
            self.standby_tokens = (self.standby_tokens + now.saturating_duration_since(self.standby_at).as_secs_f64() * STANDBY_REQUESTS_PER_S).min(STANDBY_BURST);
            self.standby_at = now;
        }
        let p = &self.peers[peer];
        let have = p.relays.values().filter(|c| matches!(c, Candidate::Active | Candidate::Requested(_) | Candidate::Retry(_))).count();
        let mut asks = Vec::new();
        let ranked_len = ranked.iter().filter(|(_, _, _, r)| !p.relays.contains_key(r)).count();
        for (rank, _, _, r) in ranked {
            if have + asks.len() >= want || (!urgent && self.standby_tokens < 1.0 + asks.len() as f64) {
                break;
            }
            if !p.relays.contains_key(&r) {
                asks.push((r, if rank.commitment == Commitment::LastResort { Purpose::LastResort } else { Purpose::Failover }));
            }
        }
        if !urgent {
            self.standby_tokens -= asks.len() as f64;
            if have + asks.len() < want && asks.len() < ranked_len {
                // Out of requests for now: again when the next one is due.
                let deficit = (1.0 - self.standby_tokens).max(0.0);
                self.peers[peer].standby_wait = Some(now + Duration::from_secs_f64(deficit / STANDBY_REQUESTS_PER_S));
            }
        }
        for (r, purpose) in asks {
            self.peers[peer].relays.insert(r, Candidate::Requested(now));
            self.actions.push_back(Action::RequestRelay { relay: r, peer, purpose });
        }
    }

    /// Gives up relay `relay` for `peer`: its path is no longer monitored and the relay is
    /// told (it may be asked again later).
    fn release_relay(&mut self, peer: usize, relay: usize) {
        let rid = self.peers[relay].id;
        self.peers[peer].relays.remove(&relay);
        self.peers[peer].reasked.remove(&relay);
        self.peers[peer].paths.retain(|x| x.id != PathId::Relay(rid));
        self.actions.push_back(Action::ReleaseRelay { relay, peer });
    }

    /// The node IDs of the relays currently active for a peer (to release on shutdown).
    pub fn active_relays(&self, peer: usize) -> Vec<usize> {
        self.peers.get(peer).map(|p| p.relays.iter().filter(|(_, c)| **c == Candidate::Active).map(|(r, _)| *r).collect()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Two or more nodes exchanging probes through a simulated network in which each
    /// directed hop can be cut or made lossy.
    struct Net {
        nodes: Vec<Failover>,
        ids: Vec<NodeId>,
        now: Instant,
        /// (from, to) hops that drop everything.
        cut: Vec<(usize, usize)>,
        /// (from, to, loss probability in 1/1000).
        lossy: Vec<(usize, usize, u64)>,
        rng: u64,
        /// Relay sessions each node accepts.
        relay_ok: Vec<bool>,
        in_flight: Vec<(Instant, usize, usize, PathId, Vec<u8>)>,
        /// Nodes whose loop is stalled: they neither tick nor take packets out of their
        /// queue (packets to them wait in flight).
        stalled: Vec<usize>,
        /// Nodes ticked only when their `poll_timeout` is due (the daemon's way), and how
        /// often each node was ticked.
        lazy: Vec<usize>,
        ticks: Vec<u64>,
        latency: Duration,
        /// Each node's relay policy (checked by the node when asked).
        policies: Vec<crate::node::policy::Policy>,
        /// Relay requests made: (requester, relay, purpose).
        asked: Vec<(usize, usize, Purpose)>,
        /// Traffic flows between every pair (each node sees it every step); off, every
        /// peer is idle and probed at the idle rate.
        traffic: bool,
        /// Probes (not echoes) sent by each node.
        probes: Vec<u64>,
        /// Relays answer a node's first request for a peer with a transient refusal (they
        /// open a session to the peer first), as a relay learned from the directory does.
        opening: bool,
        /// (requester, relay, peer node) requests answered so far.
        answered: Vec<(usize, usize, usize)>,
        /// (from, to, delay): queueing delay added on the direct path from → to.
        queue: Vec<(usize, usize, Duration)>,
    }

    impl Net {
        fn new(n: usize) -> Net {
            let ids: Vec<NodeId> = (0..n).map(|i| NodeId([i as u8 + 1; 16])).collect();
            let now = Instant::now();
            let nodes = (0..n)
                .map(|i| {
                    let peers: Vec<NodeId> = ids.iter().copied().filter(|x| *x != ids[i]).collect();
                    let mut f = Failover::new(ids[i], &peers, FailoverConfig::default(), 42 + i as u64, now);
                    for p in 0..peers.len() {
                        f.handle_direct_known(now, p);
                    }
                    f
                })
                .collect();
            Net {
                nodes,
                ids,
                now,
                cut: vec![],
                lossy: vec![],
                rng: 7,
                relay_ok: vec![true; n],
                in_flight: vec![],
                stalled: vec![],
                lazy: vec![],
                ticks: vec![0; n],
                latency: MS,
                policies: vec![crate::node::policy::Policy::default(); n],
                asked: vec![],
                traffic: true,
                probes: vec![0; n],
                opening: false,
                answered: vec![],
                queue: vec![],
            }
        }
        /// Node `r` publishes `policy`: every other node learns its rank.
        fn set_policy(&mut self, r: usize, policy: crate::node::policy::Policy) {
            for a in 0..self.nodes.len() {
                if a != r {
                    let pi = self.pidx(a, r);
                    self.nodes[a].set_rank(pi, RelayRank::of(&policy, 0));
                }
            }
            self.policies[r] = policy;
        }
        /// The node a route goes through (`None`: direct).
        fn via(&self, a: usize, b: usize) -> Option<usize> {
            match self.route(a, b).path {
                PathId::Relay(r) => self.ids.iter().position(|x| *x == r),
                PathId::Direct => None,
            }
        }
        /// Peer index of node `b` at node `a`.
        fn pidx(&self, a: usize, b: usize) -> usize {
            if b < a {
                b
            } else {
                b - 1
            }
        }
        fn node_of(&self, a: usize, pidx: usize) -> usize {
            if pidx < a {
                pidx
            } else {
                pidx + 1
            }
        }
        fn drops(&mut self, from: usize, to: usize) -> bool {
            if self.cut.contains(&(from, to)) {
                return true;
            }
            if let Some(&(_, _, l)) = self.lossy.iter().find(|(f, t, _)| *f == from && *t == to) {
                self.rng ^= self.rng << 13;
                self.rng ^= self.rng >> 7;
                self.rng ^= self.rng << 17;
                return self.rng % 1000 < l;
            }
            false
        }
        /// Delivers a packet from node `a` to node `b` over `path` (hops checked).
        fn deliver(&mut self, a: usize, b: usize, path: PathId, payload: Vec<u8>) {
            let queued = match path {
                PathId::Direct => self.queue.iter().find(|(f, t, _)| *f == a && *t == b).map_or(Duration::ZERO, |q| q.2),
                PathId::Relay(_) => Duration::ZERO,
            };
            let ok = match path {
                PathId::Direct => !self.drops(a, b),
                PathId::Relay(r) => {
                    let r = self.ids.iter().position(|x| *x == r).unwrap();
                    !self.drops(a, r) && !self.drops(r, b)
                }
            };
            if ok {
                self.in_flight.push((self.now + self.latency + queued, a, b, path, payload));
            }
        }
        fn step(&mut self) {
            self.now += 10 * MS;
            let now = self.now;
            let due: Vec<_> = {
                let stalled = self.stalled.clone();
                let (d, rest): (Vec<_>, Vec<_>) = self.in_flight.drain(..).partition(|x| x.0 <= now && !stalled.contains(&x.2));
                self.in_flight = rest;
                d
            };
            for (_, a, b, path, payload) in due {
                let pa = self.pidx(b, a);
                if let Ok(Some(echo)) = self.nodes[b].handle_probe(now, pa, &payload) {
                    self.deliver(b, a, path, echo);
                }
            }
            for a in 0..self.nodes.len() {
                if self.traffic && !self.stalled.contains(&a) {
                    for p in 0..self.nodes.len() - 1 {
                        self.nodes[a].handle_traffic(now, p);
                    }
                }
                if self.stalled.contains(&a) || (self.lazy.contains(&a) && self.nodes[a].poll_timeout().is_some_and(|t| t > now)) {
                    continue;
                }
                self.ticks[a] += 1;
                self.nodes[a].handle_tick(now);
                while let Some(act) = self.nodes[a].poll_action() {
                    match act {
                        Action::Send { peer, path, payload } => {
                            let b = self.node_of(a, peer);
                            self.probes[a] += 1;
                            self.deliver(a, b, path, payload);
                        }
                        Action::RequestRelay { relay, peer, purpose } => {
                            let r = self.node_of(a, relay);
                            self.asked.push((a, r, purpose));
                            let ok = self.relay_ok[r] && crate::node::state::relay_policy_admits(&self.policies[r], purpose).is_ok();
                            let b = self.node_of(a, peer);
                            let first = !self.answered.contains(&(a, r, b));
                            self.answered.push((a, r, b));
                            if self.opening && first {
                                self.nodes[a].handle_relay_answer(now, relay, peer, false, true);
                            } else {
                                self.nodes[a].handle_relay_response(now, relay, peer, ok);
                            }
                        }
                        _ => {}
                    }
                }
            }
            // link reports once a second
            if (now - self.nodes[0].epoch).as_millis() % 1000 < 10 {
                for r in 0..self.nodes.len() {
                    let rep = self.nodes[r].link_report();
                    for a in 0..self.nodes.len() {
                        if a != r && !self.cut.contains(&(r, a)) {
                            let ri = self.pidx(a, r);
                            self.nodes[a].handle_link_report(now, ri, &rep);
                        }
                    }
                }
            }
        }
        fn run(&mut self, d: Duration) {
            let end = self.now + d;
            while self.now < end {
                self.step();
            }
        }
        fn route(&self, a: usize, b: usize) -> Route {
            self.nodes[a].route(self.pidx(a, b)).unwrap()
        }
        fn cut_both(&mut self, a: usize, b: usize) {
            self.cut.push((a, b));
            self.cut.push((b, a));
        }
    }

    #[test]
    fn probe_codec_round_trips_and_rejects_garbage() {
        let p = Probe { echo: true, path: PathId::Relay(NodeId([3; 16])), seq: 9, sent_us: 123, hold_us: 4, reports: vec![(PathId::Direct, 8, 0b101)] };
        assert_eq!(Probe::decode(&p.encode()).unwrap(), p);
        assert!(Probe::decode(&[]).is_err());
        assert!(Probe::decode(&[3; 40]).is_err());
        let mut long = p.encode();
        long[33] = 200;
        assert!(Probe::decode(&long).is_err());
        assert!(Probe::decode(&p.encode()[..40]).is_err());
    }

    #[test]
    fn healthy_paths_stay_direct_and_measure_rtt() {
        let mut net = Net::new(3);
        net.run(Duration::from_secs(3));
        assert_eq!(net.route(0, 1).path, PathId::Direct);
        assert!(!net.route(0, 1).protect);
        let views = net.nodes[0].paths(0);
        let d = views.iter().find(|v| v.id == PathId::Direct).unwrap();
        assert_eq!(d.state, PathState::Up);
        assert!(d.srtt.unwrap() <= 20 * MS, "{:?}", d.srtt);
        // standby relay paths are set up and proven
        assert!(views.iter().any(|v| matches!(v.id, PathId::Relay(_)) && v.state == PathState::Up), "{views:?}");
    }

    #[test]
    fn a_silent_cut_moves_traffic_to_a_relay_in_under_a_second_and_back_after_hold_down() {
        let mut net = Net::new(3);
        net.run(Duration::from_secs(3));
        let t0 = net.now;
        net.cut_both(0, 1);
        while net.route(0, 1).path == PathId::Direct {
            net.step();
            assert!(net.now - t0 < Duration::from_secs(1), "no failover within 1 s");
        }
        let r = net.route(0, 1);
        assert_eq!(r.path, PathId::Relay(net.ids[2]));
        assert!(r.protect);
        assert_eq!(r.reason, Reason::ProbeLoss);
        assert!(net.route(1, 0).protect, "the other direction reroutes too");
        // restore: direct again after the hold-down, not much later
        net.cut.clear();
        let t1 = net.now;
        while net.route(0, 1).path != PathId::Direct {
            net.step();
            assert!(net.now - t1 < FailoverConfig::default().hold_down + Duration::from_millis(300), "slow return");
        }
        assert!(net.now - t1 >= FailoverConfig::default().hold_down);
        assert!(!net.route(0, 1).protect);
    }

    #[test]
    fn a_flapping_direct_path_is_damped_and_trusted_again_once_it_stops() {
        let mut net = Net::new(3);
        net.run(Duration::from_secs(3));
        let cfg = FailoverConfig::default();
        // cut for 1 s, healed for 4 s (longer than the base hold-down), for two minutes:
        // without damping traffic would go back and forth 24 times each way
        let t0 = net.now;
        let before = net.nodes[0].route_changes(0);
        let mut cycles = 0;
        while net.now - t0 < Duration::from_secs(120) {
            net.cut_both(0, 1);
            net.run(Duration::from_secs(1));
            net.cut.clear();
            net.run(Duration::from_secs(4));
            cycles += 1;
        }
        let (flaps, penalty, hold) = net.nodes[0].damping(0, net.now);
        let switches = net.nodes[0].route_changes(0) - before;
        assert!(flaps >= cycles as u64 - 1, "{flaps} flaps counted of {cycles}");
        assert!(switches <= 10, "{switches} route changes in {cycles} flaps");
        assert_eq!(hold, cfg.max_hold_down, "penalty {penalty}");
        assert!(net.route(0, 1).protect, "traffic went back to a path that flaps");
        // the flapping stops: the penalty decays and traffic returns, within the ceiling
        // plus a few half-lives
        let t1 = net.now;
        while net.route(0, 1).protect {
            net.step();
            assert!(net.now - t1 < cfg.max_hold_down + cfg.flap_half_life * 2, "never trusted again");
        }
        println!("{cycles} flaps, {switches} route changes; direct again after {:?}", net.now - t1);
        // and once the penalty has decayed, a single failure gets the base hold-down
        net.run(cfg.flap_half_life * 4);
        let (_, penalty, hold) = net.nodes[0].damping(0, net.now);
        assert!(penalty < 1.0, "{penalty}");
        assert_eq!(hold, cfg.hold_down);
    }

    #[test]
    fn the_hold_down_doubles_per_recent_flap_up_to_the_ceiling_and_decays() {
        let cfg = FailoverConfig::default();
        let t = Instant::now();
        let mut d = FlapDamping::default();
        assert_eq!(d.hold_down(&cfg, t), cfg.hold_down);
        let mut holds = Vec::new();
        for _ in 0..8 {
            d.flap(&cfg, t);
            holds.push(d.hold_down(&cfg, t).as_secs());
        }
        assert_eq!(holds, [3, 6, 12, 24, 48, 60, 60, 60]);
        assert_eq!(d.flaps, 8);
        // capped one step past the ceiling: after one half-life it is below it again
        assert!(d.hold_down(&cfg, t + cfg.flap_half_life + Duration::from_secs(1)) < cfg.max_hold_down);
        assert!(d.hold_down(&cfg, t + cfg.flap_half_life * 10) <= cfg.hold_down + Duration::from_millis(50));
    }

    #[test]
    fn ticking_only_when_poll_timeout_asks_detects_and_recovers_the_same() {
        let mut net = Net::new(3);
        net.lazy = vec![0, 1, 2];
        net.run(Duration::from_secs(3));
        let steps = 300;
        assert!(net.ticks[0] < steps / 2 + 10, "an idle node ticked {} times in {steps} steps", net.ticks[0]);
        let t0 = net.now;
        net.cut_both(0, 1);
        while net.route(0, 1).path == PathId::Direct {
            net.step();
            assert!(net.now - t0 < Duration::from_secs(1), "no failover within 1 s");
        }
        assert_eq!(net.route(0, 1).path, PathId::Relay(net.ids[2]));
        assert!(net.route(1, 0).protect);
        net.cut.clear();
        let t1 = net.now;
        while net.route(0, 1).path != PathId::Direct {
            net.step();
            assert!(net.now - t1 < FailoverConfig::default().hold_down + Duration::from_millis(300), "slow return");
        }
        assert!(!net.route(0, 1).protect);
        // No false lateness: a node ticked when it asked is never late.
        assert_eq!(net.nodes[0].late_count(), 0);
    }

    #[test]
    fn a_one_way_failure_reroutes_only_the_broken_direction() {
        let mut net = Net::new(3);
        net.run(Duration::from_secs(3));
        net.cut.push((0, 1)); // only A -> B
        net.run(Duration::from_secs(2));
        assert!(net.route(0, 1).protect, "A must reroute A->B");
        assert_eq!(net.route(0, 1).path, PathId::Relay(net.ids[2]));
        assert!(!net.route(1, 0).protect, "B->A works; B keeps it: {:?}", net.route(1, 0));
        assert_eq!(net.route(1, 0).path, PathId::Direct);
        // and the reverse case: only B -> A broken, A's packets still arrive
        let mut net = Net::new(3);
        net.run(Duration::from_secs(3));
        net.cut.push((1, 0));
        net.run(Duration::from_secs(2));
        assert!(net.route(1, 0).protect);
        assert!(!net.route(0, 1).protect, "A's own direction is fine: {:?}", net.route(0, 1));
    }

    #[test]
    fn a_one_way_failure_of_an_idle_peer_reroutes_only_the_broken_direction() {
        // The reports that keep B's working direction come only through the relay; they
        // must come in time whenever the cut falls between idle probes.
        for offset_ms in [0u64, 250, 500, 750, 1_000, 1_500, 2_000, 2_500] {
            let mut net = Net::new(3);
            net.traffic = false;
            net.run(Duration::from_secs(10) + Duration::from_millis(offset_ms));
            net.cut.push((0, 1)); // only A -> B
            for _ in 0..60 {
                net.run(Duration::from_millis(100));
                assert!(!net.route(1, 0).protect, "B->A works, cut at +{offset_ms} ms: {:?}", net.route(1, 0));
            }
            assert!(net.route(0, 1).protect, "A must reroute A->B (cut at +{offset_ms} ms)");
        }
    }

    #[test]
    fn twenty_percent_loss_does_not_flap() {
        let mut net = Net::new(3);
        net.run(Duration::from_secs(3));
        net.lossy.push((0, 1, 200));
        net.lossy.push((1, 0, 200));
        let before = net.nodes[0].route_changes(0);
        net.run(Duration::from_secs(60));
        assert_eq!(net.nodes[0].route_changes(0), before, "route changed under 20% loss");
        assert_eq!(net.route(0, 1).path, PathId::Direct);
        // while 70% loss is a degraded path
        net.lossy.clear();
        net.lossy.push((0, 1, 700));
        net.run(Duration::from_secs(10));
        assert!(net.route(0, 1).protect);
        assert_eq!(net.route(0, 1).reason, Reason::Degraded);
    }

    #[test]
    fn a_degraded_direct_path_keeps_its_route_and_moves_a_share_in_proportion_to_the_loss() {
        let mut net = Net::new(3);
        net.run(Duration::from_secs(3));
        assert_eq!(net.nodes[0].relief(0), None, "a healthy path is relieved");
        // 2 % loss: below the threshold, nothing moves
        net.lossy.push((0, 1, 20));
        net.lossy.push((1, 0, 20));
        net.run(Duration::from_secs(20));
        assert_eq!(net.nodes[0].relief(0), None);
        // 20 % loss each way: degraded, a share moves to the relay; the route stays
        net.lossy.clear();
        net.lossy.push((0, 1, 200));
        net.lossy.push((1, 0, 200));
        let before = net.nodes[0].route_changes(0);
        net.run(Duration::from_secs(20));
        let d = net.nodes[0].paths(0).into_iter().find(|v| v.id == PathId::Direct).unwrap();
        assert_eq!(d.state, PathState::Degraded, "{d:?}");
        let (via, share) = net.nodes[0].relief(0).expect("relief of a degraded path");
        assert_eq!(via, PathId::Relay(net.ids[2]));
        assert!((0.125..=0.75).contains(&share), "share {share} for 20 % loss");
        assert_eq!(net.nodes[0].route_changes(0), before, "the route moved");
        assert!(!net.route(0, 1).protect);
        // healed: up again, nothing moved
        net.lossy.clear();
        net.run(Duration::from_secs(60));
        assert_eq!(net.nodes[0].relief(0), None);
        let d = net.nodes[0].paths(0).into_iter().find(|v| v.id == PathId::Direct).unwrap();
        assert_eq!(d.state, PathState::Up);
        // 70 % loss: failed, everything moves
        net.lossy.push((0, 1, 700));
        net.run(Duration::from_secs(10));
        assert!(net.route(0, 1).protect);
        assert_eq!(net.nodes[0].relief(0), None, "relief while all traffic moved");
    }

    #[test]
    fn a_node_that_was_late_does_not_blame_its_paths_but_a_real_cut_still_counts() {
        let mut net = Net::new(3);
        net.run(Duration::from_secs(3));
        // Node 0's loop stalls for 800 ms (longer than down_after + allowance) while the
        // network is fine: the echoes wait in its queue.
        net.stalled = vec![0];
        net.run(Duration::from_millis(800));
        net.stalled.clear();
        net.run(Duration::from_secs(2));
        assert_eq!(net.route(0, 1).path, PathId::Direct);
        assert!(!net.route(0, 1).protect, "a late loop was taken for a path failure");
        assert_eq!(net.nodes[0].route_changes(0), 0);
        assert!(net.nodes[0].late_count() >= 1);
        // Negative control: the same stall with the path really cut is still detected once
        // the node runs again.
        net.stalled = vec![0];
        net.cut_both(0, 1);
        net.run(Duration::from_millis(800));
        net.stalled.clear();
        net.run(Duration::from_millis(1500));
        assert!(net.route(0, 1).protect, "a real cut during a stall was missed");
    }

    #[test]
    fn icmp_reroutes_at_once() {
        let mut net = Net::new(3);
        net.run(Duration::from_secs(3));
        let now = net.now;
        net.nodes[0].handle_icmp(now, 0);
        let r = net.route(0, 1);
        assert!(r.protect);
        assert_eq!(r.reason, Reason::Icmp);
        assert_eq!(r.path, PathId::Relay(net.ids[2]), "a proven standby relay is used immediately");
        // probes keep succeeding (the ICMP was a false alarm or the failure healed):
        // back to direct after the hold-down
        net.run(Duration::from_secs(4));
        assert!(!net.route(0, 1).protect);
    }

    #[test]
    fn confirmations_grow_with_loss_so_that_a_working_path_is_almost_never_declared_down() {
        assert_eq!(confirmations_needed(0.0), MIN_CONFIRMATIONS);
        assert_eq!(confirmations_needed(0.05), 6);
        assert_eq!(confirmations_needed(0.2), 14);
        assert_eq!(confirmations_needed(0.9), MAX_CONFIRMATIONS);
        assert_eq!(confirmations_needed(f64::NAN), MAX_CONFIRMATIONS);
        for loss in [0.01, 0.05, 0.1, 0.2, 0.3] {
            let n = confirmations_needed(loss);
            let q: f64 = 1.0 - (1.0 - loss) * (1.0 - loss);
            assert!(n == MAX_CONFIRMATIONS || q.powi(n as i32) <= FALSE_DOWN_CHANCE, "{loss}: {n}");
        }
    }

    /// Steps until node 0's route to node 1 leaves the direct path; the time it took.
    fn time_to_reroute(net: &mut Net, limit: Duration) -> Duration {
        let t0 = net.now;
        while net.route(0, 1).path == PathId::Direct {
            net.step();
            assert!(net.now - t0 < limit, "no reroute within {limit:?}");
        }
        net.now - t0
    }

    #[test]
    fn a_silent_cut_of_a_path_with_traffic_is_detected_at_bfd_speed_and_of_an_idle_one_slowly() {
        let mut times = Vec::new();
        for phase in 0..10u64 {
            let mut net = Net::new(3);
            net.run(Duration::from_secs(3) + Duration::from_millis(10 * phase));
            net.cut_both(0, 1);
            times.push(time_to_reroute(&mut net, Duration::from_secs(1)));
        }
        times.sort();
        let median = times[times.len() / 2];
        assert!(median <= Duration::from_millis(150), "{times:?}");
        assert!(times.iter().all(|t| *t <= Duration::from_millis(200)), "{times:?}");
        // a peer without traffic keeps the slow rule: its probes are a second apart
        let mut net = Net::new(3);
        net.traffic = false;
        net.run(Duration::from_secs(15));
        net.cut_both(0, 1);
        let idle = time_to_reroute(&mut net, Duration::from_secs(3));
        assert!(idle > Duration::from_millis(500), "{idle:?}");
        // with the fast rule off, a path with traffic takes down_after
        let mut net = Net::new(3);
        for n in &mut net.nodes {
            n.cfg.fast_down_after = Duration::ZERO;
        }
        net.run(Duration::from_secs(3));
        net.cut_both(0, 1);
        let slow = time_to_reroute(&mut net, Duration::from_secs(1));
        let cfg = FailoverConfig::default();
        assert!(slow >= cfg.down_after - cfg.probe_interval, "{slow:?}");
        println!("silent cut detected in {times:?} with traffic, {slow:?} with the fast rule off, {idle:?} idle");
    }

    #[test]
    fn a_filling_queue_on_the_direct_path_is_not_taken_for_a_cut() {
        // A queue that fills from empty at 2.8 times its drain rate (28 Mbit/s offered to
        // 10): the delay grows by 18 ms every 10 ms up to 400 ms, stays, then drains.
        let mut net = Net::new(3);
        net.run(Duration::from_secs(3));
        let mut delay = Duration::ZERO;
        for _ in 0..2000 {
            delay = (delay + Duration::from_millis(18)).min(Duration::from_millis(400));
            net.queue = vec![(0, 1, delay)];
            net.step();
        }
        while delay > Duration::ZERO {
            delay = delay.saturating_sub(Duration::from_millis(8));
            net.queue = vec![(0, 1, delay)];
            net.step();
        }
        net.run(Duration::from_secs(1));
        assert_eq!(net.nodes[0].damping(0, net.now).0, 0, "the direct path was declared down: {:?}", net.nodes[0].paths(0));
        assert_eq!(net.route(0, 1).path, PathId::Direct);
    }

    #[test]
    fn random_loss_up_to_twenty_percent_never_trips_the_fast_rule() {
        for (permille, secs) in [(50, 120), (100, 120), (200, 300)] {
            let mut net = Net::new(3);
            net.run(Duration::from_secs(3));
            net.lossy.push((0, 1, permille));
            net.lossy.push((1, 0, permille));
            net.run(Duration::from_secs(secs));
            let d = net.nodes[0].paths(0).into_iter().find(|v| v.id == PathId::Direct).unwrap();
            assert_ne!(d.state, PathState::Down, "{permille}: {d:?}");
            assert_eq!(net.nodes[0].damping(0, net.now).0, 0, "{permille} ‰ loss: the direct path went down");
            assert_eq!(net.nodes[1].damping(0, net.now).0, 0, "{permille} ‰ loss: the direct path went down (reverse)");
        }
    }

    #[test]
    fn tcp_stall_is_confirmed_by_probes_before_rerouting() {
        let mut net = Net::new(3);
        // with the fast rule on, the probes alone find this cut first (next test)
        for n in &mut net.nodes {
            n.cfg.fast_down_after = Duration::ZERO;
        }
        net.run(Duration::from_secs(3));
        let now = net.now;
        net.nodes[0].handle_tcp_stall(now, 0);
        net.run(Duration::from_millis(500));
        assert!(!net.route(0, 1).protect, "probes still arrive: no reroute");
        net.cut_both(0, 1);
        net.run(Duration::from_millis(100));
        let now = net.now;
        net.nodes[0].handle_tcp_stall(now, 0);
        net.run(Duration::from_millis(350));
        let r = net.route(0, 1);
        assert!(r.protect);
        assert_eq!(r.reason, Reason::TcpStall, "{r:?}");
    }

    #[test]
    fn a_failed_relay_moves_traffic_to_another() {
        let mut net = Net::new(4);
        net.run(Duration::from_secs(3));
        net.cut_both(0, 1);
        net.run(Duration::from_secs(1));
        let first = match net.route(0, 1).path {
            PathId::Relay(r) => net.ids.iter().position(|x| *x == r).unwrap(),
            PathId::Direct => panic!("not rerouted"),
        };
        // the relay in use stops: everything through it is lost
        for other in 0..4 {
            if other != first {
                net.cut_both(first, other);
            }
        }
        net.run(Duration::from_secs(1));
        let r = net.route(0, 1);
        assert!(matches!(r.path, PathId::Relay(x) if x != net.ids[first]), "{r:?}");
        assert!(r.protect);
        assert_eq!(r.reason, Reason::ProbeLoss, "the reason stays why the direct path is not used");
    }

    #[test]
    fn relays_that_refuse_are_not_used_and_random_ones_are_tried() {
        let mut net = Net::new(5);
        net.relay_ok = vec![true, true, false, false, true];
        net.run(Duration::from_secs(3));
        net.cut_both(0, 1);
        net.run(Duration::from_secs(2));
        assert_eq!(net.route(0, 1).path, PathId::Relay(net.ids[4]));
    }

    #[test]
    fn relays_are_ranked_by_reported_link_quality() {
        let mut net = Net::new(4);
        // C (2) reaches B (1) badly; D (3) well
        net.lossy.push((2, 1, 900));
        net.lossy.push((1, 2, 900));
        net.run(Duration::from_secs(6));
        net.cut_both(0, 1);
        net.run(Duration::from_secs(1));
        assert_eq!(net.route(0, 1).path, PathId::Relay(net.ids[3]));
    }

    fn policy(c: Commitment, priority: u8, lifespan: crate::overlay::directory::Uptime) -> crate::node::policy::Policy {
        crate::node::policy::Policy { commitment: c, priority, lifespan, ..crate::node::policy::Policy::default() }
    }

    #[test]
    fn relays_are_chosen_by_class_and_priority_before_quality_and_never_relays_are_not_asked() {
        use crate::overlay::directory::Uptime::*;
        let mut net = Net::new(6);
        net.nodes.iter_mut().for_each(|n| n.cfg.relay_candidates = 4);
        net.set_policy(2, policy(Commitment::Always, 10, Stable));
        net.set_policy(3, policy(Commitment::Always, 200, Stable));
        net.set_policy(4, policy(Commitment::Never, 255, Stable));
        net.set_policy(5, policy(Commitment::Failure, 255, Stable));
        // The preferred relay reaches B worse than the others: policy comes first.
        net.lossy.push((3, 1, 200));
        net.run(Duration::from_secs(4));
        net.cut_both(0, 1);
        net.run(Duration::from_secs(2));
        assert_eq!(net.via(0, 1), Some(3), "{:?}", net.route(0, 1));
        assert!(!net.asked.iter().any(|&(_, r, _)| r == 4), "a node that never relays was asked: {:?}", net.asked);
        // Without it, the next in class and priority order: always (10) before failure (255).
        for o in 0..6 {
            if o != 3 {
                net.cut_both(3, o);
            }
        }
        net.run(Duration::from_secs(2));
        assert_eq!(net.via(0, 1), Some(2), "{:?}", net.route(0, 1));
    }

    #[test]
    fn a_better_relay_learned_later_replaces_a_standby_one() {
        use crate::overlay::directory::Uptime::*;
        let mut net = Net::new(5);
        net.run(Duration::from_secs(3));
        // Two standby relays are in place before any policy is known; then node 4 turns
        // out to be the preferred one and 2 and 3 ordinary.
        net.set_policy(2, policy(Commitment::Always, 10, Stable));
        net.set_policy(3, policy(Commitment::Always, 10, Stable));
        net.set_policy(4, policy(Commitment::Always, 250, Stable));
        net.run(Duration::from_secs(4));
        net.cut_both(0, 1);
        net.run(Duration::from_secs(2));
        assert_eq!(net.via(0, 1), Some(4), "{:?}", net.route(0, 1));
    }

    #[test]
    fn a_relay_that_is_still_opening_its_session_is_asked_again_and_no_other_meanwhile() {
        let mut net = Net::new(8);
        net.opening = true;
        net.run(Duration::from_secs(6));
        let want = FailoverConfig::default().relay_candidates;
        let mut asked: Vec<usize> = net.answered.iter().filter(|(a, _, b)| *a == 0 && *b == 1).map(|(_, r, _)| *r).collect();
        let requests = asked.len();
        asked.sort();
        asked.dedup();
        // Each relay asked opens a session to the peer: asking others while the first ones
        // open theirs would leave sessions nobody uses.
        assert_eq!(asked.len(), want, "node 0 asked relays {asked:?} for peer 1 ({requests} requests)");
        assert_eq!(requests, 2 * want, "each asked twice: refused for a moment, then accepted");
        assert_eq!(net.nodes[0].active_relays(net.pidx(0, 1)).len(), want);
    }

    #[test]
    fn a_stable_relay_is_chosen_over_an_ephemeral_one_of_equal_quality() {
        use crate::overlay::directory::Uptime::*;
        for seed_order in [(2, 3), (3, 2)] {
            let mut net = Net::new(4);
            net.set_policy(seed_order.0, policy(Commitment::Always, 100, Ephemeral));
            net.set_policy(seed_order.1, policy(Commitment::Always, 100, Stable));
            net.run(Duration::from_secs(3));
            net.cut_both(0, 1);
            net.run(Duration::from_secs(2));
            assert_eq!(net.via(0, 1), Some(seed_order.1));
        }
    }

    #[test]
    fn a_last_resort_relay_is_asked_and_used_only_while_no_other_relay_works() {
        use crate::overlay::directory::Uptime::*;
        let mut net = Net::new(4);
        net.set_policy(2, policy(Commitment::Failure, 100, Stable));
        net.set_policy(3, policy(Commitment::LastResort, 255, Stable));
        net.run(Duration::from_secs(3));
        assert!(!net.asked.iter().any(|&(_, r, _)| r == 3), "standby must not ask a last-resort relay");
        net.cut_both(0, 1);
        net.run(Duration::from_secs(2));
        assert_eq!(net.via(0, 1), Some(2));
        assert!(!net.asked.iter().any(|&(a, r, _)| a == 0 && r == 3));
        // The failure-only relay dies: now the last resort, asked as such.
        net.cut_both(0, 2);
        net.cut_both(1, 2);
        net.run(Duration::from_secs(3));
        assert_eq!(net.via(0, 1), Some(3), "{:?}", net.route(0, 1));
        assert!(net.asked.iter().any(|&(a, r, p)| a == 0 && r == 3 && p == Purpose::LastResort));
        // It comes back: traffic leaves the last resort, whose session is released.
        net.cut.retain(|&(x, y)| x != 2 && y != 2);
        net.run(Duration::from_secs(15));
        assert_eq!(net.via(0, 1), Some(2), "{:?}", net.route(0, 1));
        assert!(!net.nodes[0].active_relays(0).contains(&net.pidx(0, 3)));
    }

    #[test]
    fn garbage_probes_change_nothing() {
        let mut net = Net::new(2);
        net.run(Duration::from_secs(1));
        let now = net.now;
        assert!(net.nodes[0].handle_probe(now, 0, &[1, 2, 3]).is_err());
        assert!(net.nodes[0].handle_probe(now, 9, &Probe { echo: false, path: PathId::Direct, seq: 1, sent_us: 0, hold_us: 0, reports: vec![] }.encode()).is_err());
        net.run(Duration::from_secs(1));
        assert_eq!(net.route(0, 1).path, PathId::Direct);
    }

    #[test]
    fn idle_peers_are_probed_at_the_idle_rate_and_woken_about_once_an_interval() {
        let mut net = Net::new(4);
        net.traffic = false;
        net.lazy = vec![0, 1, 2, 3];
        net.run(Duration::from_secs(10));
        let (p0, t0) = (net.probes[0], net.ticks[0]);
        net.run(Duration::from_secs(20));
        let cfg = FailoverConfig::default();
        // 3 peers, each a direct path and at most `relay_candidates` standby relay paths.
        let per_s = (net.probes[0] - p0) as f64 / 20.0;
        let most = 3.0 * (1 + cfg.relay_candidates) as f64 / cfg.idle_interval.as_secs_f64();
        assert!(per_s <= most * 1.1, "{per_s} probes/s from an idle node, expected at most {most}");
        assert!(per_s >= 3.0 * 0.9, "{per_s} probes/s: the direct paths must still be probed");
        // Idle probes share wake-ups: a few per idle interval, not one per path.
        let wakes = (net.ticks[0] - t0) as f64 / 20.0;
        assert!(wakes <= 4.0, "{wakes} wake-ups/s on an idle node");
        for b in 1..4 {
            assert_eq!(net.route(0, b).path, PathId::Direct);
            let d = net.nodes[0].paths(net.pidx(0, b)).into_iter().find(|v| v.id == PathId::Direct).unwrap();
            assert_eq!(d.state, PathState::Up);
            assert_eq!(d.loss, 0.0, "idle probing is not loss");
            // Standby relay paths stay proven while idle.
            let relays: Vec<PathView> = net.nodes[0].paths(net.pidx(0, b)).into_iter().filter(|v| v.id != PathId::Direct).collect();
            assert!(!relays.is_empty(), "standby relays are in place");
            assert!(relays.iter().all(|v| v.state == PathState::Up), "{relays:?}");
        }
        assert_eq!(net.nodes[0].late_count(), 0);
    }

    #[test]
    fn an_event_about_one_peer_recomputes_only_that_peers_wake_up() {
        // Twenty idle nodes, each ticked only when its poll_timeout asks (the daemon's way);
        // every 10 ms step asks every node for its next wake-up, after whatever probes and
        // echoes reached it. The answer comes from the cached deadlines (checked against a
        // full recomputation in debug builds at every call): only peers an event touched are
        // recomputed between ticks. Recomputing all was half of an idle hub's CPU with 99
        // peers (issue 11).
        let n = 20;
        let mut net = Net::new(n);
        net.traffic = false;
        net.lazy = (0..n).collect();
        net.run(Duration::from_secs(5));
        let (polls, evals, ticks) = (net.nodes[0].polls, net.nodes[0].deadline_evals, net.ticks[0]);
        net.run(Duration::from_secs(10));
        let polls = net.nodes[0].polls - polls;
        let evals = net.nodes[0].deadline_evals - evals;
        let ticks = net.ticks[0] - ticks;
        let per_poll = evals as f64 / polls as f64;
        eprintln!("{polls} polls, {ticks} ticks, {evals} peer deadlines recomputed ({per_poll:.2} per poll; all {} peers each time before)", n - 1);
        // A tick recomputes all peers once; everything else only the peer it concerns.
        assert!(evals <= ticks * (n as u64 - 1) + polls, "{evals} recomputed over {polls} polls and {ticks} ticks");
        assert!(per_poll < 3.0, "{per_poll}");
        for b in 1..n {
            assert_eq!(net.route(0, b).path, PathId::Direct);
        }
    }

    #[test]
    fn a_node_with_many_peers_sets_up_standby_relays_gradually_and_a_failed_path_at_once() {
        // Node 0 monitors 17 idle peers and wants two standby relays for each: 34 requests,
        // each making a relay open a session to a peer it may not know yet. They go out at
        // STANDBY_REQUESTS_PER_S after a burst, not in the first second.
        let n = 18;
        let mut net = Net::new(n);
        net.traffic = false;
        let asked = |net: &Net| net.asked.iter().filter(|(a, _, _)| *a == 0).count();
        net.run(Duration::from_secs(1));
        let first = asked(&net);
        assert!(first as f64 <= STANDBY_BURST + STANDBY_REQUESTS_PER_S * 1.1, "{first} requests in the first second");
        assert!(first < 2 * (n - 1), "{first} requests in the first second");
        net.run(Duration::from_secs(4));
        let all = asked(&net);
        assert!(all >= 2 * (n - 1), "{all} requests after 5 s: every peer has its standby relays");
        for b in 1..n {
            let relays = net.nodes[0].paths(net.pidx(0, b)).into_iter().filter(|v| v.id != PathId::Direct && v.active).count();
            assert_eq!(relays, 2, "standby relays for node {b}");
        }
        eprintln!("{first} standby requests in the first second, {all} after 5 s");
        // A path that fails asks its relays without waiting for the pace: node 0 of 30 has
        // no standby request left from the start, and its path to node 5 is cut at once.
        let n = 30;
        let mut net = Net::new(n);
        net.traffic = false;
        net.nodes[0].standby_tokens = 0.0;
        net.cut_both(0, 5);
        net.run(Duration::from_secs(3));
        assert!(net.via(0, 5).is_some(), "rerouted through a relay while the standby requests wait");
        let made = asked(&net);
        assert!((made as f64) < 3.0 * STANDBY_REQUESTS_PER_S * 1.1 + 5.0 && made < 2 * (n - 1), "{made} requests in 3 s: the others were paced");
    }

    #[test]
    fn traffic_switches_a_peer_to_fast_probing_and_back_after_the_hold() {
        let mut net = Net::new(3);
        net.traffic = false;
        net.run(Duration::from_secs(5));
        let before = net.probes[0];
        net.run(Duration::from_secs(2));
        let idle = net.probes[0] - before;
        let now = net.now;
        assert!(!net.nodes[0].is_active(now, 0));
        net.nodes[0].handle_traffic(now, 0);
        assert!(net.nodes[0].is_active(now, 0));
        let before = net.probes[0];
        net.run(Duration::from_secs(2));
        let busy = net.probes[0] - before;
        // 2 s at 50 ms on the direct path alone is 40 probes.
        assert!(busy >= idle + 35, "{busy} probes in 2 s with traffic, {idle} idle");
        net.run(FailoverConfig::default().traffic_hold);
        assert!(!net.nodes[0].is_active(net.now, 0));
        let before = net.probes[0];
        net.run(Duration::from_secs(2));
        assert!(net.probes[0] - before <= idle + 2, "back to the idle rate: {} vs {idle}", net.probes[0] - before);
        assert_eq!(net.route(0, 1).path, PathId::Direct, "no path judged down by the change of rate");
    }

    #[test]
    fn an_idle_silent_cut_is_confirmed_fast_and_rerouted_within_two_seconds() {
        let mut net = Net::new(3);
        net.traffic = false;
        net.run(Duration::from_secs(5));
        let t0 = net.now;
        net.cut_both(0, 1);
        while net.route(0, 1).path == PathId::Direct {
            net.step();
            let cfg = FailoverConfig::default();
            assert!(net.now - t0 < cfg.idle_interval + cfg.down_after + Duration::from_millis(500), "no failover of an idle peer in time");
        }
        assert_eq!(net.route(0, 1).path, PathId::Relay(net.ids[2]));
        assert!(net.route(1, 0).protect);
        // A dead path of an idle peer is probed at the idle rate, not in a fast loop.
        let before = net.probes[0];
        net.run(Duration::from_secs(4));
        assert!(net.probes[0] - before <= 30, "{} probes in 4 s with one path down", net.probes[0] - before);
        net.cut.clear();
        let t1 = net.now;
        while net.route(0, 1).path != PathId::Direct {
            net.step();
            let cfg = FailoverConfig::default();
            assert!(net.now - t1 < cfg.hold_down + cfg.idle_interval + Duration::from_millis(500), "slow return");
        }
    }

    #[test]
    fn traffic_onto_an_idle_path_that_just_died_fails_over_at_the_fast_rate() {
        let mut net = Net::new(3);
        net.traffic = false;
        net.run(Duration::from_secs(5));
        // Cut right after an idle probe was answered, then traffic starts.
        net.cut_both(0, 1);
        net.run(Duration::from_millis(50));
        let t0 = net.now;
        net.nodes[0].handle_traffic(t0, 0);
        while net.route(0, 1).path == PathId::Direct {
            net.step();
            let cfg = FailoverConfig::default();
            assert!(net.now - t0 < cfg.down_after + Duration::from_millis(400), "traffic on an idle peer waited for the idle rate");
        }
        assert_eq!(net.route(0, 1).path, PathId::Relay(net.ids[2]));
    }
}
