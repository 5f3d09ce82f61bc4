//! The node's overlay model: the validated configuration, this node's identity and every
//! peer — configured ones first, then the nodes learned from the directory — and the two
//! views derived from it: the data plane's ([`Model::dataplane_spec`], [`Model::peer_spec`])
//! and the kernel's ([`Model::desired_kernel`]). Both come from this one place, so the
//! overlay routing table and the kernel routes cannot disagree (seeds-digest items 43, 65).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use ipnet::{IpNet, Ipv6Net};

use crate::config::{derive_ifname, Config, Endpoint, PeerConfig};
use crate::dataplane::{DataPlaneSpec, NodeCounters, PeerCounters, PeerSpec};
use crate::identity::NodeId;
use crate::kernel::links::{self, LinkAddrs};
use crate::kernel::{
    AddrSpec, DesiredState, LinkSpec, NexthopKind, NexthopSpec, RouteSpec, RuleSpec, CLASS_EGRESS, CLASS_NEW, PIN_DIRECT, PIN_MASK, PIN_OVERLAY, TABLE_MAIN, TABLE_NEW, TABLE_PIN, TABLE_RETURN,
};
use crate::overlay::directory::NodeRecord;

/// Protection of one peer's destinations, as the failover engine decided it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Protect {
    /// The peer's underlay addresses in use (learned from its sessions).
    pub underlay: Vec<IpAddr>,
    /// This node's underlay address towards the peer, used as the preferred source of the
    /// rerouted routes so that new connections keep the address they would have had.
    pub src: Vec<IpAddr>,
    /// REPLEX split while the direct path still carries part of the traffic: the weights
    /// (direct, overlay), 1..=256, of the resilient nexthop group the protected destinations
    /// are routed through. `None`: all of it goes through the overlay.
    pub split: Option<(u16, u16)>,
}

/// What [`Model::route_of`] found for a destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteMatch {
    /// The peer it belongs to.
    pub peer: usize,
    /// The matching prefix.
    pub prefix: IpNet,
    /// What kind of destination it is.
    pub kind: RouteKind,
}

/// Kinds of destinations detour routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    /// A peer's overlay address: always through the overlay (its own interface).
    OverlayAddress,
    /// A prefix behind a peer: always through the overlay (the aggregate interface).
    Prefix,
    /// A destination normally reached over the underlay (the peer's endpoint addresses,
    /// its `protected` prefixes, networks behind it): through the overlay only while the
    /// direct path to the peer fails.
    Protected,
}

impl RouteKind {
    /// In words.
    pub fn as_str(self) -> &'static str {
        match self {
            RouteKind::OverlayAddress => "overlay address",
            RouteKind::Prefix => "prefix behind the peer",
            RouteKind::Protected => "protected underlay destination",
        }
    }
}

/// The underlay route to a destination, as detour's own packets would take it: gateway
/// and output interface (read by the shell; the direct member of a split's nexthop group).
pub type UnderlayHops = std::collections::HashMap<IpNet, (Option<IpAddr>, String)>;

/// Nexthop IDs detour uses: `0xd7 + node.instance` in the top byte (each overlay of a
/// host owns its own, [`nexthop_owner`]), the peer index, and the object.
pub fn nexthop_id(instance: u8, peer: usize, object: u8) -> u32 {
    (u32::from(0xd7 + instance) << 24) | ((peer as u32 & 0xffff) << 8) | u32::from(object)
}

/// The overlay instance whose nexthop object `id` is ([`nexthop_id`]), if detour's.
pub fn nexthop_owner(id: u32) -> Option<u8> {
    let top = (id >> 24) as u8;
    (0xd7..0xd7 + crate::config::MAX_INSTANCES).contains(&top).then(|| top - 0xd7)
}

/// One peer: configured, or a node learned from the directory.
#[derive(Debug, Clone)]
pub struct PeerDef {
    /// Its settings (for a directory node, made from its record).
    pub cfg: PeerConfig,
    /// Addresses of the per-peer link.
    pub links: LinkAddrs,
    /// From the configuration (pinned, always has a session and a TUN).
    pub configured: bool,
    /// Whether its per-peer TUN exists (configured peers: always; others while the link
    /// carries traffic).
    pub tun: bool,
    /// Still in the directory (configured peers: always).
    pub present: bool,
    /// Its relay policy (from its record; configured peers: the default, commitment
    /// `always`, until their record arrives).
    pub policy: crate::node::policy::Policy,
    /// Networks behind it that are reached over the underlay (from its record): protected
    /// like `cfg.protected`.
    pub networks: Vec<IpNet>,
    /// Its record has been learned (until then its policy is unknown and it is not asked
    /// to relay).
    pub known: bool,
    /// Traffic counters, shared with the data path.
    pub counters: Arc<PeerCounters>,
}

impl PeerDef {
    /// A configured peer with its link addresses: pinned, present, with a TUN, its policy
    /// the default until its record arrives.
    pub fn configured(cfg: PeerConfig, links: LinkAddrs) -> PeerDef {
        PeerDef {
            cfg,
            links,
            configured: true,
            tun: true,
            present: true,
            policy: crate::node::policy::Policy::default(),
            networks: Vec::new(),
            known: false,
            counters: Arc::new(PeerCounters::default()),
        }
    }
}

/// What [`Model::learn`] did with a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learned {
    /// A new peer at this index.
    New(usize),
    /// An existing peer whose data-plane view changed.
    Changed(usize),
    /// Nothing the data plane or the kernel sees changed.
    Same(usize),
    /// The record is this node's own, or a configured peer's (whose settings stay pinned).
    Ignored,
}

