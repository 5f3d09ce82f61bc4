//! The data plane's receive path (header, replay window, keys, relay forwarding, inner
//! packet checks) on any datagram: a node with one peer and an installed session. The
//! first byte chooses whether the node IDs are made to match (so that the input reaches
//! the session's AEAD open and what follows).
#![no_main]

use std::sync::Arc;

use detour_core::dataplane::{DataCommand, DataPlaneSpec, PeerSpec, RxState};
use detour_core::identity::NodeId;
use detour_core::wire;
use libfuzzer_sys::fuzz_target;

const A: NodeId = NodeId([0xa; 16]);
const B: NodeId = NodeId([0xb; 16]);

fn rx() -> RxState {
    let spec = DataPlaneSpec {
        local: B,
        local_dsts: vec!["10.77.0.2/32".parse().unwrap(), "10.2.0.0/24".parse().unwrap()],
        peers: vec![PeerSpec {
            node_id: A,
            host_addrs: vec!["10.77.0.1".parse().unwrap()],
            prefixes: vec!["10.1.0.0/24".parse().unwrap()],
            link_local: vec![],
            protected: vec![],
            inner_mtu: 1388,
            counters: Arc::default(),
        }],
        node: Arc::default(),
        egress: None,
    };
    let mut rx = RxState::new(&spec);
    rx.apply(&DataCommand::InstallSession { peer: 0, secrets: wire::split_exporter(&[42u8; wire::EXPORTER_LEN], &B, &A) });
    rx
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut buf = rest.to_vec();
    if mode & 1 == 1 && buf.len() >= 36 {
        buf[0] = 0x10;
        buf[3] = 0;
        buf[4..20].copy_from_slice(&A.0);
        buf[20..36].copy_from_slice(&B.0);
    }
    let mut rx = rx();
    let _ = rx.decapsulate(&mut buf, "192.0.2.1:7720".parse().unwrap(), 1);
});
