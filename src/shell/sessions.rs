//! Management sessions with peers, configured or learned from the directory, driven by the
//! daemon's loop: who gets a session ([`crate::node::sessions`], the core's want rules),
//! each peer's [`PeerSession`] (dial, backoff, which of two crossing connections stays),
//! the per-peer interfaces of links in use, and the silence watch. Everything here runs
//! on the loop, between two events; the only tasks are the QUIC operations themselves
//! (a dial, the Hello exchange and the wait for the close, reading a session's messages),
//! which report back with a [`PeerEvent`].
//!
//! A peer is **wanted** for one or more reasons: it is configured (always), the management
//! overlay chose it as a neighbour, a relay session this node serves needs it, or
//! forwarding traffic uses the link (since the data path asked for a session, until
//! [`crate::config::ManagementConfig::idle_timeout`] passes without traffic). A wanted
//! peer is dialled (with backoff); a peer that is not wanted keeps a session only while the
//! other side holds it open (the side that dialled closes it when it no longer wants it).
//! Links that carry forwarding traffic get their own TUN and path monitoring; it goes away
//! with the traffic.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use crate::config::Endpoint;
use crate::dataplane::DataCommand;
use crate::identity::NodeId;
use crate::node::model::Model;
use crate::overlay::admission::{Admission, AdmissionConfig, AdmissionCounters, Admit, Refusal};
use crate::overlay::session::{Heard, PeerSession, SessionTimers, Silence, Verdict};
use crate::shell::datapath::{open_tun, DataPath};
use crate::shell::quic::{self, Management};
use crate::wire::mgmt::{Frame, Message};
use crate::wire::SessionSecrets;

pub use crate::node::sessions::want;
use crate::node::sessions::{Activity, LinkState, WantChange};

/// How far a node spreads the first dials to its configured peers, per configured peer
/// (ms): a node with 99 peers spreads them over about a second.
pub const FIRST_DIAL_SPREAD_PER_PEER_MS: u64 = 10;
/// The most a first dial waits (ms).
pub const FIRST_DIAL_SPREAD_MAX_MS: u64 = 2_000;

/// The QUIC close code for a session closed because neither side needs it any more.
pub const CLOSE_IDLE: u32 = 5;
/// How often [`Sessions::check_silence`] runs: a poll goes out within this long of the
/// silence that calls for it, and a dead session is closed within this long of its timeout.
pub const SILENCE_CHECK: Duration = Duration::from_millis(500);
/// Silence checks further apart than this mean this node was late.
pub const SILENCE_LATE: Duration = Duration::from_secs(2);

/// Live state of one peer, for the daemon and status output.
#[derive(Default)]
pub struct PeerInfo {
    /// `up`, `connecting`, `backoff` or `down`.
    pub state: &'static str,
    /// When the current session became usable.
    pub since: Option<Instant>,
    /// The session whose keys the data plane uses.
    pub conn: Option<quinn::Connection>,
    /// The peer's data-port address of that session.
    pub endpoint: Option<SocketAddr>,
    /// Sessions established since start.
    pub sessions: u64,
    /// Why the peer is wanted, and its link's traffic (the core's session-want rules).
    pub link: LinkState,
    /// Its session state machine and connections, while it is wanted or a connection
    /// lives.
    slot: Option<Slot>,
    /// Receive silence of the current session ([`Sessions::check_silence`]).
    silence: Option<Silence>,
}

/// A peer's session machine and its QUIC connections.
struct Slot {
    sess: PeerSession,
    conns: HashMap<u64, quinn::Connection>,
    /// The connection whose keys the data plane has.
    ready: Option<u64>,
    /// Its entry in [`Sessions::timers`].
    wake: Option<Instant>,
}

/// What the QUIC tasks report to the loop.
pub enum PeerEvent {
    /// An accepted connection completed its handshake (its key is looked up in the model).
    Incoming(quinn::Connection),
    /// A dial to peer `peer` ended (with a connection or not).
    Dialed {
        /// Peer index.
        peer: usize,
        /// The connection.
        conn: Option<quinn::Connection>,
    },
    /// The Hello exchange on a connection finished: its keys and the peer's data port.
    Ready {
        /// Peer index.
        peer: usize,
        /// The connection's stable ID.
        conn: u64,
        /// Data-plane keys.
        secrets: SessionSecrets,
        /// The peer's data port.
        data_port: u16,
        /// The peer's address on this connection.
        remote: SocketAddr,
    },
    /// A connection closed; `refused`: the peer refused this node's key (it does not know
    /// this node yet).
    Closed {
        /// Peer index.
        peer: usize,
        /// The connection's stable ID.
        conn: u64,
        /// Why, in words.
        reason: String,
        /// The peer refused this node's key.
        refused: bool,
    },
    /// A management message from a peer.
    Message {
        /// Peer index.
        peer: usize,
        /// The message.
        message: Message,
    },
}

