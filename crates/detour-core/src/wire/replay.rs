//! Anti-replay sliding window (RFC 6479 bitmap style).
//!
//! Accepts every counter at most once, and counters up to [`WINDOW`] − 64 behind the
//! highest one seen, so reordering across GSO batches and paths is tolerated.
//! The window is only updated for packets that passed authentication.
//!
//! **Sizing for multipath.** All paths of a session share one counter space, so when
//! REPLEX splits a peer's traffic over a direct path and a slower relay path, the packets
//! of the slower path arrive behind by (packet rate of the session × delay difference of
//! the paths). The window must cover that, or legitimate packets look like replays: at
//! 400,000 packets/s (4.8 Gbit/s of 1,500-byte packets, above what one data thread
//! carries here) and a relay path 150 ms slower, 60,000 counters. [`WINDOW`] is 65,536
//! (8 KB of bitmap per session, on the heap; a session exists only for peers with a
//! management session). WireGuard's 8,192 (RFC 6479 with 2,048 bits in the kernel) is
//! sized for one path.

/// Counters this far behind the newest are still accepted (bits): 65,536, see the module
/// documentation for the bound it is sized from.
pub const WINDOW: u64 = 65_536;
const BLOCKS: usize = (WINDOW / 64) as usize;

/// Per-session replay state (8 KB bitmap on the heap).
#[derive(Clone)]
pub struct ReplayWindow {
    highest: u64,
    seen_any: bool,
    bitmap: Box<[u64; BLOCKS]>,
}

impl Default for ReplayWindow {
    fn default() -> Self {
        ReplayWindow { highest: 0, seen_any: false, bitmap: Box::new([0; BLOCKS]) }
    }
}

impl ReplayWindow {
    /// True if `counter` would be accepted (not seen, not too old). Does not record it.
    pub fn check(&self, counter: u64) -> bool {
        if !self.seen_any || counter > self.highest {
            return true;
        }
        if self.highest - counter >= WINDOW - 64 {
            return false;
        }
        let (block, bit) = Self::pos(counter);
        self.bitmap[block] & (1u64 << bit) == 0
    }

    /// Records `counter` as seen; returns false (and changes nothing) if it is a replay or
    /// too old. Call only after the packet authenticated.
    pub fn update(&mut self, counter: u64) -> bool {
        if !self.check(counter) {
            return false;
        }
        if !self.seen_any || counter > self.highest {
            let old_block = if self.seen_any { self.highest / 64 } else { 0 };
            let new_block = counter / 64;
            let clear = (new_block - old_block).min(BLOCKS as u64);
            for i in 1..=clear {
                let b = ((old_block + i) % BLOCKS as u64) as usize;
                self.bitmap[b] = 0;
            }
            if !self.seen_any {
                self.bitmap.fill(0);
            }
            self.highest = counter;
            self.seen_any = true;
        }
        let (block, bit) = Self::pos(counter);
        self.bitmap[block] |= 1u64 << bit;
        true
    }

    fn pos(counter: u64) -> (usize, u32) {
        (((counter / 64) % BLOCKS as u64) as usize, (counter % 64) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    #[test]
    fn accepts_once_in_order_and_reordered() {
        let mut w = ReplayWindow::default();
        assert!(w.update(0));
        assert!(!w.update(0));
        assert!(w.update(5));
        assert!(w.update(3));
        assert!(!w.update(3));
        assert!(w.update(1000));
        assert!(w.update(4));
        assert!(!w.update(5));
    }

    #[test]
    fn too_old_is_refused() {
        let mut w = ReplayWindow::default();
        let top = 3 * WINDOW;
        assert!(w.update(top));
        assert!(!w.update(top - WINDOW));
        assert!(w.update(top - 100));
        assert!(w.update(top - (WINDOW - 65)), "the oldest counter still accepted");
    }

    #[test]
    fn a_slower_path_sixty_thousand_counters_behind_is_not_a_replay() {
        // Two paths of one session: every other packet takes a path that delivers it
        // 60,000 counters later (400 kpps, 150 ms slower); none is refused, and a
        // replay of any of them still is.
        let mut w = ReplayWindow::default();
        let lag = 60_000u64;
        let mut fast = 0u64;
        let mut slow = Vec::new();
        for c in 0..200_000u64 {
            if c % 2 == 0 {
                assert!(w.update(c), "fast {c}");
                fast = c;
            } else {
                slow.push(c);
            }
            while slow.first().is_some_and(|s| fast >= s + lag) {
                let s = slow.remove(0);
                assert!(w.update(s), "slow {s} behind {fast}");
                assert!(!w.update(s), "replay of {s}");
            }
        }
    }

    #[test]
    fn big_jump_clears_the_window() {
        let mut w = ReplayWindow::default();
        for c in 0..200 {
            assert!(w.update(c));
        }
        assert!(w.update(1_000_000));
        assert!(w.update(1_000_000 - 70));
        assert!(!w.update(1_000_000 - 70));
    }

    proptest! {
        /// Against a reference model: a counter is accepted iff it was never accepted before
        /// and lies within the window of the highest accepted counter.
        #[test]
        fn matches_reference_model(seq in proptest::collection::vec(0u64..5 * WINDOW, 1..400)) {
            let mut w = ReplayWindow::default();
            let mut seen = HashSet::new();
            let mut highest: Option<u64> = None;
            for c in seq {
                let fresh = !seen.contains(&c);
                let in_window = match highest { None => true, Some(h) => c > h || h - c < WINDOW - 64 };
                let expect = fresh && in_window;
                prop_assert_eq!(w.update(c), expect, "counter {}", c);
                if expect {
                    seen.insert(c);
                    highest = Some(highest.map_or(c, |h| h.max(c)));
                }
            }
        }
    }
}
