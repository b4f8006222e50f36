//! Untrusted input: data messages on an established session, as anyone on the underlay may
//! send or alter them. Two endpoints complete a handshake; then the input (records,
//! `vane_fuzz::Records`) has the initiator seal messages, delivers them in any order and
//! any number of times, delivers them with bytes flipped, cut or added, sends forgeries
//! that carry the session's real index, and raw datagrams, lets time pass (rekeys and
//! expiry, whose handshakes the endpoints exchange) and has the responder send back.
//! Asserts: no panic; a datagram opens as data only if it is, byte for byte, one that
//! the other endpoint sealed, only once, with the inner bytes it sealed; and while no time
//! has passed every sealed message opens when first delivered.
#![no_main]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use vane_fuzz::Records;
use vane_tunnel::{Config, Keypair, Open, PeerId, Seal, Tunnels, DATA_HEADER_LEN, TYPE_DATA};

fn keys(i: u8) -> Keypair {
    // Deriving a public key is a scalar multiplication: once per process, not per input.
    static KEYS: OnceLock<[Keypair; 3]> = OnceLock::new();
    KEYS.get_or_init(|| [0, 1, 2].map(|i| Keypair::from_private([i + 1; 32])))[usize::from(i)]
        .clone()
}

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, i as u8 + 1], 7947))
}

fn other(i: usize) -> PeerId {
    (1 - i) as PeerId
}

/// A message one endpoint sealed for the other.
struct Sealed {
    inner: Vec<u8>,
    delivered: bool,
}

struct Pair {
    /// Endpoint 0 initiated the session; endpoint 1 responded.
    t: [Tunnels; 2],
    now: Instant,
    wall: u64,
    /// What each endpoint sealed for the other, by datagram.
    sealed: [HashMap<Vec<u8>, Sealed>; 2],
    /// The datagrams endpoint 0 sealed, in order, to pick from.
    order: Vec<Vec<u8>>,
    time_passed: bool,
}

impl Pair {
    fn established() -> Pair {
        let cfg = Config::default();
        let mut t = [0, 1].map(|i| {
            let mut t = Tunnels::new(cfg.clone(), keys(i as u8));
            t.set_peer(other(i), keys(1 - i as u8).public);
            t
        });
        let now = Instant::now();
        let wall = 1_700_000_000_000_000_000;
        let mut out = [0u8; 256];
        let Seal::Handshake(n) = t[0].seal(1, b"", &mut out, now, wall) else {
            panic!("no initiation");
        };
        let mut p = Pair {
            t,
            now,
            wall,
            sealed: Default::default(),
            order: Vec::new(),
            time_passed: false,
        };
        p.handshake(1, out[..n].to_vec());
        assert!(p.t[0].has_session(1) && p.t[1].has_session(0));
        p
    }

    /// Delivers a handshake message to endpoint `i` and what it causes, until quiet.
    fn handshake(&mut self, i: usize, datagram: Vec<u8>) {
        let mut inbox = vec![(i, datagram)];
        while let Some((i, d)) = inbox.pop() {
            let mut out = [0u8; 256];
            match self.t[i].open(&d, addr(1 - i), &mut out, self.now) {
                Open::Respond { len, .. } | Open::Established { len, .. } => {
                    inbox.push((1 - i, out[..len].to_vec()))
                }
                Open::Data { len, .. } => assert_eq!(len, 0, "a keepalive carries nothing"),
                _ => {}
            }
        }
    }

    /// Endpoint `i` seals `inner` for the other.
    fn seal(&mut self, i: usize, inner: &[u8]) {
        let mut out = vec![0u8; inner.len() + 256];
        match self.t[i].seal(other(i), inner, &mut out, self.now, self.wall) {
            Seal::Data(n) => {
                let d = out[..n].to_vec();
                if i == 0 {
                    self.order.push(d.clone());
                }
                let s = Sealed {
                    inner: inner.to_vec(),
                    delivered: false,
                };
                assert!(
                    self.sealed[i].insert(d, s).is_none(),
                    "sealed the same bytes twice"
                );
            }
            Seal::Handshake(n) => self.handshake(1 - i, out[..n].to_vec()),
            _ => {}
        }
    }

