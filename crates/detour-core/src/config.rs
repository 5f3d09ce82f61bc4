//! The TOML configuration: parsing, defaults and validation into a typed [`Config`].
//!
//! Parsing and validation are pure: [`Config::parse`] takes the text and the file name (for
//! messages) and never touches the host. Every error names the file, the key (as a path such
//! as `peer[1].public_key`) and what was expected. All errors are collected, so one run of
//! `detourd --check-config` reports every problem. The format is documented in
//! `docs/config.md`.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::identity::{NodeId, PublicKey};
use crate::wire;

/// Where the configuration files of the overlays of a host are (`detour.toml`, and
/// `NAME.toml` for `detourd@NAME.service`).
pub const DEFAULT_CONFIG_DIR: &str = "/etc/detour";

/// Default UDP port of the forwarding overlay (data plane).
pub const DEFAULT_DATA_PORT: u16 = 7720;
/// Overlays one host can run (`node.instance` 0..MAX_INSTANCES): each owns one bit of the
/// packet mark's top byte ([`Config::instance_mark`]).
pub const MAX_INSTANCES: u8 = 8;
/// Default routing table for detour's routes.
pub const DEFAULT_TABLE: u32 = 7720;
/// Default priority of detour's policy rules (before `main` at 32766).
pub const DEFAULT_RULE_PRIORITY: u32 = 7720;
/// Default firewall mark on detour's own sockets.
pub const DEFAULT_FWMARK: u32 = 0x0000_d7d7;
/// Default underlay MTU (bytes) assumed towards every peer.
pub const DEFAULT_UNDERLAY_MTU: u16 = 1500;
/// Default name of the aggregate TUN interface.
pub const DEFAULT_AGGREGATE_INTERFACE: &str = "detour0";
/// Default prefix of per-peer TUN interface names.
pub const DEFAULT_INTERFACE_PREFIX: &str = "dt-";
/// Default pool for IPv4 per-link addresses (RFC 3927 link-local).
pub const DEFAULT_LINK_POOL_V4: &str = "169.254.0.0/16";
/// Default path of the root-only control socket.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/detour/detourd.sock";
/// Default configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/detour/detour.toml";

/// One configuration problem: file, key path and what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file the problem is in.
    pub file: String,
    /// The key, as a dotted path (`node.data_port`, `peer[0].endpoints[1]`), or the line
    /// for syntax errors.
    pub key: String,
    /// What is wrong and what was expected.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.file, self.key, self.message)
    }
}

/// Every problem found in one configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// An underlay endpoint of a peer: an address or a host name, with the peer's data port.
/// Its management port is the data port + 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A literal socket address.
    Addr(SocketAddr),
    /// A DNS name, resolved when dialling.
    Host(String, u16),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Addr(a) => write!(f, "{a}"),
            Endpoint::Host(h, p) => write!(f, "{h}:{p}"),
        }
    }
}

/// This node's settings (`[node]`).
#[derive(Debug, Clone, PartialEq)]
pub struct NodeConfig {
    /// Human-readable node name.
    pub name: String,
    /// Path of the PKCS#8 PEM Ed25519 private key.
    pub private_key: PathBuf,
    /// Underlay addresses to listen on; empty means all addresses (`[::]` dual-stack, or
    /// `0.0.0.0` when IPv6 is off).
    pub listen: Vec<IpAddr>,
    /// UDP port of the forwarding overlay.
    pub data_port: u16,
    /// UDP port of the management overlay (QUIC), always `data_port + 1`.
    pub management_port: u16,
    /// This node's overlay IPv4 address and the overlay's IPv4 prefix.
    pub overlay_v4: Option<Ipv4Net>,
    /// This node's overlay IPv6 address and the overlay's IPv6 prefix.
    pub overlay_v6: Option<Ipv6Net>,
    /// Prefixes behind this node that peers may send to.
    pub prefixes: Vec<IpNet>,
    /// Underlay MTU in bytes.
    pub underlay_mtu: u16,
    /// Log filter (`info`, `debug`, or a `tracing` directive); `RUST_LOG` overrides it.
    pub log_level: String,
    /// Path of the root-only control socket.
    pub control_socket: PathBuf,
    /// Whether this node relays between its peers when they ask.
    pub relay: bool,
    /// Uptime class published in the directory (stable hosts are preferred as management
    /// neighbours and relays).
    pub uptime: crate::overlay::directory::Uptime,
    /// Underlay data endpoints published in the directory; empty means this host's global
    /// addresses with the data port.
    pub advertise: Vec<SocketAddr>,
    /// Where to serve Prometheus metrics over HTTP (`None`: off).
    pub metrics_listen: Option<SocketAddr>,
    /// Networks behind this router that are normally reached over the underlay; peers
    /// route them into the overlay while their direct path to this node is down (spec
    /// A§1.1.2 context 2). Published in the directory.
    pub networks: Vec<IpNet>,
    /// The relay policy published in the directory (`[policy]`; `up_since` is filled in
    /// at start).
    pub policy: crate::node::policy::Policy,
    /// The number of this overlay among the overlays on this host, 0..=7 ([`MAX_INSTANCES`]
    /// of them): the defaults of its ports, routing table, rule priority, NFQUEUE number,
    /// interface names and control socket derive from it, so that overlays on one host
    /// never collide ([`Config::conflicts`]); its netfilter chains carry it, and ICMP
    /// errors another overlay's detourd passes on carry its bit of the packet mark
    /// ([`Config::instance_mark`]). Default 0.
    pub instance: u8,
    /// Start even when a feature the configuration asks for cannot be set up (ICMP
    /// interception, DSCP marking, the management qdisc, REPLEX or relief accounting and
    /// the multipath hash, exits): the node then runs degraded, which `detourctl status`
    /// and the metric `detour_degraded` show. Default false: such a failure stops the
    /// start with its reason.
    pub allow_degraded: bool,
}

/// Exits to hosts that do not run detour (`[exit]`; spec A§1.1.2 context 3).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExitConfig {
    /// Outside destinations watched: when one becomes unreachable (ICMP unreachable, a
    /// connection attempt that times out), new connections to it go through an exit node.
    pub watch: Vec<IpNet>,
    /// Outside destinations whose new connections always go through an exit node.
    pub always: Vec<IpNet>,
    /// How long a destination found unreachable stays on the exit before the direct path
    /// is tried again for new connections.
    pub hold: Duration,
}

/// REPLEX multipath (`[replex]`; `replex-spec.md` §3.7).
#[derive(Debug, Clone, PartialEq)]
pub struct ReplexConfig {
    /// Spread traffic to each peer over the direct path and its relays by REPLEX shares.
    pub enabled: bool,
    /// How the shares are set: adapted by REPLEX rounds, or equal over the live paths.
    pub mode: ReplexMode,
    /// Round period (±10 % jitter).
    pub period: Duration,
    /// The algorithm's parameters.
    pub params: crate::path::replex::Params,
    /// Buckets of the kernel's resilient nexthop groups.
    pub kernel_buckets: u16,
    /// Idle time after which a kernel bucket (and a userspace flow) may move to another
    /// route: a flowlet gap far longer than any difference in path delay, so a move never
    /// reorders a flow's packets.
    pub flow_idle: Duration,
}

impl Default for ReplexConfig {
    fn default() -> Self {
        ReplexConfig {
            enabled: false,
            mode: ReplexMode::Adaptive,
            period: Duration::from_secs(1),
            params: crate::path::replex::Params::default(),
            kernel_buckets: 1024,
            flow_idle: Duration::from_secs(5),
        }
    }
}

/// How `[replex]` sets the shares of a destination's live paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplexMode {
    /// REPLEX rounds move the shares towards the cheaper paths (`replex-spec.md` §3.4).
    Adaptive,
    /// Equal shares over the live paths, whatever they cost (ECMP's split; the baseline
    /// REPLEX is measured against, `scripts/bench.sh replex`).
    Equal,
}

/// The management overlay (`[management]`).
#[derive(Debug, Clone, PartialEq)]
pub struct ManagementConfig {
    /// Most management neighbours chosen by this node (configured peers come on top).
    pub max_neighbours: usize,
    /// Fewest management neighbours chosen, whatever the reliability rule gives.
    pub min_neighbours: usize,
    /// Probability with which a message should find a live path; with the measured
    /// availability of neighbours it sets the neighbour count (`mroute::neighbours_for`).
    pub target_delivery: f64,
    /// UDP port of the local API on 127.0.0.1 and ::1 (`None`: off).
    pub api_port: Option<u16>,
    /// Messages per second one local program may send (bursts of twice that).
    pub api_rate: u32,
    /// Mark management packets with DSCP CS6 (an iptables mangle rule).
    pub dscp: bool,
    /// Underlay interface on which detourd installs an HTB qdisc that serves management
    /// packets first.
    pub qdisc_interface: Option<String>,
    /// Rate of that qdisc in bit/s (set it a little below the link's real rate).
    pub qdisc_rate: u64,
    /// On-demand sessions (not configured, not a neighbour) close after this long without
    /// forwarding traffic.
    pub idle_timeout: Duration,
    /// Limits on management handshakes under flood (`handshake_*`).
    pub admission: crate::overlay::admission::AdmissionConfig,
}

impl Default for ManagementConfig {
    fn default() -> Self {
        ManagementConfig {
            max_neighbours: 8,
            min_neighbours: 3,
            target_delivery: 0.9999,
            api_port: None,
            api_rate: 200,
            dscp: true,
            qdisc_interface: None,
            qdisc_rate: 0,
            idle_timeout: Duration::from_secs(60),
            admission: crate::overlay::admission::AdmissionConfig::default(),
        }
    }
}

