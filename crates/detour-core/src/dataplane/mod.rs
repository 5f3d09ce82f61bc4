//! The forwarding overlay's packet logic, sans I/O (spec A§1.3.1, A§2.1; seeds-digest
//! items 29–31, 40–42).
//!
//! [`TxState`] turns an inner IP packet read from a TUN into a sealed datagram and says
//! where to send it; [`RxState`] opens a datagram and says which TUN gets the inner packet.
//! Each is owned by one data thread; the control plane changes them with
//! [`DataCommand`]s. Neither does I/O or reads a clock: time comes in as `now_ms`
//! (milliseconds on the daemon's monotonic clock). Every failure is a [`DropReason`] that is
//! counted, never a panic.

pub mod routing;

use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use ipnet::IpNet;

use crate::dataplane::routing::{FastMap, PrefixTable};
use crate::identity::NodeId;
use crate::wire::packet;
use crate::wire::replay::ReplayWindow;
use crate::wire::{self, Header, PacketKey, SessionSecrets, TrafficType, HEADER_LEN, OVERHEAD};

/// Why a packet was dropped. Every drop is counted under one reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Datagram too short or header malformed.
    Malformed,
    /// Unknown protocol version.
    BadVersion,
    /// Traffic type this node does not handle here.
    UnsupportedType,
    /// Destination node ID is not this node.
    NotForUs,
    /// Source node ID is not a known peer.
    UnknownPeer,
    /// No key for the key ID (receive) or no session yet (send).
    NoSession,
    /// AEAD authentication failed: corrupted or forged.
    AuthFailed,
    /// Counter already seen or too old.
    Replay,
    /// Inner source address is not one the peer may use.
    SourceNotAllowed,
    /// Inner destination is not this node or a prefix behind it.
    DestinationNotAllowed,
    /// Payload is not an IPv4/IPv6 packet.
    NotIp,
    /// Aggregate interface: no overlay route for the destination.
    NoRoute,
    /// No underlay endpoint known for the peer.
    NoEndpoint,
    /// Packet larger than the path MTU (an ICMP error was returned when allowed).
    TooBig,
    /// Multicast or broadcast, which the overlay does not carry.
    Multicast,
    /// The underlay socket refused the datagram.
    SendError,
    /// Writing to the TUN failed.
    TunWriteError,
    /// A packet for another node with no relay session for its source and destination,
    /// or from an address that is not the source node's.
    RelayDenied,
    /// A relayed packet would go back where it came from.
    RelayLoop,
    /// The hop limit ran out.
    HopLimit,
    /// A packet for a host outside the overlay that this node's policy does not let leave
    /// here (no exit to it, or no delivery to its networks): `policy::Refusal`.
    EgressRefused,
}

impl DropReason {
    /// All reasons, in counter order.
    pub const ALL: [DropReason; 21] = [
        DropReason::Malformed,
        DropReason::BadVersion,
        DropReason::UnsupportedType,
        DropReason::NotForUs,
        DropReason::UnknownPeer,
        DropReason::NoSession,
        DropReason::AuthFailed,
        DropReason::Replay,
        DropReason::SourceNotAllowed,
        DropReason::DestinationNotAllowed,
        DropReason::NotIp,
        DropReason::NoRoute,
        DropReason::NoEndpoint,
        DropReason::TooBig,
        DropReason::Multicast,
        DropReason::SendError,
        DropReason::TunWriteError,
        DropReason::RelayDenied,
        DropReason::RelayLoop,
        DropReason::HopLimit,
        DropReason::EgressRefused,
    ];

    /// Stable snake_case name used in status output and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::BadVersion => "bad_version",
            DropReason::UnsupportedType => "unsupported_type",
            DropReason::NotForUs => "not_for_us",
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::NoSession => "no_session",
            DropReason::AuthFailed => "auth_failed",
            DropReason::Replay => "replay",
            DropReason::SourceNotAllowed => "source_not_allowed",
            DropReason::DestinationNotAllowed => "destination_not_allowed",
            DropReason::NotIp => "not_ip",
            DropReason::NoRoute => "no_route",
            DropReason::NoEndpoint => "no_endpoint",
            DropReason::TooBig => "too_big",
            DropReason::Multicast => "multicast",
            DropReason::SendError => "send_error",
            DropReason::TunWriteError => "tun_write_error",
            DropReason::RelayDenied => "relay_denied",
            DropReason::RelayLoop => "relay_loop",
            DropReason::HopLimit => "hop_limit",
            DropReason::EgressRefused => "egress_refused",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Drop counters by reason (lock-free; shared with the control plane).
#[derive(Default, Debug)]
pub struct DropCounters([AtomicU64; DropReason::ALL.len()]);

impl DropCounters {
    /// Counts one drop.
    pub fn add(&self, reason: DropReason) {
        self.0[reason.index()].fetch_add(1, Relaxed);
    }
    /// Counts `n` drops at once.
    pub fn add_n(&self, reason: DropReason, n: u64) {
        self.0[reason.index()].fetch_add(n, Relaxed);
    }
    /// Current count for a reason.
    pub fn get(&self, reason: DropReason) -> u64 {
        self.0[reason.index()].load(Relaxed)
    }
    /// Non-zero counters as (name, count).
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        DropReason::ALL.iter().map(|r| (r.as_str(), self.get(*r))).filter(|(_, n)| *n > 0).collect()
    }
}

/// Traffic counters of one peer (packets and bytes are inner IP packets).
#[derive(Default, Debug)]
pub struct PeerCounters {
    /// Packets sent to the peer.
    pub tx_packets: AtomicU64,
    /// Inner bytes sent to the peer.
    pub tx_bytes: AtomicU64,
    /// Packets received from the peer and delivered.
    pub rx_packets: AtomicU64,
    /// Inner bytes received and delivered.
    pub rx_bytes: AtomicU64,
    /// `now_ms` of the last authenticated packet from the peer (0: never).
    pub last_rx_ms: AtomicU64,
    /// Probe bytes sent to the peer (whole datagrams).
    pub probe_tx_bytes: AtomicU64,
    /// Probe bytes received from the peer (whole datagrams).
    pub probe_rx_bytes: AtomicU64,
    /// Inner packets sent per route of a split (by slot).
    pub route_packets: [AtomicU64; MAX_SPLIT],
    /// Inner bytes sent per route of a split (by slot).
    pub route_bytes: [AtomicU64; MAX_SPLIT],
    /// Drops attributed to this peer.
    pub drops: DropCounters,
}

/// Counters of the node itself.
#[derive(Default, Debug)]
pub struct NodeCounters {
    /// Drops not attributable to a peer.
    pub drops: DropCounters,
    /// Datagrams relayed for other nodes.
    pub relayed_packets: AtomicU64,
    /// Bytes relayed for other nodes (whole datagrams).
    pub relayed_bytes: AtomicU64,
}

/// The data plane's view of one peer, derived from the configuration.
#[derive(Debug, Clone)]
pub struct PeerSpec {
    /// The peer's node ID.
    pub node_id: NodeId,
    /// Addresses that belong to the peer itself (overlay and link addresses); packets from
    /// them arrive on the peer's own TUN.
    pub host_addrs: Vec<IpAddr>,
    /// Prefixes behind the peer; packets from them arrive on the aggregate TUN.
    pub prefixes: Vec<IpNet>,
    /// This node's own addresses on the link to the peer (its IPv4 link address): the peer
    /// may send to them.
    pub link_local: Vec<IpAddr>,
    /// Protected destinations of the peer (its underlay addresses and protected prefixes):
    /// their traffic reaches the peer's TUN only when it must go through the overlay, so a
    /// split sends it on relay routes only.
    pub protected: Vec<IpNet>,
    /// Largest inner packet (bytes) that fits the path to this peer.
    pub inner_mtu: u16,
    /// Counters shared with the control plane.
    pub counters: Arc<PeerCounters>,
}

/// Everything both data threads need at start.
#[derive(Debug, Clone)]
pub struct DataPlaneSpec {
    /// This node.
    pub local: NodeId,
    /// Inner destinations this node accepts: its own addresses and the prefixes behind it.
    pub local_dsts: Vec<IpNet>,
    /// Peers, indexed as everywhere else in the daemon.
    pub peers: Vec<PeerSpec>,
    /// Counters of the node itself.
    pub node: Arc<NodeCounters>,
    /// This node's policy and own networks, when it lets overlay traffic leave towards
    /// hosts that do not run detour (an exit, or delivery to the networks behind it).
    pub egress: Option<(crate::node::policy::Policy, Vec<IpNet>)>,
}

