//! rtnetlink I/O: reads the kernel objects detour owns into a [`DesiredState`] and applies
//! [`KernelOp`]s. No `ip` commands are run. Routes are read with strict dump filtering, so
//! a router with a full BGP table in `main` costs nothing here.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use anyhow::{Context, Result};
use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{AfSpecInet6, AfSpecUnspec, In6AddrGenMode, LinkAttribute, LinkFlags};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{Handle, LinkUnspec};

use crate::kernel::{AddrSpec, DesiredState, KernelOp, LinkSpec, RouteSpec, RuleSpec, RTPROT_DETOUR};

/// What of the kernel's state belongs to this overlay instance ([`Netlink::observe`]): its
/// routing tables (`table` and the next [`crate::kernel::TABLES`] - 1), its rules (priorities
/// `rule_priority - 3 ..= rule_priority`) and its nexthop objects (by ID,
/// [`crate::node::model::nexthop_owner`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owned {
    /// `kernel.table`.
    pub table: u32,
    /// `kernel.rule_priority`.
    pub rule_priority: u32,
    /// `node.instance`.
    pub instance: u8,
}

impl Owned {
    /// This overlay's part of the kernel, from its configuration.
    pub fn of(cfg: &crate::config::Config) -> Owned {
        Owned { table: cfg.kernel.table, rule_priority: cfg.kernel.rule_priority, instance: cfg.node.instance }
    }
}

/// A route the kernel picked ([`Netlink::route_get`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelRoute {
    /// Output interface.
    pub dev: Option<String>,
    /// Gateway, when not on-link.
    pub gateway: Option<IpAddr>,
    /// Routing table it was found in.
    pub table: u32,
}

/// A netlink route socket (and one for nexthop objects, which rtnetlink does not cover).
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
    nexthops: std::sync::Arc<std::sync::Mutex<Option<crate::shell::nexthop::Nexthops>>>,
}

/// Interface name → index of the links detour looked at.
pub type IfIndex = HashMap<String, u32>;

fn family(v6: bool) -> AddressFamily {
    if v6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    }
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

impl Netlink {
    /// Opens the socket; the connection task runs on the current tokio runtime.
    ///
    /// # Errors
    /// If the netlink socket cannot be opened.
    pub fn connect() -> Result<Netlink> {
        let (conn, handle, _) = rtnetlink::new_connection_with_strict_check().context("opening a netlink socket")?;
        tokio::spawn(conn);
        Ok(Netlink { handle, nexthops: Default::default() })
    }

