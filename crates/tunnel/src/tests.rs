//! Behaviour of the sessions, driven between hosts in one process with virtual time: the
//! "network" is a Vec of datagrams per host, which tests may reorder, replay or lose.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use crate::*;

/// Two hosts, 0 and 1; each knows the other as the peer with the other's number.
struct Pair {
    t: Vec<Tunnels>,
    /// Datagrams in flight to each host.
    inbox: [Vec<Vec<u8>>; 2],
    /// Inner packets each host waits to send (no session yet).
    queue: [Vec<Vec<u8>>; 2],
    /// Inner packets each host received (keepalives left out).
    got: [Vec<Vec<u8>>; 2],
    /// Drops seen by each host.
    drops: [Vec<DropReason>; 2],
    now: Instant,
    wall: u64,
}

fn keys(i: usize) -> Keypair {
    Keypair::from_private([i as u8 + 1; 32])
}

fn host(cfg: &Config, i: usize) -> Tunnels {
    let mut t = Tunnels::new(cfg.clone(), keys(i));
    t.set_peer((1 - i) as PeerId, keys(1 - i).public);
    t
}

fn other(i: usize) -> PeerId {
    (1 - i) as PeerId
}

/// The underlay address of host `i`.
fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, i as u8 + 1], 7947))
}

/// The address of a host on the underlay that is not one of the pair.
fn flooder() -> SocketAddr {
    SocketAddr::from(([198, 51, 100, 66], 40000))
}

/// The `k`th of many distinct source addresses.
fn source(k: u32) -> SocketAddr {
    SocketAddr::from(([10, (k >> 16) as u8, (k >> 8) as u8, k as u8], 5000))
}

/// A host that host 1 does not know, and its initiation to host 1: it passes mac1 (made
/// with host 1's public key, which is no secret) and is refused only after the
/// Diffie-Hellman work, as [`DropReason::UnknownPeer`]. What a flood that knows the key
/// (or replays a captured initiation) looks like.
fn stranger(p: &Pair) -> (Tunnels, Vec<u8>) {
    let mut t = Tunnels::new(Config::default(), keys(7));
    t.set_peer(1, keys(1).public);
    let mut out = [0; 256];
    let Seal::Handshake(n) = t.seal(1, b"", &mut out, p.now, p.wall) else {
        panic!("expected an initiation")
    };
    (t, out[..n].to_vec())
}

/// `initiation` with a mac2 made with `t`'s cookie for `from`, as if its sender had been
/// sent that cookie.
fn with_mac2(t: &mut Tunnels, initiation: &[u8], from: SocketAddr, now: Instant) -> Vec<u8> {
    let cookie = t.cookie(from, now);
    let mut d = initiation.to_vec();
    let tag = mac2(&cookie, &d[..INITIATION_LEN - MAC_LEN]);
    d[INITIATION_LEN - MAC_LEN..].copy_from_slice(&tag);
    d
}

/// The mac2 of an initiation.
fn mac2_of(initiation: &[u8]) -> &[u8] {
    &initiation[INITIATION_LEN - MAC_LEN..]
}

/// How many of `results` match.
fn how_many(results: &[(Open, Vec<u8>)], f: impl Fn(&Open) -> bool) -> usize {
    results.iter().filter(|(r, _)| f(r)).count()
}

impl Pair {
    fn new(cfg: Config) -> Pair {
        Pair {
            t: vec![host(&cfg, 0), host(&cfg, 1)],
            inbox: Default::default(),
            queue: Default::default(),
            got: Default::default(),
            drops: Default::default(),
            now: Instant::now(),
            wall: 1_700_000_000_000_000_000,
        }
    }

    /// A pair with a session both ways, counters as they are.
    fn established(cfg: Config) -> Pair {
        let mut p = Pair::new(cfg);
        p.send(0, b"hello");
        p.run();
        assert_eq!(p.got[1], vec![b"hello".to_vec()]);
        assert!(p.t[0].has_session(1) && p.t[1].has_session(0));
        p.got = Default::default();
        p
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.wall += d.as_nanos() as u64;
    }

    /// Host `i` sends `inner` to the other, queueing it if there is no session.
    fn send(&mut self, i: usize, inner: &[u8]) -> Seal {
        let mut out = [0; 2048];
        let r = self.t[i].seal(other(i), inner, &mut out, self.now, self.wall);
        match r {
            Seal::Data(n) => self.inbox[1 - i].push(out[..n].to_vec()),
            Seal::Handshake(n) => {
                self.inbox[1 - i].push(out[..n].to_vec());
                self.queue[i].push(inner.to_vec());
            }
            Seal::Pending => self.queue[i].push(inner.to_vec()),
            Seal::UnknownPeer | Seal::TooLarge | Seal::NoSession => panic!("{r:?}"),
        }
        r
    }

    /// Seals `inner` at host `i` on its session, without putting it on the network.
    fn seal_held(&mut self, i: usize, inner: &[u8]) -> Vec<u8> {
        let mut out = [0; 2048];
        match self.t[i].seal(other(i), inner, &mut out, self.now, self.wall) {
            Seal::Data(n) => out[..n].to_vec(),
            r => panic!("{r:?}"),
        }
    }

    /// Host `i` handles `datagram` from the other host as its shell would.
    fn deliver(&mut self, i: usize, datagram: &[u8]) -> Open {
        self.deliver_from(i, datagram, addr(1 - i))
    }

    /// Host `i` handles `datagram` from `from` as its shell would (what it sends back goes
    /// to the other host, whatever `from` is).
    fn deliver_from(&mut self, i: usize, datagram: &[u8], from: SocketAddr) -> Open {
        let mut out = [0; 2048];
        let r = self.t[i].open(datagram, from, &mut out, self.now);
        match r {
            Open::Data { len, .. } if len > 0 => self.got[i].push(out[..len].to_vec()),
            Open::Data { .. } | Open::Cookie { .. } => {}
            Open::Respond { len, .. } | Open::CookieReply { len } => {
                self.inbox[1 - i].push(out[..len].to_vec())
            }
            Open::Established { len, .. } => {
                self.inbox[1 - i].push(out[..len].to_vec());
                for inner in std::mem::take(&mut self.queue[i]) {
                    self.send(i, &inner);
                }
            }
            Open::Drop(reason) => self.drops[i].push(reason),
        }
        r
    }