/// Where an authenticated underlay path ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathEndpoint {
    /// The peer's data-port socket address.
    pub remote: SocketAddr,
    /// The local address to send from (`None`: let the kernel choose).
    pub local_ip: Option<IpAddr>,
}

/// Control-plane changes applied to the data thread, in order.
#[derive(Debug, Clone)]
pub enum DataCommand {
    /// A new peer at index `peer` (the next free index), or new addresses and prefixes for
    /// an existing one (its keys and endpoint stay).
    AddPeer {
        /// Peer index.
        peer: usize,
        /// What the data plane needs to know about it.
        spec: PeerSpec,
    },
    /// The peer left the overlay: keys, endpoint, addresses and prefixes are forgotten (the
    /// index is not reused).
    RemovePeer {
        /// Peer index.
        peer: usize,
    },
    /// Close the peer's TUN (given to the data thread by the shell, which owns devices) (its traffic uses the aggregate from now on).
    DetachTun {
        /// Peer index.
        peer: usize,
    },
    /// Spread the peer's traffic over several routes (REPLEX shares): new flows are hashed
    /// onto routes by share, existing flows keep their route while it is in the list.
    /// Protected destinations use the relay routes only. An empty list ends the split (the
    /// endpoint of [`DataCommand::SetEndpoint`] is used).
    SetSplit {
        /// Peer index.
        peer: usize,
        /// The routes.
        routes: Vec<SplitRoute>,
        /// A flow idle this long may be moved (ms).
        flow_idle_ms: u64,
    },
    /// Keys of a new management session: the send key is replaced; the previous receive
    /// key stays valid for packets still in flight.
    InstallSession {
        /// Peer index.
        peer: usize,
        /// Keys derived from the session (see [`wire::split_exporter`]).
        secrets: SessionSecrets,
    },
    /// Where to send the peer's packets.
    SetEndpoint {
        /// Peer index.
        peer: usize,
        /// The path, or `None` to stop sending.
        endpoint: Option<PathEndpoint>,
    },
    /// Forget every key of the peer.
    ClearSessions {
        /// Peer index.
        peer: usize,
    },
    /// Outside destinations this node reaches through the peer as its exit: replies from
    /// them are accepted on the peer's TUN.
    SetExitSources {
        /// Peer index (the exit).
        peer: usize,
        /// The destinations.
        nets: Vec<IpNet>,
    },
    /// The peer's underlay addresses: packets from them (protected traffic rerouted through
    /// the overlay) are accepted on the peer's TUN.
    SetPeerUnderlay {
        /// Peer index.
        peer: usize,
        /// Its addresses.
        addrs: Vec<IpAddr>,
    },
    /// This host's own addresses: protected traffic to them is accepted.
    SetLocalAddresses(Vec<IpAddr>),
    /// Relay between nodes `a` and `b` in both directions (a relay session this node agreed
    /// to): packets from `a`'s address for `b` go to `b_addr`, and the other way round.
    SetRelay {
        /// One end.
        a: NodeId,
        /// Its data-port address.
        a_addr: SocketAddr,
        /// The other end.
        b: NodeId,
        /// Its data-port address.
        b_addr: SocketAddr,
    },
    /// End a relay session.
    ClearRelay {
        /// One end.
        a: NodeId,
        /// The other end.
        b: NodeId,
    },
    /// What this node lets leave the overlay here (its relay policy and own networks;
    /// `None`: nothing), after a configuration reload changed the policy.
    SetEgress(Option<(crate::node::policy::Policy, Vec<IpNet>)>),
    /// Seal `payload` as a probe-type packet for `peer` and send it to `to`.
    SendControl {
        /// Peer index.
        peer: usize,
        /// Where to send it (the peer, or a relay).
        to: SocketAddr,
        /// The probe payload.
        payload: Vec<u8>,
    },
}

/// Most routes in one split.
pub const MAX_SPLIT: usize = 8;

/// One route of a peer's traffic split.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SplitRoute {
    /// Where its packets go: the peer itself (direct) or a relay.
    pub endpoint: PathEndpoint,
    /// Target share, 0..1.
    pub share: f64,
    /// Through a relay (protected destinations use only these).
    pub relay: bool,
    /// Counter slot (`PeerCounters::route_*[slot]`, `< MAX_SPLIT`); also the route's
    /// identity for flows pinned to it.
    pub slot: usize,
}

struct Split {
    routes: Vec<SplitRoute>,
    all: crate::path::replex::Buckets,
    relays: crate::path::replex::Buckets,
    /// Indices into `routes` of the relay routes (what `relays` buckets map to).
    relay_idx: Vec<usize>,
    flows: crate::path::replex::Flows<packet::FlowKey, usize>,
}

impl Split {
    fn new(routes: Vec<SplitRoute>, idle: u64) -> Split {
        let mut s = Split {
            routes: Vec::new(),
            all: crate::path::replex::Buckets::new(crate::path::replex::BUCKETS),
            relays: crate::path::replex::Buckets::new(crate::path::replex::BUCKETS),
            relay_idx: Vec::new(),
            flows: crate::path::replex::Flows::new(idle, 65_536),
        };
        s.set(routes);
        s
    }

    /// New routes and shares: buckets move only as much as the shares did; flows pinned
    /// to a route that left are re-hashed (in [`Split::pick`]).
    fn set(&mut self, routes: Vec<SplitRoute>) {
        // Keep bucket → route assignments stable by slot: reorder the shares to the order
        // of the old routes where slots match.
        let old_slots: Vec<usize> = self.routes.iter().map(|r| r.slot).collect();
        let mut ordered: Vec<SplitRoute> = old_slots.iter().filter_map(|s| routes.iter().find(|r| r.slot == *s).copied()).collect();
        for r in &routes {
            if !ordered.iter().any(|o| o.slot == r.slot) {
                ordered.push(*r);
            }
        }
        if ordered.len() != old_slots.len() || ordered.iter().zip(&old_slots).any(|(r, s)| r.slot != *s) {
            // The route list changed shape: start from a fresh table.
            self.all = crate::path::replex::Buckets::new(crate::path::replex::BUCKETS);
            self.relays = crate::path::replex::Buckets::new(crate::path::replex::BUCKETS);
        }
        self.routes = ordered;
        let shares: Vec<f64> = self.routes.iter().map(|r| r.share).collect();
        self.all.rebalance(&shares);
        self.relay_idx = (0..self.routes.len()).filter(|&i| self.routes[i].relay).collect();
        let relay_shares: Vec<f64> = self.relay_idx.iter().map(|&i| self.routes[i].share.max(1e-9)).collect();
        if !relay_shares.is_empty() {
            self.relays.rebalance(&relay_shares);
        }
    }

    /// The route (index into `routes`) for a packet of `key` at `now_ms`.
    fn pick(&mut self, key: &packet::FlowKey, hash: u64, protected: bool, now_ms: u64) -> Option<usize> {
        let routes = &self.routes;
        let (all, relays, relay_idx) = (&self.all, &self.relays, &self.relay_idx);
        let slot = self.flows.route(
            key,
            now_ms,
            |slot| routes.iter().any(|r| r.slot == slot && (!protected || r.relay)),
            || {
                let i = if protected && !relay_idx.is_empty() { relay_idx[relays.route(hash)] } else { all.route(hash) };
                routes.get(i).map(|r| r.slot).unwrap_or(0)
            },
        );
        self.routes.iter().position(|r| r.slot == slot)
    }
}

/// Which TUN an inner packet came from or goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tun {
    /// The per-peer TUN of this peer index.
    Peer(usize),
    /// The aggregate TUN.
    Aggregate,
}

/// What to do with a packet read from a TUN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxAction {
    /// Send `buf[..len]` to `to`, from `src_ip` if set.
    Send {
        /// Peer index.
        peer: usize,
        /// Underlay destination.
        to: SocketAddr,
        /// Local source address, if pinned.
        src_ip: Option<IpAddr>,
        /// Datagram length in bytes.
        len: usize,
        /// The first packet to the peer in [`TRAFFIC_NOTE_MS`]: tell the control plane that
        /// the peer carries traffic ([`crate::path::failover::Failover::handle_traffic`]).
        traffic: bool,
    },
    /// Write the ICMP error left in the reply buffer back to the TUN the packet came from.
    Reply(DropReason),
    /// Drop the packet (already counted) because the peer has no session yet: the control
    /// plane should open one.
    NoSession {
        /// Peer index.
        peer: usize,
    },
    /// Drop the packet (already counted).
    Drop(DropReason),
}

struct TxSession {
    key_id: u32,
    key: PacketKey,
    next_counter: u64,
}