    /// Subscribes to the kernel's notifications of changes to links, addresses, routes,
    /// rules and nexthop objects of both families (what `ip monitor` shows): anything that
    /// can make the kernel differ from the state detour wants. Each item is one
    /// notification; the daemon only needs to know that something changed, and reconciles
    /// then instead of on a fixed tick (issue 11: a reconcile pass every 2 s, about 15
    /// netlink dumps, was a tenth of an idle node's CPU). Detour's own changes are notified
    /// too. The connection task runs on the current tokio runtime.
    ///
    /// # Errors
    /// If the netlink socket cannot be opened or joined to the groups.
    pub fn watch() -> Result<futures::channel::mpsc::UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, netlink_sys::SocketAddr)>> {
        use rtnetlink::MulticastGroup as G;
        let groups = [G::Link, G::Ipv4Ifaddr, G::Ipv6Ifaddr, G::Ipv4Route, G::Ipv6Route, G::Ipv4Rule, G::Ipv6Rule, G::Nexthop];
        let (conn, _handle, messages) = rtnetlink::new_multicast_connection(&groups).context("subscribing to kernel route and link changes")?;
        tokio::spawn(conn);
        Ok(messages)
    }

    async fn request(&self, msg: RouteNetlinkMessage, flags: u16) -> Result<Vec<RouteNetlinkMessage>, rtnetlink::Error> {
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = flags;
        let mut handle = self.handle.clone();
        let mut responses = handle.request(req)?;
        let mut out = Vec::new();
        use futures::StreamExt;
        while let Some(m) = responses.next().await {
            match m.payload {
                NetlinkPayload::Error(err) => return Err(rtnetlink::Error::NetlinkError(err)),
                NetlinkPayload::InnerMessage(inner) => out.push(inner),
                _ => {}
            }
        }
        Ok(out)
    }

    /// All links by name: (index, mtu, up).
    ///
    /// # Errors
    /// Netlink failures.
    pub async fn links(&self) -> Result<HashMap<String, (u32, u32, bool)>> {
        let mut out = HashMap::new();
        let mut links = self.handle.link().get().execute();
        while let Some(l) = links.try_next().await.context("listing links")? {
            let mut name = None;
            let mut mtu = 0;
            for a in &l.attributes {
                match a {
                    LinkAttribute::IfName(n) => name = Some(n.clone()),
                    LinkAttribute::Mtu(m) => mtu = *m,
                    _ => {}
                }
            }
            if let Some(n) = name {
                out.insert(n, (l.header.index, mtu, l.header.flags.contains(LinkFlags::Up)));
            }
        }
        Ok(out)
    }

    /// Every address on every interface of this host (including detour's own).
    ///
    /// # Errors
    /// Netlink failures.
    pub async fn all_addresses(&self) -> Result<Vec<IpAddr>> {
        let mut out = Vec::new();
        let mut addrs = self.handle.address().get().execute();
        while let Some(a) = addrs.try_next().await.context("listing addresses")? {
            for attr in &a.attributes {
                if let AddressAttribute::Local(ip) | AddressAttribute::Address(ip) = attr {
                    if !out.contains(ip) {
                        out.push(*ip);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Runs `f` on the nexthop socket on a blocking thread: the socket is a plain netlink
    /// socket (rtnetlink has no nexthop messages) that waits up to 2 s for an answer, which
    /// must not stall the daemon's loop.
    async fn with_nexthops<T: Send + 'static>(&self, f: impl FnOnce(&mut crate::shell::nexthop::Nexthops) -> Result<T> + Send + 'static) -> Result<T> {
        let nexthops = self.nexthops.clone();
        tokio::task::spawn_blocking(move || {
            let mut g = nexthops.lock().unwrap_or_else(|e| e.into_inner());
            if g.is_none() {
                *g = Some(crate::shell::nexthop::Nexthops::open()?);
            }
            let r = f(g.as_mut().expect("opened"));
            if r.is_err() {
                // A broken socket is reopened next time.
                *g = None;
            }
            r
        })
        .await
        .map_err(|e| anyhow::anyhow!("nexthop socket thread: {e}"))?
    }

    /// The route the kernel would use to `dst` for detour's own (marked) packets, which
    /// bypass detour's table: the underlay route, as (gateway, output interface name).
    ///
    /// # Errors
    /// Netlink failures; `Ok(None)` when there is no route.
    pub async fn underlay_route(&self, dst: IpAddr, fwmark: u32) -> Result<Option<(Option<IpAddr>, String)>> {
        Ok(self.route_get(dst, Some(fwmark)).await?.and_then(|r| r.dev.map(|d| (r.gateway, d))))
    }

    /// The route the kernel picks for a packet to `dst` (with firewall mark `mark`, or
    /// none: what an application's packet gets), as `ip route get` shows it.
    ///
    /// # Errors
    /// Netlink failures; `Ok(None)` when there is no route.
    pub async fn route_get(&self, dst: IpAddr, mark: Option<u32>) -> Result<Option<KernelRoute>> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = family(dst.is_ipv6());
        msg.header.destination_prefix_length = if dst.is_ipv6() { 128 } else { 32 };
        msg.attributes.push(RouteAttribute::Destination(RouteAddress::from(dst)));
        if let Some(m) = mark {
            msg.attributes.push(RouteAttribute::Mark(m));
        }
        let answer = match self.request(RouteNetlinkMessage::GetRoute(msg), NLM_F_REQUEST).await {
            Ok(a) => a,
            Err(e) if matches!(errno(&e), Some(libc::ENETUNREACH) | Some(libc::EHOSTUNREACH)) => return Ok(None),
            Err(e) => return Err(anyhow::anyhow!("route to {dst}: {e}")),
        };
        let links = self.links().await?;
        for m in answer {
            if let RouteNetlinkMessage::NewRoute(r) = m {
                let mut route = KernelRoute { table: u32::from(r.header.table), ..Default::default() };
                let mut oif = None;
                for a in &r.attributes {
                    match a {
                        RouteAttribute::Gateway(RouteAddress::Inet(ip)) => route.gateway = Some(IpAddr::V4(*ip)),
                        RouteAttribute::Gateway(RouteAddress::Inet6(ip)) => route.gateway = Some(IpAddr::V6(*ip)),
                        RouteAttribute::Oif(i) => oif = Some(*i),
                        RouteAttribute::Table(t) => route.table = *t,
                        _ => {}
                    }
                }
                route.dev = oif.and_then(|i| links.iter().find(|(_, (idx, _, _))| *idx == i).map(|(n, _)| n.clone()));
                return Ok(Some(route));
            }
        }
        Ok(None)
    }

    /// Reads what detour owns in the kernel: the named links, their addresses, the routes in
    /// `table` tagged with detour's protocol, and every rule tagged with it.
    ///
    /// # Errors
    /// Netlink failures.
    pub async fn observe(&self, names: &BTreeSet<String>, own: Owned) -> Result<(DesiredState, IfIndex)> {
        let table = own.table;
        let mut s = DesiredState::default();
        let mut index = IfIndex::new();
        let mut by_index = HashMap::new();
        // Every interface is indexed (nexthops name underlay devices), but only detour's
        // own links, with their addresses, are part of the observed state: the plan must
        // never touch an address it did not create.
        for (name, (idx, mtu, up)) in self.links().await? {
            index.insert(name.clone(), idx);
            if names.contains(&name) {
                s.links.insert(LinkSpec { name: name.clone(), mtu, up });
                by_index.insert(idx, name);
            }
        }
        let mut addrs = self.handle.address().get().execute();
        while let Some(a) = addrs.try_next().await.context("listing addresses")? {
            let Some(dev) = by_index.get(&a.header.index) else { continue };
            let mut addr = None;
            for attr in &a.attributes {
                match attr {
                    AddressAttribute::Local(ip) => addr = Some(*ip),
                    AddressAttribute::Address(ip) if addr.is_none() => addr = Some(*ip),
                    _ => {}
                }
            }
            if let Some(addr) = addr {
                s.addrs.insert(AddrSpec { dev: dev.clone(), addr, prefix_len: a.header.prefix_len });
            }
        }
        for (tbl, offset) in (0..crate::kernel::TABLES).map(|o| (table + o, o)) {
            for v6 in [false, true] {
                let mut msg = RouteMessage::default();
                msg.header.address_family = family(v6);
                msg.header.protocol = RouteProtocol::from(RTPROT_DETOUR);
                msg.attributes.push(RouteAttribute::Table(tbl));
                let routes = self.request(RouteNetlinkMessage::GetRoute(msg), NLM_F_REQUEST | NLM_F_DUMP).await.context("listing routes")?;
                for r in routes {
                    if let RouteNetlinkMessage::NewRoute(r) = r {
                        if let Some(mut spec) = route_spec(&r, tbl, &by_index) {
                            spec.table = offset;
                            s.routes.insert(spec);
                        }
                    }
                }
            }
        }
        // Only this overlay instance's rules and nexthops: the other overlays of the host
        // tag theirs with the same protocol.
        s.rules = self.rules().await?.into_iter().filter(|r| (own.rule_priority.saturating_sub(3)..=own.rule_priority).contains(&r.priority)).collect();
        let all: HashMap<u32, String> = self.links().await?.into_iter().map(|(n, (i, _, _))| (i, n)).collect();
        match self.with_nexthops(move |nh| nh.dump(&all)).await {
            Ok(list) => s.nexthops.extend(list.into_iter().filter(|n| crate::node::model::nexthop_owner(n.id) == Some(own.instance))),
            Err(e) => tracing::debug!("listing nexthops: {e:#}"),
        }
        Ok((s, index))
    }

    /// Every rule tagged with detour's protocol.
    ///
    /// # Errors
    /// Netlink failures.
    pub async fn rules(&self) -> Result<BTreeSet<RuleSpec>> {
        let mut out = BTreeSet::new();
        for v6 in [false, true] {
            let version = if v6 { rtnetlink::IpVersion::V6 } else { rtnetlink::IpVersion::V4 };
            let mut rules = self.handle.rule().get(version).execute();
            while let Some(r) = rules.try_next().await.context("listing rules")? {
                let (mut prio, mut tbl, mut mark, mut mask, mut proto) = (0, u32::from(r.header.table), 0, u32::MAX, 0u8);
                for a in &r.attributes {
                    match a {
                        RuleAttribute::Priority(p) => prio = *p,
                        RuleAttribute::Table(t) => tbl = *t,
                        RuleAttribute::FwMark(m) => mark = *m,
                        RuleAttribute::FwMask(m) => mask = *m,
                        RuleAttribute::Protocol(p) => proto = u8::from(*p),
                        _ => {}
                    }
                }
                if proto == RTPROT_DETOUR {
                    let invert = r.header.flags.contains(RuleFlags::Invert);
                    out.insert(RuleSpec { v6, priority: prio, table: tbl, fwmark: mark, mask, invert });
                }
            }
        }
        Ok(out)
    }

    /// Applies one change. Adding what exists or deleting what is gone counts as done.
    ///
    /// # Errors
    /// Netlink failures, with the operation in the message.
    pub async fn apply(&self, op: &KernelOp, table: u32, index: &IfIndex) -> Result<()> {
        let idx = |dev: &str| index.get(dev).copied().with_context(|| format!("interface {dev} does not exist"));
        let res = match op {
            KernelOp::SetLink(l) => {
                let index = idx(&l.name)?;
                // No kernel-generated IPv6 link-local address: detour sets its own. This must
                // happen before the link goes up; it fails harmlessly where IPv6 is off.
                let mut gen = LinkUnspec::new_with_index(index).build();
                gen.attributes.push(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(vec![AfSpecInet6::AddrGenMode(In6AddrGenMode::None)])]));
                if let Err(e) = self.handle.link().set(gen).execute().await {
                    tracing::debug!("{}: addr_gen_mode none: {e}", l.name);
                }
                let msg = LinkUnspec::new_with_index(index).mtu(l.mtu).up().build();
                self.handle.link().set(msg).execute().await
            }
            KernelOp::AddAddr(a) => {
                let mut req = self.handle.address().add(idx(&a.dev)?, a.addr, a.prefix_len);
                let mut flags = AddressFlags::Noprefixroute;
                if a.addr.is_ipv6() {
                    flags |= AddressFlags::Nodad;
                }
                req.message_mut().attributes.push(AddressAttribute::Flags(flags));
                req.replace().execute().await
            }
            KernelOp::DelAddr(a) => {
                let mut msg = AddressMessage::default();
                msg.header.family = family(a.addr.is_ipv6());
                msg.header.prefix_len = a.prefix_len;
                msg.header.index = idx(&a.dev)?;
                msg.attributes.push(AddressAttribute::Local(a.addr));
                if a.addr.is_ipv6() {
                    msg.attributes.clear();
                    msg.attributes.push(AddressAttribute::Address(a.addr));
                }
                self.handle.address().del(msg).execute().await
            }
            KernelOp::AddRoute(r) => {
                let v6 = r.dst.addr().is_ipv6();
                let oif = if r.nhid.is_some() { 0 } else { idx(&r.dev)? };
                let msg = route_message(r, table + r.table, oif);
                // IPv6 keeps device routes to the same prefix side by side (fe80::/64 on
                // every per-peer link); IPv4 must not, so it asks for exclusivity.
                let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | if v6 { 0 } else { NLM_F_EXCL };
                self.request(RouteNetlinkMessage::NewRoute(msg), flags).await.map(|_| ())
            }
            KernelOp::DelRoute(r) => {
                let oif = index.get(&r.dev).copied().unwrap_or(0);
                let msg = route_message(r, table + r.table, oif);
                self.request(RouteNetlinkMessage::DelRoute(msg), NLM_F_REQUEST | NLM_F_ACK).await.map(|_| ())
            }
            KernelOp::AddRule(r) => self.request(RouteNetlinkMessage::NewRule(rule_message(r)), NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL).await.map(|_| ()),
            KernelOp::DelRule(r) => self.request(RouteNetlinkMessage::DelRule(rule_message(r)), NLM_F_REQUEST | NLM_F_ACK).await.map(|_| ()),
            KernelOp::SetNexthop(n) => {
                let (n, index) = (n.clone(), index.clone());
                return self.with_nexthops(move |nh| nh.set(&n, &index)).await;
            }
            KernelOp::DelNexthop(n) => {
                let id = n.id;
                return self.with_nexthops(move |nh| nh.delete(id)).await;
            }
        };
        match res {
            Ok(()) => Ok(()),
            Err(e) if matches!(op, KernelOp::AddAddr(_) | KernelOp::AddRoute(_) | KernelOp::AddRule(_)) && errno(&e) == Some(libc::EEXIST) => Ok(()),
            Err(e)
                if matches!(op, KernelOp::DelAddr(_) | KernelOp::DelRoute(_) | KernelOp::DelRule(_))
                    && matches!(errno(&e), Some(libc::ESRCH) | Some(libc::ENOENT) | Some(libc::EADDRNOTAVAIL) | Some(libc::ENODEV)) =>
            {
                Ok(())
            }
            Err(e) => Err(anyhow::anyhow!("{op:?}: {e}")),
        }
    }
}

