//! The management overlay task: drives the [`Overlay`] core with session events, messages
//! and ticks, carries out what it asks (frames on sessions, new peers for the data plane,
//! neighbour sessions), and serves the local UDP API ([`crate::overlay::api`]).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};

use crate::ctl::{NeighbourRow, NodeRow};
use crate::dataplane::DataCommand;
use crate::identity::{Identity, NodeId};
use crate::node::model::Learned;
use crate::overlay::api_server::{ApiServer, Datagram};
use crate::overlay::directory::NodeRecord;
use crate::overlay::{Out, Overlay, OverlayConfig, OwnInfo};
use crate::shell::daemon::Shared;
use crate::shell::peers::{self, want};
use crate::shell::quic;
use crate::shell::supervise::{self, Part};
use crate::wire::mgmt::{Frame, Message};

/// Shortest sleep between two ticks of the core.
const MIN_WAKE: Duration = Duration::from_millis(5);

/// Events for the management overlay task.
#[derive(Debug)]
pub enum OverlayEvent {
    /// A management session is up.
    SessionUp {
        /// The node.
        node: NodeId,
        /// A configured peer.
        configured: bool,
    },
    /// The session closed.
    SessionDown {
        /// The node.
        node: NodeId,
    },
    /// A dial to a node that is not a configured peer failed (no endpoint answered within
    /// the dial timeout, or the handshake failed).
    Unreachable {
        /// The node.
        node: NodeId,
    },
    /// Whether the session with a node may carry routed messages (from the failover
    /// engine: not while its monitored direct path is down).
    Usable {
        /// The node.
        node: NodeId,
        /// False while the direct path is down.
        usable: bool,
    },
    /// A management message for the overlay.
    Message {
        /// The neighbour it came from.
        from: NodeId,
        /// The message.
        message: Message,
    },
}

/// What status output shows of the management overlay (refreshed by the task).
#[derive(Debug, Clone, Default)]
pub struct OverlayView {
    /// `detourctl nodes`.
    pub nodes: Vec<NodeRow>,
    /// `detourctl status`, management section.
    pub status: crate::ctl::ManagementStatus,
}

/// The wall clock in unix seconds (0 before 1970).
pub(crate) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The overlay task's state.
pub struct Node {
    shared: Arc<Shared>,
    core: Overlay,
    api: Vec<Arc<UdpSocket>>,
    /// The local API server (core): subscriptions, limits, reports.
    server: ApiServer,
    since: HashMap<NodeId, Instant>,
    last_info: Instant,
}

/// The underlay endpoints this node publishes: the configured `advertise` list, else the
/// explicit listen addresses, else this host's global addresses (not loopback, link-local,
/// multicast, detour's overlay or link addresses), each with the data port.
pub fn endpoints(shared: &Shared) -> Vec<SocketAddr> {
    let m = shared.model.read().expect("model");
    let n = &m.cfg.node;
    if !n.advertise.is_empty() {
        return n.advertise.clone();
    }
    let listen: Vec<IpAddr> = n.listen.iter().copied().filter(|a| !a.is_unspecified()).collect();
    let addrs: Vec<IpAddr> = if listen.is_empty() { shared.local_addrs.lock().expect("addrs").iter().copied().collect() } else { listen };
    let pool = m.cfg.kernel.link_pool_v4;
    let mut v: Vec<SocketAddr> = addrs
        .into_iter()
        .map(|a| a.to_canonical())
        .filter(|a| !a.is_loopback() && !a.is_multicast() && !a.is_unspecified())
        .filter(|a| match a {
            IpAddr::V4(v) => !v.is_link_local() && !pool.contains(v) && !n.overlay_v4.is_some_and(|o| o.contains(v)),
            IpAddr::V6(v) => (v.segments()[0] & 0xffc0) != 0xfe80 && !n.overlay_v6.is_some_and(|o| o.contains(v)),
        })
        .map(|a| SocketAddr::new(a, n.data_port))
        .collect();
    v.sort();
    v
}