/// Failure detection and rerouting (`[failover]`).
#[derive(Debug, Clone, PartialEq)]
pub struct FailoverSettings {
    /// Probes on the direct path and the relay path in use, per peer.
    pub probe_interval: Duration,
    /// Probes on standby relay paths.
    pub standby_probe_interval: Duration,
    /// Probes on every path of a peer that carries no traffic (equal to `probe_interval`:
    /// every peer is probed fast).
    pub idle_probe_interval: Duration,
    /// A peer carries traffic for this long after the last packet to its protected
    /// destinations or through the overlay.
    pub traffic_hold: Duration,
    /// A path is down when no probe sent this long ago arrived.
    pub down_after: Duration,
    /// The fast rule: a path carrying the traffic of a peer with traffic is down after
    /// this much silence once enough confirmation probes went unanswered (zero: off).
    pub fast_down_after: Duration,
    /// Probe interval of the confirmation burst.
    pub confirm_interval: Duration,
    /// A repaired direct path must be healthy this long before traffic returns to it
    /// (doubled per recent failure, see [`crate::path::failover::FlapDamping`]).
    pub hold_down: Duration,
    /// Ceiling of the damped hold-down.
    pub max_hold_down: Duration,
    /// Half-life of a path's flap penalty.
    pub flap_half_life: Duration,
    /// Smoothed loss above which a path counts as degraded (0..1).
    pub degraded_loss: f64,
    /// Smoothed loss below which a degraded path is healthy again (0..1).
    pub recover_loss: f64,
    /// Smoothed loss above which a path counts as failed and all traffic moves (0..1).
    pub failed_loss: f64,
    /// RTT rise over the path's lowest that makes it degraded (zero: off).
    pub degraded_rtt: Duration,
    /// How long loss or RTT must stay over the thresholds.
    pub degraded_after: Duration,
    /// Relay paths kept ready per peer.
    pub relay_candidates: usize,
    /// Intercept ICMP net/host unreachable about protected destinations (NFQUEUE).
    pub icmp: bool,
    /// NFQUEUE number for the interception.
    pub nfqueue: u16,
    /// Watch TCP connections to protected destinations for stalls.
    pub tcp_monitor: bool,
    /// How often TCP connections are read while a peer carries traffic (every
    /// `detour::shell::intercept::TCP_IDLE_POLL` while none does).
    pub tcp_poll: Duration,
}

/// Kernel integration (`[kernel]`).
#[derive(Debug, Clone, PartialEq)]
pub struct KernelConfig {
    /// Routing table holding all of detour's routes.
    pub table: u32,
    /// Priority of detour's policy rules.
    pub rule_priority: u32,
    /// Firewall mark of detour's own sockets; marked packets skip detour's table.
    pub fwmark: u32,
    /// Name of the aggregate TUN interface.
    pub aggregate_interface: String,
    /// Prefix of per-peer TUN names.
    pub interface_prefix: String,
    /// Pool for per-link IPv4 addresses.
    pub link_pool_v4: Ipv4Net,
    /// Whether datagrams this node relays are forwarded by the kernel (an nftables
    /// `netdev` ingress rule per agreed relay pair: addresses rewritten, sent on without
    /// waking detourd) instead of by the data thread. On by default; without nft the
    /// data thread relays (issue 14, `docs/design.md` "Relays in the kernel").
    pub relay_forwarding: bool,
}

/// One configured peer (`[[peer]]`).
#[derive(Debug, Clone, PartialEq)]
pub struct PeerConfig {
    /// Peer name.
    pub name: String,
    /// Pinned Ed25519 public key.
    pub public_key: PublicKey,
    /// Node ID derived from the key.
    pub node_id: NodeId,
    /// Underlay endpoints, tried in order.
    pub endpoints: Vec<Endpoint>,
    /// The peer's overlay IPv4 address.
    pub overlay_v4: Option<Ipv4Addr>,
    /// The peer's overlay IPv6 address.
    pub overlay_v6: Option<Ipv6Addr>,
    /// Prefixes reachable through the peer.
    pub prefixes: Vec<IpNet>,
    /// Name of the per-peer TUN interface (≤ 15 bytes).
    pub interface: String,
    /// Underlay MTU towards this peer in bytes.
    pub underlay_mtu: u16,
    /// Destinations normally reached over the underlay (not through the overlay) that
    /// detour moves into the overlay while the path to this peer is down; the peer's
    /// endpoint addresses are always protected too.
    pub protected: Vec<IpNet>,
}

impl PeerConfig {
    /// Largest inner (overlay) packet in bytes that fits this peer's underlay MTU.
    pub fn inner_mtu(&self) -> u16 {
        inner_mtu(self.underlay_mtu)
    }
}

