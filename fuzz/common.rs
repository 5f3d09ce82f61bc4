//! What the `decapsulate` target and the seed writer share: two nodes, A (10.77.0.1,
//! 10.1.0.0/24) and B (10.77.0.2, 10.2.0.0/24), each the other's one peer, and the key
//! material of their session.

use std::sync::Arc;

use detour_core::dataplane::{DataCommand, DataPlaneSpec, PeerSpec};
use detour_core::identity::NodeId;
use detour_core::wire;

/// The sending node of the seeds.
pub const A: NodeId = NodeId([0xa; 16]);
/// The receiving node of the `decapsulate` target.
pub const B: NodeId = NodeId([0xb; 16]);

/// The data-plane view of `local` (A or B) with the other as its peer.
pub fn spec(local: NodeId) -> DataPlaneSpec {
    let (me, other, peer) = if local == A { (1, 2, B) } else { (2, 1, A) };
    DataPlaneSpec {
        local,
        local_dsts: vec![format!("10.77.0.{me}/32").parse().unwrap(), format!("10.{me}.0.0/24").parse().unwrap()],
        peers: vec![PeerSpec {
            node_id: peer,
            host_addrs: vec![format!("10.77.0.{other}").parse().unwrap()],
            prefixes: vec![format!("10.{other}.0.0/24").parse().unwrap()],
            link_local: vec![],
            protected: vec![],
            inner_mtu: 1388,
            counters: Arc::default(),
        }],
        node: Arc::default(),
        egress: None,
    }
}

/// The session keys `local` installs for its peer (the same exporter material on both
/// sides, split by node ID).
pub fn session(local: NodeId) -> DataCommand {
    let peer = if local == A { B } else { A };
    DataCommand::InstallSession { peer: 0, secrets: wire::split_exporter(&[42u8; wire::EXPORTER_LEN], &local, &peer) }
}
