//! Hot reload (issue 15): what differs between the running configuration and a new one,
//! which of those differences need a restart, and the new configuration applied to the
//! [`Model`] so that only what changed is touched.
//!
//! [`plan`] compares two validated configurations. Settings the running daemon has built
//! sockets, devices, threads or kernel objects from (ports, the key, table numbers, marks,
//! interface names, the node's own addresses; [`RESTART_ONLY`]) make the plan fail with
//! their keys named; the running configuration then stays as it was. Everything else is
//! applied in place: peers added, removed or changed, `[failover]` timers and thresholds,
//! REPLEX parameters, `[exit]`, the relay policy, the log level, the metrics listener and
//! the on-demand session timeout. A peer whose key, interface or MTU changes is replaced
//! (removed and added: its session, TUN and routes are new); a peer whose endpoints,
//! overlay addresses, prefixes or protected destinations change keeps its session and TUN.

use std::collections::BTreeMap;

use crate::config::{Config, PeerConfig};
use crate::identity::NodeId;
use crate::node::model::Model;

/// Settings a reload cannot change, by their configuration keys: the daemon opened
/// sockets, devices, netfilter rules or threads from them at start.
pub const RESTART_ONLY: &[&str] = &[
    "node.name",
    "node.instance",
    "node.private_key",
    "node.listen",
    "node.data_port",
    "node.overlay_ipv4",
    "node.overlay_ipv6",
    "node.prefixes",
    "node.underlay_mtu",
    "node.control_socket",
    "node.networks",
    "kernel.*",
    "management.api_port",
    "management.api_rate",
    "management.dscp",
    "management.qdisc_interface",
    "management.qdisc_rate",
    "management.handshake_*",
    "management.min_neighbours",
    "management.max_neighbours",
    "management.target_delivery",
    "failover.icmp",
    "failover.nfqueue",
    "failover.tcp_monitor",
    "failover.tcp_poll_ms",
    "replex.enabled",
];

/// Keys of [`Plan::settings`] that the node state and the shell act on.
pub mod key {
    /// `node.log_level`: the shell's log filter.
    pub const LOG_LEVEL: &str = "node.log_level";
    /// `node.metrics_listen`: the shell's metrics server.
    pub const METRICS: &str = "node.metrics_listen";
    /// The relay policy (`[policy]`, `node.relay`, `node.uptime`): the data plane's egress.
    pub const POLICY: &str = "node.relay / uptime / [policy]";
    /// `[exit]`: the node state's exits.
    pub const EXIT: &str = "[exit]";
}

/// What a reload changes, for the log and `detourctl reload`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Names of peers added to the configuration.
    pub added: Vec<String>,
    /// Names of peers removed from it.
    pub removed: Vec<String>,
    /// Peers replaced (new key, interface or MTU): name and the keys that changed.
    pub replaced: Vec<(String, Vec<&'static str>)>,
    /// Peers changed in place: name and the keys that changed.
    pub changed: Vec<(String, Vec<&'static str>)>,
    /// Other settings that changed, by key (`failover.probe_interval_ms`, ...).
    pub settings: Vec<&'static str>,
}

impl Plan {
    /// Nothing changes.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.replaced.is_empty() && self.changed.is_empty() && self.settings.is_empty()
    }

    /// One line per change, as `detourctl reload` prints them.
    pub fn describe(&self) -> Vec<String> {
        let mut v = Vec::new();
        v.extend(self.added.iter().map(|n| format!("peer {n}: added")));
        v.extend(self.removed.iter().map(|n| format!("peer {n}: removed")));
        v.extend(self.replaced.iter().map(|(n, k)| format!("peer {n}: replaced ({} changed; new session and interface)", k.join(", "))));
        v.extend(self.changed.iter().map(|(n, k)| format!("peer {n}: {} changed", k.join(", "))));
        v.extend(self.settings.iter().map(|k| format!("{k} changed")));
        v
    }

    /// Whether the `[failover]` settings the failover core uses changed.
    pub fn failover(&self) -> bool {
        self.settings.iter().any(|k| k.starts_with("failover."))
    }
}