    /// Endpoint `i` gets `d` from the other's address; `sel` picks `open` or
    /// `open_in_place`.
    fn deliver(&mut self, i: usize, d: &[u8], sel: u8) -> Open {
        let mut buf = d.to_vec();
        let mut out = vec![0u8; d.len().max(256)];
        let (result, inner) = if sel & 1 == 0 {
            let r = self.t[i].open(d, addr(1 - i), &mut out, self.now);
            (r, &out[..])
        } else {
            let r = self.t[i].open_in_place(&mut buf, addr(1 - i), &mut out, self.now);
            (r, buf.get(DATA_HEADER_LEN..).unwrap_or(&[]))
        };
        if let Open::Data { len, .. } = result {
            let sent = self.sealed[1 - i].get_mut(d);
            let sent = sent.expect("data opened that the other endpoint never sealed");
            assert!(!sent.delivered, "a replayed message opened again");
            assert_eq!(
                &inner[..len],
                &sent.inner[..],
                "opened to other bytes than sealed"
            );
            sent.delivered = true;
        }
        if let Open::Respond { len, .. } | Open::Established { len, .. } = result {
            // A rekey's handshake, replayed: let it run its course.
            self.handshake(1 - i, out[..len].to_vec());
        }
        result
    }

    /// Delivers the `k`th message endpoint 0 sealed, as it is.
    fn deliver_genuine(&mut self, k: usize, sel: u8) {
        let Some(d) = self.order.get(k % self.order.len().max(1)).cloned() else {
            return;
        };
        let fresh = !self.sealed[0][&d].delivered;
        let result = self.deliver(1, &d, sel);
        // Beyond ~2000 messages the replay window would refuse old ones by design.
        if fresh && !self.time_passed && self.order.len() < 1900 {
            assert!(
                matches!(result, Open::Data { .. }),
                "a fresh genuine message was refused: {result:?}"
            );
        }
    }

    /// Delivers the `k`th message endpoint 0 sealed with `edits` applied: each 3 bytes
    /// flip one byte (position, XOR value) or, past the end, add one; none cuts the last.
    fn deliver_altered(&mut self, k: usize, edits: &[u8], sel: u8) {
        let Some(mut d) = self.order.get(k % self.order.len().max(1)).cloned() else {
            return;
        };
        if edits.len() < 3 {
            d.pop();
        }
        for e in edits.chunks_exact(3) {
            let at = usize::from(u16::from_be_bytes([e[0], e[1]])) % (d.len() + 8);
            match d.get_mut(at) {
                Some(b) => *b ^= e[2],
                None => d.push(e[2]),
            }
        }
        self.deliver(1, &d, sel);
    }

    /// A data message with the session's real index and the counter and body given.
    fn forge(&mut self, body: &[u8], sel: u8) {
        let Some(genuine) = self.order.last() else {
            return;
        };
        let mut d = vec![TYPE_DATA, 0, 0, 0];
        d.extend_from_slice(&genuine[4..8]);
        d.extend_from_slice(body);
        self.deliver(1, &d, sel);
    }

    fn advance(&mut self, body: &[u8]) {
        let ms = match body {
            [a, b, ..] => u64::from(u16::from_be_bytes([*a, *b])) * 10,
            _ => 1000,
        };
        self.time_passed = true;
        self.now += Duration::from_millis(ms);
        self.wall += ms * 1_000_000;
        for i in 0..2 {
            let mut out = [0u8; 256];
            while let Some((_, n)) = self.t[i].poll_timers(self.now, self.wall, &mut out) {
                self.handshake(1 - i, out[..n].to_vec());
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut p = Pair::established();
    for (tag, body) in Records::new(data) {
        let (k, rest) = match body {
            [a, b, rest @ ..] => (usize::from(u16::from_be_bytes([*a, *b])), rest),
            _ => (0, &[][..]),
        };
        let sel = k as u8;
        match tag % 7 {
            0 => p.seal(0, body),
            1 => p.deliver_genuine(k, sel),
            2 => p.deliver_altered(k, rest, sel),
            3 => p.forge(body, sel),
            4 => {
                p.deliver(1, body, sel);
            }
            5 => p.advance(body),
            _ => {
                // The responder answers, and the initiator opens it at once.
                p.seal(1, body);
                let sent: Vec<Vec<u8>> = p.sealed[1]
                    .iter()
                    .filter(|(_, s)| !s.delivered)
                    .map(|(d, _)| d.clone())
                    .collect();
                for d in sent {
                    p.deliver(0, &d, sel);
                }
            }
        }
    }
});
