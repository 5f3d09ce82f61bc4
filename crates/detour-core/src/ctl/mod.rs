//! The local control protocol between `detourctl` and `detourd`, and its text rendering.
//!
//! Transport: a Unix stream socket (root only: mode 0600 and a peer-credential check). The
//! client writes one JSON request on one line; the daemon answers with one JSON line.
//! Anything else gets an error answer. `--json` output of `detourctl` is exactly the
//! response object.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// Largest request line the daemon reads (bytes).
pub const MAX_REQUEST: usize = 64 * 1024;

/// A request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The node and all peers.
    Status,
    /// Every monitored path with RTT, loss and state.
    Paths,
    /// The node directory.
    Nodes,
    /// Read the configuration file again and apply what changed (as SIGHUP does).
    Reload,
    /// How detour routes a destination now, and why ([`Why`]).
    Why {
        /// An IP address, a peer's name or a node ID.
        destination: String,
    },
}

/// A response.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// Answer to [`Request::Status`].
    Status(Box<Status>),
    /// Answer to [`Request::Paths`].
    Paths {
        /// One entry per peer.
        peers: Vec<PeerPaths>,
    },
    /// Answer to [`Request::Nodes`].
    Nodes {
        /// Every node in the directory, this one included.
        nodes: Vec<NodeRow>,
    },
    /// Answer to [`Request::Why`].
    Why(Box<Why>),
    /// Answer to [`Request::Reload`]: the new configuration is in use.
    Reloaded {
        /// What changed, one line each (empty: nothing).
        changes: Vec<String>,
    },
    /// The request was not understood or failed (a refused reload: the reasons, and the
    /// running configuration stays).
    Error {
        /// What went wrong.
        message: String,
    },
}

/// `detourctl status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// This node.
    pub node: NodeStatus,
    /// Every configured peer.
    pub peers: Vec<PeerStatus>,
    /// Drops not attributable to a peer, by reason.
    pub drops: BTreeMap<String, u64>,
    /// Management handshakes refused because the peer presented an unknown key.
    pub refused_handshakes: u64,
    /// The last unknown key presented, if any.
    pub last_refused_key: Option<String>,
    /// Management connections that failed: TLS handshakes that did not complete (refused
    /// keys included) and sessions closed for a protocol error.
    pub management_errors: u64,
    /// Datagrams on the management port that cannot be QUIC (shorter than any QUIC packet,
    /// or without QUIC's fixed bit), dropped before the QUIC endpoint.
    #[serde(default)]
    pub management_garbage: u64,
    /// Datagrams the kernel dropped because a socket's receive buffer was full, by socket
    /// (`data`, `management`, `api`), since the sockets opened.
    #[serde(default)]
    pub socket_drops: BTreeMap<String, u64>,
    /// Management handshakes completed since start (sessions set up, both directions).
    #[serde(default)]
    pub management_handshakes: u64,
    /// Incoming management handshake attempts by what admission made of them
    /// ([`crate::overlay::admission`]): accepted, answered with a Retry, dropped for the
    /// source's rate or for too many in progress.
    #[serde(default)]
    pub incoming_handshakes: crate::overlay::admission::AdmissionCounters,
    /// Incoming management handshakes in progress now.
    #[serde(default)]
    pub pending_handshakes: u64,
    /// Management handshakes completed in the last minute: an idle overlay sets up
    /// sessions only when neighbours or links change.
    #[serde(default)]
    pub management_handshakes_last_minute: u64,
    /// Times the failover engine ran late (a tick or a probe more than two probe
    /// intervals behind): probe loss is not judged for a moment then, so an overloaded
    /// node does not reroute healthy paths.
    #[serde(default)]
    pub late_loops: u64,
    /// ICMP interception and TCP monitoring.
    pub icmp: IcmpStatus,
    /// Datagrams this node relayed for others.
    pub relayed_packets: u64,
    /// Bytes this node relayed for others.
    pub relayed_bytes: u64,
    /// Relay sessions this node serves, as "a <-> b".
    pub relaying: Vec<String>,
    /// Features the configuration asks for that could not be set up (the node started
    /// anyway because of `node.allow_degraded`): feature and reason.
    #[serde(default)]
    pub degraded: BTreeMap<String, String>,
    /// The management overlay.
    pub management: ManagementStatus,
}

/// The management overlay in `detourctl status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ManagementStatus {
    /// Nodes in the directory (this one included).
    pub directory_nodes: usize,
    /// Neighbours the reliability rule asks for now.
    pub target_neighbours: usize,
    /// Neighbours this node chose that have no session yet (0 once its neighbour set is
    /// complete).
    #[serde(default)]
    pub neighbours_missing: usize,
    /// Measured availability of neighbours (0..1).
    pub availability: f64,
    /// Management sessions: configured peers, chosen neighbours, nodes that chose this
    /// one, and on-demand links.
    pub neighbours: Vec<NeighbourRow>,
    /// Node records rejected, by reason (`bad_signature`, `key_mismatch`, `stale`,
    /// `expired`, `malformed`).
    pub rejected_records: BTreeMap<String, u64>,
    /// Records received again (flooding delivers most records more than once; a replayed
    /// current record counts here too).
    pub duplicate_records: u64,
    /// Links of the flood tree made lazy at this node's request (it sent a prune: their
    /// pushes brought only records it had), and made eager again (it asked for a record
    /// they announced that no other link brought in time).
    #[serde(default)]
    pub flood_prunes: u64,
    /// See `flood_prunes`.
    #[serde(default)]
    pub flood_grafts: u64,
    /// Records this node published.
    pub records_published: u64,
    /// Records accepted from others.
    pub records_accepted: u64,
    /// Routed messages waiting for their acknowledgement.
    pub pending_messages: usize,
    /// Retransmissions of routed messages on other paths.
    pub retransmissions: u64,
    /// Routed messages dropped on the way through this node, by reason.
    pub routing_drops: BTreeMap<String, u64>,
    /// Names this node holds.
    pub names: Vec<String>,
    /// The local API.
    pub api: ApiStatus,
}

