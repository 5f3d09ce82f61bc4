//! The ICMP quote classifier (`path::icmp::Filter::classify`): any packet NFQUEUE could
//! hand over, against a filter that protects a few destinations.
#![no_main]

use detour_core::path::icmp::Filter;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut f = Filter::default();
    f.protected.insert("10.2.0.0/24".parse().unwrap(), 0);
    f.protected.insert("fd10:2::/64".parse().unwrap(), 1);
    f.local.insert("10.0.1.2".parse().unwrap());
    let _ = f.classify(data);
    if let Some(syn) = detour_core::path::icmp::quoted_syn(data) {
        // What is sent again is a whole TCP SYN.
        assert!(syn.len() >= 40 && matches!(syn[0] >> 4, 4 | 6), "{syn:?}");
    }
});
