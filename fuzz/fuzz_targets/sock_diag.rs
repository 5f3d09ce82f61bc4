//! The TCP monitor's reading of sock_diag answers (`shell::sockdiag::parse_batch`): any
//! buffer the kernel could hand back, as a dump or a single lookup (the first byte).
#![no_main]

use detour::shell::sockdiag::parse_batch;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut out = Vec::new();
    let _ = parse_batch(rest, mode & 1 == 1, &mut out);
});