    /// Host `i` gets `n` copies of `datagram` from `from`, not one of the pair; what it
    /// makes of each, with the bytes it would send back to `from`.
    fn flood(
        &mut self,
        i: usize,
        datagram: &[u8],
        n: usize,
        from: SocketAddr,
    ) -> Vec<(Open, Vec<u8>)> {
        let mut out = [0; 256];
        (0..n)
            .map(|_| {
                let r = self.t[i].open(datagram, from, &mut out, self.now);
                let sent = match r {
                    Open::Respond { len, .. } | Open::CookieReply { len } => out[..len].to_vec(),
                    _ => Vec::new(),
                };
                (r, sent)
            })
            .collect()
    }

    /// Puts host 1 under load (or keeps it so): a burst of initiations from [`flooder`]
    /// that pass mac1, twice what the load meter lets by.
    fn overload(&mut self, flood: &[u8]) {
        let n = 2 * UNDER_LOAD_PER_SECOND as usize;
        self.flood(1, flood, n, flooder());
        assert!(self.t[1].loaded_until.is_some_and(|u| self.now < u));
    }

    /// Delivers everything in flight, and what that causes, until the network is quiet.
    fn run(&mut self) {
        for _ in 0..100 {
            if self.inbox.iter().all(Vec::is_empty) {
                return;
            }
            for i in 0..2 {
                for d in std::mem::take(&mut self.inbox[i]) {
                    self.deliver(i, &d);
                }
            }
        }
        panic!("the network never went quiet");
    }

    /// Runs both hosts' timers; returns how many initiations they sent.
    fn timers(&mut self) -> usize {
        let mut sent = 0;
        for i in 0..2 {
            let mut out = [0; 256];
            while let Some((peer, n)) = self.t[i].poll_timers(self.now, self.wall, &mut out) {
                assert_eq!(peer, other(i));
                self.inbox[1 - i].push(out[..n].to_vec());
                sent += 1;
            }
        }
        sent
    }

    /// Sends one packet each way and checks it arrives.
    fn assert_talks(&mut self, tag: &[u8]) {
        for i in 0..2 {
            self.send(i, tag);
            self.run();
            assert_eq!(
                self.got[1 - i].pop().as_deref(),
                Some(tag),
                "host {i} to other"
            );
        }
    }
}

#[test]
fn handshake_and_data_both_ways() {
    let mut p = Pair::new(Config::default());
    assert!(matches!(
        p.send(0, b"hello"),
        Seal::Handshake(INITIATION_LEN)
    ));
    assert_eq!(p.send(0, b"again"), Seal::Pending);
    p.run();
    assert_eq!(p.got[1], vec![b"hello".to_vec(), b"again".to_vec()]);
    assert!(matches!(p.send(1, b"world"), Seal::Data(n) if n == 5 + DATA_OVERHEAD));
    p.run();
    assert_eq!(p.got[0], vec![b"world".to_vec()]);
    for i in 0..2 {
        let c = p.t[i].counters();
        assert_eq!(c.handshakes_completed, 1);
        assert_eq!(c.drops_total(), 0);
        let s = p.t[i].peer_stats(other(i)).unwrap();
        assert!(s.established && s.handshakes == 1);
    }
    assert_eq!(p.t[0].counters().handshakes_initiated, 1);
    // Initiator: hello, again, keepalive; responder: world.
    assert_eq!(p.t[0].counters().data_sealed, 3);
    assert_eq!(p.t[1].peer_stats(0).unwrap().rx_bytes, 10);
}

#[test]
fn keepalive_from_established_confirms_the_responder() {
    let mut p = Pair::new(Config::default());
    p.send(0, b"x");
    let init = p.inbox[1].pop().unwrap();
    assert!(matches!(
        p.deliver(1, &init),
        Open::Respond {
            peer: 0,
            len: RESPONSE_LEN
        }
    ));
    assert!(
        !p.t[1].has_session(0),
        "the responder waits for confirmation"
    );
    let resp = p.inbox[0].pop().unwrap();
    assert!(matches!(
        p.deliver(0, &resp),
        Open::Established {
            peer: 1,
            len: DATA_OVERHEAD
        }
    ));
    assert!(p.t[0].has_session(1));
    let keepalive = p.inbox[1].remove(0);
    assert_eq!(p.deliver(1, &keepalive), Open::Data { peer: 0, len: 0 });
    assert!(p.t[1].has_session(0));
    assert!(matches!(p.send(1, b"y"), Seal::Data(_)));
}

#[test]
fn out_of_order_within_the_window_is_accepted() {
    let mut p = Pair::established(Config::default());
    let held: Vec<_> = (0..1500u32)
        .map(|i| p.seal_held(0, &i.to_be_bytes()))
        .collect();
    for d in held.iter().rev() {
        assert!(matches!(p.deliver(1, d), Open::Data { len: 4, .. }));
    }
    assert_eq!(p.got[1].len(), 1500);
    // Far past the window, an old unseen counter is refused.
    let old = p.seal_held(0, b"old");
    for _ in 0..3000 {
        let d = p.seal_held(0, b"new");
        p.deliver(1, &d);
    }
    assert_eq!(p.deliver(1, &old), Open::Drop(DropReason::Replayed));
}

#[test]
fn replays_are_dropped_and_forgeries_do_not_poison_the_window() {
    let mut p = Pair::established(Config::default());
    let first = p.seal_held(0, b"one");
    let second = p.seal_held(0, b"two");
    assert!(matches!(p.deliver(1, &first), Open::Data { .. }));
    assert_eq!(p.deliver(1, &first), Open::Drop(DropReason::Replayed));
    // A forged packet with a huge counter fails authentication and moves nothing.
    let mut forged = second.clone();
    forged[8..16].copy_from_slice(&1_000_000u64.to_be_bytes());
    assert_eq!(p.deliver(1, &forged), Open::Drop(DropReason::AuthFailed));
    assert!(matches!(p.deliver(1, &second), Open::Data { .. }));
    p.assert_talks(b"after");
    let c = p.t[1].counters();
    assert_eq!(c.drops(DropReason::Replayed), 1);
    assert_eq!(c.drops(DropReason::AuthFailed), 1);
}