/// One management session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NeighbourRow {
    /// Node name.
    pub name: String,
    /// Node ID.
    pub node_id: String,
    /// `configured`, `neighbour` (chosen by this node), `inbound` (chose this node) or
    /// `on-demand`.
    pub role: String,
    /// `up`, or `unusable` while the failover engine sees its path down.
    pub state: String,
    /// Smoothed RTT of the session, in milliseconds.
    pub rtt_ms: Option<f64>,
    /// Seconds since the session came up.
    pub since_s: Option<f64>,
}

/// The local API in `detourctl status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ApiStatus {
    /// Port on 127.0.0.1 and ::1, if on.
    pub port: Option<u16>,
    /// Subscriptions.
    pub subscriptions: usize,
    /// Messages accepted for sending.
    pub sent: u64,
    /// Of those, acknowledged by their destination.
    pub delivered: u64,
    /// Of those, given up.
    pub failed: u64,
    /// Messages received for this node.
    pub received: u64,
    /// Received messages no program was subscribed to.
    pub unsubscribed: u64,
    /// Requests answered with an error, by code.
    pub errors: BTreeMap<String, u64>,
}

/// One node of the directory (`detourctl nodes`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeRow {
    /// Its own name.
    pub name: String,
    /// Every name it holds.
    pub names: Vec<String>,
    /// Node ID.
    pub node_id: String,
    /// Underlay endpoints.
    pub endpoints: Vec<String>,
    /// Overlay addresses.
    pub overlay_addresses: Vec<String>,
    /// Announced prefixes.
    pub prefixes: Vec<String>,
    /// Relays for others.
    pub relay: bool,
    /// `stable` or `ephemeral`.
    pub uptime: String,
    /// Relay policy: commitment and priority (`always/100`), and what it lets leave the
    /// overlay (`exit`, `masq-exit`, `networks`).
    #[serde(default)]
    pub policy: String,
    /// Management neighbours it lists.
    pub neighbours: usize,
    /// Record sequence number.
    pub seq: u64,
    /// Seconds until the record expires.
    pub expires_in_s: i64,
    /// This node.
    pub local: bool,
    /// Has a management session with this node.
    pub session: bool,
}

/// ICMP interception counters.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IcmpStatus {
    /// Whether ICMP unreachable interception runs.
    pub active: bool,
    /// Errors about protected destinations that were dropped and acted on.
    pub rerouted: u64,
    /// Errors let through, by reason.
    pub ignored: BTreeMap<String, u64>,
    /// TCP stalls reported by the connection monitor.
    pub tcp_stalls: u64,
    /// Traffic on the kernel's direct path seen for a peer (its paths probed fast).
    #[serde(default)]
    pub traffic_reports: u64,
    /// Copies from the traffic rules that matched no protected destination (ignored).
    #[serde(default)]
    pub traffic_ignored: u64,
}

/// `detourctl paths`: the monitored paths of one peer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerPaths {
    /// Peer name.
    pub name: String,
    /// Its paths.
    pub paths: Vec<PathRow>,
}

/// One monitored path.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PathRow {
    /// `direct` or `via <relay>`.
    pub path: String,
    /// `up`, `degraded` or `down` (this node's sending direction).
    pub state: String,
    /// Seconds in this state.
    pub since_s: f64,
    /// Smoothed RTT in milliseconds.
    pub rtt_ms: Option<f64>,
    /// Smoothed probe loss, percent.
    pub loss_pct: f64,
    /// Whether the peer's traffic uses it.
    pub in_use: bool,
}

/// How detour routes one destination now (`detourctl why`): what matched in the overlay
/// routing table, the peer's path in use with its reason and age, every monitored path,
/// each candidate relay with its policy verdicts, REPLEX shares (in `peer`), and whether
/// the kernel's route agrees.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Why {
    /// The destination as asked.
    pub destination: String,
    /// The address looked up (a peer's overlay address when a name or node ID was given).
    pub address: Option<String>,
    /// `overlay address`, `prefix behind the peer`, `protected underlay destination`,
    /// or `not routed by detour`.
    pub kind: String,
    /// The matching prefix.
    pub prefix: Option<String>,
    /// The peer it belongs to, as `detourctl status` shows it (path, reason, relays,
    /// REPLEX shares).
    pub peer: Option<PeerStatus>,
    /// The peer's monitored paths.
    pub paths: Vec<PathRow>,
    /// Whether packets to it go through the overlay now.
    pub through_overlay: bool,
    /// The kernel's route for an application's packet (`ip route get`): device, gateway
    /// and table.
    pub kernel_route: Option<String>,
    /// What detour expects the kernel to do with it.
    pub expected: String,
    /// Whether the kernel's route is what detour expects (`None`: no route to judge).
    pub kernel_matches: Option<bool>,
}