struct TxPeer {
    id: NodeId,
    routes: Vec<IpNet>,
    protected: PrefixTable<()>,
    protected_nets: Vec<IpNet>,
    /// Boxed, like the session: a node holds a `TxPeer` for every directory node, and
    /// most have neither (TxPeer is 220 bytes instead of 940).
    split: Option<Box<Split>>,
    /// Inner packets waiting for the first session (a few, like WireGuard's staged
    /// queue), so that a connection's first packet is not lost to the handshake.
    staged: Vec<Vec<u8>>,
    session: Option<Box<TxSession>>,
    endpoint: Option<PathEndpoint>,
    inner_mtu: usize,
    counters: Arc<PeerCounters>,
    /// `now_ms` when traffic to the peer was last reported in a [`TxAction::Send`].
    traffic_noted_ms: Option<u64>,
}

/// Traffic to a peer is reported at most this often (ms).
pub const TRAFFIC_NOTE_MS: u64 = 1000;

/// Packets kept per peer while its first session is set up.
pub const STAGED_MAX: usize = 16;

/// Send-side state: routing, keys and counters (owned by the TX thread).
pub struct TxState {
    local: NodeId,
    peers: Vec<TxPeer>,
    table: PrefixTable<usize>,
    node: Arc<NodeCounters>,
    now_ms: u64,
    salt: u64,
}

impl TxState {
    /// Builds the send state; the aggregate routing table maps each peer's host addresses
    /// and prefixes to the peer.
    pub fn new(spec: &DataPlaneSpec) -> TxState {
        let salt = u64::from_be_bytes(spec.local.0[..8].try_into().expect("8 bytes"));
        let mut t = TxState { local: spec.local, peers: Vec::new(), table: PrefixTable::new(), node: spec.node.clone(), now_ms: 0, salt };
        for (i, p) in spec.peers.iter().enumerate() {
            t.add_peer(i, p);
        }
        t
    }

    fn tx_peer(p: &PeerSpec) -> TxPeer {
        TxPeer {
            id: p.node_id,
            routes: p.host_addrs.iter().map(|a| IpNet::from(*a)).chain(p.prefixes.iter().copied()).collect(),
            protected: prefix_set(&p.protected),
            protected_nets: p.protected.clone(),
            split: None,
            staged: Vec::new(),
            session: None,
            endpoint: None,
            inner_mtu: usize::from(p.inner_mtu),
            counters: p.counters.clone(),
            traffic_noted_ms: None,
        }
    }

    fn add_peer(&mut self, i: usize, spec: &PeerSpec) {
        let new = Self::tx_peer(spec);
        if i < self.peers.len() {
            let old = &mut self.peers[i];
            if old.id == new.id {
                old.routes = new.routes;
                old.protected = new.protected;
                old.protected_nets = new.protected_nets;
                old.inner_mtu = new.inner_mtu;
                old.counters = new.counters;
            } else {
                *old = new;
            }
        } else if i == self.peers.len() {
            // A new peer has the highest index: its routes only fill prefixes no other
            // peer has (what a rebuild would give, without walking every peer: a node
            // learns a whole directory this way).
            for net in &new.routes {
                if self.table.get(net).is_none() {
                    self.table.insert(*net, i);
                }
            }
            self.peers.push(new);
            return;
        } else {
            return;
        }
        self.rebuild_table();
    }

    /// The aggregate routing table from every peer's routes; on overlap the lower index
    /// (configured peers come first) wins.
    fn rebuild_table(&mut self) {
        let mut table = PrefixTable::new();
        for (i, p) in self.peers.iter().enumerate().rev() {
            for net in &p.routes {
                table.insert(*net, i);
            }
        }
        self.table = table;
    }

    /// Applies a control-plane change.
    pub fn apply(&mut self, cmd: &DataCommand) {
        match cmd {
            DataCommand::AddPeer { peer, spec } => self.add_peer(*peer, spec),
            DataCommand::RemovePeer { peer } => {
                if let Some(p) = self.peers.get_mut(*peer) {
                    p.routes.clear();
                    p.staged.clear();
                    p.session = None;
                    p.endpoint = None;
                    self.rebuild_table();
                }
            }
            DataCommand::InstallSession { peer, secrets } => {
                if let Some(p) = self.peers.get_mut(*peer) {
                    p.session = Some(Box::new(TxSession { key_id: secrets.tx_key_id, key: PacketKey::new(&secrets.tx_key), next_counter: 0 }));
                }
            }
            DataCommand::SetEndpoint { peer, endpoint } => {
                if let Some(p) = self.peers.get_mut(*peer) {
                    p.endpoint = *endpoint;
                }
            }
            DataCommand::ClearSessions { peer } => {
                if let Some(p) = self.peers.get_mut(*peer) {
                    p.session = None;
                }
            }
            DataCommand::SetPeerUnderlay { peer, addrs } => {
                if let Some(p) = self.peers.get_mut(*peer) {
                    let mut nets = p.protected_nets.clone();
                    nets.extend(addrs.iter().map(|a| IpNet::from(a.to_canonical())));
                    p.protected = prefix_set(&nets);
                }
            }
            DataCommand::SetSplit { peer, routes, flow_idle_ms } => {
                if let Some(p) = self.peers.get_mut(*peer) {
                    let routes: Vec<SplitRoute> = routes.iter().copied().filter(|r| r.slot < MAX_SPLIT).take(MAX_SPLIT).collect();
                    if routes.is_empty() {
                        p.split = None;
                    } else {
                        match &mut p.split {
                            Some(s) => s.set(routes),
                            None => p.split = Some(Box::new(Split::new(routes, *flow_idle_ms))),
                        }
                    }
                }
            }
            DataCommand::SetLocalAddresses(_)
            | DataCommand::SetEgress(_)
            | DataCommand::SetExitSources { .. }
            | DataCommand::SetRelay { .. }
            | DataCommand::ClearRelay { .. }
            | DataCommand::SendControl { .. }
            | DataCommand::DetachTun { .. } => {}
        }
    }

    /// The current time in ms on the daemon's clock (for idle flows of a split).
    pub fn set_now(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
    }

    /// The packets staged for `peer` while it had no session, once it has a session and an
    /// endpoint (to be sent again through [`TxState::encapsulate`] with `Tun::Peer(peer)`).
    pub fn take_staged(&mut self, peer: usize) -> Vec<Vec<u8>> {
        match self.peers.get_mut(peer) {
            Some(p) if p.session.is_some() && p.endpoint.is_some() => std::mem::take(&mut p.staged),
            _ => Vec::new(),
        }
    }

    /// Seals a probe-type packet for `peer` into `out` (which must hold `payload.len() +
    /// OVERHEAD` bytes) and returns its length.
    ///
    /// # Errors
    /// [`DropReason::NoSession`] without keys, [`DropReason::TooBig`] if `out` is too small
    /// or the peer index is unknown.
    pub fn seal_control(&mut self, peer: usize, payload: &[u8], out: &mut [u8]) -> Result<usize, DropReason> {
        if out.len() < payload.len() + OVERHEAD {
            return Err(DropReason::TooBig);
        }
        let local = self.local;
        let p = self.peers.get_mut(peer).ok_or(DropReason::TooBig)?;
        let Some(session) = p.session.as_mut().filter(|s| s.next_counter < u64::MAX) else {
            p.counters.drops.add(DropReason::NoSession);
            return Err(DropReason::NoSession);
        };
        let header = Header { traffic: TrafficType::Probe, flags: 0, hop_limit: wire::DEFAULT_HOP_LIMIT, src: local, dst: p.id, key_id: session.key_id, counter: session.next_counter };
        session.next_counter += 1;
        out[HEADER_LEN..HEADER_LEN + payload.len()].copy_from_slice(payload);
        let n = session.key.seal(&header, out, payload.len());
        p.counters.probe_tx_bytes.fetch_add(n as u64, Relaxed);
        Ok(n)
    }

    /// The overlay route for a destination (aggregate interface semantics).
    pub fn route(&self, dst: IpAddr) -> Option<usize> {
        self.table.lookup(dst).copied()
    }

