//! The failover engine: one task that owns the [`Failover`] core and carries out its
//! actions — probes through the data path, the path each peer's traffic uses, protected
//! routes in the kernel, relay sessions over the management sessions — and serves the
//! relay requests of other nodes.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tokio::sync::{mpsc, oneshot, watch, Notify};

use crate::dataplane::{DataCommand, PathEndpoint, SplitRoute, MAX_SPLIT};
use crate::identity::NodeId;
use crate::node::model::{Model, Protect};
use crate::path::failover::{Action, Failover, LinkInfo, PathId, PathState};
use crate::path::icmp::Filter;
use crate::shell::datapath::{DataEvent, DataPath};
use crate::shell::intercept::Alarm;
use crate::shell::mnode::{unix_now, OverlayEvent};
use crate::shell::quic;
use crate::shell::supervise::{self, Part};
use crate::wire::mgmt::{Frame, Link, Message};

/// A session the engine needs opened (or no longer needs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Forwarding traffic waits for a session to this peer.
    Data(usize),
    /// A relay session this node serves needs a session to this peer (on), or no longer
    /// does (off).
    Relay(usize, bool),
}

/// How often REPLEX is driven while it runs (the failover core says itself when it wants
/// to be woken: [`Failover::poll_timeout`]).
const TICK: Duration = Duration::from_millis(10);
/// How often link reports are considered (sent only when they changed, see
/// [`Engine::send_link_reports`]).
const LINK_REPORT_EVERY: Duration = Duration::from_secs(1);
/// Data-path events taken at once after the first, before the core is asked when to wake.
const DATA_BATCH: usize = 64;
/// A link report unchanged for this long is sent again.
const LINK_REFRESH: Duration = Duration::from_secs(10);
/// The list of nodes this node wants link reports about is repeated this often.
const INTEREST_REFRESH: Duration = Duration::from_secs(30);

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