#[test]
fn tampered_ciphertext_fails_authentication() {
    let mut p = Pair::established(Config::default());
    let mut d = p.seal_held(0, b"payload");
    d[DATA_HEADER_LEN + 2] ^= 1;
    assert_eq!(p.deliver(1, &d), Open::Drop(DropReason::AuthFailed));
    let mut d = p.seal_held(0, b"payload");
    let last = d.len() - 1;
    d[last] ^= 0x80;
    assert_eq!(p.deliver(1, &d), Open::Drop(DropReason::AuthFailed));
    p.assert_talks(b"still fine");
}

#[test]
fn initiation_from_an_unknown_key_is_dropped() {
    let mut p = Pair::new(Config::default());
    let mut stranger = Tunnels::new(Config::default(), keys(7));
    stranger.set_peer(1, keys(1).public);
    let mut out = [0; 256];
    let Seal::Handshake(n) = stranger.seal(1, b"hi", &mut out, p.now, p.wall) else {
        panic!()
    };
    assert_eq!(p.deliver(1, &out[..n]), Open::Drop(DropReason::UnknownPeer));
    assert_eq!(p.t[1].counters().drops(DropReason::UnknownPeer), 1);
    // An initiation meant for another host's key is dropped on its mac1, before any
    // public-key work.
    p.send(0, b"x");
    let init = p.inbox[1].pop().unwrap();
    assert_eq!(
        stranger.open(&init, addr(0), &mut out, p.now),
        Open::Drop(DropReason::BadMac)
    );
    assert_eq!(stranger.counters().handshakes_completed, 0);
}

#[test]
fn initiations_cost_an_hmac_unless_they_know_the_key_and_the_budget_bounds_the_rest() {
    let mut p = Pair::new(Config::default());
    // Random initiations, and a genuine one with any bit of it changed: dropped on mac1.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut out = [0; 256];
    for _ in 0..1000 {
        let mut d = [0u8; INITIATION_LEN];
        for b in d.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        d[..4].copy_from_slice(&[1, 0, 0, 0]);
        assert_eq!(
            p.t[1].open(&d, flooder(), &mut out, p.now),
            Open::Drop(DropReason::BadMac)
        );
    }
    p.send(0, b"x");
    let genuine = p.inbox[1].pop().unwrap();
    // Any bit of what mac1 covers, or of mac1 itself.
    for at in [
        8,
        40,
        INITIATION_LEN - 2 * MAC_LEN - 1,
        INITIATION_LEN - MAC_LEN - 1,
    ] {
        let mut d = genuine.clone();
        d[at] ^= 1;
        assert_eq!(
            p.t[1].open(&d, addr(0), &mut out, p.now),
            Open::Drop(DropReason::BadMac)
        );
    }
    assert_eq!(p.t[1].counters().handshakes_completed, 0);
    // Replays of a genuine one from many addresses, each with a valid mac2 for its address
    // (so neither the load nor the per-source limit turns them away): Diffie-Hellman for
    // the budget's worth, then refused at once until the budget refills.
    let mut dh = 0;
    for k in 0..(2 * HANDSHAKES_PER_SECOND) {
        let from = source(k);
        let d = with_mac2(&mut p.t[1], &genuine, from, p.now);
        match p.t[1].open(&d, from, &mut out, p.now) {
            Open::Drop(DropReason::RateLimited) => {}
            Open::Respond { .. } | Open::Drop(DropReason::StaleInitiation) => dh += 1,
            r => panic!("{r:?}"),
        }
    }
    assert_eq!(dh, HANDSHAKES_PER_SECOND);
    p.advance(Duration::from_millis(100));
    let from = source(10_000);
    let d = with_mac2(&mut p.t[1], &genuine, from, p.now);
    assert_eq!(
        p.t[1].open(&d, from, &mut out, p.now),
        Open::Drop(DropReason::StaleInitiation),
        "Diffie-Hellman work again"
    );
    assert_eq!(
        p.t[1].counters().drops(DropReason::RateLimited),
        u64::from(HANDSHAKES_PER_SECOND)
    );
}

#[test]
fn replayed_initiation_is_stale_and_the_session_keeps_working() {
    let mut p = Pair::new(Config::default());
    p.send(0, b"hello");
    let captured = p.inbox[1][0].clone();
    p.run();
    p.advance(Duration::from_secs(5));
    assert_eq!(
        p.deliver(1, &captured),
        Open::Drop(DropReason::StaleInitiation)
    );
    p.assert_talks(b"unaffected");
    assert_eq!(p.t[1].counters().handshakes_completed, 1);
}

#[test]
fn rekey_by_time_loses_no_packet() {
    let cfg = Config {
        rekey_after_time: Duration::from_secs(10),
        reject_after_time: Duration::from_secs(30),
        ..Config::default()
    };
    let mut p = Pair::established(cfg);
    p.advance(Duration::from_secs(5));
    assert_eq!(p.timers(), 0);
    p.assert_talks(b"before");
    p.advance(Duration::from_secs(6));
    // Packets sealed with the old session, delivered after the switch-over.
    let old_a = p.seal_held(0, b"old a");
    let old_b = p.seal_held(1, b"old b");
    assert_eq!(p.timers(), 1, "only the initiator of the session rekeys");
    assert_eq!(p.t[0].counters().rekeys, 1);
    p.run();
    assert_eq!(p.t[0].counters().handshakes_completed, 2);
    assert!(matches!(p.deliver(1, &old_a), Open::Data { len: 5, .. }));
    assert!(matches!(p.deliver(0, &old_b), Open::Data { len: 5, .. }));
    p.assert_talks(b"after");
    // The old session expires; the new one carries on past the old one's lifetime.
    p.advance(Duration::from_secs(20));
    p.timers();
    p.run();
    assert_eq!(p.deliver(1, &old_a), Open::Drop(DropReason::UnknownIndex));
    p.assert_talks(b"later");
    assert!(p.t[0].counters().sessions_expired >= 1);
}