/// Pushes `key` when `a != b`.
fn differs<T: PartialEq>(out: &mut Vec<&'static str>, key: &'static str, a: &T, b: &T) {
    if a != b {
        out.push(key);
    }
}

/// The keys of a peer's settings that differ, and whether the peer must be replaced.
fn peer_diff(a: &PeerConfig, b: &PeerConfig) -> (Vec<&'static str>, bool) {
    let mut replace = Vec::new();
    differs(&mut replace, "public_key", &a.public_key, &b.public_key);
    differs(&mut replace, "interface", &a.interface, &b.interface);
    differs(&mut replace, "underlay_mtu", &a.underlay_mtu, &b.underlay_mtu);
    let mut keys = replace.clone();
    differs(&mut keys, "endpoints", &a.endpoints, &b.endpoints);
    differs(&mut keys, "overlay_ipv4", &a.overlay_v4, &b.overlay_v4);
    differs(&mut keys, "overlay_ipv6", &a.overlay_v6, &b.overlay_v6);
    differs(&mut keys, "prefixes", &a.prefixes, &b.prefixes);
    differs(&mut keys, "protected", &a.protected, &b.protected);
    (keys, !replace.is_empty())
}

/// Compares the running configuration `old` with `new` (both validated).
///
/// # Errors
/// The keys of [`RESTART_ONLY`] settings that differ, each with a short reason; the
/// running configuration is then kept whole.
pub fn plan(old: &Config, new: &Config) -> Result<Plan, Vec<String>> {
    let (o, n) = (&old.node, &new.node);
    let mut restart: Vec<&'static str> = Vec::new();
    differs(&mut restart, "node.name", &o.name, &n.name);
    differs(&mut restart, "node.instance", &o.instance, &n.instance);
    differs(&mut restart, "node.private_key", &o.private_key, &n.private_key);
    differs(&mut restart, "node.listen", &o.listen, &n.listen);
    differs(&mut restart, "node.data_port", &o.data_port, &n.data_port);
    differs(&mut restart, "node.overlay_ipv4", &o.overlay_v4, &n.overlay_v4);
    differs(&mut restart, "node.overlay_ipv6", &o.overlay_v6, &n.overlay_v6);
    differs(&mut restart, "node.prefixes", &o.prefixes, &n.prefixes);
    differs(&mut restart, "node.underlay_mtu", &o.underlay_mtu, &n.underlay_mtu);
    differs(&mut restart, "node.control_socket", &o.control_socket, &n.control_socket);
    differs(&mut restart, "node.networks", &o.networks, &n.networks);
    if old.kernel != new.kernel {
        restart.push("kernel.*");
    }
    let (om, nm) = (&old.management, &new.management);
    differs(&mut restart, "management.api_port", &om.api_port, &nm.api_port);
    differs(&mut restart, "management.api_rate", &om.api_rate, &nm.api_rate);
    differs(&mut restart, "management.dscp", &om.dscp, &nm.dscp);
    differs(&mut restart, "management.qdisc_interface", &om.qdisc_interface, &nm.qdisc_interface);
    differs(&mut restart, "management.qdisc_rate", &om.qdisc_rate, &nm.qdisc_rate);
    differs(&mut restart, "management.handshake_*", &om.admission, &nm.admission);
    differs(&mut restart, "management.min_neighbours", &om.min_neighbours, &nm.min_neighbours);
    differs(&mut restart, "management.max_neighbours", &om.max_neighbours, &nm.max_neighbours);
    differs(&mut restart, "management.target_delivery", &om.target_delivery, &nm.target_delivery);
    let (of, nf) = (&old.failover, &new.failover);
    differs(&mut restart, "failover.icmp", &of.icmp, &nf.icmp);
    differs(&mut restart, "failover.nfqueue", &of.nfqueue, &nf.nfqueue);
    differs(&mut restart, "failover.tcp_monitor", &of.tcp_monitor, &nf.tcp_monitor);
    differs(&mut restart, "failover.tcp_poll_ms", &of.tcp_poll, &nf.tcp_poll);
    // Traffic detection (netfilter log rules and a thread) runs only with idle probing.
    let idle = |f: &crate::config::FailoverSettings| f.idle_probe_interval > f.probe_interval;
    if idle(of) != idle(nf) {
        restart.push("failover.idle_probe_interval_ms (turning idle probing on or off)");
    }
    differs(&mut restart, "replex.enabled", &old.replex.enabled, &new.replex.enabled);
    // Connection pinning and the multipath hash are set up at start when splits can occur.
    if old.splits() != new.splits() {
        restart.push("failover.failed_loss / degraded_loss (turning the relief of degraded paths on or off)");
    }
    let egress = |c: &Config| {
        let w = &c.node.policy.willing;
        w.internet || w.internet_masquerade || (w.local && !c.node.networks.is_empty())
    };
    if egress(old) != egress(new) {
        restart.push("policy.internet / internet_masquerade / local (offering exit or delivery on or off)");
    }
    // The first configured peer starts ICMP interception and traffic detection.
    if old.peers.is_empty() != new.peers.is_empty() {
        restart.push("[[peer]] (the first peer added or the last removed)");
    }
    if old.aggregate_mtu() != new.aggregate_mtu() {
        restart.push("peer.underlay_mtu (the aggregate interface's MTU, the largest peer MTU)");
    }
    if !restart.is_empty() {
        return Err(restart.into_iter().map(String::from).collect());
    }

    let mut p = Plan::default();
    let s = &mut p.settings;
    differs(s, key::LOG_LEVEL, &o.log_level, &n.log_level);
    differs(s, key::METRICS, &o.metrics_listen, &n.metrics_listen);
    differs(s, "node.advertise", &o.advertise, &n.advertise);
    differs(s, "node.allow_degraded (applies at the next start)", &o.allow_degraded, &n.allow_degraded);
    let mut op = o.policy.clone();
    op.up_since = n.policy.up_since;
    differs(s, key::POLICY, &op, &n.policy);
    differs(s, "management.idle_timeout_s", &om.idle_timeout, &nm.idle_timeout);
    differs(s, "failover.probe_interval_ms", &of.probe_interval, &nf.probe_interval);
    differs(s, "failover.standby_probe_interval_ms", &of.standby_probe_interval, &nf.standby_probe_interval);
    differs(s, "failover.idle_probe_interval_ms", &of.idle_probe_interval, &nf.idle_probe_interval);
    differs(s, "failover.traffic_hold_ms", &of.traffic_hold, &nf.traffic_hold);
    differs(s, "failover.down_after_ms", &of.down_after, &nf.down_after);
    differs(s, "failover.fast_down_after_ms", &of.fast_down_after, &nf.fast_down_after);
    differs(s, "failover.confirm_interval_ms", &of.confirm_interval, &nf.confirm_interval);
    differs(s, "failover.hold_down_ms", &of.hold_down, &nf.hold_down);
    differs(s, "failover.max_hold_down_ms", &of.max_hold_down, &nf.max_hold_down);
    differs(s, "failover.flap_half_life_s", &of.flap_half_life, &nf.flap_half_life);
    differs(s, "failover.degraded_loss", &of.degraded_loss, &nf.degraded_loss);
    differs(s, "failover.recover_loss", &of.recover_loss, &nf.recover_loss);
    differs(s, "failover.failed_loss", &of.failed_loss, &nf.failed_loss);
    differs(s, "failover.degraded_rtt_ms", &of.degraded_rtt, &nf.degraded_rtt);
    differs(s, "failover.degraded_after_ms", &of.degraded_after, &nf.degraded_after);
    differs(s, "failover.relay_candidates", &of.relay_candidates, &nf.relay_candidates);
    let (or, nr) = (&old.replex, &new.replex);
    differs(s, "replex.mode", &or.mode, &nr.mode);
    differs(s, "replex.period_ms", &or.period, &nr.period);
    differs(s, "replex.lambda / beta / theta_ms / alpha_off_ms / loss_penalty_ms / min_samples", &or.params, &nr.params);
    differs(s, "replex.kernel_buckets", &or.kernel_buckets, &nr.kernel_buckets);
    differs(s, "replex.flow_idle_s", &or.flow_idle, &nr.flow_idle);
    differs(s, key::EXIT, &old.exit, &new.exit);

    // Peers are matched by name; a new key under the same name replaces the peer.
    let old_peers: BTreeMap<&str, &PeerConfig> = old.peers.iter().map(|p| (p.name.as_str(), p)).collect();
    let new_names: std::collections::BTreeSet<&str> = new.peers.iter().map(|p| p.name.as_str()).collect();
    p.removed = old.peers.iter().filter(|q| !new_names.contains(q.name.as_str())).map(|q| q.name.clone()).collect();
    for q in &new.peers {
        match old_peers.get(q.name.as_str()) {
            None => p.added.push(q.name.clone()),
            Some(before) => {
                let (keys, replace) = peer_diff(before, q);
                if keys.is_empty() {
                    continue;
                }
                if replace {
                    p.replaced.push((q.name.clone(), keys));
                } else {
                    p.changed.push((q.name.clone(), keys));
                }
            }
        }
    }
    Ok(p)
}

