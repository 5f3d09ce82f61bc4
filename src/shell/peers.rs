//! Management sessions with peers, configured or learned from the directory: who gets a
//! session, the task that keeps each one, and the per-peer interfaces of links in use.
//!
//! A peer is **wanted** for one or more reasons: it is configured (always), the management
//! overlay chose it as a neighbour, or forwarding traffic uses the link (since the data
//! path asked for a session, until [`crate::config::ManagementConfig::idle_timeout`] passes
//! without traffic). A wanted peer has a supervisor task that dials it (with backoff) and
//! runs its session; a peer that is not wanted keeps a session only while the other side
//! holds it open (the side that dialled closes it when it no longer wants it). Links that
//! carry forwarding traffic get their own TUN and path monitoring; it goes away with the
//! traffic.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, watch};

use crate::config::Endpoint;
use crate::dataplane::DataCommand;
use crate::identity::NodeId;
use crate::overlay::session::{Heard, PeerSession, SessionTimers, Silence, Verdict};
use crate::shell::daemon::{open_tun, Shared};
use crate::shell::engine::SessionEvent;
use crate::shell::quic;
use crate::wire::mgmt::Message;
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
/// How often [`check_silence`] runs: a poll goes out within this long of the silence
/// that calls for it, and a dead session is closed within this long of its timeout.
pub const SILENCE_CHECK: std::time::Duration = std::time::Duration::from_millis(500);
/// Silence checks ([`check_silence`]) further apart than this mean this node was late.
pub const SILENCE_LATE: std::time::Duration = std::time::Duration::from_secs(2);

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
    /// The supervisor task, if one runs.
    supervisor: Option<Supervisor>,
    /// Receive silence of the current session ([`check_silence`]).
    silence: Option<Silence>,
}

struct Supervisor {
    events: mpsc::UnboundedSender<PeerEvent>,
    wanted: watch::Sender<bool>,
}

/// Events for a peer's supervisor.
enum PeerEvent {
    /// An accepted connection authenticated with this peer's key.
    Incoming(quinn::Connection),
    /// A dial attempt ended (with a connection or not).
    Dialed(Option<quinn::Connection>),
    /// The Hello exchange on a connection finished: its keys and the peer's data port.
    Ready { conn: u64, secrets: SessionSecrets, data_port: u16, remote: SocketAddr },
    /// A connection closed; `refused`: the peer refused this node's key (it does not know
    /// this node yet).
    Closed { conn: u64, reason: String, refused: bool },
}

/// Makes room for the peers the model gained.
pub fn grow(shared: &Shared) {
    let n = shared.model.read().expect("model").peers.len();
    let mut peers = shared.peers.lock().expect("peers");
    while peers.len() < n {
        peers.push(PeerInfo { state: "down", ..Default::default() });
    }
}

/// Adds or removes a reason for wanting peer `i`; starts its supervisor when it becomes
/// wanted.
pub fn set_want(shared: &Arc<Shared>, i: usize, bit: u8, on: bool) {
    grow(shared);
    let mut peers = shared.peers.lock().expect("peers");
    let Some(p) = peers.get_mut(i) else { return };
    let change = p.link.set_want(bit, on);
    let wanted = p.link.wanted();
    if change == WantChange::Same && (p.supervisor.is_some() || !wanted) {
        return;
    }
    match &p.supervisor {
        Some(s) => {
            let _ = s.wanted.send(wanted);
        }
        None if wanted => p.supervisor = Some(spawn_supervisor(shared, i, true)),
        None => {}
    }
}

fn spawn_supervisor(shared: &Arc<Shared>, i: usize, wanted: bool) -> Supervisor {
    let (tx, rx) = mpsc::unbounded_channel();
    let (wtx, wrx) = watch::channel(wanted);
    tokio::spawn(supervise(i, shared.clone(), rx, tx.clone(), wrx));
    Supervisor { events: tx, wanted: wtx }
}

