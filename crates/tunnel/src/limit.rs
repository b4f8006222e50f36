//! Rate limits of handshake work, in virtual time: the global handshake budget, the load
//! meter, the cookie-reply budget and the per-source limits all use [`Bucket`].
//!
//! A bucket is a token bucket kept as a single instant, the one at which it would be full
//! again (the "theoretical arrival time" of the generic cell rate algorithm). Taking a token
//! pushes that instant one interval (`1 / per_second`) later; a token is left while it is
//! at most `burst - 1` intervals ahead of now. That is exact (no rounding of partial
//! refills), needs no refill step, and makes "this bucket is full, forgetting it changes
//! nothing" a single comparison, which the bounded source table relies on.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// A refill rate and a burst.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rate {
    /// Time to refill one token.
    interval: Duration,
    /// How far ahead of now the full-again instant may be while a token is left:
    /// `burst - 1` intervals.
    slack: Duration,
}

impl Rate {
    /// `per_second` tokens a second, at most `burst` at once (both at least 1).
    pub(crate) const fn new(per_second: u32, burst: u32) -> Rate {
        let interval = Duration::from_nanos(1_000_000_000 / per_second as u64);
        let slack = Duration::from_nanos(interval.as_nanos() as u64 * (burst as u64 - 1));
        Rate { interval, slack }
    }
}

/// A token bucket, full when new.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Bucket {
    /// When the bucket is full again; `None`: never used (full).
    full_at: Option<Instant>,
}

impl Bucket {
    /// Takes a token; false (and nothing taken) when there is none.
    pub(crate) fn take(&mut self, rate: Rate, now: Instant) -> bool {
        let full_at = self.full_at.map_or(now, |t| t.max(now));
        if full_at.saturating_duration_since(now) > rate.slack {
            return false;
        }
        // Overflow would need an `Instant` near the end of time; refuse rather than panic.
        match full_at.checked_add(rate.interval) {
            Some(t) => {
                self.full_at = Some(t);
                true
            }
            None => false,
        }
    }

    /// Whether the bucket is full at `now`: the same as a new one.
    pub(crate) fn is_full(&self, now: Instant) -> bool {
        self.full_at.is_none_or(|t| t <= now)
    }
}

/// What is limited per source address.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Source {
    /// Initiations given Diffie-Hellman work.
    pub(crate) handshakes: Bucket,
    /// Cookie replies sent. Apart from `handshakes` so that a flood spoofing a peer's
    /// address (which gets cookie replies, never a valid mac2) cannot use up the tokens that
    /// peer's own initiations, carrying a valid mac2, need.
    pub(crate) cookies: Bucket,
}

impl Source {
    fn is_full(&self, now: Instant) -> bool {
        self.handshakes.is_full(now) && self.cookies.is_full(now)
    }
}

/// Whose initiations share a limit: an IPv4 address, or the /64 prefix of an IPv6 one (a
/// single IPv6 host usually holds a whole /64, so per address would limit nothing).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum SourceKey {
    V4([u8; 4]),
    V6([u8; 8]),
}

impl SourceKey {
    pub(crate) fn of(ip: IpAddr) -> SourceKey {
        // A dual-stack socket reports IPv4 peers as IPv4-mapped IPv6 addresses.
        match ip.to_canonical() {
            IpAddr::V4(v4) => SourceKey::V4(v4.octets()),
            IpAddr::V6(v6) => {
                let mut prefix = [0; 8];
                prefix.copy_from_slice(&v6.octets()[..8]);
                SourceKey::V6(prefix)
            }
        }
    }
}

/// The limits of at most `capacity` sources. A source not in the table has full buckets,
/// so forgetting one whose buckets are full again loses nothing; when the table is full of
/// sources that are not, the oldest entry is evicted, which hands that source a fresh burst.
/// An attacker needs `capacity` other addresses to do that, and the global handshake budget
/// still bounds what all sources together get.
///
/// The map is std's `HashMap`, whose hash is keyed randomly per process: addresses chosen
/// to collide cannot turn lookups into linear scans.
#[derive(Debug)]
pub(crate) struct Sources {
    capacity: usize,
    map: HashMap<SourceKey, Source>,
    /// The keys of `map`, oldest first.
    order: VecDeque<SourceKey>,
}

