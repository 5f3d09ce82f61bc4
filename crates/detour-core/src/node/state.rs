//! The node's path control as one sans-IO state machine: failover over direct and relay
//! paths, the relay server (admission and release of relay sessions other nodes ask for),
//! REPLEX shares, exits, link reports, the relay ranks fed from the directory, and the
//! status of all of it (spec A§1.3.1, A§2.1, A§3.3, A§3.6; seeds-digest items 8-31, 62-73).
//!
//! [`NodeState`] takes events with `now` (sessions up and down, probes, traffic, ICMP and
//! TCP-stall signals, management messages, timeouts) and the node's [`Model`] by
//! reference, and returns what the shell must do as [`NodeAction`]s
//! ([`NodeState::poll_action`]); [`NodeState::poll_timeout`] says when to wake it next.
//! It owns no socket, clock, channel or lock: the shell (`detour::shell::engine`) carries
//! out the actions, and the simulator in this module's tests runs many of them on a
//! simulated underlay. Status is computed when asked ([`NodeState::routes`]).
//!
//! It also drives the node's management overlay ([`Overlay`]: records, neighbours, message
//! routing) and its local API server ([`ApiServer`]): management messages are dispatched
//! by type, the path control's verdict on each session (not while its monitored direct path
//! is down) goes straight to the overlay, and the overlay's outputs become actions.
//!
//! Still in the shell (issue 12, next steps): the per-peer session tasks (`shell/peers.rs`,
//! which follow the want rules of [`crate::node::sessions`]), and applying learned and
//! forgotten records to the model.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::config::ReplexConfig;
use crate::dataplane::{DataCommand, PathEndpoint, SplitRoute, MAX_SPLIT};
use crate::identity::{Identity, NodeId};
use crate::node::exits::{ExitCandidate, ExitRoute, Exits};
use crate::node::model::{Model, Protect};
use crate::node::policy::{Commitment, Purpose, Refusal, RelayRank};
use crate::overlay::api_server::{ApiServer, Datagram};
use crate::overlay::directory::NodeRecord;
use crate::overlay::{Out, Overlay, OverlayConfig, OwnInfo};
use crate::path::failover::{Action, Failover, LinkInfo, PathId, PathState};
use crate::rng::Rng;
use crate::wire::mgmt::{Link, Message};

/// How often REPLEX is driven while it runs (the failover core says itself when it wants
/// to be woken: [`Failover::poll_timeout`]).
pub const REPLEX_TICK: Duration = Duration::from_millis(10);
/// How often link reports, ranks, exits and idle relay links are looked at (reports are
/// sent only when they changed, see [`LINK_REFRESH`]).
pub const UPKEEP_EVERY: Duration = Duration::from_secs(1);
/// A link report unchanged for this long is sent again.
pub const LINK_REFRESH: Duration = Duration::from_secs(10);
/// The list of nodes this node wants link reports about is repeated this often.
pub const INTEREST_REFRESH: Duration = Duration::from_secs(30);
/// A session opened only for a relay session this node serves is released this long after
/// the last relay session through it ended.
pub const RELAY_LINK_IDLE: Duration = Duration::from_secs(30);

/// What the shell must do for [`NodeState`], in order.
#[derive(Debug, Clone)]
pub enum NodeAction {
    /// A command for the data plane (probes to seal and send, endpoints, splits, relays).
    Data(DataCommand),
    /// Send a management message to a peer over its session (`to` is its node ID).
    Send {
        /// Peer index.
        peer: usize,
        /// Its node ID (the frame's destination).
        to: NodeId,
        /// The message.
        message: Message,
    },
    /// Forwarding traffic waits for a session to this peer: open one.
    NeedSession(usize),
    /// A relay session this node serves needs a session to this peer (`on`), or no longer
    /// does.
    RelayLink {
        /// Peer index.
        peer: usize,
        /// Wanted or not.
        on: bool,
    },
    /// Send a management-overlay message (gossip, routed messages) on the session with
    /// `to`; `urgent` ones (routed messages) go before gossip.
    SendOverlay {
        /// A node with a live session.
        to: NodeId,
        /// The message.
        message: Message,
        /// Routed messages first.
        urgent: bool,
    },
    /// A datagram for a local program (the local API).
    Api(Datagram),
    /// A record of another node is new or changed: apply it to the model (a new peer, new
    /// addresses), the data plane and the admitted keys.
    Learned(std::sync::Arc<NodeRecord>),
    /// A node's record expired: remove it from the model, the data plane and the admitted
    /// keys.
    Forgotten(NodeId),
    /// The management neighbours this node wants sessions with (when the set changes).
    Neighbours(BTreeSet<NodeId>),
    /// The protection or REPLEX weights of some peer changed ([`NodeState::protect`]):
    /// reconcile the kernel now.
    ProtectChanged,
    /// The exit routes changed: store them in the model and reconcile the kernel.
    Exits(Vec<ExitRoute>),
    /// ICMP errors and TCP stalls about `net` concern this peer.
    WatchProtected {
        /// The destinations.
        net: IpNet,
        /// Peer index.
        peer: usize,
    },
    /// Unreachable errors about `net` (outside the overlay) are reported for exits.
    WatchOutside(IpNet),
}

/// Why this node refused to relay, or why it cannot relay yet (spec A§3.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayRefusal {
    /// In words, for the requester's status and log.
    pub reason: String,
    /// It may pass soon (a session to the far end is being opened): ask again.
    pub transient: bool,
}

/// Link-report exchange with one peer.
#[derive(Default)]
struct ReportState {
    /// The nodes the peer picks relays for: what it wants reports about.
    interest: BTreeSet<NodeId>,
    /// What was last reported to it, and when.
    sent: Vec<Link>,
    sent_at: Option<Instant>,
    /// The list of wanted nodes last sent to it, and when.
    want_sent: Option<Vec<NodeId>>,
    want_at: Option<Instant>,
}

/// Whether two link reports say the same: states equal, RTTs within 20 % (or 1 ms), loss
/// within 5 points.
fn same_links(a: &[Link], b: &[Link]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            let rtt = match (x.rtt_ms, y.rtt_ms) {
                (Some(p), Some(q)) => (p - q).abs() <= (0.2 * p.max(q)).max(1.0),
                (None, None) => true,
                _ => false,
            };
            x.node == y.node && x.up == y.up && rtt && (x.loss - y.loss).abs() <= 0.05
        })
}

/// The route of one peer, for status output.
#[derive(Debug, Clone)]
pub struct RouteStatus {
    /// `direct`, or `via <relay name>`.
    pub path: String,
    /// Why the direct path is not used, or `healthy`.
    pub reason: String,
    /// Since when the route holds.
    pub since: Instant,
    /// Whether the peer's protected destinations go through the overlay.
    pub protected: bool,
    /// Route changes so far.
    pub changes: u64,
    /// Failures of the direct path so far (flap damping).
    pub flaps: u64,
    /// The direct path's flap penalty now.
    pub flap_penalty: f64,
    /// The hold-down that applies now (damped).
    pub hold_down: Duration,
    /// The direct path is degraded: its loss (0..1) and RTT rise over its lowest.
    pub degraded: Option<(f64, Duration)>,
    /// Relief of a degraded direct path: the relay and the share of new connections moved.
    pub relief: Option<(String, f64)>,
    /// Traffic flows to the peer: its paths are probed at the fast rate.
    pub traffic: bool,
    /// Every monitored path.
    pub paths: Vec<PathStatus>,
    /// REPLEX shares per route (empty when REPLEX is off or has not run).
    pub shares: Vec<ShareStatus>,
    /// Every node that could relay to this peer, best first: which traffic classes may
    /// use it and why not.
    pub relays: Vec<RelayChoice>,
}