/// Configuration, identity, peers and derived link addresses.
#[derive(Debug, Clone)]
pub struct Model {
    /// The validated configuration.
    pub cfg: Config,
    /// This node's ID.
    pub local: NodeId,
    /// Every peer: configured ones first (config order), then directory nodes in the order
    /// they were learned, then peers a reload added. Indices are never reused for another
    /// node.
    pub peers: Vec<PeerDef>,
    /// Counters of the node itself.
    pub node: Arc<NodeCounters>,
    /// Problems worth a warning at start (e.g. link address collisions).
    pub warnings: Vec<String>,
    /// Routes to outside destinations through exit nodes (set by the engine).
    pub exits: Vec<crate::node::exits::ExitRoute>,
    pub(super) by_id: HashMap<NodeId, usize>,
    pub(super) taken_v4: HashSet<Ipv4Addr>,
    /// Overlay addresses claimed by peers in the directory (present), with their owners:
    /// [`Model::learn`] checks a record against them in O(1) instead of walking every peer
    /// (a node of a 1,000-node overlay learns 1,000 records).
    addr_owners: HashMap<IpAddr, Vec<usize>>,
    /// Peer names and interface names in use.
    pub(super) names: HashSet<String>,
    pub(super) ifnames: HashSet<String>,
}

impl Model {
    /// Derives the model from the configuration; pure.
    pub fn new(cfg: Config, local: NodeId) -> Model {
        let mut in_use: Vec<IpAddr> = Vec::new();
        if let Some(v4) = cfg.node.overlay_v4 {
            in_use.push(IpAddr::V4(v4.addr()));
        }
        in_use.extend(cfg.peers.iter().filter_map(|p| p.overlay_v4.map(IpAddr::V4)));
        let ids: Vec<(String, NodeId)> = cfg.peers.iter().map(|p| (p.name.clone(), p.node_id)).collect();
        let (links, warnings) = links::plan(&local, &ids, cfg.kernel.link_pool_v4, &in_use);
        let mut taken_v4: HashSet<Ipv4Addr> = in_use
            .iter()
            .filter_map(|a| match a {
                IpAddr::V4(v) => Some(*v),
                _ => None,
            })
            .collect();
        for l in &links {
            taken_v4.extend(l.local_v4);
            taken_v4.extend(l.remote_v4);
        }
        let peers: Vec<PeerDef> = cfg.peers.iter().zip(links).map(|(p, links)| PeerDef::configured(p.clone(), links)).collect();
        let by_id = peers.iter().enumerate().map(|(i, p)| (p.cfg.node_id, i)).collect();
        let names = peers.iter().map(|p| p.cfg.name.clone()).collect();
        let ifnames = peers.iter().map(|p| p.cfg.interface.clone()).collect();
        let mut m = Model { cfg, local, peers, node: Arc::new(NodeCounters::default()), warnings, exits: Vec::new(), by_id, taken_v4, addr_owners: HashMap::new(), names, ifnames };
        for i in 0..m.peers.len() {
            m.claim(i, true);
        }
        m
    }

    /// Adds (`on`) or removes peer `i`'s overlay addresses in the claims index.
    pub(super) fn claim(&mut self, i: usize, on: bool) {
        let c = &self.peers[i].cfg;
        for a in [c.overlay_v4.map(IpAddr::V4), c.overlay_v6.map(IpAddr::V6)].into_iter().flatten() {
            let owners = self.addr_owners.entry(a).or_default();
            owners.retain(|o| *o != i);
            if on {
                owners.push(i);
            }
            if owners.is_empty() {
                self.addr_owners.remove(&a);
            }
        }
    }

    /// Peer `i`'s settings.
    pub fn peer(&self, i: usize) -> &PeerConfig {
        &self.peers[i].cfg
    }

    /// The index of a node.
    pub fn index_of(&self, id: &NodeId) -> Option<usize> {
        self.by_id.get(id).copied()
    }

    /// Takes in a directory record: a node not known before becomes a peer (no TUN yet);
    /// a known directory node gets the record's endpoints, addresses and prefixes. Overlay
    /// addresses and prefixes that belong to this node or a configured peer are not taken
    /// over, and a configured peer's pinned settings never change.
    pub fn learn(&mut self, rec: &NodeRecord) -> Learned {
        if rec.node_id == self.local {
            return Learned::Ignored;
        }
        let existing = self.index_of(&rec.node_id);
        // Prefixes are compared with every claimed one only when the record has any.
        let nets = if rec.networks.is_empty() && rec.prefixes.is_empty() { Vec::new() } else { self.reserved_nets(existing) };
        let networks: Vec<IpNet> = rec.networks.iter().copied().filter(|n| !nets.iter().any(|r| r.contains(n) || n.contains(r))).collect();
        if let Some(i) = existing.filter(|&i| self.peers[i].configured) {
            let p = &mut self.peers[i];
            p.policy = rec.policy();
            p.known = true;
            if p.networks != networks {
                p.networks = networks;
                return Learned::Changed(i);
            }
            return Learned::Ignored;
        }
        let ok_addr = |a: IpAddr| !self.addr_reserved(a, existing);
        let prefixes: Vec<IpNet> = rec.prefixes.iter().copied().filter(|n| !nets.iter().any(|r| r.contains(n) || n.contains(r))).collect();
        let endpoints: Vec<Endpoint> = rec.endpoints.iter().map(|a| Endpoint::Addr(*a)).collect();
        let overlay_v4 = rec.overlay_v4.filter(|a| ok_addr(IpAddr::V4(*a)));
        let overlay_v6 = rec.overlay_v6.filter(|a| ok_addr(IpAddr::V6(*a)));
        match existing {
            Some(i) => {
                let p = &mut self.peers[i];
                let changed = !p.present || p.cfg.endpoints != endpoints || p.cfg.overlay_v4 != overlay_v4 || p.cfg.overlay_v6 != overlay_v6 || p.cfg.prefixes != prefixes || p.networks != networks;
                if p.present {
                    self.claim(i, false);
                }
                let p = &mut self.peers[i];
                p.networks = networks;
                p.cfg.endpoints = endpoints;
                p.cfg.overlay_v4 = overlay_v4;
                p.cfg.overlay_v6 = overlay_v6;
                p.cfg.prefixes = prefixes;
                p.present = true;
                p.known = true;
                p.policy = rec.policy();
                self.claim(i, true);
                if changed {
                    Learned::Changed(i)
                } else {
                    Learned::Same(i)
                }
            }
            None => {
                let name = self.unique_name(rec.name(), &rec.node_id);
                let interface = self.unique_ifname(&name, &rec.node_id);
                let (links, warning) = links::assign(&self.local, &name, &rec.node_id, self.cfg.kernel.link_pool_v4, &mut self.taken_v4);
                if let Some(w) = warning {
                    self.warnings.push(w);
                }
                // The directory verified the record's signature with this key.
                let public_key = match crate::identity::PublicKey::from_base64(&rec.public_key) {
                    Ok(k) => k,
                    Err(_) => return Learned::Ignored,
                };
                let i = self.peers.len();
                self.peers.push(PeerDef {
                    cfg: PeerConfig { name, public_key, node_id: rec.node_id, endpoints, overlay_v4, overlay_v6, prefixes, interface, underlay_mtu: self.cfg.node.underlay_mtu, protected: Vec::new() },
                    links,
                    configured: false,
                    tun: false,
                    present: true,
                    policy: rec.policy(),
                    networks,
                    known: true,
                    counters: Arc::new(PeerCounters::default()),
                });
                self.by_id.insert(rec.node_id, i);
                self.names.insert(self.peers[i].cfg.name.clone());
                self.ifnames.insert(self.peers[i].cfg.interface.clone());
                self.claim(i, true);
                Learned::New(i)
            }
        }
    }