/// Renders `detourctl why`.
pub fn render_why(w: &Why) -> String {
    let mut o = String::new();
    let addr = w.address.as_deref().filter(|a| *a != w.destination).map(|a| format!(" ({a})")).unwrap_or_default();
    let prefix = w.prefix.as_deref().map(|p| format!(", {p}")).unwrap_or_default();
    let _ = writeln!(o, "destination: {}{addr}", w.destination);
    match &w.peer {
        Some(p) => {
            let _ = writeln!(o, "  matched: {}{prefix} of peer {} ({}, session {})", w.kind, p.name, p.kind, p.state);
            let why = if p.reason == "healthy" { "the direct path is healthy".to_string() } else { p.reason.clone() };
            let since = p.path_since_s.map(|s| format!(" for {}", ago(Some(s)).replace(" ago", ""))).unwrap_or_default();
            let _ = writeln!(o, "  path in use: {}{since} ({why})", p.path);
            let _ = writeln!(o, "  through the overlay now: {}", if w.through_overlay { "yes" } else { "no (the kernel's direct route)" });
            if !w.paths.is_empty() {
                let _ = writeln!(o, "  paths:");
                for r in &w.paths {
                    let rtt = r.rtt_ms.map(|v| format!("{v:.2} ms")).unwrap_or_else(|| "-".into());
                    let _ = writeln!(o, "    {:<20} {:<9} rtt {:>9}  loss {:>5.1} %  for {:.1} s{}", r.path, r.state, rtt, r.loss_pct, r.since_s, if r.in_use { "  in use" } else { "" });
                }
            }
            if !p.relays.is_empty() {
                let _ = writeln!(o, "  relays (best first):");
                for r in &p.relays {
                    let class = |x: &Option<String>| x.as_ref().map(|w| format!("no ({w})")).unwrap_or_else(|| "yes".into());
                    let cost = w.paths.iter().find(|x| x.path == format!("via {}", r.name)).and_then(|x| x.rtt_ms).map(|c| format!("rtt {c:.2} ms")).unwrap_or_else(|| "not measured".into());
                    let _ = writeln!(o, "    {:<16} {:<32} failover: {}; performance: {}; {}; {cost}", r.name, r.policy, class(&r.failover), class(&r.performance), r.state);
                }
            }
            if !p.shares.is_empty() {
                let _ = writeln!(o, "  replex shares:");
                for r in &p.shares {
                    let cost = r.cost_ms.map(|c| format!("{c:.1} ms")).unwrap_or_else(|| "-".into());
                    let _ = writeln!(o, "    {:<20} target {:>3.0} %  realized {:>3.0} %  cost {cost}  {}", r.path, r.target_share * 100.0, r.realized_share * 100.0, r.status);
                }
            }
        }
        None => {
            let _ = writeln!(o, "  {}", w.kind);
        }
    }
    let verdict = match w.kernel_matches {
        Some(true) => "matches",
        Some(false) => "DOES NOT MATCH",
        None => "-",
    };
    let _ = writeln!(o, "  kernel: {} — {verdict} (expected: {})", w.kernel_route.as_deref().unwrap_or("no route"), w.expected);
    o
}

/// This node's identity and ports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Node name.
    pub name: String,
    /// Node ID (32 hex digits).
    pub node_id: String,
    /// Public key (base64).
    pub public_key: String,
    /// Data port.
    pub data_port: u16,
    /// Management port.
    pub management_port: u16,
    /// Overlay IPv4 address with prefix length.
    pub overlay_ipv4: Option<String>,
    /// Overlay IPv6 address with prefix length.
    pub overlay_ipv6: Option<String>,
    /// Aggregate interface name.
    pub aggregate_interface: String,
    /// Seconds since the daemon started.
    pub uptime_s: u64,
    /// This node's relay policy, in words.
    #[serde(default)]
    pub policy: String,
    /// Relay and exit requests this node refused by its policy, by reason.
    #[serde(default)]
    pub refusals: BTreeMap<String, u64>,
    /// Outside destinations that go through an exit node, and which traffic may.
    #[serde(default)]
    pub exits: Vec<String>,
}

