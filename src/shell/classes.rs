//! Traffic classes and egress NAT in netfilter (spec A§3.6, seeds-digest items 70-73):
//!
//! * **New connections** (`[exit]` set): chain `DETOUR-CLASS` (mangle `OUTPUT` and
//!   `PREROUTING`) marks the first packets of a connection to a watched outside destination
//!   with [`CLASS_NEW`], and every packet of a connection whose conntrack mark carries it;
//!   chain `DETOUR-CLASS-SAVE` (mangle `POSTROUTING`) sets that conntrack mark when such a
//!   packet leaves through one of detour's interfaces. The rule `fwmark CLASS_NEW lookup
//!   table+3` lets only these packets use the routes through exits that masquerade, so
//!   an established connection is never moved onto them, and a connection that started on
//!   them stays.
//! * **Egress** (this node offers exit or delivers to networks behind it): chain
//!   `DETOUR-EGRESS` (mangle `PREROUTING`) gives connections that enter from the overlay the
//!   conntrack mark [`CLASS_EGRESS`] and their later packets (replies included) the packet
//!   mark, so that replies look up the return table; chain `DETOUR-NAT` (nat
//!   `POSTROUTING`) masquerades them where the connectivity class cannot keep their source;
//!   chain `DETOUR-FWD` (filter `FORWARD`) drops connections from outside that would enter
//!   the overlay unsolicited (only replies and the node's own networks may).
//!
//! The rules follow from the configuration alone, so they are installed once at start.
//! Everything is removed at exit, and after a crash on the next start.

use crate::shell::netfilter;
use anyhow::{bail, Result};
use ipnet::IpNet;

use crate::config::Config;
use crate::kernel::{CLASS_EGRESS, CLASS_NEW};
use crate::node::policy::Connectivity;

/// (table, chain, hooks) of every chain of this module.
const CHAIN_HOOKS: [(&str, &str, &[&str]); 5] = [
    ("mangle", "DETOUR-CLASS", &["OUTPUT", "PREROUTING"]),
    ("mangle", "DETOUR-CLASS-SAVE", &["POSTROUTING"]),
    ("mangle", "DETOUR-EGRESS", &["PREROUTING"]),
    ("nat", "DETOUR-NAT", &["POSTROUTING"]),
    ("filter", "DETOUR-FWD", &["FORWARD"]),
];

/// (table, chain) of every chain of this module, named for this overlay instance
/// ([`netfilter::named`]).
pub fn chains() -> Vec<(&'static str, String)> {
    CHAIN_HOOKS.iter().map(|(t, c, _)| (*t, netfilter::named(c))).collect()
}

/// Removes every chain of this module and the jumps to it; idempotent.
pub fn remove() {
    netfilter::remove_chains(&chains());
}