    /// Encapsulates one inner packet read from `ingress`.
    ///
    /// `buf[HEADER_LEN..HEADER_LEN + len]` holds the packet and `buf` must have at least
    /// `len + OVERHEAD` bytes; on [`TxAction::Send`] it holds the sealed datagram. On
    /// [`TxAction::Reply`], `reply` holds an ICMP error for the TUN the packet came from
    /// (destination unreachable for the aggregate without a route, or packet too big).
    pub fn encapsulate(&mut self, ingress: Tun, buf: &mut [u8], len: usize, reply: &mut Vec<u8>) -> TxAction {
        reply.clear();
        let now_ms = self.now_ms;
        if buf.len() < len + OVERHEAD {
            self.node.drops.add(DropReason::TooBig);
            return TxAction::Drop(DropReason::TooBig);
        }
        let pkt = &buf[HEADER_LEN..HEADER_LEN + len];
        let Some((_, dst)) = packet::addresses(pkt) else {
            self.node.drops.add(DropReason::NotIp);
            return TxAction::Drop(DropReason::NotIp);
        };
        if packet::is_multicast(&dst) {
            self.node.drops.add(DropReason::Multicast);
            return TxAction::Drop(DropReason::Multicast);
        }
        let peer = match ingress {
            Tun::Peer(i) if i < self.peers.len() => i,
            Tun::Peer(_) => {
                self.node.drops.add(DropReason::NoRoute);
                return TxAction::Drop(DropReason::NoRoute);
            }
            Tun::Aggregate => match self.table.lookup(dst) {
                Some(&i) => i,
                None => {
                    self.node.drops.add(DropReason::NoRoute);
                    return Self::icmp(pkt, reply, packet::unreachable, DropReason::NoRoute);
                }
            },
        };
        let p = &mut self.peers[peer];
        if len > p.inner_mtu {
            p.counters.drops.add(DropReason::TooBig);
            let mtu = p.inner_mtu as u16;
            return Self::icmp(pkt, reply, |pkt, from| packet::too_big(pkt, mtu, from), DropReason::TooBig);
        }
        if p.session.is_none() || p.endpoint.is_none() {
            // No session yet: keep the first few packets for when it comes.
            if p.staged.len() < STAGED_MAX {
                p.staged.push(pkt.to_vec());
            } else {
                p.counters.drops.add(DropReason::NoSession);
            }
            return TxAction::NoSession { peer };
        }
        let Some(session) = p.session.as_mut().filter(|s| s.next_counter < u64::MAX) else {
            p.counters.drops.add(DropReason::NoSession);
            return TxAction::NoSession { peer };
        };
        let Some(mut endpoint) = p.endpoint else {
            p.counters.drops.add(DropReason::NoEndpoint);
            return TxAction::Drop(DropReason::NoEndpoint);
        };
        if let Some(split) = p.split.as_mut() {
            if let Some(key) = packet::flow_key(pkt) {
                let protected = p.protected.contains(dst);
                if let Some(i) = split.pick(&key, key.hash(self.salt), protected, self.now_ms) {
                    let r = split.routes[i];
                    endpoint = r.endpoint;
                    p.counters.route_packets[r.slot].fetch_add(1, Relaxed);
                    p.counters.route_bytes[r.slot].fetch_add(len as u64, Relaxed);
                }
            }
        }
        let header = Header { traffic: TrafficType::Data, flags: 0, hop_limit: wire::DEFAULT_HOP_LIMIT, src: self.local, dst: p.id, key_id: session.key_id, counter: session.next_counter };
        session.next_counter += 1;
        let n = session.key.seal(&header, buf, len);
        p.counters.tx_packets.fetch_add(1, Relaxed);
        p.counters.tx_bytes.fetch_add(len as u64, Relaxed);
        let traffic = p.traffic_noted_ms.is_none_or(|t| now_ms >= t + TRAFFIC_NOTE_MS);
        if traffic {
            p.traffic_noted_ms = Some(now_ms);
        }
        TxAction::Send { peer, to: endpoint.remote, src_ip: endpoint.local_ip, len: n, traffic }
    }

    /// Builds an ICMP error about `pkt`. Its source is the packet's destination: the kernel
    /// drops packets that arrive from one of its own addresses (martians), and the
    /// destination's route points back into the same TUN, so strict reverse-path filters
    /// accept it.
    fn icmp(pkt: &[u8], reply: &mut Vec<u8>, build: impl Fn(&[u8], IpAddr) -> Option<Vec<u8>>, reason: DropReason) -> TxAction {
        match packet::destination(pkt).and_then(|from| build(pkt, from)) {
            Some(err) => {
                *reply = err;
                TxAction::Reply(reason)
            }
            None => TxAction::Drop(reason),
        }
    }
}

struct RxSession {
    key_id: u32,
    key: PacketKey,
    replay: ReplayWindow,
}

struct RxPeer {
    id: NodeId,
    link_local: Vec<IpAddr>,
    sessions: Vec<RxSession>,
    hosts: PrefixTable<()>,
    underlay: Vec<IpAddr>,
    prefixes: PrefixTable<()>,
    /// Outside destinations reached through this peer as exit (their replies come from it).
    exits: PrefixTable<()>,
    counters: Arc<PeerCounters>,
}

/// What to do with a datagram that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rx {
    /// Write an inner IP packet to a TUN.
    Deliver(Delivery),
    /// A probe-type payload (at `payload` in the buffer) for the control plane.
    Control {
        /// Peer index of the sender.
        peer: usize,
        /// Where the payload is in the datagram buffer.
        payload: Range<usize>,
    },
    /// Relay: send the datagram (hop limit already decremented) on to `to`.
    Forward {
        /// The destination node's data-port address.
        to: SocketAddr,
    },
}

/// One direction of a relay session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RelayHop {
    from: IpAddr,
    to: SocketAddr,
}

/// An inner packet that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Peer index of the sender.
    pub peer: usize,
    /// TUN to write the inner packet to.
    pub tun: Tun,
    /// Where the inner packet is in the datagram buffer.
    pub inner: Range<usize>,
}

/// How many receive keys a peer keeps (the current one and the one it replaced).
const RX_SESSIONS: usize = 2;

/// A set of prefixes, for longest-prefix membership tests.
fn prefix_set(nets: &[IpNet]) -> PrefixTable<()> {
    let mut t = PrefixTable::new();
    for n in nets {
        t.insert(*n, ());
    }
    t
}

/// Receive-side state: keys, replay windows and source checks (owned by the RX thread).
pub struct RxState {
    local: NodeId,
    peers: Vec<RxPeer>,
    by_id: FastMap<NodeId, usize>,
    local_dsts: PrefixTable<()>,
    local_addrs: Vec<IpAddr>,
    relays: FastMap<(NodeId, NodeId), RelayHop>,
    node: Arc<NodeCounters>,
    egress: Option<(crate::node::policy::Policy, Vec<IpNet>)>,
}

impl RxState {
    /// Builds the receive state.
    pub fn new(spec: &DataPlaneSpec) -> RxState {
        let mut local_dsts = PrefixTable::new();
        for net in &spec.local_dsts {
            local_dsts.insert(*net, ());
        }
        let mut r = RxState {
            local: spec.local,
            peers: Vec::new(),
            by_id: FastMap::default(),
            local_dsts,
            local_addrs: Vec::new(),
            relays: FastMap::default(),
            node: spec.node.clone(),
            egress: spec.egress.clone(),
        };
        for (i, p) in spec.peers.iter().enumerate() {
            r.add_peer(i, p);
        }
        r
    }

    fn add_peer(&mut self, i: usize, spec: &PeerSpec) {
        let mut hosts = PrefixTable::new();
        for a in &spec.host_addrs {
            hosts.insert(IpNet::from(*a), ());
        }
        let mut prefixes = PrefixTable::new();
        for n in &spec.prefixes {
            prefixes.insert(*n, ());
        }
        if i < self.peers.len() {
            let old = &mut self.peers[i];
            if old.id != spec.node_id {
                self.by_id.remove(&old.id);
                old.sessions.clear();
                old.underlay.clear();
            }
            old.id = spec.node_id;
            old.link_local = spec.link_local.clone();
            old.hosts = hosts;
            old.prefixes = prefixes;
            old.counters = spec.counters.clone();
        } else if i == self.peers.len() {
            self.peers.push(RxPeer {
                id: spec.node_id,
                link_local: spec.link_local.clone(),
                sessions: Vec::new(),
                hosts,
                underlay: Vec::new(),
                prefixes,
                exits: PrefixTable::new(),
                counters: spec.counters.clone(),
            });
        } else {
            return;
        }
        self.by_id.insert(spec.node_id, i);
    }