/// Events for the engine from the management sessions.
#[derive(Debug)]
pub enum SessionEvent {
    /// A management session with data keys is up.
    Up {
        /// Peer index.
        peer: usize,
        /// The session.
        conn: quinn::Connection,
        /// The peer's data-port address.
        data: SocketAddr,
        /// Monitor the path (configured peers, and links that carry forwarding traffic).
        monitor: bool,
    },
    /// The session that was up closed.
    Down {
        /// Peer index.
        peer: usize,
    },
    /// The link to a peer whose session is up now carries forwarding traffic: monitor it.
    Monitor {
        /// Peer index.
        peer: usize,
    },
    /// The session to a directory node was closed on purpose (idle): stop monitoring it.
    Forget {
        /// Peer index.
        peer: usize,
    },
    /// A management message from a peer.
    Message {
        /// Peer index.
        peer: usize,
        /// The message.
        message: Message,
    },
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

/// What the engine shares with the rest of the daemon.
#[derive(Default)]
pub struct EngineShared {
    /// Routes per peer (filled when status is asked for).
    pub routes: Mutex<Vec<Option<RouteStatus>>>,
    /// Protection per peer, read by the kernel reconcile.
    pub protect: Mutex<Vec<Option<Protect>>>,
    /// Woken when protection changes, so routes change at once.
    pub kernel: Notify,
    /// Relay sessions this node serves: (a, b) node names.
    pub relaying: Mutex<Vec<(String, String)>>,
    /// Bytes to each peer's split destinations that took the direct path in the kernel
    /// (cumulative; read by the daemon from its accounting rules).
    pub direct_bytes: Mutex<Vec<u64>>,
    /// Requests this node refused by its policy, indexed by [`crate::node::policy::Refusal`] (in
    /// the order of `Refusal::ALL`, which is declaration order).
    pub refusals: [std::sync::atomic::AtomicU64; crate::node::policy::Refusal::ALL.len()],
    /// Outside destinations on an exit, in words.
    pub exits: Mutex<Vec<String>>,
    /// Times the engine found itself late (probe loss not judged meanwhile).
    pub late: std::sync::atomic::AtomicU64,
    /// Some peer carries traffic (set at the first sign of it, recomputed every second):
    /// the TCP monitor polls at its fast rate only then.
    pub traffic: std::sync::atomic::AtomicBool,
    /// Progress and fatal failures of the daemon's parts (the engine reports its own).
    pub health: Arc<crate::shell::supervise::Health>,
}

/// REPLEX state of one peer.
struct ReplexPeer {
    dest: crate::path::replex::Dest<PathId>,
    slots: HashMap<PathId, usize>,
    sent: Vec<(PathId, f64)>,
    weights: Option<(u16, u16)>,
    last_route_bytes: [u64; MAX_SPLIT],
    last_direct_bytes: u64,
    realized: HashMap<PathId, f64>,
}

impl ReplexPeer {
    fn new() -> ReplexPeer {
        ReplexPeer {
            dest: crate::path::replex::Dest::default(),
            slots: HashMap::new(),
            sent: Vec::new(),
            weights: None,
            last_route_bytes: [0; MAX_SPLIT],
            last_direct_bytes: 0,
            realized: HashMap::new(),
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

struct PeerLink {
    id: NodeId,
    monitored: bool,
    conn: Option<quinn::Connection>,
    data: Option<SocketAddr>,
    local_ip: Option<IpAddr>,
    path: PathId,
}

/// The engine's state.
pub struct Engine {
    model: Arc<RwLock<Model>>,
    needs: mpsc::UnboundedSender<Need>,
    core: Failover,
    dp: Arc<DataPath>,
    filter: Arc<RwLock<Filter>>,
    shared: Arc<EngineShared>,
    peers: Vec<PeerLink>,
    by_id: HashMap<NodeId, usize>,
    /// Relay sessions served: pair (lower index, higher index) → peers that asked.
    serving: HashMap<(usize, usize), BTreeSet<usize>>,
    /// Peers this node opened a session to for a relay session, and since when.
    relay_links: HashMap<usize, Instant>,
    last_report: Instant,
    /// REPLEX state per peer (when `[replex] enabled`).
    replex: Vec<Option<ReplexPeer>>,
    next_round: Instant,
    rng: crate::rng::Rng,
    /// Refusals by relays: (peer, relay) → the relay's reason.
    refused_by: HashMap<(usize, usize), String>,
    /// Outside destinations and their exits.
    exits: crate::node::exits::Exits,
    /// The exit routes in place.
    exit_routes: Vec<crate::node::exits::ExitRoute>,
    /// To the management overlay: which sessions carry routed messages.
    overlay: mpsc::UnboundedSender<OverlayEvent>,
    /// Nodes reported to the overlay as unusable (their monitored direct path is down).
    unusable: BTreeSet<usize>,
    /// Link-report exchange per peer.
    reports: Vec<ReportState>,
}

impl Engine {
    /// Creates the engine; `seed` drives random relay choice. Requests for sessions to
    /// peers without one (traffic waiting) go to `needs`.
    /// Changes in which management sessions may carry routed messages go to `overlay`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        model: Arc<RwLock<Model>>,
        dp: Arc<DataPath>,
        filter: Arc<RwLock<Filter>>,
        shared: Arc<EngineShared>,
        needs: mpsc::UnboundedSender<Need>,
        overlay: mpsc::UnboundedSender<OverlayEvent>,
        seed: u64,
        now: Instant,
    ) -> Engine {
        let local = model.read().expect("model").local;
        let cfg = model.read().expect("model").cfg.failover.core();
        let mut e = Engine {
            core: Failover::new(local, &[], cfg, seed, now),
            peers: Vec::new(),
            by_id: HashMap::new(),
            model,
            needs,
            dp,
            filter,
            shared,
            serving: HashMap::new(),
            relay_links: HashMap::new(),
            last_report: now,
            replex: Vec::new(),
            next_round: now,
            rng: crate::rng::Rng::new(seed),
            refused_by: HashMap::new(),
            exits: crate::node::exits::Exits::default(),
            exit_routes: Vec::new(),
            overlay,
            unusable: BTreeSet::new(),
            reports: Vec::new(),
        };
        {
            let m = e.model.read().expect("model");
            e.exits = crate::node::exits::Exits::new(&m.cfg.exit);
            let mut f = e.filter.write().expect("filter");
            for net in &m.cfg.exit.watch {
                f.outside.insert(*net, ());
            }
        }
        e.sync_peers(now);
        e.update_ranks();
        e
    }

    /// Takes in the peers the model gained (directory nodes) since the last call.
    fn sync_peers(&mut self, now: Instant) {
        let model = self.model.clone();
        let m = model.read().expect("model");
        while self.peers.len() < m.peers.len() {
            let i = self.peers.len();
            let p = &m.peers[i];
            let id = p.cfg.node_id;
            self.core.add_peer(id, now);
            self.peers.push(PeerLink { id, monitored: false, conn: None, data: None, local_ip: None, path: PathId::Direct });
            self.by_id.insert(id, i);
            if p.configured {
                let mut f = self.filter.write().expect("filter");
                for net in m.protected_destinations(i, &[]) {
                    f.protected.insert(net, i);
                }
            }
        }
        let n = self.peers.len();
        self.shared.routes.lock().expect("routes").resize(n, None);
        self.shared.protect.lock().expect("protect").resize(n, None);
        self.shared.direct_bytes.lock().expect("direct bytes").resize(n, 0);
        self.replex.resize_with(n, || None);
        self.reports.resize_with(n, ReportState::default);
    }

    /// Runs until `shutdown` changes.
    pub async fn run(
        mut self,
        mut sessions: mpsc::UnboundedReceiver<SessionEvent>,
        mut data: mpsc::Receiver<DataEvent>,
        mut alarms: mpsc::UnboundedReceiver<Alarm>,
        mut refresh: mpsc::UnboundedReceiver<oneshot::Sender<()>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let replex = self.model.read().expect("model").cfg.replex.enabled;
        let mut last_tick = Instant::now();
        let test_panic = supervise::panic_after(Part::Engine, supervise::test_panic_after(Part::Engine));
        tokio::pin!(test_panic);
        loop {
            self.shared.health.beat(Part::Engine);
            // Woken when the core asks (its next probe, deadline or upkeep), for the link
            // reports once a second, and every TICK while REPLEX runs; never in a busy loop.
            let mut wake = self.core.poll_timeout().unwrap_or(last_tick + LINK_REPORT_EVERY).min(self.last_report + LINK_REPORT_EVERY);
            if replex {
                wake = wake.min(last_tick + TICK);
            }
            let wake = wake.max(last_tick + Duration::from_millis(1));
            tokio::select! {
                _ = shutdown.changed() => {
                    self.release_all();
                    return;
                }
                _ = &mut test_panic => {}
                Some(ev) = sessions.recv() => self.on_session(ev),
                Some(done) = refresh.recv() => {
                    // Status is built when someone asks (detourctl, a metrics scrape), never
                    // on a timer: an idle node does no work for status.
                    self.publish();
                    let _ = done.send(());
                }
                Some(ev) = data.recv() => {
                    // A burst of probes is taken in one go: the core's next wake-up is worked
                    // out once for all of them, not once per probe.
                    self.on_data(ev);
                    for _ in 0..DATA_BATCH {
                        match data.try_recv() {
                            Ok(ev) => self.on_data(ev),
                            Err(_) => break,
                        }
                    }
                }
                Some(alarm) = alarms.recv() => match alarm {
                    Alarm::Icmp { peer, at } => {
                        tracing::info!("ICMP unreachable about {}'s destinations: rerouting", self.name(peer));
                        self.core.handle_icmp(at, peer);
                    }
                    Alarm::TcpStall { peer } => {
                        tracing::info!("TCP to {}'s destinations stalls: checking the path", self.name(peer));
                        self.core.handle_tcp_stall(Instant::now(), peer);
                    }
                    Alarm::Traffic { peer } => {
                        if peer < self.peers.len() {
                            self.core.handle_traffic(Instant::now(), peer);
                            self.shared.traffic.store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    Alarm::Outside { dst } => {
                        if self.exits.handle_unreachable(Instant::now(), dst) {
                            tracing::info!("{dst} (outside the overlay) is unreachable: new connections to it go through an exit");
                            self.plan_exits();
                        }
                    }
                },
                _ = tokio::time::sleep_until(wake.into()) => {
                    let now = Instant::now();
                    last_tick = now;
                    self.core.handle_tick(now);
                    self.replex_tick(now);
                    if now >= self.last_report + LINK_REPORT_EVERY {
                        self.last_report = now;
                        self.update_ranks();
                        self.exits.expire(now);
                        self.plan_exits();
                        self.send_link_reports(now);
                        self.release_relay_links(now);
                        self.report_usable();
                        self.shared.late.store(self.core.late_count(), std::sync::atomic::Ordering::Relaxed);
                        // Without idle probing (no traffic detection) every peer counts as busy.
                        let cfg = self.core.config();
                        let traffic = cfg.idle_interval <= cfg.probe_interval || (0..self.peers.len()).any(|i| self.core.is_active(now, i));
                        self.shared.traffic.store(traffic, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
            self.drain_actions();
        }
    }

    /// One event from the data path.
    fn on_data(&mut self, ev: DataEvent) {
        let now = Instant::now();
        // A peer learned from the directory since the core last heard of its peers.
        if let DataEvent::Control { peer, .. } | DataEvent::Traffic { peer } = ev {
            if peer >= self.peers.len() {
                self.sync_peers(now);
                self.update_ranks();
            }
        }
        match ev {
            DataEvent::Control { peer, from, payload, at } => {
                // A probe that waited long in the queue: this node is late, not the path.
                self.core.handle_late(now, now.saturating_duration_since(at));
                match self.core.handle_probe(at, peer, &payload) {
                    Ok(Some(echo)) => self.dp.command(DataCommand::SendControl { peer, to: canonical(from), payload: echo }),
                    Ok(None) => {}
                    Err(e) => tracing::debug!("probe from peer {peer}: {e}"),
                }
            }
            DataEvent::Traffic { peer } => {
                self.core.handle_traffic(now, peer);
                self.shared.traffic.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            DataEvent::NeedSession { peer } => {
                let _ = self.needs.send(Need::Data(peer));
            }
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
                let _ = self.overlay.send(OverlayEvent::Usable { node: self.peers[i].id, usable: !down });
            }
        }
    }

    fn name(&self, i: usize) -> String {
        self.model.read().expect("model").peers.get(i).map(|p| p.cfg.name.clone()).unwrap_or_else(|| format!("peer {i}"))
    }

    fn path_name(&self, path: PathId) -> String {
        match path {
            PathId::Direct => "direct".into(),
            PathId::Relay(id) => match self.by_id.get(&id) {
                Some(&r) => format!("via {}", self.name(r)),
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

    fn on_session(&mut self, ev: SessionEvent) {
        let now = Instant::now();
        let peer = match &ev {
            SessionEvent::Up { peer, .. } | SessionEvent::Down { peer } | SessionEvent::Monitor { peer } | SessionEvent::Forget { peer } | SessionEvent::Message { peer, .. } => *peer,
        };
        if peer >= self.peers.len() {
            self.sync_peers(now);
            self.update_ranks();
            if peer >= self.peers.len() {
                return;
            }
        }
        match ev {
            SessionEvent::Up { peer, conn, data, monitor } => {
                let local_ip = conn.local_ip().map(|a| a.to_canonical());
                let p = &mut self.peers[peer];
                let moved = p.data != Some(data);
                p.conn = Some(conn);
                p.data = Some(data);
                p.local_ip = local_ip;
                if monitor {
                    self.start_monitoring(now, peer);
                }
                if moved && self.peers[peer].monitored {
                    // Keep the data path, and every relay session through or to this peer,
                    // on the current address.
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
            }
            SessionEvent::Down { peer } => {
                self.peers[peer].conn = None;
            }
            SessionEvent::Monitor { peer } => self.start_monitoring(now, peer),
            SessionEvent::Forget { peer } => {
                self.core.forget(now, peer);
                self.peers[peer].monitored = false;
                self.peers[peer].conn = None;
                let pairs: Vec<(usize, usize)> = self.serving.keys().copied().filter(|(a, b)| *a == peer || *b == peer).collect();
                for (a, b) in pairs {
                    self.serving.remove(&(a, b));
                    self.dp.command(DataCommand::ClearRelay { a: self.peers[a].id, b: self.peers[b].id });
                }
                self.refresh_protect(peer);
            }
            SessionEvent::Message { peer, message } => self.on_message(now, peer, message),
        }
    }

    fn jitter(&mut self) -> f64 {
        0.9 + 0.2 * self.rng.unit()
    }

    /// REPLEX (`replex-spec.md` §3): every tick the routes' liveness (a route that went
    /// down hands its share over at once), every period a round of share updates; the
    /// shares go to the data path (userspace split) and to the kernel (the weights of the
    /// protected destinations' resilient nexthop group).
    fn replex_tick(&mut self, now: Instant) {
        let cfg = self.model.read().expect("model").cfg.replex.clone();
        if !cfg.enabled {
            return;
        }
        let round = now >= self.next_round;
        if round {
            let j = self.jitter();
            self.next_round = now + cfg.period.mul_f64(j);
        }
        for peer in 0..self.peers.len() {
            if !self.peers[peer].monitored || self.peers[peer].data.is_none() {
                if self.replex[peer].take().is_some() {
                    self.dp.command(DataCommand::SetSplit { peer, routes: Vec::new(), flow_idle_ms: 0 });
                    self.refresh_protect(peer);
                }
                continue;
            }
            self.replex_peer(peer, &cfg, round);
        }
    }

    fn replex_peer(&mut self, peer: usize, cfg: &crate::config::ReplexConfig, round: bool) {
        let p = cfg.params;
        let Some(route) = self.core.route(peer) else { return };
        let views = self.core.paths(peer);
        let measures: Vec<(PathId, crate::path::replex::Measure)> = views
            .iter()
            // REPLEX spreads load only over relays that accept traffic for performance.
            .filter(|v| v.active && (v.id == PathId::Direct || self.relay_commitment(v.id) == crate::node::policy::Commitment::Always))
            .map(|v| {
                // While failover has moved the peer off the direct path, it is down here too.
                let up = v.state == PathState::Up && !(v.id == PathId::Direct && route.protect);
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
            self.measure_realized(peer);
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
            self.dp.command(DataCommand::SetSplit { peer, routes, flow_idle_ms: cfg.flow_idle.as_millis() as u64 });
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
    fn measure_realized(&mut self, peer: usize) {
        let counters = self.model.read().expect("model").peers.get(peer).map(|p| p.counters.clone());
        let Some(c) = counters else { return };
        let direct_kernel = self.shared.direct_bytes.lock().expect("direct bytes").get(peer).copied().unwrap_or(0);
        let Some(st) = self.replex[peer].as_mut() else { return };
        let mut bytes: HashMap<PathId, f64> = HashMap::new();
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
        st.realized = if total > 0.0 { bytes.into_iter().map(|(k, v)| (k, v / total)).collect() } else { HashMap::new() };
    }

    /// Sessions opened for relaying that no relay session uses any more (after 30 s) are no
    /// longer wanted.
    fn release_relay_links(&mut self, now: Instant) {
        let serving: BTreeSet<usize> = self.serving.keys().flat_map(|(a, b)| [*a, *b]).collect();
        let idle: Vec<usize> = self.relay_links.iter().filter(|(p, t)| !serving.contains(p) && now.saturating_duration_since(**t) > Duration::from_secs(30)).map(|(p, _)| *p).collect();
        for p in serving {
            if let Some(t) = self.relay_links.get_mut(&p) {
                *t = now;
            }
        }
        for p in idle {
            self.relay_links.remove(&p);
            let _ = self.needs.send(Need::Relay(p, false));
        }
    }

    /// Starts probing the direct path to a peer whose data address is known.
    fn start_monitoring(&mut self, now: Instant, peer: usize) {
        let Some(data) = self.peers[peer].data else { return };
        if self.peers[peer].monitored {
            return;
        }
        self.peers[peer].monitored = true;
        self.core.handle_direct_known(now, peer);
        let mut underlay = self.model.read().expect("model").endpoint_ips(peer);
        if !underlay.contains(&data.ip()) {
            underlay.push(data.ip());
        }
        self.dp.command(DataCommand::SetPeerUnderlay { peer, addrs: underlay });
        {
            let mut f = self.filter.write().expect("filter");
            f.protected.insert(IpNet::from(data.ip()), peer);
        }
        let path = self.peers[peer].path;
        self.use_path(peer, path);
    }

    fn on_message(&mut self, now: Instant, from: usize, message: Message) {
        match message {
            Message::RelayRequest { a, b, purpose } => {
                let answer = self.serve_relay(from, a, b, purpose);
                match &answer {
                    Err((reason, false)) => tracing::info!("refused to relay between {} and {b}: {reason}", self.name(from)),
                    Err((reason, true)) => tracing::debug!("not relaying between {} and {b} yet: {reason}", self.name(from)),
                    Ok(()) => {}
                }
                let transient = answer.as_ref().err().is_some_and(|(_, t)| *t);
                let reply = Message::RelayResponse { b, accepted: answer.is_ok(), reason: answer.err().map(|(r, _)| r), transient };
                self.send(from, reply);
            }
            Message::RelayResponse { b, accepted, reason, transient } => {
                let Some(&peer) = self.by_id.get(&b) else { return };
                if accepted {
                    self.refused_by.remove(&(peer, from));
                } else {
                    let reason = reason.unwrap_or_default();
                    tracing::debug!("{} will not relay to {}: {reason}", self.name(from), self.name(peer));
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
                            self.dp.command(DataCommand::ClearRelay { a: self.peers[key.0].id, b: self.peers[key.1].id });
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
    }

    /// Decides a relay request from peer `from`: relaying must be allowed here, the
    /// requester must be the end it names, and both ends need a known data address. An
    /// error says why, and whether it may pass soon (a missing session).
    fn serve_relay(&mut self, from: usize, a: NodeId, b: NodeId, purpose: crate::node::policy::Purpose) -> Result<(), (String, bool)> {
        let check = self.model.read().expect("model").cfg.node.policy.relay_check(purpose);
        if let Err(refusal) = check {
            self.shared.refusals[refusal as usize].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err((format!("{} (policy: {} relaying refused for {})", refusal.as_str(), self.model.read().expect("model").cfg.node.policy.commitment.as_str(), purpose.as_str()), false));
        }
        if a != self.peers[from].id {
            return Err(("a node may only ask for its own relay sessions".into(), false));
        }
        let Some(&bi) = self.by_id.get(&b) else { return Err(("unknown destination".into(), true)) };
        if bi == from {
            return Err(("a node cannot relay to itself".into(), false));
        }
        if self.peers[from].data.is_none() || self.peers[bi].data.is_none() {
            // A node of the directory without a session yet: open one for the relay, and
            // let the requester ask again.
            if self.peers[bi].data.is_none() {
                self.relay_links.insert(bi, Instant::now());
                let _ = self.needs.send(Need::Relay(bi, true));
            }
            return Err((format!("no data path to {}", self.name(bi)), true));
        }
        let key = (from.min(bi), from.max(bi));
        let new = !self.serving.contains_key(&key);
        self.serving.entry(key).or_default().insert(from);
        if new {
            tracing::info!("relaying between {} and {}", self.name(key.0), self.name(key.1));
        }
        self.install_relay(key.0, key.1);
        Ok(())
    }

    fn install_relay(&self, a: usize, b: usize) {
        if let (Some(a_addr), Some(b_addr)) = (self.peers[a].data, self.peers[b].data) {
            self.dp.command(DataCommand::SetRelay { a: self.peers[a].id, a_addr, b: self.peers[b].id, b_addr });
        }
    }

    fn local(&self) -> NodeId {
        self.model.read().expect("model").local
    }

    fn send(&self, to: usize, message: Message) {
        let Some(conn) = self.peers[to].conn.clone() else { return };
        let frame = Frame { src: self.local(), dst: self.peers[to].id, hop_limit: 0, message };
        tokio::spawn(async move {
            if let Err(e) = quic::send_frame(&conn, &frame).await {
                tracing::debug!("management message: {e:#}");
            }
        });
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
            if !self.peers[i].monitored || self.peers[i].conn.is_none() {
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
            self.dp.command(DataCommand::SetEndpoint { peer, endpoint });
        }
    }

    fn refresh_protect(&self, peer: usize) {
        let on = self.core.route(peer).is_some_and(|r| r.protect);
        let split = self.replex.get(peer).and_then(|r| r.as_ref()).and_then(|r| r.weights);
        let p = &self.peers[peer];
        let value =
            (on || split.is_some()).then(|| Protect { underlay: p.data.map(|d| vec![d.ip()]).unwrap_or_default(), src: p.local_ip.into_iter().collect(), split: if on { None } else { split } });
        let mut protect = self.shared.protect.lock().expect("protect");
        if protect[peer] != value {
            protect[peer] = value;
            self.shared.kernel.notify_one();
        }
    }

    fn drain_actions(&mut self) {
        while let Some(a) = self.core.poll_action() {
            match a {
                Action::Send { peer, path, payload } => {
                    if let Some(to) = self.address_of(peer, path) {
                        self.dp.command(DataCommand::SendControl { peer, to, payload });
                    }
                }
                Action::UsePath { peer, path } => {
                    let r = self.core.route(peer).expect("peer exists");
                    tracing::info!("{}: traffic now {} ({})", self.name(peer), self.path_name(path), r.reason.as_str());
                    self.use_path(peer, path);
                }
                Action::Protect { peer, on } => {
                    let r = self.core.route(peer).expect("peer exists");
                    if on {
                        tracing::info!("{}: protected destinations rerouted into the overlay ({})", self.name(peer), r.reason.as_str());
                    } else {
                        tracing::info!("{}: direct path healthy again; protected destinations back on the direct route", self.name(peer));
                    }
                    self.refresh_protect(peer);
                }
                Action::RequestRelay { relay, peer, purpose } => {
                    if self.peers[relay].conn.is_some() {
                        self.send(relay, Message::RelayRequest { a: self.local(), b: self.peers[peer].id, purpose });
                    } else {
                        self.core.handle_relay_response(Instant::now(), relay, peer, false);
                    }
                }
                Action::ReleaseRelay { relay, peer } => self.send(relay, Message::RelayRelease { a: self.local(), b: self.peers[peer].id }),
            }
        }
    }

    fn release_all(&mut self) {
        for peer in 0..self.peers.len() {
            for relay in self.core.active_relays(peer) {
                self.send(relay, Message::RelayRelease { a: self.local(), b: self.peers[peer].id });
            }
        }
    }

    fn publish(&self) {
        let now = Instant::now();
        let mut routes = self.shared.routes.lock().expect("routes");
        routes.resize(self.peers.len(), None);
        for (i, slot) in routes.iter_mut().enumerate() {
            let Some(r) = self.core.route(i) else { continue };
            let paths = self
                .core
                .paths(i)
                .into_iter()
                .filter(|v| v.id == PathId::Direct || v.state != PathState::Down || v.in_use || self.core.active_relays(i).iter().any(|&ri| v.id == PathId::Relay(self.peers[ri].id)))
                .map(|v| PathStatus { path: self.path_name(v.id), state: v.state.as_str().into(), since: v.since, rtt_ms: v.srtt.map(|d| d.as_secs_f64() * 1000.0), loss: v.loss, in_use: v.in_use })
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
                            path: self.path_name(rt.id),
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
            *slot = Some(RouteStatus {
                path: self.path_name(r.path),
                reason: r.reason.as_str().into(),
                since: r.since,
                protected: r.protect,
                changes: self.core.route_changes(i),
                traffic: self.core.is_active(now, i),
                paths,
                shares,
                relays: if self.peers[i].monitored { self.relay_choices(i) } else { Vec::new() },
            });
        }
        drop(routes);
        let relaying: Vec<(String, String)> = self.serving.keys().map(|(a, b)| (self.name(*a), self.name(*b))).collect();
        *self.shared.relaying.lock().expect("relaying") = relaying;
    }
}

impl Engine {
    /// Chooses the exit of every outside destination that needs one and hands changes to
    /// the kernel (routes) and the data path (which replies to accept from which exit).
    fn plan_exits(&mut self) {
        if !self.exits.enabled() {
            return;
        }
        let unix = unix_now();
        let plan = {
            let m = self.model.read().expect("model");
            let cands: Vec<crate::node::exits::ExitCandidate> = m
                .peers
                .iter()
                .enumerate()
                .take(self.peers.len())
                .filter(|(_, d)| d.present)
                .map(|(i, d)| {
                    let direct = self.core.paths(i).into_iter().find(|v| v.id == PathId::Direct);
                    crate::node::exits::ExitCandidate {
                        peer: i,
                        policy: &d.policy,
                        own: d.cfg.prefixes.iter().chain(d.networks.iter()).copied().collect(),
                        usable: self.peers[i].data.is_some() && direct.as_ref().is_some_and(|v| v.state == PathState::Up),
                        cost_ms: direct.and_then(|v| v.srtt).map(|d| d.as_secs_f64() * 1000.0).unwrap_or(1000.0),
                    }
                })
                .collect();
            // The sources judged: this node's underlay address (as its sessions see it),
            // else its overlay address.
            let overlay = |v6: bool| if v6 { m.cfg.node.overlay_v6.map(|n| IpAddr::V6(n.addr())) } else { m.cfg.node.overlay_v4.map(|n| IpAddr::V4(n.addr())) };
            let src = |v6: bool| self.peers.iter().filter_map(|p| p.local_ip).find(|a| a.is_ipv6() == v6).or(overlay(v6));
            let mut plan = self.exits.plan(&cands, src(false), src(true), unix);
            // New connections through an exit that masquerades use the overlay address (its
            // replies reach this node through the exit's own overlay routes); through one
            // that keeps the source, the underlay address the outside host can answer.
            for r in plan.iter_mut() {
                let v6 = r.dst.addr().is_ipv6();
                let underlay = self.peers[r.via].local_ip.filter(|a| a.is_ipv6() == v6);
                r.src = if r.masquerade { overlay(v6).or(underlay) } else { underlay };
            }
            plan
        };
        if plan == self.exit_routes {
            *self.shared.exits.lock().expect("exits") = self.exit_status();
            return;
        }
        let mut touched: BTreeSet<usize> = self.exit_routes.iter().map(|r| r.via).collect();
        touched.extend(plan.iter().map(|r| r.via));
        for peer in touched {
            let nets: Vec<IpNet> = plan.iter().filter(|r| r.via == peer).map(|r| r.dst).collect();
            self.dp.command(DataCommand::SetExitSources { peer, nets });
        }
        for r in &plan {
            if !self.exit_routes.iter().any(|o| o.dst == r.dst && o.via == r.via) {
                tracing::info!("{} goes through exit {}{}", r.dst, self.name(r.via), if r.masquerade { " (masquerading: new connections only)" } else { "" });
            }
            let tun = self.model.read().expect("model").peers.get(r.via).is_some_and(|d| d.tun);
            if !tun {
                let _ = self.needs.send(Need::Data(r.via));
            }
        }
        self.exit_routes = plan.clone();
        self.model.write().expect("model").exits = plan;
        *self.shared.exits.lock().expect("exits") = self.exit_status();
        self.shared.kernel.notify_one();
    }

    fn exit_status(&self) -> Vec<String> {
        let now = Instant::now();
        let failed = self.exits.failed(now);
        self.exit_routes
            .iter()
            .map(|r| {
                let hold = failed.iter().find(|(a, _)| IpNet::from(*a) == r.dst).map(|(_, d)| format!(", unreachable directly, retried in {} s", d.as_secs())).unwrap_or_default();
                let class = if r.masquerade { "new connections only (masquerades)" } else { "all traffic (keeps the source)" };
                format!("{} via {}: {class}{hold}", r.dst, self.name(r.via))
            })
            .collect()
    }

    fn relay_commitment(&self, path: PathId) -> crate::node::policy::Commitment {
        match path {
            PathId::Relay(id) => self.by_id.get(&id).map(|&r| self.core.rank(r).commitment).unwrap_or(crate::node::policy::Commitment::Always),
            PathId::Direct => crate::node::policy::Commitment::Always,
        }
    }

    /// Hands the peers' published policies to the core as relay ranks, and their networks
    /// (learned from their records) to the ICMP filter and TCP monitor.
    fn update_ranks(&mut self) {
        let unix = unix_now();
        let m = self.model.read().expect("model");
        {
            let mut f = self.filter.write().expect("filter");
            for (i, p) in m.peers.iter().enumerate().take(self.peers.len()) {
                for net in p.networks.iter().filter(|_| p.present) {
                    if f.protected.lookup(net.addr()) != Some(&i) {
                        f.protected.insert(*net, i);
                    }
                }
            }
        }
        for (i, p) in m.peers.iter().enumerate().take(self.peers.len()) {
            // A node whose record has not arrived yet is not asked: its policy is unknown.
            let rank =
                if p.known { crate::node::policy::RelayRank::of(&p.policy, unix) } else { crate::node::policy::RelayRank { commitment: crate::node::policy::Commitment::Never, ..Default::default() } };
            self.core.set_rank(i, rank);
        }
    }

    /// Every node that could relay towards `peer`, in the core's policy order, with what
    /// each traffic class may do with it.
    fn relay_choices(&self, peer: usize) -> Vec<RelayChoice> {
        use crate::node::policy::{Commitment, Purpose};
        let m = self.model.read().expect("model");
        let unix = unix_now();
        let active = self.core.active_relays(peer);
        let mut v: Vec<(crate::node::policy::RelayRank, RelayChoice)> = Vec::new();
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
            } else if self.peers[r].conn.is_none() {
                "no session".to_string()
            } else {
                "not asked".to_string()
            };
            v.push((
                crate::node::policy::RelayRank::of(pol, unix),
                RelayChoice { name: def.cfg.name.clone(), policy: pol.summary(unix), failover: why(Purpose::Failover), performance: why(Purpose::Performance), state },
            ));
        }
        v.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.name.cmp(&b.1.name)));
        v.into_iter().map(|(_, c)| c).collect()
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}
