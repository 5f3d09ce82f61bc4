//! Seed capture for the fuzz corpora (`fuzz/seeds/`): with `DETOUR_CAPTURE_SEEDS=DIR` in
//! its environment, detourd writes the first distinct inputs each parser that sees bytes
//! from outside receives in a real run (data datagrams, probe payloads, management frames,
//! local API datagrams, ICMP errors from NFQUEUE, sock_diag and nexthop netlink answers,
//! its config) to `DIR/TARGET/real-PID-N`, in the input format of the fuzz target of that
//! name. The netns test `fuzz_seeds_are_captured_from_a_real_run` drives it.
//!
//! Off (one relaxed load per call) unless the variable is set; a debugging aid, not a
//! feature: the files hold session traffic and are written by root.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

/// The fuzz targets whose inputs are captured (the names of `fuzz/fuzz_targets/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// A data-port datagram; the seed is a mode byte 0 and the datagram.
    Decapsulate,
    /// A probe or reception report payload as the data plane hands it over.
    Probe,
    /// A management frame as read from a QUIC stream, without its length prefix.
    MgmtFrame,
    /// A local API datagram.
    Api,
    /// A packet NFQUEUE hands over (an ICMP error with its quote).
    Icmp,
    /// A buffer of sock_diag answers; the seed is a mode byte (1: dump) and the buffer.
    SockDiag,
    /// A nexthop netlink message; the seed is its type (u16, little endian) and payload.
    Nexthop,
    /// The config file.
    Config,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Decapsulate => "decapsulate",
            Target::Probe => "probe",
            Target::MgmtFrame => "mgmt_frame",
            Target::Api => "api",
            Target::Icmp => "icmp",
            Target::SockDiag => "sock_diag",
            Target::Nexthop => "nexthop",
            Target::Config => "config",
        }
    }
}

/// At most this many seeds per target and run.
const PER_TARGET: usize = 24;

struct Capture {
    dir: PathBuf,
    /// (target, length, first bytes) of the seeds taken: one per shape is enough.
    seen: Mutex<HashSet<(Target, usize, [u8; 4])>>,
}

static ON: AtomicBool = AtomicBool::new(false);
static CAPTURE: OnceLock<Capture> = OnceLock::new();

/// Turns capture on when `DETOUR_CAPTURE_SEEDS` names a directory (called once at start,
/// before the config is read); returns that directory.
pub fn init() -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os("DETOUR_CAPTURE_SEEDS")?);
    CAPTURE.set(Capture { dir: dir.clone(), seen: Mutex::default() }).ok()?;
    ON.store(true, Ordering::Relaxed);
    Some(dir)
}

/// Records `parts` (concatenated) as a seed of `target` when capture is on and no seed of
/// the same length and first bytes was taken yet. Write errors are ignored.
pub fn sample(target: Target, parts: &[&[u8]]) {
    if !ON.load(Ordering::Relaxed) {
        return;
    }
    let Some(c) = CAPTURE.get() else { return };
    let data: Vec<u8> = parts.concat();
    let mut head = [0u8; 4];
    for (h, b) in head.iter_mut().zip(&data) {
        *h = *b;
    }
    let n = {
        let Ok(mut seen) = c.seen.lock() else { return };
        if seen.iter().filter(|s| s.0 == target).count() >= PER_TARGET || !seen.insert((target, data.len(), head)) {
            return;
        }
        seen.iter().filter(|s| s.0 == target).count()
    };
    let dir = c.dir.join(target.name());
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join(format!("real-{}-{n}", std::process::id())), &data);
}
