//! The forwarding overlay's packet logic, sans I/O (spec A§1.3.1, A§2.1; seeds-digest
//! items 29–31, 40–42).
//!
//! [`TxState`] turns an inner IP packet read from a TUN into a sealed datagram and says
//! where to send it; [`RxState`] opens a datagram and says which TUN gets the inner packet.
//! Each is owned by one data thread; the control plane changes them with
//! [`DataCommand`]s. Neither does I/O or reads a clock: time comes in as `now_ms`
//! (milliseconds on the daemon's monotonic clock). Every failure is a [`DropReason`] that is
//! counted, never a panic.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use ipnet::IpNet;

use crate::identity::NodeId;
use crate::packet;
use crate::replay::ReplayWindow;
use crate::routing::PrefixTable;
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
}

impl DropReason {
    /// All reasons, in counter order.
    pub const ALL: [DropReason; 17] = [
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
    /// Drops attributed to this peer.
    pub drops: DropCounters,
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
    /// Drops not attributable to a peer.
    pub node_drops: Arc<DropCounters>,
}

/// Where an authenticated underlay path ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathEndpoint {
    /// The peer's data-port socket address.
    pub remote: SocketAddr,
    /// The local address to send from (`None`: let the kernel choose).
    pub local_ip: Option<IpAddr>,
}

/// Control-plane changes applied to both data threads, in order.
#[derive(Debug, Clone)]
pub enum DataCommand {
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
    },
    /// Write the ICMP error left in the reply buffer back to the TUN the packet came from.
    Reply(DropReason),
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
    session: Option<TxSession>,
    endpoint: Option<PathEndpoint>,
    inner_mtu: usize,
    counters: Arc<PeerCounters>,
}

/// Send-side state: routing, keys and counters (owned by the TX thread).
pub struct TxState {
    local: NodeId,
    peers: Vec<TxPeer>,
    table: PrefixTable<usize>,
    node_drops: Arc<DropCounters>,
}

impl TxState {
    /// Builds the send state; the aggregate routing table maps each peer's host addresses
    /// and prefixes to the peer.
    pub fn new(spec: &DataPlaneSpec) -> TxState {
        let mut table = PrefixTable::new();
        for (i, p) in spec.peers.iter().enumerate() {
            for a in &p.host_addrs {
                table.insert(IpNet::from(*a), i);
            }
            for net in &p.prefixes {
                table.insert(*net, i);
            }
        }
        TxState {
            local: spec.local,
            peers: spec
                .peers
                .iter()
                .map(|p| TxPeer {
                    id: p.node_id,
                    session: None,
                    endpoint: None,
                    inner_mtu: usize::from(p.inner_mtu),
                    counters: p.counters.clone(),
                })
                .collect(),
            table,
            node_drops: spec.node_drops.clone(),
        }
    }

