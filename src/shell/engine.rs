//! The engine: drives the core's [`NodeState`] (failover, relay server, REPLEX, exits,
//! link reports, the management overlay and the local API server) and carries out its
//! actions: probes and endpoints through the data path, management messages over the QUIC
//! sessions, datagrams to local programs, protected routes and exits for the kernel pass,
//! records applied to the model (which it owns), session wants handed to
//! [`crate::shell::sessions`]. No decision is made here. The daemon's one loop feeds it
//! events (see `daemon::run`).

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use crate::dataplane::DataCommand;
use crate::identity::{Identity, NodeId};
use crate::node::model::{Learned, Model, Protect};
use crate::node::state::{NodeAction, NodeState, RouteStatus};
use crate::overlay::directory::NodeRecord;
use crate::path::icmp::Filter;
use crate::shell::datapath::{DataEvent, DataPath};
use crate::shell::intercept::Alarm;
use crate::shell::mnode::{self, unix_now};
use crate::shell::quic;
use crate::shell::sessions::{want, PeerInfo, SessionEvent};
use crate::shell::tls::{AllowedKeys, RefusedKeys};
use crate::wire::mgmt::{Frame, Message};

/// What the engine asks of the session table ([`crate::shell::sessions::Sessions`]), in
/// order; the daemon's loop hands them over after each event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionWant {
    /// Adds (`on`) or removes a reason ([`crate::shell::sessions::want`]) for a session
    /// with a peer.
    Want(usize, u8, bool),
    /// Forwarding traffic waits for a session to this peer.
    Data(usize),
    /// A directory node left the directory.
    Forgotten(usize),
    /// A configured peer was removed by a reload: close every connection with it.
    Removed(usize),
}

/// Data-path events taken at once after the first, before the core is asked when to wake.
pub const DATA_BATCH: usize = 64;
/// How often what the node publishes about itself (its endpoints) is refreshed.
const OWN_INFO_EVERY: Duration = Duration::from_secs(2);

/// What status output shows of the node state, built from it when `detourctl` or a
/// metrics scrape asks ([`Engine::view`]), never on a timer.
#[derive(Default)]
pub struct EngineView {
    /// Routes per peer.
    pub routes: Vec<Option<RouteStatus>>,
    /// Relay sessions this node serves: (a, b) node names.
    pub relaying: Vec<(String, String)>,
    /// Requests this node refused by its policy, by reason.
    pub refusals: Vec<(crate::node::policy::Refusal, u64)>,
    /// Outside destinations on an exit, in words.
    pub exits: Vec<String>,
    /// Times the node found itself late (probe loss not judged meanwhile).
    pub late: u64,
    /// The management overlay.
    pub overlay: mnode::OverlayView,
}

/// The engine: the node state, the model it is driven with, and the handles its actions
/// need. It runs on the daemon's loop (no task of its own).
pub struct Engine {
    /// Configuration and peers (configured, and learned from the directory).
    model: Model,
    /// Session wants for the loop to hand to the session table.
    wants: Vec<SessionWant>,
    /// Peers or their interfaces changed: the kernel must follow.
    model_changed: bool,
    /// Keys admitted to management sessions (the directory's nodes join them).
    allowed: Arc<AllowedKeys>,
    /// Keys that were refused a session (those nodes are sent this node's record).
    refused: Arc<RefusedKeys>,
    /// This host's addresses (what the node publishes when nothing is configured).
    local_addrs: HashSet<IpAddr>,
    state: NodeState,
    dp: Arc<DataPath>,
    /// Relay pairs mirrored into the kernel (`kernel.relay_forwarding`).
    kfwd: Option<crate::shell::kfwd::KernelRelay>,
    filter: Arc<RwLock<Filter>>,
    /// Some peer carries traffic (the TCP monitor polls at its fast rate only then).
    traffic: Arc<std::sync::atomic::AtomicBool>,
    /// SYNs to send again after the next kernel pass ([`Engine::take_syns`]).
    syns: Vec<Vec<u8>>,
    /// Protection or exits changed since the daemon last looked: the kernel's routes must
    /// follow now ([`Engine::take_kernel_change`]).
    kernel_change: bool,
    /// The management session of each peer, for the messages the core sends.
    conns: Vec<Option<quinn::Connection>>,
    /// The local API sockets (127.0.0.1, ::1; none when the API is off).
    api: Vec<Arc<UdpSocket>>,
    last_info: Instant,
}