/// Hands an authenticated incoming connection to its peer's supervisor (starting one when
/// the peer is not wanted here: the session lives while the other side keeps it).
pub fn incoming(shared: &Arc<Shared>, i: usize, conn: quinn::Connection) {
    grow(shared);
    let mut peers = shared.peers.lock().expect("peers");
    let Some(p) = peers.get_mut(i) else { return };
    if p.supervisor.is_none() {
        p.supervisor = Some(spawn_supervisor(shared, i, p.link.wanted()));
    }
    if let Some(s) = &p.supervisor {
        let _ = s.events.send(PeerEvent::Incoming(conn));
    }
}

/// Accepts management connections and hands them to their peers.
pub async fn accept_loop(shared: Arc<Shared>, ep: quinn::Endpoint) {
    while let Some(inc) = ep.accept().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            let remote = inc.remote_address();
            match inc.await {
                Ok(conn) => {
                    shared.handshakes.lock().expect("handshakes").count(Instant::now());
                    let index = quic::peer_key(&conn).and_then(|k| shared.model.read().expect("model").index_of(&k.node_id()));
                    match index {
                        Some(i) => incoming(&shared, i, conn),
                        None => conn.close(quic::close::PROTOCOL.into(), b"unknown key"),
                    }
                }
                Err(e) => {
                    shared.mgmt_errors.fetch_add(1, Relaxed);
                    tracing::debug!("management handshake from {remote} failed: {e}");
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

fn set_state(shared: &Shared, i: usize, state: &'static str) {
    if let Some(p) = shared.peers.lock().expect("peers").get_mut(i) {
        p.state = state;
    }
}

/// Runs the sessions of peer `i` while it is wanted or a session the other side opened
/// lives.
async fn supervise(i: usize, shared: Arc<Shared>, mut events: mpsc::UnboundedReceiver<PeerEvent>, events_tx: mpsc::UnboundedSender<PeerEvent>, mut wanted: watch::Receiver<bool>) {
    let (local, peer_id, configured, spread) = {
        let m = shared.model.read().expect("model");
        let configured_peers = m.peers.iter().filter(|p| p.configured).count() as u64;
        (m.local, m.peers[i].cfg.node_id, m.peers[i].configured, (configured_peers * FIRST_DIAL_SPREAD_PER_PEER_MS).min(FIRST_DIAL_SPREAD_MAX_MS))
    };
    // A node with many configured peers spreads its first dials: when they all start at
    // once, most of them dial it first, and its own handshakes do not come in one burst.
    let first_dial = Instant::now() + if configured && spread > 0 { std::time::Duration::from_millis(rand::random::<u64>() % spread) } else { std::time::Duration::ZERO };
    let mut sess = PeerSession::new(local, SessionTimers::default(), first_dial);
    let mut conns: std::collections::HashMap<u64, quinn::Connection> = std::collections::HashMap::new();
    let mut ready: Option<u64> = None;
    let mut shutdown = shared.shutdown.clone();
    let mut pending: Option<PeerEvent> = None;
    loop {
        let now = Instant::now();
        let want = *wanted.borrow();
        if want && sess.poll_dial(now) {
            let (key, endpoints, name) = {
                let m = shared.model.read().expect("model");
                let p = &m.peers[i].cfg;
                (p.public_key, p.endpoints.clone(), p.name.clone())
            };
            let mgmt = shared.mgmt.clone();
            let shared2 = shared.clone();
            let tx = events_tx.clone();
            tokio::spawn(async move {
                let handshakes = &shared2.handshakes;
                let addrs = resolve(&endpoints).await;
                let conn = if addrs.is_empty() {
                    None
                } else {
                    match mgmt.dial(key, &addrs).await {
                        Ok(c) => {
                            handshakes.lock().expect("handshakes").count(Instant::now());
                            Some(c)
                        }
                        Err(e) => {
                            tracing::debug!("dialling {name}: {e:#}");
                            None
                        }
                    }
                };
                let _ = tx.send(PeerEvent::Dialed(conn));
            });
        }
        if !want {
            // Close what this side dialled; keep what the other side holds open.
            let dialled: Vec<u64> = conns.iter().filter(|(_, c)| c.side() == quinn::Side::Client).map(|(id, _)| *id).collect();
            for id in dialled {
                if let Some(c) = conns.get(&id) {
                    c.close(CLOSE_IDLE.into(), b"idle");
                }
            }
            if conns.is_empty() {
                // Exit unless someone wanted the peer again meanwhile, or the other side's
                // connection waits in the queue (both checked under the lock that
                // set_want and incoming take): a session the other side opened lives
                // while it holds it, also when this side does not want the peer.
                let mut peers = shared.peers.lock().expect("peers");
                let queued = events.try_recv().ok();
                if let Some(ev) = queued {
                    drop(peers);
                    pending = Some(ev);
                } else if !peers[i].link.wanted() {
                    let p = &mut peers[i];
                    p.supervisor = None;
                    p.state = "down";
                    drop(peers);
                    if !configured {
                        let _ = shared.sessions.send(SessionEvent::Forget { peer: i });
                    }
                    return;
                } else {
                    drop(peers);
                    continue;
                }
            }
        }
        set_state(&shared, i, sess.state_name());
        let wake = sess.next_timeout().filter(|_| want);
        let event = if let Some(ev) = pending.take() {
            ev
        } else {
            tokio::select! {
            ev = events.recv() => match ev { Some(ev) => ev, None => return },
            _ = async { match wake { Some(t) => tokio::time::sleep_until(t.into()).await, None => std::future::pending().await } } => continue,
            r = wanted.changed() => { if r.is_err() { return; } continue; }
            _ = shutdown.changed() => {
                for c in conns.values() {
                    c.close(quic::close::SHUTDOWN.into(), b"shutdown");
                }
                return;
            }
            }
        };
        let now = Instant::now();
        match event {
            PeerEvent::Incoming(conn) | PeerEvent::Dialed(Some(conn)) if conn.close_reason().is_none() => {
                let dialled = conn.side() == quinn::Side::Client;
                let id = conn.stable_id() as u64;
                let initiator = if dialled { local } else { peer_id };
                match sess.on_connection(now, id, initiator, dialled) {
                    Verdict::Adopt { replaced } => {
                        if let Some(old) = replaced.and_then(|r| conns.remove(&r)) {
                            old.close(quic::close::REPLACED.into(), b"replaced");
                        }
                        conns.insert(id, conn.clone());
                        let shared2 = shared.clone();
                        let tx = events_tx.clone();
                        tokio::spawn(async move {
                            match shared2.mgmt.hello(&conn, peer_id, dialled).await {
                                Ok((secrets, data_port, _)) => {
                                    let remote = conn.remote_address();
                                    let _ = tx.send(PeerEvent::Ready { conn: id, secrets, data_port, remote });
                                }
                                Err(e) => {
                                    let expected = match conn.close_reason() {
                                        Some(quinn::ConnectionError::LocallyClosed) => true,
                                        Some(quinn::ConnectionError::ApplicationClosed(c)) => {
                                            [quic::close::REPLACED, quic::close::DUPLICATE, CLOSE_IDLE].map(u64::from).contains(&u64::from(c.error_code))
                                        }
                                        _ => false,
                                    };
                                    if expected {
                                        tracing::debug!("session attempt with peer {i} superseded: {e:#}");
                                    } else if configured {
                                        shared2.mgmt_errors.fetch_add(1, Relaxed);
                                        tracing::warn!("session with {}: {e:#}", shared2.peer_name(i));
                                    } else {
                                        // A node that joined a moment ago may not know this
                                        // node's key yet: expected, retried with backoff.
                                        shared2.mgmt_errors.fetch_add(1, Relaxed);
                                        tracing::debug!("session with {}: {e:#}", shared2.peer_name(i));
                                    }
                                    conn.close(quic::close::PROTOCOL.into(), b"hello failed");
                                }
                            }
                            let reason = conn.closed().await;
                            let _ = tx.send(PeerEvent::Closed { conn: id, reason: reason.to_string(), refused: quic::refused_by_peer(&reason) });
                        });
                    }
                    Verdict::Refuse => conn.close(quic::close::DUPLICATE.into(), b"duplicate"),
                }
            }
            PeerEvent::Incoming(_) => {}
            PeerEvent::Dialed(_) => {
                sess.on_dial_failed(now, rand::random());
                if !configured {
                    // A chosen neighbour that cannot be reached is replaced at once.
                    let _ = shared.sessions.send(SessionEvent::Unreachable { peer: i });
                }
            }
            PeerEvent::Ready { conn, secrets, data_port, remote } => {
                if sess.current().map(|c| c.0) != Some(conn) {
                    continue;
                }
                sess.on_ready(conn);
                let data = SocketAddr::new(remote.ip().to_canonical(), data_port);
                shared.dp.command(DataCommand::InstallSession { peer: i, secrets });
                ready = Some(conn);
                let Some(c) = conns.get(&conn).cloned() else { continue };
                let monitor = {
                    let mut peers = shared.peers.lock().expect("peers");
                    let p = &mut peers[i];
                    p.since = Some(now);
                    p.conn = Some(c.clone());
                    p.endpoint = Some(data);
                    p.sessions += 1;
                    configured || p.link.want & want::DATA != 0
                };
                let _ = shared.sessions.send(SessionEvent::Up { peer: i, conn: c.clone(), data, monitor, configured });
                tokio::spawn(read_messages(i, c, local, peer_id, shared.clone()));
                tracing::info!("session with {} up (data endpoint {data})", shared.peer_name(i));
            }
            PeerEvent::Closed { conn, reason, refused } => {
                conns.remove(&conn);
                let failed = sess.on_closed(now, conn, rand::random());
                if failed && refused && !configured {
                    // The peer does not know this node yet (it chose the peer from a
                    // directory that reached it first); the peer asks for this node's
                    // record now (Overlay::seek). Dialled again after the backoff, which
                    // grows at each refusal; replaced only if it never connects within the
                    // overlay's patience.
                    tracing::debug!("{} does not know this node yet: trying again", shared.peer_name(i));
                } else if failed && !configured {
                    // The Hello failed: a chosen neighbour is replaced, as after a failed dial.
                    let _ = shared.sessions.send(SessionEvent::Unreachable { peer: i });
                }
                if ready == Some(conn) {
                    ready = None;
                    let _ = shared.sessions.send(SessionEvent::Down { peer: i });
                    if let Some(p) = shared.peers.lock().expect("peers").get_mut(i) {
                        p.conn = None;
                    }
                    let level_info = configured || !reason.contains("idle");
                    if level_info {
                        tracing::info!("session with {} down: {reason}", shared.peer_name(i));
                    } else {
                        tracing::debug!("session with {} closed: {reason}", shared.peer_name(i));
                    }
                }
            }
        }
    }
}

/// Reads the management messages a peer sends on its session until it closes and hands
/// them to the engine task (the node state dispatches them). A frame that does not name this session's ends is
/// counted as an error and skipped.
async fn read_messages(peer: usize, conn: quinn::Connection, local: NodeId, peer_id: NodeId, shared: Arc<Shared>) {
    while let Ok(mut recv) = conn.accept_uni().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(quic::HELLO_TIMEOUT, quic::read_frame(&mut recv)).await {
                // Dispatched by type in the node state (overlay gossip and routed messages,
                // relay signalling, link reports).
                Ok(Ok(f)) if f.src == peer_id && f.dst == local => {
                    let _ = shared.sessions.send(SessionEvent::Message { peer, message: f.message });
                }
                Ok(Ok(f)) => {
                    shared.mgmt_errors.fetch_add(1, Relaxed);
                    tracing::debug!("management frame {} -> {} on the session with {peer_id}", f.src, f.dst);
                }
                Ok(Err(e)) => {
                    shared.mgmt_errors.fetch_add(1, Relaxed);
                    tracing::debug!("management message from {peer_id}: {e:#}");
                }
                Err(_) => {
                    shared.mgmt_errors.fetch_add(1, Relaxed);
                }
            }
        });
    }
}