/// One possible relay towards a peer, for status (spec A§3.3 problem 1, A§3.6).
#[derive(Debug, Clone)]
pub struct RelayChoice {
    /// The relay's name.
    pub name: String,
    /// Its published policy: commitment, priority, lifespan.
    pub policy: String,
    /// Failover traffic (the direct path is down): `Ok` or why not.
    pub failover: Result<(), String>,
    /// Performance traffic (REPLEX shares while the direct path works): `Ok` or why not.
    pub performance: Result<(), String>,
    /// `active`, `asked`, `refused: <its reason>` or `not asked`.
    pub state: String,
}

/// One route of a peer's REPLEX split, for status and metrics.
#[derive(Debug, Clone)]
pub struct ShareStatus {
    /// `direct` or `via <relay name>`.
    pub path: String,
    /// `live`, `warming` or `down`.
    pub status: String,
    /// Target share, 0..1.
    pub target: f64,
    /// Share of the bytes sent to the peer's destinations over the last round, 0..1.
    pub realized: f64,
    /// Cost in ms (smoothed RTT + loss penalty).
    pub cost_ms: Option<f64>,
}

/// One monitored path, for `detourctl paths`.
#[derive(Debug, Clone)]
pub struct PathStatus {
    /// `direct` or `via <relay name>`.
    pub path: String,
    /// `up`, `degraded` or `down`.
    pub state: String,
    /// Since when.
    pub since: Instant,
    /// Smoothed RTT in ms.
    pub rtt_ms: Option<f64>,
    /// Smoothed loss, 0..1.
    pub loss: f64,
    /// Whether traffic uses it.
    pub in_use: bool,
}

/// REPLEX state of one peer.
struct ReplexPeer {
    dest: crate::path::replex::Dest<PathId>,
    slots: BTreeMap<PathId, usize>,
    sent: Vec<(PathId, f64)>,
    weights: Option<(u16, u16)>,
    last_route_bytes: [u64; MAX_SPLIT],
    last_direct_bytes: u64,
    realized: BTreeMap<PathId, f64>,
}

impl ReplexPeer {
    fn new() -> ReplexPeer {
        ReplexPeer {
            dest: crate::path::replex::Dest::default(),
            slots: BTreeMap::new(),
            sent: Vec::new(),
            weights: None,
            last_route_bytes: [0; MAX_SPLIT],
            last_direct_bytes: 0,
            realized: BTreeMap::new(),
        }
    }

    /// A stable counter slot for a route.
    fn slot(&mut self, id: PathId) -> Option<usize> {
        if let Some(s) = self.slots.get(&id) {
            return Some(*s);
        }
        let live: Vec<PathId> = self.dest.routes.iter().map(|r| r.id).collect();
        self.slots.retain(|k, _| live.contains(k));
        let free = (0..MAX_SPLIT).find(|s| !self.slots.values().any(|x| x == s))?;
        self.slots.insert(id, free);
        Some(free)
    }
}

/// What [`NodeState`] knows of the session and data path of one peer.
#[derive(Debug, Clone)]
struct PeerLink {
    id: NodeId,
    monitored: bool,
    session: bool,
    data: Option<SocketAddr>,
    local_ip: Option<IpAddr>,
    path: PathId,
}

/// The node's path control (see the module docs).
pub struct NodeState {
    local: NodeId,
    core: Failover,
    peers: Vec<PeerLink>,
    by_id: BTreeMap<NodeId, usize>,
    /// Relay sessions served: pair (lower index, higher index) → peers that asked.
    serving: BTreeMap<(usize, usize), BTreeSet<usize>>,
    /// Peers this node opened a session to for a relay session, and since when.
    relay_links: BTreeMap<usize, Instant>,
    last_upkeep: Instant,
    last_replex: Instant,
    replex_cfg: ReplexConfig,
    /// REPLEX state per peer (when `[replex] enabled`).
    replex: Vec<Option<ReplexPeer>>,
    next_round: Instant,
    rng: Rng,
    /// Refusals by relays: (peer, relay) → the relay's reason.
    refused_by: BTreeMap<(usize, usize), String>,
    /// Outside destinations and their exits.
    exits: Exits,
    /// The exit routes in place.
    exit_routes: Vec<ExitRoute>,
    /// Nodes reported to the overlay as unusable (their monitored direct path is down).
    unusable: BTreeSet<usize>,
    /// Link-report exchange per peer.
    reports: Vec<ReportState>,
    /// Protection per peer (what the kernel reconcile reads).
    protect: Vec<Option<Protect>>,
    /// Relief applied to peers with a degraded direct path: the relay and the share of
    /// new connections moved to it (`Failover::relief`; only while REPLEX is off).
    relief: BTreeMap<usize, (PathId, f64)>,
    /// Bytes of each peer's split destinations the kernel sent on the direct path
    /// (cumulative, from the shell's accounting).
    direct_bytes: Vec<u64>,
    /// Relay requests this node refused by its policy, per [`Refusal`] (in `Refusal::ALL`
    /// order).
    refusals: [u64; Refusal::ALL.len()],
    /// Some peer carries traffic (set at the first sign of it, recomputed every upkeep).
    traffic: bool,
    actions: VecDeque<NodeAction>,
    /// The `now` of the last event.
    now: Instant,
    /// The wall clock (unix seconds) of the last event that gave it.
    unix: u64,
    /// The management overlay.
    overlay: Overlay,
    /// The local API server.
    api: ApiServer,
    /// Since when each management session is up (status).
    session_since: BTreeMap<NodeId, Instant>,
    /// The destinations handed to the ICMP filter, and their peer.
    watched: BTreeMap<IpNet, usize>,
}

impl NodeState {
    /// A node with the peers of `m`, whose management overlay publishes `info` signed by
    /// `identity`; `seed` drives relay choice, REPLEX jitter and the overlay's random
    /// choices; `unix` is the wall clock in seconds.
    pub fn new(m: &Model, identity: Identity, info: OwnInfo, seed: u64, now: Instant, unix: u64) -> NodeState {
        let mc = &m.cfg.management;
        let ocfg = OverlayConfig { min_neighbours: mc.min_neighbours, max_neighbours: mc.max_neighbours, target_delivery: mc.target_delivery, ..Default::default() };
        let mut s = NodeState {
            local: m.local,
            core: Failover::new(m.local, &[], m.cfg.failover.core(), seed, now),
            peers: Vec::new(),
            by_id: BTreeMap::new(),
            serving: BTreeMap::new(),
            relay_links: BTreeMap::new(),
            last_upkeep: now,
            last_replex: now,
            replex_cfg: m.cfg.replex.clone(),
            replex: Vec::new(),
            next_round: now,
            rng: Rng::new(seed),
            refused_by: BTreeMap::new(),
            exits: Exits::new(&m.cfg.exit),
            exit_routes: Vec::new(),
            unusable: BTreeSet::new(),
            reports: Vec::new(),
            protect: Vec::new(),
            relief: BTreeMap::new(),
            direct_bytes: Vec::new(),
            refusals: [0; Refusal::ALL.len()],
            traffic: false,
            actions: VecDeque::new(),
            now,
            unix,
            watched: BTreeMap::new(),
            overlay: Overlay::new(identity, ocfg, info, now, unix, seed.rotate_left(17) ^ 0x6f76_6572),
            api: ApiServer::new(mc.api_rate),
            session_since: BTreeMap::new(),
        };
        for net in &m.cfg.exit.watch {
            s.actions.push_back(NodeAction::WatchOutside(*net));
        }
        s.sync_peers(now, m);
        s
    }

    fn push(&mut self, a: NodeAction) {
        self.actions.push_back(a);
    }

    /// The next thing the shell must do.
    pub fn poll_action(&mut self) -> Option<NodeAction> {
        self.actions.pop_front()
    }