/// SYNs held for sending again at most (a burst of errors cannot grow it).
const MAX_SYNS: usize = 64;

impl Engine {
    /// Creates the engine, which owns `model`; `seed` drives random relay choice and the
    /// overlay's random choices. `api` are the bound local API sockets (none when off).
    /// `traffic` is kept true while some peer carries traffic.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        model: Model,
        dp: Arc<DataPath>,
        keys: (Arc<AllowedKeys>, Arc<RefusedKeys>),
        local_addrs: HashSet<IpAddr>,
        filter: Arc<RwLock<Filter>>,
        traffic: Arc<std::sync::atomic::AtomicBool>,
        identity: Identity,
        api: Vec<UdpSocket>,
        seed: u64,
        now: Instant,
    ) -> Engine {
        let info = mnode::own_info(&model, &local_addrs);
        let state = NodeState::new(&model, identity, info, seed, now, unix_now());
        let (allowed, refused) = keys;
        let mut e = Engine {
            model,
            wants: Vec::new(),
            model_changed: false,
            allowed,
            refused,
            local_addrs,
            state,
            dp,
            kfwd: None,
            filter,
            traffic,
            syns: Vec::new(),
            kernel_change: false,
            conns: Vec::new(),
            api: api.into_iter().map(Arc::new).collect(),
            last_info: now,
        };
        e.execute();
        e
    }

    /// Mirrors the relay pairs the node agrees from now on into the kernel.
    pub fn set_kernel_relay(&mut self, k: crate::shell::kfwd::KernelRelay) {
        self.kfwd = Some(k);
    }

    /// The model (configuration and peers).
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The model, for the changes the session table makes (a link's TUN opened or closed).
    pub fn model_mut(&mut self) -> &mut Model {
        &mut self.model
    }

    /// Session wants since the last call.
    pub fn take_wants(&mut self) -> Vec<SessionWant> {
        std::mem::take(&mut self.wants)
    }

    /// Whether peers or their interfaces changed since the last call.
    pub fn take_model_changed(&mut self) -> bool {
        std::mem::take(&mut self.model_changed)
    }

    /// This host's addresses changed (they are published when nothing is configured).
    pub fn set_local_addrs(&mut self, addrs: HashSet<IpAddr>) {
        self.local_addrs = addrs;
    }

    /// Starts one reader per local API socket; their datagrams come out of the returned
    /// channel, for [`Engine::on_api`].
    pub fn start_api(&self) -> mpsc::Receiver<(SocketAddr, Vec<u8>)> {
        let (api_tx, api_rx) = mpsc::channel::<(SocketAddr, Vec<u8>)>(1024);
        for s in &self.api {
            let s = s.clone();
            let tx = api_tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65_536];
                loop {
                    match s.recv_from(&mut buf).await {
                        Ok((n, from)) => {
                            super::capture::sample(super::capture::Target::Api, &[&buf[..n]]);
                            if tx.send((from, buf[..n].to_vec())).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => tracing::debug!("api socket: {e}"),
                    }
                }
            });
        }
        api_rx
    }

    /// When [`Engine::on_timeout`] must run: when the core asks (its next probe, deadline,
    /// upkeep, REPLEX tick or overlay timer) and to refresh what the node publishes; never
    /// in a busy loop.
    pub fn wake(&mut self) -> Instant {
        self.state.poll_timeout().min(self.last_info + OWN_INFO_EVERY).max(Instant::now() + Duration::from_millis(1))
    }

    /// The core's timers are due.
    pub fn on_timeout(&mut self) {
        let now = Instant::now();
        if now >= self.last_info + OWN_INFO_EVERY {
            self.last_info = now;
            let info = mnode::own_info(&self.model, &self.local_addrs);
            self.state.set_own_info(&self.model, info);
        }
        self.state.handle_timeout(now, unix_now(), &self.model);
    }

    /// Bytes to each peer's split destinations that took the direct path in the kernel
    /// (cumulative, from the accounting rules): REPLEX's realized shares.
    pub fn set_direct_bytes(&mut self, bytes: Vec<u64>) {
        self.state.set_direct_bytes(bytes);
    }

    /// The protection of every peer, as the kernel's routes must show it.
    pub fn protect(&self) -> Vec<Option<Protect>> {
        self.state.protect().to_vec()
    }

    /// Whether protection or exits changed since the last call.
    pub fn take_kernel_change(&mut self) -> bool {
        std::mem::take(&mut self.kernel_change)
    }

    /// A datagram from a local program.
    pub fn on_api(&mut self, from: SocketAddr, data: &[u8]) {
        self.state.handle_api_datagram(Instant::now(), unix_now(), &self.model, from, data);
    }

    /// A failure or traffic signal from the ICMP, traffic and TCP monitors.
    pub fn on_alarm(&mut self, alarm: Alarm) {
        let m = &self.model;
        let syn = match alarm {
            Alarm::Icmp { peer, at, syn } => {
                self.state.handle_icmp(at, m, peer);
                syn
            }
            Alarm::TcpStall { peer } => {
                self.state.handle_tcp_stall(Instant::now(), m, peer);
                None
            }
            Alarm::Traffic { peer } => {
                self.state.handle_traffic(Instant::now(), m, peer);
                None
            }
            Alarm::Outside { dst, syn } => {
                self.state.handle_outside_unreachable(Instant::now(), unix_now(), m, dst);
                syn
            }
        };
        if let Some(syn) = syn {
            if self.syns.len() < MAX_SYNS {
                self.syns.push(syn);
            }
        }
    }

    /// The SYNs quoted by ICMP errors that rerouted their destination, to be sent again
    /// once the kernel routes reflect it (after the kernel pass that follows the alarm), so
    /// that a new connection does not wait for its SYN retransmission (issue 14, item 6).
    pub fn take_syns(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.syns)
    }

    /// After every event of the daemon's loop: nodes that refused this node's key get its
    /// record, and what the core decided is carried out.
    pub fn after_event(&mut self) {
        for id in self.refused.take_recent() {
            self.state.handle_refused(Instant::now(), &self.model, id);
        }
        self.traffic.store(self.state.traffic(), Relaxed);
        self.execute();
    }

    /// At shutdown: releases the relay sessions this node uses.
    pub fn shutdown(&mut self) {
        self.state.release_all();
        self.execute();
    }

    /// One event from the data path.
    pub fn on_data(&mut self, ev: DataEvent) {
        let now = Instant::now();
        let m = &self.model;
        match ev {
            DataEvent::Control { peer, from, payload, at } => self.state.handle_probe(now, m, at, peer, from, &payload),
            DataEvent::Traffic { peer } => self.state.handle_traffic(now, m, peer),
            DataEvent::NeedSession { peer } => self.state.handle_need_session(peer),
        }
    }

    /// One event from the management sessions.
    pub fn on_session(&mut self, ev: SessionEvent) {
        let now = Instant::now();
        let m = &self.model;
        match ev {
            SessionEvent::Up { peer, conn, data, monitor, configured } => {
                let local_ip = conn.local_ip().map(|a| a.to_canonical());
                if self.conns.len() <= peer {
                    self.conns.resize(peer + 1, None);
                }
                self.conns[peer] = Some(conn);
                self.state.handle_session_up(now, m, peer, data, local_ip, monitor, configured);
            }
            SessionEvent::Unreachable { peer } => self.state.handle_unreachable(now, m, peer),
            SessionEvent::Down { peer } => {
                if let Some(c) = self.conns.get_mut(peer) {
                    *c = None;
                }
                self.state.handle_session_down(now, m, peer);
            }
            SessionEvent::Monitor { peer } => self.state.handle_monitor(now, m, peer),
            SessionEvent::Forget { peer } => {
                if let Some(c) = self.conns.get_mut(peer) {
                    *c = None;
                }
                self.state.handle_forget(now, m, peer);
            }
            SessionEvent::Message { peer, message } => self.state.handle_message(now, unix_now(), m, peer, message),
        }
    }

    /// Carries out what the core decided.
    fn execute(&mut self) {
        while let Some(a) = self.state.poll_action() {
            match a {
                NodeAction::Data(cmd) => {
                    if let Some(k) = &self.kfwd {
                        k.observe(&cmd);
                    }
                    self.dp.command(cmd)
                }
                NodeAction::Send { peer, to, message } => self.send(peer, to, message),
                NodeAction::NeedSession(peer) => self.wants.push(SessionWant::Data(peer)),
                NodeAction::RelayLink { peer, on } => self.wants.push(SessionWant::Want(peer, want::RELAY, on)),
                NodeAction::SendOverlay { to, message, urgent } => self.send_overlay(to, message, urgent),
                NodeAction::Api(d) => {
                    let sock = self.api.iter().find(|s| s.local_addr().is_ok_and(|a| a.is_ipv4() == d.to.is_ipv4())).or_else(|| self.api.first());
                    if let Some(s) = sock {
                        if let Err(e) = s.try_send_to(&d.bytes, d.to) {
                            // The program is gone (port unreachable): forget its subscriptions.
                            tracing::debug!("api: sending to {}: {e}", d.to);
                            self.state.handle_api_unreachable(d.to);
                        }
                    }
                }
                NodeAction::Learned(rec) => self.learned(&rec),
                NodeAction::Forgotten(id) => self.forgotten(id),
                NodeAction::Neighbours(set) => {
                    // The overlay's neighbour choice as session wants (configured peers are
                    // always wanted).
                    for (i, p) in self.model.peers.iter().enumerate().filter(|(_, p)| !p.configured) {
                        self.wants.push(SessionWant::Want(i, want::NEIGHBOUR, set.contains(&p.cfg.node_id)));
                    }
                }
                NodeAction::ProtectChanged => self.kernel_change = true,
                NodeAction::Exits(plan) => {
                    self.model.exits = plan;
                    self.kernel_change = true;
                }
                NodeAction::WatchProtected { net, peer } => {
                    let mut f = self.filter.write().expect("filter");
                    if f.protected.lookup(net.addr()) != Some(&peer) {
                        f.protected.insert(net, peer);
                    }
                }
                NodeAction::WatchOutside(net) => {
                    self.filter.write().expect("filter").outside.insert(net, ());
                }
            }
        }
    }

    /// A management-overlay message on the session with `to` (routed messages before
    /// gossip).
    fn send_overlay(&self, to: crate::identity::NodeId, message: Message, urgent: bool) {
        let conn = self.model.index_of(&to).and_then(|i| self.conns.get(i).cloned().flatten());
        let Some(conn) = conn else { return };
        let frame = Frame { src: self.state.overlay().local(), dst: to, hop_limit: 0, message };
        tokio::spawn(async move {
            if let Err(e) = quic::send_frame_prio(&conn, &frame, urgent).await {
                tracing::debug!("management message to {to}: {e:#}");
            }
        });
    }

    fn send(&self, peer: usize, to: crate::identity::NodeId, message: Message) {
        let Some(conn) = self.conns.get(peer).and_then(|c| c.clone()) else { return };
        let frame = Frame { src: self.model.local, dst: to, hop_limit: 0, message };
        tokio::spawn(async move {
            if let Err(e) = quic::send_frame(&conn, &frame).await {
                tracing::debug!("management message: {e:#}");
            }
        });
    }

    /// What status shows, from the core, now; `peers` is the session table's live state.
    pub fn view(&self, peers: &[PeerInfo]) -> EngineView {
        let now = Instant::now();
        let (m, unix) = (&self.model, unix_now());
        let (routes, relaying, exits) = (self.state.routes(now, unix, m), self.state.relaying(m), self.state.exit_status(now, m));
        let port = self.api.first().and_then(|s| s.local_addr().ok()).map(|a| a.port());
        EngineView { routes, relaying, exits, refusals: self.state.refusals(), late: self.state.late_count(), overlay: mnode::view(m, peers, &self.state, port, now) }
    }

    /// Applies a configuration reload ([`crate::node::reload`]): the model takes `new`,
    /// the node state the new settings; peers removed leave the data plane, the admitted
    /// keys and the session table (their TUN closes); peers added get their TUN, their key
    /// admitted and a session; changed ones their new addresses and prefixes in the data
    /// plane. Unchanged peers are not touched. The kernel follows at the next pass.
    ///
    /// # Errors
    /// As [`Model::reconfigure`] (nothing changed then).
    pub fn reconfigure(&mut self, plan: &crate::node::reload::Plan, new: crate::config::Config) -> Result<crate::node::reload::Moves, String> {
        let moves = self.model.reconfigure(plan, new)?;
        for &i in &moves.removed {
            self.dp.command(DataCommand::DetachTun { peer: i });
            self.dp.command(DataCommand::RemovePeer { peer: i });
            self.allowed.remove(&self.model.peers[i].cfg.public_key);
            if let Some(c) = self.conns.get_mut(i) {
                *c = None;
            }
            self.wants.push(SessionWant::Removed(i));
        }
        for &i in &moves.added {
            if moves.had_tun.contains(&i) {
                self.dp.command(DataCommand::DetachTun { peer: i });
            }
            let p = &self.model.peers[i].cfg;
            self.dp.command(DataCommand::AddPeer { peer: i, spec: self.model.peer_spec(i) });
            match crate::shell::datapath::open_tun(&p.interface) {
                Ok(dev) => self.dp.attach_tun(i, dev, usize::from(p.inner_mtu())),
                Err(e) => tracing::warn!("peer {}: {e:#}; its traffic uses the aggregate interface", p.name),
            }
            self.allowed.insert(p.public_key);
            self.wants.push(SessionWant::Want(i, want::CONFIGURED, true));
        }
        for &i in &moves.changed {
            self.dp.command(DataCommand::AddPeer { peer: i, spec: self.model.peer_spec(i) });
        }
        self.state.reconfigure(Instant::now(), &self.model, plan, &moves);
        self.model_changed = true;
        self.kernel_change = true;
        self.execute();
        Ok(moves)
    }

    /// Applies a record the overlay learned: a new or changed peer in the model and the
    /// data plane, its key admitted to management sessions, the kernel to follow.
    fn learned(&mut self, rec: &NodeRecord) {
        let learned = self.model.learn(rec);
        match learned {
            Learned::New(i) | Learned::Changed(i) => {
                self.dp.command(DataCommand::AddPeer { peer: i, spec: self.model.peer_spec(i) });
                self.allowed.insert(self.model.peers[i].cfg.public_key);
                self.model_changed = true;
                if matches!(learned, Learned::New(_)) {
                    tracing::info!("directory: learned node {} ({})", rec.name(), rec.node_id);
                }
            }
            Learned::Same(_) | Learned::Ignored => {}
        }
    }

    /// Applies a record that expired: the peer leaves the model, the data plane, the
    /// admitted keys and the session table.
    fn forgotten(&mut self, id: NodeId) {
        if let Some(i) = self.model.forget(&id) {
            tracing::info!("directory: node {id} expired");
            self.wants.push(SessionWant::Forgotten(i));
            self.dp.command(DataCommand::RemovePeer { peer: i });
            self.allowed.remove(&self.model.peers[i].cfg.public_key);
            self.model_changed = true;
        }
    }
}
