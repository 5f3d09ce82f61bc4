//! Supervision: a task or thread of `detourd` that panics or stops takes the daemon down
//! with a non-zero exit and the reason in the log, so that systemd restarts it
//! (`Restart=on-failure`); and the systemd watchdog is fed only while every long-running
//! part makes progress. Without this a panicking failover engine or data thread died
//! silently while the watchdog kept reporting a healthy node (architecture review §7).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// The parts whose progress the watchdog checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The data thread (packets between TUNs and the data sockets).
    Data,
    /// The daemon's loop as it drives the node state's path control (probes, routes,
    /// relays, REPLEX).
    Engine,
    /// The daemon's loop as it drives the node state's management overlay (directory,
    /// messages, local API). Since both run in one loop, it beats both parts; they keep
    /// their own names in the log and in `DETOURD_TEST_PANIC`.
    Overlay,
}

impl Part {
    /// Every part, in a fixed order.
    pub const ALL: [Part; 3] = [Part::Data, Part::Engine, Part::Overlay];

    /// Name used in the log.
    pub fn as_str(self) -> &'static str {
        match self {
            Part::Data => "data thread",
            Part::Engine => "failover engine",
            Part::Overlay => "management overlay",
        }
    }
}

/// A part that has not reported progress for this long holds back the watchdog. Each part
/// reports at least once a second while it runs (the data thread on a 1 s timer, the
/// daemon's loop at every event, and it has one at least every second).
pub const STALL: Duration = Duration::from_secs(5);

/// Progress of the parts and the first fatal failure. Shared between the threads and tasks
/// (the one piece of shared state supervision needs: a panic hook has no other way out).
#[derive(Debug)]
pub struct Health {
    start: Instant,
    /// Milliseconds since `start` at each part's last report, in [`Part::ALL`] order.
    beats: [AtomicU64; 3],
    fatal: Mutex<Option<String>>,
    failed: Notify,
}

impl Default for Health {
    fn default() -> Self {
        Health::new(Instant::now())
    }
}

impl Health {
    /// Every part counts as having just made progress at `start`.
    pub fn new(start: Instant) -> Health {
        Health { start, beats: Default::default(), fatal: Mutex::new(None), failed: Notify::new() }
    }

    fn slot(part: Part) -> usize {
        Part::ALL.iter().position(|p| *p == part).unwrap_or(0)
    }

    /// `part` made progress now.
    pub fn beat(&self, part: Part) {
        self.beats[Self::slot(part)].store(self.start.elapsed().as_millis() as u64, Relaxed);
    }

    /// The parts that made no progress for [`STALL`] before `now` (empty: feed the
    /// watchdog).
    pub fn stalled(&self, now: Instant) -> Vec<Part> {
        let now_ms = now.saturating_duration_since(self.start).as_millis() as u64;
        Part::ALL.into_iter().filter(|p| now_ms.saturating_sub(self.beats[Self::slot(*p)].load(Relaxed)) > STALL.as_millis() as u64).collect()
    }

    /// Records a fatal failure (the first one wins) and wakes [`Health::failed`].
    pub fn fail(&self, reason: impl Into<String>) {
        let mut f = self.fatal.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            *f = Some(reason.into());
        }
        drop(f);
        self.failed.notify_one();
    }

    /// The fatal failure, if one happened.
    pub fn fatal(&self) -> Option<String> {
        self.fatal.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits for a fatal failure and returns its reason.
    pub async fn failed(&self) -> String {
        loop {
            if let Some(r) = self.fatal() {
                return r;
            }
            self.failed.notified().await;
        }
    }
}

/// The message of a panic payload (`panic!` with a literal or a formatted string).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| payload.downcast_ref::<String>().cloned()).unwrap_or_else(|| "(no message)".into())
}

/// Installs a panic hook that logs the panic (thread, message, place) at error level and
/// records it as fatal in `health`, then runs the hook that was there before (which prints
/// to stderr). Any panic in any thread or task of the daemon then stops it.
pub fn install_panic_hook(health: Arc<Health>) {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current().name().unwrap_or("unnamed").to_string();
        let msg = panic_message(info.payload());
        let place = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        let reason = format!("thread '{thread}' panicked: {msg}{place}");
        tracing::error!("{reason}");
        health.fail(reason);
        previous(info);
    }));
}

/// Test hook: when the environment variable `DETOURD_TEST_PANIC` is `PART:MS` (`PART` one
/// of `data`, `engine`, `overlay`), that part panics `MS` milliseconds after it started.
/// Used by the netns supervision test; unset in production.
pub fn test_panic_after(part: Part) -> Option<Duration> {
    let v = std::env::var("DETOURD_TEST_PANIC").ok()?;
    let (name, ms) = v.split_once(':')?;
    let wanted = match name {
        "data" => Part::Data,
        "engine" => Part::Engine,
        "overlay" => Part::Overlay,
        _ => return None,
    };
    (wanted == part).then(|| ms.parse().ok().map(Duration::from_millis)).flatten()
}

/// A future that panics after `after` (never, when `None`): the test hook's trigger.
pub async fn panic_after(part: Part, after: Option<Duration>) {
    match after {
        Some(d) => {
            tokio::time::sleep(d).await;
            panic!("test hook DETOURD_TEST_PANIC: the {} panics on purpose", part.as_str());
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_part_that_stops_reporting_holds_the_watchdog_back() {
        let t0 = Instant::now();
        let h = Health::new(t0);
        assert!(h.stalled(t0 + Duration::from_secs(1)).is_empty());
        assert_eq!(h.stalled(t0 + STALL + Duration::from_secs(1)), Part::ALL.to_vec());
        for p in Part::ALL {
            h.beat(p);
        }
        assert!(h.stalled(Instant::now() + Duration::from_secs(1)).is_empty());
        assert_eq!(h.stalled(Instant::now() + STALL * 2).len(), 3);
    }

    #[test]
    fn the_first_fatal_failure_is_kept() {
        let h = Health::default();
        assert_eq!(h.fatal(), None);
        h.fail("first");
        h.fail("second");
        assert_eq!(h.fatal().as_deref(), Some("first"));
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        assert_eq!(rt.block_on(h.failed()), "first");
    }
}
