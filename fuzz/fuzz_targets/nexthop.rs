//! Nexthop objects read back from the kernel (`shell::nexthop::decode`): any payload of
//! any message type (the first two bytes), with detour's protocol or not.
#![no_main]

use std::collections::HashMap;

use detour::shell::nexthop::decode;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let kind = u16::from_le_bytes([data[0], data[1]]);
    let names: HashMap<u32, String> = HashMap::from([(1, "eth0".to_string()), (7, "dt-bob".to_string())]);
    let _ = decode(kind, &data[2..], &names);
});
