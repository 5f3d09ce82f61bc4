//! The node's overlay model: the validated configuration plus this node's identity, and the
//! two views derived from it — the data plane's ([`Model::dataplane_spec`]) and the
//! kernel's ([`Model::desired_kernel`]). Both come from this one place, so the overlay
//! routing table and the kernel routes cannot disagree (seeds-digest items 43, 65).

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::{IpNet, Ipv6Net};

use crate::config::Config;
use crate::dataplane::{DataPlaneSpec, NodeCounters, PeerCounters, PeerSpec};
use crate::identity::NodeId;
use crate::kernel::{AddrSpec, DesiredState, LinkSpec, RouteSpec, RuleSpec};
use crate::links::{self, LinkAddrs};

/// Protection of one peer's destinations, as the failover engine decided it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Protect {
    /// The peer's underlay addresses in use (learned from its sessions).
    pub underlay: Vec<IpAddr>,
    /// This node's underlay address towards the peer, used as the preferred source of the
    /// rerouted routes so that new connections keep the address they would have had.
    pub src: Vec<IpAddr>,
}

/// Configuration, identity and derived link addresses.
#[derive(Debug, Clone)]
pub struct Model {
    /// The validated configuration.
    pub cfg: Config,
    /// This node's ID.
    pub local: NodeId,
    /// Link addresses per peer (config order).
    pub links: Vec<LinkAddrs>,
    /// Problems worth a warning at start (e.g. link address collisions).
    pub warnings: Vec<String>,
}

impl Model {
    /// Derives the model; pure.
    pub fn new(cfg: Config, local: NodeId) -> Model {
        let mut in_use: Vec<IpAddr> = Vec::new();
        if let Some(v4) = cfg.node.overlay_v4 {
            in_use.push(IpAddr::V4(v4.addr()));
        }
        in_use.extend(cfg.peers.iter().filter_map(|p| p.overlay_v4.map(IpAddr::V4)));
        let ids: Vec<(String, NodeId)> = cfg.peers.iter().map(|p| (p.name.clone(), p.node_id)).collect();
        let (links, warnings) = links::plan(&local, &ids, cfg.kernel.link_pool_v4, &in_use);
        Model { cfg, local, links, warnings }
    }

    /// Addresses that belong to peer `i` itself (overlay and link addresses, and the
    /// literal addresses of its endpoints); packets from them arrive on its own TUN.
    pub fn peer_host_addrs(&self, i: usize) -> Vec<IpAddr> {
        let p = &self.cfg.peers[i];
        let l = &self.links[i];
        let mut v: Vec<IpAddr> = Vec::new();
        v.extend(p.overlay_v4.map(IpAddr::V4));
        v.extend(p.overlay_v6.map(IpAddr::V6));
        v.extend(l.remote_v4.map(IpAddr::V4));
        v.push(IpAddr::V6(l.remote_v6));
        v.extend(self.endpoint_ips(i));
        v
    }