    /// Applies a control-plane change.
    pub fn apply(&mut self, cmd: &DataCommand) {
        match cmd {
            DataCommand::InstallSession { peer, secrets } => {
                if let Some(p) = self.peers.get_mut(*peer) {
                    p.session = Some(TxSession { key_id: secrets.tx_key_id, key: PacketKey::new(&secrets.tx_key), next_counter: 0 });
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
        }
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
        if buf.len() < len + OVERHEAD {
            self.node_drops.add(DropReason::TooBig);
            return TxAction::Drop(DropReason::TooBig);
        }
        let pkt = &buf[HEADER_LEN..HEADER_LEN + len];
        let Some((_, dst)) = packet::addresses(pkt) else {
            self.node_drops.add(DropReason::NotIp);
            return TxAction::Drop(DropReason::NotIp);
        };
        if packet::is_multicast(&dst) {
            self.node_drops.add(DropReason::Multicast);
            return TxAction::Drop(DropReason::Multicast);
        }
        let peer = match ingress {
            Tun::Peer(i) if i < self.peers.len() => i,
            Tun::Peer(_) => {
                self.node_drops.add(DropReason::NoRoute);
                return TxAction::Drop(DropReason::NoRoute);
            }
            Tun::Aggregate => match self.table.lookup(dst) {
                Some(&i) => i,
                None => {
                    self.node_drops.add(DropReason::NoRoute);
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
        let Some(session) = p.session.as_mut().filter(|s| s.next_counter < u64::MAX) else {
            p.counters.drops.add(DropReason::NoSession);
            return TxAction::Drop(DropReason::NoSession);
        };
        let Some(endpoint) = p.endpoint else {
            p.counters.drops.add(DropReason::NoEndpoint);
            return TxAction::Drop(DropReason::NoEndpoint);
        };
        let header = Header {
            traffic: TrafficType::Data,
            flags: 0,
            hop_limit: wire::DEFAULT_HOP_LIMIT,
            src: self.local,
            dst: p.id,
            key_id: session.key_id,
            counter: session.next_counter,
        };
        session.next_counter += 1;
        let n = session.key.seal(&header, buf, len);
        p.counters.tx_packets.fetch_add(1, Relaxed);
        p.counters.tx_bytes.fetch_add(len as u64, Relaxed);
        TxAction::Send { peer, to: endpoint.remote, src_ip: endpoint.local_ip, len: n }
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
    sessions: Vec<RxSession>,
    hosts: PrefixTable<()>,
    prefixes: PrefixTable<()>,
    counters: Arc<PeerCounters>,
}

/// A datagram that passed every check.
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

/// Receive-side state: keys, replay windows and source checks (owned by the RX thread).
pub struct RxState {
    local: NodeId,
    peers: Vec<RxPeer>,
    by_id: HashMap<NodeId, usize>,
    local_dsts: PrefixTable<()>,
    node_drops: Arc<DropCounters>,
}

impl RxState {
    /// Builds the receive state.
    pub fn new(spec: &DataPlaneSpec) -> RxState {
        let mut local_dsts = PrefixTable::new();
        for net in &spec.local_dsts {
            local_dsts.insert(*net, ());
        }
        RxState {
            local: spec.local,
            peers: spec
                .peers
                .iter()
                .map(|p| {
                    let mut hosts = PrefixTable::new();
                    for a in &p.host_addrs {
                        hosts.insert(IpNet::from(*a), ());
                    }
                    let mut prefixes = PrefixTable::new();
                    for n in &p.prefixes {
                        prefixes.insert(*n, ());
                    }
                    RxPeer { sessions: Vec::new(), hosts, prefixes, counters: p.counters.clone() }
                })
                .collect(),
            by_id: spec.peers.iter().enumerate().map(|(i, p)| (p.node_id, i)).collect(),
            local_dsts,
            node_drops: spec.node_drops.clone(),
        }
    }

    /// Applies a control-plane change.
    pub fn apply(&mut self, cmd: &DataCommand) {
        match cmd {
            DataCommand::InstallSession { peer, secrets } => {
                if let Some(p) = self.peers.get_mut(*peer) {
                    p.sessions.retain(|s| s.key_id != secrets.rx_key_id);
                    p.sessions.insert(
                        0,
                        RxSession { key_id: secrets.rx_key_id, key: PacketKey::new(&secrets.rx_key), replay: ReplayWindow::default() },
                    );
                    p.sessions.truncate(RX_SESSIONS);
                }
            }
            DataCommand::SetEndpoint { .. } => {}
            DataCommand::ClearSessions { peer } => {
                if let Some(p) = self.peers.get_mut(*peer) {
                    p.sessions.clear();
                }
            }
        }
    }

    /// Authenticates and opens one datagram in place. On success the inner packet is at
    /// `buf[delivery.inner]`.
    ///
    /// # Errors
    /// The [`DropReason`], already counted (per peer where the peer is known).
    pub fn decapsulate(&mut self, buf: &mut [u8], now_ms: u64) -> Result<Delivery, DropReason> {
        let header = match Header::decode(buf) {
            Ok(h) => h,
            Err(wire::WireError::BadVersion) => return Err(self.node_drop(DropReason::BadVersion)),
            Err(_) => return Err(self.node_drop(DropReason::Malformed)),
        };
        if header.dst != self.local {
            return Err(self.node_drop(DropReason::NotForUs));
        }
        let Some(&peer) = self.by_id.get(&header.src) else {
            return Err(self.node_drop(DropReason::UnknownPeer));
        };
        let p = &mut self.peers[peer];
        let fail = |p: &RxPeer, r: DropReason| {
            p.counters.drops.add(r);
            r
        };
        if header.traffic != TrafficType::Data {
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
        let Some((src, dst)) = packet::addresses(&buf[inner.clone()]) else {
            return Err(fail(p, DropReason::NotIp));
        };
        let tun = if p.hosts.contains(src) {
            Tun::Peer(peer)
        } else if p.prefixes.contains(src) {
            Tun::Aggregate
        } else {
            return Err(fail(p, DropReason::SourceNotAllowed));
        };
        if !self.local_dsts.contains(dst) {
            return Err(fail(p, DropReason::DestinationNotAllowed));
        }
        p.counters.rx_packets.fetch_add(1, Relaxed);
        p.counters.rx_bytes.fetch_add(n as u64, Relaxed);
        Ok(Delivery { peer, tun, inner })
    }

    fn node_drop(&self, r: DropReason) -> DropReason {
        self.node_drops.add(r);
        r
    }
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
                inner_mtu: 1388,
                counters: Arc::default(),
            }],
            node_drops: Arc::default(),
        }
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
        let d = rx.decapsulate(&mut dgram, 5).unwrap();
        assert_eq!(d.tun, Tun::Peer(0));
        assert_eq!(&dgram[d.inner.clone()], &pkt[..]);
        // from the prefix behind A to the prefix behind B: aggregate on both sides
        let pkt = ip4("10.1.0.9", "10.2.0.7", 10);
        let (a, mut dgram, _) = send(&mut tx, Tun::Aggregate, &pkt);
        assert!(matches!(a, TxAction::Send { .. }));
        assert_eq!(rx.decapsulate(&mut dgram, 6).unwrap().tun, Tun::Aggregate);
        assert_eq!(sb.peers[0].counters.rx_packets.load(Relaxed), 2);
        assert_eq!(sb.peers[0].counters.last_rx_ms.load(Relaxed), 6);
    }

    #[test]
    fn replay_corruption_and_forgery_are_dropped_and_counted() {
        let (mut tx, mut rx, _, sb) = pair();
        let pkt = ip4("10.77.0.1", "10.77.0.2", 50);
        let (_, dgram, _) = send(&mut tx, Tun::Peer(0), &pkt);
        let mut first = dgram.clone();
        rx.decapsulate(&mut first, 1).unwrap();
        let mut again = dgram.clone();
        assert_eq!(rx.decapsulate(&mut again, 1), Err(DropReason::Replay));
        let (_, mut corrupt, _) = send(&mut tx, Tun::Peer(0), &pkt);
        let last = corrupt.len() - 1;
        corrupt[last] ^= 0xff;
        assert_eq!(rx.decapsulate(&mut corrupt, 1), Err(DropReason::AuthFailed));
        let mut junk = vec![0x10u8; 200];
        junk[3] = 0;
        junk[4..20].copy_from_slice(&A.0);
        junk[20..36].copy_from_slice(&B.0);
        assert_eq!(rx.decapsulate(&mut junk, 1), Err(DropReason::NoSession));
        let mut unknown = dgram.clone();
        unknown[4] ^= 1;
        assert_eq!(rx.decapsulate(&mut unknown, 1), Err(DropReason::UnknownPeer));
        let c = &sb.peers[0].counters.drops;
        assert_eq!((c.get(DropReason::Replay), c.get(DropReason::AuthFailed), c.get(DropReason::NoSession)), (1, 1, 1));
        assert_eq!(sb.node_drops.get(DropReason::UnknownPeer), 1);
        // the tunnel keeps working
        let (_, mut ok, _) = send(&mut tx, Tun::Peer(0), &pkt);
        assert!(rx.decapsulate(&mut ok, 2).is_ok());
    }

    #[test]
    fn spoofed_inner_addresses_are_refused() {
        let (mut tx, mut rx, _, _) = pair();
        let (_, mut d, _) = send(&mut tx, Tun::Peer(0), &ip4("10.99.0.1", "10.77.0.2", 5));
        assert_eq!(rx.decapsulate(&mut d, 1), Err(DropReason::SourceNotAllowed));
        let (_, mut d, _) = send(&mut tx, Tun::Peer(0), &ip4("10.77.0.1", "10.99.0.1", 5));
        assert_eq!(rx.decapsulate(&mut d, 1), Err(DropReason::DestinationNotAllowed));
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
        assert_eq!(send(&mut tx, Tun::Peer(0), &pkt).0, TxAction::Drop(DropReason::NoSession));
        tx.apply(&DataCommand::InstallSession { peer: 0, secrets: wire::split_exporter(&[1; 72], &A, &B) });
        assert_eq!(send(&mut tx, Tun::Peer(0), &pkt).0, TxAction::Drop(DropReason::NoEndpoint));
    }

    #[test]
    fn old_receive_key_survives_one_rekey() {
        let (mut tx, mut rx, _, _) = pair();
        let pkt = ip4("10.77.0.1", "10.77.0.2", 5);
        let (_, mut old, _) = send(&mut tx, Tun::Peer(0), &pkt);
        let m2 = [7u8; wire::EXPORTER_LEN];
        rx.apply(&DataCommand::InstallSession { peer: 0, secrets: wire::split_exporter(&m2, &B, &A) });
        assert!(rx.decapsulate(&mut old, 1).is_ok());
        tx.apply(&DataCommand::InstallSession { peer: 0, secrets: wire::split_exporter(&m2, &A, &B) });
        let (_, mut new, _) = send(&mut tx, Tun::Peer(0), &pkt);
        assert!(rx.decapsulate(&mut new, 1).is_ok());
        rx.apply(&DataCommand::InstallSession { peer: 0, secrets: wire::split_exporter(&[8; 72], &B, &A) });
        rx.apply(&DataCommand::InstallSession { peer: 0, secrets: wire::split_exporter(&[9; 72], &B, &A) });
        let (_, mut stale, _) = send(&mut tx, Tun::Peer(0), &pkt);
        assert_eq!(rx.decapsulate(&mut stale, 1), Err(DropReason::NoSession));
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
            let _ = rx.decapsulate(&mut buf, 1);
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