/// The data path has packets for peer `i` and no session: the link is in use.
pub fn need_session(shared: &Arc<Shared>, i: usize) {
    let present = shared.model.read().expect("model").peers.get(i).is_some_and(|p| p.present);
    if present {
        activate(shared, i, Instant::now());
    }
}

/// Marks the link to directory node `i` as carrying forwarding traffic: it gets a TUN,
/// a session and path monitoring.
fn activate(shared: &Arc<Shared>, i: usize, now: Instant) {
    grow(shared);
    let first = {
        let mut peers = shared.peers.lock().expect("peers");
        peers[i].link.traffic(now)
    };
    if !first {
        return;
    }
    let (name, mtu, configured) = {
        let m = shared.model.read().expect("model");
        let p = &m.peers[i];
        (p.cfg.interface.clone(), usize::from(p.cfg.inner_mtu()), p.configured)
    };
    if !configured {
        match open_tun(&name) {
            Ok(dev) => {
                shared.dp.attach_tun(i, dev, mtu);
                shared.model.write().expect("model").set_tun(i, true);
                shared.kernel.notify_one();
                tracing::info!("link to {} in use: interface {name}", shared.peer_name(i));
            }
            Err(e) => tracing::warn!("link to {}: {e:#}; its traffic uses the aggregate interface", shared.peer_name(i)),
        }
    }
    set_want(shared, i, want::DATA, true);
    if shared.peers.lock().expect("peers")[i].conn.is_some() {
        let _ = shared.sessions.send(SessionEvent::Monitor { peer: i });
    }
}