/// What the sessions tell the node state ([`crate::shell::engine::Engine::on_session`]).
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
        /// A configured peer.
        configured: bool,
    },
    /// A session to a node that is not a configured peer could not be set up.
    Unreachable {
        /// Peer index.
        peer: usize,
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

/// Completed management handshakes: the total and those of the last minute (a node
/// whose sessions are set up and torn down in a loop shows it here).
#[derive(Debug, Default)]
pub struct Handshakes {
    /// Since start.
    pub total: u64,
    recent: VecDeque<Instant>,
}

impl Handshakes {
    /// Counts one handshake at `now`.
    pub fn count(&mut self, now: Instant) {
        self.total += 1;
        self.recent.push_back(now);
        self.trim(now);
    }

    /// Handshakes in the minute before `now`.
    pub fn last_minute(&mut self, now: Instant) -> u64 {
        self.trim(now);
        self.recent.len() as u64
    }

    fn trim(&mut self, now: Instant) {
        while self.recent.front().is_some_and(|t| now.saturating_duration_since(*t) > Duration::from_secs(60)) {
            self.recent.pop_front();
        }
        // Bounded even under a handshake flood.
        while self.recent.len() > 100_000 {
            self.recent.pop_front();
        }
    }
}

/// Every peer's session, owned by the daemon's loop.
pub struct Sessions {
    peers: Vec<PeerInfo>,
    /// Dials due: (when, peer).
    timers: BTreeSet<(Instant, usize)>,
    events: mpsc::UnboundedSender<PeerEvent>,
    mgmt: Arc<Management>,
    dp: Arc<DataPath>,
    /// Failed management handshakes and sessions closed for protocol errors.
    mgmt_errors: Arc<AtomicU64>,
    /// Completed management handshakes.
    pub handshakes: Handshakes,
    /// Session changes for the node state, in order.
    out: Vec<SessionEvent>,
    /// The model changed (a link's TUN came or went): the kernel must follow.
    model_changed: bool,
    shutdown: watch::Receiver<bool>,
}

impl Sessions {
    /// No sessions yet; the QUIC tasks report on `events`.
    pub fn new(mgmt: Arc<Management>, dp: Arc<DataPath>, mgmt_errors: Arc<AtomicU64>, events: mpsc::UnboundedSender<PeerEvent>, shutdown: watch::Receiver<bool>) -> Sessions {
        Sessions { peers: Vec::new(), timers: BTreeSet::new(), events, mgmt, dp, mgmt_errors, handshakes: Handshakes::default(), out: Vec::new(), model_changed: false, shutdown }
    }

    /// Live state per peer index (shorter than the model's peers until they are used).
    pub fn peers(&self) -> &[PeerInfo] {
        &self.peers
    }

    /// Session changes since the last call, for [`crate::shell::engine::Engine::on_session`].
    pub fn take_events(&mut self) -> Vec<SessionEvent> {
        std::mem::take(&mut self.out)
    }

    /// Whether a link's TUN came or went since the last call.
    pub fn take_model_changed(&mut self) -> bool {
        std::mem::take(&mut self.model_changed)
    }

    /// When [`Sessions::on_timer`] must run: the next dial due.
    pub fn next_wake(&self) -> Option<Instant> {
        self.timers.first().map(|(t, _)| *t)
    }

    fn grow(&mut self, m: &Model) {
        while self.peers.len() < m.peers.len() {
            self.peers.push(PeerInfo { state: "down", ..Default::default() });
        }
    }

    /// Adds or removes a reason for wanting peer `i`; a peer that becomes wanted is dialled.
    pub fn set_want(&mut self, m: &Model, i: usize, bit: u8, on: bool) {
        self.grow(m);
        let Some(p) = self.peers.get_mut(i) else { return };
        let change = p.link.set_want(bit, on);
        if change == WantChange::Same && (p.slot.is_some() || !p.link.wanted()) {
            return;
        }
        if p.slot.is_none() && p.link.wanted() {
            p.slot = Some(new_slot(m, i));
        }
        self.settle(m, i, Instant::now());
    }

    /// Starts the dials that are due.
    pub fn on_timer(&mut self, m: &Model, now: Instant) {
        while let Some(&(t, i)) = self.timers.first() {
            if t > now {
                break;
            }
            self.timers.pop_first();
            if let Some(s) = self.peers.get_mut(i).and_then(|p| p.slot.as_mut()) {
                s.wake = None;
            }
            self.settle(m, i, now);
        }
    }

    /// One report of a QUIC task.
    pub fn on_event(&mut self, m: &Model, ev: PeerEvent) {
        let now = Instant::now();
        self.grow(m);
        match ev {
            PeerEvent::Incoming(conn) => {
                self.handshakes.count(now);
                let Some(i) = quic::peer_key(&conn).and_then(|k| m.index_of(&k.node_id())) else {
                    conn.close(quic::close::PROTOCOL.into(), b"unknown key");
                    return;
                };
                let p = &mut self.peers[i];
                if p.slot.is_none() {
                    // Not wanted here: the session lives while the other side keeps it.
                    p.slot = Some(new_slot(m, i));
                }
                self.connection(m, i, now, conn);
            }
            PeerEvent::Dialed { peer, conn: Some(conn) } if conn.close_reason().is_none() => {
                self.handshakes.count(now);
                if self.peers[peer].slot.is_some() {
                    self.connection(m, peer, now, conn);
                } else {
                    conn.close(CLOSE_IDLE.into(), b"idle");
                }
            }
            PeerEvent::Dialed { peer, .. } => {
                let configured = m.peers[peer].configured;
                if let Some(s) = self.peers[peer].slot.as_mut() {
                    s.sess.on_dial_failed(now, rand::random());
                }
                if !configured {
                    // A chosen neighbour that cannot be reached is replaced at once.
                    self.out.push(SessionEvent::Unreachable { peer });
                }
                self.settle(m, peer, now);
            }
            PeerEvent::Ready { peer, conn, secrets, data_port, remote } => self.ready(m, peer, now, conn, secrets, data_port, remote),
            PeerEvent::Closed { peer, conn, reason, refused } => self.closed(m, peer, now, conn, &reason, refused),
            PeerEvent::Message { peer, message } => self.out.push(SessionEvent::Message { peer, message }),
        }
    }

    /// A connection with peer `i` completed its handshake: kept or refused (two that
    /// crossed: the one the lower node ID dialled stays), and the Hello exchange started.
    fn connection(&mut self, m: &Model, i: usize, now: Instant, conn: quinn::Connection) {
        let local = m.local;
        let peer_id = m.peers[i].cfg.node_id;
        let configured = m.peers[i].configured;
        let name = m.peers[i].cfg.name.clone();
        let Some(slot) = self.peers[i].slot.as_mut() else { return };
        let dialled = conn.side() == quinn::Side::Client;
        let id = conn.stable_id() as u64;
        let initiator = if dialled { local } else { peer_id };
        match slot.sess.on_connection(now, id, initiator, dialled) {
            Verdict::Adopt { replaced } => {
                if let Some(old) = replaced.and_then(|r| slot.conns.remove(&r)) {
                    old.close(quic::close::REPLACED.into(), b"replaced");
                }
                slot.conns.insert(id, conn.clone());
                let (mgmt, errors, tx) = (self.mgmt.clone(), self.mgmt_errors.clone(), self.events.clone());
                tokio::spawn(async move {
                    match mgmt.hello(&conn, peer_id, dialled).await {
                        Ok((secrets, data_port, _)) => {
                            let remote = conn.remote_address();
                            let _ = tx.send(PeerEvent::Ready { peer: i, conn: id, secrets, data_port, remote });
                        }
                        Err(e) => {
                            let expected = match conn.close_reason() {
                                Some(quinn::ConnectionError::LocallyClosed) => true,
                                Some(quinn::ConnectionError::ApplicationClosed(c)) => [quic::close::REPLACED, quic::close::DUPLICATE, CLOSE_IDLE].map(u64::from).contains(&u64::from(c.error_code)),
                                _ => false,
                            };
                            if expected {
                                tracing::debug!("session attempt with peer {i} superseded: {e:#}");
                            } else if configured {
                                errors.fetch_add(1, Relaxed);
                                tracing::warn!("session with {name}: {e:#}");
                            } else {
                                // A node that joined a moment ago may not know this node's
                                // key yet: expected, retried with backoff.
                                errors.fetch_add(1, Relaxed);
                                tracing::debug!("session with {name}: {e:#}");
                            }
                            conn.close(quic::close::PROTOCOL.into(), b"hello failed");
                        }
                    }
                    let reason = conn.closed().await;
                    let _ = tx.send(PeerEvent::Closed { peer: i, conn: id, reason: reason.to_string(), refused: quic::refused_by_peer(&reason) });
                });
            }
            Verdict::Refuse => conn.close(quic::close::DUPLICATE.into(), b"duplicate"),
        }
        self.settle(m, i, now);
    }

    /// The Hello exchange on connection `conn` of peer `i` finished: if it is still the
    /// current one, its keys go to the data plane and the node state hears of the session.
    #[allow(clippy::too_many_arguments)]
    fn ready(&mut self, m: &Model, i: usize, now: Instant, conn: u64, secrets: SessionSecrets, data_port: u16, remote: SocketAddr) {
        let configured = m.peers[i].configured;
        let p = &mut self.peers[i];
        let Some(slot) = p.slot.as_mut() else { return };
        if slot.sess.current().map(|c| c.0) != Some(conn) {
            return;
        }
        slot.sess.on_ready(conn);
        let data = SocketAddr::new(remote.ip().to_canonical(), data_port);
        self.dp.command(DataCommand::InstallSession { peer: i, secrets });
        slot.ready = Some(conn);
        let Some(c) = slot.conns.get(&conn).cloned() else { return };
        p.since = Some(now);
        p.conn = Some(c.clone());
        p.endpoint = Some(data);
        p.sessions += 1;
        let monitor = configured || p.link.want & want::DATA != 0;
        self.out.push(SessionEvent::Up { peer: i, conn: c.clone(), data, monitor, configured });
        tokio::spawn(read_messages(i, c, m.local, m.peers[i].cfg.node_id, self.events.clone(), self.mgmt_errors.clone(), self.shutdown.clone()));
        tracing::info!("session with {} up (data endpoint {data})", m.peers[i].cfg.name);
        self.settle(m, i, now);
    }

    /// Connection `conn` of peer `i` closed.
    fn closed(&mut self, m: &Model, i: usize, now: Instant, conn: u64, reason: &str, refused: bool) {
        let configured = m.peers[i].configured;
        let name = &m.peers[i].cfg.name;
        let p = &mut self.peers[i];
        let Some(slot) = p.slot.as_mut() else { return };
        slot.conns.remove(&conn);
        let failed = slot.sess.on_closed(now, conn, rand::random());
        if failed && refused && !configured {
            // The peer does not know this node yet (it chose the peer from a directory
            // that reached it first); the peer asks for this node's record now
            // (Overlay::seek). Dialled again after the backoff, which grows at each
            // refusal; replaced only if it never connects within the overlay's patience.
            tracing::debug!("{name} does not know this node yet: trying again");
        } else if failed && !configured {
            // The Hello failed: a chosen neighbour is replaced, as after a failed dial.
            self.out.push(SessionEvent::Unreachable { peer: i });
        }
        if slot.ready == Some(conn) {
            slot.ready = None;
            p.conn = None;
            self.out.push(SessionEvent::Down { peer: i });
            if configured || !reason.contains("idle") {
                tracing::info!("session with {name} down: {reason}");
            } else {
                tracing::debug!("session with {name} closed: {reason}");
            }
        }
        self.settle(m, i, now);
    }

    /// After anything happened to peer `i`: a wanted peer is dialled when its session
    /// machine says so; one that is not wanted closes what this side dialled, and once
    /// no connection is left its slot goes (a directory node is forgotten by the node
    /// state: no more monitoring).
    fn settle(&mut self, m: &Model, i: usize, now: Instant) {
        let configured = m.peers[i].configured;
        let p = &mut self.peers[i];
        let wanted = p.link.wanted();
        let Some(slot) = p.slot.as_mut() else {
            p.state = "down";
            return;
        };
        if wanted && slot.sess.poll_dial(now) {
            let cfg = &m.peers[i].cfg;
            let (key, endpoints, name) = (cfg.public_key, cfg.endpoints.clone(), cfg.name.clone());
            let (mgmt, tx) = (self.mgmt.clone(), self.events.clone());
            tokio::spawn(async move {
                let addrs = resolve(&endpoints).await;
                let conn = if addrs.is_empty() {
                    None
                } else {
                    match mgmt.dial(key, &addrs).await {
                        Ok(c) => Some(c),
                        Err(e) => {
                            tracing::debug!("dialling {name}: {e:#}");
                            None
                        }
                    }
                };
                let _ = tx.send(PeerEvent::Dialed { peer: i, conn });
            });
        }
        if !wanted {
            // Close what this side dialled; keep what the other side holds open.
            for c in slot.conns.values().filter(|c| c.side() == quinn::Side::Client) {
                c.close(CLOSE_IDLE.into(), b"idle");
            }
            if slot.conns.is_empty() {
                if let Some(w) = slot.wake {
                    self.timers.remove(&(w, i));
                }
                p.slot = None;
                p.state = "down";
                if !configured {
                    self.out.push(SessionEvent::Forget { peer: i });
                }
                return;
            }
        }
        p.state = slot.sess.state_name();
        let wake = slot.sess.next_timeout().filter(|_| wanted);
        if wake != slot.wake {
            if let Some(w) = slot.wake {
                self.timers.remove(&(w, i));
            }
            if let Some(w) = wake {
                self.timers.insert((w, i));
            }
            slot.wake = wake;
        }
    }

    /// The data path has packets for peer `i` and no session: the link is in use.
    pub fn need_session(&mut self, m: &mut Model, i: usize) {
        if m.peers.get(i).is_some_and(|p| p.present) {
            self.activate(m, i, Instant::now());
        }
    }

    /// Marks the link to directory node `i` as carrying forwarding traffic: it gets a TUN,
    /// a session and path monitoring.
    fn activate(&mut self, m: &mut Model, i: usize, now: Instant) {
        self.grow(m);
        if !self.peers[i].link.traffic(now) {
            return;
        }
        let p = &m.peers[i];
        let (name, mtu, configured) = (p.cfg.interface.clone(), usize::from(p.cfg.inner_mtu()), p.configured);
        if !configured {
            match open_tun(&name) {
                Ok(dev) => {
                    self.dp.attach_tun(i, dev, mtu);
                    m.set_tun(i, true);
                    self.model_changed = true;
                    tracing::info!("link to {} in use: interface {name}", m.peers[i].cfg.name);
                }
                Err(e) => tracing::warn!("link to {}: {e:#}; its traffic uses the aggregate interface", m.peers[i].cfg.name),
            }
        }
        self.set_want(m, i, want::DATA, true);
        if self.peers[i].conn.is_some() {
            self.out.push(SessionEvent::Monitor { peer: i });
        }
    }

    fn deactivate(&mut self, m: &mut Model, i: usize) {
        if m.set_tun(i, false) {
            self.dp.command(DataCommand::DetachTun { peer: i });
            self.model_changed = true;
            tracing::info!("link to {} idle: interface removed", m.peers[i].cfg.name);
        }
        self.grow(m);
        self.peers[i].link.idle();
        self.set_want(m, i, want::DATA, false);
    }

    /// Finds links to directory nodes whose traffic started or stopped (every second or so).
    pub fn check_activity(&mut self, m: &mut Model, now: Instant) {
        self.grow(m);
        let idle = m.cfg.management.idle_timeout;
        let counters: Vec<(usize, u64)> =
            m.peers.iter().enumerate().filter(|(_, p)| !p.configured && p.present).map(|(i, p)| (i, p.counters.rx_bytes.load(Relaxed) + p.counters.tx_bytes.load(Relaxed))).collect();
        for (i, bytes) in counters {
            match self.peers[i].link.look(now, bytes, idle) {
                Activity::Busy => self.activate(m, i, now),
                Activity::Idle => self.deactivate(m, i),
                Activity::Quiet => {}
            }
        }
    }

    /// Watches every session's receive silence ([`Silence`]): a session whose path the
    /// failover monitors (a configured peer, a link with traffic) is closed after
    /// [`crate::overlay::session::WATCHED`]'s timeout; any other is polled with a
    /// [`Message::Ping`] when it falls silent and closed after
    /// [`crate::overlay::session::UNWATCHED`]'s shorter timeout. QUIC's own idle timer can
    /// take twice as long (see [`Silence`]). Called every [`SILENCE_CHECK`].
    pub fn check_silence(&mut self, m: &Model, now: Instant) {
        for (i, p) in self.peers.iter_mut().enumerate() {
            let Some(c) = &p.conn else {
                if let Some(w) = &mut p.silence {
                    w.reset();
                }
                continue;
            };
            let limits = p.link.silence_limits();
            let w = p.silence.get_or_insert_with(|| Silence::new(SILENCE_LATE));
            match w.check(now, c.stable_id() as u64, c.stats().udp_rx.datagrams, limits) {
                Heard::Recently => {}
                Heard::Poll => {
                    let Some(peer) = quic::peer_key(c).map(|k| k.node_id()) else { continue };
                    let frame = Frame { src: m.local, dst: peer, hop_limit: 0, message: Message::Ping };
                    let c = c.clone();
                    tokio::spawn(async move {
                        let _ = quic::send_frame(&c, &frame).await;
                    });
                }
                Heard::Dead => {
                    w.reset();
                    tracing::info!("session with {} silent for {} s: closing it", m.peers[i].cfg.name, limits.timeout.as_secs_f64());
                    c.close(quic::close::SILENT.into(), b"silent");
                }
            }
        }
    }

    /// A peer a reload removed from the configuration: every reason to want it goes and
    /// every connection with it is closed, also those it dialled (its key is no longer
    /// admitted, unless the directory knows it).
    pub fn removed(&mut self, m: &Model, i: usize) {
        self.grow(m);
        let Some(p) = self.peers.get_mut(i) else { return };
        for bit in [want::CONFIGURED, want::NEIGHBOUR, want::DATA, want::RELAY] {
            p.link.set_want(bit, false);
        }
        p.link.idle();
        if let Some(slot) = &p.slot {
            for c in slot.conns.values() {
                c.close(quic::close::REMOVED.into(), b"removed");
            }
        }
        self.settle(m, i, Instant::now());
    }

    /// A directory node left the directory: no more session, TUN or routes.
    pub fn forgotten(&mut self, m: &mut Model, i: usize) {
        self.deactivate(m, i);
        self.set_want(m, i, want::NEIGHBOUR, false);
    }

    /// At shutdown: closes every connection.
    pub fn shutdown(&mut self) {
        for s in self.peers.iter().filter_map(|p| p.slot.as_ref()) {
            for c in s.conns.values() {
                c.close(quic::close::SHUTDOWN.into(), b"shutdown");
            }
        }
    }
}

/// A new session machine for peer `i`: a configured peer's first dial is spread over
/// [`FIRST_DIAL_SPREAD_PER_PEER_MS`] per configured peer (when all nodes start at once,
/// most of them dial a hub first, and its own handshakes do not come in one burst).
fn new_slot(m: &Model, i: usize) -> Slot {
    let configured_peers = m.peers.iter().filter(|p| p.configured).count() as u64;
    let spread = (configured_peers * FIRST_DIAL_SPREAD_PER_PEER_MS).min(FIRST_DIAL_SPREAD_MAX_MS);
    let first = Instant::now() + if m.peers[i].configured && spread > 0 { Duration::from_millis(rand::random::<u64>() % spread) } else { Duration::ZERO };
    Slot { sess: PeerSession::new(m.local, SessionTimers::default(), first), conns: HashMap::new(), ready: None, wake: None }
}

/// Accepts management connections and hands them to the loop.
/// Incoming management handshakes: the admission state shared by the accept loops of all
/// management sockets, and the handshakes in progress.
#[derive(Debug)]
pub struct Incoming {
    admission: std::sync::Mutex<Admission>,
    pending: AtomicUsize,
}

impl Incoming {
    /// Admission with the configured limits.
    pub fn new(cfg: AdmissionConfig) -> Incoming {
        Incoming { admission: std::sync::Mutex::new(Admission::new(cfg)), pending: AtomicUsize::new(0) }
    }

    /// (counters, handshakes in progress).
    pub fn snapshot(&self) -> (AdmissionCounters, usize) {
        (self.admission.lock().map(|a| a.counters()).unwrap_or_default(), self.pending.load(Relaxed))
    }
}

/// Counts a handshake in progress until dropped.
struct PendingGuard(Arc<Incoming>);

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Relaxed);
    }
}

