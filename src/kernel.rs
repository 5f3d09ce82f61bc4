//! Kernel routing state as data, and the reconcile plan (spec A§2.1.2, A§3.4; seeds-digest
//! items 43 and 65: "keep the IP routing tables and the overlay routing tables consistent").
//!
//! [`DesiredState`] is what detour wants in the kernel: links (MTU, up), addresses, routes
//! in detour's own table and policy rules. The shell reads the [`DesiredState`] that is
//! actually there (only objects detour owns: its table, rules tagged with its protocol,
//! addresses on its own interfaces), and [`plan`] computes the operations that make the
//! kernel match: deletions first, then additions, so it is idempotent and repairs what
//! someone else removed or changed. Nothing here does I/O.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;

/// Route protocol number that tags detour's routes and rules (`ip route show proto 157`).
pub const RTPROT_DETOUR: u8 = 157;

/// An interface detour owns.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LinkSpec {
    /// Interface name.
    pub name: String,
    /// MTU in bytes.
    pub mtu: u32,
    /// Administratively up.
    pub up: bool,
}

/// An address on one of detour's interfaces (always without a kernel prefix route; detour
/// installs its own routes in its table).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AddrSpec {
    /// Interface name.
    pub dev: String,
    /// The address.
    pub addr: IpAddr,
    /// Prefix length.
    pub prefix_len: u8,
}

/// A unicast route in detour's table, through one of its interfaces.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteSpec {
    /// Destination prefix.
    pub dst: IpNet,
    /// Output interface name.
    pub dev: String,
    /// Preferred source address.
    pub src: Option<IpAddr>,
}

/// A policy rule: `priority P not fwmark M lookup T` (the wg-quick pattern), so that
/// packets of detour's own sockets never enter detour's routes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleSpec {
    /// IPv6 (true) or IPv4 rule.
    pub v6: bool,
    /// Rule priority.
    pub priority: u32,
    /// Table looked up.
    pub table: u32,
    /// Firewall mark that skips the table.
    pub fwmark: u32,
}

/// A complete kernel state (desired or observed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredState {
    /// Interfaces.
    pub links: BTreeSet<LinkSpec>,
    /// Addresses.
    pub addrs: BTreeSet<AddrSpec>,
    /// Routes in detour's table.
    pub routes: BTreeSet<RouteSpec>,
    /// Policy rules.
    pub rules: BTreeSet<RuleSpec>,
}

/// One change to the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelOp {
    /// Set MTU and bring an interface up.
    SetLink(LinkSpec),
    /// Remove an address.
    DelAddr(AddrSpec),
    /// Add an address.
    AddAddr(AddrSpec),
    /// Remove a route from detour's table.
    DelRoute(RouteSpec),
    /// Add a route to detour's table.
    AddRoute(RouteSpec),
    /// Remove a rule.
    DelRule(RuleSpec),
    /// Add a rule.
    AddRule(RuleSpec),
}

/// The operations that turn `actual` into `desired`: link settings first, then deletions,
/// then additions. Links that are missing entirely are not created here (TUNs are created
/// by opening them); their addresses and routes wait until they exist.
pub fn plan(desired: &DesiredState, actual: &DesiredState) -> Vec<KernelOp> {
    let mut ops = Vec::new();
    let present: BTreeSet<&str> = actual.links.iter().map(|l| l.name.as_str()).collect();
    for l in &desired.links {
        if present.contains(l.name.as_str()) && !actual.links.contains(l) {
            ops.push(KernelOp::SetLink(l.clone()));
        }
    }
    for r in actual.rules.difference(&desired.rules) {
        ops.push(KernelOp::DelRule(r.clone()));
    }
    for r in actual.routes.difference(&desired.routes) {
        ops.push(KernelOp::DelRoute(r.clone()));
    }
    for a in actual.addrs.difference(&desired.addrs) {
        ops.push(KernelOp::DelAddr(a.clone()));
    }
    for a in desired.addrs.difference(&actual.addrs) {
        if present.contains(a.dev.as_str()) {
            ops.push(KernelOp::AddAddr(a.clone()));
        }
    }
    for r in desired.routes.difference(&actual.routes) {
        if present.contains(r.dev.as_str()) {
            ops.push(KernelOp::AddRoute(r.clone()));
        }
    }
    for r in desired.rules.difference(&actual.rules) {
        ops.push(KernelOp::AddRule(r.clone()));
    }
    ops
}