/// Largest inner packet that fits an underlay MTU, assuming an IPv6 underlay (the worse
/// case): `underlay_mtu - 40 (IPv6) - 8 (UDP) - 64 (detour header and tag)`.
pub fn inner_mtu(underlay_mtu: u16) -> u16 {
    underlay_mtu.saturating_sub((40 + 8 + wire::OVERHEAD) as u16)
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it was read from (for messages).
    pub file: String,
    /// `[node]`.
    pub node: NodeConfig,
    /// `[kernel]`.
    pub kernel: KernelConfig,
    /// `[failover]`.
    pub failover: FailoverSettings,
    /// `[management]`.
    pub management: ManagementConfig,
    /// `[replex]`.
    pub replex: ReplexConfig,
    /// `[exit]`.
    pub exit: ExitConfig,
    /// `[[peer]]` entries, in file order.
    pub peers: Vec<PeerConfig>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node: RawNode,
    #[serde(default)]
    kernel: RawKernel,
    #[serde(default)]
    failover: RawFailover,
    #[serde(default)]
    management: RawManagement,
    #[serde(default)]
    replex: RawReplex,
    #[serde(default)]
    policy: RawPolicy,
    #[serde(default)]
    exit: RawExit,
    #[serde(default, rename = "peer")]
    peers: Vec<RawPeer>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: String,
    private_key: String,
    #[serde(default)]
    listen: Vec<String>,
    data_port: Option<u16>,
    management_port: Option<u16>,
    overlay_ipv4: Option<String>,
    overlay_ipv6: Option<String>,
    #[serde(default)]
    prefixes: Vec<String>,
    underlay_mtu: Option<u16>,
    log_level: Option<String>,
    control_socket: Option<String>,
    relay: Option<bool>,
    uptime: Option<String>,
    #[serde(default)]
    advertise: Vec<String>,
    metrics_listen: Option<String>,
    #[serde(default)]
    networks: Vec<String>,
    #[serde(default)]
    allow_degraded: bool,
    instance: Option<i64>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    commitment: Option<String>,
    priority: Option<i64>,
    connectivity: Option<String>,
    #[serde(default)]
    source_prefixes: Vec<String>,
    lifespan: Option<String>,
    local: Option<bool>,
    overlay: Option<bool>,
    internet: Option<bool>,
    internet_masquerade: Option<bool>,
    #[serde(default)]
    exit_prefixes: Vec<String>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct RawExit {
    #[serde(default)]
    watch: Vec<String>,
    #[serde(default)]
    always: Vec<String>,
    hold_s: Option<u64>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct RawReplex {
    enabled: Option<bool>,
    mode: Option<String>,
    period_ms: Option<u64>,
    lambda: Option<f64>,
    beta: Option<f64>,
    theta_ms: Option<f64>,
    alpha_off_ms: Option<f64>,
    loss_penalty_ms: Option<f64>,
    min_samples: Option<u32>,
    kernel_buckets: Option<u16>,
    flow_idle_s: Option<u64>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct RawManagement {
    max_neighbours: Option<usize>,
    min_neighbours: Option<usize>,
    target_delivery: Option<f64>,
    api_port: Option<u16>,
    api_rate: Option<u32>,
    dscp: Option<bool>,
    qdisc_interface: Option<String>,
    qdisc_rate: Option<String>,
    idle_timeout_s: Option<u64>,
    handshake_max_pending: Option<usize>,
    handshake_retry_above: Option<usize>,
    handshake_rate: Option<u32>,
    handshake_burst: Option<u32>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct RawFailover {
    probe_interval_ms: Option<u64>,
    standby_probe_interval_ms: Option<u64>,
    idle_probe_interval_ms: Option<u64>,
    traffic_hold_ms: Option<u64>,
    down_after_ms: Option<u64>,
    fast_down_after_ms: Option<u64>,
    confirm_interval_ms: Option<u64>,
    hold_down_ms: Option<u64>,
    max_hold_down_ms: Option<u64>,
    flap_half_life_s: Option<u64>,
    degraded_loss: Option<f64>,
    recover_loss: Option<f64>,
    failed_loss: Option<f64>,
    degraded_rtt_ms: Option<u64>,
    degraded_after_ms: Option<u64>,
    relay_candidates: Option<usize>,
    icmp: Option<bool>,
    nfqueue: Option<u16>,
    tcp_monitor: Option<bool>,
    tcp_poll_ms: Option<u64>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct RawKernel {
    table: Option<u32>,
    rule_priority: Option<u32>,
    fwmark: Option<u32>,
    aggregate_interface: Option<String>,
    interface_prefix: Option<String>,
    link_pool_v4: Option<String>,
    relay_forwarding: Option<bool>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    name: String,
    public_key: String,
    #[serde(default)]
    endpoints: Vec<String>,
    overlay_ipv4: Option<String>,
    overlay_ipv6: Option<String>,
    #[serde(default)]
    prefixes: Vec<String>,
    interface: Option<String>,
    underlay_mtu: Option<u16>,
    #[serde(default)]
    protected: Vec<String>,
}

struct Errors<'a> {
    file: &'a str,
    list: Vec<ConfigError>,
}

impl Errors<'_> {
    fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.list.push(ConfigError { file: self.file.to_string(), key: key.into(), message: message.into() });
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 32 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// True when `s` is usable as a Linux interface name (1–15 bytes, no `/`, `:` or space).
pub fn valid_ifname(s: &str) -> bool {
    !s.is_empty() && s.len() <= 15 && s != "." && s != ".." && s.bytes().all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

/// The per-peer interface name for `peer_name`: `prefix + name` when that fits in 15 bytes,
/// otherwise `prefix + the start of the name + 4 hex digits of SHA-256(name)`, so names stay
/// stable across restarts and distinct for distinct long names.
pub fn derive_ifname(prefix: &str, peer_name: &str) -> String {
    let full = format!("{prefix}{peer_name}");
    if full.len() <= 15 {
        return full;
    }
    let digest = Sha256::digest(peer_name.as_bytes());
    let tag = format!("{:02x}{:02x}", digest[0], digest[1]);
    let keep = 15usize.saturating_sub(prefix.len() + tag.len());
    let head: String = peer_name.chars().take(keep).collect();
    format!("{prefix}{head}{tag}")
}

fn parse_prefix(errs: &mut Errors, key: &str, s: &str) -> Option<IpNet> {
    match s.parse::<IpNet>() {
        Ok(net) if net.trunc() != net => {
            errs.push(key, format!("`{s}` has host bits set; expected a network prefix such as `{}`", net.trunc()));
            None
        }
        Ok(net) => Some(net),
        Err(_) => match s.parse::<IpAddr>() {
            Ok(a) => Some(IpNet::from(a)),
            Err(_) => {
                errs.push(key, format!("expected an IP prefix such as `10.1.0.0/16` or `fd00:1::/64`, got `{s}`"));
                None
            }
        },
    }
}

/// Parses an endpoint: `1.2.3.4`, `1.2.3.4:7720`, `[2001:db8::1]:7720`, `2001:db8::1`,
/// `host` or `host:7720`. The port is the peer's data port (default [`DEFAULT_DATA_PORT`]).
pub fn parse_endpoint(s: &str) -> Result<Endpoint, String> {
    let s = s.trim();
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return check_port(sa.port()).map(|_| Endpoint::Addr(sa));
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(Endpoint::Addr(SocketAddr::new(ip, DEFAULT_DATA_PORT)));
    }
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => {
            let port = p.parse::<u16>().map_err(|_| format!("bad port in `{s}`"))?;
            check_port(port)?;
            (h, port)
        }
        None => (s, DEFAULT_DATA_PORT),
    };
    let host_ok = !host.is_empty() && host.len() <= 253 && host.split('.').all(|l| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    if !host_ok {
        return Err(format!("expected `address`, `address:port`, `[ipv6]:port` or `hostname[:port]`, got `{s}`"));
    }
    Ok(Endpoint::Host(host.to_string(), port))
}

fn check_port(p: u16) -> Result<(), String> {
    if p == 0 || p == u16::MAX {
        Err(format!("port {p} is not usable (the management port is the data port + 1)"))
    } else {
        Ok(())
    }
}

impl Config {
    /// Whether protected destinations may be split between the direct path and the
    /// overlay: by REPLEX, or by the relief of a degraded path (on unless
    /// `failover.failed_loss = failover.degraded_loss`). Splits need connection pinning
    /// (netfilter chains and policy rules) and the kernel's layer-4 multipath hash.
    pub fn splits(&self) -> bool {
        self.replex.enabled || self.failover.degraded_loss < self.failover.failed_loss
    }

    /// Parses and validates configuration text; `file` is only used in messages. The log
    /// level is taken as it is: [`Config::parse_with`] checks it too.
    ///
    /// # Errors
    /// Every problem found, each naming the file and key.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigErrors> {
        Config::parse_with(text, file, &|_| true)
    }

    /// [`Config::parse`], with `log_level_ok` telling whether `node.log_level` is a
    /// directive the logging backend accepts (the shell's; the core has no logging
    /// backend). Reading the file is the shell's too (`detour::shell::files::load_config`).
    ///
    /// # Errors
    /// Every problem found, each naming the file and key.
    pub fn parse_with(text: &str, file: &str, log_level_ok: &dyn Fn(&str) -> bool) -> Result<Config, ConfigErrors> {
        let raw = parse_raw(text, file)?;
        let mut errs = Errors { file, list: Vec::new() };
        let cfg = validate(raw, file, &mut errs, log_level_ok);
        if errs.list.is_empty() {
            Ok(cfg.expect("validation produced no config but no error"))
        } else {
            Err(ConfigErrors(errs.list))
        }
    }

    /// This overlay's bit of the packet mark on this host: `0x0100_0000 << node.instance`.
    /// An ICMP error this overlay's detourd does not act on is passed on to the other
    /// overlays' interception with this bit set, so that its own rule skips it then.
    pub fn instance_mark(&self) -> u32 {
        0x0100_0000 << self.node.instance
    }

    /// What would collide if this overlay and `other` ran on the same host (issue 15: several
    /// overlays on one host, `detourd@NAME.service`): the same instance number, ports,
    /// routing tables or rule priorities that overlap, the NFQUEUE number, interface names
    /// or prefixes, the control socket, the management qdisc's interface, overlapping
    /// overlay networks or prefixes; and a different `kernel.fwmark` (every overlay's own
    /// packets must bypass every overlay's routes, so the mark is one for all). One message
    /// per collision, naming the key and `other`'s file.
    pub fn conflicts(&self, other: &Config) -> Vec<String> {
        let (a, b, f) = (self, other, &other.file);
        let mut v = Vec::new();
        if a.node.instance == b.node.instance {
            v.push(format!("node.instance: {} is also the instance of {f} (each overlay on a host needs its own; set node.instance)", a.node.instance));
        }
        let ports = |c: &Config| [Some(c.node.data_port), Some(c.node.management_port), c.management.api_port].into_iter().flatten().collect::<Vec<u16>>();
        let (pa, pb) = (ports(a), ports(b));
        for p in pa.iter().filter(|p| pb.contains(p)) {
            v.push(format!("node.data_port: port {p} is also used by {f} (data, management and API ports must differ between overlays)"));
        }
        let overlap = |x: (u32, u32), y: (u32, u32)| x.0 <= y.1 && y.0 <= x.1;
        let (ta, tb) = (a.kernel.table, b.kernel.table);
        if overlap((ta, ta + 3), (tb, tb + 3)) {
            v.push(format!("kernel.table: tables {ta}-{} overlap {f}'s {tb}-{}", ta + 3, tb + 3));
        }
        let (ra, rb) = (a.kernel.rule_priority, b.kernel.rule_priority);
        if overlap((ra.saturating_sub(3), ra), (rb.saturating_sub(3), rb)) {
            v.push(format!("kernel.rule_priority: priorities {}-{ra} overlap {f}'s {}-{rb}", ra.saturating_sub(3), rb.saturating_sub(3)));
        }
        if a.kernel.fwmark != b.kernel.fwmark {
            v.push(format!(
                "kernel.fwmark: {:#x} differs from {f}'s {:#x} (every overlay on a host must use the same mark, so that none routes another's encapsulated packets)",
                a.kernel.fwmark, b.kernel.fwmark
            ));
        }
        if a.failover.nfqueue == b.failover.nfqueue {
            v.push(format!("failover.nfqueue: queue {} is also {f}'s", a.failover.nfqueue));
        }
        let names = |c: &Config| std::iter::once(c.kernel.aggregate_interface.clone()).chain(c.peers.iter().map(|p| p.interface.clone())).collect::<Vec<String>>();
        let nb = names(b);
        for n in names(a).iter().filter(|n| nb.contains(n)) {
            v.push(format!("kernel.aggregate_interface / peer.interface: interface {n} is also {f}'s"));
        }
        if a.kernel.interface_prefix == b.kernel.interface_prefix {
            v.push(format!("kernel.interface_prefix: `{}` is also {f}'s (the interfaces of directory nodes would collide)", a.kernel.interface_prefix));
        }
        if a.node.control_socket == b.node.control_socket {
            v.push(format!("node.control_socket: {} is also {f}'s", a.node.control_socket.display()));
        }
        if let (Some(x), Some(y)) = (&a.management.qdisc_interface, &b.management.qdisc_interface) {
            if x == y {
                v.push(format!("management.qdisc_interface: {x} also carries {f}'s qdisc (one root qdisc per interface)"));
            }
        }
        let nets = |c: &Config| {
            let mut n: Vec<IpNet> = c.node.overlay_v4.map(|x| IpNet::V4(x.trunc())).into_iter().chain(c.node.overlay_v6.map(|x| IpNet::V6(x.trunc()))).collect();
            n.extend(c.node.prefixes.iter().copied());
            n
        };
        let nb = nets(b);
        for x in nets(a) {
            for y in nb.iter().filter(|y| x.contains(*y) || y.contains(&x)) {
                v.push(format!("node.overlay_ipv4 / overlay_ipv6 / prefixes: {x} overlaps {y} of {f} (the kernel would send one overlay's traffic into the other)"));
            }
        }
        v
    }

    /// The peer with this node ID.
    pub fn peer_by_id(&self, id: &NodeId) -> Option<(usize, &PeerConfig)> {
        self.peers.iter().enumerate().find(|(_, p)| p.node_id == *id)
    }

    /// MTU of the aggregate interface: the largest inner MTU over all peers (or of the node
    /// when there are none); packets too big for a particular peer are answered with ICMP.
    pub fn aggregate_mtu(&self) -> u16 {
        self.peers.iter().map(|p| p.inner_mtu()).max().unwrap_or_else(|| inner_mtu(self.node.underlay_mtu))
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|&b| b == b'\n').count() + 1
}

fn parse_raw(text: &str, file: &str) -> Result<RawConfig, ConfigErrors> {
    let one = |key: String, message: String| ConfigErrors(vec![ConfigError { file: file.to_string(), key, message }]);
    let de = toml::de::Deserializer::parse(text).map_err(|e| {
        let at = e.span().map(|s| format!("line {}", line_of(text, s.start))).unwrap_or_else(|| "(syntax)".into());
        one(at, format!("TOML syntax error: {}", e.message().trim()))
    })?;
    serde_path_to_error::deserialize::<_, RawConfig>(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.inner();
        let mut key = if path == "." || path.is_empty() { "(top level)".to_string() } else { path };
        if let Some(span) = inner.span() {
            key = format!("{key} (line {})", line_of(text, span.start));
        }
        one(key, inner.message().trim().to_string())
    })
}

fn validate(raw: RawConfig, file: &str, errs: &mut Errors, log_level_ok: &dyn Fn(&str) -> bool) -> Option<Config> {
    let n = raw.node;
    if !valid_name(&n.name) {
        errs.push("node.name", format!("expected 1-32 characters of [A-Za-z0-9._-], got `{}`", n.name));
    }
    if n.private_key.trim().is_empty() {
        errs.push("node.private_key", "expected the path of the private key file (make one with `detourctl genkey PATH`)");
    }
    let mut listen = Vec::new();
    for (i, l) in n.listen.iter().enumerate() {
        match l.parse::<IpAddr>() {
            Ok(a) => listen.push(a),
            Err(_) => errs.push(format!("node.listen[{i}]"), format!("expected an IP address such as `0.0.0.0`, `::` or `192.0.2.1`, got `{l}`")),
        }
    }
    let instance = match n.instance {
        None => 0,
        Some(i) if (0..i64::from(MAX_INSTANCES)).contains(&i) => i as u8,
        Some(i) => {
            errs.push("node.instance", format!("expected 0..={} (the number of this overlay on this host), got {i}", MAX_INSTANCES - 1));
            0
        }
    };
    let step = 10 * u16::from(instance);
    let data_port = n.data_port.unwrap_or(DEFAULT_DATA_PORT + step);
    if let Err(m) = check_port(data_port) {
        errs.push("node.data_port", m);
    }
    let management_port = n.management_port.unwrap_or(data_port.wrapping_add(1));
    if Some(management_port) != data_port.checked_add(1) {
        errs.push("node.management_port", format!("expected data_port + 1 = {} (the two ports are adjacent), got {management_port}", data_port.wrapping_add(1)));
    }
    let overlay_v4 = n.overlay_ipv4.as_ref().and_then(|s| match s.parse::<Ipv4Net>() {
        Ok(net) if net.prefix_len() < 31 && (net.addr() == net.network() || net.addr() == net.broadcast()) => {
            errs.push("node.overlay_ipv4", format!("`{s}` is the network or broadcast address of its prefix; expected a host address such as `10.77.0.1/24`"));
            None
        }
        Ok(net) => Some(net),
        Err(_) => {
            errs.push("node.overlay_ipv4", format!("expected this node's overlay address with the overlay prefix length, such as `10.77.0.1/24`, got `{s}`"));
            None
        }
    });
    let overlay_v6 = n.overlay_ipv6.as_ref().and_then(|s| match s.parse::<Ipv6Net>() {
        Ok(net) => Some(net),
        Err(_) => {
            errs.push("node.overlay_ipv6", format!("expected this node's overlay address with the overlay prefix length, such as `fd77::1/64`, got `{s}`"));
            None
        }
    });
    if n.overlay_ipv4.is_none() && n.overlay_ipv6.is_none() {
        errs.push("node", "expected at least one of `overlay_ipv4` and `overlay_ipv6`");
    }
    let mut prefixes = Vec::new();
    for (i, p) in n.prefixes.iter().enumerate() {
        if let Some(net) = parse_prefix(errs, &format!("node.prefixes[{i}]"), p) {
            prefixes.push(net);
        }
    }
    let underlay_mtu = n.underlay_mtu.unwrap_or(DEFAULT_UNDERLAY_MTU);
    check_mtu(errs, "node.underlay_mtu", underlay_mtu, overlay_v6.is_some());
    let log_level = n.log_level.unwrap_or_else(|| "info".to_string());
    if !log_level_ok(&log_level) {
        errs.push("node.log_level", format!("expected `error`, `warn`, `info`, `debug`, `trace` or a tracing directive, got `{log_level}`"));
    }
    let relay = n.relay.unwrap_or(true);
    let uptime = n.uptime.as_deref().and_then(|u| parse_uptime(errs, "node.uptime", u)).unwrap_or(crate::overlay::directory::Uptime::Stable);
    let mut networks = Vec::new();
    for (i, p) in n.networks.iter().enumerate() {
        if let Some(net) = parse_prefix(errs, &format!("node.networks[{i}]"), p) {
            networks.push(net);
        }
    }
    let policy = validate_policy(raw.policy, relay, n.relay.is_some(), uptime, n.uptime.is_some(), errs);
    let exit = validate_exit(raw.exit, errs);
    let metrics_listen = match n.metrics_listen.as_deref().map(str::parse::<SocketAddr>) {
        None => None,
        Some(Ok(sa)) => Some(sa),
        Some(Err(_)) => {
            errs.push("node.metrics_listen", format!("expected an address and port such as `127.0.0.1:9772`, got `{}`", n.metrics_listen.as_deref().unwrap_or("")));
            None
        }
    };
    let mut advertise = Vec::new();
    for (i, a) in n.advertise.iter().enumerate() {
        match a.parse::<SocketAddr>().or_else(|_| a.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, data_port))) {
            Ok(sa) if !sa.ip().is_unspecified() && sa.port() != 0 => advertise.push(sa),
            _ => errs.push(format!("node.advertise[{i}]"), format!("expected an underlay address such as `192.0.2.1` or `[2001:db8::1]:7720`, got `{a}`")),
        }
    }
    let control_socket = PathBuf::from(n.control_socket.unwrap_or_else(|| if instance == 0 { DEFAULT_CONTROL_SOCKET.to_string() } else { format!("/run/detour/detourd-{instance}.sock") }));
    if !control_socket.is_absolute() {
        errs.push("node.control_socket", format!("expected an absolute path, got `{}`", control_socket.display()));
    }

    let k = raw.kernel;
    let table = k.table.unwrap_or(DEFAULT_TABLE + u32::from(step));
    if matches!(table, 0 | 253..=255) {
        errs.push("kernel.table", format!("table {table} is reserved (0 unspec, 253 default, 254 main, 255 local); expected another number"));
    }
    let rule_priority = k.rule_priority.unwrap_or(DEFAULT_RULE_PRIORITY - u32::from(step));
    if !(1..32766).contains(&rule_priority) {
        errs.push("kernel.rule_priority", format!("expected 1..32765 (before the main table's rule at 32766), got {rule_priority}"));
    }
    let fwmark = k.fwmark.unwrap_or(DEFAULT_FWMARK);
    if fwmark == 0 {
        errs.push("kernel.fwmark", "expected a non-zero firewall mark");
    }
    let aggregate_interface = k.aggregate_interface.unwrap_or_else(|| if instance == 0 { DEFAULT_AGGREGATE_INTERFACE.to_string() } else { format!("detour{instance}") });
    if !valid_ifname(&aggregate_interface) {
        errs.push("kernel.aggregate_interface", format!("expected an interface name of 1-15 characters, got `{aggregate_interface}`"));
    }
    let interface_prefix = k.interface_prefix.unwrap_or_else(|| if instance == 0 { DEFAULT_INTERFACE_PREFIX.to_string() } else { format!("dt{instance}-") });
    if interface_prefix.len() > 8 || !(interface_prefix.is_empty() || valid_ifname(&interface_prefix)) {
        errs.push("kernel.interface_prefix", format!("expected at most 8 interface-name characters, got `{interface_prefix}`"));
    }
    let link_pool_v4 = match k.link_pool_v4.as_deref().unwrap_or(DEFAULT_LINK_POOL_V4).parse::<Ipv4Net>() {
        Ok(net) if net.prefix_len() <= 24 && net.trunc() == net => net,
        _ => {
            errs.push("kernel.link_pool_v4", "expected an IPv4 prefix of length /24 or shorter, such as `169.254.0.0/16`");
            DEFAULT_LINK_POOL_V4.parse().unwrap()
        }
    };

    let failover = validate_failover(raw.failover, 7720 + step, errs);
    let management = validate_management(raw.management, data_port, errs);
    let replex = validate_replex(raw.replex, errs);
    // detour's tables are table .. table + 3 (docs/design.md, "Kernel state"), its rules
    // take rule_priority - 3 .. rule_priority, and its mark bits are 0xf00000.
    for extra in 1..crate::kernel::TABLES {
        if matches!(table.wrapping_add(extra), 0 | 253..=255) {
            errs.push("kernel.table", format!("table {} (kernel.table + {extra}, also detour's) is reserved; expected a table number with three free numbers after it", table.wrapping_add(extra)));
        }
    }
    if (1..4).contains(&rule_priority) {
        errs.push("kernel.rule_priority", "expected 4 or more (detour's class and pin rules take rule_priority - 3 .. rule_priority - 1)");
    }
    let own_bits = crate::kernel::PIN_MASK | crate::kernel::CLASS_NEW | crate::kernel::CLASS_EGRESS;
    if fwmark & own_bits != 0 {
        errs.push("kernel.fwmark", format!("expected a mark without detour's connection-mark bits {own_bits:#x}"));
    }

    let mut peers = Vec::new();
    let mut names = HashSet::new();
    let mut keys = HashMap::new();
    let mut ifnames: HashMap<String, String> = HashMap::new();
    ifnames.insert(aggregate_interface.clone(), "kernel.aggregate_interface".into());
    let mut addrs: HashMap<IpAddr, String> = HashMap::new();
    if let Some(v4) = overlay_v4 {
        addrs.insert(IpAddr::V4(v4.addr()), "node.overlay_ipv4".into());
    }
    if let Some(v6) = overlay_v6 {
        addrs.insert(IpAddr::V6(v6.addr()), "node.overlay_ipv6".into());
    }
    let mut announced: HashMap<IpNet, String> = HashMap::new();
    for (i, p) in raw.peers.into_iter().enumerate() {
        let at = |f: &str| format!("peer[{i}].{f}");
        if !valid_name(&p.name) {
            errs.push(at("name"), format!("expected 1-32 characters of [A-Za-z0-9._-], got `{}`", p.name));
        } else if !names.insert(p.name.clone()) {
            errs.push(at("name"), format!("peer name `{}` is used twice", p.name));
        }
        let key = match p.public_key.parse::<PublicKey>() {
            Ok(k) => {
                if let Some(other) = keys.insert(k, i) {
                    errs.push(at("public_key"), format!("the same key is already pinned by peer[{other}]"));
                }
                Some(k)
            }
            Err(e) => {
                errs.push(at("public_key"), format!("{e}; `detourctl pubkey KEYFILE` prints it"));
                None
            }
        };
        let mut endpoints = Vec::new();
        for (j, e) in p.endpoints.iter().enumerate() {
            match parse_endpoint(e) {
                Ok(ep) => endpoints.push(ep),
                Err(m) => errs.push(at(&format!("endpoints[{j}]")), m),
            }
        }
        let ov4 = p.overlay_ipv4.as_ref().and_then(|s| match s.parse::<Ipv4Addr>() {
            Ok(a) => Some(a),
            Err(_) => {
                errs.push(at("overlay_ipv4"), format!("expected the peer's overlay IPv4 address such as `10.77.0.2` (no prefix length), got `{s}`"));
                None
            }
        });
        let ov6 = p.overlay_ipv6.as_ref().and_then(|s| match s.parse::<Ipv6Addr>() {
            Ok(a) => Some(a),
            Err(_) => {
                errs.push(at("overlay_ipv6"), format!("expected the peer's overlay IPv6 address such as `fd77::2` (no prefix length), got `{s}`"));
                None
            }
        });
        if p.overlay_ipv4.is_none() && p.overlay_ipv6.is_none() {
            errs.push(format!("peer[{i}]"), "expected at least one of `overlay_ipv4` and `overlay_ipv6`");
        }
        for (a, key) in [(ov4.map(IpAddr::V4), "overlay_ipv4"), (ov6.map(IpAddr::V6), "overlay_ipv6")] {
            if let Some(a) = a {
                if let Some(prev) = addrs.insert(a, at(key)) {
                    errs.push(at(key), format!("address {a} is already used by {prev}"));
                }
            }
        }
        let mut pfx = Vec::new();
        for (j, s) in p.prefixes.iter().enumerate() {
            let key = at(&format!("prefixes[{j}]"));
            if let Some(net) = parse_prefix(errs, &key, s) {
                if let Some(prev) = announced.insert(net, key.clone()) {
                    errs.push(key, format!("prefix {net} is already routed to {prev}; a prefix belongs to one peer"));
                } else {
                    pfx.push(net);
                }
            }
        }
        let interface = p.interface.clone().unwrap_or_else(|| derive_ifname(&interface_prefix, &p.name));
        if !valid_ifname(&interface) {
            errs.push(at("interface"), format!("expected an interface name of 1-15 characters, got `{interface}`"));
        } else if let Some(prev) = ifnames.insert(interface.clone(), at("interface")) {
            errs.push(at("interface"), format!("interface name `{interface}` is also used by {prev}; set `interface` explicitly"));
        }
        let mut protected = Vec::new();
        for (j, s) in p.protected.iter().enumerate() {
            let key = at(&format!("protected[{j}]"));
            if let Some(net) = parse_prefix(errs, &key, s) {
                if let Some(prev) = announced.insert(net, key.clone()) {
                    errs.push(key, format!("prefix {net} is already routed to {prev}; a prefix belongs to one peer"));
                } else {
                    protected.push(net);
                }
            }
        }
        let peer_mtu = p.underlay_mtu.unwrap_or(underlay_mtu);
        if p.underlay_mtu.is_some() {
            check_mtu(errs, &at("underlay_mtu"), peer_mtu, overlay_v6.is_some());
        }
        if let Some(public_key) = key {
            peers.push(PeerConfig {
                name: p.name,
                public_key,
                node_id: public_key.node_id(),
                endpoints,
                overlay_v4: ov4,
                overlay_v6: ov6,
                prefixes: pfx,
                interface,
                underlay_mtu: peer_mtu,
                protected,
            });
        }
    }
    for net in &prefixes {
        if let Some(prev) = announced.get(net) {
            errs.push("node.prefixes", format!("prefix {net} is announced by this node and routed to {prev}"));
        }
    }

    Some(Config {
        file: file.to_string(),
        node: NodeConfig {
            name: n.name,
            private_key: PathBuf::from(n.private_key),
            listen,
            data_port,
            management_port,
            overlay_v4,
            overlay_v6,
            prefixes,
            underlay_mtu,
            log_level,
            control_socket,
            relay,
            uptime,
            advertise,
            metrics_listen,
            networks,
            policy,
            allow_degraded: n.allow_degraded,
            instance,
        },
        kernel: KernelConfig { table, rule_priority, fwmark, aggregate_interface, interface_prefix, link_pool_v4, relay_forwarding: k.relay_forwarding.unwrap_or(true) },
        failover,
        management,
        replex,
        exit,
        peers,
    })
}

