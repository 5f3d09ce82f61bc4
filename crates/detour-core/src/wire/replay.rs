//! Anti-replay sliding window (RFC 6479 bitmap style).
//!
//! Accepts every counter at most once, and counters up to [`WINDOW`] − 64 behind the
//! highest one seen, so reordering across GSO batches and relay paths is tolerated.
//! The window is only updated for packets that passed authentication.

/// Counters this far behind the newest are still accepted (bits).
pub const WINDOW: u64 = 4096;
const BLOCKS: usize = (WINDOW / 64) as usize;

/// Per-session replay state.
#[derive(Clone)]
pub struct ReplayWindow {
    highest: u64,
    seen_any: bool,
    bitmap: [u64; BLOCKS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        ReplayWindow { highest: 0, seen_any: false, bitmap: [0; BLOCKS] }
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
                self.bitmap = [0; BLOCKS];
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
        assert!(w.update(10_000));
        assert!(!w.update(10_000 - WINDOW));
        assert!(w.update(10_000 - 100));
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
        fn matches_reference_model(seq in proptest::collection::vec(0u64..20_000, 1..400)) {
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