    /// When [`NodeState::handle_timeout`] must run next: the failover core's next probe or
    /// deadline, the next upkeep ([`UPKEEP_EVERY`]), and every [`REPLEX_TICK`] while REPLEX
    /// runs.
    pub fn poll_timeout(&mut self) -> Instant {
        let mut wake = self.core.poll_timeout().unwrap_or(self.last_upkeep + UPKEEP_EVERY).min(self.last_upkeep + UPKEEP_EVERY).min(self.overlay.poll_timeout());
        if self.replex_cfg.enabled {
            wake = wake.min(self.last_replex + REPLEX_TICK);
        }
        wake
    }

    /// Timers: probes and loss judgement, REPLEX, and once per [`UPKEEP_EVERY`] the relay
    /// ranks, exits, link reports, idle relay links and which sessions may carry routed
    /// messages. `unix` is the wall clock in seconds (policies with a lifespan).
    pub fn handle_timeout(&mut self, now: Instant, unix: u64, m: &Model) {
        self.now = self.now.max(now);
        self.unix = unix;
        self.sync_peers(now, m);
        self.core.handle_tick(now);
        if self.overlay.poll_timeout() <= now {
            self.overlay.tick(now, unix);
        }
        if self.replex_cfg.enabled && now >= self.last_replex + REPLEX_TICK {
            self.last_replex = now;
            self.replex_tick(now, m);
        }
        if now >= self.last_upkeep + UPKEEP_EVERY {
            self.last_upkeep = now;
            self.update_ranks(m, unix);
            self.exits.expire(now);
            self.plan_exits(m, unix);
            self.send_link_reports(now);
            self.release_relay_links(now);
            self.report_usable();
            // Without idle probing (no traffic detection) every peer counts as busy.
            let cfg = self.core.config();
            self.traffic = cfg.idle_interval <= cfg.probe_interval || (0..self.peers.len()).any(|i| self.core.is_active(now, i));
        }
        self.drain_core(m);
    }

    /// A management session with data keys is up with peer `peer`, whose data port is at
    /// `data`; `local_ip` is this node's address on it. `monitor`: probe its direct path
    /// (configured peers, and links that carry forwarding traffic); `configured`: a
    /// configured peer (a management neighbour the overlay never drops).
    #[allow(clippy::too_many_arguments)]
    pub fn handle_session_up(&mut self, now: Instant, m: &Model, peer: usize, data: SocketAddr, local_ip: Option<IpAddr>, monitor: bool, configured: bool) {
        if !self.known(now, m, peer) {
            return;
        }
        let id = self.peers[peer].id;
        self.session_since.insert(id, now);
        self.overlay.session_up(now, id, configured);
        let p = &mut self.peers[peer];
        let moved = p.data != Some(data);
        p.session = true;
        p.data = Some(data);
        p.local_ip = local_ip;
        if monitor {
            self.start_monitoring(now, m, peer);
        }
        if moved && self.peers[peer].monitored {
            // Keep the data path, and every relay session through or to this peer, on the
            // current address.
            let path = self.peers[peer].path;
            self.use_path(peer, path);
            let pairs: Vec<(usize, usize)> = self.serving.keys().copied().filter(|(a, b)| *a == peer || *b == peer).collect();
            for (a, b) in pairs {
                self.install_relay(a, b);
            }
            for q in 0..self.peers.len() {
                if self.peers[q].path == PathId::Relay(self.peers[peer].id) {
                    self.use_path(q, self.peers[q].path);
                }
            }
        } else if !self.peers[peer].monitored {
            // Not monitored: the data path simply uses the session's address.
            self.use_path(peer, PathId::Direct);
        }
        self.refresh_protect(peer);
        self.drain_core(m);
    }

    /// The session with `peer` closed.
    pub fn handle_session_down(&mut self, now: Instant, m: &Model, peer: usize) {
        if self.known(now, m, peer) {
            self.peers[peer].session = false;
            let id = self.peers[peer].id;
            self.session_since.remove(&id);
            self.overlay.session_down(id);
            self.drain_core(m);
        }
    }

    /// A session to `peer`, a node that is not a configured peer, could not be set up (no
    /// answer, or the handshake failed): the overlay replaces it as a neighbour.
    pub fn handle_unreachable(&mut self, now: Instant, m: &Model, peer: usize) {
        if self.known(now, m, peer) {
            let id = self.peers[peer].id;
            self.overlay.unreachable(now, id);
            self.drain_core(m);
        }
    }

    /// A node refused this node's handshake (it does not know this node yet): the overlay
    /// sends it this node's record.
    pub fn handle_refused(&mut self, now: Instant, m: &Model, node: NodeId) {
        self.overlay.seek(now, node);
        self.drain_core(m);
    }

    /// What this node publishes about itself changed (or is refreshed).
    pub fn set_own_info(&mut self, m: &Model, info: OwnInfo) {
        self.overlay.set_info(info);
        self.drain_core(m);
    }

    /// A datagram `data` from the local program at `from`: its reply goes out as an
    /// [`NodeAction::Api`].
    pub fn handle_api_datagram(&mut self, now: Instant, unix: u64, m: &Model, from: SocketAddr, data: &[u8]) {
        let reply = self.api.handle_datagram(now, unix, from, data, &mut self.overlay);
        self.push(NodeAction::Api(reply));
        self.drain_core(m);
    }

    /// A datagram to the local program at `to` was refused (the program is gone).
    pub fn handle_api_unreachable(&mut self, to: SocketAddr) {
        self.api.unreachable(to);
    }

    /// The link to `peer`, whose session is up, now carries forwarding traffic: monitor it.
    pub fn handle_monitor(&mut self, now: Instant, m: &Model, peer: usize) {
        if self.known(now, m, peer) {
            self.start_monitoring(now, m, peer);
            self.drain_core(m);
        }
    }

    /// A configuration reload changed the model (`m` is already reconfigured,
    /// [`Model::reconfigure`]; `plan` says what changed): the failover core takes the new
    /// `[failover]` settings (path states, measurements and flap penalties stay), REPLEX its
    /// parameters, exits their new settings (destinations found unreachable are forgotten),
    /// the data plane the new relay policy; peers no longer configured are forgotten like
    /// an idle directory node (monitoring and the relay sessions through them end);
    /// configured peers added or changed have their protected destinations watched.
    pub fn reconfigure(&mut self, now: Instant, m: &Model, plan: &crate::node::reload::Plan, moves: &crate::node::reload::Moves) {
        self.now = self.now.max(now);
        self.sync_peers(now, m);
        if plan.failover() {
            self.core.set_config(m.cfg.failover.core());
        }
        self.replex_cfg = m.cfg.replex.clone();
        if plan.settings.contains(&crate::node::reload::key::EXIT) {
            self.exits = Exits::new(&m.cfg.exit);
            for net in &m.cfg.exit.watch {
                self.push(NodeAction::WatchOutside(*net));
            }
            self.plan_exits(m, self.unix);
        }
        if plan.settings.contains(&crate::node::reload::key::POLICY) {
            self.push(NodeAction::Data(DataCommand::SetEgress(m.egress_spec())));
        }
        for &i in &moves.removed {
            if let Some(r) = self.replex.get_mut(i) {
                *r = None;
            }
            self.relief.remove(&i);
            self.handle_forget(now, m, i);
        }
        for &i in moves.added.iter().chain(&moves.changed) {
            for net in m.protected_destinations(i, &[]) {
                self.watch(net, i);
            }
        }
        self.drain_core(m);
    }