    /// A directory node left the directory: it keeps its index (and link addresses), but
    /// no longer has routes or a TUN. Returns its index.
    pub fn forget(&mut self, id: &NodeId) -> Option<usize> {
        let i = self.index_of(id)?;
        let p = &mut self.peers[i];
        if p.configured || !p.present {
            return None;
        }
        p.present = false;
        p.tun = false;
        self.claim(i, false);
        Some(i)
    }

    /// Opens or closes a directory node's TUN (configured peers always have theirs).
    /// Returns whether anything changed.
    pub fn set_tun(&mut self, i: usize, on: bool) -> bool {
        match self.peers.get_mut(i) {
            Some(p) if !p.configured && p.tun != on && (p.present || !on) => {
                p.tun = on;
                true
            }
            _ => false,
        }
    }

    /// Whether overlay address `a` belongs to this node, or to a configured peer or a
    /// directory node other than `except`: a directory node may not claim it.
    fn addr_reserved(&self, a: IpAddr, except: Option<usize>) -> bool {
        let n = &self.cfg.node;
        n.overlay_v4.is_some_and(|v| IpAddr::V4(v.addr()) == a)
            || n.overlay_v6.is_some_and(|v| IpAddr::V6(v.addr()) == a)
            || self.addr_owners.get(&a).is_some_and(|o| o.iter().any(|i| Some(*i) != except))
    }

    /// Prefixes a directory node may not claim: this node's, and those of the configured
    /// peers and other directory nodes (except `except`).
    fn reserved_nets(&self, except: Option<usize>) -> Vec<IpNet> {
        let n = &self.cfg.node;
        let mut nets: Vec<IpNet> = n.prefixes.iter().chain(n.networks.iter()).copied().collect();
        for (i, p) in self.peers.iter().enumerate() {
            if Some(i) == except || !p.present {
                continue;
            }
            nets.extend(p.cfg.prefixes.iter().chain(p.cfg.protected.iter()).chain(p.networks.iter()).copied());
        }
        nets
    }

    fn unique_name(&self, want: &str, id: &NodeId) -> String {
        let clean: String = want.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')).take(24).collect();
        let base = if clean.is_empty() { id.short() } else { clean };
        if self.names.contains(&base) || base == self.cfg.node.name {
            format!("{base}-{}", &id.to_string()[..6])
        } else {
            base
        }
    }

    fn unique_ifname(&self, name: &str, id: &NodeId) -> String {
        let taken = |n: &str| n == self.cfg.kernel.aggregate_interface || self.ifnames.contains(n);
        let first = derive_ifname(&self.cfg.kernel.interface_prefix, name);
        if !taken(&first) {
            return first;
        }
        derive_ifname(&self.cfg.kernel.interface_prefix, &format!("{name}{}", id))
    }

    /// Addresses that belong to peer `i` itself (overlay and link addresses, and the
    /// literal addresses of its endpoints); packets from them arrive on its own TUN.
    pub fn peer_host_addrs(&self, i: usize) -> Vec<IpAddr> {
        let p = &self.peers[i].cfg;
        let l = &self.peers[i].links;
        let mut v: Vec<IpAddr> = Vec::new();
        v.extend(p.overlay_v4.map(IpAddr::V4));
        v.extend(p.overlay_v6.map(IpAddr::V6));
        v.extend(l.remote_v4.map(IpAddr::V4));
        v.push(IpAddr::V6(l.remote_v6));
        v.extend(self.endpoint_ips(i));
        v
    }

    /// Whether this node lets overlay traffic leave towards hosts that do not run detour:
    /// it offers exit, or delivers to networks behind it.
    pub fn egress(&self) -> bool {
        let p = &self.cfg.node.policy;
        p.willing.internet || p.willing.internet_masquerade || (p.willing.local && !self.cfg.node.networks.is_empty())
    }

