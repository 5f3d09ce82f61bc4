//! The data plane's receive path (header, replay window, keys, relay forwarding, inner
//! packet checks) on any datagram: a node with one peer and an installed session. The
//! first byte chooses the mode:
//!
//! * bit 1 (value 2) clear: the rest is the datagram; bit 0 makes the node IDs match (so
//!   that the input reaches the session's AEAD open and what follows).
//! * bit 1 set: the rest is sealed first, as the peer would send it (bit 2: as a control
//!   payload, such as a probe; else as an inner packet through the peer's TUN), so that
//!   everything after authentication sees fuzzed bytes: the inner packet checks and the
//!   control path. The datagram is then received twice; the second time is a replay.
#![no_main]

use detour_core::dataplane::{DataCommand, DropReason, PathEndpoint, RxState, Tun, TxAction, TxState};
use detour_core::wire::HEADER_LEN;
use libfuzzer_sys::fuzz_target;

#[path = "../common.rs"]
mod common;
use common::{A, B};

fn rx() -> RxState {
    let mut rx = RxState::new(&common::spec(B));
    rx.apply(&common::session(B));
    rx
}

fn tx() -> TxState {
    let mut tx = TxState::new(&common::spec(A));
    tx.apply(&common::session(A));
    tx.apply(&DataCommand::SetEndpoint { peer: 0, endpoint: Some(PathEndpoint { remote: "192.0.2.2:7720".parse().unwrap(), local_ip: None }) });
    tx
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let from = "192.0.2.1:7720".parse().unwrap();
    let mut rx = rx();
    if mode & 2 == 2 {
        let mut tx = tx();
        let mut buf = vec![0u8; rest.len() + 2048];
        let n = if mode & 4 == 4 {
            match tx.seal_control(0, rest, &mut buf) {
                Ok(n) => n,
                Err(_) => return,
            }
        } else {
            buf[HEADER_LEN..HEADER_LEN + rest.len()].copy_from_slice(rest);
            let mut reply = Vec::new();
            match tx.encapsulate(Tun::Peer(0), &mut buf, rest.len(), &mut reply) {
                TxAction::Send { len, .. } => len,
                _ => return,
            }
        };
        let sealed = buf[..n].to_vec();
        let first = rx.decapsulate(&mut buf[..n], from, 1);
        let mut again = sealed;
        let second = rx.decapsulate(&mut again, from, 1);
        // What the peer sealed with the session's keys opens; the same datagram again is a replay.
        assert!(!matches!(first, Err(DropReason::AuthFailed)), "a sealed datagram failed authentication");
        assert!(matches!(second, Err(DropReason::Replay)), "a datagram received twice was not a replay: {second:?}");
        return;
    }
    let mut buf = rest.to_vec();
    if mode & 1 == 1 && buf.len() >= 36 {
        buf[0] = 0x10;
        buf[3] = 0;
        buf[4..20].copy_from_slice(&A.0);
        buf[20..36].copy_from_slice(&B.0);
    }
    let _ = rx.decapsulate(&mut buf, from, 1);
});
