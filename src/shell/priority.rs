//! Priority of management traffic on the host (spec A§1.3.2 "prioritized"; seeds-digest
//! item 35): the management socket's `SO_PRIORITY`, a DSCP CS6 mark set by a netfilter rule
//! (quinn writes the TOS byte of every packet itself, so the mark must be applied after
//! it), and, when the operator asks for it, an HTB qdisc on the underlay interface that
//! serves management packets first.
//!
//! Everything detour installs here is tagged and removed at exit, and left-overs of a
//! crashed run are removed at start: the mangle chain `DETOUR-MGMT` and an HTB root qdisc
//! with handle `d7:`.

use std::net::UdpSocket;
use std::os::fd::AsFd;
use std::process::Command;

use crate::shell::netfilter;
use anyhow::{bail, Context, Result};

/// The mangle chain detour owns.
pub fn chain() -> String {
    netfilter::named("DETOUR-MGMT")
}
/// Handle of the HTB root qdisc detour installs (`d7:`).
pub const QDISC_HANDLE: &str = "d7:";
/// `skb->priority` that HTB maps straight to the management class `d7:10`
/// (`net/sched/sch_htb.c: htb_classify` accepts a class ID as priority).
pub const HTB_MGMT_PRIORITY: u32 = 0x00d7_0010;
/// `SO_PRIORITY` without detour's HTB: `TC_PRIO_INTERACTIVE`, the first band of the
/// default `pfifo_fast` qdisc (values above 6 need CAP_NET_ADMIN and gain nothing there).
pub const DEFAULT_MGMT_PRIORITY: u32 = 6;

/// Sets `SO_PRIORITY` on the management sockets.
///
/// # Errors
/// If the kernel refuses.
pub fn set_socket_priority(sockets: &[UdpSocket], priority: u32) -> Result<()> {
    for s in sockets {
        nix::sys::socket::setsockopt(&s.as_fd(), nix::sys::socket::sockopt::Priority, &(priority as libc::c_int)).context("setting SO_PRIORITY on the management socket")?;
    }
    Ok(())
}

/// Removes the DSCP chain and the jumps to it, for both families; idempotent.
pub fn remove_dscp_rules() {
    netfilter::remove_chains(&chains());
}

/// Marks UDP packets from the management port with DSCP CS6 (network control, RFC 4594),
/// in the mangle table's OUTPUT chain, for IPv4 and IPv6.
///
/// # Errors
/// If iptables is missing or refuses (for example without the DSCP target).
pub fn install_dscp_rules(keeper: &netfilter::Keeper, management_port: u16) -> Result<()> {
    let c = chain();
    let input = format!("*mangle\n:{c} - [0:0]\n-A {c} -p udp --sport {management_port} -j DSCP --set-dscp-class CS6\n-I OUTPUT 1 -j {c}\nCOMMIT\n");
    for v6 in [false, true] {
        if let Err(e) = keeper.restore(v6, &input) {
            remove_dscp_rules();
            bail!("the DSCP rule was refused: {e:#}");
        }
    }
    Ok(())
}

/// (table, chain) of every chain of this module.
pub fn chains() -> Vec<(&'static str, String)> {
    vec![("mangle", chain())]
}

fn tc(args: &[&str]) -> Result<()> {
    let out = Command::new("tc").args(args).output().context("running tc")?;
    if !out.status.success() {
        bail!("tc {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Whether `dev`'s root qdisc is the HTB detour installs.
fn ours(dev: &str) -> bool {
    Command::new("tc").args(["qdisc", "show", "dev", dev, "root"]).output().map(|o| String::from_utf8_lossy(&o.stdout).contains(&format!("htb {QDISC_HANDLE} root"))).unwrap_or(false)
}

/// detour's HTB on an interface, kept by [`crate::shell::netfilter::Keeper`]: put back
/// when someone removes it (not when someone replaced it with a qdisc of their own).
pub struct KeptQdisc {
    /// The interface.
    pub dev: String,
    /// Its rate (bit/s).
    pub rate_bps: u64,
}

impl crate::shell::netfilter::Kept for KeptQdisc {
    fn name(&self) -> String {
        format!("the management qdisc on {}", self.dev)
    }
    fn holds(&self) -> bool {
        ours(&self.dev)
    }
    fn put_back(&self) -> Result<()> {
        install_qdisc(&self.dev, self.rate_bps)
    }
}

/// Removes detour's HTB from `dev` (the kernel's default qdisc returns); leaves any other
/// root qdisc alone.
pub fn remove_qdisc(dev: &str) {
    if ours(dev) {
        let _ = tc(&["qdisc", "del", "dev", dev, "root"]);
    }
}

/// Installs on `dev` an HTB root shaping to `rate_bps` bit/s with two classes: `d7:10`
/// (priority 0: management, chosen by `skb->priority` [`HTB_MGMT_PRIORITY`] or DSCP CS6)
/// and `d7:20` (priority 1: everything else, the default). Both may borrow up to the full
/// rate, so management traffic is sent first and forwarding traffic uses what is left.
/// Set the rate a little below the link's real rate so that the queue forms here.
///
/// # Errors
/// If `tc` fails; the half-built qdisc is removed.
pub fn install_qdisc(dev: &str, rate_bps: u64) -> Result<()> {
    let existing = Command::new("tc").args(["qdisc", "show", "dev", dev, "root"]).output().context("running tc")?;
    let text = String::from_utf8_lossy(&existing.stdout).to_string();
    if !existing.status.success() {
        bail!("interface {dev}: {}", String::from_utf8_lossy(&existing.stderr).trim());
    }
    let default_root = text.contains("pfifo_fast") || text.contains("noqueue") || text.contains("qdisc mq") || text.trim().is_empty();
    if !(ours(dev) || default_root) {
        bail!("interface {dev} already has a root qdisc ({}); detour replaces only the default one", text.trim());
    }
    let rate = format!("{rate_bps}bit");
    let mgmt = format!("{}bit", (rate_bps / 10).max(8000));
    let rest = format!("{}bit", (rate_bps - rate_bps / 10).max(8000));
    let steps: Vec<Vec<&str>> = vec![
        vec!["qdisc", "replace", "dev", dev, "root", "handle", QDISC_HANDLE, "htb", "default", "20"],
        vec!["class", "add", "dev", dev, "parent", QDISC_HANDLE, "classid", "d7:1", "htb", "rate", &rate, "ceil", &rate, "quantum", "3028"],
        vec!["class", "add", "dev", dev, "parent", "d7:1", "classid", "d7:10", "htb", "rate", &mgmt, "ceil", &rate, "prio", "0", "quantum", "3028"],
        vec!["class", "add", "dev", dev, "parent", "d7:1", "classid", "d7:20", "htb", "rate", &rest, "ceil", &rate, "prio", "1", "quantum", "3028"],
        vec!["filter", "add", "dev", dev, "parent", QDISC_HANDLE, "protocol", "ip", "prio", "1", "u32", "match", "ip", "dsfield", "0xc0", "0xfc", "flowid", "d7:10"],
        vec!["filter", "add", "dev", dev, "parent", QDISC_HANDLE, "protocol", "ipv6", "prio", "2", "u32", "match", "ip6", "priority", "0xc0", "0xfc", "flowid", "d7:10"],
    ];
    for s in steps {
        if let Err(e) = tc(&s) {
            remove_qdisc(dev);
            return Err(e);
        }
    }
    Ok(())
}
