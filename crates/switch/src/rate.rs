//! Bandwidth limits: a token bucket per port and direction.
//!
//! A bucket fills at the limit's rate up to a burst, and a packet passes if the bucket holds
//! its size; otherwise it is dropped (policing, not shaping: the switch holds no queue, and
//! TCP adapts its rate to the drops). The burst is what lets TCP reach the limit: too small,
//! and every window's burst loses packets and the rate collapses below the limit.

use std::time::{Duration, Instant};

/// How much traffic, as time at the limit's rate, a bucket holds when full.
pub const BURST: Duration = Duration::from_millis(40);
/// The smallest burst, so that a few full-size packets always pass at once.
pub const MIN_BURST_BYTES: u64 = 32 * 1024;

/// A token bucket counting bits. No allocation, no clock: the caller passes `now`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenBucket {
    /// Bits per second.
    rate: u64,
    /// Most bits held.
    burst: u64,
    /// Bits held at `last`.
    tokens: u64,
    last: Option<Instant>,
}

impl TokenBucket {
    /// A full bucket for `rate` bits per second, with the default burst.
    pub fn new(rate: u64) -> Self {
        let burst =
            ((u128::from(rate) * BURST.as_nanos() / 1_000_000_000) as u64).max(MIN_BURST_BYTES * 8);
        Self::with_burst(rate, burst)
    }

    /// A full bucket for `rate` bits per second holding at most `burst` bits.
    pub fn with_burst(rate: u64, burst: u64) -> Self {
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: None,
        }
    }

    /// The rate, bits per second.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Whether a packet of `len` bytes may pass at `now`; if so its bits are taken.
    pub fn allow(&mut self, len: usize, now: Instant) -> bool {
        if let Some(last) = self.last {
            // A `now` earlier than the last one (clocks of different callers) adds nothing.
            let elapsed = now.saturating_duration_since(last).as_nanos();
            let added = u128::from(self.rate) * elapsed / 1_000_000_000;
            // Time that added less than a bit is kept for the next call.
            if added > 0 {
                self.tokens = (u128::from(self.tokens) + added).min(u128::from(self.burst)) as u64;
                self.last = Some(now);
            }
        } else {
            self.last = Some(now);
        }
        let need = len as u64 * 8;
        if self.tokens >= need {
            self.tokens -= need;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_the_burst_then_the_rate() {
        let t0 = Instant::now();
        // 8 Mbit/s = 1,000,000 bytes/s; burst 10,000 bytes.
        let mut b = TokenBucket::with_burst(8_000_000, 80_000);
        let mut passed = 0;
        for _ in 0..20 {
            if b.allow(1000, t0) {
                passed += 1;
            }
        }
        assert_eq!(passed, 10, "the burst");
        // One second of 1000-byte packets every 100 µs (10 MB/s offered): 1 MB/s passes.
        let mut bytes = 0u64;
        for i in 1..=10_000u64 {
            if b.allow(1000, t0 + Duration::from_micros(100 * i)) {
                bytes += 1000;
            }
        }
        assert!((990_000..=1_010_000).contains(&bytes), "{bytes}");
    }

    #[test]
    fn refills_only_up_to_the_burst_and_tolerates_time_going_back() {
        let t0 = Instant::now();
        let mut b = TokenBucket::with_burst(8_000, 8_000);
        assert!(b.allow(1000, t0));
        assert!(!b.allow(1, t0));
        assert!(!b.allow(1, t0 - Duration::from_millis(5)));
        // An hour later the bucket is full, not an hour's worth.
        let later = t0 + Duration::from_secs(3600);
        assert!(b.allow(1000, later));
        assert!(!b.allow(1, later));
    }

    #[test]
    fn default_burst() {
        assert_eq!(TokenBucket::new(50_000_000).burst, 2_000_000);
        assert_eq!(TokenBucket::new(10_000).burst, MIN_BURST_BYTES * 8);
    }
}
