//! The sliding replay window of one receiving session (RFC 6479, as in WireGuard).
//!
//! The underlay may reorder datagrams, so a receiver cannot insist on increasing counters;
//! it remembers which of the last ~2000 counters it has accepted instead. The check and the
//! update are separate calls: [`ReplayWindow::check`] runs before decryption (a cheap
//! rejection of duplicates) and [`ReplayWindow::mark`] only after the tag verified, so a
//! forged packet with a huge counter cannot slide the window and make genuine packets look
//! too old.

/// Bits per word of the bitmap.
const WORD_BITS: u64 = 64;
/// Words in the bitmap: 2048 bits, a power of two so that indexes wrap with a mask.
const WORDS: usize = 32;
/// How far behind the highest counter a packet may arrive: one word less than the bitmap,
/// because the word holding the highest counter is only partly in the window.
const WINDOW: u64 = WORDS as u64 * WORD_BITS - WORD_BITS;

/// Which counters a session has accepted. Fixed size, no allocation.
#[derive(Clone, Debug)]
pub(crate) struct ReplayWindow {
    /// The highest accepted counter plus one (0: nothing accepted yet).
    top: u64,
    bits: [u64; WORDS],
}

impl ReplayWindow {
    pub(crate) fn new() -> ReplayWindow {
        ReplayWindow {
            top: 0,
            bits: [0; WORDS],
        }
    }

    /// Whether `counter` is new and recent enough to be accepted. Changes nothing.
    pub(crate) fn check(&self, counter: u64) -> bool {
        let Some(c) = counter.checked_add(1) else {
            return false;
        };
        if c.saturating_add(WINDOW) < self.top {
            return false;
        }
        if c > self.top {
            return true;
        }
        let (word, bit) = position(c);
        self.bits[word] & bit == 0
    }

    /// Records `counter` as accepted. Call only after [`ReplayWindow::check`] passed and the
    /// packet authenticated.
    pub(crate) fn mark(&mut self, counter: u64) {
        let Some(c) = counter.checked_add(1) else {
            return;
        };
        if c > self.top {
            // Clear the words the window slides over (at most the whole bitmap).
            let old = self.top / WORD_BITS;
            let new = c / WORD_BITS;
            let steps = (new - old).min(WORDS as u64);
            for i in 1..=steps {
                self.bits[((old + i) % WORDS as u64) as usize] = 0;
            }
            self.top = c;
        }
        let (word, bit) = position(c);
        self.bits[word] |= bit;
    }
}

fn position(c: u64) -> (usize, u64) {
    (
        ((c / WORD_BITS) % WORDS as u64) as usize,
        1 << (c % WORD_BITS),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(w: &mut ReplayWindow, c: u64) -> bool {
        let ok = w.check(c);
        if ok {
            w.mark(c);
        }
        ok
    }

    #[test]
    fn window_accepts_new_rejects_seen_and_old() {
        let mut w = ReplayWindow::new();
        assert!(accept(&mut w, 0));
        assert!(!accept(&mut w, 0));
        assert!(accept(&mut w, 5));
        assert!(accept(&mut w, 3));
        assert!(!accept(&mut w, 3));
        assert!(accept(&mut w, 5000));
        assert!(!accept(&mut w, 5));
        assert!(accept(&mut w, 5000 - WINDOW + 1));
        assert!(!accept(&mut w, 5000 - WINDOW - 1));
        // A jump beyond the whole bitmap forgets everything older.
        assert!(accept(&mut w, 1 << 40));
        assert!(!accept(&mut w, 5000));
        assert!(accept(&mut w, (1 << 40) - 1));
        assert!(!accept(&mut w, u64::MAX));
    }

    #[test]
    fn window_matches_a_naive_model() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut w = ReplayWindow::new();
        let mut seen = std::collections::HashSet::new();
        let mut top = 0u64;
        for _ in 0..20_000 {
            let c = top.saturating_sub(2100) + rng.gen_range(0..2300);
            let expect = !seen.contains(&c) && c + 1 + WINDOW >= top;
            assert_eq!(accept(&mut w, c), expect, "counter {c}, top {top}");
            if expect {
                seen.insert(c);
                top = top.max(c + 1);
            }
        }
    }
}
