//! `detourd`: wires the core to the host and runs until SIGTERM/SIGINT.
//!
//! Start order: validate the configuration and key (nothing on the host changes before
//! this), claim the control socket, remove state a crashed daemon left (rules tagged with
//! detour's protocol, routes in its table), open the TUNs, bind the sockets, start the data
//! path, reconcile the kernel, start the management sessions, report READY to systemd.
//! Stop order reverses it; every object created is removed, also when start fails half way.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use tokio::sync::{mpsc, watch};
use tun_rs::{DeviceBuilder, SyncDevice};

use crate::config::{Config, Endpoint};
use crate::ctl::{NodeStatus, PeerStatus, Request, Response, Status};
use crate::dataplane::{DataCommand, DataPlaneSpec};
use crate::icmp::Filter;
use crate::identity::{Identity, PublicKey};
use crate::kernel;
use crate::model::{Model, Protect};
use crate::session::{PeerSession, SessionTimers, Verdict};
use crate::shell::control;
use crate::shell::datapath::{DataPath, DataPathSetup, EVENT_QUEUE};
use crate::shell::engine::{Engine, EngineShared, SessionEvent};
use crate::shell::intercept::{self, IcmpCounters};
use crate::shell::netlink::Netlink;
use crate::shell::quic::{self, Management};
use crate::shell::sockets;
use crate::wire::SessionSecrets;

/// How often the kernel state is checked and repaired.
pub const RECONCILE_INTERVAL: Duration = Duration::from_secs(2);

/// Live management state of one peer, for status output.
#[derive(Default)]
struct PeerInfo {
    state: &'static str,
    since: Option<Instant>,
    conn: Option<quinn::Connection>,
    endpoint: Option<SocketAddr>,
    sessions: u64,
}

struct Shared {
    model: Model,
    public_key: PublicKey,
    start: Instant,
    spec: DataPlaneSpec,
    peers: Vec<Mutex<PeerInfo>>,
    refused: Arc<crate::shell::tls::RefusedKeys>,
    /// Failed management handshakes and sessions closed for protocol errors.
    mgmt_errors: Arc<AtomicU64>,
    engine: Arc<EngineShared>,
    icmp: Arc<IcmpCounters>,
    icmp_active: bool,
    sessions: mpsc::UnboundedSender<SessionEvent>,
}

enum PeerEvent {
    Incoming(quinn::Connection),
    Dialed(Option<quinn::Connection>),
    Ready { conn: u64, secrets: SessionSecrets, data_port: u16, remote: SocketAddr },
    Closed { conn: u64, reason: String },
}

/// Sends data-plane commands to both data threads.
#[derive(Clone)]
struct Commander(Arc<DataPath>);

/// Runs the daemon with a validated configuration until a stop signal.
///
/// # Errors
/// Start-up failures (key, sockets, TUNs, netlink); the host is cleaned before returning.
pub async fn run(cfg: Config) -> Result<()> {
    let identity = Identity::read(&cfg.node.private_key).map_err(|e| anyhow!("node.private_key: {e}"))?;
    if Identity::file_is_exposed(&cfg.node.private_key) {
        tracing::warn!("{} can be read by other users; run: chmod 600 {}", cfg.node.private_key.display(), cfg.node.private_key.display());
    }
    let model = Model::new(cfg, identity.node_id());
    for w in &model.warnings {
        tracing::warn!("{w}");
    }
    let control_path = model.cfg.node.control_socket.clone();
    let listener = control::bind(&control_path)?;
    let nl = Netlink::connect()?;
    let mut resources = Resources { nl: nl.clone(), model: model.clone(), datapath: None, control_path: control_path.clone(), netfilter: false };
    let result = run_inner(&identity, model, nl, listener, &mut resources).await;
    resources.cleanup().await;
    result
}

/// What must be undone at exit.
struct Resources {
    nl: Netlink,
    model: Model,
    datapath: Option<Arc<DataPath>>,
    control_path: PathBuf,
    netfilter: bool,
}

impl Resources {
    async fn cleanup(&mut self) {
        if self.netfilter {
            intercept::remove_rules();
        }
        let names = link_names(&self.model);
        match self.nl.observe(&names, self.model.cfg.kernel.table).await {
            Ok((actual, index)) => {
                for op in kernel::teardown(&actual) {
                    if let Err(e) = self.nl.apply(&op, self.model.cfg.kernel.table, &index).await {
                        tracing::warn!("cleanup: {e}");
                    }
                }
            }
            Err(e) => tracing::warn!("cleanup: reading kernel state: {e}"),
        }
        if let Some(dp) = self.datapath.take() {
            match Arc::try_unwrap(dp) {
                Ok(dp) => dp.stop(),
                Err(_) => tracing::warn!("cleanup: data path still referenced; TUNs close at exit"),
            }
        }
        let _ = std::fs::remove_file(&self.control_path);
    }
}