    /// The session to a directory node was closed on purpose (idle): stop monitoring it
    /// and end the relay sessions through it.
    pub fn handle_forget(&mut self, now: Instant, m: &Model, peer: usize) {
        if !self.known(now, m, peer) {
            return;
        }
        self.core.forget(now, peer);
        self.peers[peer].monitored = false;
        self.peers[peer].session = false;
        let pairs: Vec<(usize, usize)> = self.serving.keys().copied().filter(|(a, b)| *a == peer || *b == peer).collect();
        for (a, b) in pairs {
            self.serving.remove(&(a, b));
            let (a, b) = (self.peers[a].id, self.peers[b].id);
            self.push(NodeAction::Data(DataCommand::ClearRelay { a, b }));
        }
        self.refresh_protect(peer);
        self.drain_core(m);
    }

    /// A probe from `peer` arrived at `at` from `from` (it waited in queues until `now`).
    /// The echo, if one is due, goes out as a data-plane probe.
    pub fn handle_probe(&mut self, now: Instant, m: &Model, at: Instant, peer: usize, from: SocketAddr, payload: &[u8]) {
        if !self.known(now, m, peer) {
            return;
        }
        // A probe that waited long in the queue: this node is late, not the path.
        self.core.handle_late(now, now.saturating_duration_since(at));
        match self.core.handle_probe(at, peer, payload) {
            Ok(Some(echo)) => self.push(NodeAction::Data(DataCommand::SendControl { peer, to: canonical(from), payload: echo })),
            Ok(None) => {}
            Err(e) => tracing::debug!("probe from peer {peer}: {e}"),
        }
        self.drain_core(m);
    }

    /// Forwarding traffic to or from `peer` was seen (through the overlay or on the direct
    /// path): its paths are probed at the fast rate.
    pub fn handle_traffic(&mut self, now: Instant, m: &Model, peer: usize) {
        if self.known(now, m, peer) {
            self.core.handle_traffic(now, peer);
            self.traffic = true;
            self.drain_core(m);
        }
    }

    /// Forwarding traffic to `peer` waits for a session.
    pub fn handle_need_session(&mut self, peer: usize) {
        self.push(NodeAction::NeedSession(peer));
    }

    /// An ICMP net or host unreachable (received at `at`) about `peer`'s destinations.
    pub fn handle_icmp(&mut self, at: Instant, m: &Model, peer: usize) {
        if self.known(at, m, peer) {
            tracing::info!("ICMP unreachable about {}'s destinations: rerouting", name(m, peer));
            self.core.handle_icmp(at, peer);
            self.drain_core(m);
        }
    }

    /// TCP connections to `peer`'s destinations stall (retransmission timeouts).
    pub fn handle_tcp_stall(&mut self, now: Instant, m: &Model, peer: usize) {
        if self.known(now, m, peer) {
            tracing::info!("TCP to {}'s destinations stalls: checking the path", name(m, peer));
            self.core.handle_tcp_stall(now, peer);
            self.drain_core(m);
        }
    }

    /// `dst`, outside the overlay, is unreachable directly: new connections to it may go
    /// through an exit.
    pub fn handle_outside_unreachable(&mut self, now: Instant, unix: u64, m: &Model, dst: IpAddr) {
        self.unix = unix;
        if self.exits.handle_unreachable(now, dst) {
            tracing::info!("{dst} (outside the overlay) is unreachable: new connections to it go through an exit");
            self.plan_exits(m, unix);
        }
    }

    /// The kernel's direct-path byte counts per peer (cumulative, from the accounting
    /// rules of the REPLEX splits).
    pub fn set_direct_bytes(&mut self, bytes: Vec<u64>) {
        self.direct_bytes = bytes;
    }

    /// A management message from peer `from` (at `unix` seconds on the wall clock):
    /// directory gossip and routed messages go to the overlay, relay signalling and link
    /// reports to the path control.
    pub fn handle_message(&mut self, now: Instant, unix: u64, m: &Model, from: usize, message: Message) {
        if !self.known(now, m, from) {
            return;
        }
        match message {
            // Its acknowledgement was the answer.
            Message::Ping => {}
            m2 @ (Message::Records { .. } | Message::Digest { .. } | Message::Summary { .. } | Message::Want { .. } | Message::IHave { .. } | Message::Prune | Message::Routed { .. }) => {
                let id = self.peers[from].id;
                self.overlay.handle(now, unix, id, m2);
            }
            Message::RelayRequest { a, b, purpose } => {
                let answer = self.serve_relay(now, m, from, a, b, purpose);
                match &answer {
                    Err(RelayRefusal { reason, transient: false }) => tracing::info!("refused to relay between {} and {b}: {reason}", name(m, from)),
                    Err(RelayRefusal { reason, transient: true }) => tracing::debug!("not relaying between {} and {b} yet: {reason}", name(m, from)),
                    Ok(()) => {}
                }
                let transient = answer.as_ref().err().is_some_and(|r| r.transient);
                let reply = Message::RelayResponse { b, accepted: answer.is_ok(), reason: answer.err().map(|r| r.reason), transient };
                self.send(from, reply);
            }
            Message::RelayResponse { b, accepted, reason, transient } => {
                let Some(&peer) = self.by_id.get(&b) else { return };
                if accepted {
                    self.refused_by.remove(&(peer, from));
                } else {
                    let reason = reason.unwrap_or_default();
                    tracing::debug!("{} will not relay to {}: {reason}", name(m, from), name(m, peer));
                    self.refused_by.insert((peer, from), reason);
                }
                self.core.handle_relay_answer(now, from, peer, accepted, transient);
            }
            Message::RelayRelease { a, b } => {
                if a != self.peers[from].id {
                    return;
                }
                if let Some(&bi) = self.by_id.get(&b) {
                    let key = (from.min(bi), from.max(bi));
                    if let Some(askers) = self.serving.get_mut(&key) {
                        askers.remove(&from);
                        if askers.is_empty() {
                            self.serving.remove(&key);
                            let (a, b) = (self.peers[key.0].id, self.peers[key.1].id);
                            self.push(NodeAction::Data(DataCommand::ClearRelay { a, b }));
                        }
                    }
                }
            }
            Message::LinkReport { links, want } => {
                if let Some(want) = want {
                    self.reports[from].interest = want.into_iter().collect();
                }
                let infos: Vec<LinkInfo> = links.iter().map(|l| LinkInfo { node: l.node, up: l.up, rtt_ms: l.rtt_ms, loss: l.loss }).collect();
                self.core.handle_link_report(now, from, &infos);
            }
            _ => {}
        }
        self.drain_core(m);
    }

    /// Releases every relay session this node uses (at shutdown).
    pub fn release_all(&mut self) {
        for peer in 0..self.peers.len() {
            for relay in self.core.active_relays(peer) {
                let b = self.peers[peer].id;
                self.send(relay, Message::RelayRelease { a: self.local, b });
            }
        }
    }

    /// Protection per peer index (for the kernel reconcile and the REPLEX accounting).
    pub fn protect(&self) -> &[Option<Protect>] {
        &self.protect
    }

    /// Relay requests this node refused by its policy, per reason.
    pub fn refusals(&self) -> Vec<(Refusal, u64)> {
        Refusal::ALL.iter().copied().zip(self.refusals.iter().copied()).collect()
    }

    /// Whether some peer carries traffic (the TCP monitor polls fast only then).
    pub fn traffic(&self) -> bool {
        self.traffic
    }

    /// Times the node found itself late (probe loss not judged meanwhile).
    pub fn late_count(&self) -> u64 {
        self.core.late_count()
    }

    /// The failover core (read-only: paths, routes, relays).
    pub fn failover(&self) -> &Failover {
        &self.core
    }

    /// The relay sessions this node serves, as (a, b) node names.
    pub fn relaying(&self, m: &Model) -> Vec<(String, String)> {
        self.serving.keys().map(|(a, b)| (name(m, *a), name(m, *b))).collect()
    }