/// Peer indices a reload touched ([`Model::reconfigure`]), for the shell and the node
/// state to follow.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Moves {
    /// Peers that became configured (new indices, or directory nodes now configured):
    /// their TUN is opened, their key admitted, a session wanted.
    pub added: Vec<usize>,
    /// Peers that are no longer configured: TUN closed, key dropped (unless the directory
    /// knows them), session released, data-plane state forgotten.
    pub removed: Vec<usize>,
    /// Configured peers whose endpoints, addresses, prefixes or protected destinations
    /// changed: the data plane and the kernel follow, the session and TUN stay.
    pub changed: Vec<usize>,
    /// Of `added`, those that had a TUN as a directory node (under another name, perhaps):
    /// it is closed before the configured one opens.
    pub had_tun: Vec<usize>,
}

impl Model {
    /// Applies a reload: the model takes `new` as its configuration (`plan` must be
    /// [`plan`]'s result for the running configuration and `new`) and its configured peers
    /// follow it. Indices are kept: a removed peer keeps its index (a node that comes back
    /// gets it again), an added one takes the next free index or, when the directory knows
    /// the node, its existing one.
    ///
    /// # Errors
    /// A peer added whose interface name or overlay address a directory node holds (the
    /// model is then unchanged).
    pub fn reconfigure(&mut self, plan: &Plan, new: Config) -> Result<Moves, String> {
        let by_name: BTreeMap<String, NodeId> = self.cfg.peers.iter().map(|p| (p.name.clone(), p.node_id)).collect();
        let gone: Vec<usize> = plan.removed.iter().chain(plan.replaced.iter().map(|(n, _)| n)).filter_map(|n| by_name.get(n)).filter_map(|id| self.index_of(id)).collect();
        let new_peers: BTreeMap<&str, &PeerConfig> = new.peers.iter().map(|p| (p.name.as_str(), p)).collect();
        let coming: Vec<&PeerConfig> = plan.added.iter().chain(plan.replaced.iter().map(|(n, _)| n)).filter_map(|n| new_peers.get(n.as_str()).copied()).collect();
        // Check before changing anything: an interface name a directory node's TUN uses.
        for pc in &coming {
            let holder = self.peers.iter().enumerate().find(|(i, p)| p.tun && p.cfg.interface == pc.interface && p.cfg.node_id != pc.node_id && !gone.contains(i));
            if let Some((_, p)) = holder {
                return Err(format!("peer {}: interface {} is in use by the link to directory node {} (set peer.interface)", pc.name, pc.interface, p.cfg.name));
            }
        }
        let mut moves = Moves::default();
        for &i in &gone {
            let p = &mut self.peers[i];
            p.configured = false;
            p.present = false;
            p.tun = false;
            self.names.remove(&self.peers[i].cfg.name);
            self.ifnames.remove(&self.peers[i].cfg.interface);
            self.claim(i, false);
            moves.removed.push(i);
        }
        for pc in coming {
            let i = match self.index_of(&pc.node_id) {
                Some(i) => {
                    if self.peers[i].present {
                        self.claim(i, false);
                    }
                    if self.peers[i].tun {
                        moves.had_tun.push(i);
                    }
                    self.names.remove(&self.peers[i].cfg.name);
                    self.ifnames.remove(&self.peers[i].cfg.interface);
                    let p = &mut self.peers[i];
                    p.cfg = pc.clone();
                    p.configured = true;
                    p.present = true;
                    p.tun = true;
                    i
                }
                None => {
                    let (links, warning) = crate::kernel::links::assign(&self.local, &pc.name, &pc.node_id, self.cfg.kernel.link_pool_v4, &mut self.taken_v4);
                    if let Some(w) = warning {
                        self.warnings.push(w);
                    }
                    let i = self.peers.len();
                    self.peers.push(crate::node::model::PeerDef::configured(pc.clone(), links));
                    self.by_id.insert(pc.node_id, i);
                    i
                }
            };
            self.names.insert(pc.name.clone());
            self.ifnames.insert(pc.interface.clone());
            self.claim(i, true);
            moves.added.push(i);
        }
        for (name, _) in &plan.changed {
            let (Some(pc), Some(i)) = (new_peers.get(name.as_str()), by_name.get(name).and_then(|id| self.index_of(id))) else { continue };
            self.claim(i, false);
            self.peers[i].cfg = (*pc).clone();
            self.claim(i, true);
            moves.changed.push(i);
        }
        let up_since = self.cfg.node.policy.up_since;
        self.cfg = new;
        self.cfg.node.policy.up_since = up_since;
        Ok(moves)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    fn key(seed: u8) -> String {
        Identity::from_seed([seed; 32]).public_key().to_string()
    }

    fn cfg(extra: &str, peers: &[(&str, u8, &str)]) -> Config {
        let mut text = format!("[node]\nname = \"alice\"\nprivate_key = \"/k\"\noverlay_ipv4 = \"10.77.0.1/24\"\n{extra}\n");
        for (name, seed, more) in peers {
            let addr = if more.contains("overlay_ipv4") { String::new() } else { format!("overlay_ipv4 = \"10.77.0.{}\"\n", 100 + seed) };
            text += &format!("[[peer]]\nname = \"{name}\"\npublic_key = \"{}\"\nendpoints = [\"192.0.2.{seed}\"]\n{addr}{more}\n", key(*seed));
        }
        Config::parse(&text, "t.toml").unwrap()
    }

    fn model(c: &Config) -> Model {
        Model::new(c.clone(), Identity::from_seed([1; 32]).node_id())
    }

    #[test]
    fn peers_added_removed_changed_and_replaced_are_told_apart_and_other_settings_named() {
        let old = cfg("", &[("bob", 2, "overlay_ipv4 = \"10.77.0.2\""), ("carol", 3, ""), ("dave", 4, "")]);
        let new = cfg(
            "[failover]\nprobe_interval_ms = 40\n[exit]\nwatch = [\"203.0.113.0/24\"]",
            &[("bob", 2, "overlay_ipv4 = \"10.77.0.9\"\nprefixes = [\"10.9.0.0/24\"]"), ("dave", 5, ""), ("erin", 6, "")],
        );
        let p = plan(&old, &new).unwrap();
        assert_eq!(p.added, vec!["erin"]);
        assert_eq!(p.removed, vec!["carol"]);
        assert_eq!(p.replaced, vec![("dave".to_string(), vec!["public_key", "endpoints", "overlay_ipv4"])]);
        assert_eq!(p.changed, vec![("bob".to_string(), vec!["overlay_ipv4", "prefixes"])]);
        assert_eq!(p.settings, vec!["failover.probe_interval_ms", "[exit]"]);
        assert!(p.failover());
        let lines = p.describe();
        assert!(lines.contains(&"peer erin: added".to_string()), "{lines:?}");
        assert!(lines.contains(&"peer dave: replaced (public_key, endpoints, overlay_ipv4 changed; new session and interface)".to_string()), "{lines:?}");
        assert!(plan(&old, &old).unwrap().is_empty());
    }

    #[test]
    fn settings_built_into_sockets_devices_and_kernel_objects_need_a_restart_and_are_named() {
        let old = cfg("", &[("bob", 2, "")]);
        let new = cfg("data_port = 7800\n[kernel]\ntable = 100\n[management]\napi_port = 0\n[replex]\nenabled = true", &[("bob", 2, "")]);
        let err = plan(&old, &new).unwrap_err();
        assert_eq!(err, vec!["node.data_port", "kernel.*", "management.api_port", "replex.enabled"]);
        // removing the last peer too
        let err = plan(&old, &cfg("", &[])).unwrap_err();
        assert!(err.iter().any(|e| e.contains("[[peer]]")), "{err:?}");
    }

    #[test]
    fn the_model_follows_a_reload_keeping_indices_and_the_unchanged_peers_untouched() {
        let old = cfg("", &[("bob", 2, "overlay_ipv4 = \"10.77.0.2\""), ("carol", 3, "overlay_ipv4 = \"10.77.0.3\""), ("dave", 4, "")]);
        let mut m = model(&old);
        let (bob_links, bob_counters) = (m.peers[0].links, m.peers[0].counters.clone());
        let new = cfg("", &[("bob", 2, "overlay_ipv4 = \"10.77.0.2\""), ("dave", 5, ""), ("erin", 6, "overlay_ipv4 = \"10.77.0.3\"")]);
        let p = plan(&old, &new).unwrap();
        let moves = m.reconfigure(&p, new.clone()).unwrap();
        // carol (1) and the old dave (2) removed; erin (3) and the new dave (4) added
        assert_eq!(moves.removed, vec![1, 2]);
        assert_eq!(moves.added, vec![3, 4]);
        assert!(moves.changed.is_empty());
        assert!(!m.peers[1].configured && !m.peers[1].present && !m.peers[1].tun);
        assert!(m.peers[4].configured && m.peers[4].tun && m.peers[4].cfg.name == "dave");
        // bob untouched: same index, link addresses and counters
        assert_eq!(m.peers[0].links, bob_links);
        assert!(std::sync::Arc::ptr_eq(&m.peers[0].counters, &bob_counters));
        // erin took carol's released overlay address; the kernel view has no carol
        assert_eq!(m.peers[3].cfg.overlay_v4, Some("10.77.0.3".parse().unwrap()));
        let names: Vec<String> = m.desired_kernel(&[]).links.into_iter().map(|l| l.name).collect();
        assert!(names.contains(&"dt-erin".to_string()) && !names.contains(&"dt-carol".to_string()), "{names:?}");
        assert_eq!(m.cfg, new);
        // carol back: her old index again
        let again = cfg("", &[("bob", 2, "overlay_ipv4 = \"10.77.0.2\""), ("dave", 5, ""), ("erin", 6, "overlay_ipv4 = \"10.77.0.3\""), ("carol", 3, "")]);
        let moves = m.reconfigure(&plan(&new, &again).unwrap(), again).unwrap();
        assert_eq!(moves.added, vec![1]);
        assert!(m.peers[1].configured && m.peers[1].present);
    }

    #[test]
    fn a_changed_peer_keeps_its_index_and_the_start_time_of_the_policy_stays() {
        let mut old = cfg("", &[("bob", 2, "")]);
        old.node.policy.up_since = 1234;
        let mut m = model(&old);
        let new = cfg("[policy]\npriority = 7", &[("bob", 2, "prefixes = [\"10.9.0.0/24\"]\nprotected = [\"198.51.100.0/24\"]")]);
        let p = plan(&m.cfg, &new).unwrap();
        assert_eq!(p.settings, vec!["node.relay / uptime / [policy]"]);
        let moves = m.reconfigure(&p, new).unwrap();
        assert_eq!(moves.changed, vec![0]);
        assert_eq!(m.peers[0].cfg.prefixes, vec!["10.9.0.0/24".parse::<ipnet::IpNet>().unwrap()]);
        assert_eq!(m.cfg.node.policy.up_since, 1234);
        assert_eq!(m.cfg.node.policy.priority, 7);
        assert!(m.protected_destinations(0, &[]).contains(&"198.51.100.0/24".parse().unwrap()));
    }
}