fn link_names(model: &Model) -> BTreeSet<String> {
    model.desired_kernel(&[]).links.into_iter().map(|l| l.name).collect()
}

async fn reconcile(nl: &Netlink, model: &Model, protect: &[Option<Protect>], quiet: bool) -> Result<usize> {
    let desired = model.desired_kernel(protect);
    let names = desired.links.iter().map(|l| l.name.clone()).collect();
    let (actual, index) = nl.observe(&names, model.cfg.kernel.table).await?;
    let ops = kernel::plan(&desired, &actual);
    for op in &ops {
        if quiet {
            tracing::debug!("kernel: {op:?}");
        } else {
            tracing::info!("kernel state drifted, repairing: {op:?}");
        }
        if let Err(e) = nl.apply(op, model.cfg.kernel.table, &index).await {
            tracing::warn!("kernel: {e}");
        }
    }
    Ok(ops.len())
}

fn open_tun(name: &str) -> Result<SyncDevice> {
    let build = |offload: bool| DeviceBuilder::new().name(name).offload(offload).tx_queue_len(1000).build_sync();
    match build(true) {
        Ok(d) => Ok(d),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(anyhow!("interface {name} is in use by another process (is another detourd running?)")),
        Err(e) => {
            tracing::warn!("TUN {name}: offload unavailable ({e}); continuing without it");
            build(false).with_context(|| format!("creating TUN interface {name}"))
        }
    }
}

