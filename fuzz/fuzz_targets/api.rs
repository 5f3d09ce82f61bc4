//! The local API's codec (`overlay::api`): requests as the server parses them, replies as
//! a client decodes them.
#![no_main]

use detour_core::overlay::api::{self, Reply};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = api::parse(data);
    let _ = Reply::decode(data);
});
