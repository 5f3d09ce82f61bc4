//! `detourd`: wires the core to the host and runs until SIGTERM/SIGINT.
//!
//! Start order: validate the configuration and key (nothing on the host changes before
//! this), claim the control socket, remove state a crashed daemon left (rules tagged with
//! detour's protocol, routes in its table), open the TUNs, bind the sockets, start the data
//! path, reconcile the kernel, start the management sessions, report READY to systemd.
//! Stop order reverses it; every object created is removed, also when start fails half way.

use std::collections::{BTreeSet, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::Config;
use crate::ctl::{NodeStatus, PeerStatus, Request, Response, Status};
use crate::dataplane::DataCommand;
use crate::identity::{Identity, PublicKey};
use crate::kernel::{self, DesiredState};
use crate::node::model::{Model, Protect, UnderlayHops};
use crate::path::icmp::Filter;
use crate::shell::acct::{self, Accounting};
use crate::shell::control;
use crate::shell::datapath::{open_tun, DataPath, DataPathSetup, EVENT_QUEUE};
use crate::shell::engine::{Engine, EngineView, SessionWant};
use crate::shell::intercept::{self, IcmpCounters};
use crate::shell::netlink::Netlink;
use crate::shell::priority;
use crate::shell::quic::{self, Management};
use crate::shell::sessions::{self, want, PeerInfo, Sessions};
use crate::shell::sockets;
use crate::shell::supervise::{self, Health};
use crate::shell::tls::{AllowedKeys, RefusedKeys};
use crate::shell::traffic;

/// Shortest time between two reconcile passes started by the kernel's change
/// notifications ([`Netlink::watch`]): a host whose routes churn (a router with a full BGP
/// table) costs at most one pass per interval. Without notifications, the kernel is
/// reconciled this often.
pub const RECONCILE_INTERVAL: Duration = Duration::from_secs(2);
/// A pass runs this long after the first notification of a burst, so that one pass covers
/// the burst.
pub const RECONCILE_SETTLE: Duration = Duration::from_millis(50);
/// A change of the model waits this long for others to come with it ([`model_pass_at`]).
pub const MODEL_SETTLE: Duration = Duration::from_millis(100);
/// Shortest time between two passes for changes of the model ([`model_pass_at`]).
pub const MODEL_SPACING: Duration = Duration::from_millis(500);
/// How often detour's netfilter rules are checked (with `iptables-save`, which takes no
/// lock) and put back when someone removed or flushed them.
pub const NETFILTER_REPAIR: Duration = Duration::from_secs(10);
/// The kernel is reconciled at least this often even when it reported no change (a lost
/// notification: the socket's buffer overran).
pub const RECONCILE_SAFETY: Duration = Duration::from_secs(30);

/// What status output needs besides the model, the sessions and the node state: fixed
/// facts and the counters other threads keep.
pub struct StatusCtx {
    /// This node's public key.
    pub public_key: PublicKey,
    /// Daemon start.
    pub start: Instant,
    /// Refused handshakes.
    pub refused: Arc<RefusedKeys>,
    /// Failed management handshakes and sessions closed for protocol errors.
    pub mgmt_errors: Arc<AtomicU64>,
    /// ICMP interception counters.
    pub icmp: Arc<IcmpCounters>,
    /// Whether ICMP interception runs.
    pub icmp_active: bool,
    /// Datagrams on the management port that cannot be QUIC.
    pub mgmt_garbage: Arc<AtomicU64>,
    /// Admission of incoming management handshakes.
    pub incoming: Arc<sessions::Incoming>,
    /// Features that could not be set up (node.allow_degraded): name and reason.
    pub degraded: Vec<(&'static str, String)>,
}

/// A question about the node's state, answered by the daemon's loop from the node state.
pub enum Query {
    /// A `detourctl` request.
    Control(Request, oneshot::Sender<Response>),
    /// A metrics scrape: the text exposition.
    Metrics(oneshot::Sender<String>),
}

/// How long a `detourctl` request or a metrics scrape waits for the loop's answer.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// Sets the log filter at a reload (`node.log_level`); an error says why it was not set.
pub type SetLogLevel = Box<dyn Fn(&str) -> std::result::Result<(), String> + Send>;

/// Runs the daemon with a validated configuration, read from `path` (read again at a
/// reload; `overlays` holds the other overlays' configurations it must not collide with),
/// until a stop signal.
///
/// # Errors
/// Start-up failures (key, sockets, TUNs, netlink); the host is cleaned before returning.
pub async fn run(mut cfg: Config, path: PathBuf, overlays: PathBuf, set_log_level: SetLogLevel) -> Result<()> {
    let file_cfg = cfg.clone();
    // Netfilter chains and the sysctl state carry the overlay instance (node.instance).
    crate::shell::netfilter::set_instance(cfg.node.instance);
    cfg.node.policy.up_since = crate::shell::mnode::unix_now();
    let identity = crate::shell::files::read_key(&cfg.node.private_key).map_err(|e| anyhow!("node.private_key: {e}"))?;
    if crate::shell::files::key_is_exposed(&cfg.node.private_key) {
        tracing::warn!("{} can be read by other users; run: chmod 600 {}", cfg.node.private_key.display(), cfg.node.private_key.display());
    }
    let model = Model::new(cfg, identity.node_id());
    for w in &model.warnings {
        tracing::warn!("{w}");
    }
    let control_path = model.cfg.node.control_socket.clone();
    let listener = control::bind(&control_path)?;
    let nl = Netlink::connect()?;
    let qdisc = model.cfg.management.qdisc_interface.clone();
    let mut resources = Resources {
        nl: nl.clone(),
        table: model.cfg.kernel.table,
        owned: crate::shell::netlink::Owned::of(&model.cfg),
        links: link_names(&model),
        datapath: None,
        control_path: control_path.clone(),
        netfilter: false,
        dscp: false,
        qdisc: None,
        acct: false,
        traffic: false,
        classes: false,
        kfwd: None,
        keeper: None,
    };
    // A panic in the loop (the node state is driven there) is caught here, so that the
    // host is cleaned as at a normal stop; the panic hook has logged it.
    let reloader = Reloader { path, overlays, running: file_cfg, node_id: identity.node_id(), set_log_level, idle_off: false, traffic: None, metrics: None, metrics_queries: None };
    let inner = std::panic::AssertUnwindSafe(run_inner(&identity, model, nl, listener, &mut resources, qdisc, reloader));
    let result = match futures::FutureExt::catch_unwind(inner).await {
        Ok(r) => r,
        Err(payload) => {
            let msg = supervise::panic_message(payload.as_ref());
            tracing::error!("stopping: the daemon's loop panicked: {msg}");
            Err(anyhow!("the daemon's loop panicked: {msg}"))
        }
    };
    resources.cleanup().await;
    result
}

/// What must be undone at exit.
struct Resources {
    nl: Netlink,
    table: u32,
    /// This overlay's part of the kernel.
    owned: crate::shell::netlink::Owned,
    links: BTreeSet<String>,
    datapath: Option<Arc<DataPath>>,
    control_path: PathBuf,
    netfilter: bool,
    dscp: bool,
    qdisc: Option<String>,
    acct: bool,
    traffic: bool,
    classes: bool,
    /// The data port whose kernel relay table is removed at exit.
    kfwd: Option<u16>,
    keeper: Option<Arc<crate::shell::netfilter::Keeper>>,
}

impl Resources {
    async fn cleanup(&mut self) {
        // No repair of the rules while they are being removed.
        if let Some(k) = self.keeper.take() {
            k.stop();
        }
        if self.netfilter {
            intercept::remove_rules();
        }
        if self.acct {
            acct::remove();
        }
        if let Some(port) = self.kfwd {
            crate::shell::kfwd::remove(port);
        }
        if self.traffic {
            traffic::remove();
        }
        if self.classes {
            crate::shell::classes::remove();
        }
        // The sysctls detour changed (REPLEX's hash policy), from the state file.
        crate::shell::sysctl::restore();
        if self.dscp {
            priority::remove_dscp_rules();
        }
        if let Some(dev) = self.qdisc.take() {
            priority::remove_qdisc(&dev);
        }
        match self.nl.observe(&self.links, self.owned).await {
            Ok((actual, index)) => {
                for op in kernel::teardown(&actual) {
                    if let Err(e) = self.nl.apply(&op, self.table, &index).await {
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

/// The underlay routes of the destinations REPLEX splits (the direct members of their
/// nexthop groups).
async fn underlay_hops(nl: &Netlink, model: &Model, protect: &[Option<Protect>]) -> UnderlayHops {
    let mut hops = UnderlayHops::new();
    for (i, pr) in protect.iter().enumerate() {
        let Some(pr) = pr.as_ref().filter(|p| p.split.is_some()) else { continue };
        if i >= model.peers.len() {
            continue;
        }
        for dst in model.split_destinations(i, pr) {
            match nl.underlay_route(dst.addr(), model.cfg.kernel.fwmark).await {
                Ok(Some(hop)) => {
                    hops.insert(dst, hop);
                }
                Ok(None) => {}
                Err(e) => tracing::debug!("underlay route to {dst}: {e:#}"),
            }
        }
    }
    hops
}

/// Waits for the next notification of a kernel change (and takes the rest of its burst);
/// `None` when the notifications ended. Never returns without notifications.
async fn next_change(
    watch: &mut Option<futures::channel::mpsc::UnboundedReceiver<(netlink_packet_core::NetlinkMessage<netlink_packet_route::RouteNetlinkMessage>, netlink_sys::SocketAddr)>>,
) -> Option<()> {
    use futures::StreamExt;
    let Some(w) = watch else { return std::future::pending().await };
    w.next().await?;
    while w.try_recv().is_ok() {}
    Some(())
}

/// When the next reconcile pass runs: [`RECONCILE_SETTLE`] after the first change the
/// kernel reported since the last pass, but not sooner than [`RECONCILE_INTERVAL`] after
/// it; [`RECONCILE_SAFETY`] after it without a change.
fn next_pass(last: Instant, changed: Option<Instant>) -> Instant {
    match changed {
        Some(t) => (t + RECONCILE_SETTLE).max(last + RECONCILE_INTERVAL),
        None => last + RECONCILE_SAFETY,
    }
}

/// When a change of the model (peers learned from the directory, their interfaces) is
/// applied to the kernel: [`MODEL_SETTLE`] after the first change, and not sooner than
/// [`MODEL_SPACING`] after the last such pass. A node learns a hundred nodes in a few
/// bursts while an overlay starts, and each pass reads the kernel's links, addresses,
/// routes and rules (about 15 dumps) and clones the model: one pass per record made the
/// start of 100 nodes on two cores slower for all of them (issue 11). Protection changes
/// (the failover moving routes) are applied at once.
pub fn model_pass_at(last: Instant, changed: Option<Instant>) -> Instant {
    changed.map_or(last, |t| (t + MODEL_SETTLE).max(last + MODEL_SPACING))
}

/// Makes the kernel match the model. `last` is the state desired at the previous call:
/// what differs from it is a change of the model being applied, not drift, and is logged
/// at debug level like everything when `quiet`; only a difference the kernel grew while
/// the desired state stayed the same is reported as drift. (A route for a node just
/// learned from the directory was reported as repaired drift when the reconcile tick came
/// before the notification of the change.)
async fn reconcile(nl: &Netlink, model: &Model, protect: &[Option<Protect>], quiet: bool, last: &mut Option<DesiredState>) -> Result<usize> {
    let hops = underlay_hops(nl, model, protect).await;
    let desired = model.desired_kernel_with(protect, &hops);
    let quiet = quiet || last.as_ref() != Some(&desired);
    *last = Some(desired.clone());
    let names: BTreeSet<String> = desired.links.iter().map(|l| l.name.clone()).collect();
    let (actual, index) = nl.observe(&names, crate::shell::netlink::Owned::of(&model.cfg)).await?;
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

/// Holds a REPLEX or relief split back from the kernel until the accounting thread has
/// confirmed its connection pins ([`Model::gate_splits`]). Without an accounting thread
/// (its chains were refused) nothing is held back.
#[derive(Debug, Default)]
struct SplitGate {
    /// Whether splits wait for their pins (the accounting thread runs).
    active: bool,
    /// (peer, destination) whose pin rules the accounting thread reported installed.
    pinned: HashSet<(usize, ipnet::IpNet)>,
    /// The protection put in the kernel at the last pass.
    applied: Vec<Option<Protect>>,
}

impl SplitGate {
    /// The protection for this pass (remembered as applied).
    fn protect(&mut self, engine: &Engine) -> Vec<Option<Protect>> {
        let wanted = engine.protect();
        let now = if self.active { engine.model().gate_splits(&wanted, &self.applied, &self.pinned) } else { wanted };
        self.applied = now.clone();
        now
    }

    /// Takes the rules the accounting thread installed; true when the pins changed.
    fn installed(&mut self, rules: &[acct::Rule]) -> bool {
        let now: HashSet<(usize, ipnet::IpNet)> = rules.iter().map(|r| (r.peer, r.dst)).collect();
        let changed = now != self.pinned;
        self.pinned = now;
        changed
    }
}

/// One pass of the kernel reconcile for the engine's model and protection (see
/// [`reconcile`]), splits held back by `gate` until their pins are in; a failure is logged
/// and the next pass tries again.
async fn kernel_pass(nl: &Netlink, engine: &Engine, gate: &mut SplitGate, quiet: bool, last: &mut Option<DesiredState>) {
    let protect = gate.protect(engine);
    if let Err(e) = reconcile(nl, engine.model(), &protect, quiet, last).await {
        tracing::warn!("reconcile: {e:#}");
    }
}

/// Binds the local API on 127.0.0.1 and ::1 (`::1` only where IPv6 is up).
fn bind_api(port: u16) -> Result<Vec<tokio::net::UdpSocket>> {
    let mut v = Vec::new();
    for (ip, required) in [(IpAddr::V4(Ipv4Addr::LOCALHOST), true), (IpAddr::V6(Ipv6Addr::LOCALHOST), false)] {
        match std::net::UdpSocket::bind(SocketAddr::new(ip, port)) {
            Ok(s) => {
                s.set_nonblocking(true)?;
                v.push(tokio::net::UdpSocket::from_std(s)?);
            }
            Err(e) if required => return Err(anyhow!("binding the local API on {ip} port {port}: {e} (set management.api_port, or 0 to turn the API off)")),
            Err(e) => tracing::debug!("local API on {ip}: {e}"),
        }
    }
    Ok(v)
}

/// What a configuration reload needs besides the engine ([`reload`]).
struct Reloader {
    /// The configuration file.
    path: PathBuf,
    /// Where the other overlays' configurations are (a reload must not collide with them).
    overlays: PathBuf,
    /// The configuration in use, as read from the file.
    running: Config,
    /// This node's ID (a reload cannot change the key).
    node_id: crate::identity::NodeId,
    set_log_level: SetLogLevel,
    /// Traffic detection could not start: every peer is probed at the fast rate.
    idle_off: bool,
    /// The traffic detection rules to replace when the configured peers change: keeper,
    /// nflog group and fwmark.
    traffic: Option<(Arc<crate::shell::netfilter::Keeper>, u16, u32)>,
    /// The metrics server.
    metrics: Option<tokio::task::JoinHandle<()>>,
    metrics_queries: Option<mpsc::UnboundedSender<Query>>,
}

/// Starts the Prometheus metrics server on `addr`, answering from the loop through
/// `queries`.
async fn start_metrics(addr: SocketAddr, queries: mpsc::UnboundedSender<Query>) -> Result<tokio::task::JoinHandle<()>> {
    let l = crate::shell::metrics::bind(addr).await?;
    let serve = crate::shell::metrics::serve(
        l,
        Arc::new(move || {
            let queries = queries.clone();
            Box::pin(async move {
                let (tx, rx) = oneshot::channel();
                let _ = queries.send(Query::Metrics(tx));
                tokio::time::timeout(QUERY_TIMEOUT, rx).await.ok().and_then(|r| r.ok()).unwrap_or_default()
            })
        }),
    );
    Ok(tokio::spawn(serve))
}

/// Reads the configuration file again and applies what changed (SIGHUP, `detourctl
/// reload`; issue 15): validated fully first (the messages of `--check-config`), compared
/// with the running configuration ([`crate::node::reload::plan`]: a change only a restart
/// can make is refused with its keys named), then handed to the engine, which touches only
/// what changed. The log level, the metrics listener and the traffic detection rules
/// follow here. Returns what changed, one line each.
///
/// # Errors
/// Why the new configuration was refused; the running one then stays whole.
async fn reload(r: &mut Reloader, engine: &mut Engine) -> std::result::Result<Vec<String>, String> {
    let file = r.path.display().to_string();
    let (mut new, id) = crate::shell::files::load_checked(&r.path, &r.overlays).map_err(|e| format!("{e}; nothing was changed"))?;
    if id.node_id() != r.node_id {
        return Err(format!("{file}: node.private_key: the key is not the one detourd runs with; a new key needs a restart; nothing was changed"));
    }
    let plan = crate::node::reload::plan(&r.running, &new).map_err(|keys| format!("{file}: only a restart of detourd can change {}; nothing was changed", keys.join(", ")))?;
    if plan.is_empty() {
        return Ok(Vec::new());
    }
    let from_file = new.clone();
    if r.idle_off {
        new.failover.idle_probe_interval = new.failover.probe_interval;
    }
    let moves = engine.reconfigure(&plan, new).map_err(|e| format!("{file}: {e}; nothing was changed"))?;
    r.running = from_file;
    let mut changes = plan.describe();
    if plan.settings.contains(&crate::node::reload::key::LOG_LEVEL) {
        if let Err(e) = (r.set_log_level)(&r.running.node.log_level) {
            changes.push(format!("node.log_level not applied: {e}"));
        }
    }
    if plan.settings.contains(&crate::node::reload::key::METRICS) {
        if let Some(h) = r.metrics.take() {
            h.abort();
        }
        if let (Some(addr), Some(q)) = (r.running.node.metrics_listen, r.metrics_queries.clone()) {
            match start_metrics(addr, q).await {
                Ok(h) => r.metrics = Some(h),
                Err(e) => changes.push(format!("node.metrics_listen: {e:#}; metrics are off")),
            }
        }
    }
    let peers_moved = !(moves.added.is_empty() && moves.removed.is_empty() && moves.changed.is_empty());
    if let (true, Some((keeper, group, fwmark))) = (peers_moved, r.traffic.clone()) {
        let dsts = engine.model().configured_protected_destinations();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = traffic::replace(&keeper, &dsts, group, fwmark) {
                tracing::warn!("reload: traffic detection rules: {e:#}");
            }
        });
    }
    for c in &changes {
        tracing::info!("reload: {c}");
    }
    Ok(changes)
}

#[allow(clippy::too_many_arguments)]
async fn run_inner(identity: &Identity, model: Model, nl: Netlink, listener: tokio::net::UnixListener, res: &mut Resources, qdisc: Option<String>, mut reloader: Reloader) -> Result<()> {
    let cfg = model.cfg.clone();
    let table = cfg.kernel.table;

    // State left by a crashed daemon: rules tagged with our protocol, routes in our table,
    // our netfilter chains and qdisc.
    let (stale, index) = nl.observe(&res.links, res.owned).await?;
    let purge = kernel::teardown(&stale);
    if !purge.is_empty() {
        tracing::info!("removing {} kernel objects left by an earlier run", purge.len());
        for op in &purge {
            nl.apply(op, table, &index).await?;
        }
    }
    // Sysctls an earlier run changed and did not put back.
    let n = crate::shell::sysctl::restore();
    if n > 0 {
        tracing::info!("restored {n} sysctls an earlier run changed");
    }
    // Every netfilter chain an earlier run may have left, in one look per family.
    let chains: Vec<(&str, String)> = [intercept::chains(), priority::chains(), acct::chains(), traffic::chains(), crate::shell::classes::chains()].concat();
    crate::shell::netfilter::remove_chains(&chains);
    // The kernel relay table (also when relay forwarding is now off; without nft, nothing).
    crate::shell::kfwd::remove(cfg.node.data_port);
    if let Some(dev) = &qdisc {
        priority::remove_qdisc(dev);
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
    let mgmt_socks: Vec<_> = sockets::bind_all(&cfg.node.listen, cfg.node.management_port, cfg.kernel.fwmark, Some(sockets::MGMT_BUFFER))?.into_iter().map(|b| b.socket).collect();
    let api_socks = match cfg.management.api_port {
        Some(p) => bind_api(p)?,
        None => Vec::new(),
    };

    // detour's netfilter rule sets, kept in place while it runs (see netfilter::Keeper).
    let keeper = Arc::new(crate::shell::netfilter::Keeper::default());
    res.keeper = Some(keeper.clone());
    // Priority of management traffic: HTB (optional), socket priority, DSCP mark.
    let mut sock_priority = priority::DEFAULT_MGMT_PRIORITY;
    // Features the configuration asks for that could not be set up: they stop the start
    // unless node.allow_degraded (then status and metrics show them).
    let mut degraded: Vec<(&'static str, String)> = Vec::new();
    if let Some(dev) = &qdisc {
        match priority::install_qdisc(dev, cfg.management.qdisc_rate) {
            Ok(()) => {
                res.qdisc = Some(dev.clone());
                keeper.keep(Box::new(priority::KeptQdisc { dev: dev.clone(), rate_bps: cfg.management.qdisc_rate }));
                sock_priority = priority::HTB_MGMT_PRIORITY;
                tracing::info!("HTB on {dev}: management traffic first, {} bit/s in all", cfg.management.qdisc_rate);
            }
            Err(e) => degraded.push(("management_qdisc", format!("management.qdisc_interface {dev}: {e:#}"))),
        }
    }
    if let Err(e) = priority::set_socket_priority(&mgmt_socks, sock_priority) {
        tracing::warn!("{e:#}");
    }
    if cfg.management.dscp {
        res.dscp = true;
        if let Err(e) = priority::install_dscp_rules(&keeper, cfg.node.management_port) {
            degraded.push(("dscp_marking", format!("DSCP marking of management traffic (management.dscp): {e:#}")));
        }
    }

    // REPLEX's byte accounting runs iptables on its own thread, never on this loop. Its
    // connection pinning and the L4 multipath hash also serve the relief of degraded paths
    // (a share of new connections moved, established ones kept), on unless turned off
    // (failover.failed_loss = degraded_loss).
    let (acct_tx, mut acct_rx) = mpsc::unbounded_channel();
    let mut acct_worker = None;
    let mut gate = SplitGate::default();
    if cfg.splits() {
        res.acct = true;
        let (set, failed) = acct::set_hash_policy();
        for path in set {
            keeper.keep(Box::new(crate::shell::netfilter::Sysctl { path, value: "1" }));
        }
        if let Some(e) = failed {
            degraded.push(("multipath_hash", format!("REPLEX and relief: {e}")));
        }
        let mut accounting = Accounting::default();
        match accounting.install(&keeper, cfg.kernel.fwmark) {
            Ok(()) => {
                acct_worker = Some(acct::Worker::start(accounting, acct_tx)?);
                gate.active = true;
            }
            Err(e) => degraded.push(("split_accounting", format!("REPLEX and relief: connection pinning and byte accounting (iptables DETOUR-ACCT, DETOUR-PIN): {e:#}"))),
        }
    }

    // Traffic classes (exits that masquerade) and egress NAT (docs/policies.md).
    let egress = model.egress();
    res.classes = true;
    match crate::shell::classes::install(&keeper, &cfg, egress) {
        Ok(true) => tracing::info!("traffic classes and egress rules installed (iptables DETOUR-CLASS, DETOUR-EGRESS, DETOUR-NAT, DETOUR-FWD)"),
        Ok(false) => {}
        Err(e) => degraded.push(("exits", format!("exits and egress (iptables DETOUR-CLASS, DETOUR-EGRESS, DETOUR-NAT, DETOUR-FWD): {e:#}"))),
    }
    if egress && std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").is_ok_and(|v| v.trim() == "0") {
        tracing::warn!("this node offers exit or delivers to networks behind it, but IP forwarding is off: sysctl -w net.ipv4.ip_forward=1");
    }

    let start = Instant::now();
    // From here on, a panic anywhere (a task, the data thread, the ICMP threads) stops the
    // daemon with a non-zero exit after the usual clean-up.
    let health = Arc::new(Health::new(start));
    supervise::install_panic_hook(health.clone());
    let spec = model.dataplane_spec();
    let (data_tx, data_rx) = mpsc::channel(EVENT_QUEUE);
    let dp = Arc::new(DataPath::start(DataPathSetup { spec, tuns, mtus, sockets: data_socks, start, events: data_tx, health: health.clone() })?);
    res.datapath = Some(dp.clone());
    let mut last_desired: Option<DesiredState> = None;
    reconcile(&nl, &model, &[], true, &mut last_desired).await?;

    // Failure detection: the engine, ICMP interception and the TCP monitor.
    let filter = Arc::new(RwLock::new(Filter::default()));
    for net in &cfg.node.networks {
        filter.write().expect("filter").behind.insert(*net, ());
    }
    // Some peer carries traffic: the TCP monitor polls fast only then.
    let traffic_seen = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let icmp_counters = Arc::new(IcmpCounters::default());
    let (alarm_tx, alarm_rx) = mpsc::unbounded_channel();
    let mut icmp_active = false;
    if cfg.failover.icmp && !cfg.peers.is_empty() {
        res.netfilter = true;
        match intercept::install_rules(&keeper, cfg.failover.nfqueue, cfg.instance_mark(), !cfg.node.networks.is_empty())
            .and_then(|_| intercept::start_queue(cfg.failover.nfqueue, cfg.instance_mark(), filter.clone(), icmp_counters.clone(), alarm_tx.clone()))
        {
            Ok(()) => icmp_active = true,
            Err(e) => {
                intercept::remove_rules();
                degraded.push(("icmp_interception", format!("ICMP interception (failover.icmp): {e:#}")));
            }
        }
    }
    // Idle probing needs to know where traffic flows: on the direct path (netfilter log
    // rules, crate::shell::traffic) and through the overlay (the data path reports it).
    // Without the rules every peer is probed at the fast rate.
    let mut model = model;
    if !cfg.peers.is_empty() && cfg.failover.idle_probe_interval > cfg.failover.probe_interval {
        res.traffic = true;
        let dsts = model.configured_protected_destinations();
        let group = cfg.failover.nfqueue;
        match traffic::install(&keeper, &dsts, group, cfg.kernel.fwmark).and_then(|_| traffic::start(group, filter.clone(), icmp_counters.clone(), alarm_tx.clone())) {
            Ok(()) => {
                reloader.traffic = Some((keeper.clone(), group, cfg.kernel.fwmark));
                tracing::info!("traffic detection on {} destinations (nflog group {group}): idle peers are probed every {} ms", dsts.len(), cfg.failover.idle_probe_interval.as_millis())
            }
            Err(e) => {
                traffic::remove();
                reloader.idle_off = true;
                model.cfg.failover.idle_probe_interval = cfg.failover.probe_interval;
                tracing::warn!("no traffic detection ({e:#}): every peer is probed every {} ms", cfg.failover.probe_interval.as_millis());
            }
        }
    }
    if cfg.failover.tcp_monitor && !cfg.peers.is_empty() {
        intercept::start_tcp_monitor(cfg.failover.tcp_poll, traffic_seen.clone(), filter.clone(), icmp_counters.clone(), alarm_tx.clone())?;
    }
    if !degraded.is_empty() {
        let what: Vec<String> = degraded.iter().map(|(_, why)| why.clone()).collect();
        if !cfg.node.allow_degraded {
            return Err(anyhow!("cannot set up what the configuration asks for: {} (fix it, turn the feature off, or set node.allow_degraded = true to start without it)", what.join("; ")));
        }
        for w in &what {
            tracing::warn!("running degraded (node.allow_degraded): {w}");
        }
    }
    // Rules someone else removes or flushes come back within this long.
    keeper.start(NETFILTER_REPAIR)?;
    let local_addrs = refresh_local_addresses(&nl, &dp, &filter, &HashSet::new()).await;

    let allowed = Arc::new(AllowedKeys::new(cfg.peers.iter().map(|p| p.public_key)));
    let mgmt = Arc::new(Management::new(identity, &cfg.node.name, cfg.node.data_port, allowed.clone(), mgmt_socks)?);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (queries, mut query_rx) = mpsc::unbounded_channel::<Query>();
    let mgmt_errors = Arc::new(AtomicU64::new(0));
    let ctx = StatusCtx {
        public_key: identity.public_key(),
        start,
        refused: mgmt.refused.clone(),
        mgmt_errors: mgmt_errors.clone(),
        icmp: icmp_counters,
        icmp_active,
        mgmt_garbage: mgmt.garbage.clone(),
        incoming: Arc::new(sessions::Incoming::new(cfg.management.admission)),
        degraded,
    };
    let mut local_addrs = local_addrs;

    // The long-running tasks: one that ends before shutdown (or panics) stops the daemon.
    let mut tasks: tokio::task::JoinSet<&'static str> = tokio::task::JoinSet::new();
    // The node's state is driven by this loop (no task of its own): sessions, probes,
    // alarms, local API datagrams and timers go to the engine, which carries out what the
    // core decides; the sessions are driven here too.
    let raw = sockets::RawSender::new();
    let mut engine = Engine::new(model, dp.clone(), (allowed, mgmt.refused.clone()), local_addrs.clone(), filter.clone(), traffic_seen, identity.clone(), api_socks, rand::random(), Instant::now());
    let (peer_tx, mut peer_rx) = mpsc::unbounded_channel();
    let mut sessions = Sessions::new(mgmt.clone(), dp.clone(), mgmt_errors.clone(), peer_tx.clone(), shutdown_rx.clone());
    let mut api_rx = engine.start_api();
    if cfg.kernel.relay_forwarding {
        match crate::shell::kfwd::KernelRelay::start(cfg.node.data_port, cfg.kernel.fwmark, engine.model().node.clone()) {
            Ok(k) => {
                engine.set_kernel_relay(k);
                res.kfwd = Some(cfg.node.data_port);
            }
            Err(e) => tracing::warn!("kernel.relay_forwarding: {e:#}; the data thread relays"),
        }
    }
    let (mut data_rx, mut alarm_rx) = (data_rx, alarm_rx);
    drop(alarm_tx);
    let engine_panic = supervise::panic_after(supervise::Part::Engine, supervise::test_panic_after(supervise::Part::Engine));
    tokio::pin!(engine_panic);
    let overlay_panic = supervise::panic_after(supervise::Part::Overlay, supervise::test_panic_after(supervise::Part::Overlay));
    tokio::pin!(overlay_panic);
    for i in 0..cfg.peers.len() {
        sessions.set_want(engine.model(), i, want::CONFIGURED, true);
    }
    for ep in &mgmt.endpoints {
        let accept = sessions::accept_loop(ep.clone(), peer_tx.clone(), mgmt_errors.clone(), ctx.incoming.clone());
        tasks.spawn(async move {
            accept.await;
            "a management accept loop"
        });
    }
    drop(peer_tx);
    let handler_queries = queries.clone();
    let serve = control::serve(
        listener,
        Arc::new(move |req| {
            let queries = handler_queries.clone();
            Box::pin(async move {
                let (tx, rx) = oneshot::channel();
                let _ = queries.send(Query::Control(req, tx));
                match tokio::time::timeout(QUERY_TIMEOUT, rx).await {
                    Ok(Ok(r)) => r,
                    _ => Response::Error { message: format!("detourd did not answer within {} s (busy or stopping)", QUERY_TIMEOUT.as_secs()) },
                }
            })
        }),
    );
    tasks.spawn(async move {
        serve.await;
        "the control socket server"
    });
    if let Some(addr) = cfg.node.metrics_listen {
        reloader.metrics = Some(start_metrics(addr, queries.clone()).await?);
    }
    reloader.metrics_queries = Some(queries.clone());

    tracing::info!(
        "detourd up: node {} ({}), data port {}, management port {}, local API {}, {} configured peers",
        cfg.node.name,
        identity.node_id(),
        cfg.node.data_port,
        cfg.node.management_port,
        cfg.management.api_port.map(|p| p.to_string()).unwrap_or_else(|| "off".into()),
        cfg.peers.len()
    );
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let mut watchdog_usec = 0u64;
    let watchdog = sd_notify::watchdog_enabled(false, &mut watchdog_usec);
    let mut wd = tokio::time::interval(Duration::from_micros((watchdog_usec / 2).max(10_000)));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    // Reconciled when the kernel reports a change, at most every RECONCILE_INTERVAL; at once
    // when the model or the protection changes; every RECONCILE_SAFETY in any case. Without
    // notifications, every RECONCILE_INTERVAL as before.
    let mut watch = match Netlink::watch() {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!("{e:#}: reconciling the kernel every {} s instead", RECONCILE_INTERVAL.as_secs());
            None
        }
    };
    let mut last_pass = Instant::now();
    let mut changed: Option<Instant> = watch.is_none().then_some(last_pass);
    // Changes of the model (nodes learned, links opened) are applied together.
    let mut model_changed: Option<Instant> = None;
    let mut last_model_pass = last_pass;
    drop(queries);
    let mut last_links = link_names(engine.model());
    let mut activity = tokio::time::interval(Duration::from_secs(1));
    let mut silence = tokio::time::interval(sessions::SILENCE_CHECK);
    silence.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut fatal: Option<String> = None;
    let mut stalled_logged = false;
    loop {
        health.beat(supervise::Part::Engine);
        health.beat(supervise::Part::Overlay);
        let wake = engine.wake();
        let dial_at = sessions.next_wake();
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: stopping"); break; }
            reason = health.failed() => { fatal = Some(reason); break; }
            _ = &mut engine_panic => {}
            _ = &mut overlay_panic => {}
            Some(ev) = peer_rx.recv() => sessions.on_event(engine.model(), ev),
            _ = async { match dial_at { Some(t) => tokio::time::sleep_until(t.into()).await, None => std::future::pending().await } } => sessions.on_timer(engine.model(), Instant::now()),
            Some((from, data)) = api_rx.recv() => engine.on_api(from, &data),
            Some(q) = query_rx.recv() => {
                // Status is built from the node state when someone asks (detourctl, a
                // metrics scrape), never on a timer: an idle node does no work for status.
                let view = engine.view(sessions.peers());
                let m = engine.model();
                match q {
                    Query::Control(Request::Why { destination }, tx) => {
                        let r = why(&ctx, &engine, &mut sessions, &view, &nl, &destination).await;
                        let _ = tx.send(r);
                    }
                    Query::Control(Request::Reload, tx) => {
                        drop(view);
                        let r = match reload(&mut reloader, &mut engine).await {
                            Ok(changes) => Response::Reloaded { changes },
                            Err(e) => {
                                tracing::error!("reload refused: {e}");
                                Response::Error { message: format!("reload refused: {e}") }
                            }
                        };
                        let _ = tx.send(r);
                    }
                    Query::Control(req, tx) => {
                        let _ = tx.send(handle(&ctx, m, &mut sessions, &view, req));
                    }
                    Query::Metrics(tx) => {
                        let _ = tx.send(crate::ctl::render_metrics(&status(&ctx, m, &mut sessions, &view), &paths(m, &sessions, &view)));
                    }
                }
            }
            Some(ev) = data_rx.recv() => {
                // A burst of probes is taken in one go: the core's next wake-up is worked out
                // once for all of them, not once per probe.
                engine.on_data(ev);
                take_queued(&mut engine, &mut data_rx);
            }
            Some(alarm) = alarm_rx.recv() => engine.on_alarm(alarm),
            _ = tokio::time::sleep_until(wake.into()) => {
                // Probes and echoes already queued are taken first: a path must not be
                // judged silent while its answer waits in this loop's own queue.
                take_queued(&mut engine, &mut data_rx);
                engine.on_timeout();
            }
            Some(r) = tasks.join_next() => {
                fatal = Some(match r {
                    Ok(name) => format!("{name} stopped"),
                    Err(e) => format!("a task failed: {e}"),
                });
                break;
            }
            _ = int.recv() => { tracing::info!("SIGINT: stopping"); break; }
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading {}", reloader.path.display());
                match reload(&mut reloader, &mut engine).await {
                    Ok(c) if c.is_empty() => tracing::info!("reload: configuration unchanged"),
                    Ok(_) => {}
                    Err(e) => tracing::error!("reload refused: {e}"),
                }
            }
            ev = next_change(&mut watch) => {
                if ev.is_none() {
                    tracing::warn!("kernel change notifications ended: reconciling the kernel every {} s", RECONCILE_INTERVAL.as_secs());
                    watch = None;
                }
                changed.get_or_insert_with(Instant::now);
            }
            _ = tokio::time::sleep_until(next_pass(last_pass, changed).into()) => {
                last_pass = Instant::now();
                changed = watch.is_none().then_some(last_pass);
                // Drift is only reported for links that were there at the last check: an
                // interface that just came or went (an on-demand link) is still settling.
                let links = link_names(engine.model());
                let settled = links == last_links;
                last_links = links;
                kernel_pass(&nl, &engine, &mut gate, !settled, &mut last_desired).await;
                let now = refresh_local_addresses(&nl, &dp, &filter, &local_addrs).await;
                if now != local_addrs {
                    local_addrs = now;
                    engine.set_local_addrs(local_addrs.clone());
                }
            }
            _ = silence.tick() => sessions.check_silence(engine.model(), Instant::now()),
            _ = activity.tick() => {
                sessions.check_activity(engine.model_mut(), Instant::now());
                if let Some(w) = &acct_worker {
                    w.update(accounting_rules(engine.model(), &engine.protect()));
                }
            }
            Some(report) = acct_rx.recv() => {
                if let Some(counts) = report.counts {
                    let n = engine.model().peers.len();
                    let mut sums = vec![0u64; n];
                    for (peer, bytes) in counts {
                        if let Some(s) = sums.get_mut(peer) {
                            *s += bytes;
                        }
                    }
                    engine.set_direct_bytes(sums);
                }
                if gate.installed(&report.installed) {
                    // Pins came or went: a split held back may go to the kernel now.
                    kernel_pass(&nl, &engine, &mut gate, true, &mut last_desired).await;
                }
            }
            _ = tokio::time::sleep_until(model_pass_at(last_model_pass, model_changed).into()), if model_changed.is_some() => {
                // Peers or their interfaces changed.
                model_changed = None;
                last_model_pass = Instant::now();
                res.links = res.links.union(&link_names(engine.model())).cloned().collect();
                kernel_pass(&nl, &engine, &mut gate, true, &mut last_desired).await;
            }
            _ = wd.tick(), if watchdog => {
                // Fed only while every part makes progress: a hung engine or data thread
                // lets systemd's watchdog restart the daemon.
                let stalled = health.stalled(Instant::now());
                if stalled.is_empty() {
                    stalled_logged = false;
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                } else if !stalled_logged {
                    stalled_logged = true;
                    let names: Vec<&str> = stalled.iter().map(|p| p.as_str()).collect();
                    tracing::error!("no progress for {} s in: {}; the watchdog is not fed", supervise::STALL.as_secs(), names.join(", "));
                }
            }
        }
        engine.after_event();
        pump(&mut engine, &mut sessions);
        if engine.take_model_changed() | sessions.take_model_changed() {
            model_changed.get_or_insert_with(Instant::now);
        }
        if engine.take_kernel_change() {
            // Protection or exits changed: move the routes now, not at the next tick, and
            // the connection pins a new split needs (it waits for them, SplitGate).
            if let Some(w) = &acct_worker {
                w.update(accounting_rules(engine.model(), &engine.protect()));
            }
            kernel_pass(&nl, &engine, &mut gate, true, &mut last_desired).await;
        }
        for syn in engine.take_syns() {
            // After the routes moved: the SYN an ICMP error quoted goes out again on the
            // new route, instead of at the connection's retransmission timer.
            match raw.send(&syn) {
                Ok(_) => tracing::debug!("SYN sent again after the reroute ({} bytes)", syn.len()),
                Err(e) => tracing::debug!("sending a SYN again: {e}"),
            }
        }
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    let _ = shutdown_tx.send(true);
    if let Some(reason) = &fatal {
        tracing::error!("stopping: {reason}");
    }
    // The relay sessions this node uses are released before the sessions close.
    engine.shutdown();
    sessions.shutdown();
    res.links = link_names(engine.model());
    drop(engine);
    drop(sessions);
    tokio::time::sleep(Duration::from_millis(50)).await;
    for ep in &mgmt.endpoints {
        ep.close(quic::close::SHUTDOWN.into(), b"shutdown");
    }
    for ep in &mgmt.endpoints {
        let _ = tokio::time::timeout(Duration::from_millis(500), ep.wait_idle()).await;
    }
    tasks.abort_all();
    drop(mgmt);
    match fatal {
        Some(reason) => Err(anyhow!("{reason}")),
        None => Ok(()),
    }
}

/// Hands the engine the data-plane events already queued, up to
/// [`crate::shell::engine::DATA_BATCH`] of them.
fn take_queued(engine: &mut Engine, rx: &mut mpsc::Receiver<crate::shell::datapath::DataEvent>) {
    for _ in 0..crate::shell::engine::DATA_BATCH {
        match rx.try_recv() {
            Ok(ev) => engine.on_data(ev),
            Err(_) => break,
        }
    }
}

/// Hands what the engine wants of the sessions to the session table and what the
/// sessions report to the engine, until neither has more.
fn pump(engine: &mut Engine, sessions: &mut Sessions) {
    loop {
        let wants = engine.take_wants();
        let events = sessions.take_events();
        if wants.is_empty() && events.is_empty() {
            return;
        }
        for w in wants {
            match w {
                SessionWant::Want(i, bit, on) => sessions.set_want(engine.model(), i, bit, on),
                SessionWant::Data(i) => sessions.need_session(engine.model_mut(), i),
                SessionWant::Forgotten(i) => sessions.forgotten(engine.model_mut(), i),
                SessionWant::Removed(i) => sessions.removed(engine.model(), i),
            }
        }
        for ev in events {
            engine.on_session(ev);
        }
        engine.after_event();
    }
}

/// The accounting rules the REPLEX splits need now: one per split destination.
fn accounting_rules(m: &Model, protect: &[Option<Protect>]) -> Vec<acct::Rule> {
    protect
        .iter()
        .enumerate()
        .filter_map(|(i, p)| p.as_ref().filter(|p| p.split.is_some()).map(|p| (i, p)))
        .filter(|(i, _)| *i < m.peers.len())
        .flat_map(|(i, p)| m.split_destinations(i, p).into_iter().map(move |dst| (i, dst)))
        .map(|(i, dst)| acct::Rule { peer: i, dst, tun: m.peers[i].cfg.interface.clone() })
        .collect()
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

/// `detourctl why DESTINATION`: how detour routes an address, a peer's name or a node ID
/// now ([`crate::ctl::Why`]), with the kernel's route for an application's packet
/// compared with what detour expects.
async fn why(ctx: &StatusCtx, engine: &Engine, sessions: &mut Sessions, view: &EngineView, nl: &Netlink, destination: &str) -> Response {
    let m = engine.model();
    let addr: IpAddr = match destination.parse::<IpAddr>() {
        Ok(a) => a.to_canonical(),
        Err(_) => {
            let peer = destination.parse::<crate::identity::NodeId>().ok().and_then(|id| m.index_of(&id)).or_else(|| m.peers.iter().position(|p| p.cfg.name == destination && p.present));
            let Some(i) = peer else {
                return Response::Error { message: format!("{destination}: not an IP address, and no peer or directory node has that name or node ID") };
            };
            let c = &m.peers[i].cfg;
            match c.overlay_v4.map(IpAddr::V4).or(c.overlay_v6.map(IpAddr::V6)) {
                Some(a) => a,
                None => return Response::Error { message: format!("{destination}: node {} has no overlay address", c.name) },
            }
        }
    };
    let learned: Vec<Vec<IpAddr>> = sessions.peers().iter().map(|p| p.endpoint.map(|e| vec![e.ip().to_canonical()]).unwrap_or_default()).collect();
    let found = m.route_of(addr, &learned);
    let protect = engine.protect();
    let detour_devs: HashSet<String> = m.peers.iter().filter(|p| p.tun).map(|p| p.cfg.interface.clone()).chain([m.cfg.kernel.aggregate_interface.clone()]).collect();
    let kernel = match nl.route_get(addr, None).await {
        Ok(r) => r,
        Err(e) => return Response::Error { message: format!("asking the kernel for its route to {addr}: {e:#}") },
    };
    let kernel_route = kernel.as_ref().map(|r| {
        let mut t = r.dev.as_deref().map(|d| format!("dev {d}")).unwrap_or_else(|| "nexthop group".into());
        if let Some(g) = r.gateway {
            t += &format!(" via {g}");
        }
        t + &format!(" table {}", r.table)
    });
    let on_detour = kernel.as_ref().and_then(|r| r.dev.as_ref()).map(|d| detour_devs.contains(d));
    let status = status(ctx, m, sessions, view);
    let all_paths = paths(m, sessions, view);
    let mut w = crate::ctl::Why {
        destination: destination.to_string(),
        address: Some(addr.to_string()),
        kind: "not routed by detour".into(),
        prefix: None,
        peer: None,
        paths: Vec::new(),
        through_overlay: false,
        kernel_route,
        expected: "the kernel's own routes (detour does not route it)".into(),
        kernel_matches: on_detour.map(|d| !d),
    };
    let detour_iface =
        |i: usize| format!("a detour interface ({} or {})", if m.peers[i].tun { &m.peers[i].cfg.interface } else { &m.cfg.kernel.aggregate_interface }, m.cfg.kernel.aggregate_interface);
    // The peer that carries it: (peer, kind, prefix, through the overlay now, what the
    // kernel should show, whether it does).
    let exit = m.exits.iter().filter(|e| e.dst.contains(&addr)).max_by_key(|e| e.dst.prefix_len());
    let target = match (found, exit) {
        (Some(found), _) => {
            let p = protect.get(found.peer).cloned().flatten();
            let overlay = found.kind != crate::node::model::RouteKind::Protected;
            let through = overlay || p.is_some();
            let (expected, matches) = if !overlay && p.as_ref().is_some_and(|p| p.split.is_some()) {
                ("split by REPLEX or relief: the direct route or a detour interface, by flow".into(), kernel.as_ref().map(|_| true))
            } else if through {
                (detour_iface(found.peer), on_detour)
            } else {
                ("the underlay (the direct path is healthy)".into(), on_detour.map(|d| !d))
            };
            Some((found.peer, found.kind.as_str().to_string(), found.prefix, through, expected, matches))
        }
        // An outside destination routed through an exit node now: a masquerading exit takes
        // only new (marked) connections, so an unmarked lookup sees the direct route.
        (None, Some(e)) => {
            let kind = format!("outside destination through exit node {}{}", m.peers[e.via].cfg.name, if e.masquerade { " (masquerading: new connections only)" } else { "" });
            let (expected, matches) = if e.masquerade {
                ("new connections through the exit (table kernel.table + 3), established ones direct".into(), kernel.as_ref().map(|_| true))
            } else {
                (detour_iface(e.via), on_detour)
            };
            Some((e.via, kind, e.dst, true, expected, matches))
        }
        (None, None) => {
            if m.cfg.exit.watch.iter().chain(&m.cfg.exit.always).any(|n| n.contains(&addr)) {
                w.kind = "outside destination watched by [exit]: direct while reachable, through an exit node once it is not".into();
            }
            None
        }
    };
    if let Some((i, kind, prefix, through, expected, matches)) = target {
        let name = &m.peers[i].cfg.name;
        w.peer = status.peers.into_iter().find(|s| s.name == *name);
        w.paths = all_paths.into_iter().find(|x| x.name == *name).map(|x| x.paths).unwrap_or_default();
        w.kind = if w.peer.is_some() { kind } else { format!("{kind} of directory node {name} (no session)") };
        (w.prefix, w.through_overlay, w.expected, w.kernel_matches) = (Some(prefix.to_string()), through, expected, matches);
    }
    Response::Why(Box::new(w))
}

fn secs(i: Option<Instant>) -> Option<f64> {
    i.map(|t| t.elapsed().as_secs_f64())
}

fn handle(ctx: &StatusCtx, m: &Model, sessions: &mut Sessions, view: &EngineView, req: Request) -> Response {
    match req {
        Request::Status => Response::Status(Box::new(status(ctx, m, sessions, view))),
        Request::Paths => Response::Paths { peers: paths(m, sessions, view) },
        Request::Nodes => Response::Nodes { nodes: view.overlay.nodes.clone() },
        // Answered by the loop itself (they change the engine or ask the kernel).
        Request::Reload | Request::Why { .. } => Response::Error { message: "handled by the daemon's loop".into() },
    }
}

/// Peers shown in status: configured ones, and directory nodes with a session or a TUN.
fn shown(m: &Model, sessions: &Sessions) -> Vec<usize> {
    let peers = sessions.peers();
    (0..m.peers.len()).filter(|&i| m.peers[i].configured || (m.peers[i].present && (m.peers[i].tun || peers.get(i).is_some_and(|p| p.conn.is_some())))).collect()
}

fn paths(m: &Model, sessions: &Sessions, view: &EngineView) -> Vec<crate::ctl::PeerPaths> {
    let routes = &view.routes;
    shown(m, sessions)
        .into_iter()
        .map(|i| crate::ctl::PeerPaths {
            name: m.peers[i].cfg.name.clone(),
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

fn status(ctx: &StatusCtx, m: &Model, sessions: &mut Sessions, view: &EngineView) -> Status {
    let cfg = &m.cfg;
    let now_ms = ctx.start.elapsed().as_millis() as u64;
    let routes = &view.routes;
    let show = shown(m, sessions);
    let default = PeerInfo::default();
    let infos = sessions.peers();
    let peers = show
        .into_iter()
        .map(|i| {
            let def = &m.peers[i];
            let p = &def.cfg;
            let info = infos.get(i).unwrap_or(&default);
            let route = routes.get(i).and_then(|r| r.clone());
            let c = &def.counters;
            let last_rx = c.last_rx_ms.load(Relaxed);
            let links = &def.links;
            let mut link_addresses: Vec<String> = Vec::new();
            if def.tun {
                link_addresses.extend(links.local_v4.map(|a| a.to_string()));
                link_addresses.push(format!("{}%{}", links.local_v6, p.interface));
            }
            PeerStatus {
                name: p.name.clone(),
                kind: if def.configured { "configured".into() } else { "directory".into() },
                node_id: p.node_id.to_string(),
                interface: if def.tun { p.interface.clone() } else { cfg.kernel.aggregate_interface.clone() },
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
                flaps: route.as_ref().map(|r| r.flaps).unwrap_or(0),
                flap_penalty: route.as_ref().map(|r| (r.flap_penalty * 100.0).round() / 100.0).unwrap_or(0.0),
                hold_down_ms: route.as_ref().map(|r| r.hold_down.as_millis() as u64).unwrap_or(0),
                degraded: route.as_ref().and_then(|r| r.degraded).map(|(loss, rise)| format!("loss {:.0} %, rtt +{} ms", loss * 100.0, rise.as_millis())),
                relief_share: route.as_ref().and_then(|r| r.relief.as_ref()).map(|(_, s)| *s).unwrap_or(0.0),
                relief_via: route.as_ref().and_then(|r| r.relief.as_ref()).map(|(v, _)| v.clone()),
                traffic: route.as_ref().is_some_and(|r| r.traffic),
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
                relays: route
                    .as_ref()
                    .map(|r| {
                        r.relays
                            .iter()
                            .map(|x| crate::ctl::RelayRow {
                                name: x.name.clone(),
                                policy: x.policy.clone(),
                                failover: x.failover.clone().err(),
                                performance: x.performance.clone().err(),
                                state: x.state.clone(),
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                shares: route
                    .as_ref()
                    .map(|r| {
                        r.shares
                            .iter()
                            .map(|x| crate::ctl::RouteShare { path: x.path.clone(), status: x.status.clone(), target_share: x.target, realized_share: x.realized, cost_ms: x.cost_ms })
                            .collect()
                    })
                    .unwrap_or_default(),
            }
        })
        .collect();
    let (refused, last_key) = ctx.refused.snapshot();
    let (incoming_handshakes, pending_handshakes) = ctx.incoming.snapshot();
    let (management_handshakes, management_handshakes_last_minute) = (sessions.handshakes.total, sessions.handshakes.last_minute(Instant::now()));
    Status {
        node: NodeStatus {
            name: cfg.node.name.clone(),
            node_id: m.local.to_string(),
            public_key: ctx.public_key.to_string(),
            data_port: cfg.node.data_port,
            management_port: cfg.node.management_port,
            overlay_ipv4: cfg.node.overlay_v4.map(|n| n.to_string()),
            overlay_ipv6: cfg.node.overlay_v6.map(|n| n.to_string()),
            aggregate_interface: cfg.kernel.aggregate_interface.clone(),
            uptime_s: ctx.start.elapsed().as_secs(),
            policy: cfg.node.policy.describe(crate::shell::mnode::unix_now()),
            refusals: view.refusals.iter().map(|(r, n)| (r.as_str().to_string(), *n)).filter(|(_, v)| *v > 0).collect(),
            exits: view.exits.clone(),
        },
        peers,
        drops: m.node.drops.snapshot().into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        refused_handshakes: refused,
        last_refused_key: last_key,
        management_errors: ctx.mgmt_errors.load(Relaxed),
        management_garbage: ctx.mgmt_garbage.load(Relaxed),
        socket_drops: [("data", Some(cfg.node.data_port)), ("management", Some(cfg.node.management_port)), ("api", cfg.management.api_port)]
            .into_iter()
            .filter_map(|(name, port)| Some((name.to_string(), sockets::udp_drops(port?))))
            .collect(),
        late_loops: view.late,
        management_handshakes,
        management_handshakes_last_minute,
        incoming_handshakes,
        pending_handshakes: pending_handshakes as u64,
        icmp: crate::ctl::IcmpStatus {
            active: ctx.icmp_active,
            rerouted: ctx.icmp.rerouted.load(Relaxed),
            ignored: ctx.icmp.ignored_snapshot().into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            tcp_stalls: ctx.icmp.tcp_stalls.load(Relaxed),
            traffic_reports: ctx.icmp.traffic_reports.load(Relaxed),
            traffic_ignored: ctx.icmp.traffic_ignored.load(Relaxed),
        },
        relayed_packets: m.node.relayed_packets.load(Relaxed),
        relayed_bytes: m.node.relayed_bytes.load(Relaxed),
        relaying: view.relaying.iter().map(|(a, b)| format!("{a} <-> {b}")).collect(),
        degraded: ctx.degraded.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
        management: view.overlay.status.clone(),
    }
}