async fn run_inner(identity: &Identity, model: Model, nl: Netlink, listener: tokio::net::UnixListener, res: &mut Resources) -> Result<()> {
    let cfg = &model.cfg;
    let table = cfg.kernel.table;

    // State left by a crashed daemon: rules tagged with our protocol, routes in our table.
    let names = link_names(&model);
    let (stale, index) = nl.observe(&names, table).await?;
    let purge = kernel::teardown(&stale);
    if !purge.is_empty() {
        tracing::info!("removing {} kernel objects left by an earlier run", purge.len());
        for op in &purge {
            nl.apply(op, table, &index).await?;
        }
    }

    let mut tuns = Vec::new();
    let mut mtus = Vec::new();
    for p in &cfg.peers {
        tuns.push(open_tun(&p.interface)?);
        mtus.push(usize::from(p.inner_mtu()));
    }
    tuns.push(open_tun(&cfg.kernel.aggregate_interface)?);
    mtus.push(usize::from(cfg.aggregate_mtu()));

    let data_socks = sockets::data_sockets(sockets::bind_all(&cfg.node.listen, cfg.node.data_port, cfg.kernel.fwmark, Some(sockets::DATA_BUFFER))?)?;
    let mgmt_socks: Vec<_> = sockets::bind_all(&cfg.node.listen, cfg.node.management_port, cfg.kernel.fwmark, None)?.into_iter().map(|b| b.socket).collect();

    let start = Instant::now();
    let spec = model.dataplane_spec();
    let (data_tx, data_rx) = mpsc::channel(EVENT_QUEUE);
    let dp = Arc::new(DataPath::start(DataPathSetup { spec: spec.clone(), tuns, mtus, sockets: data_socks, start, threads: cfg.node.data_threads, events: data_tx })?);
    res.datapath = Some(dp.clone());
    reconcile(&nl, &model, &[], true).await?;

    // Failure detection: the engine, ICMP interception and the TCP monitor.
    let filter = Arc::new(RwLock::new(Filter::default()));
    let engine_shared = Arc::new(EngineShared::default());
    let icmp_counters = Arc::new(IcmpCounters::default());
    let (alarm_tx, alarm_rx) = mpsc::unbounded_channel();
    let mut icmp_active = false;
    if cfg.failover.icmp && !cfg.peers.is_empty() {
        res.netfilter = true;
        match intercept::install_rules(cfg.failover.nfqueue).and_then(|_| intercept::start_queue(cfg.failover.nfqueue, filter.clone(), icmp_counters.clone(), alarm_tx.clone())) {
            Ok(()) => icmp_active = true,
            Err(e) => {
                intercept::remove_rules();
                tracing::warn!("ICMP interception is off: {e:#} (install iptables, or set failover.icmp = false)");
            }
        }
    }
    if cfg.failover.tcp_monitor && !cfg.peers.is_empty() {
        intercept::start_tcp_monitor(cfg.failover.tcp_poll, filter.clone(), icmp_counters.clone(), alarm_tx.clone())?;
    }
    let mut local_addrs = refresh_local_addresses(&nl, &dp, &filter, &HashSet::new()).await;

    let peer_keys: Vec<PublicKey> = cfg.peers.iter().map(|p| p.public_key).collect();
    let mgmt = Arc::new(Management::new(identity, &cfg.node.name, cfg.node.data_port, &peer_keys, mgmt_socks)?);
    let (session_tx, session_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        model: model.clone(),
        public_key: identity.public_key(),
        start,
        spec,
        peers: cfg.peers.iter().map(|_| Mutex::new(PeerInfo { state: "down", ..Default::default() })).collect(),
        refused: mgmt.refused.clone(),
        mgmt_errors: Arc::new(AtomicU64::new(0)),
        engine: engine_shared.clone(),
        icmp: icmp_counters,
        icmp_active,
        sessions: session_tx,
    });

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut peer_tx = Vec::new();
    let mut tasks = Vec::new();
    let engine = Engine::new(model.clone(), dp.clone(), filter.clone(), engine_shared.clone(), rand::random(), Instant::now());
    let engine_task = tokio::spawn(engine.run(session_rx, data_rx, alarm_rx, shutdown_rx.clone()));
    drop(alarm_tx);
    for i in 0..cfg.peers.len() {
        let (tx, rx) = mpsc::unbounded_channel();
        peer_tx.push(tx.clone());
        tasks.push(tokio::spawn(supervise(i, shared.clone(), mgmt.clone(), Commander(dp.clone()), rx, tx, shutdown_rx.clone())));
    }
    let by_key: Arc<HashMap<PublicKey, usize>> = Arc::new(cfg.peers.iter().enumerate().map(|(i, p)| (p.public_key, i)).collect());
    for ep in &mgmt.endpoints {
        tasks.push(tokio::spawn(accept_loop(ep.clone(), by_key.clone(), peer_tx.clone(), shared.mgmt_errors.clone())));
    }
    let handler_shared = shared.clone();
    tasks.push(tokio::spawn(control::serve(listener, Arc::new(move |req| handle(&handler_shared, req)))));

    tracing::info!(
        "detourd up: node {} ({}), data port {}, management port {}, {} peers",
        cfg.node.name,
        model.local,
        cfg.node.data_port,
        cfg.node.management_port,
        cfg.peers.len()
    );
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let mut watchdog_usec = 0u64;
    let watchdog = sd_notify::watchdog_enabled(false, &mut watchdog_usec);
    let mut wd = tokio::time::interval(Duration::from_micros((watchdog_usec / 2).max(10_000)));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut tick = tokio::time::interval(RECONCILE_INTERVAL);
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: stopping"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: stopping"); break; }
            _ = hup.recv() => tracing::warn!("SIGHUP: configuration reload is not supported; restart detourd to apply changes"),
            _ = tick.tick() => {
                let protect = engine_shared.protect.lock().expect("protect").clone();
                if let Err(e) = reconcile(&nl, &model, &protect, false).await {
                    tracing::warn!("reconcile: {e:#}");
                }
                local_addrs = refresh_local_addresses(&nl, &dp, &filter, &local_addrs).await;
            }
            _ = engine_shared.kernel.notified() => {
                // Protection changed: move the routes now, not at the next tick.
                let protect = engine_shared.protect.lock().expect("protect").clone();
                if let Err(e) = reconcile(&nl, &model, &protect, true).await {
                    tracing::warn!("reconcile: {e:#}");
                }
            }
            _ = wd.tick(), if watchdog => { let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]); }
        }
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    let _ = shutdown_tx.send(true);
    // Let the engine release its relay sessions before the sessions close.
    let _ = tokio::time::timeout(Duration::from_millis(200), engine_task).await;
    for ep in &mgmt.endpoints {
        ep.close(quic::close::SHUTDOWN.into(), b"shutdown");
    }
    for ep in &mgmt.endpoints {
        let _ = tokio::time::timeout(Duration::from_millis(500), ep.wait_idle()).await;
    }
    for t in tasks {
        t.abort();
    }
    drop(shared);
    drop(mgmt);
    Ok(())
}