/// One peer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatus {
    /// Peer name.
    pub name: String,
    /// `configured`, or `directory` for a node learned from the directory with an active
    /// link.
    pub kind: String,
    /// Node ID.
    pub node_id: String,
    /// Per-peer interface.
    pub interface: String,
    /// Management session state: `up`, `connecting` or `down`.
    pub state: String,
    /// The peer's underlay data endpoint.
    pub endpoint: Option<String>,
    /// Path the peer's traffic uses: `direct`, `via <relay>`, or `none` before the first
    /// session.
    pub path: String,
    /// Why the direct path is not used (`probe_loss`, `loss`, `icmp_unreachable`,
    /// `tcp_stall`), or `healthy`.
    pub reason: String,
    /// Seconds since the path was chosen.
    pub path_since_s: Option<f64>,
    /// Whether the peer's protected destinations (its underlay addresses and protected
    /// prefixes) are routed through the overlay now.
    pub protected: bool,
    /// Route changes since start.
    pub route_changes: u64,
    /// Failures of the direct path since start (flap damping, `failover::FlapDamping`).
    #[serde(default)]
    pub flaps: u64,
    /// The direct path's flap penalty now (halves every `flap_half_life_s`).
    #[serde(default)]
    pub flap_penalty: f64,
    /// The hold-down that applies now, in milliseconds: `hold_down_ms` doubled per unit of
    /// penalty above 1, at most `max_hold_down_ms`.
    #[serde(default)]
    pub hold_down_ms: u64,
    /// The direct path is degraded (loss or an RTT rise over the thresholds), e.g.
    /// `loss 12 %, rtt +40 ms`.
    #[serde(default)]
    pub degraded: Option<String>,
    /// While degraded: the share of new connections moved to a relay (0..1) and the path
    /// they take.
    #[serde(default)]
    pub relief_share: f64,
    /// The path relieved traffic takes (`via <relay>`).
    #[serde(default)]
    pub relief_via: Option<String>,
    /// Whether traffic to the peer flows (its paths are probed at the fast rate) or the
    /// peer is idle (probed every `idle_probe_interval_ms`).
    #[serde(default)]
    pub traffic: bool,
    /// Probe bytes sent to the peer (whole datagrams).
    pub probe_tx_bytes: u64,
    /// Probe bytes received from the peer.
    pub probe_rx_bytes: u64,
    /// Seconds since the current management session was established (the handshake that
    /// produced the data keys).
    pub last_handshake_s: Option<f64>,
    /// Smoothed RTT of the management session, in milliseconds.
    pub rtt_ms: Option<f64>,
    /// Seconds since the last authenticated data packet.
    pub last_rx_s: Option<f64>,
    /// Inner packets received.
    pub rx_packets: u64,
    /// Inner bytes received.
    pub rx_bytes: u64,
    /// Inner packets sent.
    pub tx_packets: u64,
    /// Inner bytes sent.
    pub tx_bytes: u64,
    /// Drops by reason.
    pub drops: BTreeMap<String, u64>,
    /// Sessions established since start.
    pub sessions: u64,
    /// This node's addresses on the per-peer link.
    pub link_addresses: Vec<String>,
    /// The peer's overlay addresses.
    pub overlay_addresses: Vec<String>,
    /// REPLEX: each route's target share, realized share and cost (empty when off).
    #[serde(default)]
    pub shares: Vec<RouteShare>,
    /// Nodes that could relay to this peer, best first, with what each traffic class may
    /// do with them.
    #[serde(default)]
    pub relays: Vec<RelayRow>,
}

/// One possible relay towards a peer (`detourctl status`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RelayRow {
    /// Relay name.
    pub name: String,
    /// Its policy: commitment, priority, lifespan.
    pub policy: String,
    /// `None` when failover traffic may use it, else why not.
    pub failover: Option<String>,
    /// `None` when performance (REPLEX) traffic may use it, else why not.
    pub performance: Option<String>,
    /// `active`, `refused: <reason>`, `not asked`, `no session`.
    pub state: String,
}

/// One route of a peer's REPLEX split.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RouteShare {
    /// `direct` or `via <relay>`.
    pub path: String,
    /// `live`, `warming` (new, not measured enough yet) or `down`.
    pub status: String,
    /// Target share, 0..1.
    pub target_share: f64,
    /// Share of the bytes sent over the last round, 0..1.
    pub realized_share: f64,
    /// Cost in ms: smoothed RTT plus the loss penalty.
    pub cost_ms: Option<f64>,
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn ago(s: Option<f64>) -> String {
    match s {
        None => "never".into(),
        Some(s) if s < 1.0 => format!("{:.0} ms ago", s * 1000.0),
        Some(s) if s < 120.0 => format!("{s:.1} s ago"),
        Some(s) => format!("{:.0} min ago", s / 60.0),
    }
}

fn drops(map: &BTreeMap<String, u64>) -> String {
    if map.is_empty() {
        return "none".into();
    }
    map.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
}

