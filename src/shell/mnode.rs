//! The management overlay's side of the shell: what the node publishes about itself (its
//! endpoints, from this host's addresses) and the status view. The overlay itself is part
//! of [`NodeState`], driven by the daemon's loop through the engine, which also applies the
//! records it learns and forgets.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::ctl::{NeighbourRow, NodeRow};
use crate::identity::NodeId;
use crate::node::model::Model;
use crate::node::state::NodeState;
use crate::overlay::OwnInfo;
use crate::shell::sessions::{want, PeerInfo};

/// What status output shows of the management overlay (built when asked for).
#[derive(Debug, Clone, Default)]
pub struct OverlayView {
    /// `detourctl nodes`.
    pub nodes: Vec<NodeRow>,
    /// `detourctl status`, management section.
    pub status: crate::ctl::ManagementStatus,
}

/// The wall clock in unix seconds (0 before 1970).
pub(crate) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The underlay endpoints this node publishes: the configured `advertise` list, else the
/// explicit listen addresses, else this host's global addresses (not loopback, link-local,
/// multicast, detour's overlay or link addresses), each with the data port.
pub fn endpoints(m: &Model, local_addrs: &HashSet<IpAddr>) -> Vec<SocketAddr> {
    let n = &m.cfg.node;
    if !n.advertise.is_empty() {
        return n.advertise.clone();
    }
    let listen: Vec<IpAddr> = n.listen.iter().copied().filter(|a| !a.is_unspecified()).collect();
    let addrs: Vec<IpAddr> = if listen.is_empty() { local_addrs.iter().copied().collect() } else { listen };
    let pool = m.cfg.kernel.link_pool_v4;
    let mut v: Vec<SocketAddr> = addrs
        .into_iter()
        .map(|a| a.to_canonical())
        .filter(|a| !a.is_loopback() && !a.is_multicast() && !a.is_unspecified())
        .filter(|a| match a {
            IpAddr::V4(v) => !v.is_link_local() && !pool.contains(v) && !n.overlay_v4.is_some_and(|o| o.contains(v)),
            IpAddr::V6(v) => (v.segments()[0] & 0xffc0) != 0xfe80 && !n.overlay_v6.is_some_and(|o| o.contains(v)),
        })
        .map(|a| SocketAddr::new(a, n.data_port))
        .collect();
    v.sort();
    v
}

/// What this node publishes about itself in its record.
pub fn own_info(m: &Model, local_addrs: &HashSet<IpAddr>) -> OwnInfo {
    let endpoints = endpoints(m, local_addrs);
    let n = &m.cfg.node;
    OwnInfo {
        name: n.name.clone(),
        endpoints,
        overlay_v4: n.overlay_v4.map(|v| v.addr()),
        overlay_v6: n.overlay_v6.map(|v| v.addr()),
        prefixes: n.prefixes.clone(),
        relay: n.policy.commitment != crate::node::policy::Commitment::Never,
        uptime: Some(n.policy.lifespan),
        networks: n.networks.clone(),
        policy: Some(n.policy.clone()),
    }
}

/// What `detourctl nodes` and the management section of status show, built from the
/// node state now (never on a timer).
pub fn view(m: &Model, peers: &[PeerInfo], state: &NodeState, api_port: Option<u16>, now: Instant) -> OverlayView {
    let unix = unix_now() as i64;
    let local = state.overlay().local();
    let sessions: HashSet<NodeId> = state.overlay().sessions().map(|(id, _, _)| *id).collect();
    let mut nodes: Vec<NodeRow> = state
        .overlay()
        .directory()
        .entries()
        .map(|e| {
            let r = &e.record;
            NodeRow {
                name: r.name().to_string(),
                names: r.names.iter().map(|n| n.name.clone()).collect(),
                node_id: r.node_id.to_string(),
                endpoints: r.endpoints.iter().map(|a| a.to_string()).collect(),
                overlay_addresses: [r.overlay_v4.map(|a| a.to_string()), r.overlay_v6.map(|a| a.to_string())].into_iter().flatten().collect(),
                prefixes: r.prefixes.iter().map(|p| p.to_string()).collect(),
                relay: r.relay,
                uptime: r.uptime.as_str().into(),
                policy: {
                    let p = r.policy();
                    let mut v = vec![format!("{}/{}", p.commitment.as_str(), p.priority)];
                    if p.willing.internet {
                        v.push("exit".into());
                    }
                    if p.willing.internet_masquerade {
                        v.push("masq-exit".into());
                    }
                    if !r.networks.is_empty() {
                        v.push(format!("networks {}", r.networks.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(",")));
                    }
                    v.join(" ")
                },
                neighbours: r.neighbours.len(),
                seq: r.seq,
                expires_in_s: r.expires as i64 - unix,
                local: r.node_id == local,
                session: sessions.contains(&r.node_id),
            }
        })
        .collect();
    nodes.sort_by(|a, b| (!a.local, &a.name).cmp(&(!b.local, &b.name)));
    let chosen: HashSet<NodeId> = state.overlay().chosen().copied().collect();
    let neighbours: Vec<NeighbourRow> = state
        .overlay()
        .sessions()
        .map(|(id, configured, usable)| {
            let i = m.index_of(id);
            let info = i.and_then(|i| peers.get(i));
            let role = if configured {
                "configured"
            } else if chosen.contains(id) {
                "neighbour"
            } else if info.is_some_and(|p| p.link.want & want::DATA != 0) {
                "on-demand"
            } else {
                "inbound"
            };
            NeighbourRow {
                name: i.map(|i| m.peers[i].cfg.name.clone()).unwrap_or_else(|| id.short()),
                node_id: id.to_string(),
                role: role.into(),
                state: if usable { "up".into() } else { "unusable".into() },
                rtt_ms: info.and_then(|p| p.conn.as_ref()).filter(|c| c.close_reason().is_none()).map(|c| c.rtt().as_secs_f64() * 1000.0),
                since_s: state.session_since(id).map(|t| now.saturating_duration_since(t).as_secs_f64()),
            }
        })
        .collect();
    let status = crate::ctl::ManagementStatus {
        directory_nodes: state.overlay().directory().len(),
        target_neighbours: state.overlay().target_neighbours(),
        neighbours_missing: chosen.iter().filter(|id| !sessions.contains(*id)).count(),
        availability: state.overlay().availability(),
        neighbours,
        rejected_records: state.overlay().rejected().into_iter().filter(|(k, _)| *k != "duplicate").map(|(k, v)| (k.to_string(), v)).collect(),
        duplicate_records: state.overlay().rejected().into_iter().find(|(k, _)| *k == "duplicate").map(|(_, v)| v).unwrap_or(0),
        flood_prunes: state.overlay().stats().prunes_sent,
        flood_grafts: state.overlay().stats().grafts_sent,
        records_published: state.overlay().stats().records_published,
        records_accepted: state.overlay().stats().records_accepted,
        pending_messages: state.overlay().router().pending(),
        retransmissions: state.overlay().router().retries(),
        routing_drops: state.overlay().router().drops().iter().map(|(k, v)| (format!("{k:?}").to_lowercase(), *v)).collect(),
        names: state.overlay().names().iter().map(|n| n.name.clone()).collect(),
        api: state.api_status(api_port),
    };
    OverlayView { nodes, status }
}
