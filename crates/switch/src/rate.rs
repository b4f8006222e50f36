//! Bandwidth limits: a token bucket per port and direction.
//!
//! A bucket fills at the limit's rate up to a burst. A packet takes its size from the bucket,
//! which may go into debt down to minus one burst; beyond that the packet is dropped.
//!
//! Dropping alone (policing) makes TCP collapse far below the limit on the short round trips
//! between instances: whole windows are lost and wait for retransmission timeouts. So the
//! switch also tells the shell how long a port must wait before its next packet
//! ([`crate::Switch::port_delay`]): while its own bucket, or the bucket of the local port
//! it last sent to, is in debt, the shell leaves the port's device unread. The kernel then
//! holds the instance's packets in the device queue and slows its sockets down, without
//! loss, which is shaping. Sources that cannot be paused (the underlay, the egress device)
//! are policed.

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
    /// Bits held at `last`; negative: debt.
    tokens: i64,
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
        let burst = burst.min(i64::MAX as u64 / 4);
        TokenBucket {
            rate,
            burst,
            tokens: burst as i64,
            last: None,
        }
    }

    /// The rate, bits per second.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    fn refill(&mut self, now: Instant) {
        let Some(last) = self.last else {
            self.last = Some(now);
            return;
        };
        // A `now` earlier than the last one (clocks of different callers) adds nothing.
        let elapsed = now.saturating_duration_since(last).as_nanos();
        let added = u128::from(self.rate) * elapsed / 1_000_000_000;
        // Time that added less than a bit is kept for the next call.
        if added > 0 {
            let tokens = (i128::from(self.tokens) + added as i128).min(i128::from(self.burst));
            self.tokens = tokens as i64;
            self.last = Some(now);
        }
    }

    /// Whether a packet of `len` bytes may pass at `now` without debt; if so its bits are
    /// taken.
    pub fn allow(&mut self, len: usize, now: Instant) -> bool {
        self.refill(now);
        let need = len as i64 * 8;
        if self.tokens >= need {
            self.tokens -= need;
            true
        } else {
            false
        }
    }

    /// Takes a packet of `len` bytes at `now`, going into debt if need be; false (nothing
    /// taken) if that would put the bucket more than one burst in debt.
    pub fn take(&mut self, len: usize, now: Instant) -> bool {
        self.refill(now);
        let need = len as i64 * 8;
        if self.tokens - need >= -(self.burst as i64) {
            self.tokens -= need;
            true
        } else {
            false
        }
    }

    /// How long until the bucket is out of debt (`None`: it is not in debt now).
    pub fn delay(&mut self, now: Instant) -> Option<Duration> {
        self.refill(now);
        if self.tokens >= 0 || self.rate == 0 {
            return None;
        }
        let nanos = (-(self.tokens as i128)) as u128 * 1_000_000_000 / u128::from(self.rate) + 1;
        Some(Duration::from_nanos(nanos.min(u128::from(u64::MAX)) as u64))
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
    fn debt_then_delay() {
        let t0 = Instant::now();
        // 8000 bit/s, burst 8000 bits: a 1000-byte packet empties it, a second goes into debt.
        let mut b = TokenBucket::with_burst(8_000, 8_000);
        assert_eq!(b.delay(t0), None);
        assert!(b.take(1000, t0));
        assert!(b.take(1000, t0));
        assert!(!b.take(1, t0), "at most one burst of debt");
        let d = b.delay(t0).unwrap();
        assert!(
            d > Duration::from_millis(999) && d <= Duration::from_millis(1001),
            "{d:?}"
        );
        assert_eq!(b.delay(t0 + d), None);
    }

    #[test]
    fn default_burst() {
        assert_eq!(TokenBucket::new(50_000_000).burst, 2_000_000);
        assert_eq!(TokenBucket::new(10_000).burst, MIN_BURST_BYTES * 8);
    }
}