fn own_info(shared: &Shared) -> OwnInfo {
    let endpoints = endpoints(shared);
    let m = shared.model.read().expect("model");
    let n = &m.cfg.node;
    OwnInfo {
        name: n.name.clone(),
        endpoints,
        overlay_v4: n.overlay_v4.map(|v| v.addr()),
        overlay_v6: n.overlay_v6.map(|v| v.addr()),
        prefixes: n.prefixes.clone(),
        relay: n.policy.commitment != crate::node::policy::Commitment::Never,
        uptime: Some(n.policy.lifespan),
        networks: n.networks.clone(),
        policy: Some(n.policy.clone()),
    }
}

impl Node {
    /// Builds the task's state; `api` are the bound API sockets (none when off).
    pub fn new(shared: Arc<Shared>, identity: Identity, api: Vec<UdpSocket>) -> Node {
        let (cfg, rate) = {
            let m = shared.model.read().expect("model");
            let mc = &m.cfg.management;
            (OverlayConfig { min_neighbours: mc.min_neighbours, max_neighbours: mc.max_neighbours, target_delivery: mc.target_delivery, ..Default::default() }, mc.api_rate)
        };
        let info = own_info(&shared);
        let core = Overlay::new(identity, cfg, info, Instant::now(), unix_now(), rand::random());
        Node { shared, core, api: api.into_iter().map(Arc::new).collect(), server: ApiServer::new(rate), since: HashMap::new(), last_info: Instant::now() }
    }