/// Reads this host's addresses; when they changed, tells the data path (protected traffic to
/// them is accepted) and the ICMP filter (errors must quote one of them).
async fn refresh_local_addresses(nl: &Netlink, dp: &DataPath, filter: &RwLock<Filter>, old: &HashSet<IpAddr>) -> HashSet<IpAddr> {
    let now = match nl.all_addresses().await {
        Ok(a) => a.into_iter().map(|a| a.to_canonical()).collect::<HashSet<IpAddr>>(),
        Err(e) => {
            tracing::debug!("reading local addresses: {e:#}");
            return old.clone();
        }
    };
    if now != *old {
        dp.command(DataCommand::SetLocalAddresses(now.iter().copied().collect()));
        filter.write().expect("filter").local = now.clone();
    }
    now
}

async fn accept_loop(ep: quinn::Endpoint, by_key: Arc<HashMap<PublicKey, usize>>, peers: Vec<mpsc::UnboundedSender<PeerEvent>>, errors: Arc<AtomicU64>) {
    while let Some(incoming) = ep.accept().await {
        let by_key = by_key.clone();
        let peers = peers.clone();
        let errors = errors.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => match quic::peer_key(&conn).and_then(|k| by_key.get(&k).copied()) {
                    Some(i) => {
                        let _ = peers[i].send(PeerEvent::Incoming(conn));
                    }
                    None => conn.close(quic::close::PROTOCOL.into(), b"unknown key"),
                },
                Err(e) => {
                    errors.fetch_add(1, Relaxed);
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
            Endpoint::Addr(a) => out.push(SocketAddr::new(a.ip(), a.port() + 1)),
            Endpoint::Host(h, p) => match tokio::net::lookup_host((h.as_str(), p + 1)).await {
                Ok(addrs) => out.extend(addrs),
                Err(e) => tracing::debug!("resolving {h}: {e}"),
            },
        }
    }
    out
}