/// Accepts management connections on `ep`: each attempt goes through admission
/// ([`crate::overlay::admission`]: dropped, answered with a QUIC Retry, or let through),
/// and a handshake let through has [`quic::HANDSHAKE_TIMEOUT`] to complete.
pub async fn accept_loop(ep: quinn::Endpoint, events: mpsc::UnboundedSender<PeerEvent>, errors: Arc<AtomicU64>, incoming: Arc<Incoming>) {
    while let Some(inc) = ep.accept().await {
        let remote = inc.remote_address();
        let pending = incoming.pending.load(Relaxed);
        let verdict = match incoming.admission.lock() {
            Ok(mut a) => a.admit(Instant::now(), remote.ip(), inc.remote_address_validated(), pending),
            Err(_) => Admit::Refuse(Refusal::PendingFull),
        };
        match verdict {
            Admit::Accept => {}
            Admit::Retry => {
                if let Err(e) = inc.retry() {
                    e.into_incoming().ignore();
                }
                continue;
            }
            Admit::Refuse(why) => {
                tracing::trace!("management handshake from {remote} dropped: {why:?}");
                inc.ignore();
                continue;
            }
        }
        incoming.pending.fetch_add(1, Relaxed);
        let guard = PendingGuard(incoming.clone());
        let (events, errors) = (events.clone(), errors.clone());
        tokio::spawn(async move {
            let _guard = guard;
            match tokio::time::timeout(quic::HANDSHAKE_TIMEOUT, inc).await {
                Ok(Ok(conn)) => {
                    let _ = events.send(PeerEvent::Incoming(conn));
                }
                Ok(Err(e)) => {
                    errors.fetch_add(1, Relaxed);
                    tracing::debug!("management handshake from {remote} failed: {e}");
                }
                Err(_) => {
                    errors.fetch_add(1, Relaxed);
                    tracing::debug!("management handshake from {remote} timed out");
                }
            }
        });
    }
}