    /// Applies a control-plane change.
    pub fn apply(&mut self, cmd: &DataCommand) {
        match cmd {
            DataCommand::AddPeer { peer, spec } => self.add_peer(*peer, spec),
            DataCommand::RemovePeer { peer } => {
                if let Some(p) = self.peers.get_mut(*peer) {
                    self.by_id.remove(&p.id);
                    p.sessions.clear();
                    p.underlay.clear();
                    p.hosts = PrefixTable::new();
                    p.prefixes = PrefixTable::new();
                    p.link_local.clear();
                }
            }
            DataCommand::InstallSession { peer, secrets } => {
                if let Some(p) = self.peers.get_mut(*peer) {
                    p.sessions.retain(|s| s.key_id != secrets.rx_key_id);
                    p.sessions.insert(0, RxSession { key_id: secrets.rx_key_id, key: PacketKey::new(&secrets.rx_key), replay: ReplayWindow::default() });
                    p.sessions.truncate(RX_SESSIONS);
                }
            }
            DataCommand::SetEndpoint { .. } | DataCommand::SendControl { .. } | DataCommand::DetachTun { .. } | DataCommand::SetSplit { .. } => {}
            DataCommand::ClearSessions { peer } => {
                if let Some(p) = self.peers.get_mut(*peer) {
                    p.sessions.clear();
                }
            }
            DataCommand::SetPeerUnderlay { peer, addrs } => {
                if let Some(p) = self.peers.get_mut(*peer) {
                    p.underlay = addrs.iter().map(|a| a.to_canonical()).collect();
                }
            }
            DataCommand::SetExitSources { peer, nets } => {
                if let Some(p) = self.peers.get_mut(*peer) {
                    p.exits = prefix_set(nets);
                }
            }
            DataCommand::SetLocalAddresses(addrs) => self.local_addrs = addrs.iter().map(|a| a.to_canonical()).collect(),
            DataCommand::SetEgress(egress) => self.egress = egress.clone(),
            DataCommand::SetRelay { a, a_addr, b, b_addr } => {
                let (a_addr, b_addr) = (canonical(*a_addr), canonical(*b_addr));
                self.relays.insert((*a, *b), RelayHop { from: a_addr.ip(), to: b_addr });
                self.relays.insert((*b, *a), RelayHop { from: b_addr.ip(), to: a_addr });
            }
            DataCommand::ClearRelay { a, b } => {
                self.relays.remove(&(*a, *b));
                self.relays.remove(&(*b, *a));
            }
        }
    }

    /// Number of relay directions this node forwards.
    pub fn relay_count(&self) -> usize {
        self.relays.len()
    }

    /// Handles one datagram that arrived from `from`: a packet for this node is
    /// authenticated and opened in place; a packet for another node is relayed without
    /// being opened, if this node agreed to relay between its source and destination.
    ///
    /// # Errors
    /// The [`DropReason`], already counted (per peer where the peer is known).
    pub fn decapsulate(&mut self, buf: &mut [u8], from: SocketAddr, now_ms: u64) -> Result<Rx, DropReason> {
        let header = match Header::decode(buf) {
            Ok(h) => h,
            Err(wire::WireError::BadVersion) => return Err(self.node_drop(DropReason::BadVersion)),
            Err(_) => return Err(self.node_drop(DropReason::Malformed)),
        };
        if header.dst != self.local {
            return self.relay(&header, buf, canonical(from));
        }
        let Some(&peer) = self.by_id.get(&header.src) else {
            return Err(self.node_drop(DropReason::UnknownPeer));
        };
        let p = &mut self.peers[peer];
        let fail = |p: &RxPeer, r: DropReason| {
            p.counters.drops.add(r);
            r
        };
        if header.traffic == TrafficType::Signalling {
            return Err(fail(p, DropReason::UnsupportedType));
        }
        let Some(session) = p.sessions.iter_mut().find(|s| s.key_id == header.key_id) else {
            return Err(fail(p, DropReason::NoSession));
        };
        if !session.replay.check(header.counter) {
            return Err(fail(p, DropReason::Replay));
        }
        let n = match session.key.open(&header, buf) {
            Ok(n) => n,
            Err(_) => return Err(fail(p, DropReason::AuthFailed)),
        };
        if !session.replay.update(header.counter) {
            return Err(fail(p, DropReason::Replay));
        }
        p.counters.last_rx_ms.store(now_ms.max(1), Relaxed);
        let inner = HEADER_LEN..HEADER_LEN + n;
        if header.traffic == TrafficType::Probe {
            p.counters.probe_rx_bytes.fetch_add((n + OVERHEAD) as u64, Relaxed);
            return Ok(Rx::Control { peer, payload: inner });
        }
        let Some((src, dst)) = packet::addresses(&buf[inner.clone()]) else {
            return Err(fail(p, DropReason::NotIp));
        };
        let tun = if p.hosts.contains(src) || p.underlay.contains(&src) {
            Tun::Peer(peer)
        } else if p.prefixes.contains(src) {
            Tun::Aggregate
        } else if p.exits.contains(src) {
            Tun::Peer(peer)
        } else {
            return Err(fail(p, DropReason::SourceNotAllowed));
        };
        if !self.local_dsts.contains(dst) && !self.local_addrs.contains(&dst) && !p.link_local.contains(&dst) {
            // Leaving the overlay here, towards a host that does not run detour: only as
            // this node's policy allows (spec A§1.2.2, A§3.6).
            match &self.egress {
                Some((policy, own)) if policy.egress(own, src, dst).is_ok() => {}
                Some(_) => return Err(fail(p, DropReason::EgressRefused)),
                None => return Err(fail(p, DropReason::DestinationNotAllowed)),
            }
        }
        p.counters.rx_packets.fetch_add(1, Relaxed);
        p.counters.rx_bytes.fetch_add(n as u64, Relaxed);
        Ok(Rx::Deliver(Delivery { peer, tun, inner }))
    }

    fn relay(&mut self, header: &Header, buf: &mut [u8], from: SocketAddr) -> Result<Rx, DropReason> {
        let Some(hop) = self.relays.get(&(header.src, header.dst)).copied() else {
            return Err(self.node_drop(DropReason::RelayDenied));
        };
        if hop.from != from.ip() {
            return Err(self.node_drop(DropReason::RelayDenied));
        }
        if hop.to == from {
            return Err(self.node_drop(DropReason::RelayLoop));
        }
        if !wire::decrement_hop_limit(buf) {
            return Err(self.node_drop(DropReason::HopLimit));
        }
        self.node.relayed_packets.fetch_add(1, Relaxed);
        self.node.relayed_bytes.fetch_add(buf.len() as u64, Relaxed);
        Ok(Rx::Forward { to: hop.to })
    }

    fn node_drop(&self, r: DropReason) -> DropReason {
        self.node.drops.add(r);
        r
    }
}