/// `[policy]`: the relay policy (`docs/policies.md`). `node.relay = false` means
/// commitment `never`, and `node.uptime` is the lifespan; given in both places they must
/// agree.
fn validate_policy(r: RawPolicy, relay: bool, relay_set: bool, uptime: crate::overlay::directory::Uptime, uptime_set: bool, errs: &mut Errors) -> crate::node::policy::Policy {
    use crate::node::policy::{Commitment, Connectivity, Policy, Willing};
    let d = Policy::default();
    let commitment = match r.commitment.as_deref() {
        None => {
            if relay {
                Commitment::Always
            } else {
                Commitment::Never
            }
        }
        Some(s) => {
            let c = match s {
                "always" => Commitment::Always,
                "failure" => Commitment::Failure,
                "last_resort" => Commitment::LastResort,
                "never" => Commitment::Never,
                other => {
                    errs.push(
                        "policy.commitment",
                        format!("expected \"always\" (relays any traffic), \"failure\" (only while a path has failed), \"last_resort\" (only when no other relay works) or \"never\", got {other:?}"),
                    );
                    Commitment::Always
                }
            };
            if relay_set && (c == Commitment::Never) == relay {
                errs.push("policy.commitment", format!("{:?} contradicts node.relay = {relay}; set one of them", c.as_str()));
            }
            c
        }
    };
    let priority = match r.priority {
        None => d.priority,
        Some(p) if (0..=255).contains(&p) => p as u8,
        Some(p) => {
            errs.push("policy.priority", format!("expected 0..255 (higher is preferred among relays of the same commitment), got {p}"));
            d.priority
        }
    };
    let connectivity = match r.connectivity.as_deref() {
        None | Some("host") => Connectivity::Host,
        Some("broadcast_domain") => Connectivity::BroadcastDomain,
        Some("subnet_router") => Connectivity::SubnetRouter,
        Some("unrestricted") => Connectivity::Unrestricted,
        Some("partial") => Connectivity::Partial,
        Some(other) => {
            errs.push("policy.connectivity", format!("expected \"host\", \"broadcast_domain\", \"subnet_router\", \"unrestricted\" or \"partial\", got {other:?}"));
            Connectivity::Host
        }
    };
    let mut source_prefixes = Vec::new();
    for (i, p) in r.source_prefixes.iter().enumerate() {
        if let Some(net) = parse_prefix(errs, &format!("policy.source_prefixes[{i}]"), p) {
            source_prefixes.push(net);
        }
    }
    if !source_prefixes.is_empty() && connectivity != Connectivity::Partial {
        errs.push("policy.source_prefixes", "only used with connectivity = \"partial\"");
    }
    let lifespan = match r.lifespan.as_deref() {
        None => uptime,
        Some(s) => {
            let l = parse_uptime(errs, "policy.lifespan", s).unwrap_or(uptime);
            if uptime_set && l != uptime {
                errs.push("policy.lifespan", "contradicts node.uptime; set one of them");
            }
            l
        }
    };
    let dw = Willing::default();
    let willing = Willing {
        local: r.local.unwrap_or(dw.local),
        overlay: r.overlay.unwrap_or(dw.overlay),
        internet: r.internet.unwrap_or(dw.internet),
        internet_masquerade: r.internet_masquerade.unwrap_or(dw.internet_masquerade),
    };
    if willing.internet && !matches!(connectivity, Connectivity::Unrestricted | Connectivity::Partial) {
        errs.push(
            "policy.internet",
            format!("a node of connectivity class {:?} cannot send other nodes' traffic to the Internet with their source address; use internet_masquerade", connectivity.as_str()),
        );
    }
    let mut exit_prefixes = Vec::new();
    for (i, p) in r.exit_prefixes.iter().enumerate() {
        if let Some(net) = parse_prefix(errs, &format!("policy.exit_prefixes[{i}]"), p) {
            exit_prefixes.push(net);
        }
    }
    Policy { commitment, priority, connectivity, source_prefixes, willing, lifespan, up_since: 0, exit_prefixes }
}