async fn supervise(
    i: usize,
    shared: Arc<Shared>,
    mgmt: Arc<Management>,
    cmd: Commander,
    mut events: mpsc::UnboundedReceiver<PeerEvent>,
    events_tx: mpsc::UnboundedSender<PeerEvent>,
    mut shutdown: watch::Receiver<bool>,
) {
    let peer = shared.model.cfg.peers[i].clone();
    let local = shared.model.local;
    let mut sess = PeerSession::new(local, SessionTimers::default(), Instant::now());
    let mut conns: HashMap<u64, quinn::Connection> = HashMap::new();
    // The connection whose keys the data plane uses.
    let mut ready: Option<u64> = None;
    loop {
        let now = Instant::now();
        if sess.poll_dial(now) {
            let mgmt = mgmt.clone();
            let tx = events_tx.clone();
            let endpoints = peer.endpoints.clone();
            let key = peer.public_key;
            let name = peer.name.clone();
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
                let _ = tx.send(PeerEvent::Dialed(conn));
            });
        }
        shared.peers[i].lock().expect("peer info").state = sess.state_name();
        let wake = sess.next_timeout();
        let event = tokio::select! {
            ev = events.recv() => match ev { Some(ev) => ev, None => return },
            _ = async { match wake { Some(t) => tokio::time::sleep_until(t.into()).await, None => std::future::pending().await } } => continue,
            _ = shutdown.changed() => {
                for c in conns.values() {
                    c.close(quic::close::SHUTDOWN.into(), b"shutdown");
                }
                return;
            }
        };
        let now = Instant::now();
        match event {
            PeerEvent::Incoming(conn) | PeerEvent::Dialed(Some(conn)) if conn.close_reason().is_none() => {
                let dialled = conn.side() == quinn::Side::Client;
                let id = conn.stable_id() as u64;
                let initiator = if dialled { local } else { peer.node_id };
                match sess.on_connection(now, id, initiator, dialled) {
                    Verdict::Adopt { replaced } => {
                        if let Some(old) = replaced.and_then(|r| conns.remove(&r)) {
                            old.close(quic::close::REPLACED.into(), b"replaced");
                        }
                        conns.insert(id, conn.clone());
                        let mgmt = mgmt.clone();
                        let tx = events_tx.clone();
                        let name = peer.name.clone();
                        let peer_id = peer.node_id;
                        let errors = shared.mgmt_errors.clone();
                        tokio::spawn(async move {
                            match mgmt.hello(&conn, peer_id, dialled).await {
                                Ok((secrets, data_port, _)) => {
                                    let remote = conn.remote_address();
                                    let _ = tx.send(PeerEvent::Ready { conn: id, secrets, data_port, remote });
                                }
                                Err(e) => {
                                    // A connection closed by the tie-break or a replacement
                                    // is expected; anything else is worth a warning.
                                    let expected = match conn.close_reason() {
                                        Some(quinn::ConnectionError::LocallyClosed) => true,
                                        Some(quinn::ConnectionError::ApplicationClosed(c)) => {
                                            [quic::close::REPLACED, quic::close::DUPLICATE].map(u64::from).contains(&u64::from(c.error_code))
                                        }
                                        _ => false,
                                    };
                                    if expected {
                                        tracing::debug!("session attempt with {name} superseded: {e:#}");
                                    } else {
                                        errors.fetch_add(1, Relaxed);
                                        tracing::warn!("session with {name}: {e:#}");
                                    }
                                    conn.close(quic::close::PROTOCOL.into(), b"hello failed");
                                }
                            }
                            let reason = conn.closed().await;
                            let _ = tx.send(PeerEvent::Closed { conn: id, reason: reason.to_string() });
                        });
                    }
                    Verdict::Refuse => conn.close(quic::close::DUPLICATE.into(), b"duplicate"),
                }
            }
            PeerEvent::Incoming(_) => {}
            // No endpoint answered, or the connection closed before it was used.
            PeerEvent::Dialed(_) => sess.on_dial_failed(now, rand::random()),
            PeerEvent::Ready { conn, secrets, data_port, remote } => {
                if sess.current().map(|c| c.0) != Some(conn) {
                    continue;
                }
                let data = SocketAddr::new(remote.ip().to_canonical(), data_port);
                cmd.0.command(DataCommand::InstallSession { peer: i, secrets });
                ready = Some(conn);
                if let Some(c) = conns.get(&conn).cloned() {
                    let _ = shared.sessions.send(SessionEvent::Up { peer: i, conn: c.clone(), data });
                    tokio::spawn(read_messages(i, c, local, peer.node_id, shared.sessions.clone(), shared.mgmt_errors.clone()));
                }
                let mut info = shared.peers[i].lock().expect("peer info");
                info.since = Some(now);
                info.conn = conns.get(&conn).cloned();
                info.endpoint = Some(data);
                info.sessions += 1;
                tracing::info!("session with {} up (data endpoint {data})", peer.name);
            }
            PeerEvent::Closed { conn, reason } => {
                conns.remove(&conn);
                sess.on_closed(now, conn, rand::random());
                if ready == Some(conn) {
                    ready = None;
                    let _ = shared.sessions.send(SessionEvent::Down { peer: i });
                    let mut info = shared.peers[i].lock().expect("peer info");
                    info.conn = None;
                    tracing::info!("session with {} down: {reason}", peer.name);
                }
            }
        }
    }
}

