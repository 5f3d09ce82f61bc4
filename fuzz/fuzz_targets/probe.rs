//! Probes and their reception reports (`path::failover::Probe`): decoded, and when they
//! decode, encoded again to the same bytes' meaning.
#![no_main]

use detour_core::path::failover::Probe;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = Probe::decode(data) {
        let again = Probe::decode(&p.encode()).expect("an encoded probe decodes");
        assert_eq!(again.encode(), p.encode());
    }
});