/// `stable` or `ephemeral` (`node.uptime`, `policy.lifespan`); an error names `key`.
fn parse_uptime(errs: &mut Errors, key: &str, s: &str) -> Option<crate::overlay::directory::Uptime> {
    match s {
        "stable" => Some(crate::overlay::directory::Uptime::Stable),
        "ephemeral" => Some(crate::overlay::directory::Uptime::Ephemeral),
        other => {
            errs.push(key, format!("expected `stable` (routers, servers) or `ephemeral` (laptops and the like), got `{other}`"));
            None
        }
    }
}

fn validate_exit(r: RawExit, errs: &mut Errors) -> ExitConfig {
    let mut list = |key: &str, v: &[String]| -> Vec<IpNet> { v.iter().enumerate().filter_map(|(i, p)| parse_prefix(errs, &format!("exit.{key}[{i}]"), p)).collect() };
    let watch = list("watch", &r.watch);
    let always = list("always", &r.always);
    let hold_s = r.hold_s.unwrap_or(60);
    if !(1..=86_400).contains(&hold_s) {
        errs.push("exit.hold_s", format!("expected 1..86400 seconds, got {hold_s}"));
    }
    ExitConfig { watch, always, hold: Duration::from_secs(hold_s.clamp(1, 86_400)) }
}

