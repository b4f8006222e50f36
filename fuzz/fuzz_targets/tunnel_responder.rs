//! Untrusted input: datagrams from anyone on the underlay to a host's tunnel endpoint
//! (`Tunnels::open` and `open_in_place`): any bytes, bytes shaped as each message type
//! (right length and header; initiations with a valid mac1, so that they reach the
//! Diffie-Hellman work; responses and cookie replies naming the endpoint's pending
//! handshake), floods that put it under load, from several source addresses; interleaved
//! with a genuine peer's handshake (its initiations, and its answers to what the endpoint
//! sends back) and with time passing. Input: records (`vane_fuzz::Records`). Asserts: no
//! panic; what is not a tunnel message type is dropped; nothing but the genuine peer's own
//! datagrams opens as data; no response or cookie reply is accepted from anyone (no peer
//! here answers the endpoint's own handshake); a response is sent only to an initiation
//! with a valid mac1, and a cookie reply only to one, never larger than it.
#![no_main]

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use ring::{digest, hmac};
use vane_fuzz::Records;
use vane_tunnel::{
    message_type, Config, Keypair, Open, Seal, Tunnels, COOKIE_REPLY_LEN, DATA_OVERHEAD,
    INITIATION_LEN, MAC_LEN, RESPONSE_LEN, TYPE_COOKIE_REPLY, TYPE_DATA, TYPE_INITIATION,
    TYPE_INITIATION_AESGCM, TYPE_RESPONSE,
};

/// Fixed keys, so that a datagram a run captured into the corpus means the same later.
fn keys(i: u8) -> Keypair {
    // Deriving a public key is a scalar multiplication: once per process, not per input.
    static KEYS: OnceLock<[Keypair; 3]> = OnceLock::new();
    KEYS.get_or_init(|| [0, 1, 2].map(|i| Keypair::from_private([i + 1; 32])))[usize::from(i)]
        .clone()
}

/// The endpoint under test is host 1; host 0 is its genuine peer; host 2 is a peer it
/// knows and has a handshake pending with, which never answers.
const LOCAL: u8 = 1;
const GENUINE: u32 = 0;
const SILENT: u32 = 2;

/// Where datagrams may come from: the genuine peer's address, strangers, IPv6, and an
/// IPv4-mapped IPv6 address (the same source as the first, as a dual-stack socket sees it).
fn source(sel: u8) -> SocketAddr {
    let fixed = [
        "192.0.2.1:7947",
        "198.51.100.66:40000",
        "[2001:db8::1]:7947",
        "[2001:db8::2]:7947",
        "[::ffff:192.0.2.1]:7947",
    ];
    match fixed.get(usize::from(sel % 8)) {
        Some(s) => s.parse().unwrap(),
        None => SocketAddr::from(([10, 9, sel, 1], 5000)),
    }
}

/// The mac1 an initiation to `responder` carries, as the crate documents it: HMAC-SHA256,
/// truncated, under the SHA-256 of a label and the responder's public key, over the
/// message before the two MACs.
fn mac1(responder: &[u8; 32], initiation: &[u8]) -> [u8; MAC_LEN] {
    let label = digest::digest(
        &digest::SHA256,
        &[b"vane mac1\0" as &[u8], responder].concat(),
    );
    let key = hmac::Key::new(hmac::HMAC_SHA256, label.as_ref());
    let tag = hmac::sign(&key, &initiation[..INITIATION_LEN - 2 * MAC_LEN]);
    tag.as_ref()[..MAC_LEN].try_into().unwrap()
}

fn has_valid_mac1(responder: &[u8; 32], d: &[u8]) -> bool {
    d.len() == INITIATION_LEN
        && d[INITIATION_LEN - 2 * MAC_LEN..INITIATION_LEN - MAC_LEN] == mac1(responder, d)
}

struct Sim {
    local: Tunnels,
    local_public: [u8; 32],
    peer: Tunnels,
    now: Instant,
    wall: u64,
    /// Every datagram the genuine peer sent to the endpoint.
    genuine: Vec<Vec<u8>>,
    /// What the endpoint last sent back to the genuine peer's address.
    answer: Option<Vec<u8>>,
    /// The endpoint's index in its pending initiation to the silent peer.
    pending_index: [u8; 4],
    /// The endpoint's index in its last response.
    session_index: [u8; 4],
}

impl Sim {
    fn new() -> Sim {
        let now = Instant::now();
        let wall = 1_700_000_000_000_000_000;
        let mut local = Tunnels::new(Config::default(), keys(LOCAL));
        local.set_peer(GENUINE, keys(0).public);
        local.set_peer(SILENT, keys(2).public);
        let mut out = [0u8; 256];
        let Some(n) = local.initiate(SILENT, &mut out, now, wall) else {
            panic!("the endpoint could not initiate");
        };
        let pending_index = out[4..8].try_into().unwrap();
        let mut peer = Tunnels::new(Config::default(), keys(0));
        peer.set_peer(u32::from(LOCAL), keys(LOCAL).public);
        let Seal::Handshake(m) = peer.seal(u32::from(LOCAL), b"", &mut out, now, wall) else {
            panic!("the genuine peer did not initiate");
        };
        let local_public = local.public_key();
        assert!(
            has_valid_mac1(&local_public, &out[..m]),
            "mac1 is no longer made as this target computes it: update mac1()"
        );
        assert_eq!(n, INITIATION_LEN);
        Sim {
            local,
            local_public,
            peer,
            now,
            wall,
            genuine: vec![out[..m].to_vec()],
            answer: None,
            pending_index,
            session_index: [0; 4],
        }
    }