fn deactivate(shared: &Arc<Shared>, i: usize) {
    let changed = shared.model.write().expect("model").set_tun(i, false);
    if changed {
        shared.dp.command(DataCommand::DetachTun { peer: i });
        shared.kernel.notify_one();
        tracing::info!("link to {} idle: interface removed", shared.peer_name(i));
    }
    if let Some(p) = shared.peers.lock().expect("peers").get_mut(i) {
        p.link.idle();
    }
    set_want(shared, i, want::DATA, false);
}

/// Finds links to directory nodes whose traffic started or stopped (every second or so).
pub fn check_activity(shared: &Arc<Shared>, now: Instant) {
    let idle = shared.model.read().expect("model").cfg.management.idle_timeout;
    let counters: Vec<(usize, u64)> = {
        let m = shared.model.read().expect("model");
        m.peers.iter().enumerate().filter(|(_, p)| !p.configured && p.present).map(|(i, p)| (i, p.counters.rx_bytes.load(Relaxed) + p.counters.tx_bytes.load(Relaxed))).collect()
    };
    grow(shared);
    for (i, bytes) in counters {
        let activity = shared.peers.lock().expect("peers")[i].link.look(now, bytes, idle);
        match activity {
            Activity::Busy => activate(shared, i, now),
            Activity::Idle => deactivate(shared, i),
            Activity::Quiet => {}
        }
    }
}