/// The address with an IPv4-mapped IPv6 address written as IPv4.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    const A: NodeId = NodeId([0xa; 16]);
    const B: NodeId = NodeId([0xb; 16]);

    fn spec(local: NodeId, remote: NodeId, local_addr: &str, remote_addr: &str, remote_prefix: &str, local_prefix: &str) -> DataPlaneSpec {
        let la: Ipv4Addr = local_addr.parse().unwrap();
        DataPlaneSpec {
            local,
            local_dsts: vec![IpNet::from(IpAddr::V4(la)), local_prefix.parse().unwrap()],
            peers: vec![PeerSpec {
                node_id: remote,
                host_addrs: vec![remote_addr.parse().unwrap()],
                prefixes: vec![remote_prefix.parse().unwrap()],
                link_local: vec![],
                protected: vec![],
                inner_mtu: 1388,
                counters: Arc::default(),
            }],
            node: Arc::default(),
            egress: None,
        }
    }

    #[test]
    fn peers_added_one_by_one_route_as_a_rebuilt_table_does_the_lower_index_winning_an_overlap() {
        let sa = spec(A, B, "10.77.0.1", "10.77.0.2", "10.2.0.0/24", "10.1.0.0/24");
        let mut tx = TxState::new(&sa);
        let claim = |id: u8, nets: &[&str]| PeerSpec {
            node_id: NodeId([id; 16]),
            host_addrs: vec![],
            prefixes: nets.iter().map(|n| n.parse().unwrap()).collect(),
            link_local: vec![],
            protected: vec![],
            inner_mtu: 1388,
            counters: Arc::default(),
        };
        // Peer 1 claims B's prefix again and a /16 around it; peer 2 a prefix of its own.
        tx.apply(&DataCommand::AddPeer { peer: 1, spec: claim(0xc, &["10.2.0.0/24", "10.2.0.0/16"]) });
        tx.apply(&DataCommand::AddPeer { peer: 2, spec: claim(0xd, &["10.3.0.0/24", "10.2.0.0/16"]) });
        let lookups = |tx: &TxState| ["10.2.0.5", "10.2.9.1", "10.3.0.1", "10.4.0.1"].map(|a| tx.route(a.parse().unwrap()));
        assert_eq!(lookups(&tx), [Some(0), Some(1), Some(2), None]);
        // The same as a rebuild from all peers.
        let incremental = lookups(&tx);
        tx.rebuild_table();
        assert_eq!(lookups(&tx), incremental);
    }

    fn pair() -> (TxState, RxState, DataPlaneSpec, DataPlaneSpec) {
        let sa = spec(A, B, "10.77.0.1", "10.77.0.2", "10.2.0.0/24", "10.1.0.0/24");
        let sb = spec(B, A, "10.77.0.2", "10.77.0.1", "10.1.0.0/24", "10.2.0.0/24");
        let mut tx = TxState::new(&sa);
        let mut rx = RxState::new(&sb);
        let material = [42u8; wire::EXPORTER_LEN];
        tx.apply(&DataCommand::InstallSession { peer: 0, secrets: wire::split_exporter(&material, &A, &B) });
        rx.apply(&DataCommand::InstallSession { peer: 0, secrets: wire::split_exporter(&material, &B, &A) });
        let ep = PathEndpoint { remote: "192.0.2.2:7720".parse().unwrap(), local_ip: None };
        tx.apply(&DataCommand::SetEndpoint { peer: 0, endpoint: Some(ep) });
        (tx, rx, sa, sb)
    }

    fn ip4(src: &str, dst: &str, payload: usize) -> Vec<u8> {
        let s: Ipv4Addr = src.parse().unwrap();
        let d: Ipv4Addr = dst.parse().unwrap();
        let mut out = Vec::new();
        PacketBuilder::ipv4(s.octets(), d.octets(), 64).udp(1, 2).write(&mut out, &vec![9u8; payload]).unwrap();
        out
    }

    fn frame(pkt: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; pkt.len() + OVERHEAD];
        buf[HEADER_LEN..HEADER_LEN + pkt.len()].copy_from_slice(pkt);
        buf
    }

    const FROM: &str = "192.0.2.1:7720";

    /// Decapsulates a datagram that must carry an inner packet.
    fn open(rx: &mut RxState, buf: &mut [u8], now: u64) -> Result<Delivery, DropReason> {
        match rx.decapsulate(buf, FROM.parse().unwrap(), now)? {
            Rx::Deliver(d) => Ok(d),
            other => panic!("not a delivery: {other:?}"),
        }
    }

    fn send(tx: &mut TxState, ingress: Tun, pkt: &[u8]) -> (TxAction, Vec<u8>, Vec<u8>) {
        let mut buf = frame(pkt);
        let mut reply = Vec::new();
        let a = tx.encapsulate(ingress, &mut buf, pkt.len(), &mut reply);
        if let TxAction::Send { len, .. } = a {
            buf.truncate(len);
        }
        (a, buf, reply)
    }

    #[test]
    fn per_peer_and_aggregate_round_trip() {
        let (mut tx, mut rx, _, sb) = pair();
        let pkt = ip4("10.77.0.1", "10.77.0.2", 100);
        let (a, mut dgram, _) = send(&mut tx, Tun::Peer(0), &pkt);
        assert!(matches!(a, TxAction::Send { peer: 0, .. }));
        let d = open(&mut rx, &mut dgram, 5).unwrap();
        assert_eq!(d.tun, Tun::Peer(0));
        assert_eq!(&dgram[d.inner.clone()], &pkt[..]);
        // from the prefix behind A to the prefix behind B: aggregate on both sides
        let pkt = ip4("10.1.0.9", "10.2.0.7", 10);
        let (a, mut dgram, _) = send(&mut tx, Tun::Aggregate, &pkt);
        assert!(matches!(a, TxAction::Send { .. }));
        assert_eq!(open(&mut rx, &mut dgram, 6).unwrap().tun, Tun::Aggregate);
        assert_eq!(sb.peers[0].counters.rx_packets.load(Relaxed), 2);
        assert_eq!(sb.peers[0].counters.last_rx_ms.load(Relaxed), 6);
    }

    #[test]
    fn traffic_to_a_peer_is_reported_once_a_second() {
        let (mut tx, _, _, _) = pair();
        let pkt = ip4("10.77.0.1", "10.77.0.2", 100);
        let traffic = |tx: &mut TxState| match send(tx, Tun::Peer(0), &pkt).0 {
            TxAction::Send { traffic, .. } => traffic,
            other => panic!("{other:?}"),
        };
        tx.set_now(5_000);
        assert!(traffic(&mut tx), "the first packet is reported");
        assert!(!traffic(&mut tx));
        tx.set_now(5_000 + TRAFFIC_NOTE_MS - 1);
        assert!(!traffic(&mut tx));
        tx.set_now(5_000 + TRAFFIC_NOTE_MS);
        assert!(traffic(&mut tx), "and again a second later");
    }

    #[test]
    fn replay_corruption_and_forgery_are_dropped_and_counted() {
        let (mut tx, mut rx, _, sb) = pair();
        let pkt = ip4("10.77.0.1", "10.77.0.2", 50);
        let (_, dgram, _) = send(&mut tx, Tun::Peer(0), &pkt);
        let mut first = dgram.clone();
        open(&mut rx, &mut first, 1).unwrap();
        let mut again = dgram.clone();
        assert_eq!(open(&mut rx, &mut again, 1), Err(DropReason::Replay));
        let (_, mut corrupt, _) = send(&mut tx, Tun::Peer(0), &pkt);
        let last = corrupt.len() - 1;
        corrupt[last] ^= 0xff;
        assert_eq!(open(&mut rx, &mut corrupt, 1), Err(DropReason::AuthFailed));
        let mut junk = vec![0x10u8; 200];
        junk[3] = 0;
        junk[4..20].copy_from_slice(&A.0);
        junk[20..36].copy_from_slice(&B.0);
        assert_eq!(open(&mut rx, &mut junk, 1), Err(DropReason::NoSession));
        let mut unknown = dgram.clone();
        unknown[4] ^= 1;
        assert_eq!(open(&mut rx, &mut unknown, 1), Err(DropReason::UnknownPeer));
        let c = &sb.peers[0].counters.drops;
        assert_eq!((c.get(DropReason::Replay), c.get(DropReason::AuthFailed), c.get(DropReason::NoSession)), (1, 1, 1));
        assert_eq!(sb.node.drops.get(DropReason::UnknownPeer), 1);
        // the tunnel keeps working
        let (_, mut ok, _) = send(&mut tx, Tun::Peer(0), &pkt);
        assert!(open(&mut rx, &mut ok, 2).is_ok());
    }

    #[test]
    fn spoofed_inner_addresses_are_refused() {
        let (mut tx, mut rx, _, _) = pair();
        let (_, mut d, _) = send(&mut tx, Tun::Peer(0), &ip4("10.99.0.1", "10.77.0.2", 5));
        assert_eq!(open(&mut rx, &mut d, 1), Err(DropReason::SourceNotAllowed));
        let (_, mut d, _) = send(&mut tx, Tun::Peer(0), &ip4("10.77.0.1", "10.99.0.1", 5));
        assert_eq!(open(&mut rx, &mut d, 1), Err(DropReason::DestinationNotAllowed));
    }

    #[test]
    fn an_egress_node_lets_out_only_what_its_policy_allows_and_a_requester_accepts_replies_from_its_exit() {
        use crate::node::policy::{Policy, Willing};
        let sa = spec(A, B, "10.77.0.1", "10.77.0.2", "10.2.0.0/24", "10.1.0.0/24");
        let mut sb = spec(B, A, "10.77.0.2", "10.77.0.1", "10.1.0.0/24", "10.2.0.0/24");
        let exit = Policy { willing: Willing { internet_masquerade: true, ..Willing::default() }, exit_prefixes: vec!["203.0.113.0/24".parse().unwrap()], ..Policy::default() };
        sb.egress = Some((exit, vec!["192.168.2.0/24".parse().unwrap()]));
        let mut tx = TxState::new(&sa);
        let mut rx = RxState::new(&sb);
        let material = [42u8; wire::EXPORTER_LEN];
        tx.apply(&DataCommand::InstallSession { peer: 0, secrets: wire::split_exporter(&material, &A, &B) });
        rx.apply(&DataCommand::InstallSession { peer: 0, secrets: wire::split_exporter(&material, &B, &A) });
        tx.apply(&DataCommand::SetEndpoint { peer: 0, endpoint: Some(PathEndpoint { remote: "192.0.2.2:7720".parse().unwrap(), local_ip: None }) });
        // B exits to 203.0.113.0/24 and delivers to its own network; nothing else.
        let (_, mut d, _) = send(&mut tx, Tun::Peer(0), &ip4("10.77.0.1", "203.0.113.5", 5));
        assert_eq!(open(&mut rx, &mut d, 1).map(|x| x.tun), Ok(Tun::Peer(0)));
        let (_, mut d, _) = send(&mut tx, Tun::Peer(0), &ip4("10.77.0.1", "192.168.2.7", 5));
        assert!(open(&mut rx, &mut d, 2).is_ok());
        let (_, mut d, _) = send(&mut tx, Tun::Peer(0), &ip4("10.77.0.1", "8.8.8.8", 5));
        assert_eq!(open(&mut rx, &mut d, 3), Err(DropReason::EgressRefused));
        assert_eq!(sb.peers[0].counters.drops.get(DropReason::EgressRefused), 1);
        // The requester's side: replies from the outside host come from B only while B is
        // its exit for them, and go to B's TUN.
        let mut rx_a = RxState::new(&sa);
        let mut tx_b = TxState::new(&sb);
        tx_b.apply(&DataCommand::InstallSession { peer: 0, secrets: wire::split_exporter(&material, &B, &A) });
        rx_a.apply(&DataCommand::InstallSession { peer: 0, secrets: wire::split_exporter(&material, &A, &B) });
        tx_b.apply(&DataCommand::SetEndpoint { peer: 0, endpoint: Some(PathEndpoint { remote: "192.0.2.1:7720".parse().unwrap(), local_ip: None }) });
        let (_, mut d, _) = send(&mut tx_b, Tun::Peer(0), &ip4("203.0.113.5", "10.77.0.1", 5));
        let from_b = "192.0.2.2:7720".parse().unwrap();
        assert!(matches!(rx_a.decapsulate(&mut d, from_b, 1), Err(DropReason::SourceNotAllowed)));
        rx_a.apply(&DataCommand::SetExitSources { peer: 0, nets: vec!["203.0.113.5/32".parse().unwrap()] });
        let (_, mut d, _) = send(&mut tx_b, Tun::Peer(0), &ip4("203.0.113.5", "10.77.0.1", 5));
        assert!(matches!(rx_a.decapsulate(&mut d, from_b, 2), Ok(Rx::Deliver(Delivery { tun: Tun::Peer(0), .. }))));
    }

    #[test]
    fn aggregate_without_route_answers_unreachable_and_big_packets_get_too_big() {
        let (mut tx, _, sa, _) = pair();
        let (a, _, reply) = send(&mut tx, Tun::Aggregate, &ip4("10.77.0.1", "192.0.2.99", 5));
        assert_eq!(a, TxAction::Reply(DropReason::NoRoute));
        // sent back to the sender, from the unreachable destination (never a local address)
        assert_eq!(packet::addresses(&reply).unwrap(), ("192.0.2.99".parse().unwrap(), "10.77.0.1".parse().unwrap()));
        let (a, _, reply) = send(&mut tx, Tun::Peer(0), &ip4("10.77.0.1", "10.77.0.2", 1400));
        assert_eq!(a, TxAction::Reply(DropReason::TooBig));
        assert_eq!(reply[20], 3);
        assert_eq!(reply[21], 4);
        assert_eq!(u16::from_be_bytes([reply[26], reply[27]]), 1388);
        assert_eq!(sa.peers[0].counters.drops.get(DropReason::TooBig), 1);
    }

    #[test]
    fn no_session_or_endpoint_drops() {
        let sa = spec(A, B, "10.77.0.1", "10.77.0.2", "10.2.0.0/24", "10.1.0.0/24");
        let mut tx = TxState::new(&sa);
        let pkt = ip4("10.77.0.1", "10.77.0.2", 5);
        // The first packets wait for the session; beyond STAGED_MAX they are dropped.
        for _ in 0..STAGED_MAX + 2 {
            assert_eq!(send(&mut tx, Tun::Peer(0), &pkt).0, TxAction::NoSession { peer: 0 });
        }
        assert_eq!(sa.peers[0].counters.drops.get(DropReason::NoSession), 2);
        tx.apply(&DataCommand::InstallSession { peer: 0, secrets: wire::split_exporter(&[1; 72], &A, &B) });
        assert!(tx.take_staged(0).is_empty(), "no endpoint yet");
        tx.apply(&DataCommand::SetEndpoint { peer: 0, endpoint: Some(PathEndpoint { remote: "192.0.2.2:7720".parse().unwrap(), local_ip: None }) });
        let staged = tx.take_staged(0);
        assert_eq!(staged.len(), STAGED_MAX);
        assert_eq!(staged[0], pkt);
        let mut buf = vec![0u8; pkt.len() + OVERHEAD];
        buf[HEADER_LEN..HEADER_LEN + pkt.len()].copy_from_slice(&staged[0]);
        let mut reply = Vec::new();
        assert!(matches!(tx.encapsulate(Tun::Peer(0), &mut buf, pkt.len(), &mut reply), TxAction::Send { peer: 0, .. }));
        assert!(tx.take_staged(0).is_empty());
    }

    /// REPLEX split: flows spread by share and stay put; protected destinations use the
    /// relay routes only; a route that leaves takes its flows with it.
    #[test]
    fn a_split_spreads_flows_by_share_and_keeps_them_on_their_route() {
        let (mut tx, _, sa, _) = pair();
        let direct: SocketAddr = "192.0.2.2:7720".parse().unwrap();
        let relay: SocketAddr = "192.0.2.3:7720".parse().unwrap();
        tx.apply(&DataCommand::SetEndpoint { peer: 0, endpoint: Some(PathEndpoint { remote: direct, local_ip: None }) });
        let route = |remote, share, relay, slot| SplitRoute { endpoint: PathEndpoint { remote, local_ip: None }, share, relay, slot };
        tx.apply(&DataCommand::SetSplit { peer: 0, routes: vec![route(direct, 0.75, false, 0), route(relay, 0.25, true, 1)], flow_idle_ms: 60_000 });
        let tcp = |sport: u16, dst: &str| {
            let mut v = Vec::new();
            PacketBuilder::ipv4("10.77.0.1".parse::<Ipv4Addr>().unwrap().octets(), dst.parse::<Ipv4Addr>().unwrap().octets(), 64).tcp(sport, 80, 1, 1000).write(&mut v, &[0u8; 20]).unwrap();
            v
        };
        let to = |tx: &mut TxState, pkt: &[u8]| match send(tx, Tun::Peer(0), pkt).0 {
            TxAction::Send { to, .. } => to,
            other => panic!("{other:?}"),
        };
        let mut first = Vec::new();
        for sport in 0..400u16 {
            first.push(to(&mut tx, &tcp(10_000 + sport, "10.77.0.2")));
        }
        let on_relay = first.iter().filter(|a| **a == relay).count();
        assert!((60..140).contains(&on_relay), "{on_relay} of 400 flows on the 25 % route");
        // shares change: every flow stays where it is
        tx.apply(&DataCommand::SetSplit { peer: 0, routes: vec![route(direct, 0.1, false, 0), route(relay, 0.9, true, 1)], flow_idle_ms: 60_000 });
        for sport in 0..400u16 {
            assert_eq!(to(&mut tx, &tcp(10_000 + sport, "10.77.0.2")), first[sport as usize]);
        }
        // new flows follow the new shares
        let new_on_relay = (0..400u16).filter(|s| to(&mut tx, &tcp(20_000 + s, "10.77.0.2")) == relay).count();
        assert!(new_on_relay > 300, "{new_on_relay}");
        // protected destinations (the peer's underlay address) take relay routes only
        tx.apply(&DataCommand::SetPeerUnderlay { peer: 0, addrs: vec!["198.51.100.2".parse().unwrap()] });
        assert!((0..100u16).all(|s| to(&mut tx, &tcp(30_000 + s, "198.51.100.2")) == relay));
        // the relay route goes: its flows move to the direct route
        tx.apply(&DataCommand::SetSplit { peer: 0, routes: vec![route(direct, 1.0, false, 0)], flow_idle_ms: 60_000 });
        for sport in 0..400u16 {
            assert_eq!(to(&mut tx, &tcp(10_000 + sport, "10.77.0.2")), direct);
        }
        assert!(sa.peers[0].counters.route_packets[1].load(Relaxed) > 0);
    }

    /// A node learned from the directory is added while running: the aggregate routes to
    /// it (asking for a session first), and it is forgotten again when it leaves.
    #[test]
    fn peers_join_and_leave_at_run_time() {
        const C: NodeId = NodeId([0xc; 16]);
        let (mut tx, mut rx, _, _) = pair();
        let to_c = ip4("10.77.0.1", "10.77.0.3", 5);
        assert_eq!(send(&mut tx, Tun::Aggregate, &to_c).0, TxAction::Reply(DropReason::NoRoute));
        let c = PeerSpec {
            node_id: C,
            host_addrs: vec!["10.77.0.3".parse().unwrap()],
            prefixes: vec!["10.3.0.0/24".parse().unwrap()],
            link_local: vec![],
            protected: vec![],
            inner_mtu: 1388,
            counters: Arc::default(),
        };
        tx.apply(&DataCommand::AddPeer { peer: 1, spec: c.clone() });
        rx.apply(&DataCommand::AddPeer { peer: 1, spec: c.clone() });
        assert_eq!(tx.route("10.3.0.9".parse().unwrap()), Some(1));
        assert_eq!(send(&mut tx, Tun::Aggregate, &to_c).0, TxAction::NoSession { peer: 1 });
        // an index out of order is ignored
        tx.apply(&DataCommand::AddPeer { peer: 7, spec: c.clone() });
        assert_eq!(tx.route("10.3.0.9".parse().unwrap()), Some(1));
        // the first peer's traffic is untouched
        let (a, _, _) = send(&mut tx, Tun::Peer(0), &ip4("10.77.0.1", "10.77.0.2", 5));
        assert!(matches!(a, TxAction::Send { peer: 0, .. }));
        tx.apply(&DataCommand::RemovePeer { peer: 1 });
        rx.apply(&DataCommand::RemovePeer { peer: 1 });
        assert_eq!(tx.route("10.3.0.9".parse().unwrap()), None);
        assert_eq!(tx.route("10.77.0.2".parse().unwrap()), Some(0));
    }

    #[test]
    fn old_receive_key_survives_one_rekey() {
        let (mut tx, mut rx, _, _) = pair();
        let pkt = ip4("10.77.0.1", "10.77.0.2", 5);
        let (_, mut old, _) = send(&mut tx, Tun::Peer(0), &pkt);
        let m2 = [7u8; wire::EXPORTER_LEN];
        rx.apply(&DataCommand::InstallSession { peer: 0, secrets: wire::split_exporter(&m2, &B, &A) });
        assert!(open(&mut rx, &mut old, 1).is_ok());
        tx.apply(&DataCommand::InstallSession { peer: 0, secrets: wire::split_exporter(&m2, &A, &B) });
        let (_, mut new, _) = send(&mut tx, Tun::Peer(0), &pkt);
        assert!(open(&mut rx, &mut new, 1).is_ok());
        rx.apply(&DataCommand::InstallSession { peer: 0, secrets: wire::split_exporter(&[8; 72], &B, &A) });
        rx.apply(&DataCommand::InstallSession { peer: 0, secrets: wire::split_exporter(&[9; 72], &B, &A) });
        let (_, mut stale, _) = send(&mut tx, Tun::Peer(0), &pkt);
        assert_eq!(open(&mut rx, &mut stale, 1), Err(DropReason::NoSession));
    }

    #[test]
    fn probes_are_sealed_and_handed_to_the_control_plane() {
        let (mut tx, mut rx, sa, sb) = pair();
        let mut out = vec![0u8; 100];
        let n = tx.seal_control(0, b"probe!", &mut out).unwrap();
        let mut d = out[..n].to_vec();
        match rx.decapsulate(&mut d, FROM.parse().unwrap(), 3).unwrap() {
            Rx::Control { peer: 0, payload } => assert_eq!(&d[payload], b"probe!"),
            other => panic!("{other:?}"),
        }
        assert_eq!(sa.peers[0].counters.probe_tx_bytes.load(Relaxed), n as u64);
        assert_eq!(sb.peers[0].counters.probe_rx_bytes.load(Relaxed), n as u64);
        assert_eq!(sb.peers[0].counters.rx_packets.load(Relaxed), 0, "probes are not data");
    }

    #[test]
    fn protected_traffic_from_the_peers_underlay_address_is_accepted_when_known() {
        let (mut tx, mut rx, _, _) = pair();
        let pkt = ip4("192.0.2.1", "192.0.2.2", 20);
        let mut fresh = || send(&mut tx, Tun::Peer(0), &pkt).1;
        assert_eq!(open(&mut rx, &mut fresh(), 1), Err(DropReason::SourceNotAllowed));
        rx.apply(&DataCommand::SetPeerUnderlay { peer: 0, addrs: vec!["192.0.2.1".parse().unwrap()] });
        assert_eq!(open(&mut rx, &mut fresh(), 1), Err(DropReason::DestinationNotAllowed));
        rx.apply(&DataCommand::SetLocalAddresses(vec!["::ffff:192.0.2.2".parse().unwrap()]));
        assert_eq!(open(&mut rx, &mut fresh(), 1).unwrap().tun, Tun::Peer(0));
    }

    #[test]
    fn relays_forward_only_agreed_pairs_from_the_right_address_and_never_back() {
        const C: NodeId = NodeId([0xc; 16]);
        let (mut tx, _, _, _) = pair();
        // C relays between A and B
        let sc = spec(C, A, "10.77.0.3", "10.77.0.1", "10.1.0.0/24", "10.3.0.0/24");
        let mut relay = RxState::new(&sc);
        let pkt = ip4("10.77.0.1", "10.77.0.2", 30);
        let (_, dgram, _) = send(&mut tx, Tun::Peer(0), &pkt);
        let a_addr: SocketAddr = "192.0.2.1:7720".parse().unwrap();
        let b_addr: SocketAddr = "192.0.2.2:7720".parse().unwrap();
        assert_eq!(relay.decapsulate(&mut dgram.clone(), a_addr, 1), Err(DropReason::RelayDenied));
        relay.apply(&DataCommand::SetRelay { a: A, a_addr, b: B, b_addr });
        let mut d = dgram.clone();
        assert_eq!(relay.decapsulate(&mut d, a_addr, 1), Ok(Rx::Forward { to: b_addr }));
        assert_eq!(Header::decode(&d).unwrap().hop_limit, wire::DEFAULT_HOP_LIMIT - 1);
        // the relayed datagram still opens at B (the hop limit is not authenticated)
        let (_, mut rx_b, _, _) = pair();
        assert!(open(&mut rx_b, &mut d, 1).is_ok());
        // from anyone but A: refused; a mapped IPv4 address is the same address
        assert_eq!(relay.decapsulate(&mut dgram.clone(), "192.0.2.99:7720".parse().unwrap(), 1), Err(DropReason::RelayDenied));
        assert_eq!(relay.decapsulate(&mut dgram.clone(), "[::ffff:192.0.2.1]:7720".parse().unwrap(), 1), Ok(Rx::Forward { to: b_addr }));
        // never back where it came from
        relay.apply(&DataCommand::SetRelay { a: A, a_addr, b: B, b_addr: a_addr });
        assert_eq!(relay.decapsulate(&mut dgram.clone(), a_addr, 1), Err(DropReason::RelayLoop));
        // hop limit exhausted
        relay.apply(&DataCommand::SetRelay { a: A, a_addr, b: B, b_addr });
        let mut spent = dgram.clone();
        spent[2] = 0;
        assert_eq!(relay.decapsulate(&mut spent, a_addr, 1), Err(DropReason::HopLimit));
        relay.apply(&DataCommand::ClearRelay { a: B, b: A });
        assert_eq!(relay.decapsulate(&mut dgram.clone(), a_addr, 1), Err(DropReason::RelayDenied));
        assert_eq!(sc.node.relayed_packets.load(Relaxed), 2);
    }

    proptest! {
        #[test]
        fn decapsulate_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300), fix_ids in any::<bool>()) {
            let (_, mut rx, _, _) = pair();
            let mut buf = data;
            if fix_ids && buf.len() >= 36 {
                buf[0] = 0x10;
                buf[3] = 0;
                buf[4..20].copy_from_slice(&A.0);
                buf[20..36].copy_from_slice(&B.0);
            }
            let _ = open(&mut rx, &mut buf, 1);
        }

        #[test]
        fn encapsulate_never_panics(data in proptest::collection::vec(any::<u8>(), 0..1600), agg in any::<bool>()) {
            let (mut tx, _, _, _) = pair();
            let mut buf = frame(&data);
            let mut reply = Vec::new();
            let _ = tx.encapsulate(if agg { Tun::Aggregate } else { Tun::Peer(0) }, &mut buf, data.len(), &mut reply);
        }
    }
}