/// Reads the management messages a peer sends on its session until it closes. A frame that
/// does not name this session's ends is counted as an error and skipped.
async fn read_messages(
    peer: usize,
    conn: quinn::Connection,
    local: crate::identity::NodeId,
    peer_id: crate::identity::NodeId,
    sessions: mpsc::UnboundedSender<SessionEvent>,
    errors: Arc<AtomicU64>,
) {
    while let Ok(mut recv) = conn.accept_uni().await {
        let sessions = sessions.clone();
        let errors = errors.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(quic::HELLO_TIMEOUT, quic::read_frame(&mut recv)).await {
                Ok(Ok(f)) if f.src == peer_id && f.dst == local => {
                    let _ = sessions.send(SessionEvent::Message { peer, message: f.message });
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

fn secs(i: Option<Instant>) -> Option<f64> {
    i.map(|t| t.elapsed().as_secs_f64())
}

fn handle(shared: &Shared, req: Request) -> Response {
    match req {
        Request::Status => Response::Status(Box::new(status(shared))),
        Request::Paths => Response::Paths { peers: paths(shared) },
    }
}

fn paths(shared: &Shared) -> Vec<crate::ctl::PeerPaths> {
    let routes = shared.engine.routes.lock().expect("routes");
    shared
        .model
        .cfg
        .peers
        .iter()
        .enumerate()
        .map(|(i, p)| crate::ctl::PeerPaths {
            name: p.name.clone(),
            paths: routes
                .get(i)
                .and_then(|r| r.as_ref())
                .map(|r| {
                    r.paths
                        .iter()
                        .map(|x| crate::ctl::PathRow {
                            path: x.path.clone(),
                            state: x.state.clone(),
                            since_s: x.since.elapsed().as_secs_f64(),
                            rtt_ms: x.rtt_ms,
                            loss_pct: x.loss * 100.0,
                            in_use: x.in_use,
                        })
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect()
}

fn status(shared: &Shared) -> Status {
    let cfg = &shared.model.cfg;
    let now_ms = shared.start.elapsed().as_millis() as u64;
    let routes = shared.engine.routes.lock().expect("routes").clone();
    let peers = cfg
        .peers
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let info = shared.peers[i].lock().expect("peer info");
            let route = routes.get(i).and_then(|r| r.clone());
            let c = &shared.spec.peers[i].counters;
            let last_rx = c.last_rx_ms.load(Relaxed);
            let links = &shared.model.links[i];
            let mut link_addresses: Vec<String> = links.local_v4.map(|a| a.to_string()).into_iter().collect();
            link_addresses.push(format!("{}%{}", links.local_v6, p.interface));
            PeerStatus {
                name: p.name.clone(),
                node_id: p.node_id.to_string(),
                interface: p.interface.clone(),
                state: info.state.to_string(),
                endpoint: info.endpoint.map(|e| e.to_string()),
                path: match (&route, info.endpoint) {
                    (_, None) => "none".into(),
                    (Some(r), _) => r.path.clone(),
                    (None, _) => "direct".into(),
                },
                reason: route.as_ref().map(|r| r.reason.clone()).unwrap_or_else(|| "healthy".into()),
                path_since_s: route.as_ref().filter(|_| info.endpoint.is_some()).map(|r| r.since.elapsed().as_secs_f64()),
                protected: route.as_ref().is_some_and(|r| r.protected),
                route_changes: route.as_ref().map(|r| r.changes).unwrap_or(0),
                probe_tx_bytes: c.probe_tx_bytes.load(Relaxed),
                probe_rx_bytes: c.probe_rx_bytes.load(Relaxed),
                last_handshake_s: secs(info.since),
                rtt_ms: info.conn.as_ref().filter(|c| c.close_reason().is_none()).map(|c| c.rtt().as_secs_f64() * 1000.0),
                last_rx_s: (last_rx > 0).then(|| now_ms.saturating_sub(last_rx) as f64 / 1000.0),
                rx_packets: c.rx_packets.load(Relaxed),
                rx_bytes: c.rx_bytes.load(Relaxed),
                tx_packets: c.tx_packets.load(Relaxed),
                tx_bytes: c.tx_bytes.load(Relaxed),
                drops: c.drops.snapshot().into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
                sessions: info.sessions,
                link_addresses,
                overlay_addresses: [p.overlay_v4.map(|a| a.to_string()), p.overlay_v6.map(|a| a.to_string())].into_iter().flatten().collect(),
            }
        })
        .collect();
    let (refused, last_key) = shared.refused.snapshot();
    Status {
        node: NodeStatus {
            name: cfg.node.name.clone(),
            node_id: shared.model.local.to_string(),
            public_key: shared.public_key.to_string(),
            data_port: cfg.node.data_port,
            management_port: cfg.node.management_port,
            overlay_ipv4: cfg.node.overlay_v4.map(|n| n.to_string()),
            overlay_ipv6: cfg.node.overlay_v6.map(|n| n.to_string()),
            aggregate_interface: cfg.kernel.aggregate_interface.clone(),
            uptime_s: shared.start.elapsed().as_secs(),
        },
        peers,
        drops: shared.spec.node.drops.snapshot().into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        refused_handshakes: refused,
        last_refused_key: last_key,
        management_errors: shared.mgmt_errors.load(Relaxed),
        icmp: crate::ctl::IcmpStatus {
            active: shared.icmp_active,
            rerouted: shared.icmp.rerouted.load(Relaxed),
            ignored: shared.icmp.ignored_snapshot().into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            tcp_stalls: shared.icmp.tcp_stalls.load(Relaxed),
        },
        relayed_packets: shared.spec.node.relayed_packets.load(Relaxed),
        relayed_bytes: shared.spec.node.relayed_bytes.load(Relaxed),
        relaying: shared.engine.relaying.lock().expect("relaying").iter().map(|(a, b)| format!("{a} <-> {b}")).collect(),
    }
}