#[test]
fn responder_rekeys_later_when_the_initiator_does_not() {
    let cfg = Config {
        rekey_after_time: Duration::from_secs(10),
        reject_after_time: Duration::from_secs(60),
        ..Config::default()
    };
    let mut p = Pair::established(cfg);
    p.advance(Duration::from_secs(11));
    // Host 0 "loses" its rekey initiation; host 1 takes over after the margin.
    assert_eq!(p.timers(), 1);
    p.inbox[1].clear();
    p.advance(Duration::from_secs(10));
    assert_eq!(p.t[1].counters().rekeys, 0);
    p.timers();
    assert_eq!(p.t[1].counters().rekeys, 1);
    p.run();
    p.assert_talks(b"rekeyed");
}

#[test]
fn rekey_by_message_count() {
    let cfg = Config {
        rekey_after_messages: 5,
        ..Config::default()
    };
    let mut p = Pair::established(cfg);
    let held: Vec<_> = (0..6).map(|_| p.seal_held(0, b"m")).collect();
    assert_eq!(p.timers(), 1);
    assert_eq!(p.t[0].counters().rekeys, 1);
    // Still sealing on the old session while the handshake is under way.
    let during = p.seal_held(0, b"during");
    p.run();
    for d in held.iter().chain([&during]) {
        assert!(matches!(p.deliver(1, d), Open::Data { .. }));
    }
    assert_eq!(p.timers(), 0);
    p.assert_talks(b"new session");
}

#[test]
fn sessions_expire_after_reject_after_time() {
    let cfg = Config {
        rekey_after_time: Duration::from_secs(1000),
        reject_after_time: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(1000),
        ..Config::default()
    };
    let mut p = Pair::established(cfg);
    let held = p.seal_held(0, b"late");
    p.advance(Duration::from_secs(31));
    assert_eq!(p.deliver(1, &held), Open::Drop(DropReason::Expired));
    p.timers();
    assert!(!p.t[0].has_session(1) && !p.t[1].has_session(0));
    assert_eq!(p.t[0].counters().sessions_expired, 1);
    assert!(matches!(p.send(0, b"again"), Seal::Handshake(_)));
    p.run();
    assert_eq!(p.got[1].pop().as_deref(), Some(&b"again"[..]));
}

#[test]
fn idle_peers_are_torn_down_and_rebuilt_on_demand() {
    let cfg = Config {
        idle_timeout: Duration::from_secs(60),
        ..Config::default()
    };
    let mut p = Pair::established(cfg);
    p.advance(Duration::from_secs(50));
    p.assert_talks(b"busy");
    p.advance(Duration::from_secs(50));
    // Keepalives do not count as activity.
    let keepalive = p.seal_held(0, b"");
    p.deliver(1, &keepalive);
    assert_eq!(p.timers(), 0);
    assert!(p.t[0].has_session(1));
    p.advance(Duration::from_secs(11));
    p.timers();
    for i in 0..2 {
        assert!(!p.t[i].has_session(other(i)));
        assert_eq!(p.t[i].counters().idle_teardowns, 1);
    }
    assert!(matches!(p.send(1, b"wake"), Seal::Handshake(_)));
    p.run();
    assert_eq!(p.got[0].pop().as_deref(), Some(&b"wake"[..]));
}

#[test]
fn lost_initiation_is_retried_then_given_up() {
    let mut p = Pair::new(Config::default());
    p.send(0, b"hello");
    let lost = p.inbox[1].pop().unwrap();
    p.advance(Duration::from_millis(500));
    assert_eq!(p.timers(), 0);
    p.advance(Duration::from_millis(600));
    assert_eq!(p.timers(), 1);
    assert_ne!(lost[4..8], p.inbox[1][0][4..8], "a fresh index");
    p.run();
    assert_eq!(p.got[1].pop().as_deref(), Some(&b"hello"[..]));
    // The responder accepted the retry; the lost one, arriving late, is stale.
    assert_eq!(p.deliver(1, &lost), Open::Drop(DropReason::StaleInitiation));

    let mut p = Pair::new(Config::default());
    p.send(0, b"hello");
    let mut sent = 1;
    for _ in 0..20 {
        p.inbox[1].clear();
        p.advance(Duration::from_secs(1));
        sent += p.timers();
    }
    assert_eq!(sent, 15, "retries until handshake_timeout");
    assert_eq!(p.t[0].counters().handshake_timeouts, 1);
    assert_eq!(p.t[0].counters().handshakes_initiated, 15);
    assert!(matches!(p.send(0, b"again"), Seal::Handshake(_)));
    p.run();
    assert_eq!(p.got[1].len(), 2, "both queued packets arrive");
}

#[test]
fn simultaneous_initiations_converge() {
    let mut p = Pair::new(Config::default());
    assert!(matches!(p.send(0, b"from 0"), Seal::Handshake(_)));
    assert!(matches!(p.send(1, b"from 1"), Seal::Handshake(_)));
    p.run();
    assert_eq!(p.got[0], vec![b"from 1".to_vec()]);
    assert_eq!(p.got[1], vec![b"from 0".to_vec()]);
    for round in 0..3u8 {
        p.advance(Duration::from_secs(1));
        assert_eq!(p.timers(), 0);
        p.assert_talks(&[round]);
    }
    assert_eq!(p.t[0].counters().drops_total(), 0);
    assert_eq!(p.t[1].counters().drops_total(), 0);
}

#[test]
fn restarted_peer_is_recognised_and_rebuilds() {
    let cfg = Config::default();
    let mut p = Pair::established(cfg.clone());
    p.advance(Duration::from_secs(3));
    p.t[1] = host(&cfg, 1);
    p.send(0, b"to the old process");
    p.run();
    assert_eq!(p.drops[1], vec![DropReason::UnknownIndex]);
    // Host 1's shell knows the source address is peer 0 and starts a handshake.
    let mut out = [0; 256];
    let n = p.t[1].initiate(0, &mut out, p.now, p.wall).unwrap();
    assert_eq!(p.t[1].initiate(0, &mut out, p.now, p.wall), None);
    p.inbox[0].push(out[..n].to_vec());
    p.run();
    p.assert_talks(b"together again");

    // Same through seal, after another restart.
    p.advance(Duration::from_secs(3));
    p.t[0] = host(&cfg, 0);
    assert!(matches!(p.send(0, b"fresh"), Seal::Handshake(_)));
    p.run();
    assert_eq!(p.got[1].pop().as_deref(), Some(&b"fresh"[..]));
    p.assert_talks(b"ok");
}