async fn resolve(endpoints: &[Endpoint]) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for e in endpoints {
        match e {
            Endpoint::Addr(a) => out.push(SocketAddr::new(a.ip(), a.port().wrapping_add(1))),
            Endpoint::Host(h, p) => match tokio::net::lookup_host((h.as_str(), p.wrapping_add(1))).await {
                Ok(addrs) => out.extend(addrs),
                Err(e) => tracing::debug!("resolving {h}: {e}"),
            },
        }
    }
    out
}

/// Reads the management messages a peer sends on its session until it closes and hands
/// them to the loop (the node state dispatches them). A frame that does not name this
/// session's ends is counted as an error and skipped.
async fn read_messages(peer: usize, conn: quinn::Connection, local: NodeId, peer_id: NodeId, events: mpsc::UnboundedSender<PeerEvent>, errors: Arc<AtomicU64>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let recv = tokio::select! {
            r = conn.accept_uni() => match r { Ok(r) => r, Err(_) => return },
            _ = shutdown.changed() => return,
        };
        let (events, errors) = (events.clone(), errors.clone());
        let mut recv = recv;
        tokio::spawn(async move {
            match tokio::time::timeout(quic::HELLO_TIMEOUT, quic::read_frame(&mut recv)).await {
                // Dispatched by type in the node state (overlay gossip and routed messages,
                // relay signalling, link reports).
                Ok(Ok(f)) if f.src == peer_id && f.dst == local => {
                    let _ = events.send(PeerEvent::Message { peer, message: f.message });
                }
                Ok(Ok(f)) => {
                    errors.fetch_add(1, Relaxed);
                    tracing::debug!("management frame {} -> {} on the session with {peer_id}", f.src, f.dst);
                }
                Ok(Err(e)) => {
                    errors.fetch_add(1, Relaxed);
                    tracing::debug!("management message from {peer_id}: {e:#}");
                }
                Err(_) => {
                    errors.fetch_add(1, Relaxed);
                }
            }
        });
    }
}