/// Watches every session's receive silence ([`Silence`]): a session whose path the
/// failover monitors (a configured peer, a link with traffic) is closed after
/// [`crate::overlay::session::WATCHED`]'s timeout; any other is polled with a [`Message::Ping`] when
/// it falls silent and closed after [`crate::overlay::session::UNWATCHED`]'s shorter timeout. QUIC's
/// own idle timer can take twice as long (see [`Silence`]). Called every
/// [`SILENCE_CHECK`].
pub fn check_silence(shared: &Arc<Shared>, now: Instant) {
    let mut silent = Vec::new();
    let mut poll = Vec::new();
    for (i, p) in shared.peers.lock().expect("peers").iter_mut().enumerate() {
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
            Heard::Poll => poll.push(c.clone()),
            Heard::Dead => {
                w.reset();
                silent.push((i, c.clone(), limits.timeout));
            }
        }
    }
    for c in poll {
        let Some(peer) = quic::peer_key(&c).map(|k| k.node_id()) else { continue };
        let frame = crate::wire::mgmt::Frame { src: shared.model.read().expect("model").local, dst: peer, hop_limit: 0, message: Message::Ping };
        tokio::spawn(async move {
            let _ = quic::send_frame(&c, &frame).await;
        });
    }
    for (i, c, timeout) in silent {
        tracing::info!("session with {} silent for {} s: closing it", shared.peer_name(i), timeout.as_secs_f64());
        c.close(quic::close::SILENT.into(), b"silent");
    }
}

/// A directory node left the directory: no more session, TUN or routes.
pub fn forgotten(shared: &Arc<Shared>, i: usize) {
    deactivate(shared, i);
    set_want(shared, i, want::NEIGHBOUR, false);
}