fn validate_replex(r: RawReplex, errs: &mut Errors) -> ReplexConfig {
    let d = ReplexConfig::default();
    let mut num = |key: &str, v: Option<f64>, default: f64, lo: f64, hi: f64, what: &str| -> f64 {
        match v {
            None => default,
            Some(x) if x.is_finite() && (lo..=hi).contains(&x) => x,
            Some(x) => {
                errs.push(format!("replex.{key}"), format!("expected {what} in {lo}..{hi}, got {x}"));
                default
            }
        }
    };
    let lambda = num("lambda", r.lambda, d.params.lambda, 0.001, 1.0, "a migration rate");
    let beta = num("beta", r.beta, d.params.beta, 0.0, 1.0, "an exploration ratio");
    let theta_ms = num("theta_ms", r.theta_ms, d.params.theta_ms, 0.0, 1000.0, "milliseconds");
    let alpha_off_ms = num("alpha_off_ms", r.alpha_off_ms, d.params.alpha_off_ms, 0.0, 1000.0, "milliseconds");
    let loss_penalty_ms = num("loss_penalty_ms", r.loss_penalty_ms, d.params.loss_penalty_ms, 0.0, 100_000.0, "milliseconds");
    let period_ms = r.period_ms.unwrap_or(d.period.as_millis() as u64);
    if !(100..=60_000).contains(&period_ms) {
        errs.push("replex.period_ms", format!("expected 100..60000 milliseconds, got {period_ms}"));
    }
    let min_samples = r.min_samples.unwrap_or(d.params.min_samples);
    if min_samples > 1000 {
        errs.push("replex.min_samples", format!("expected 0..1000, got {min_samples}"));
    }
    let kernel_buckets = r.kernel_buckets.unwrap_or(d.kernel_buckets);
    if !(16..=4096).contains(&kernel_buckets) {
        errs.push("replex.kernel_buckets", format!("expected 16..4096, got {kernel_buckets}"));
    }
    let flow_idle_s = r.flow_idle_s.unwrap_or(d.flow_idle.as_secs());
    if !(1..=3600).contains(&flow_idle_s) {
        errs.push("replex.flow_idle_s", format!("expected 1..3600 seconds, got {flow_idle_s}"));
    }
    let mode = match r.mode.as_deref() {
        None | Some("adaptive") => ReplexMode::Adaptive,
        Some("equal") => ReplexMode::Equal,
        Some(other) => {
            errs.push("replex.mode", format!("expected \"adaptive\" or \"equal\", got {other:?}"));
            ReplexMode::Adaptive
        }
    };
    ReplexConfig {
        enabled: r.enabled.unwrap_or(d.enabled),
        mode,
        period: Duration::from_millis(period_ms.clamp(100, 60_000)),
        params: crate::path::replex::Params { lambda, beta, theta_ms, alpha_off_ms, loss_penalty_ms, min_samples: min_samples.min(1000), ..d.params },
        kernel_buckets: kernel_buckets.clamp(16, 4096),
        flow_idle: Duration::from_secs(flow_idle_s.clamp(1, 3600)),
    }
}

/// Parses a rate such as `100mbit`, `1.5gbit`, `800kbit` or a plain number of bit/s.
pub fn parse_rate(s: &str) -> Option<u64> {
    let t = s.trim().to_ascii_lowercase();
    let (num, mult) = if let Some(n) = t.strip_suffix("gbit") {
        (n, 1e9)
    } else if let Some(n) = t.strip_suffix("mbit") {
        (n, 1e6)
    } else if let Some(n) = t.strip_suffix("kbit") {
        (n, 1e3)
    } else if let Some(n) = t.strip_suffix("bit") {
        (n, 1.0)
    } else {
        (t.as_str(), 1.0)
    };
    let v: f64 = num.trim().parse().ok()?;
    let bits = (v * mult) as u64;
    (v.is_finite() && v > 0.0 && bits >= 1000).then_some(bits)
}

fn validate_management(m: RawManagement, data_port: u16, errs: &mut Errors) -> ManagementConfig {
    let d = ManagementConfig::default();
    let max_neighbours = m.max_neighbours.unwrap_or(d.max_neighbours);
    if !(1..=64).contains(&max_neighbours) {
        errs.push("management.max_neighbours", format!("expected 1..64, got {max_neighbours}"));
    }
    let min_neighbours = m.min_neighbours.unwrap_or(d.min_neighbours.min(max_neighbours));
    if min_neighbours < 1 || min_neighbours > max_neighbours {
        errs.push("management.min_neighbours", format!("expected 1..max_neighbours ({max_neighbours}), got {min_neighbours}"));
    }
    let target_delivery = m.target_delivery.unwrap_or(d.target_delivery);
    if !(0.5..1.0).contains(&target_delivery) {
        errs.push("management.target_delivery", format!("expected a probability in [0.5, 1), such as 0.9999, got {target_delivery}"));
    }
    let api_port = match m.api_port {
        None => data_port.checked_add(2),
        Some(0) => None,
        Some(p) if data_port.checked_add(1) == Some(p) || p == data_port => {
            errs.push("management.api_port", format!("port {p} is the data or management port; expected another port, or 0 to turn the API off"));
            None
        }
        Some(p) => Some(p),
    };
    let api_rate = m.api_rate.unwrap_or(d.api_rate);
    if api_rate == 0 {
        errs.push("management.api_rate", "expected at least 1 message per second");
    }
    let qdisc_rate = match (&m.qdisc_interface, &m.qdisc_rate) {
        (Some(i), _) if !valid_ifname(i) => {
            errs.push("management.qdisc_interface", format!("expected an interface name of 1-15 characters, got `{i}`"));
            0
        }
        (Some(_), None) => {
            errs.push("management.qdisc_rate", "expected the underlay link's rate (a little below it), such as `95mbit`, with qdisc_interface");
            0
        }
        (_, Some(r)) => match parse_rate(r) {
            Some(v) => v,
            None => {
                errs.push("management.qdisc_rate", format!("expected a rate such as `95mbit`, `1gbit` or `800kbit`, got `{r}`"));
                0
            }
        },
        (None, None) => 0,
    };
    let idle = m.idle_timeout_s.unwrap_or(d.idle_timeout.as_secs());
    if !(5..=86_400).contains(&idle) {
        errs.push("management.idle_timeout_s", format!("expected 5..86400 seconds, got {idle}"));
    }
    let da = d.admission;
    let max_pending = m.handshake_max_pending.unwrap_or(da.max_pending);
    if !(1..=65_536).contains(&max_pending) {
        errs.push("management.handshake_max_pending", format!("expected 1..65536 handshakes in progress, got {max_pending}"));
    }
    let retry_above = m.handshake_retry_above.unwrap_or(da.retry_above.min(max_pending));
    if retry_above > max_pending {
        errs.push("management.handshake_retry_above", format!("expected at most handshake_max_pending ({max_pending}), got {retry_above}"));
    }
    let hs_rate = m.handshake_rate.unwrap_or(da.rate);
    if !(1..=100_000).contains(&hs_rate) {
        errs.push("management.handshake_rate", format!("expected 1..100000 handshakes per second per source, got {hs_rate}"));
    }
    let hs_burst = m.handshake_burst.unwrap_or(da.burst);
    if !(1..=100_000).contains(&hs_burst) {
        errs.push("management.handshake_burst", format!("expected 1..100000 handshakes, got {hs_burst}"));
    }
    ManagementConfig {
        admission: crate::overlay::admission::AdmissionConfig { max_pending, retry_above, rate: hs_rate, burst: hs_burst },
        max_neighbours: max_neighbours.clamp(1, 64),
        min_neighbours: min_neighbours.clamp(1, max_neighbours.clamp(1, 64)),
        target_delivery,
        api_port,
        api_rate: api_rate.max(1),
        dscp: m.dscp.unwrap_or(d.dscp),
        qdisc_interface: m.qdisc_interface,
        qdisc_rate,
        idle_timeout: Duration::from_secs(idle),
    }
}