#[test]
fn peers_can_be_changed_and_removed() {
    let mut p = Pair::established(Config::default());
    assert_eq!(p.t[0].peers().collect::<Vec<_>>(), vec![1]);
    p.t[0].set_peer(1, keys(1).public);
    assert!(p.t[0].has_session(1), "same key: nothing changes");
    p.t[0].set_peer(1, keys(9).public);
    assert!(!p.t[0].has_session(1));
    p.t[0].remove_peer(1);
    let mut out = [0; 256];
    assert_eq!(
        p.t[0].seal(1, b"x", &mut out, p.now, p.wall),
        Seal::UnknownPeer
    );
    assert_eq!(p.t[0].peer_stats(1), None);
}

#[test]
fn message_types_and_short_buffers() {
    assert_eq!(message_type(&[1, 0, 0, 0]), Some(TYPE_INITIATION));
    assert_eq!(message_type(&[3, 0, 0, 0, 9]), Some(TYPE_DATA));
    assert_eq!(message_type(&[3, 0, 1, 0]), None);
    assert_eq!(message_type(&[4, 0, 0, 0]), None);
    assert_eq!(message_type(&[2, 0, 0]), None);
    let mut p = Pair::established(Config::default());
    let mut small = [0; 40];
    assert_eq!(
        p.t[0].seal(1, &[0; 9], &mut small, p.now, p.wall),
        Seal::TooLarge
    );
    let d = p.seal_held(0, &[7; 100]);
    assert_eq!(
        p.t[1].open(&d, addr(0), &mut small, p.now),
        Open::Drop(DropReason::TooLarge)
    );
    assert!(matches!(p.deliver(1, &d), Open::Data { len: 100, .. }));
}

#[test]
fn random_datagrams_never_panic() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut p = Pair::established(Config::default());
    let valid = [p.seal_held(0, b"some data"), {
        let mut t = host(&Config::default(), 0);
        let mut out = [0; 256];
        let Seal::Handshake(n) = t.seal(1, b"", &mut out, p.now, p.wall + 1) else {
            panic!()
        };
        out[..n].to_vec()
    }];
    let mut out = vec![0; 2048];
    for round in 0..5000 {
        let d: Vec<u8> = match round % 3 {
            0 => {
                let len = rng.gen_range(0..300);
                let mut d: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                if len >= 4 && rng.gen_bool(0.8) {
                    d[0] = rng.gen_range(0..8);
                    d[1..4].fill(0);
                }
                d
            }
            1 => {
                // Exact lengths of each type, random contents.
                let len = [
                    INITIATION_LEN,
                    RESPONSE_LEN,
                    COOKIE_REPLY_LEN,
                    DATA_OVERHEAD + rng.gen_range(0..64),
                ][rng.gen_range(0..4)];
                let mut d: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                d[0] = [
                    TYPE_INITIATION,
                    TYPE_INITIATION_AESGCM,
                    TYPE_RESPONSE,
                    TYPE_DATA,
                    TYPE_COOKIE_REPLY,
                ][rng.gen_range(0..5)];
                d[1..4].fill(0);
                d
            }
            _ => {
                // A valid message with a few bytes flipped or cut.
                let mut d = valid[rng.gen_range(0..2)].clone();
                for _ in 0..rng.gen_range(1..4) {
                    let i = rng.gen_range(0..d.len());
                    d[i] ^= 1 << rng.gen_range(0..8);
                }
                if rng.gen_bool(0.2) {
                    d.truncate(rng.gen_range(0..d.len()));
                }
                d
            }
        };
        let out_len = rng.gen_range(0..out.len());
        for t in &mut p.t {
            match t.open(&d, flooder(), &mut out[..out_len], p.now) {
                Open::Drop(_) => {}
                // Flips in the unauthenticated header indexes or in mac2 (or flips that
                // cancel out) can leave a valid message valid, and enough of those put the
                // host under load; the contents cannot be forged.
                Open::Respond { .. } | Open::Data { .. } | Open::CookieReply { .. }
                    if round % 3 == 2 => {}
                r => panic!("{r:?} from {d:?}"),
            }
        }
    }
    p.assert_talks(b"unharmed");
}

/// An IK handshake between hosts 0 (initiator) and 1, finished on both sides.
fn finished_handshake(cipher: Cipher) -> (snow::HandshakeState, snow::HandshakeState) {
    let params: snow::params::NoiseParams = cipher.noise_pattern().parse().unwrap();
    let (a, b) = (keys(0), keys(1));
    let mut i = snow::Builder::new(params.clone())
        .local_private_key(&a.private)
        .and_then(|x| x.remote_public_key(&b.public))
        .and_then(|x| x.build_initiator())
        .unwrap();
    let mut r = snow::Builder::new(params)
        .local_private_key(&b.private)
        .and_then(|x| x.build_responder())
        .unwrap();
    let (mut msg, mut payload) = ([0; 256], [0; 256]);
    let n = i.write_message(&[], &mut msg).unwrap();
    r.read_message(&msg[..n], &mut payload).unwrap();
    let n = r.write_message(&[], &mut msg).unwrap();
    i.read_message(&msg[..n], &mut payload).unwrap();
    (i, r)
}