    /// The literal IP addresses among peer `i`'s endpoints.
    pub fn endpoint_ips(&self, i: usize) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = Vec::new();
        for e in &self.peers[i].cfg.endpoints {
            if let Endpoint::Addr(a) = e {
                let ip = a.ip().to_canonical();
                if !v.contains(&ip) {
                    v.push(ip);
                }
            }
        }
        v
    }

    /// Every destination protected for peer `i`: its underlay addresses (configured and
    /// `learned`) and its `protected` prefixes.
    pub fn protected_destinations(&self, i: usize, learned: &[IpAddr]) -> Vec<IpNet> {
        let mut v: Vec<IpNet> = self.endpoint_ips(i).into_iter().map(IpNet::from).collect();
        for a in learned {
            let n = IpNet::from(a.to_canonical());
            if !v.contains(&n) {
                v.push(n);
            }
        }
        v.extend(self.peers[i].cfg.protected.iter().copied());
        v.extend(self.peers[i].networks.iter().copied());
        v
    }

    /// How detour routes `addr` (`detourctl why`): the most specific of the overlay
    /// addresses and prefixes of present peers (always through the overlay) and their
    /// protected destinations (the underlay, taken over while the direct path fails),
    /// with the peer it belongs to. `learned` are the peers' underlay addresses learned
    /// from their sessions, by peer index. `None`: detour does not route it.
    pub fn route_of(&self, addr: IpAddr, learned: &[Vec<IpAddr>]) -> Option<RouteMatch> {
        let addr = addr.to_canonical();
        let mut best: Option<RouteMatch> = None;
        let mut offer = |peer: usize, prefix: IpNet, kind: RouteKind| {
            if prefix.contains(&addr) && best.as_ref().is_none_or(|b| prefix.prefix_len() > b.prefix.prefix_len()) {
                best = Some(RouteMatch { peer, prefix, kind });
            }
        };
        for (i, p) in self.peers.iter().enumerate().filter(|(_, p)| p.present) {
            for a in [p.cfg.overlay_v4.map(IpAddr::V4), p.cfg.overlay_v6.map(IpAddr::V6)].into_iter().flatten() {
                offer(i, IpNet::from(a), RouteKind::OverlayAddress);
            }
            for n in &p.cfg.prefixes {
                offer(i, *n, RouteKind::Prefix);
            }
            for n in self.protected_destinations(i, learned.get(i).map(Vec::as_slice).unwrap_or(&[])) {
                offer(i, n, RouteKind::Protected);
            }
        }
        best
    }

    /// Every configured peer's protected destinations (its configured endpoint addresses,
    /// `protected` prefixes and networks): what the traffic-detection rules watch.
    pub fn configured_protected_destinations(&self) -> Vec<IpNet> {
        (0..self.peers.len()).filter(|&i| self.peers[i].configured).flat_map(|i| self.protected_destinations(i, &[])).collect()
    }

    /// The data plane's view of peer `i` (a peer that left has no addresses).
    pub fn peer_spec(&self, i: usize) -> PeerSpec {
        let p = &self.peers[i];
        PeerSpec {
            node_id: p.cfg.node_id,
            host_addrs: if p.present { self.peer_host_addrs(i) } else { Vec::new() },
            prefixes: if p.present { p.cfg.prefixes.iter().chain(p.cfg.protected.iter()).chain(p.networks.iter()).copied().collect() } else { Vec::new() },
            link_local: p.links.local_v4.map(IpAddr::V4).into_iter().collect(),
            protected: if p.present { self.protected_destinations(i, &[]) } else { Vec::new() },
            inner_mtu: p.cfg.inner_mtu(),
            counters: p.counters.clone(),
        }
    }

    /// The data plane's view.
    pub fn dataplane_spec(&self) -> DataPlaneSpec {
        let n = &self.cfg.node;
        let mut local_dsts: Vec<IpNet> = Vec::new();
        local_dsts.extend(n.overlay_v4.map(|v| IpNet::from(IpAddr::V4(v.addr()))));
        local_dsts.extend(n.overlay_v6.map(|v| IpNet::from(IpAddr::V6(v.addr()))));
        local_dsts.extend(n.prefixes.iter().copied());
        // This node's link-local address is the same on every link.
        local_dsts.push(IpNet::from(IpAddr::V6(links::link_local_v6(&self.local))));
        DataPlaneSpec { local: self.local, local_dsts, peers: (0..self.peers.len()).map(|i| self.peer_spec(i)).collect(), node: self.node.clone(), egress: self.egress_spec() }
    }

    /// What the data plane lets leave the overlay here: the relay policy and this node's
    /// own networks and prefixes, when it offers exit or delivery ([`Model::egress`]).
    pub fn egress_spec(&self) -> Option<(crate::node::policy::Policy, Vec<IpNet>)> {
        let n = &self.cfg.node;
        self.egress().then(|| (n.policy.clone(), n.networks.iter().chain(n.prefixes.iter()).copied().collect()))
    }

    /// The kernel state detour wants: its TUNs up with the right MTU, their addresses, the
    /// routes of the overlay routing table in detour's own table, and the two policy rules.
    /// For each peer whose protection is on (`protect[i]`), its protected destinations are
    /// routed into the overlay too: its underlay addresses through its own TUN, its
    /// protected prefixes through the aggregate.
    pub fn desired_kernel(&self, protect: &[Option<Protect>]) -> DesiredState {
        self.desired_kernel_with(protect, &UnderlayHops::new())
    }

    /// The protected destinations of peer `i` that a split routes: its underlay addresses
    /// (configured and learned) and protected prefixes.
    pub fn split_destinations(&self, i: usize, pr: &Protect) -> Vec<IpNet> {
        let mut v: Vec<IpNet> = self.endpoint_ips(i).into_iter().map(IpNet::from).collect();
        for a in &pr.underlay {
            let n = IpNet::from(a.to_canonical());
            if !v.contains(&n) {
                v.push(n);
            }
        }
        v.extend(self.peers[i].cfg.protected.iter().copied());
        v.extend(self.peers[i].networks.iter().copied());
        v
    }

    /// The protection to put in the kernel now, given the protection `wanted`, the one
    /// `applied` at the previous pass and the (peer, destination) pairs whose connection
    /// pins are confirmed in netfilter (`pinned`).
    ///
    /// A split may reach the kernel only once the pin rules of all its destinations are in
    /// place: before them, a connection established on the direct path would follow
    /// whichever bucket of the nexthop group its next packet hashes to, and part of it
    /// would move to the overlay. Until then the peer keeps what was applied before (when
    /// that needed no pins, or its pins are still there) or else stays unprotected (its
    /// direct path). A wanted protection without a split (everything through the overlay)
    /// needs no pins and goes through at once.
    pub fn gate_splits(&self, wanted: &[Option<Protect>], applied: &[Option<Protect>], pinned: &HashSet<(usize, IpNet)>) -> Vec<Option<Protect>> {
        let ready = |i: usize, p: &Protect| p.split.is_none() || (i < self.peers.len() && self.split_destinations(i, p).into_iter().all(|d| pinned.contains(&(i, d))));
        wanted
            .iter()
            .enumerate()
            .map(|(i, w)| match w {
                Some(p) if !ready(i, p) => applied.get(i).cloned().flatten().filter(|a| ready(i, a)),
                other => other.clone(),
            })
            .collect()
    }

    /// [`Model::desired_kernel`] with the underlay routes of split destinations, for the
    /// nexthop groups of REPLEX splits: each destination with a known underlay route gets a
    /// resilient group of its direct next hop and the peer's TUN, weighted as the split
    /// says; destinations whose underlay route is not known yet keep the kernel's route.
    pub fn desired_kernel_with(&self, protect: &[Option<Protect>], hops: &UnderlayHops) -> DesiredState {
        let cfg = &self.cfg;
        let k = &cfg.kernel;
        let agg = k.aggregate_interface.clone();
        let own_v4 = cfg.node.overlay_v4.map(|v| IpAddr::V4(v.addr()));
        let own_v6 = cfg.node.overlay_v6.map(|v| IpAddr::V6(v.addr()));
        let src_for = |net: &IpNet| if net.addr().is_ipv4() { own_v4 } else { own_v6 };
        let mut s = DesiredState::default();
        s.links.insert(LinkSpec { name: agg.clone(), mtu: u32::from(cfg.aggregate_mtu()), up: true });
        if let Some(v4) = cfg.node.overlay_v4 {
            s.addrs.insert(AddrSpec { dev: agg.clone(), addr: IpAddr::V4(v4.addr()), prefix_len: v4.prefix_len() });
            s.routes.insert(RouteSpec { dst: IpNet::V4(v4.trunc()), dev: agg.clone(), src: own_v4, nhid: None, table: TABLE_MAIN });
        }
        if let Some(v6) = cfg.node.overlay_v6 {
            s.addrs.insert(AddrSpec { dev: agg.clone(), addr: IpAddr::V6(v6.addr()), prefix_len: v6.prefix_len() });
            s.routes.insert(RouteSpec { dst: IpNet::V6(v6.trunc()), dev: agg.clone(), src: own_v6, nhid: None, table: TABLE_MAIN });
        }
        let in_overlay = |a: &IpAddr| match a {
            IpAddr::V4(v) => cfg.node.overlay_v4.is_some_and(|n| n.contains(v)),
            IpAddr::V6(v) => cfg.node.overlay_v6.is_some_and(|n| n.contains(v)),
        };
        for (i, def) in self.peers.iter().enumerate() {
            if !def.present {
                continue;
            }
            let p = &def.cfg;
            let overlay = [p.overlay_v4.map(IpAddr::V4), p.overlay_v6.map(IpAddr::V6)];
            for net in &p.prefixes {
                s.routes.insert(RouteSpec { dst: *net, dev: agg.clone(), src: src_for(net), nhid: None, table: TABLE_MAIN });
            }
            if !def.tun {
                // Reached through the aggregate: its overlay addresses are inside the
                // overlay prefix, or get a host route.
                for a in overlay.into_iter().flatten().filter(|a| !in_overlay(a)) {
                    let dst = IpNet::from(a);
                    s.routes.insert(RouteSpec { dst, dev: agg.clone(), src: src_for(&dst), nhid: None, table: TABLE_MAIN });
                }
                continue;
            }
            let dev = p.interface.clone();
            let l = &def.links;
            s.links.insert(LinkSpec { name: dev.clone(), mtu: u32::from(p.inner_mtu()), up: true });
            s.addrs.insert(AddrSpec { dev: dev.clone(), addr: IpAddr::V6(l.local_v6), prefix_len: 64 });
            s.routes.insert(RouteSpec { dst: IpNet::V6(Ipv6Net::new("fe80::".parse().expect("literal"), 64).expect("64")), dev: dev.clone(), src: None, nhid: None, table: TABLE_MAIN });
            if let (Some(local), Some(remote)) = (l.local_v4, l.remote_v4) {
                s.addrs.insert(AddrSpec { dev: dev.clone(), addr: IpAddr::V4(local), prefix_len: 32 });
                s.routes.insert(RouteSpec { dst: IpNet::from(IpAddr::V4(remote)), dev: dev.clone(), src: Some(IpAddr::V4(local)), nhid: None, table: TABLE_MAIN });
            }
            for a in overlay.into_iter().flatten() {
                let dst = IpNet::from(a);
                s.routes.insert(RouteSpec { dst, dev: dev.clone(), src: src_for(&dst), nhid: None, table: TABLE_MAIN });
            }
            if let Some(Some(pr)) = protect.get(i).filter(|p| p.as_ref().is_some_and(|p| p.split.is_some())) {
                let (wd, wo) = pr.split.expect("checked");
                let src_of = |net: &IpNet| pr.src.iter().copied().find(|a| a.is_ipv4() == net.addr().is_ipv4());
                let k = &self.cfg.replex;
                let mut directs: Vec<(bool, Option<IpAddr>, String)> = Vec::new();
                for dst in self.split_destinations(i, pr) {
                    let Some((gw, via)) = hops.get(&dst) else { continue };
                    let v6 = dst.addr().is_ipv6();
                    let key = (v6, *gw, via.clone());
                    let n = match directs.iter().position(|d| *d == key) {
                        Some(n) => n,
                        None => {
                            directs.push(key);
                            directs.len() - 1
                        }
                    };
                    if n >= 32 {
                        continue;
                    }
                    let inst = self.cfg.node.instance;
                    let tun = nexthop_id(inst, i, u8::from(v6));
                    let direct = nexthop_id(inst, i, 0x10 + n as u8);
                    let group = nexthop_id(inst, i, 0x80 + n as u8);
                    s.nexthops.insert(NexthopSpec { id: tun, v6, kind: NexthopKind::Via { gw: None, dev: dev.clone() } });
                    s.nexthops.insert(NexthopSpec { id: direct, v6, kind: NexthopKind::Via { gw: *gw, dev: via.clone() } });
                    s.nexthops.insert(NexthopSpec {
                        id: group,
                        v6,
                        kind: NexthopKind::Resilient { members: vec![(direct, wd), (tun, wo)], buckets: k.kernel_buckets, idle_timer_s: k.flow_idle.as_secs() as u32 },
                    });
                    s.routes.insert(RouteSpec { dst, dev: String::new(), src: src_of(&dst), nhid: Some(group), table: TABLE_MAIN });
                    s.routes.insert(RouteSpec { dst, dev: dev.clone(), src: src_of(&dst), nhid: None, table: TABLE_PIN });
                }
            } else if let Some(Some(pr)) = protect.get(i) {
                let src_of = |net: &IpNet| pr.src.iter().copied().find(|a| a.is_ipv4() == net.addr().is_ipv4());
                let mut underlay: Vec<IpNet> = self.endpoint_ips(i).into_iter().map(IpNet::from).collect();
                underlay.extend(pr.underlay.iter().map(|a| IpNet::from(a.to_canonical())));
                for dst in underlay {
                    s.routes.insert(RouteSpec { dst, dev: dev.clone(), src: src_of(&dst), nhid: None, table: TABLE_MAIN });
                }
                for net in p.protected.iter().chain(def.networks.iter()) {
                    s.routes.insert(RouteSpec { dst: *net, dev: agg.clone(), src: src_of(net), nhid: None, table: TABLE_MAIN });
                }
            }
        }
        // Exits: routes through exit nodes; those that masquerade in the new-connections
        // table, which only new connections look up.
        for e in &self.exits {
            let Some(def) = self.peers.get(e.via).filter(|d| d.present && d.tun) else { continue };
            let table = if e.masquerade { TABLE_NEW } else { TABLE_MAIN };
            s.routes.insert(RouteSpec { dst: e.dst, dev: def.cfg.interface.clone(), src: e.src, nhid: None, table });
        }
        // An egress node: replies to connections that came in from the overlay go back into
        // it, to the node whose address or network they are for.
        let egress = self.egress();
        if egress {
            for (i, def) in self.peers.iter().enumerate().filter(|(_, d)| d.present) {
                let hosts = self.peer_host_addrs(i).into_iter().map(IpNet::from);
                for dst in hosts.chain(def.cfg.prefixes.iter().copied()).chain(def.networks.iter().copied()) {
                    s.routes.insert(RouteSpec { dst, dev: agg.clone(), src: None, nhid: None, table: TABLE_RETURN });
                }
            }
        }
        for v6 in [false, true] {
            s.rules.insert(RuleSpec { v6, priority: k.rule_priority, table: k.table, fwmark: k.fwmark, mask: u32::MAX, invert: true });
            if !cfg.exit.watch.is_empty() || !cfg.exit.always.is_empty() {
                s.rules.insert(RuleSpec { v6, priority: k.rule_priority.saturating_sub(2), table: k.table + TABLE_NEW, fwmark: CLASS_NEW, mask: CLASS_NEW, invert: false });
            }
            if egress {
                s.rules.insert(RuleSpec { v6, priority: k.rule_priority.saturating_sub(3), table: k.table + TABLE_RETURN, fwmark: CLASS_EGRESS, mask: CLASS_EGRESS, invert: false });
            }
            if cfg.splits() {
                // Connections pinned by a REPLEX split or the relief of a degraded path: to
                // the direct path (main), to the overlay (the pin table), ahead of detour's
                // table and its nexthop groups.
                let p = k.rule_priority.saturating_sub(1);
                s.rules.insert(RuleSpec { v6, priority: p, table: 254, fwmark: PIN_DIRECT, mask: PIN_MASK, invert: false });
                s.rules.insert(RuleSpec { v6, priority: p, table: k.table + TABLE_PIN, fwmark: PIN_OVERLAY, mask: PIN_MASK, invert: false });
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    fn model() -> Model {
        let bob = Identity::from_seed([2; 32]).public_key();
        let text = format!(
            r#"
[node]
name = "alice"
private_key = "/k"
overlay_ipv4 = "10.77.0.1/24"
overlay_ipv6 = "fd77::1/64"
prefixes = ["10.1.0.0/24"]
[[peer]]
name = "bob"
public_key = "{bob}"
overlay_ipv4 = "10.77.0.2"
overlay_ipv6 = "fd77::2"
prefixes = ["10.2.0.0/24"]
"#
        );
        let cfg = Config::parse(&text, "t").unwrap();
        Model::new(cfg, Identity::from_seed([1; 32]).node_id())
    }

    fn record(seed: u8, name: &str, v4: &str) -> NodeRecord {
        let id = Identity::from_seed([seed; 32]);
        NodeRecord {
            node_id: id.node_id(),
            public_key: id.public_key().to_string(),
            names: vec![crate::overlay::directory::Name { name: name.into(), since: 1 }],
            endpoints: vec!["192.0.2.9:7720".parse().unwrap()],
            overlay_v4: Some(v4.parse().unwrap()),
            overlay_v6: None,
            prefixes: vec![],
            relay: true,
            uptime: crate::overlay::directory::Uptime::Stable,
            networks: vec![],
            policy: None,
            neighbours: vec![],
            seq: 1,
            expires: u64::MAX,
        }
    }

    #[test]
    fn a_directory_node_gets_no_overlay_address_another_node_holds_until_that_one_leaves() {
        let mut m = model();
        let v4 = |m: &Model, seed: u8| m.index_of(&Identity::from_seed([seed; 32]).node_id()).and_then(|i| m.peers[i].cfg.overlay_v4);
        // bob (configured) holds 10.77.0.2; this node 10.77.0.1.
        assert!(matches!(m.learn(&record(7, "carol", "10.77.0.2")), Learned::New(_)));
        assert_eq!(v4(&m, 7), None, "bob's address");
        m.learn(&record(8, "dave", "10.77.0.1"));
        assert_eq!(v4(&m, 8), None, "this node's address");
        m.learn(&record(9, "erin", "10.77.0.9"));
        m.learn(&record(10, "frank", "10.77.0.9"));
        assert_eq!((v4(&m, 9), v4(&m, 10)), (Some("10.77.0.9".parse().unwrap()), None), "the first claim holds");
        // erin's record is learned again (unchanged): she keeps her own address.
        m.learn(&record(9, "erin", "10.77.0.9"));
        assert_eq!(v4(&m, 9), Some("10.77.0.9".parse().unwrap()));
        // erin moves away: frank may have it now; then erin leaves and comes back.
        m.learn(&record(9, "erin", "10.77.0.10"));
        m.learn(&record(10, "frank", "10.77.0.9"));
        assert_eq!(v4(&m, 10), Some("10.77.0.9".parse().unwrap()));
        m.forget(&Identity::from_seed([10; 32]).node_id());
        m.learn(&record(9, "erin", "10.77.0.9"));
        assert_eq!(v4(&m, 9), Some("10.77.0.9".parse().unwrap()), "frank left the directory");
        // Names and interface names stay unique.
        m.learn(&record(11, "erin", "10.77.0.11"));
        let names: std::collections::HashSet<&str> = m.peers.iter().map(|p| p.cfg.name.as_str()).collect();
        let ifs: std::collections::HashSet<&str> = m.peers.iter().map(|p| p.cfg.interface.as_str()).collect();
        assert_eq!((names.len(), ifs.len()), (m.peers.len(), m.peers.len()));
    }

    #[test]
    fn the_route_of_a_destination_is_the_most_specific_overlay_address_prefix_or_protected_destination() {
        let mut m = model();
        m.peers[0].cfg.protected = vec!["10.2.0.0/16".parse().unwrap(), "203.0.113.0/24".parse().unwrap()];
        let at = |m: &Model, a: &str, learned: &[Vec<IpAddr>]| m.route_of(a.parse().unwrap(), learned).map(|r| (r.peer, r.prefix.to_string(), r.kind));
        assert_eq!(at(&m, "10.77.0.2", &[]), Some((0, "10.77.0.2/32".into(), RouteKind::OverlayAddress)));
        assert_eq!(at(&m, "fd77::2", &[]), Some((0, "fd77::2/128".into(), RouteKind::OverlayAddress)));
        // the /24 prefix is more specific than the protected /16 around it
        assert_eq!(at(&m, "10.2.0.7", &[]), Some((0, "10.2.0.0/24".into(), RouteKind::Prefix)));
        assert_eq!(at(&m, "10.2.9.7", &[]), Some((0, "10.2.0.0/16".into(), RouteKind::Protected)));
        assert_eq!(at(&m, "::ffff:203.0.113.5", &[]), Some((0, "203.0.113.0/24".into(), RouteKind::Protected)));
        // an underlay address learned from the session is protected too
        assert_eq!(at(&m, "192.0.2.44", &[]), None);
        assert_eq!(at(&m, "192.0.2.44", &[vec!["192.0.2.44".parse().unwrap()]]), Some((0, "192.0.2.44/32".into(), RouteKind::Protected)));
        // a peer that left routes nothing
        m.peers[0].present = false;
        assert_eq!(at(&m, "10.77.0.2", &[]), None);
    }

    #[test]
    fn kernel_routes_mirror_the_overlay_table() {
        let m = model();
        let k = m.desired_kernel(&[None]);
        let has = |dst: &str, dev: &str| k.routes.iter().any(|r| r.dst == dst.parse::<IpNet>().unwrap() && r.dev == dev);
        assert!(has("10.77.0.0/24", "detour0"));
        assert!(has("fd77::/64", "detour0"));
        assert!(has("10.77.0.2/32", "dt-bob"));
        assert!(has("fd77::2/128", "dt-bob"));
        assert!(has("10.2.0.0/24", "detour0"));
        assert!(has("fe80::/64", "dt-bob"));
        // detour's table, and (relief of degraded paths is on by default) the two pin
        // rules, each for IPv4 and IPv6
        assert!(m.cfg.splits());
        assert_eq!(k.rules.len(), 6);
        // every kernel route through a TUN is also routable in the data plane
        let spec = m.dataplane_spec();
        let tx = crate::dataplane::TxState::new(&spec);
        for r in &k.routes {
            if r.dev == "detour0" && r.dst.prefix_len() < 32 && r.dst.addr().is_ipv4() && r.dst != "10.77.0.0/24".parse().unwrap() {
                assert_eq!(tx.route(r.dst.addr()), Some(0), "{r:?}");
            }
        }
        assert_eq!(tx.route("10.77.0.2".parse().unwrap()), Some(0));
    }

    #[test]
    fn protection_adds_routes_into_the_overlay_only_while_on() {
        let m = model();
        let off = m.desired_kernel(&[None]);
        let on = m.desired_kernel(&[Some(Protect { underlay: vec!["198.51.100.2".parse().unwrap()], src: vec!["192.0.2.1".parse().unwrap()], split: None })]);
        let added: Vec<&RouteSpec> = on.routes.difference(&off.routes).collect();
        assert_eq!(added.len(), 1, "{added:?}");
        assert_eq!(added[0].dst, "198.51.100.2/32".parse::<IpNet>().unwrap());
        assert_eq!(added[0].dev, "dt-bob");
        assert_eq!(added[0].src, Some("192.0.2.1".parse().unwrap()));
        // the kernel plan withdraws them again when protection ends
        let ops = crate::kernel::plan(&off, &on);
        assert_eq!(ops, vec![crate::kernel::KernelOp::DelRoute(added[0].clone())]);
    }

    #[test]
    fn a_replex_split_routes_protected_destinations_through_a_resilient_group() {
        let m = model();
        let pr = Protect { underlay: vec!["198.51.100.2".parse().unwrap()], src: vec!["192.0.2.1".parse().unwrap()], split: Some((200, 56)) };
        let mut hops = UnderlayHops::new();
        hops.insert("198.51.100.2/32".parse().unwrap(), (Some("192.0.2.254".parse().unwrap()), "eth0".into()));
        let k = m.desired_kernel_with(&[Some(pr.clone())], &hops);
        let r = k.routes.iter().find(|r| r.dst == "198.51.100.2/32".parse::<IpNet>().unwrap()).expect("a route for the split destination");
        let g = k.nexthops.iter().find(|n| Some(n.id) == r.nhid).expect("its group");
        let NexthopKind::Resilient { members, buckets, .. } = &g.kind else { panic!("{g:?}") };
        assert_eq!(*buckets, 1024);
        let direct = k.nexthops.iter().find(|n| n.id == members[0].0).unwrap();
        let tun = k.nexthops.iter().find(|n| n.id == members[1].0).unwrap();
        assert_eq!(direct.kind, NexthopKind::Via { gw: Some("192.0.2.254".parse().unwrap()), dev: "eth0".into() });
        assert_eq!(tun.kind, NexthopKind::Via { gw: None, dev: "dt-bob".into() });
        assert_eq!((members[0].1, members[1].1), (200, 56));
        assert_eq!(r.src, Some("192.0.2.1".parse().unwrap()));
        // new shares change only the group's weights: the kernel plan changes it in place
        let k2 = m.desired_kernel_with(&[Some(Protect { split: Some((100, 156)), ..pr })], &hops);
        let ops = crate::kernel::plan(&k2, &k);
        assert_eq!(ops.len(), 1, "{ops:?}");
        assert!(matches!(&ops[0], crate::kernel::KernelOp::SetNexthop(n) if n.id == g.id));
        // without a known underlay route the destination keeps the kernel's own route
        let k3 = m.desired_kernel_with(&[Some(Protect { underlay: vec![], src: vec![], split: Some((1, 1)) })], &UnderlayHops::new());
        assert!(k3.nexthops.is_empty());
    }

    #[test]
    fn a_split_reaches_the_kernel_only_after_its_connection_pins() {
        let m = model();
        let split = Protect { underlay: vec!["198.51.100.2".parse().unwrap(), "198.51.100.3".parse().unwrap()], src: vec![], split: Some((200, 56)) };
        let full = Protect { split: None, ..split.clone() };
        let dsts = m.split_destinations(0, &split);
        assert!(dsts.len() >= 2, "{dsts:?}");
        let mut pinned = HashSet::new();
        // no pins yet: the peer stays as it was (unprotected, or all through the overlay)
        assert_eq!(m.gate_splits(&[Some(split.clone())], &[None], &pinned), vec![None]);
        assert_eq!(m.gate_splits(&[Some(split.clone())], &[Some(full.clone())], &pinned), vec![Some(full.clone())]);
        // everything through the overlay needs no pins
        assert_eq!(m.gate_splits(&[Some(full.clone())], &[None], &pinned), vec![Some(full.clone())]);
        // some destinations pinned is not enough, pins of another peer do not count
        pinned.insert((0, dsts[0]));
        for d in &dsts[1..] {
            pinned.insert((1, *d));
        }
        assert_eq!(m.gate_splits(&[Some(split.clone())], &[None], &pinned), vec![None]);
        for d in &dsts {
            pinned.insert((0, *d));
        }
        assert_eq!(m.gate_splits(&[Some(split.clone())], &[None], &pinned), vec![Some(split.clone())]);
        // a new split whose pins are missing keeps the applied split whose pins are there
        let other = Protect { underlay: vec!["198.51.100.9".parse().unwrap()], ..split.clone() };
        assert_eq!(m.gate_splits(&[Some(other)], &[Some(split.clone())], &pinned), vec![Some(split)]);
        // unprotected stays unprotected
        assert_eq!(m.gate_splits(&[None], &[Some(full)], &pinned), vec![None]);
    }

    #[test]
    fn dataplane_accepts_own_addresses_only() {
        let spec = model().dataplane_spec();
        assert!(spec.local_dsts.contains(&"10.1.0.0/24".parse().unwrap()));
        assert!(spec.local_dsts.contains(&"10.77.0.1/32".parse().unwrap()));
        assert_eq!(spec.peers[0].host_addrs.len(), 4);
    }
}