fn validate_failover(f: RawFailover, default_nfqueue: u16, errs: &mut Errors) -> FailoverSettings {
    let d = crate::path::failover::FailoverConfig::default();
    let mut ms = |key: &str, v: Option<u64>, default: Duration, min: u64, max: u64| -> Duration {
        match v {
            None => default,
            Some(v) if (min..=max).contains(&v) => Duration::from_millis(v),
            Some(v) => {
                errs.push(format!("failover.{key}"), format!("expected {min}..{max} milliseconds, got {v}"));
                default
            }
        }
    };
    let probe_interval = ms("probe_interval_ms", f.probe_interval_ms, d.probe_interval, 10, 10_000);
    let standby_probe_interval = ms("standby_probe_interval_ms", f.standby_probe_interval_ms, d.standby_interval, 10, 60_000);
    let idle_probe_interval = ms("idle_probe_interval_ms", f.idle_probe_interval_ms, d.idle_interval, 10, 60_000);
    let traffic_hold = ms("traffic_hold_ms", f.traffic_hold_ms, d.traffic_hold, 0, 3_600_000);
    let down_after = ms("down_after_ms", f.down_after_ms, d.down_after, 50, 60_000);
    let hold_down = ms("hold_down_ms", f.hold_down_ms, d.hold_down, 0, 600_000);
    let fast_down_after = ms("fast_down_after_ms", f.fast_down_after_ms, d.fast_down_after, 0, 60_000);
    let confirm_interval = ms("confirm_interval_ms", f.confirm_interval_ms, d.confirm_interval, 1, 10_000);
    let max_hold_down = ms("max_hold_down_ms", f.max_hold_down_ms, d.max_hold_down.max(hold_down), 0, 3_600_000);
    let tcp_poll = ms("tcp_poll_ms", f.tcp_poll_ms, Duration::from_millis(250), 50, 60_000);
    let degraded_rtt = ms("degraded_rtt_ms", f.degraded_rtt_ms, d.degraded_rtt, 0, 60_000);
    let degraded_after = ms("degraded_after_ms", f.degraded_after_ms, d.degraded_after, 0, 600_000);
    if !fast_down_after.is_zero() && fast_down_after < probe_interval * 2 {
        errs.push("failover.fast_down_after_ms", format!("expected 0 (off) or at least 2 probe intervals ({} ms), got {}", (probe_interval * 2).as_millis(), fast_down_after.as_millis()));
    }
    if confirm_interval > probe_interval {
        errs.push("failover.confirm_interval_ms", format!("expected at most probe_interval_ms ({} ms), got {}", probe_interval.as_millis(), confirm_interval.as_millis()));
    }
    if max_hold_down < hold_down {
        errs.push("failover.max_hold_down_ms", format!("expected at least hold_down_ms ({} ms), got {}", hold_down.as_millis(), max_hold_down.as_millis()));
    }
    let half_life = f.flap_half_life_s.unwrap_or(d.flap_half_life.as_secs());
    if !(1..=86_400).contains(&half_life) {
        errs.push("failover.flap_half_life_s", format!("expected 1..86400 seconds, got {half_life}"));
    }
    if down_after < probe_interval * 3 {
        errs.push("failover.down_after_ms", format!("expected at least 3 probe intervals ({} ms)", (probe_interval * 3).as_millis()));
    }
    if idle_probe_interval < probe_interval {
        errs.push("failover.idle_probe_interval_ms", format!("expected at least probe_interval_ms ({} ms), got {}", probe_interval.as_millis(), idle_probe_interval.as_millis()));
    }
    let mut frac = |key: &str, v: Option<f64>, default: f64| -> f64 {
        match v {
            None => default,
            Some(v) if (0.0..=1.0).contains(&v) => v,
            Some(v) => {
                errs.push(format!("failover.{key}"), format!("expected a fraction between 0 and 1, got {v}"));
                default
            }
        }
    };
    let degraded_loss = frac("degraded_loss", f.degraded_loss, d.degraded_loss);
    let recover_loss = frac("recover_loss", f.recover_loss, d.recover_loss);
    let failed_loss = frac("failed_loss", f.failed_loss, d.failed_loss.max(degraded_loss));
    if recover_loss > degraded_loss {
        errs.push("failover.recover_loss", format!("expected at most degraded_loss ({degraded_loss}), got {recover_loss}"));
    }
    if failed_loss < degraded_loss {
        errs.push("failover.failed_loss", format!("expected at least degraded_loss ({degraded_loss}), got {failed_loss}"));
    }
    let relay_candidates = f.relay_candidates.unwrap_or(d.relay_candidates);
    if relay_candidates > 16 {
        errs.push("failover.relay_candidates", format!("expected 0..16, got {relay_candidates}"));
    }
    FailoverSettings {
        probe_interval,
        standby_probe_interval,
        idle_probe_interval,
        traffic_hold,
        down_after,
        fast_down_after,
        confirm_interval,
        hold_down,
        max_hold_down: max_hold_down.max(hold_down),
        flap_half_life: Duration::from_secs(half_life.clamp(1, 86_400)),
        degraded_loss,
        recover_loss,
        failed_loss,
        degraded_rtt,
        degraded_after,
        relay_candidates: relay_candidates.min(16),
        icmp: f.icmp.unwrap_or(true),
        nfqueue: f.nfqueue.unwrap_or(default_nfqueue),
        tcp_monitor: f.tcp_monitor.unwrap_or(true),
        tcp_poll,
    }
}

impl FailoverSettings {
    /// The failover core's configuration.
    pub fn core(&self) -> crate::path::failover::FailoverConfig {
        crate::path::failover::FailoverConfig {
            probe_interval: self.probe_interval,
            standby_interval: self.standby_probe_interval,
            down_after: self.down_after,
            fast_down_after: self.fast_down_after,
            confirm_interval: self.confirm_interval,
            hold_down: self.hold_down,
            max_hold_down: self.max_hold_down,
            flap_half_life: self.flap_half_life,
            degraded_loss: self.degraded_loss,
            recover_loss: self.recover_loss,
            failed_loss: self.failed_loss,
            degraded_rtt: self.degraded_rtt,
            degraded_after: self.degraded_after,
            relay_candidates: self.relay_candidates,
            idle_interval: self.idle_probe_interval,
            traffic_hold: self.traffic_hold,
            ..Default::default()
        }
    }
}

