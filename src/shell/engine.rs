//! The failover engine: one task that owns the [`Failover`] core and carries out its
//! actions — probes through the data path, the path each peer's traffic uses, protected
//! routes in the kernel, relay sessions over the management sessions — and serves the
//! relay requests of other nodes.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tokio::sync::{mpsc, watch, Notify};

use crate::dataplane::{DataCommand, PathEndpoint};
use crate::failover::{Action, Failover, LinkInfo, PathId, PathState};
use crate::icmp::Filter;
use crate::identity::NodeId;
use crate::mgmt::{Frame, Link, Message};
use crate::model::{Model, Protect};
use crate::shell::datapath::{DataEvent, DataPath};
use crate::shell::intercept::Alarm;
use crate::shell::quic;

/// A session the engine needs opened (or no longer needs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Forwarding traffic waits for a session to this peer.
    Data(usize),
    /// A relay session this node serves needs a session to this peer (on), or no longer
    /// does (off).
    Relay(usize, bool),
}

/// How often the core is ticked.
const TICK: Duration = Duration::from_millis(10);
/// How often link reports go to the peers.
const LINK_REPORT_EVERY: Duration = Duration::from_secs(1);

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
    /// Every monitored path.
    pub paths: Vec<PathStatus>,
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
    /// Routes per peer (updated every tick).
    pub routes: Mutex<Vec<Option<RouteStatus>>>,
    /// Protection per peer, read by the kernel reconcile.
    pub protect: Mutex<Vec<Option<Protect>>>,
    /// Woken when protection changes, so routes change at once.
    pub kernel: Notify,
    /// Relay sessions this node serves: (a, b) node names.
    pub relaying: Mutex<Vec<(String, String)>>,
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
}

impl Engine {
    /// Creates the engine; `seed` drives random relay choice. Requests for sessions to
    /// peers without one (traffic waiting) go to `needs`.
    pub fn new(model: Arc<RwLock<Model>>, dp: Arc<DataPath>, filter: Arc<RwLock<Filter>>, shared: Arc<EngineShared>, needs: mpsc::UnboundedSender<Need>, seed: u64, now: Instant) -> Engine {
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
        };
        e.sync_peers(now);
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
    }

    /// Runs until `shutdown` changes.
    pub async fn run(
        mut self,
        mut sessions: mpsc::UnboundedReceiver<SessionEvent>,
        mut data: mpsc::Receiver<DataEvent>,
        mut alarms: mpsc::UnboundedReceiver<Alarm>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = shutdown.changed() => {
                    self.release_all();
                    return;
                }
                Some(ev) = sessions.recv() => self.on_session(ev),
                Some(ev) = data.recv() => match ev {
                    DataEvent::Control { peer, from, payload, at } => {
                        if peer >= self.peers.len() {
                            self.sync_peers(at);
                        }
                        match self.core.handle_probe(at, peer, &payload) {
                            Ok(Some(echo)) => self.dp.command(DataCommand::SendControl { peer, to: canonical(from), payload: echo }),
                            Ok(None) => {}
                            Err(e) => tracing::debug!("probe from peer {peer}: {e}"),
                        }
                    }
                    DataEvent::NeedSession { peer } => {
                        let _ = self.needs.send(Need::Data(peer));
                    }
                },
                Some(alarm) = alarms.recv() => match alarm {
                    Alarm::Icmp { peer, at } => {
                        tracing::info!("ICMP unreachable about {}'s destinations: rerouting", self.name(peer));
                        self.core.handle_icmp(at, peer);
                    }
                    Alarm::TcpStall { peer } => {
                        tracing::info!("TCP to {}'s destinations stalls: checking the path", self.name(peer));
                        self.core.handle_tcp_stall(Instant::now(), peer);
                    }
                },
                _ = tick.tick() => {
                    let now = Instant::now();
                    self.core.handle_tick(now);
                    if now >= self.last_report + LINK_REPORT_EVERY {
                        self.last_report = now;
                        self.send_link_reports();
                        self.release_relay_links(now);
                    }
                    self.publish();
                }
            }
            self.drain_actions();
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
            Message::RelayRequest { a, b } => {
                let answer = self.serve_relay(from, a, b);
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
                if !accepted {
                    tracing::debug!("{} will not relay to {}: {}", self.name(from), self.name(peer), reason.unwrap_or_default());
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
            Message::LinkReport { links } => {
                let infos: Vec<LinkInfo> = links.iter().map(|l| LinkInfo { node: l.node, up: l.up, rtt_ms: l.rtt_ms, loss: l.loss }).collect();
                self.core.handle_link_report(now, from, &infos);
            }
            _ => {}
        }
    }

    /// Decides a relay request from peer `from`: relaying must be allowed here, the
    /// requester must be the end it names, and both ends need a known data address. An
    /// error says why, and whether it may pass soon (a missing session).
    fn serve_relay(&mut self, from: usize, a: NodeId, b: NodeId) -> Result<(), (String, bool)> {
        if !self.model.read().expect("model").cfg.node.relay {
            return Err(("this node does not relay (node.relay = false)".into(), false));
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

    fn send_link_reports(&self) {
        let links: Vec<Link> = self.core.link_report().into_iter().map(|l| Link { node: l.node, up: l.up, rtt_ms: l.rtt_ms, loss: l.loss }).collect();
        for i in 0..self.peers.len() {
            if self.peers[i].conn.is_some() {
                self.send(i, Message::LinkReport { links: links.clone() });
            }
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
        let p = &self.peers[peer];
        let value = on.then(|| Protect { underlay: p.data.map(|d| vec![d.ip()]).unwrap_or_default(), src: p.local_ip.into_iter().collect() });
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
                Action::RequestRelay { relay, peer } => {
                    if self.peers[relay].conn.is_some() {
                        self.send(relay, Message::RelayRequest { a: self.local(), b: self.peers[peer].id });
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
        let mut routes = self.shared.routes.lock().expect("routes");
        routes.resize(self.peers.len(), None);
        for (i, slot) in routes.iter_mut().enumerate() {
            let Some(r) = self.core.route(i) else { continue };
            let paths = self
                .core
                .paths(i)
                .into_iter()
                .filter(|v| v.id == PathId::Direct || v.state != PathState::Down || v.in_use || self.core.active_relays(i).iter().any(|&ri| v.id == PathId::Relay(self.peers[ri].id)))
                .map(|v| PathStatus {
                    path: self.path_name(v.id),
                    state: v.state.as_str().into(),
                    since: v.since,
                    rtt_ms: v.srtt.map(|d| d.as_secs_f64() * 1000.0),
                    loss: v.loss,
                    in_use: v.in_use,
                })
                .collect();
            *slot = Some(RouteStatus {
                path: self.path_name(r.path),
                reason: r.reason.as_str().into(),
                since: r.since,
                protected: r.protect,
                changes: self.core.route_changes(i),
                paths,
            });
        }
        drop(routes);
        let relaying: Vec<(String, String)> = self.serving.keys().map(|(a, b)| (self.name(*a), self.name(*b))).collect();
        *self.shared.relaying.lock().expect("relaying") = relaying;
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}