/// Renders status as a readable text, one block per peer (like `wg show`).
pub fn render_status(s: &Status) -> String {
    let mut o = String::new();
    let n = &s.node;
    let _ = writeln!(o, "node: {}", n.name);
    let _ = writeln!(o, "  node id: {}", n.node_id);
    let _ = writeln!(o, "  public key: {}", n.public_key);
    let _ = writeln!(o, "  ports: data {} / management {}", n.data_port, n.management_port);
    let addrs: Vec<&str> = [n.overlay_ipv4.as_deref(), n.overlay_ipv6.as_deref()].into_iter().flatten().collect();
    let _ = writeln!(o, "  overlay: {} on {}", addrs.join(", "), n.aggregate_interface);
    let _ = writeln!(o, "  uptime: {} s", n.uptime_s);
    if !n.policy.is_empty() {
        let _ = writeln!(o, "  policy: {}", n.policy);
    }
    for (feature, why) in &s.degraded {
        let _ = writeln!(o, "  DEGRADED: {feature}: {why}");
    }
    if !n.refusals.is_empty() {
        let _ = writeln!(o, "  refused by policy: {}", drops(&n.refusals));
    }
    for e in &n.exits {
        let _ = writeln!(o, "  exit: {e}");
    }
    if !s.drops.is_empty() {
        let _ = writeln!(o, "  drops: {}", drops(&s.drops));
    }
    if s.management_errors > 0 {
        let _ = writeln!(o, "  management errors: {}", s.management_errors);
    }
    if s.management_garbage > 0 {
        let _ = writeln!(o, "  management port garbage: {} datagrams", s.management_garbage);
    }
    if s.socket_drops.values().any(|v| *v > 0) {
        let _ = writeln!(o, "  socket buffer drops: {}", drops(&s.socket_drops));
    }
    let _ = writeln!(o, "  management handshakes: {} ({} in the last minute)", s.management_handshakes, s.management_handshakes_last_minute);
    let h = &s.incoming_handshakes;
    if h.retried + h.rate_limited + h.pending_full > 0 || s.pending_handshakes > 0 {
        let _ = writeln!(
            o,
            "  incoming handshakes: {} accepted, {} retried, {} rate-limited, {} dropped at the pending cap, {} in progress",
            h.accepted, h.retried, h.rate_limited, h.pending_full, s.pending_handshakes
        );
    }
    if s.late_loops > 0 {
        let _ = writeln!(o, "  late: {} times (probe loss not judged meanwhile)", s.late_loops);
    }
    if s.icmp.active || s.icmp.tcp_stalls > 0 {
        let mut ign: Vec<String> = s.icmp.ignored.iter().map(|(k, v)| format!("{k}={v}")).collect();
        if ign.is_empty() {
            ign.push("none".into());
        }
        let _ = writeln!(o, "  icmp unreachable: {} rerouted, ignored: {}; tcp stalls: {}; direct-path traffic seen: {}", s.icmp.rerouted, ign.join(" "), s.icmp.tcp_stalls, s.icmp.traffic_reports);
    }
    if !s.relaying.is_empty() || s.relayed_packets > 0 {
        let _ = writeln!(o, "  relaying: {} ({} pkts, {})", s.relaying.join(", "), s.relayed_packets, bytes(s.relayed_bytes));
    }
    if s.refused_handshakes > 0 {
        let _ = writeln!(o, "  refused handshakes: {} (last key {})", s.refused_handshakes, s.last_refused_key.as_deref().unwrap_or("?"));
    }
    let m = &s.management;
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "management: {} nodes in the directory; {} neighbours wanted (availability {:.3}); names: {}",
        m.directory_nodes,
        m.target_neighbours,
        m.availability,
        if m.names.is_empty() { "-".to_string() } else { m.names.join(", ") }
    );
    for nb in &m.neighbours {
        let rtt = nb.rtt_ms.map(|r| format!("{r:.2} ms")).unwrap_or_else(|| "-".into());
        let _ = writeln!(o, "  {:<16} {:<10} {:<9} rtt {:>9}  up {}  {}", nb.name, nb.role, nb.state, rtt, ago(nb.since_s).replace(" ago", ""), nb.node_id);
    }
    if !m.rejected_records.is_empty() {
        let _ = writeln!(o, "  rejected records: {}", drops(&m.rejected_records));
    }
    if let Some(port) = m.api.port {
        let mut errs = drops(&m.api.errors);
        if m.api.errors.is_empty() {
            errs = "none".into();
        }
        let _ = writeln!(
            o,
            "  api: port {port}, {} subscriptions; sent {} (delivered {}, failed {}), received {} ({} without subscriber); errors: {errs}",
            m.api.subscriptions, m.api.sent, m.api.delivered, m.api.failed, m.api.received, m.api.unsubscribed
        );
    }
    for p in &s.peers {
        let _ = writeln!(o);
        let kind = if p.kind == "configured" { String::new() } else { format!(", {}", p.kind) };
        let _ = writeln!(o, "peer: {} ({}{kind})", p.name, p.state);
        let _ = writeln!(o, "  node id: {}", p.node_id);
        let _ = writeln!(o, "  interface: {}  link: {}", p.interface, p.link_addresses.join(", "));
        let _ = writeln!(o, "  overlay: {}", p.overlay_addresses.join(", "));
        let _ = writeln!(o, "  endpoint: {}", p.endpoint.as_deref().unwrap_or("(none)"));
        let why = if p.reason == "healthy" { String::new() } else { format!(", {}", p.reason) };
        let since = p.path_since_s.map(|s| format!(" since {}", ago(Some(s)))).unwrap_or_default();
        let protected = if p.protected { "; protected destinations through the overlay" } else { "" };
        let _ = writeln!(o, "  path: {}{why}{since}{protected}", p.path);
        if let Some(d) = &p.degraded {
            match &p.relief_via {
                Some(via) => {
                    let _ = writeln!(o, "  degraded ({d}): {:.0} % of new connections {via}", p.relief_share * 100.0);
                }
                None => {
                    let _ = writeln!(o, "  degraded ({d})");
                }
            }
        }
        if p.flap_penalty >= 1.0 {
            let _ = writeln!(o, "  flapping: {} failures, penalty {:.1}, hold-down {:.0} s", p.flaps, p.flap_penalty, p.hold_down_ms as f64 / 1000.0);
        }
        let _ = writeln!(o, "  probing: {}", if p.traffic { "fast (traffic flows)" } else { "idle" });
        let _ = writeln!(o, "  latest handshake: {}", ago(p.last_handshake_s));
        match p.rtt_ms {
            Some(r) => {
                let _ = writeln!(o, "  rtt: {r:.2} ms");
            }
            None => {
                let _ = writeln!(o, "  rtt: -");
            }
        }
        let _ = writeln!(o, "  transfer: {} received ({} pkts), {} sent ({} pkts); last received {}", bytes(p.rx_bytes), p.rx_packets, bytes(p.tx_bytes), p.tx_packets, ago(p.last_rx_s));
        let _ = writeln!(o, "  drops: {}", drops(&p.drops));
        if !p.shares.is_empty() {
            let parts: Vec<String> = p
                .shares
                .iter()
                .map(|r| {
                    let cost = r.cost_ms.map(|c| format!("{c:.1} ms")).unwrap_or_else(|| "-".into());
                    let st = if r.status == "live" { String::new() } else { format!(" {}", r.status) };
                    format!("{} {:.0}% (realized {:.0}%, cost {cost}{st})", r.path, r.target_share * 100.0, r.realized_share * 100.0)
                })
                .collect();
            let _ = writeln!(o, "  replex: {}", parts.join(" | "));
        }
        if !p.relays.is_empty() {
            let _ = writeln!(o, "  relays (best first):");
            for r in &p.relays {
                let class = |x: &Option<String>| x.as_ref().map(|w| format!("no ({w})")).unwrap_or_else(|| "yes".into());
                let _ = writeln!(o, "    {:<16} {:<32} failover: {}; performance: {}; {}", r.name, r.policy, class(&r.failover), class(&r.performance), r.state);
            }
        }
    }
    o
}