/// The state to remove on shutdown: everything in `actual` except links (TUNs vanish when
/// their file descriptors close).
pub fn teardown(actual: &DesiredState) -> Vec<KernelOp> {
    plan(&DesiredState { links: actual.links.clone(), ..Default::default() }, actual)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(dst: &str, dev: &str) -> RouteSpec {
        RouteSpec { dst: dst.parse().unwrap(), dev: dev.into(), src: None }
    }

    fn state() -> DesiredState {
        let mut s = DesiredState::default();
        s.links.insert(LinkSpec { name: "detour0".into(), mtu: 1388, up: true });
        s.links.insert(LinkSpec { name: "dt-b".into(), mtu: 1388, up: true });
        s.addrs.insert(AddrSpec { dev: "detour0".into(), addr: "10.77.0.1".parse().unwrap(), prefix_len: 24 });
        s.routes.insert(route("10.77.0.0/24", "detour0"));
        s.routes.insert(route("10.77.0.2/32", "dt-b"));
        s.rules.insert(RuleSpec { v6: false, priority: 7720, table: 7720, fwmark: 0xd7 });
        s
    }

    #[test]
    fn converged_state_plans_nothing() {
        assert!(plan(&state(), &state()).is_empty());
    }

    #[test]
    fn repairs_removed_and_foreign_changes() {
        let desired = state();
        let mut actual = state();
        actual.routes.remove(&route("10.77.0.2/32", "dt-b"));
        actual.routes.insert(route("10.77.0.2/32", "detour0"));
        actual.rules.clear();
        actual.links.remove(&LinkSpec { name: "dt-b".into(), mtu: 1388, up: true });
        actual.links.insert(LinkSpec { name: "dt-b".into(), mtu: 1500, up: false });
        let ops = plan(&desired, &actual);
        assert_eq!(
            ops,
            vec![
                KernelOp::SetLink(LinkSpec { name: "dt-b".into(), mtu: 1388, up: true }),
                KernelOp::DelRoute(route("10.77.0.2/32", "detour0")),
                KernelOp::AddRoute(route("10.77.0.2/32", "dt-b")),
                KernelOp::AddRule(RuleSpec { v6: false, priority: 7720, table: 7720, fwmark: 0xd7 }),
            ]
        );
        // applying the plan to the model converges
        let mut after = actual.clone();
        for op in ops {
            match op {
                KernelOp::SetLink(l) => {
                    after.links.retain(|x| x.name != l.name);
                    after.links.insert(l);
                }
                KernelOp::DelRoute(r) => {
                    after.routes.remove(&r);
                }
                KernelOp::AddRoute(r) => {
                    after.routes.insert(r);
                }
                KernelOp::AddRule(r) => {
                    after.rules.insert(r);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(after, desired);
    }

    #[test]
    fn waits_for_missing_links() {
        let desired = state();
        let mut actual = DesiredState::default();
        actual.links.insert(LinkSpec { name: "detour0".into(), mtu: 1388, up: true });
        let ops = plan(&desired, &actual);
        assert!(ops.iter().all(|op| !matches!(op, KernelOp::AddRoute(r) if r.dev == "dt-b")));
        assert!(ops.contains(&KernelOp::AddRoute(route("10.77.0.0/24", "detour0"))));
    }

    #[test]
    fn teardown_removes_everything_but_links() {
        let ops = teardown(&state());
        assert_eq!(ops.len(), 4);
        assert!(ops.iter().all(|o| matches!(o, KernelOp::DelRoute(_) | KernelOp::DelAddr(_) | KernelOp::DelRule(_))));
    }
}