/// The transport is Noise's, nonce layout included, for both ciphers: what ring seals
/// with the split keys, snow's own transport opens.
#[test]
fn transport_is_noise() {
    for cipher in [Cipher::ChaChaPoly, Cipher::AesGcm] {
        let (mut i, r) = finished_handshake(cipher);
        let ours = Transport::from_handshake(&mut i, cipher).unwrap();
        let theirs = r.into_stateless_transport_mode().unwrap();
        for counter in [0, 1, 5, 1 << 40] {
            let mut buf = b"inner bytes".to_vec();
            let tag = ours
                .send
                .seal_in_place_separate_tag(
                    cipher.nonce(counter),
                    ring::aead::Aad::empty(),
                    &mut buf,
                )
                .unwrap();
            buf.extend_from_slice(tag.as_ref());
            let mut out = [0; 64];
            let len = theirs.read_message(counter, &buf, &mut out).unwrap();
            assert_eq!(&out[..len], b"inner bytes", "{cipher:?}");
        }
    }
}

/// A stream's messages sealed and opened in place are snow's transport messages, both
/// ways and for both ciphers; a changed byte or another message's number does not open.
#[test]
fn stream_keys_speak_noise_transport_both_ways() {
    for cipher in [Cipher::ChaChaPoly, Cipher::AesGcm] {
        let (mut i, r) = finished_handshake(cipher);
        let ours = StreamKeys::from_handshake(&mut i, cipher).unwrap();
        let theirs = r.into_stateless_transport_mode().unwrap();
        for counter in [0, 7, 1 << 33] {
            // Ours to theirs.
            let mut buf = [0u8; 64];
            buf[..5].copy_from_slice(b"pages");
            let n = ours.seal_in_place(counter, &mut buf, 5).unwrap();
            assert_eq!(n, 5 + TAG_LEN);
            let mut out = [0; 64];
            let len = theirs.read_message(counter, &buf[..n], &mut out).unwrap();
            assert_eq!(&out[..len], b"pages", "{cipher:?}");
            // Theirs to ours, then the same message changed or misnumbered.
            let n = theirs.write_message(counter, b"request", &mut buf).unwrap();
            let mut msg = buf[..n].to_vec();
            assert_eq!(ours.open_in_place(counter + 1, &mut msg.clone()), None);
            msg[3] ^= 1;
            assert_eq!(ours.open_in_place(counter, &mut msg.clone()), None);
            msg[3] ^= 1;
            let len = ours.open_in_place(counter, &mut msg).unwrap();
            assert_eq!(&msg[..len], b"request", "{cipher:?}");
        }
        // No room for the tag: nothing sealed.
        assert_eq!(ours.seal_in_place(0, &mut [0u8; 20], 5), None);
    }
}

/// Hosts that prefer different ciphers still talk: each session takes its initiator's.
#[test]
fn hosts_with_different_ciphers_talk_both_ways() {
    let cfg = |cipher| Config {
        cipher,
        ..Config::default()
    };
    let mut p = Pair::new(cfg(Cipher::ChaChaPoly));
    p.t[1] = {
        let mut t = Tunnels::new(cfg(Cipher::AesGcm), keys(1));
        t.set_peer(0, keys(0).public);
        t
    };
    p.send(0, b"from a chacha host");
    p.run();
    assert_eq!(p.got[1], vec![b"from a chacha host".to_vec()]);
    p.send(1, b"reply");
    p.run();
    assert_eq!(p.got[0], vec![b"reply".to_vec()]);
    // The other host initiates a session of its own cipher.
    let mut q = Pair::new(cfg(Cipher::ChaChaPoly));
    q.t[1] = {
        let mut t = Tunnels::new(cfg(Cipher::AesGcm), keys(1));
        t.set_peer(0, keys(0).public);
        t
    };
    q.send(1, b"from an aes host");
    q.run();
    assert_eq!(q.got[0], vec![b"from an aes host".to_vec()]);
}

/// Under load, an initiation without mac2 gets a cookie reply and no work; the initiator
/// keeps the cookie, and its retry, with mac2, makes the session.
#[test]
fn under_load_an_initiation_without_mac2_gets_a_cookie_and_the_retry_completes() {
    let mut p = Pair::new(Config::default());
    let (_, flood) = stranger(&p);
    let r = p.flood(1, &flood, 2 * UNDER_LOAD_PER_SECOND as usize, flooder());
    // Before the load: the flooder's burst gets Diffie-Hellman work (and is refused for
    // its key), the rest of its initiations its own limit. Then the load: cookie replies,
    // as many as the flooder's limit allows, then nothing.
    let unknown = |o: &Open| *o == Open::Drop(DropReason::UnknownPeer);
    assert_eq!(how_many(&r, unknown), SOURCE_BURST as usize);
    let cookies = |o: &Open| matches!(o, Open::CookieReply { .. });
    assert_eq!(how_many(&r, cookies), SOURCE_BURST as usize);
    let c = p.t[1].counters();
    assert_eq!(c.drops(DropReason::CookieSent), u64::from(SOURCE_BURST));
    assert!(c.drops(DropReason::UnderLoad) > 0);
    assert!(c.drops(DropReason::SourceRateLimited) > 0);

    p.send(0, b"hello");
    let init = p.inbox[1].pop().unwrap();
    assert_eq!(mac2_of(&init), [0; MAC_LEN], "no cookie yet: mac2 is zero");
    assert_eq!(
        p.deliver(1, &init),
        Open::CookieReply {
            len: COOKIE_REPLY_LEN
        }
    );
    assert!(p.t[1].peers[&0].next.is_none() && !p.t[1].has_session(0));
    assert_eq!(p.t[1].counters().handshakes_completed, 0);
    let reply = p.inbox[0].pop().unwrap();
    assert_eq!(message_type(&reply), Some(TYPE_COOKIE_REPLY));
    assert_eq!(p.deliver(0, &reply), Open::Cookie { peer: 1 });
    assert!(p.inbox.iter().all(Vec::is_empty), "a cookie sends nothing");
    assert!(!p.t[0].has_session(1));

    // A second later, still under load, the retry carries mac2 and is answered.
    p.advance(Duration::from_secs(1));
    p.overload(&flood);
    assert_eq!(p.timers(), 1);
    let retry = p.inbox[1][0].clone();
    assert_ne!(mac2_of(&retry), [0; MAC_LEN]);
    // (Without it, it would not be.)
    let mut out = [0; 256];
    assert!(matches!(
        p.t[1].open(&init, addr(0), &mut out, p.now),
        Open::CookieReply { .. }
    ));
    assert!(matches!(
        p.deliver(1, &retry),
        Open::Respond { peer: 0, .. }
    ));
    p.run();
    assert_eq!(p.got[1], vec![b"hello".to_vec()]);
    assert!(p.t[0].has_session(1) && p.t[1].has_session(0));
    p.assert_talks(b"under load");
}