    /// Outside destinations on an exit, in words.
    pub fn exit_status(&self, now: Instant, m: &Model) -> Vec<String> {
        let failed = self.exits.failed(now);
        self.exit_routes
            .iter()
            .map(|r| {
                let hold = failed.iter().find(|(a, _)| IpNet::from(*a) == r.dst).map(|(_, d)| format!(", unreachable directly, retried in {} s", d.as_secs())).unwrap_or_default();
                let class = if r.masquerade { "new connections only (masquerades)" } else { "all traffic (keeps the source)" };
                format!("{} via {}: {class}{hold}", r.dst, name(m, r.via))
            })
            .collect()
    }

    /// The route of every peer, computed now (status and metrics; never on a timer).
    pub fn routes(&self, now: Instant, unix: u64, m: &Model) -> Vec<Option<RouteStatus>> {
        (0..self.peers.len())
            .map(|i| {
                let r = self.core.route(i)?;
                let paths = self
                    .core
                    .paths(i)
                    .into_iter()
                    .filter(|v| v.id == PathId::Direct || v.state != PathState::Down || v.in_use || self.core.active_relays(i).iter().any(|&ri| v.id == PathId::Relay(self.peers[ri].id)))
                    .map(|v| PathStatus {
                        path: self.path_name(m, v.id),
                        state: v.state.as_str().into(),
                        since: v.since,
                        rtt_ms: v.srtt.map(|d| d.as_secs_f64() * 1000.0),
                        loss: v.loss,
                        in_use: v.in_use,
                    })
                    .collect();
                let shares = self
                    .replex
                    .get(i)
                    .and_then(|x| x.as_ref())
                    .map(|st| {
                        st.dest
                            .routes
                            .iter()
                            .map(|rt| ShareStatus {
                                path: self.path_name(m, rt.id),
                                status: match rt.status {
                                    crate::path::replex::Status::Live => "live".into(),
                                    crate::path::replex::Status::Warming => "warming".into(),
                                    crate::path::replex::Status::Down => "down".into(),
                                },
                                target: rt.share,
                                realized: st.realized.get(&rt.id).copied().unwrap_or(0.0),
                                cost_ms: (rt.cost < f64::MAX / 2.0).then_some(rt.cost),
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let (flaps, flap_penalty, hold_down) = self.core.damping(i, now);
                Some(RouteStatus {
                    path: self.path_name(m, r.path),
                    reason: r.reason.as_str().into(),
                    since: r.since,
                    protected: r.protect,
                    changes: self.core.route_changes(i),
                    flaps,
                    flap_penalty,
                    hold_down,
                    degraded: self.core.paths(i).into_iter().find(|v| v.id == PathId::Direct && v.state == PathState::Degraded).map(|v| (v.loss, v.rtt_rise)),
                    relief: self.relief.get(&i).map(|(via, share)| (self.path_name(m, *via), *share)),
                    traffic: self.core.is_active(now, i),
                    paths,
                    shares,
                    relays: if self.peers[i].monitored { self.relay_choices(m, unix, i) } else { Vec::new() },
                })
            })
            .collect()
    }

    /// Takes in the peers the model gained (directory nodes); false when `peer` is still
    /// unknown.
    fn known(&mut self, now: Instant, m: &Model, peer: usize) -> bool {
        self.now = self.now.max(now);
        if peer >= self.peers.len() {
            self.sync_peers(now, m);
        }
        peer < self.peers.len()
    }

    /// Takes in the peers the model gained (directory nodes) since the last call.
    fn sync_peers(&mut self, now: Instant, m: &Model) {
        if self.peers.len() >= m.peers.len() {
            return;
        }
        while self.peers.len() < m.peers.len() {
            let i = self.peers.len();
            let p = &m.peers[i];
            let id = p.cfg.node_id;
            self.core.add_peer(id, now);
            self.peers.push(PeerLink { id, monitored: false, session: false, data: None, local_ip: None, path: PathId::Direct });
            self.by_id.insert(id, i);
            if p.configured {
                for net in m.protected_destinations(i, &[]) {
                    self.watch(net, i);
                }
            }
        }
        let n = self.peers.len();
        self.protect.resize(n, None);
        self.direct_bytes.resize(n, 0);
        self.replex.resize_with(n, || None);
        self.reports.resize_with(n, ReportState::default);
        self.update_ranks(m, self.unix);
    }

    /// Hands `net` to the ICMP filter as `peer`'s, unless it already is.
    fn watch(&mut self, net: IpNet, peer: usize) {
        if self.watched.insert(net, peer) != Some(peer) {
            self.actions.push_back(NodeAction::WatchProtected { net, peer });
        }
    }

    /// Tells the management overlay which sessions must not carry routed messages: those
    /// whose monitored direct path is down (the session itself only times out after
    /// several seconds).
    fn report_usable(&mut self) {
        for i in 0..self.peers.len() {
            let down = self.peers[i].monitored && self.core.paths(i).iter().any(|v| v.id == PathId::Direct && v.state == PathState::Down);
            // Unusable ones are repeated (a session that came up again meanwhile starts
            // usable in the overlay); a return to usable is sent once.
            let changed = if down {
                self.unusable.insert(i);
                true
            } else {
                self.unusable.remove(&i)
            };
            if changed {
                let node = self.peers[i].id;
                self.overlay.set_usable(self.now, node, !down);
            }
        }
    }

    fn path_name(&self, m: &Model, path: PathId) -> String {
        match path {
            PathId::Direct => "direct".into(),
            PathId::Relay(id) => match self.by_id.get(&id) {
                Some(&r) => format!("via {}", name(m, r)),
                None => format!("via {}", id.short()),
            },
        }
    }

    /// Where packets on `path` to a peer are sent.
    fn address_of(&self, peer: usize, path: PathId) -> Option<SocketAddr> {
        match path {
            PathId::Direct => self.peers[peer].data,
            PathId::Relay(id) => self.by_id.get(&id).and_then(|&r| self.peers[r].data),
        }
    }

    fn jitter(&mut self) -> f64 {
        0.9 + 0.2 * self.rng.unit()
    }

    /// REPLEX (`replex-spec.md` §3): every tick the routes' liveness (a route that went
    /// down hands its share over at once), every period a round of share updates; the
    /// shares go to the data path (userspace split) and to the kernel (the weights of the
    /// protected destinations' resilient nexthop group).
    fn replex_tick(&mut self, now: Instant, m: &Model) {
        let cfg = self.replex_cfg.clone();
        let round = now >= self.next_round;
        if round {
            let j = self.jitter();
            self.next_round = now + cfg.period.mul_f64(j);
        }
        for peer in 0..self.peers.len() {
            if !self.peers[peer].monitored || self.peers[peer].data.is_none() {
                if self.replex[peer].take().is_some() {
                    self.push(NodeAction::Data(DataCommand::SetSplit { peer, routes: Vec::new(), flow_idle_ms: 0 }));
                    self.refresh_protect(peer);
                }
                continue;
            }
            self.replex_peer(m, peer, &cfg, round);
        }
    }
    fn replex_peer(&mut self, m: &Model, peer: usize, cfg: &ReplexConfig, round: bool) {
        let p = cfg.params;
        let Some(route) = self.core.route(peer) else { return };
        let views = self.core.paths(peer);
        let measures: Vec<(PathId, crate::path::replex::Measure)> = views
            .iter()
            // REPLEX spreads load only over relays that accept traffic for performance.
            .filter(|v| v.active && (v.id == PathId::Direct || self.relay_commitment(v.id) == Commitment::Always))
            .map(|v| {
                // While failover has moved the peer off the direct path, it is down here too.
                let up = v.usable && !(v.id == PathId::Direct && route.protect);
                let cost = v.srtt.map(|d| p.cost(d.as_secs_f64() * 1000.0, v.loss));
                (v.id, crate::path::replex::Measure { cost, up, samples: v.samples })
            })
            .collect();
        let state = self.replex[peer].get_or_insert_with(ReplexPeer::new);
        let before: Vec<(PathId, f64)> = state.dest.routes.iter().filter(|r| r.status == crate::path::replex::Status::Live).map(|r| (r.id, r.share)).collect();
        state.dest.update(&measures, p.min_samples, Some(PathId::Direct));
        if round {
            match cfg.mode {
                crate::config::ReplexMode::Adaptive => {
                    state.dest.round(&p);
                }
                crate::config::ReplexMode::Equal => state.dest.equalize(),
            }
        }
        let live: Vec<(PathId, f64)> = state.dest.routes.iter().filter(|r| r.status == crate::path::replex::Status::Live).map(|r| (r.id, r.share)).collect();
        let liveness_changed = before.iter().map(|x| x.0).ne(live.iter().map(|x| x.0));
        if round {
            self.measure_realized(m, peer);
        }
        if !round && !liveness_changed {
            return;
        }
        // The data path's split: every live route (a route at share 0 keeps the flows
        // pinned to it); none while all traffic is on the direct path.
        let direct_share = live.iter().find(|(id, _)| *id == PathId::Direct).map(|(_, s)| *s).unwrap_or(0.0);
        let pure_direct = live.len() == 1 && direct_share > 0.999_999;
        let mut routes = Vec::new();
        if !pure_direct {
            for (id, share) in &live {
                let Some(endpoint) = self.address_of(peer, *id) else { continue };
                let Some(slot) = self.replex[peer].as_mut().and_then(|st| st.slot(*id)) else { continue };
                routes.push(SplitRoute { endpoint: PathEndpoint { remote: endpoint, local_ip: None }, share: *share, relay: *id != PathId::Direct, slot });
            }
        }
        let state = self.replex[peer].as_mut().expect("inserted above");
        let sent: Vec<(PathId, f64)> = live.clone();
        if sent != state.sent {
            state.sent = sent;
            self.actions.push_back(NodeAction::Data(DataCommand::SetSplit { peer, routes, flow_idle_ms: cfg.flow_idle.as_millis() as u64 }));
        }
        let busy: Vec<PathId> = live.iter().filter(|(_, s)| *s > 0.0).map(|(id, _)| *id).collect();
        self.core.set_busy(peer, busy);
        // The kernel's split of the protected destinations: while the direct path carries
        // part of the traffic, a resilient group weighted by the shares.
        // The group stays while the direct route is live, even at a share near 0 (weight
        // 1 at least): removing it would move the flows the kernel keeps on the direct
        // path.
        let overlay = 1.0 - direct_share;
        let direct_live = live.iter().any(|(id, _)| *id == PathId::Direct);
        let weights = if direct_live && overlay >= 0.5 / f64::from(cfg.kernel_buckets) {
            let wo = ((overlay * 256.0).round() as u16).clamp(1, 255);
            Some((256 - wo, wo))
        } else {
            None
        };
        if state.weights != weights {
            state.weights = weights;
            self.refresh_protect(peer);
        }
    }

    /// The realized shares of the last round: bytes per route (userspace counters, plus
    /// the kernel's direct bytes of the split destinations).
    fn measure_realized(&mut self, m: &Model, peer: usize) {
        let Some(c) = m.peers.get(peer).map(|p| &p.counters) else { return };
        let direct_kernel = self.direct_bytes.get(peer).copied().unwrap_or(0);
        let Some(st) = self.replex[peer].as_mut() else { return };
        let mut bytes: BTreeMap<PathId, f64> = BTreeMap::new();
        for (id, slot) in &st.slots {
            let now = c.route_bytes[*slot].load(std::sync::atomic::Ordering::Relaxed);
            let d = now.saturating_sub(st.last_route_bytes[*slot]);
            st.last_route_bytes[*slot] = now;
            *bytes.entry(*id).or_default() += d as f64;
        }
        // The kernel's counters restart when the accounting rule of a destination is
        // re-added.
        let dk = if direct_kernel >= st.last_direct_bytes { direct_kernel - st.last_direct_bytes } else { direct_kernel };
        st.last_direct_bytes = direct_kernel;
        *bytes.entry(PathId::Direct).or_default() += dk as f64;
        let total: f64 = bytes.values().sum();
        st.realized = if total > 0.0 { bytes.into_iter().map(|(k, v)| (k, v / total)).collect() } else { BTreeMap::new() };
    }

    /// Sessions opened for relaying that no relay session uses any more (after
    /// [`RELAY_LINK_IDLE`]) are no longer wanted.
    fn release_relay_links(&mut self, now: Instant) {
        let serving: BTreeSet<usize> = self.serving.keys().flat_map(|(a, b)| [*a, *b]).collect();
        let idle: Vec<usize> = self.relay_links.iter().filter(|(p, t)| !serving.contains(p) && now.saturating_duration_since(**t) > RELAY_LINK_IDLE).map(|(p, _)| *p).collect();
        for p in serving {
            if let Some(t) = self.relay_links.get_mut(&p) {
                *t = now;
            }
        }
        for p in idle {
            self.relay_links.remove(&p);
            self.push(NodeAction::RelayLink { peer: p, on: false });
        }
    }

    /// Starts probing the direct path to a peer whose data address is known.
    fn start_monitoring(&mut self, now: Instant, m: &Model, peer: usize) {
        let Some(data) = self.peers[peer].data else { return };
        if self.peers[peer].monitored {
            return;
        }
        self.peers[peer].monitored = true;
        self.core.handle_direct_known(now, peer);
        let mut underlay = m.endpoint_ips(peer);
        if !underlay.contains(&data.ip()) {
            underlay.push(data.ip());
        }
        self.push(NodeAction::Data(DataCommand::SetPeerUnderlay { peer, addrs: underlay }));
        self.watch(IpNet::from(data.ip()), peer);
        let path = self.peers[peer].path;
        self.use_path(peer, path);
    }

    /// The relay server: decides a relay request from peer `from`. Relaying must be
    /// allowed by this node's policy for `purpose`, the requester must be the end `a` it
    /// names, and both ends need a known data address; a missing one opens a session and
    /// the refusal is transient.
    fn serve_relay(&mut self, now: Instant, m: &Model, from: usize, a: NodeId, b: NodeId, purpose: Purpose) -> Result<(), RelayRefusal> {
        if let Err((refusal, why)) = relay_policy_admits(&m.cfg.node.policy, purpose) {
            self.refusals[refusal as usize] += 1;
            return Err(why);
        }
        if a != self.peers[from].id {
            return Err(RelayRefusal { reason: "a node may only ask for its own relay sessions".into(), transient: false });
        }
        let Some(&bi) = self.by_id.get(&b) else { return Err(RelayRefusal { reason: "unknown destination".into(), transient: true }) };
        if bi == from {
            return Err(RelayRefusal { reason: "a node cannot relay to itself".into(), transient: false });
        }
        if self.peers[from].data.is_none() || self.peers[bi].data.is_none() {
            // A node of the directory without a session yet: open one for the relay, and
            // let the requester ask again.
            if self.peers[bi].data.is_none() {
                self.relay_links.insert(bi, now);
                self.push(NodeAction::RelayLink { peer: bi, on: true });
            }
            return Err(RelayRefusal { reason: format!("no data path to {}", name(m, bi)), transient: true });
        }
        let key = (from.min(bi), from.max(bi));
        let new = !self.serving.contains_key(&key);
        self.serving.entry(key).or_default().insert(from);
        if new {
            tracing::info!("relaying between {} and {}", name(m, key.0), name(m, key.1));
        }
        self.install_relay(key.0, key.1);
        Ok(())
    }

    fn install_relay(&mut self, a: usize, b: usize) {
        if let (Some(a_addr), Some(b_addr)) = (self.peers[a].data, self.peers[b].data) {
            let (a, b) = (self.peers[a].id, self.peers[b].id);
            self.push(NodeAction::Data(DataCommand::SetRelay { a, a_addr, b, b_addr }));
        }
    }

    /// Sends `message` to `to` if a session to it is up (dropped otherwise, as a closed
    /// QUIC connection would).
    fn send(&mut self, to: usize, message: Message) {
        if self.peers[to].session {
            let id = self.peers[to].id;
            self.push(NodeAction::Send { peer: to, to: id, message });
        }
    }

    /// Link state for relay choice, exchanged with monitored peers only: each side says
    /// which nodes it picks relays for (`want`, when that changes and every
    /// [`INTEREST_REFRESH`]) and gets the other's links to those, when they change
    /// noticeably and every [`LINK_REFRESH`]. An idle overlay exchanges almost nothing, and
    /// nothing here grows with the number of nodes in the directory.
    fn send_link_reports(&mut self, now: Instant) {
        let all = self.core.link_report();
        let monitored: Vec<NodeId> = self.peers.iter().filter(|p| p.monitored).map(|p| p.id).collect();
        for i in 0..self.peers.len() {
            if !self.peers[i].monitored || !self.peers[i].session {
                continue;
            }
            let id = self.peers[i].id;
            let st = &mut self.reports[i];
            let links: Vec<Link> = all
                .iter()
                .filter(|l| st.interest.contains(&l.node))
                .map(|l| Link { node: l.node, up: l.up, rtt_ms: l.rtt_ms.map(|r| (r * 10.0).round() / 10.0), loss: (l.loss * 100.0).round() / 100.0 })
                .collect();
            let want: Vec<NodeId> = monitored.iter().copied().filter(|n| *n != id).collect();
            let want_due = st.want_sent.as_ref() != Some(&want) || st.want_at.is_none_or(|t| now >= t + INTEREST_REFRESH);
            let links_due = !same_links(&st.sent, &links) || st.sent_at.is_none_or(|t| now >= t + LINK_REFRESH);
            if !want_due && !links_due {
                continue;
            }
            if want_due {
                st.want_at = Some(now);
                st.want_sent = Some(want.clone());
            }
            st.sent_at = Some(now);
            st.sent = links.clone();
            self.send(i, Message::LinkReport { links, want: want_due.then_some(want) });
        }
    }

    fn use_path(&mut self, peer: usize, path: PathId) {
        self.peers[peer].path = path;
        let endpoint = self.address_of(peer, path).map(|remote| PathEndpoint { remote, local_ip: None });
        if endpoint.is_some() {
            self.push(NodeAction::Data(DataCommand::SetEndpoint { peer, endpoint }));
        }
    }

    fn refresh_protect(&mut self, peer: usize) {
        let on = self.core.route(peer).is_some_and(|r| r.protect);
        let split = self.replex.get(peer).and_then(|r| r.as_ref()).and_then(|r| r.weights).or_else(|| {
            self.relief.get(&peer).map(|(_, share)| {
                let wo = ((share * 256.0).round() as u16).clamp(1, 255);
                (256 - wo, wo)
            })
        });
        let p = &self.peers[peer];
        let value =
            (on || split.is_some()).then(|| Protect { underlay: p.data.map(|d| vec![d.ip()]).unwrap_or_default(), src: p.local_ip.into_iter().collect(), split: if on { None } else { split } });
        if self.protect[peer] != value {
            self.protect[peer] = value;
            self.push(NodeAction::ProtectChanged);
        }
    }

    /// Turns what the overlay decided into actions.
    fn drain_overlay(&mut self) {
        while let Some(o) = self.overlay.poll() {
            match o {
                Out::Send { to, message, urgent } => self.push(NodeAction::SendOverlay { to, message, urgent }),
                Out::Deliver { src, channel, payload } => {
                    for d in self.api.deliver(self.now, src, channel, payload) {
                        self.push(NodeAction::Api(d));
                    }
                }
                Out::Delivered { id } => {
                    if let Some(d) = self.api.report(id, true) {
                        self.push(NodeAction::Api(d));
                    }
                }
                Out::Failed { id } => {
                    if let Some(d) = self.api.report(id, false) {
                        self.push(NodeAction::Api(d));
                    }
                }
                Out::Learned(rec) => self.push(NodeAction::Learned(rec)),
                Out::Forgotten(id) => self.push(NodeAction::Forgotten(id)),
                Out::Neighbours(set) => self.push(NodeAction::Neighbours(set)),
                Out::NameLost { name, holder } => tracing::warn!("name {name} is held by node {holder}, which registered it earlier; this node no longer publishes it"),
            }
        }
    }

    /// Checks directory records' signatures with `v` (a simulator shares one
    /// [`crate::overlay::directory::CachedVerifier`] between all its nodes).
    pub fn set_verifier(&mut self, v: std::sync::Arc<dyn crate::overlay::directory::RecordVerifier>) {
        self.overlay.set_verifier(v);
    }

    /// The management overlay (status: directory, neighbours, routing counters).
    pub fn overlay(&self) -> &Overlay {
        &self.overlay
    }

    /// The local API's status (`port`: the shell's).
    pub fn api_status(&self, port: Option<u16>) -> crate::ctl::ApiStatus {
        self.api.status(port)
    }

    /// Since when the management session with `node` is up.
    pub fn session_since(&self, node: &NodeId) -> Option<Instant> {
        self.session_since.get(node).copied()
    }

    /// Carries out what the failover core and the overlay decided.
    fn drain_core(&mut self, m: &Model) {
        self.drain_overlay();
        let mut routes_moved = false;
        while let Some(a) = self.core.poll_action() {
            routes_moved |= matches!(a, Action::UsePath { .. } | Action::Protect { .. });
            match a {
                Action::Send { peer, path, payload } => {
                    if let Some(to) = self.address_of(peer, path) {
                        self.push(NodeAction::Data(DataCommand::SendControl { peer, to, payload }));
                    }
                }
                Action::UsePath { peer, path } => {
                    if let Some(r) = self.core.route(peer) {
                        tracing::info!("{}: traffic now {} ({})", name(m, peer), self.path_name(m, path), r.reason.as_str());
                    }
                    self.use_path(peer, path);
                }
                Action::Protect { peer, on } => {
                    if let Some(r) = self.core.route(peer) {
                        if on {
                            tracing::info!("{}: protected destinations rerouted into the overlay ({})", name(m, peer), r.reason.as_str());
                        } else {
                            tracing::info!("{}: direct path healthy again; protected destinations back on the direct route", name(m, peer));
                        }
                    }
                    self.refresh_protect(peer);
                }
                Action::RequestRelay { relay, peer, purpose } => {
                    if self.peers[relay].session {
                        let b = self.peers[peer].id;
                        self.send(relay, Message::RelayRequest { a: self.local, b, purpose });
                    } else {
                        self.core.handle_relay_response(self.now, relay, peer, false);
                    }
                }
                Action::ReleaseRelay { relay, peer } => {
                    let b = self.peers[peer].id;
                    self.send(relay, Message::RelayRelease { a: self.local, b });
                }
            }
        }
        if routes_moved {
            // A direct path found down: management messages avoid its session from now
            // on, not from the next upkeep (the fast rule finds a cut in about 100 ms).
            self.report_usable();
            self.drain_overlay();
        }
        if !m.cfg.replex.enabled {
            self.refresh_relief(m);
        }
        self.drain_overlay();
    }

    /// Applies [`Failover::relief`] to peers whose direct path is degraded (and ends it
    /// where it no longer applies): the protected destinations are split by a resilient
    /// nexthop group between the direct next hop and the peer's TUN, weighted by the share
    /// (established connections keep their bucket), and the peer's overlay traffic goes
    /// through the relay.
    fn refresh_relief(&mut self, m: &Model) {
        let candidates: BTreeSet<usize> = self.core.degraded_peers().chain(self.relief.keys().copied()).collect();
        for peer in candidates {
            let want = self.core.relief(peer);
            if self.relief.get(&peer).copied() == want {
                continue;
            }
            match want {
                Some((relay, share)) => {
                    let d = self.core.paths(peer).into_iter().find(|v| v.id == PathId::Direct);
                    let (loss, rise) = d.map(|v| (v.loss, v.rtt_rise)).unwrap_or_default();
                    tracing::info!(
                        "{}: direct path degraded (loss {:.0} %, rtt +{} ms): {:.0} % of new connections {}",
                        name(m, peer),
                        loss * 100.0,
                        rise.as_millis(),
                        share * 100.0,
                        self.path_name(m, relay)
                    );
                    self.relief.insert(peer, (relay, share));
                    self.use_path(peer, relay);
                }
                None => {
                    self.relief.remove(&peer);
                    if let Some(r) = self.core.route(peer) {
                        if !r.protect {
                            tracing::info!("{}: direct path no longer degraded; all traffic direct again", name(m, peer));
                        }
                        self.use_path(peer, r.path);
                    }
                }
            }
            self.refresh_protect(peer);
        }
    }

    /// The relief applied to peer `i`: the relay and the share of new connections moved.
    pub fn relief(&self, i: usize) -> Option<(PathId, f64)> {
        self.relief.get(&i).copied()
    }

    /// Chooses the exit of every outside destination that needs one and hands changes to
    /// the kernel (routes) and the data path (which replies to accept from which exit).
    fn plan_exits(&mut self, m: &Model, unix: u64) {
        if !self.exits.enabled() {
            return;
        }
        let cands: Vec<ExitCandidate> = m
            .peers
            .iter()
            .enumerate()
            .take(self.peers.len())
            .filter(|(_, d)| d.present)
            .map(|(i, d)| {
                let direct = self.core.paths(i).into_iter().find(|v| v.id == PathId::Direct);
                ExitCandidate {
                    peer: i,
                    policy: &d.policy,
                    own: d.cfg.prefixes.iter().chain(d.networks.iter()).copied().collect(),
                    usable: self.peers[i].data.is_some() && direct.as_ref().is_some_and(|v| v.usable),
                    cost_ms: direct.and_then(|v| v.srtt).map(|d| d.as_secs_f64() * 1000.0).unwrap_or(1000.0),
                }
            })
            .collect();
        // The sources judged: this node's underlay address (as its sessions see it), else
        // its overlay address.
        let overlay = |v6: bool| if v6 { m.cfg.node.overlay_v6.map(|n| IpAddr::V6(n.addr())) } else { m.cfg.node.overlay_v4.map(|n| IpAddr::V4(n.addr())) };
        let src = |v6: bool| self.peers.iter().filter_map(|p| p.local_ip).find(|a| a.is_ipv6() == v6).or(overlay(v6));
        let mut plan = self.exits.plan(&cands, src(false), src(true), unix);
        // New connections through an exit that masquerades use the overlay address (its
        // replies reach this node through the exit's own overlay routes); through one that
        // keeps the source, the underlay address the outside host can answer.
        for r in plan.iter_mut() {
            let v6 = r.dst.addr().is_ipv6();
            let underlay = self.peers[r.via].local_ip.filter(|a| a.is_ipv6() == v6);
            r.src = if r.masquerade { overlay(v6).or(underlay) } else { underlay };
        }
        if plan == self.exit_routes {
            return;
        }
        let mut touched: BTreeSet<usize> = self.exit_routes.iter().map(|r| r.via).collect();
        touched.extend(plan.iter().map(|r| r.via));
        for peer in touched {
            let nets: Vec<IpNet> = plan.iter().filter(|r| r.via == peer).map(|r| r.dst).collect();
            self.push(NodeAction::Data(DataCommand::SetExitSources { peer, nets }));
        }
        for r in &plan {
            if !self.exit_routes.iter().any(|o| o.dst == r.dst && o.via == r.via) {
                tracing::info!("{} goes through exit {}{}", r.dst, name(m, r.via), if r.masquerade { " (masquerading: new connections only)" } else { "" });
            }
            if !m.peers.get(r.via).is_some_and(|d| d.tun) {
                self.push(NodeAction::NeedSession(r.via));
            }
        }
        self.exit_routes = plan.clone();
        self.push(NodeAction::Exits(plan));
    }

    fn relay_commitment(&self, path: PathId) -> Commitment {
        match path {
            PathId::Relay(id) => self.by_id.get(&id).map(|&r| self.core.rank(r).commitment).unwrap_or(Commitment::Always),
            PathId::Direct => Commitment::Always,
        }
    }

    /// Hands the peers' published policies to the core as relay ranks, and their networks
    /// (learned from their records) to the ICMP filter and TCP monitor.
    fn update_ranks(&mut self, m: &Model, unix: u64) {
        for (i, p) in m.peers.iter().enumerate().take(self.peers.len()) {
            for net in p.networks.iter().filter(|_| p.present) {
                self.watch(*net, i);
            }
            // A node whose record has not arrived yet is not asked: its policy is unknown.
            let rank = if p.known { RelayRank::of(&p.policy, unix) } else { RelayRank { commitment: Commitment::Never, ..Default::default() } };
            self.core.set_rank(i, rank);
        }
    }

    /// Every node that could relay towards `peer`, in the core's policy order, with what
    /// each traffic class may do with it.
    fn relay_choices(&self, m: &Model, unix: u64, peer: usize) -> Vec<RelayChoice> {
        let active = self.core.active_relays(peer);
        let mut v: Vec<(RelayRank, RelayChoice)> = Vec::new();
        for (r, def) in m.peers.iter().enumerate().take(self.peers.len()) {
            if r == peer || !def.present {
                continue;
            }
            let pol = &def.policy;
            let why = |purpose: Purpose| -> Result<(), String> {
                match pol.relay_check(purpose) {
                    Ok(()) => Ok(()),
                    Err(e) if pol.commitment == Commitment::LastResort && purpose == Purpose::Failover => Err(format!("{} (only when no other relay works)", e.as_str())),
                    Err(e) => Err(e.as_str().to_string()),
                }
            };
            let state = if !def.known {
                "no record yet".to_string()
            } else if active.contains(&r) {
                "active".to_string()
            } else if let Some(reason) = self.refused_by.get(&(peer, r)) {
                format!("refused: {reason}")
            } else if !self.peers[r].session {
                "no session".to_string()
            } else {
                "not asked".to_string()
            };
            v.push((RelayRank::of(pol, unix), RelayChoice { name: def.cfg.name.clone(), policy: pol.summary(unix), failover: why(Purpose::Failover), performance: why(Purpose::Performance), state }));
        }
        v.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.name.cmp(&b.1.name)));
        v.into_iter().map(|(_, c)| c).collect()
    }
}

/// The relay server's policy check (spec A§3.3): whether this node's `policy` lets it relay
/// traffic of `purpose`; a refusal with the reason counted and the words the requester
/// sees. The failover tests' relays answer with this same function.
pub fn relay_policy_admits(policy: &crate::node::policy::Policy, purpose: Purpose) -> Result<(), (Refusal, RelayRefusal)> {
    policy
        .relay_check(purpose)
        .map_err(|refusal| (refusal, RelayRefusal { reason: format!("{} (policy: {} relaying refused for {})", refusal.as_str(), policy.commitment.as_str(), purpose.as_str()), transient: false }))
}

/// Peer `i`'s name in `m`.
fn name(m: &Model, i: usize) -> String {
    m.peers.get(i).map(|p| p.cfg.name.clone()).unwrap_or_else(|| format!("peer {i}"))
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}