/// Entries checked for forgetting per new source: constant work per initiation, and more
/// than one so that forgetting keeps ahead of insertion.
const SWEEP: usize = 2;

impl Sources {
    pub(crate) fn new(capacity: usize) -> Sources {
        Sources {
            capacity: capacity.max(1),
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// The limits of `ip`'s source, made (full) if it was not tracked.
    pub(crate) fn get(&mut self, ip: IpAddr, now: Instant) -> &mut Source {
        let key = SourceKey::of(ip);
        if !self.map.contains_key(&key) {
            for _ in 0..SWEEP {
                let Some(oldest) = self.order.front() else {
                    break;
                };
                if !self.map.get(oldest).is_none_or(|s| s.is_full(now)) {
                    break;
                }
                if let Some(oldest) = self.order.pop_front() {
                    self.map.remove(&oldest);
                }
            }
            if self.map.len() >= self.capacity {
                if let Some(oldest) = self.order.pop_front() {
                    self.map.remove(&oldest);
                }
            }
            self.order.push_back(key);
        }
        self.map.entry(key).or_default()
    }

    /// Sources tracked.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn bucket_gives_the_burst_then_the_rate() {
        let rate = Rate::new(20, 5);
        let t0 = Instant::now();
        let mut b = Bucket::default();
        assert!(b.is_full(t0));
        assert_eq!((0..10).filter(|_| b.take(rate, t0)).count(), 5);
        assert!(!b.is_full(t0));
        // One token per 50 ms.
        assert!(!b.take(rate, t0 + Duration::from_millis(49)));
        assert!(b.take(rate, t0 + Duration::from_millis(50)));
        assert!(!b.take(rate, t0 + Duration::from_millis(50)));
        // Then one every 50 ms: at 100, 150, ..., 1050 ms.
        let mut got = 0;
        for ms in (51..1100).step_by(5) {
            got += usize::from(b.take(rate, t0 + Duration::from_millis(ms)));
        }
        assert_eq!(got, 20);
        // Full again after `burst` intervals of silence, not before.
        assert!(!b.is_full(t0 + Duration::from_millis(1050 + 249)));
        assert!(b.is_full(t0 + Duration::from_millis(1050 + 250)));
    }

    #[test]
    fn sources_are_bounded_and_full_ones_forgotten() {
        let rate = Rate::new(20, 5);
        let t0 = Instant::now();
        let mut s = Sources::new(4);
        let ip = |i: u8| IpAddr::V4(Ipv4Addr::new(192, 0, 2, i));
        for i in 0..4 {
            let src = s.get(ip(i), t0);
            for _ in 0..5 {
                assert!(src.handshakes.take(rate, t0));
            }
        }
        assert_eq!(s.len(), 4);
        // Full table of drained sources: the oldest (0) is evicted.
        s.get(ip(9), t0);
        assert_eq!(s.len(), 4);
        assert!(!s.get(ip(1), t0).handshakes.take(rate, t0));
        assert!(s.get(ip(0), t0).handshakes.take(rate, t0), "fresh burst");
        // A second later every bucket is full again: new sources sweep the old ones away.
        let later = t0 + Duration::from_secs(1);
        for i in 20..30 {
            s.get(ip(i), later);
        }
        assert!(s.len() <= 4);
        // IPv6 sources share a /64; IPv4-mapped ones count as IPv4.
        let mut s = Sources::new(16);
        let a: Ipv6Addr = "2001:db8:1:2::1".parse().unwrap();
        let b: Ipv6Addr = "2001:db8:1:2:ffff::9".parse().unwrap();
        for _ in 0..5 {
            assert!(s.get(IpAddr::V6(a), t0).handshakes.take(rate, t0));
        }
        assert!(!s.get(IpAddr::V6(b), t0).handshakes.take(rate, t0));
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 7).to_ipv6_mapped());
        assert_eq!(SourceKey::of(mapped), SourceKey::of(ip(7)));
    }
}