    /// The literal IP addresses among peer `i`'s configured endpoints.
    pub fn endpoint_ips(&self, i: usize) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = Vec::new();
        for e in &self.cfg.peers[i].endpoints {
            if let crate::config::Endpoint::Addr(a) = e {
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
        v.extend(self.cfg.peers[i].protected.iter().copied());
        v
    }

    /// The data plane's view, with fresh counters.
    pub fn dataplane_spec(&self) -> DataPlaneSpec {
        let n = &self.cfg.node;
        let mut local_dsts: Vec<IpNet> = Vec::new();
        local_dsts.extend(n.overlay_v4.map(|v| IpNet::from(IpAddr::V4(v.addr()))));
        local_dsts.extend(n.overlay_v6.map(|v| IpNet::from(IpAddr::V6(v.addr()))));
        local_dsts.extend(n.prefixes.iter().copied());
        for l in &self.links {
            local_dsts.extend(l.local_v4.map(|a| IpNet::from(IpAddr::V4(a))));
            local_dsts.push(IpNet::from(IpAddr::V6(l.local_v6)));
        }
        DataPlaneSpec {
            local: self.local,
            local_dsts,
            peers: self
                .cfg
                .peers
                .iter()
                .enumerate()
                .map(|(i, p)| PeerSpec {
                    node_id: p.node_id,
                    host_addrs: self.peer_host_addrs(i),
                    prefixes: p.prefixes.iter().chain(p.protected.iter()).copied().collect(),
                    inner_mtu: p.inner_mtu(),
                    counters: Arc::new(PeerCounters::default()),
                })
                .collect(),
            node: Arc::new(NodeCounters::default()),
        }
    }

    /// The kernel state detour wants: its TUNs up with the right MTU, their addresses, the
    /// routes of the overlay routing table in detour's own table, and the two policy rules.
    /// For each peer whose protection is on (`protect[i]`), its protected destinations are
    /// routed into the overlay too: its underlay addresses through its own TUN, its
    /// protected prefixes through the aggregate.
    pub fn desired_kernel(&self, protect: &[Option<Protect>]) -> DesiredState {
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
            s.routes.insert(RouteSpec { dst: IpNet::V4(v4.trunc()), dev: agg.clone(), src: own_v4 });
        }
        if let Some(v6) = cfg.node.overlay_v6 {
            s.addrs.insert(AddrSpec { dev: agg.clone(), addr: IpAddr::V6(v6.addr()), prefix_len: v6.prefix_len() });
            s.routes.insert(RouteSpec { dst: IpNet::V6(v6.trunc()), dev: agg.clone(), src: own_v6 });
        }
        for (i, p) in cfg.peers.iter().enumerate() {
            let dev = p.interface.clone();
            let l = &self.links[i];
            s.links.insert(LinkSpec { name: dev.clone(), mtu: u32::from(p.inner_mtu()), up: true });
            s.addrs.insert(AddrSpec { dev: dev.clone(), addr: IpAddr::V6(l.local_v6), prefix_len: 64 });
            s.routes.insert(RouteSpec {
                dst: IpNet::V6(Ipv6Net::new("fe80::".parse().expect("literal"), 64).expect("64")),
                dev: dev.clone(),
                src: None,
            });
            if let (Some(local), Some(remote)) = (l.local_v4, l.remote_v4) {
                s.addrs.insert(AddrSpec { dev: dev.clone(), addr: IpAddr::V4(local), prefix_len: 32 });
                s.routes.insert(RouteSpec { dst: IpNet::from(IpAddr::V4(remote)), dev: dev.clone(), src: Some(IpAddr::V4(local)) });
            }
            for a in [p.overlay_v4.map(IpAddr::V4), p.overlay_v6.map(IpAddr::V6)].into_iter().flatten() {
                let dst = IpNet::from(a);
                s.routes.insert(RouteSpec { dst, dev: dev.clone(), src: src_for(&dst) });
            }
            for net in &p.prefixes {
                s.routes.insert(RouteSpec { dst: *net, dev: agg.clone(), src: src_for(net) });
            }
            if let Some(Some(pr)) = protect.get(i) {
                let src_of = |net: &IpNet| pr.src.iter().copied().find(|a| a.is_ipv4() == net.addr().is_ipv4());
                let mut underlay: Vec<IpNet> = self.endpoint_ips(i).into_iter().map(IpNet::from).collect();
                underlay.extend(pr.underlay.iter().map(|a| IpNet::from(a.to_canonical())));
                for dst in underlay {
                    s.routes.insert(RouteSpec { dst, dev: dev.clone(), src: src_of(&dst) });
                }
                for net in &p.protected {
                    s.routes.insert(RouteSpec { dst: *net, dev: agg.clone(), src: src_of(net) });
                }
            }
        }
        for v6 in [false, true] {
            s.rules.insert(RuleSpec { v6, priority: k.rule_priority, table: k.table, fwmark: k.fwmark });
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
        assert_eq!(k.rules.len(), 2);
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
        let on = m.desired_kernel(&[Some(Protect { underlay: vec!["198.51.100.2".parse().unwrap()], src: vec!["192.0.2.1".parse().unwrap()] })]);
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
    fn dataplane_accepts_own_addresses_only() {
        let spec = model().dataplane_spec();
        assert!(spec.local_dsts.contains(&"10.1.0.0/24".parse().unwrap()));
        assert!(spec.local_dsts.contains(&"10.77.0.1/32".parse().unwrap()));
        assert_eq!(spec.peers[0].host_addrs.len(), 4);
    }
}