/// Under load, mac2 must be made with the cookie of the datagram's own source address and
/// port; a forged one, or one for another source, gets a cookie reply and no work. A
/// cookie reply itself must be the one sealed for our initiation.
#[test]
fn forged_mac2_and_cookies_for_other_sources_are_refused() {
    let mut p = Pair::new(Config::default());
    let (_, flood) = stranger(&p);
    p.overload(&flood);
    p.send(0, b"hello");
    p.run();
    assert!(p.t[0].peers[&1].cookie.is_some());
    p.advance(Duration::from_secs(1));
    p.overload(&flood);
    assert_eq!(p.timers(), 1);
    let retry = p.inbox[1].pop().unwrap();
    let mut out = [0; 256];
    let refused = |r: Open| matches!(r, Open::CookieReply { .. });

    let mut forged = retry.clone();
    forged[INITIATION_LEN - 1] ^= 1;
    assert!(refused(p.t[1].open(&forged, addr(0), &mut out, p.now)));
    // A valid cookie, but the flooder's.
    let theirs = with_mac2(&mut p.t[1], &retry, flooder(), p.now);
    assert!(refused(p.t[1].open(&theirs, addr(0), &mut out, p.now)));
    // The genuine one, from another port of the same address, or from another address.
    let mut other_port = addr(0);
    other_port.set_port(7948);
    assert!(refused(p.t[1].open(&retry, other_port, &mut out, p.now)));
    let elsewhere = SocketAddr::from(([192, 0, 2, 77], 7947));
    assert!(refused(p.t[1].open(&retry, elsewhere, &mut out, p.now)));
    assert_eq!(p.t[1].counters().handshakes_completed, 0);
    assert!(p.t[1].peers[&0].next.is_none());

    // Cookie replies that are not for host 0's pending initiation do not replace its
    // cookie: tampered, or sealed for another initiation (the mac1 is the associated data).
    let kept = p.t[0].peers[&1].cookie;
    let Open::CookieReply { len } = p.t[1].open(&retry, elsewhere, &mut out, p.now) else {
        panic!("expected a cookie reply")
    };
    let mut tampered = out[..len].to_vec();
    tampered[COOKIE_REPLY_LEN - 20] ^= 1;
    assert_eq!(p.deliver(0, &tampered), Open::Drop(DropReason::AuthFailed));
    let mut other = out[..len].to_vec();
    let Open::CookieReply { len } = p.t[1].open(&flood, elsewhere, &mut out, p.now) else {
        panic!("expected a cookie reply")
    };
    // Addressed to host 0's pending index, sealed for the flooder's initiation.
    let index = other[4..8].to_vec();
    other.copy_from_slice(&out[..len]);
    other[4..8].copy_from_slice(&index);
    assert_eq!(p.deliver(0, &other), Open::Drop(DropReason::AuthFailed));
    assert_eq!(p.t[0].peers[&1].cookie, kept);

    // The genuine one from its own address is answered.
    assert!(matches!(
        p.deliver(1, &retry),
        Open::Respond { peer: 0, .. }
    ));
    p.run();
    assert_eq!(p.got[1], vec![b"hello".to_vec()]);
}

/// A source that floods initiations with a valid mac1 and, having a real address, a valid
/// mac2 gets no more than its own limit; the global budget is never reached, and a peer
/// from another address completes its handshake in the middle of the flood.
#[test]
fn a_flooding_source_is_limited_and_other_sources_still_handshake() {
    let mut p = Pair::new(Config::default());
    let (mut s, first) = stranger(&p);
    // The flooder gets a cookie the honest way.
    let r = p.flood(1, &first, 2 * UNDER_LOAD_PER_SECOND as usize, flooder());
    let (_, reply) = r
        .iter()
        .find(|(o, _)| matches!(o, Open::CookieReply { .. }))
        .expect("a cookie reply");
    let mut out = [0; 256];
    assert_eq!(
        s.open(reply, addr(1), &mut out, p.now),
        Open::Cookie { peer: 1 }
    );
    let n = s.start_handshake(1, &mut out, p.now, p.wall).unwrap();
    let valid = out[..n].to_vec();
    assert_ne!(mac2_of(&valid), [0; MAC_LEN]);

    // 1000 a second for two seconds; host 0 starts a handshake half a second in.
    let mut flood = Vec::new();
    for ms in 0..2000 {
        p.advance(Duration::from_millis(1));
        flood.extend(p.flood(1, &valid, 1, flooder()));
        if ms == 500 {
            p.send(0, b"hello");
        }
        p.timers();
        p.run();
    }
    let dh = how_many(&flood, |o| *o == Open::Drop(DropReason::UnknownPeer));
    let limited = how_many(&flood, |o| *o == Open::Drop(DropReason::SourceRateLimited));
    let most = SOURCE_BURST + 2 * SOURCE_HANDSHAKES_PER_SECOND;
    assert!(
        dh >= 2 * SOURCE_HANDSHAKES_PER_SECOND as usize && dh <= most as usize,
        "{dh} Diffie-Hellman for the flooder"
    );
    assert_eq!(dh + limited, 2000, "all with a valid mac2, under load");
    assert_eq!(p.t[1].counters().drops(DropReason::RateLimited), 0);
    assert!(p.t[0].peers[&1].cookie.is_some(), "host 0 needed a cookie");
    assert_eq!(p.got[1], vec![b"hello".to_vec()]);
    assert!(p.t[0].has_session(1) && p.t[1].has_session(0));
    assert!(p.t[1].loaded_until.is_some_and(|u| p.now < u));
}