    /// The endpoint handles `datagram` from `from`; `sel` picks the call and the room.
    fn open(&mut self, datagram: &[u8], sel: u8) {
        let from = source(sel);
        let mut out = vec![0u8; if sel & 0x80 != 0 { 40 } else { 2048 }];
        let mut d = datagram.to_vec();
        let result = if sel & 0x40 != 0 {
            self.local.open_in_place(&mut d, from, &mut out, self.now)
        } else {
            self.local.open(datagram, from, &mut out, self.now)
        };
        if message_type(datagram).is_none() {
            assert!(
                matches!(result, Open::Drop(_)),
                "{result:?} for no message type"
            );
        }
        match result {
            Open::Data { peer, len } => {
                assert!(
                    self.genuine.iter().any(|g| g == datagram),
                    "data accepted that the genuine peer never sent"
                );
                assert_eq!(peer, GENUINE);
                assert!(len + DATA_OVERHEAD == datagram.len());
            }
            Open::Respond { peer, len } => {
                assert_eq!(peer, GENUINE, "responded to an initiation from no peer");
                assert!(has_valid_mac1(&self.local_public, datagram));
                assert_eq!(len, RESPONSE_LEN);
                self.session_index = out[4..8].try_into().unwrap();
                self.answer = Some(out[..len].to_vec());
            }
            Open::CookieReply { len } => {
                assert!(has_valid_mac1(&self.local_public, datagram));
                assert_eq!(len, COOKIE_REPLY_LEN);
                assert!(len < datagram.len(), "a cookie reply amplifies");
                self.answer = Some(out[..len].to_vec());
            }
            Open::Established { .. } | Open::Cookie { .. } => {
                panic!("{result:?}: accepted an answer to a handshake nobody answered")
            }
            Open::Drop(_) => {}
        }
    }

    /// `bytes` made into a datagram of the type `kind` picks: right length and header.
    fn shape(&self, kind: u8, bytes: &[u8]) -> Vec<u8> {
        let mut d = bytes.to_vec();
        let (ty, len, index) = match kind % 5 {
            0 => (TYPE_INITIATION, INITIATION_LEN, None),
            1 => (TYPE_INITIATION_AESGCM, INITIATION_LEN, None),
            2 => (TYPE_RESPONSE, RESPONSE_LEN, Some(self.pending_index)),
            3 => (
                TYPE_COOKIE_REPLY,
                COOKIE_REPLY_LEN,
                Some(self.pending_index),
            ),
            _ => (
                TYPE_DATA,
                d.len().max(DATA_OVERHEAD),
                Some(self.session_index),
            ),
        };
        d.resize(len, 0);
        d[..4].copy_from_slice(&[ty, 0, 0, 0]);
        match (ty, index) {
            // A response names the initiator's index after its own.
            (TYPE_RESPONSE, Some(i)) => d[8..12].copy_from_slice(&i),
            (_, Some(i)) => d[4..8].copy_from_slice(&i),
            (_, None) => {
                let tag = mac1(&self.local_public, &d);
                d[INITIATION_LEN - 2 * MAC_LEN..INITIATION_LEN - MAC_LEN].copy_from_slice(&tag);
            }
        }
        d
    }

    /// The genuine peer handles what the endpoint last sent back to it.
    fn answer_to_peer(&mut self) {
        let Some(answer) = self.answer.take() else {
            return;
        };
        let mut out = [0u8; 256];
        let from = source(0);
        match self.peer.open(&answer, from, &mut out, self.now) {
            Open::Established { len, .. } => self.genuine.push(out[..len].to_vec()),
            Open::Data { .. } => panic!("the endpoint sent data to its peer"),
            _ => {}
        }
    }

    fn advance(&mut self, body: &[u8]) {
        let ms = match body {
            [a, b, ..] => u64::from(u16::from_be_bytes([*a, *b])),
            _ => 1000,
        };
        self.now += Duration::from_millis(ms);
        self.wall += ms * 1_000_000;
        let mut out = [0u8; 256];
        while let Some((peer, n)) = self.local.poll_timers(self.now, self.wall, &mut out) {
            assert_eq!(
                peer, SILENT,
                "the endpoint initiated to a peer it has no business with"
            );
            self.pending_index = out[4..8].try_into().unwrap();
            assert_eq!(n, INITIATION_LEN);
        }
        while let Some((_, n)) = self.peer.poll_timers(self.now, self.wall, &mut out) {
            self.genuine.push(out[..n].to_vec());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut sim = Sim::new();
    for (tag, body) in Records::new(data) {
        let (sel, rest) = body.split_first().map_or((0, &[][..]), |(s, r)| (*s, r));
        match tag % 6 {
            0 => sim.open(rest, sel),
            1 => {
                let (kind, bytes) = rest.split_first().map_or((0, &[][..]), |(k, b)| (*k, b));
                let d = sim.shape(kind, bytes);
                sim.open(&d, sel);
            }
            2 => {
                // A flood of one shaped initiation: from one source, or from eight (more
                // would only buy more Diffie-Hellman work per input, each source passing
                // its own burst).
                let (count, bytes) = rest.split_first().map_or((0, &[][..]), |(c, b)| (*c, b));
                let d = sim.shape(sel & 1, bytes);
                for i in 0..count {
                    let from = if sel & 2 != 0 { i % 8 } else { sel >> 2 };
                    sim.open(&d, from & 0x3f);
                }
            }
            3 => {
                let k = usize::from(sel) % sim.genuine.len();
                let d = sim.genuine[k].clone();
                sim.open(&d, rest.first().copied().unwrap_or(0) & 0x40);
            }
            4 => sim.answer_to_peer(),
            _ => sim.advance(body),
        }
    }
});