fn route_message(r: &RouteSpec, table: u32, oif: u32) -> RouteMessage {
    let mut msg = RouteMessage::default();
    let v6 = r.dst.addr().is_ipv6();
    msg.header = RouteHeader {
        address_family: family(v6),
        destination_prefix_length: r.dst.prefix_len(),
        table: if table < 256 { table as u8 } else { 0 },
        protocol: RouteProtocol::from(RTPROT_DETOUR),
        scope: RouteScope::Link,
        kind: RouteType::Unicast,
        ..Default::default()
    };
    msg.attributes.push(RouteAttribute::Table(table));
    msg.attributes.push(RouteAttribute::Destination(RouteAddress::from(r.dst.addr())));
    if oif != 0 {
        msg.attributes.push(RouteAttribute::Oif(oif));
    }
    if let Some(src) = r.src {
        msg.attributes.push(RouteAttribute::PrefSource(RouteAddress::from(src)));
    }
    if let Some(id) = r.nhid {
        msg.header.scope = RouteScope::Universe;
        msg.attributes.retain(|a| !matches!(a, RouteAttribute::Oif(_)));
        msg.attributes.push(RouteAttribute::NhId(id));
    }
    msg
}

fn route_spec(r: &RouteMessage, table: u32, by_index: &HashMap<u32, String>) -> Option<RouteSpec> {
    let mut dst = None;
    let mut oif = None;
    let mut src = None;
    let mut nhid = None;
    let mut tbl = u32::from(r.header.table);
    for a in &r.attributes {
        match a {
            RouteAttribute::NhId(id) => nhid = Some(*id),
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = Some(IpAddr::V4(*ip)),
            RouteAttribute::Destination(RouteAddress::Inet6(ip)) => dst = Some(IpAddr::V6(*ip)),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::PrefSource(RouteAddress::Inet(ip)) => src = Some(IpAddr::V4(*ip)),
            RouteAttribute::PrefSource(RouteAddress::Inet6(ip)) => src = Some(IpAddr::V6(*ip)),
            RouteAttribute::Table(t) => tbl = *t,
            _ => {}
        }
    }
    if tbl != table || u8::from(r.header.protocol) != RTPROT_DETOUR {
        return None;
    }
    let dst = dst.unwrap_or(if r.header.address_family == AddressFamily::Inet6 { IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED) } else { IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED) });
    let dst = IpNet::new(dst, r.header.destination_prefix_length).ok()?;
    // A route through an interface that is not ours (or gone) is stale: name it so that
    // the plan deletes it.
    if nhid.is_some() {
        return Some(RouteSpec { dst, dev: String::new(), src, nhid, table: crate::kernel::TABLE_MAIN });
    }
    let dev = oif.and_then(|i| by_index.get(&i).cloned()).unwrap_or_else(|| format!("#{}", oif.unwrap_or(0)));
    Some(RouteSpec { dst, dev, src, nhid: None, table: crate::kernel::TABLE_MAIN })
}

fn rule_message(r: &RuleSpec) -> RuleMessage {
    let mut msg = RuleMessage::default();
    msg.header.family = family(r.v6);
    msg.header.table = if r.table < 256 { r.table as u8 } else { 0 };
    msg.header.action = RuleAction::ToTable;
    if r.invert {
        msg.header.flags = RuleFlags::Invert;
    }
    msg.attributes.push(RuleAttribute::Priority(r.priority));
    msg.attributes.push(RuleAttribute::FwMark(r.fwmark));
    msg.attributes.push(RuleAttribute::FwMask(r.mask));
    msg.attributes.push(RuleAttribute::Table(r.table));
    msg.attributes.push(RuleAttribute::Protocol(RouteProtocol::from(RTPROT_DETOUR)));
    msg
}