    /// Runs until shutdown.
    /// Status (`detourctl nodes`, the management section of `status`) is built only when
    /// asked for on `refresh`.
    pub async fn run(mut self, mut events: mpsc::UnboundedReceiver<OverlayEvent>, mut refresh: mpsc::UnboundedReceiver<oneshot::Sender<()>>) {
        let mut shutdown = self.shared.shutdown.clone();
        let (api_tx, mut api_rx) = mpsc::channel::<(usize, SocketAddr, Vec<u8>)>(1024);
        for (i, s) in self.api.iter().enumerate() {
            let s = s.clone();
            let tx = api_tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65_536];
                loop {
                    match s.recv_from(&mut buf).await {
                        Ok((n, from)) => {
                            if tx.send((i, from, buf[..n].to_vec())).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => tracing::debug!("api socket: {e}"),
                    }
                }
            });
        }
        drop(api_tx);
        let test_panic = supervise::panic_after(Part::Overlay, supervise::test_panic_after(Part::Overlay));
        tokio::pin!(test_panic);
        loop {
            self.shared.health.beat(Part::Overlay);
            // Woken when the core asks (about once a second while idle; within 100 ms for
            // records to pass on and retransmissions), and every 2 s to refresh what this
            // node publishes about itself.
            let wake = self.core.poll_timeout().min(self.last_info + Duration::from_secs(2)).max(Instant::now() + MIN_WAKE);
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = &mut test_panic => {}
                Some(ev) = events.recv() => self.on_event(ev),
                Some(done) = refresh.recv() => {
                    self.publish_view(Instant::now());
                    let _ = done.send(());
                }
                Some((_, from, data)) = api_rx.recv() => self.on_api(from, &data).await,
                _ = tokio::time::sleep_until(wake.into()) => {
                    let now = Instant::now();
                    self.core.tick(now, unix_now());
                    if now >= self.last_info + Duration::from_secs(2) {
                        self.last_info = now;
                        self.core.set_info(own_info(&self.shared));
                    }
                }
            }
            for id in self.shared.refused.take_recent() {
                self.core.seek(Instant::now(), id);
            }
            self.drain().await;
        }
    }

    fn on_event(&mut self, ev: OverlayEvent) {
        let now = Instant::now();
        match ev {
            OverlayEvent::SessionUp { node, configured } => {
                self.since.insert(node, now);
                self.core.session_up(now, node, configured);
            }
            OverlayEvent::SessionDown { node } => {
                self.since.remove(&node);
                self.core.session_down(node);
            }
            OverlayEvent::Unreachable { node } => self.core.unreachable(now, node),
            OverlayEvent::Usable { node, usable } => self.core.set_usable(now, node, usable),
            OverlayEvent::Message { from, message } => self.core.handle(now, unix_now(), from, message),
        }
    }

    async fn drain(&mut self) {
        while let Some(o) = self.core.poll() {
            match o {
                Out::Send { to, message, urgent } => self.send_frame(to, message, urgent),
                Out::Deliver { src, channel, payload } => self.deliver(src, channel, payload).await,
                Out::Delivered { id } => self.report(id, true).await,
                Out::Failed { id } => self.report(id, false).await,
                Out::Learned(rec) => self.learned(&rec),
                Out::Forgotten(id) => self.forgotten(id),
                Out::Neighbours(set) => {
                    let m = self.shared.model.read().expect("model");
                    let wanted: Vec<(usize, bool)> = m.peers.iter().enumerate().filter(|(_, p)| !p.configured).map(|(i, p)| (i, set.contains(&p.cfg.node_id))).collect();
                    drop(m);
                    for (i, on) in wanted {
                        peers::set_want(&self.shared, i, want::NEIGHBOUR, on);
                    }
                }
                Out::NameLost { name, holder } => tracing::warn!("name {name} is held by node {holder}, which registered it earlier; this node no longer publishes it"),
            }
        }
    }

    fn send_frame(&self, to: NodeId, message: Message, urgent: bool) {
        let conn = {
            let m = self.shared.model.read().expect("model");
            m.index_of(&to).and_then(|i| self.shared.peers.lock().expect("peers").get(i).and_then(|p| p.conn.clone()))
        };
        let Some(conn) = conn else { return };
        let frame = Frame { src: self.core.local(), dst: to, hop_limit: 0, message };
        tokio::spawn(async move {
            if let Err(e) = quic::send_frame_prio(&conn, &frame, urgent).await {
                tracing::debug!("management message to {to}: {e:#}");
            }
        });
    }

    fn learned(&mut self, rec: &NodeRecord) {
        let learned = self.shared.model.write().expect("model").learn(rec);
        match learned {
            Learned::New(i) | Learned::Changed(i) => {
                let spec = self.shared.model.read().expect("model").peer_spec(i);
                self.shared.dp.command(DataCommand::AddPeer { peer: i, spec });
                if let Ok(k) = rec.public_key.parse() {
                    self.shared.allowed.insert(k);
                }
                peers::grow(&self.shared);
                self.shared.kernel.notify_one();
                if matches!(learned, Learned::New(_)) {
                    tracing::info!("directory: learned node {} ({})", rec.name(), rec.node_id);
                }
            }
            Learned::Same(_) | Learned::Ignored => {}
        }
    }

    fn forgotten(&mut self, id: NodeId) {
        let gone = self.shared.model.write().expect("model").forget(&id);
        if let Some(i) = gone {
            tracing::info!("directory: node {id} expired");
            peers::forgotten(&self.shared, i);
            self.shared.dp.command(DataCommand::RemovePeer { peer: i });
            let key = self.shared.model.read().expect("model").peers[i].cfg.public_key;
            self.shared.allowed.remove(&key);
            self.shared.kernel.notify_one();
        }
    }

    /// Sends datagrams to local programs, each from the API socket of its address family;
    /// a program that is gone (port unreachable) loses its subscriptions.
    async fn send_api(&mut self, out: Vec<Datagram>) {
        for d in out {
            let sock = self.sock_for(&d.to);
            let Some(s) = self.api.get(sock).or_else(|| self.api.first()) else { continue };
            if let Err(e) = s.send_to(&d.bytes, d.to).await {
                tracing::debug!("api: sending to {}: {e}", d.to);
                self.server.unreachable(d.to);
            }
        }
    }

    /// The API socket of the client's address family.
    fn sock_for(&self, to: &SocketAddr) -> usize {
        self.api.iter().position(|s| s.local_addr().is_ok_and(|a| a.is_ipv4() == to.is_ipv4())).unwrap_or(0)
    }

    async fn deliver(&mut self, src: NodeId, channel: u16, payload: Vec<u8>) {
        let out = self.server.deliver(Instant::now(), src, channel, payload);
        self.send_api(out).await;
    }

    async fn report(&mut self, id: u64, delivered: bool) {
        let out = self.server.report(id, delivered);
        self.send_api(out.into_iter().collect()).await;
    }

    async fn on_api(&mut self, from: SocketAddr, data: &[u8]) {
        let reply = self.server.handle_datagram(Instant::now(), unix_now(), from, data, &mut self.core);
        self.send_api(vec![reply]).await;
    }

    fn publish_view(&mut self, now: Instant) {
        let unix = unix_now() as i64;
        let local = self.core.local();
        let sessions: HashSet<NodeId> = self.core.sessions().map(|(id, _, _)| *id).collect();
        let mut nodes: Vec<NodeRow> = self
            .core
            .directory()
            .entries()
            .map(|e| {
                let r = &e.record;
                NodeRow {
                    name: r.name().to_string(),
                    names: r.names.iter().map(|n| n.name.clone()).collect(),
                    node_id: r.node_id.to_string(),
                    endpoints: r.endpoints.iter().map(|a| a.to_string()).collect(),
                    overlay_addresses: [r.overlay_v4.map(|a| a.to_string()), r.overlay_v6.map(|a| a.to_string())].into_iter().flatten().collect(),
                    prefixes: r.prefixes.iter().map(|p| p.to_string()).collect(),
                    relay: r.relay,
                    uptime: r.uptime.as_str().into(),
                    policy: {
                        let p = r.policy();
                        let mut v = vec![format!("{}/{}", p.commitment.as_str(), p.priority)];
                        if p.willing.internet {
                            v.push("exit".into());
                        }
                        if p.willing.internet_masquerade {
                            v.push("masq-exit".into());
                        }
                        if !r.networks.is_empty() {
                            v.push(format!("networks {}", r.networks.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(",")));
                        }
                        v.join(" ")
                    },
                    neighbours: r.neighbours.len(),
                    seq: r.seq,
                    expires_in_s: r.expires as i64 - unix,
                    local: r.node_id == local,
                    session: sessions.contains(&r.node_id),
                }
            })
            .collect();
        nodes.sort_by(|a, b| (!a.local, &a.name).cmp(&(!b.local, &b.name)));
        let chosen: HashSet<NodeId> = self.core.chosen().copied().collect();
        let (m, peers) = (self.shared.model.read().expect("model"), self.shared.peers.lock().expect("peers"));
        let neighbours: Vec<NeighbourRow> = self
            .core
            .sessions()
            .map(|(id, configured, usable)| {
                let i = m.index_of(id);
                let info = i.and_then(|i| peers.get(i));
                let role = if configured {
                    "configured"
                } else if chosen.contains(id) {
                    "neighbour"
                } else if info.is_some_and(|p| p.want & want::DATA != 0) {
                    "on-demand"
                } else {
                    "inbound"
                };
                NeighbourRow {
                    name: i.map(|i| m.peers[i].cfg.name.clone()).unwrap_or_else(|| id.short()),
                    node_id: id.to_string(),
                    role: role.into(),
                    state: if usable { "up".into() } else { "unusable".into() },
                    rtt_ms: info.and_then(|p| p.conn.as_ref()).filter(|c| c.close_reason().is_none()).map(|c| c.rtt().as_secs_f64() * 1000.0),
                    since_s: self.since.get(id).map(|t| now.saturating_duration_since(*t).as_secs_f64()),
                }
            })
            .collect();
        drop(peers);
        drop(m);
        let status = crate::ctl::ManagementStatus {
            directory_nodes: self.core.directory().len(),
            target_neighbours: self.core.target_neighbours(),
            neighbours_missing: chosen.iter().filter(|id| !sessions.contains(*id)).count(),
            availability: self.core.availability(),
            neighbours,
            rejected_records: self.core.rejected().into_iter().filter(|(k, _)| *k != "duplicate").map(|(k, v)| (k.to_string(), v)).collect(),
            duplicate_records: self.core.rejected().into_iter().find(|(k, _)| *k == "duplicate").map(|(_, v)| v).unwrap_or(0),
            flood_prunes: self.core.stats().prunes_sent,
            flood_grafts: self.core.stats().grafts_sent,
            records_published: self.core.stats().records_published,
            records_accepted: self.core.stats().records_accepted,
            pending_messages: self.core.router().pending(),
            retransmissions: self.core.router().retries(),
            routing_drops: self.core.router().drops().iter().map(|(k, v)| (format!("{k:?}").to_lowercase(), *v)).collect(),
            names: self.core.names().iter().map(|n| n.name.clone()).collect(),
            api: self.server.status(self.api.first().and_then(|sock| sock.local_addr().ok()).map(|a| a.port())),
        };
        *self.shared.overlay_view.lock().expect("view") = OverlayView { nodes, status };
    }
}
