//! Management frames (`wire::mgmt::decode`): routed messages, gossip, relay signalling,
//! link reports; the node records in them are verified as the directory does.
#![no_main]

use detour_core::wire::mgmt::{self, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = mgmt::decode(data) {
        if let Message::Records { records, .. } = &f.message {
            for r in records {
                let _ = r.verify();
            }
        }
    }
});