fn check_mtu(errs: &mut Errors, key: &str, mtu: u16, ipv6: bool) {
    let inner = inner_mtu(mtu);
    if mtu < 576 + (40 + 8 + wire::OVERHEAD) as u16 {
        errs.push(key, format!("underlay MTU {mtu} leaves an overlay MTU of {inner} bytes; expected at least {}", 576 + 40 + 8 + wire::OVERHEAD));
    } else if ipv6 && inner < 1280 {
        errs.push(key, format!("underlay MTU {mtu} leaves an overlay MTU of {inner} bytes, below IPv6's minimum of 1280; expected at least {}", 1280 + 40 + 8 + wire::OVERHEAD));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    fn key(seed: u8) -> String {
        Identity::from_seed([seed; 32]).public_key().to_string()
    }

    fn sample() -> String {
        format!(
            r#"
[node]
name = "alice"
private_key = "/etc/detour/private.key"
overlay_ipv4 = "10.77.0.1/24"
overlay_ipv6 = "fd77::1/64"

[[peer]]
name = "bob"
public_key = "{}"
endpoints = ["192.0.2.2", "[2001:db8::2]:7800", "bob.example.net"]
overlay_ipv4 = "10.77.0.2"
overlay_ipv6 = "fd77::2"
prefixes = ["10.10.2.0/24", "fd10:2::/64"]
"#,
            key(2)
        )
    }

    #[test]
    fn an_overlay_instance_derives_its_own_ports_tables_names_and_mark() {
        let text = |extra: &str, v4: &str| format!("[node]\nname = \"alice\"\nprivate_key = \"/k\"\noverlay_ipv4 = \"{v4}\"\n{extra}\n");
        let zero = Config::parse(&text("", "10.77.0.1/24"), "/etc/detour/detour.toml").unwrap();
        let one = Config::parse(&text("instance = 1", "10.78.0.1/24"), "/etc/detour/corp.toml").unwrap();
        assert_eq!((one.node.data_port, one.node.management_port, one.management.api_port), (7730, 7731, Some(7732)));
        assert_eq!((one.kernel.table, one.kernel.rule_priority, one.failover.nfqueue), (7730, 7710, 7730));
        assert_eq!((one.kernel.aggregate_interface.as_str(), one.kernel.interface_prefix.as_str()), ("detour1", "dt1-"));
        assert_eq!(one.node.control_socket, PathBuf::from("/run/detour/detourd-1.sock"));
        assert_eq!((zero.instance_mark(), one.instance_mark()), (0x0100_0000, 0x0200_0000));
        assert!(zero.conflicts(&one).is_empty(), "{:?}", zero.conflicts(&one));
        assert!(one.conflicts(&zero).is_empty());
        // the same instance twice collides everywhere, and names the other file
        let twin = Config::parse(&text("", "10.77.0.1/24"), "/etc/detour/other.toml").unwrap();
        let c = zero.conflicts(&twin);
        for key in ["node.instance", "node.data_port", "kernel.table", "kernel.rule_priority", "failover.nfqueue", "interface detour0", "kernel.interface_prefix", "node.control_socket", "overlaps"] {
            assert!(c.iter().any(|m| m.contains(key)), "no {key} in {c:?}");
        }
        assert!(c.iter().all(|m| m.contains("/etc/detour/other.toml")), "{c:?}");
        // explicit settings that collide although the instances differ, and a different mark
        let bad = Config::parse(&text("instance = 2\ndata_port = 7721\n[kernel]\ntable = 7722\nfwmark = 0x1234", "10.79.0.1/24"), "/etc/detour/bad.toml").unwrap();
        let c = zero.conflicts(&bad);
        assert!(c.iter().any(|m| m.contains("port 7721")), "{c:?}");
        assert!(c.iter().any(|m| m.contains("kernel.table")) && c.iter().any(|m| m.contains("kernel.fwmark")), "{c:?}");
        assert!(!c.iter().any(|m| m.contains("node.instance")), "{c:?}");
        assert!(Config::parse(&text("instance = 8", "10.77.0.1/24"), "f").unwrap_err().to_string().contains("node.instance"));
    }

    #[test]
    fn sample_parses_with_defaults() {
        let c = Config::parse(&sample(), "t.toml").unwrap();
        assert_eq!(c.node.data_port, DEFAULT_DATA_PORT);
        assert_eq!(c.node.management_port, DEFAULT_DATA_PORT + 1);
        assert_eq!(c.kernel.table, DEFAULT_TABLE);
        assert_eq!(c.peers[0].interface, "dt-bob");
        assert_eq!(c.peers[0].endpoints.len(), 3);
        assert_eq!(c.peers[0].endpoints[1], Endpoint::Addr("[2001:db8::2]:7800".parse().unwrap()));
        assert_eq!(c.peers[0].endpoints[2], Endpoint::Host("bob.example.net".into(), DEFAULT_DATA_PORT));
        assert_eq!(c.peers[0].inner_mtu(), 1500 - 112);
        assert!(c.kernel.relay_forwarding, "relays forward in the kernel unless told not to");
        let off = Config::parse(&format!("{}\n[kernel]\nrelay_forwarding = false\n", sample()), "t.toml").unwrap();
        assert!(!off.kernel.relay_forwarding);
    }

    #[test]
    fn errors_name_file_key_and_expectation() {
        let text = sample().replace("data_port", "x").replace(r#"overlay_ipv4 = "10.77.0.2""#, r#"overlay_ipv4 = "10.77.0.2/24""#);
        let e = Config::parse(&text, "/etc/detour/detour.toml").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("/etc/detour/detour.toml: peer[0].overlay_ipv4: expected"), "{msg}");
    }

    #[test]
    fn unknown_keys_and_type_errors_carry_the_path() {
        let text = sample().replace("name = \"alice\"", "name = \"alice\"\ndata_prot = 5");
        let e = Config::parse(&text, "f.toml").unwrap_err().to_string();
        assert!(e.contains("f.toml: node") && e.contains("unknown field `data_prot`"), "{e}");
        let text = sample().replace("name = \"alice\"", "name = \"alice\"\ndata_port = \"many\"");
        let e = Config::parse(&text, "f.toml").unwrap_err().to_string();
        assert!(e.contains("node.data_port") && e.contains("line"), "{e}");
    }

    #[test]
    fn syntax_errors_give_the_line() {
        let e = Config::parse("[node\nname=1", "f.toml").unwrap_err().to_string();
        assert!(e.starts_with("f.toml: line 1: TOML syntax error"), "{e}");
    }

    #[test]
    fn semantic_checks_collect_every_problem() {
        let text = format!(
            r#"
[node]
name = "a b"
private_key = ""
management_port = 9
overlay_ipv4 = "10.77.0.0/24"
prefixes = ["10.1.2.3/16"]
[kernel]
table = 254
rule_priority = 40000
[[peer]]
name = "p"
public_key = "nope"
overlay_ipv4 = "10.77.0.2"
[[peer]]
name = "p"
public_key = "{k}"
endpoints = ["bad host!"]
overlay_ipv4 = "10.77.0.2"
prefixes = ["10.9.0.0/16"]
[[peer]]
name = "q"
public_key = "{k}"
prefixes = ["10.9.0.0/16"]
"#,
            k = key(4)
        );
        let errs = Config::parse(&text, "f").unwrap_err().0;
        let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
        for expected in [
            "node.name",
            "node.private_key",
            "node.management_port",
            "node.overlay_ipv4",
            "node.prefixes[0]",
            "kernel.table",
            "kernel.rule_priority",
            "peer[0].public_key",
            "peer[1].name",
            "peer[1].endpoints[0]",
            "peer[1].overlay_ipv4",
            "peer[2].public_key",
            "peer[2].prefixes[0]",
            "peer[2]",
        ] {
            assert!(keys.contains(&expected), "missing {expected} in {keys:?}");
        }
    }

    #[test]
    fn long_peer_names_get_stable_distinct_interfaces() {
        let a = derive_ifname("dt-", "datacenter-frankfurt-1");
        let b = derive_ifname("dt-", "datacenter-frankfurt-2");
        assert!(a.len() <= 15 && b.len() <= 15);
        assert_ne!(a, b);
        assert_eq!(a, derive_ifname("dt-", "datacenter-frankfurt-1"));
        assert_eq!(derive_ifname("dt-", "bob"), "dt-bob");
    }

    #[test]
    fn small_mtu_is_refused_for_ipv6() {
        let text = sample().replace("name = \"alice\"", "name = \"alice\"\nunderlay_mtu = 1300");
        let e = Config::parse(&text, "f").unwrap_err().to_string();
        assert!(e.contains("node.underlay_mtu") && e.contains("1280"), "{e}");
    }

    #[test]
    fn replex_mode_is_checked() {
        let text = format!("{}\n[replex]\nenabled = true\nmode = \"fastest\"\n", sample());
        let e = Config::parse(&text, "f").unwrap_err().to_string();
        assert!(e.contains("replex.mode") && e.contains("adaptive"), "{e}");
        let text = format!("{}\n[replex]\nenabled = true\nmode = \"equal\"\n", sample());
        assert_eq!(Config::parse(&text, "f").expect("valid").replex.mode, ReplexMode::Equal);
    }

    #[test]
    fn policy_section_is_validated() {
        use crate::node::policy::{Commitment, Connectivity};
        let text = format!("{}\n[policy]\ncommitment = \"sometimes\"\npriority = 300\nconnectivity = \"router\"\ninternet = true\n", sample());
        let e = Config::parse(&text, "f").unwrap_err().to_string();
        for want in ["policy.commitment", "policy.priority", "policy.connectivity", "last_resort"] {
            assert!(e.contains(want), "{want} missing in {e}");
        }
        let text = format!("{}\n[policy]\ninternet = true\n", sample());
        let e = Config::parse(&text, "f").unwrap_err().to_string();
        assert!(e.contains("policy.internet") && e.contains("internet_masquerade"), "{e}");
        let text = sample().replace("[node]\n", "[node]\nrelay = false\n") + "\n[policy]\ncommitment = \"always\"\n";
        assert!(Config::parse(&text, "f").unwrap_err().to_string().contains("contradicts node.relay"));
        let text = sample().replace("[node]\n", "[node]\nrelay = false\n");
        assert_eq!(Config::parse(&text, "f").unwrap().node.policy.commitment, Commitment::Never);
        let c = Config::parse(&sample(), "f").unwrap();
        assert_eq!((c.node.policy.commitment, c.node.policy.connectivity, c.node.policy.priority), (Commitment::Always, Connectivity::Host, 100));
        assert!(!c.node.policy.willing.internet_masquerade);
        let text = format!("{}\n[exit]\nwatch = [\"203.0.113.0/24\", \"nonsense\"]\nhold_s = 0\n", sample());
        let e = Config::parse(&text, "f").unwrap_err().to_string();
        assert!(e.contains("exit.watch[1]") && e.contains("exit.hold_s"), "{e}");
    }

    /// The four example configurations of docs/policies.md are valid and say what the
    /// text says.
    #[test]
    fn policy_examples_are_valid() {
        use crate::node::policy::{Commitment, Connectivity};
        let doc = include_str!("../../../docs/policies.md");
        let mut configs = Vec::new();
        let mut rest = doc;
        while let Some(i) = rest.find("```toml") {
            let body = &rest[i + 7..];
            let end = body.find("```").expect("closing fence");
            configs.push(Config::parse(&body[..end], "docs/policies.md").unwrap_or_else(|e| panic!("{e}")));
            rest = &body[end..];
        }
        let by = |name: &str| configs.iter().find(|c| c.node.name == name).unwrap_or_else(|| panic!("no example named {name}"));
        let router = by("router-h");
        assert_eq!((router.node.policy.connectivity, router.node.policy.commitment), (Connectivity::SubnetRouter, Commitment::Always));
        assert!(!router.node.networks.is_empty());
        let server = by("server");
        assert_eq!(server.node.policy.commitment, Commitment::Failure);
        let laptop = by("laptop");
        assert_eq!((laptop.node.policy.commitment, laptop.node.policy.lifespan), (Commitment::LastResort, crate::overlay::directory::Uptime::Ephemeral));
        let exit = by("exit");
        assert!(exit.node.policy.willing.internet_masquerade);
        assert!(!by("laptop").exit.watch.is_empty());
    }

    /// The complete example in docs/config.md is valid and means what the text says.
    #[test]
    fn documented_example_is_valid() {
        let doc = include_str!("../../../docs/config.md");
        let start = doc.find("```toml").expect("a toml block") + "```toml".len();
        let end = start + doc[start..].find("```").expect("closing fence");
        let c = Config::parse(&doc[start..end], "docs/config.md").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.node.name, "alice");
        assert_eq!(c.node.listen.len(), 2);
        assert_eq!(c.peers.len(), 2);
        assert_eq!(c.peers[0].interface, "dt-bob");
        assert_eq!(c.peers[0].endpoints.len(), 3);
        assert_eq!(c.kernel.fwmark, DEFAULT_FWMARK);
        assert_eq!(c.peers[0].inner_mtu(), 1388);
        assert_eq!(c.management.api_port, Some(DEFAULT_DATA_PORT + 2));
    }

    #[test]
    fn endpoints_parse() {
        assert_eq!(parse_endpoint("10.0.0.1:1"), Ok(Endpoint::Addr("10.0.0.1:1".parse().unwrap())));
        assert_eq!(parse_endpoint("::1"), Ok(Endpoint::Addr(SocketAddr::new("::1".parse().unwrap(), DEFAULT_DATA_PORT))));
        assert!(parse_endpoint("host:0").is_err());
        assert!(parse_endpoint("host:65535").is_err());
        assert!(parse_endpoint("").is_err());
        assert!(parse_endpoint("a..b").is_err());
    }
}