/// A cookie reply is smaller than the initiation it answers, a source gets no more than
/// its limit of them, and all sources together no more than the host's.
#[test]
fn cookie_replies_are_smaller_than_initiations_and_rate_limited() {
    let mut p = Pair::new(Config::default());
    let (_, flood) = stranger(&p);
    // A victim's address, spoofed: the victim gets a few small replies for many
    // initiations.
    let victim = SocketAddr::from(([203, 0, 113, 9], 53));
    let r = p.flood(1, &flood, 1000, victim);
    let received: usize = 1000 * flood.len();
    let sent: Vec<_> = r.iter().filter(|(_, b)| !b.is_empty()).collect();
    assert_eq!(sent.len(), SOURCE_BURST as usize);
    for (o, bytes) in &r {
        if let Open::CookieReply { len } = o {
            assert_eq!(*len, COOKIE_REPLY_LEN);
            assert_eq!(bytes.len(), COOKIE_REPLY_LEN);
            assert!(bytes.len() < flood.len());
        }
    }
    assert_eq!(flood.len(), INITIATION_LEN);
    assert!(sent.iter().map(|(_, b)| b.len()).sum::<usize>() * 100 < received);
    // Many spoofed sources at once: the host's own limit.
    let mut replies = 0;
    for k in 0..(COOKIE_REPLIES_PER_SECOND + 500) {
        let r = p.flood(1, &flood, 1, source(k));
        replies += how_many(&r, |o| matches!(o, Open::CookieReply { .. }));
    }
    assert_eq!(
        replies,
        COOKIE_REPLIES_PER_SECOND as usize - SOURCE_BURST as usize
    );
    p.advance(Duration::from_millis(100));
    let r = p.flood(1, &flood, 1, source(1_000_000));
    assert_eq!(how_many(&r, |o| matches!(o, Open::CookieReply { .. })), 1);
}

/// The cookie secret is replaced every two minutes: a cookie is the same for its source
/// for that long and no longer; an initiator whose cookie was made with the old secret is
/// sent a new one, and gets through with that.
#[test]
fn cookie_secret_rotates_every_two_minutes() {
    let mut p = Pair::new(Config::default());
    let t0 = p.now;
    let secs = Duration::from_secs;
    let c = p.t[1].cookie(addr(0), t0);
    assert_eq!(c, p.t[1].cookie(addr(0), t0 + secs(119)));
    assert_ne!(c, p.t[1].cookie(flooder(), t0 + secs(119)));
    let mut other_port = addr(0);
    other_port.set_port(1);
    assert_ne!(c, p.t[1].cookie(other_port, t0 + secs(119)));
    let c2 = p.t[1].cookie(addr(0), t0 + COOKIE_LIFETIME);
    assert_ne!(c, c2);
    assert_eq!(c2, p.t[1].cookie(addr(0), t0 + secs(239)));

    // End to end: host 0 gets a cookie 110 s into the secret's life and uses it 11 s later.
    let mut p = Pair::new(Config::default());
    let (_, flood) = stranger(&p);
    p.overload(&flood);
    p.advance(secs(110));
    p.overload(&flood);
    p.send(0, b"hello");
    p.run();
    let first = p.t[0].peers[&1].cookie.expect("a cookie").0;
    p.advance(secs(11));
    p.overload(&flood);
    assert_eq!(p.timers(), 1);
    let retry = p.inbox[1].pop().unwrap();
    assert_ne!(
        mac2_of(&retry),
        [0; MAC_LEN],
        "the cookie is 11 s old: still used"
    );
    assert!(matches!(p.deliver(1, &retry), Open::CookieReply { .. }));
    assert!(!p.t[1].has_session(0) && p.t[1].peers[&0].next.is_none());
    p.run();
    let second = p.t[0].peers[&1].cookie.expect("a cookie").0;
    assert_ne!(first, second, "a cookie of the new secret");
    p.advance(secs(1));
    p.overload(&flood);
    assert_eq!(p.timers(), 1);
    p.run();
    assert_eq!(p.got[1], vec![b"hello".to_vec()]);
    assert!(p.t[0].has_session(1) && p.t[1].has_session(0));
}

/// An initiator puts its cookie in mac2 for two minutes after it came, then zeros.
#[test]
fn initiators_use_a_cookie_for_two_minutes() {
    let mut p = Pair::new(Config::default());
    let (_, flood) = stranger(&p);
    p.overload(&flood);
    p.send(0, b"hello");
    p.run();
    let (cookie, at) = p.t[0].peers[&1].cookie.expect("a cookie");
    assert_eq!(cookie, p.t[1].cookie(addr(0), p.now));
    let mut out = [0; 256];
    for (age, used) in [(0, true), (119, true), (120, false), (500, false)] {
        let now = at + Duration::from_secs(age);
        let n = p.t[0].start_handshake(1, &mut out, now, p.wall).unwrap();
        assert_eq!(n, INITIATION_LEN);
        let expected = if used {
            mac2(&cookie, &out[..INITIATION_LEN - MAC_LEN])
        } else {
            [0; MAC_LEN]
        };
        assert_eq!(mac2_of(&out[..n]), expected, "{age} s");
    }
}

#[test]
fn next_timer_names_when_the_timers_have_work() {
    let cfg = Config::default();
    let mut p = Pair::new(cfg.clone());
    assert_eq!(p.t[0].next_timer(), None, "nothing pending, nothing due");
    let sent = p.now;
    p.send(0, b"hello");
    p.inbox[1].clear();
    assert_eq!(p.t[0].next_timer(), Some(sent + cfg.handshake_retry));
    // Just before it, nothing to do; at it, the retry.
    p.advance(cfg.handshake_retry - Duration::from_millis(1));
    assert_eq!(p.timers(), 0);
    p.advance(Duration::from_millis(1));
    assert_eq!(p.timers(), 1);
    p.run();
    // Established: the initiator's next work is the rekey or the idle teardown.
    let due = p.t[0].next_timer().unwrap();
    assert!(
        due > p.now && due <= p.now + cfg.rekey_after_time,
        "{due:?}"
    );
    p.advance(due - p.now - Duration::from_millis(1));
    p.timers();
    assert!(
        p.t[0].has_session(other(0)),
        "nothing happened before it was due"
    );
}
