//! The data plane's receive path (header, replay window, keys, relay forwarding, inner
//! packet checks) on any datagram: a node with one peer and an installed session. The
//! first byte chooses whether the node IDs are made to match (so that the input reaches
//! the session's AEAD open and what follows).
#![no_main]

use detour_core::dataplane::RxState;
use libfuzzer_sys::fuzz_target;

#[path = "../common.rs"]
mod common;
use common::{A, B};

fn rx() -> RxState {
    let mut rx = RxState::new(&common::spec(B));
    rx.apply(&common::session(B));
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