/// Renders `detourctl nodes`: one row per directory node.
pub fn render_nodes(nodes: &[NodeRow]) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "{:<16} {:<32} {:<24} {:<24} {:<9} {:>5} {:>7}  FLAGS", "NAME", "NODE ID", "ENDPOINT", "OVERLAY", "UPTIME", "NBRS", "EXPIRES");
    for n in nodes {
        let mut flags = Vec::new();
        if n.local {
            flags.push("self");
        }
        if n.session {
            flags.push("session");
        }
        if n.relay {
            flags.push("relay");
        }
        if !n.policy.is_empty() {
            flags.push(&n.policy);
        }
        let _ = writeln!(
            o,
            "{:<16} {:<32} {:<24} {:<24} {:<9} {:>5} {:>6}s  {}",
            n.name,
            n.node_id,
            n.endpoints.first().map(String::as_str).unwrap_or("-"),
            n.overlay_addresses.join(","),
            n.uptime,
            n.neighbours,
            n.expires_in_s,
            flags.join(",")
        );
    }
    o
}

/// Renders `detourctl paths`: one table row per monitored path.
pub fn render_paths(peers: &[PeerPaths]) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "{:<16} {:<20} {:<9} {:>10} {:>9} {:>7}  IN USE", "PEER", "PATH", "STATE", "SINCE", "RTT", "LOSS");
    for p in peers {
        for r in &p.paths {
            let rtt = r.rtt_ms.map(|v| format!("{v:.2} ms")).unwrap_or_else(|| "-".into());
            let _ = writeln!(o, "{:<16} {:<20} {:<9} {:>9.1}s {:>9} {:>6.1}%  {}", p.name, r.path, r.state, r.since_s, rtt, r.loss_pct, if r.in_use { "*" } else { "" });
        }
    }
    o
}