/// The rules of one address family, as (table, chain, arguments after the chain name).
pub fn rules(cfg: &Config, egress: bool, v6: bool) -> Vec<(&'static str, &'static str, Vec<String>)> {
    let fam = |n: &&IpNet| n.addr().is_ipv6() == v6;
    let s = |a: &[&str]| a.iter().map(|x| x.to_string()).collect::<Vec<String>>();
    let tuns = format!("{}+", cfg.kernel.interface_prefix);
    let agg = cfg.kernel.aggregate_interface.clone();
    let new = format!("{CLASS_NEW:#x}");
    let new_m = format!("{CLASS_NEW:#x}/{CLASS_NEW:#x}");
    let eg = format!("{CLASS_EGRESS:#x}");
    let eg_m = format!("{CLASS_EGRESS:#x}/{CLASS_EGRESS:#x}");
    let own_mark = cfg.kernel.fwmark.to_string();
    let mut v = Vec::new();
    let watched: Vec<&IpNet> = cfg.exit.watch.iter().chain(cfg.exit.always.iter()).filter(fam).collect();
    if !watched.is_empty() {
        v.push(("mangle", "DETOUR-CLASS", s(&["-m", "mark", "--mark", &own_mark, "-j", "RETURN"])));
        v.push(("mangle", "DETOUR-CLASS", s(&["-m", "connmark", "--mark", &new_m, "-j", "MARK", "--or-mark", &new])));
        for n in watched {
            v.push(("mangle", "DETOUR-CLASS", s(&["-d", &n.to_string(), "-m", "conntrack", "--ctstate", "NEW", "-j", "MARK", "--or-mark", &new])));
        }
        for out in [&tuns, &agg] {
            v.push(("mangle", "DETOUR-CLASS-SAVE", s(&["-o", out, "-m", "mark", "--mark", &new_m, "-j", "CONNMARK", "--or-mark", &new])));
        }
    }
    if egress {
        let p = &cfg.node.policy;
        let own: Vec<&IpNet> = cfg.node.networks.iter().chain(cfg.node.prefixes.iter()).filter(fam).collect();
        for inp in [&tuns, &agg] {
            v.push(("mangle", "DETOUR-EGRESS", s(&["-i", inp, "-m", "conntrack", "--ctstate", "NEW", "-j", "CONNMARK", "--or-mark", &eg])));
        }
        v.push(("mangle", "DETOUR-EGRESS", s(&["-m", "connmark", "--mark", &eg_m, "-j", "MARK", "--or-mark", &eg])));
        for out in [&tuns, &agg] {
            v.push(("nat", "DETOUR-NAT", s(&["-o", out, "-j", "RETURN"])));
        }
        v.push(("nat", "DETOUR-NAT", s(&["-m", "connmark", "!", "--mark", &eg_m, "-j", "RETURN"])));
        // Towards its own networks: keep the source unless the node cannot.
        let local = if p.connectivity == Connectivity::Host { "MASQUERADE" } else { "RETURN" };
        for n in &own {
            v.push(("nat", "DETOUR-NAT", s(&["-d", &n.to_string(), "-j", local])));
        }
        // Towards the Internet: keep the sources the class lets through.
        if p.willing.internet {
            match p.connectivity {
                Connectivity::Unrestricted => v.push(("nat", "DETOUR-NAT", s(&["-j", "RETURN"]))),
                Connectivity::Partial => {
                    for n in p.source_prefixes.iter().filter(fam).chain(own.iter().copied()) {
                        v.push(("nat", "DETOUR-NAT", s(&["-s", &n.to_string(), "-j", "RETURN"])));
                    }
                }
                _ => {}
            }
        }
        if p.willing.internet_masquerade {
            v.push(("nat", "DETOUR-NAT", s(&["-j", "MASQUERADE"])));
        }
        // Nothing enters the overlay from outside unsolicited.
        for inp in [&tuns, &agg] {
            v.push(("filter", "DETOUR-FWD", s(&["-i", inp, "-j", "RETURN"])));
        }
        v.push(("filter", "DETOUR-FWD", s(&["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "RETURN"])));
        for n in &own {
            v.push(("filter", "DETOUR-FWD", s(&["-s", &n.to_string(), "-j", "RETURN"])));
        }
        for out in [&tuns, &agg] {
            v.push(("filter", "DETOUR-FWD", s(&["-o", out, "-j", "DROP"])));
        }
    }
    v
}

/// Installs the chains that `cfg` needs (none when it has no `[exit]` destinations and
/// this node is no egress). Returns whether anything was installed.
///
/// # Errors
/// If iptables is missing or refuses; what was installed is removed again.
pub fn install(keeper: &netfilter::Keeper, cfg: &Config, egress: bool) -> Result<bool> {
    let mut any = false;
    for v6 in [false, true] {
        let rules = rules(cfg, egress, v6);
        // One iptables-restore per family, every table in it.
        let mut input = String::new();
        for table in ["mangle", "nat", "filter"] {
            let mut section = String::new();
            for (t, chain, hooks) in CHAIN_HOOKS.iter().filter(|(t, _, _)| *t == table) {
                let mine: Vec<&Vec<String>> = rules.iter().filter(|(rt, c, _)| rt == t && c == chain).map(|(_, _, a)| a).collect();
                if mine.is_empty() {
                    continue;
                }
                let chain = netfilter::named(chain);
                section += &format!(":{chain} - [0:0]\n");
                for a in mine {
                    section += &format!("-A {chain} {}\n", a.join(" "));
                }
                for hook in *hooks {
                    // First in the hook, so that the marks are set before other rules look.
                    section += &format!("-I {hook} 1 -j {chain}\n");
                }
            }
            if !section.is_empty() {
                input += &format!("*{table}\n{section}COMMIT\n");
            }
        }
        if input.is_empty() {
            continue;
        }
        any = true;
        if let Err(e) = keeper.restore(v6, &input) {
            remove();
            bail!("{e:#}");
        }
    }
    Ok(any)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> Config {
        let text = format!("[node]\nname = \"c\"\nprivate_key = \"/k\"\noverlay_ipv4 = \"10.77.0.3/24\"\nnetworks = [\"192.168.3.0/24\"]\n{extra}\n");
        Config::parse(&text, "t").unwrap_or_else(|e| panic!("{e}"))
    }

    fn has(r: &[(&str, &str, Vec<String>)], chain: &str, args: &str) -> bool {
        r.iter().any(|(_, c, a)| *c == chain && a.join(" ") == args)
    }

    #[test]
    fn a_masquerading_exit_host_masquerades_everything_that_leaves() {
        let c = cfg("[policy]\ninternet_masquerade = true\n");
        let r = rules(&c, true, false);
        assert!(has(&r, "DETOUR-NAT", "-d 192.168.3.0/24 -j MASQUERADE"), "a host cannot keep sources: {r:?}");
        assert!(has(&r, "DETOUR-NAT", "-j MASQUERADE"));
        assert!(has(&r, "DETOUR-FWD", "-o dt-+ -j DROP") && has(&r, "DETOUR-FWD", "-m conntrack --ctstate ESTABLISHED,RELATED -j RETURN"));
        assert!(!r.iter().any(|(_, c, _)| *c == "DETOUR-CLASS"), "no [exit] destinations");
    }

    #[test]
    fn a_router_keeps_sources_towards_its_networks_and_an_unrestricted_exit_everywhere() {
        let c = cfg("[policy]\nconnectivity = \"subnet_router\"\n");
        let r = rules(&c, true, false);
        assert!(has(&r, "DETOUR-NAT", "-d 192.168.3.0/24 -j RETURN"));
        assert!(!has(&r, "DETOUR-NAT", "-j MASQUERADE"));
        assert!(has(&r, "DETOUR-FWD", "-s 192.168.3.0/24 -j RETURN"), "its own hosts may enter the overlay");
        let c = cfg("[policy]\nconnectivity = \"unrestricted\"\ninternet = true\ninternet_masquerade = true\n");
        let r = rules(&c, true, false);
        let keep = r.iter().position(|(_, c, a)| *c == "DETOUR-NAT" && a.join(" ") == "-j RETURN").expect("keep all");
        let masq = r.iter().position(|(_, c, a)| *c == "DETOUR-NAT" && a.join(" ") == "-j MASQUERADE").expect("masquerade rule");
        assert!(keep < masq, "keeping comes first: {r:?}");
    }

    #[test]
    fn new_connections_to_watched_destinations_are_classed_and_detours_own_packets_are_not() {
        let c = cfg("[exit]\nwatch = [\"203.0.113.0/24\"]\n");
        let r = rules(&c, false, false);
        assert_eq!(r[0].2.join(" "), format!("-m mark --mark {} -j RETURN", c.kernel.fwmark));
        assert!(has(&r, "DETOUR-CLASS", "-d 203.0.113.0/24 -m conntrack --ctstate NEW -j MARK --or-mark 0x400000"));
        assert!(has(&r, "DETOUR-CLASS", "-m connmark --mark 0x400000/0x400000 -j MARK --or-mark 0x400000"));
        assert!(has(&r, "DETOUR-CLASS-SAVE", "-o dt-+ -m mark --mark 0x400000/0x400000 -j CONNMARK --or-mark 0x400000"));
        assert!(rules(&c, false, true).is_empty(), "no IPv6 destinations watched");
    }
}