/// Escapes a Prometheus label value (backslash, quote, newline).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Renders `status` and `paths` as Prometheus metrics (text exposition format 0.0.4):
/// per peer its state, traffic and drops; per monitored path its RTT (seconds), loss
/// (0..1) and state; per REPLEX route (`replex-spec.md` §3) its target share, realized
/// share (0..1) and cost (seconds); node-wide drops, relaying, ICMP interception and the
/// management overlay. Served by `detourd` on `node.metrics_listen`.
pub fn render_metrics(status: &Status, paths: &[PeerPaths]) -> String {
    let mut o = String::new();
    let family = |o: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(o, "# HELP detour_{name} {help}\n# TYPE detour_{name} {kind}");
    };
    family(&mut o, "uptime_seconds", "gauge", "Seconds since detourd started.");
    let _ = writeln!(o, "detour_uptime_seconds{{node=\"{}\"}} {}", label(&status.node.name), status.node.uptime_s);
    family(&mut o, "degraded", "gauge", "1 for each feature the configuration asks for that could not be set up (node.allow_degraded).");
    for feature in status.degraded.keys() {
        let _ = writeln!(o, "detour_degraded{{feature=\"{}\"}} 1", label(feature));
    }
    family(&mut o, "management_garbage_total", "counter", "Datagrams on the management port that cannot be QUIC.");
    let _ = writeln!(o, "detour_management_garbage_total {}", status.management_garbage);
    family(&mut o, "socket_drops_total", "counter", "Datagrams dropped by the kernel because a socket's receive buffer was full.");
    for (socket, n) in &status.socket_drops {
        let _ = writeln!(o, "detour_socket_drops_total{{socket=\"{socket}\"}} {n}");
    }
    family(&mut o, "management_handshakes_total", "counter", "Management sessions set up (QUIC handshakes completed, both directions).");
    let _ = writeln!(o, "detour_management_handshakes_total {}", status.management_handshakes);
    family(&mut o, "management_handshake_attempts_total", "counter", "Incoming management handshake attempts by outcome (admission under flood; unknown_key: refused in TLS).");
    let h = &status.incoming_handshakes;
    for (outcome, n) in [("accepted", h.accepted), ("retried", h.retried), ("rate_limited", h.rate_limited), ("pending_full", h.pending_full), ("unknown_key", status.refused_handshakes)] {
        let _ = writeln!(o, "detour_management_handshake_attempts_total{{outcome=\"{outcome}\"}} {n}");
    }
    family(&mut o, "management_handshakes_pending", "gauge", "Incoming management handshakes in progress.");
    let _ = writeln!(o, "detour_management_handshakes_pending {}", status.pending_handshakes);
    family(&mut o, "late_loops_total", "counter", "Times the failover engine ran late (probe loss not judged for a moment).");
    let _ = writeln!(o, "detour_late_loops_total {}", status.late_loops);
    family(&mut o, "peer_up", "gauge", "1 while the session with the peer is up.");
    for p in &status.peers {
        let _ = writeln!(o, "detour_peer_up{{peer=\"{}\"}} {}", label(&p.name), u8::from(p.state == "up"));
    }
    family(&mut o, "peer_rerouted", "gauge", "1 while the peer's protected destinations are routed into the overlay (failover).");
    for p in &status.peers {
        let _ = writeln!(o, "detour_peer_rerouted{{peer=\"{}\"}} {}", label(&p.name), u8::from(p.protected));
    }
    family(&mut o, "peer_traffic", "gauge", "1 while traffic to the peer flows and its paths are probed at the fast rate.");
    for p in &status.peers {
        let _ = writeln!(o, "detour_peer_traffic{{peer=\"{}\"}} {}", label(&p.name), u8::from(p.traffic));
    }
    family(&mut o, "peer_relief_share", "gauge", "Share of new connections to the peer moved off its degraded direct path (0..1).");
    for p in &status.peers {
        let _ = writeln!(o, "detour_peer_relief_share{{peer=\"{}\"}} {}", label(&p.name), p.relief_share);
    }
    family(&mut o, "peer_flap_penalty", "gauge", "Flap penalty of the direct path to the peer (halves every flap_half_life_s).");
    for p in &status.peers {
        let _ = writeln!(o, "detour_peer_flap_penalty{{peer=\"{}\"}} {}", label(&p.name), p.flap_penalty);
    }
    family(&mut o, "peer_hold_down_seconds", "gauge", "Hold-down before traffic returns to the direct path (damped).");
    for p in &status.peers {
        let _ = writeln!(o, "detour_peer_hold_down_seconds{{peer=\"{}\"}} {}", label(&p.name), p.hold_down_ms as f64 / 1000.0);
    }
    family(&mut o, "peer_rtt_seconds", "gauge", "Smoothed RTT of the path in use to the peer.");
    for p in &status.peers {
        if let Some(r) = p.rtt_ms {
            let _ = writeln!(o, "detour_peer_rtt_seconds{{peer=\"{}\"}} {}", label(&p.name), r / 1000.0);
        }
    }
    for (name, what, get) in [
        ("peer_receive_bytes_total", "Bytes received from the peer through the overlay.", (|p: &PeerStatus| p.rx_bytes) as fn(&PeerStatus) -> u64),
        ("peer_transmit_bytes_total", "Bytes sent to the peer through the overlay.", |p: &PeerStatus| p.tx_bytes),
        ("peer_receive_packets_total", "Packets received from the peer through the overlay.", |p: &PeerStatus| p.rx_packets),
        ("peer_transmit_packets_total", "Packets sent to the peer through the overlay.", |p: &PeerStatus| p.tx_packets),
        ("peer_route_changes_total", "Changes of the path in use to the peer.", |p: &PeerStatus| p.route_changes),
        ("peer_flaps_total", "Failures of the direct path to the peer (flap damping).", |p: &PeerStatus| p.flaps),
    ] {
        family(&mut o, name, "counter", what);
        for p in &status.peers {
            let _ = writeln!(o, "detour_{name}{{peer=\"{}\"}} {}", label(&p.name), get(p));
        }
    }
    family(&mut o, "peer_drops_total", "counter", "Packets from or to the peer dropped, by reason.");
    for p in &status.peers {
        for (reason, n) in &p.drops {
            let _ = writeln!(o, "detour_peer_drops_total{{peer=\"{}\",reason=\"{}\"}} {n}", label(&p.name), label(reason));
        }
    }
    family(&mut o, "drops_total", "counter", "Packets dropped that belong to no peer, by reason.");
    for (reason, n) in &status.drops {
        let _ = writeln!(o, "detour_drops_total{{reason=\"{}\"}} {n}", label(reason));
    }
    type PathMetric = fn(&PathRow) -> Option<f64>;
    let path_metrics: [(&str, &str, PathMetric); 4] = [
        ("path_up", "1 while a monitored path to a peer is up.", |r| Some(f64::from(u8::from(r.state == "up")))),
        ("path_in_use", "1 for the path that carries the peer's traffic.", |r| Some(f64::from(u8::from(r.in_use)))),
        ("path_rtt_seconds", "Smoothed probe RTT of a path.", |r| r.rtt_ms.map(|x| x / 1000.0)),
        ("path_loss_ratio", "Smoothed probe loss of a path (0..1).", |r| Some(r.loss_pct / 100.0)),
    ];
    for (name, help, get) in path_metrics {
        family(&mut o, name, "gauge", help);
        for pp in paths {
            for r in &pp.paths {
                if let Some(v) = get(r) {
                    let _ = writeln!(o, "detour_{name}{{peer=\"{}\",path=\"{}\"}} {v}", label(&pp.name), label(&r.path));
                }
            }
        }
    }
    type RouteMetric = fn(&RouteShare) -> Option<f64>;
    let route_metrics: [(&str, &str, RouteMetric); 3] = [
        ("route_target_share", "REPLEX target share of a route to the peer (0..1).", |r| Some(r.target_share)),
        ("route_realized_share", "Share of the bytes to the peer that the route carried in the last REPLEX round (0..1).", |r| Some(r.realized_share)),
        ("route_cost_seconds", "REPLEX cost of a route: smoothed RTT plus the loss penalty.", |r| r.cost_ms.map(|c| c / 1000.0)),
    ];
    for (name, help, get) in route_metrics {
        family(&mut o, name, "gauge", help);
        for p in &status.peers {
            for r in &p.shares {
                if let Some(v) = get(r) {
                    let _ = writeln!(o, "detour_{name}{{peer=\"{}\",path=\"{}\"}} {v}", label(&p.name), label(&r.path));
                }
            }
        }
    }
    family(&mut o, "relayed_bytes_total", "counter", "Bytes this node relayed for others.");
    let _ = writeln!(o, "detour_relayed_bytes_total {}", status.relayed_bytes);
    family(&mut o, "relayed_packets_total", "counter", "Packets this node relayed for others.");
    let _ = writeln!(o, "detour_relayed_packets_total {}", status.relayed_packets);
    family(&mut o, "policy_refusals_total", "counter", "Relay and exit requests refused by this node's policy, by reason.");
    for (reason, v) in &status.node.refusals {
        let _ = writeln!(o, "detour_policy_refusals_total{{reason=\"{}\"}} {v}", label(reason));
    }
    family(&mut o, "icmp_rerouted_total", "counter", "ICMP unreachable errors caught and answered by a reroute.");
    let _ = writeln!(o, "detour_icmp_rerouted_total {}", status.icmp.rerouted);
    family(&mut o, "tcp_stalls_total", "counter", "Stalled TCP connections towards protected destinations.");
    let _ = writeln!(o, "detour_tcp_stalls_total {}", status.icmp.tcp_stalls);
    family(&mut o, "traffic_reports_total", "counter", "Traffic on the kernel's direct path seen for a peer (its paths are then probed fast).");
    let _ = writeln!(o, "detour_traffic_reports_total {}", status.icmp.traffic_reports);
    family(&mut o, "refused_handshakes_total", "counter", "Management handshakes refused for an unknown key.");
    let _ = writeln!(o, "detour_refused_handshakes_total {}", status.refused_handshakes);
    family(&mut o, "directory_nodes", "gauge", "Nodes in the directory (this one included).");
    let _ = writeln!(o, "detour_directory_nodes {}", status.management.directory_nodes);
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_strictly() {
        assert_eq!(serde_json::from_str::<Request>(r#"{"cmd":"status"}"#).unwrap(), Request::Status);
        assert_eq!(serde_json::from_str::<Request>(r#"{"cmd":"paths"}"#).unwrap(), Request::Paths);
        assert_eq!(serde_json::from_str::<Request>(r#"{"cmd":"nodes"}"#).unwrap(), Request::Nodes);
        assert_eq!(serde_json::from_str::<Request>(r#"{"cmd":"reload"}"#).unwrap(), Request::Reload);
        assert_eq!(serde_json::from_str::<Request>(r#"{"cmd":"why","destination":"bob"}"#).unwrap(), Request::Why { destination: "bob".into() });
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"reboot"}"#).is_err());
        assert!(serde_json::from_str::<Request>("\u{0}\u{1}garbage").is_err());
    }

    #[test]
    fn every_response_serializes() {
        let r = Response::Paths { peers: vec![PeerPaths { name: "b".into(), paths: vec![] }] };
        let text = serde_json::to_string(&r).unwrap();
        assert!(matches!(serde_json::from_str::<Response>(&text).unwrap(), Response::Paths { .. }));
        let e = serde_json::to_string(&Response::Error { message: "x".into() }).unwrap();
        assert!(e.contains("\"error\""));
    }

    #[test]
    fn metric_labels_are_escaped() {
        assert_eq!(label("via \"x\"\\\n"), "via \\\"x\\\"\\\\\\n");
    }

    #[test]
    fn renders_units() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(ago(Some(0.25)), "250 ms ago");
        assert_eq!(ago(None), "never");
    }
}
