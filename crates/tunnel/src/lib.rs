//! Sans-IO host-to-host sessions: what carries the virtual networks between hosts.
//!
//! Every pair of hosts shares an encrypted, authenticated channel over UDP. Each host's
//! [`Tunnels`] runs a Noise IK handshake (`Noise_IK_25519_ChaChaPoly_BLAKE2s`, or
//! `Noise_IK_25519_AESGCM_BLAKE2s` where the initiator's CPU has AES instructions: see
//! [`Cipher`]) with each peer host whose static public key the controller gave it, and then seals and opens the
//! data messages of the resulting sessions. Like the switch it does no I/O and reads no
//! clock: the shell passes datagrams, `now` and (for handshake timestamps) the wall clock,
//! and sends what comes back. That keeps handshakes, rekeys, losses, reordering and restarts
//! testable with virtual time and no sockets.
//!
//! The design follows WireGuard, for the same reasons:
//! - data messages carry their nonce (a per-session counter) so the underlay may reorder
//!   or lose them; a sliding window per session rejects replays;
//! - sessions are rekeyed by time and by message count, and the old session keeps being
//!   accepted for receiving until it expires, so no packet is lost across the switch-over;
//! - a responder does not send on a new session until the initiator has used it (key
//!   confirmation): the response may have been lost, and the initiator would not know it;
//! - an initiation carries the initiator's wall clock, and a responder accepts only newer
//!   ones, so a captured initiation replayed later does nothing.
//!
//! A peer's channel that carried no data for [`Config::idle_timeout`] is torn down and
//! rebuilt on demand, so hosts that never talk hold no key material for each other.
//!
//! Handshakes run in `snow`. The transport keys they agree on drive ring's AEADs directly,
//! with Noise's nonce layouts: the cipher the handshake names, in ring's vectorised code,
//! and in place, so a data message is sealed where the shell built it and opened where it
//! was received, without a copy. Two Noise protocols are spoken, which differ only in the
//! cipher: `Noise_IK_25519_AESGCM_BLAKE2s` and `Noise_IK_25519_ChaChaPoly_BLAKE2s`. The
//! initiator picks ([`Config::cipher`], by default AES-GCM where the CPU has AES
//! instructions, ChaCha20-Poly1305 elsewhere) and says which in the initiation's type;
//! a responder accepts either, so hosts with different CPUs still talk.
//!
//! Sealing and opening data messages allocate nothing; handshakes do. Nothing from the
//! network can make this crate panic: every malformed input ends in [`Open::Drop`].
//!
//! # Handshake floods
//!
//! A responder does Diffie-Hellman work for each initiation it processes, so initiations
//! are what a flood would send. They are turned away as cheaply as possible, in this order
//! (WireGuard's scheme, whitepaper sections 5.3 and 5.4.7, with vane's own numbers):
//! 1. mac1, an HMAC under a key derived from the responder's public key: whoever does not
//!    know the key costs one HMAC ([`DropReason::BadMac`]).
//! 2. Under load ([`UNDER_LOAD_PER_SECOND`]), an initiation must also carry mac2, a MAC
//!    under a cookie that only the datagram's source address can have received: one the
//!    responder derives from a secret and that address, and sends encrypted in a
//!    [`TYPE_COOKIE_REPLY`] message. Without a valid mac2 the initiation gets a cookie reply
//!    ([`Open::CookieReply`]) and no public-key work; the initiator's next try carries
//!    mac2. A flood from spoofed addresses never sees the cookies, so it ends here.
//! 3. Per source address, [`SOURCE_HANDSHAKES_PER_SECOND`]: one source (a peer gone mad,
//!    or one replaying a captured initiation from its real address) cannot use the whole
//!    budget ([`DropReason::SourceRateLimited`]).
//! 4. The global budget, [`HANDSHAKES_PER_SECOND`] ([`DropReason::RateLimited`]).
//!
//! Established sessions need none of this: data messages are opened by index, and a
//! handshake is only needed to rekey, with a minute of margin before the session expires.

mod config;
mod flood;
mod handshake;
mod limit;
mod message;
mod outcome;
mod replay;
mod session;
#[cfg(test)]
mod tests;
mod timers;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Instant;

use ring::aead::LessSafeKey;
use ring::hmac;
use snow::params::NoiseParams;

pub use config::{Cipher, Config, Keypair};
pub use flood::{
    COOKIE_LIFETIME, COOKIE_REPLIES_PER_SECOND, HANDSHAKES_PER_SECOND, MAX_SOURCES, SOURCE_BURST,
    SOURCE_HANDSHAKES_PER_SECOND, UNDER_LOAD_HOLD, UNDER_LOAD_PER_SECOND,
};
pub use message::{
    message_type, COOKIE_REPLY_LEN, DATA_HEADER_LEN, DATA_OVERHEAD, INITIATION_LEN, MAC_LEN,
    RESPONSE_LEN, TAG_LEN, TYPE_COOKIE_REPLY, TYPE_DATA, TYPE_INITIATION, TYPE_INITIATION_AESGCM,
    TYPE_RESPONSE,
};
pub use outcome::{Counters, DropReason, Open, PeerStats, Seal};
pub use session::StreamKeys;

use flood::{cookie_key, mac1_key};
use handshake::Pending;
use limit::{Bucket, Sources};
use message::COOKIE_LEN;
use session::Session;
// For tests.rs, which sees the crate through `crate::*`.
#[cfg(test)]
use {flood::mac2, session::Transport};

/// Cluster-wide id of a peer host, chosen by the caller (the controller's host id).
pub type PeerId = u32;

struct Peer {
    public: [u8; 32],
    /// The key of the mac1 of our initiations to it.
    mac1: hmac::Key,
    /// The key that opens its cookie replies.
    cookie_key: LessSafeKey,
    /// The last cookie it sent us, and when it came: the key of our mac2 for
    /// [`COOKIE_LIFETIME`].
    cookie: Option<([u8; COOKIE_LEN], Instant)>,
    /// The session we send on.
    current: Option<Session>,
    /// The session before the last rekey: still accepted for receiving until it expires.
    previous: Option<Session>,
    /// A session we responded to, not sent on until the peer uses it.
    next: Option<Session>,
    pending: Option<Pending>,
    /// The largest initiation timestamp accepted from the peer.
    last_timestamp: Option<u64>,
    /// Last non-keepalive data either way (or a handshake asked for by the caller).
    last_activity: Option<Instant>,
    stats: PeerStats,
}

impl Peer {
    fn new(public: [u8; 32]) -> Peer {
        Peer {
            public,
            mac1: mac1_key(&public),
            cookie_key: cookie_key(&public),
            cookie: None,
            current: None,
            previous: None,
            next: None,
            pending: None,
            last_timestamp: None,
            last_activity: None,
            stats: PeerStats::default(),
        }
    }

    fn has_sessions(&self) -> bool {
        self.current.is_some() || self.previous.is_some() || self.next.is_some()
    }

    /// Drops every session and the pending handshake, forgetting their indexes.
    fn clear(&mut self, indexes: &mut HashMap<u32, PeerId>) {
        for s in [self.current.take(), self.previous.take(), self.next.take()]
            .into_iter()
            .flatten()
        {
            indexes.remove(&s.local_index);
        }
        if let Some(p) = self.pending.take() {
            indexes.remove(&p.index);
        }
    }
}

/// All sessions of one host with its peer hosts.
pub struct Tunnels {
    cfg: Config,
    local: Keypair,
    /// The Noise protocols, ChaChaPoly's and AESGCM's.
    chacha: NoiseParams,
    aesgcm: NoiseParams,
    peers: HashMap<PeerId, Peer>,
    by_key: HashMap<[u8; 32], PeerId>,
    /// Our indexes of sessions and pending handshakes: which peer they belong to.
    indexes: HashMap<u32, PeerId>,
    /// The last initiation timestamp we sent: timestamps are kept increasing even if the
    /// wall clock stalls.
    last_timestamp_sent: u64,
    counters: Counters,
    /// The key of the mac1 of initiations to us.
    mac1: hmac::Key,
    /// Initiations that may still get Diffie-Hellman work ([`HANDSHAKES_PER_SECOND`]).
    budget: Bucket,
    /// Initiations that passed mac1, metered at [`UNDER_LOAD_PER_SECOND`].
    load: Bucket,
    /// Under load until then: the last time the load meter ran dry, plus
    /// [`UNDER_LOAD_HOLD`].
    loaded_until: Option<Instant>,
    /// The secret our cookies are made with, and when it was made (replaced after
    /// [`COOKIE_LIFETIME`]); made when first needed.
    cookie_secret: Option<(hmac::Key, Instant)>,
    /// The key that seals our cookie replies.
    cookie_key: LessSafeKey,
    /// Cookie replies we may still send ([`COOKIE_REPLIES_PER_SECOND`]).
    cookie_budget: Bucket,
    /// Per-source limits of initiations and cookie replies.
    sources: Sources,
}

impl Tunnels {
    /// A host with key pair `local` and no peers.
    pub fn new(cfg: Config, local: Keypair) -> Tunnels {
        Tunnels {
            cfg,
            chacha: Cipher::ChaChaPoly
                .noise_pattern()
                .parse()
                .expect("a valid Noise pattern"),
            aesgcm: Cipher::AesGcm
                .noise_pattern()
                .parse()
                .expect("a valid Noise pattern"),
            peers: HashMap::new(),
            by_key: HashMap::new(),
            indexes: HashMap::new(),
            last_timestamp_sent: 0,
            counters: Counters::default(),
            mac1: mac1_key(&local.public),
            budget: Bucket::default(),
            load: Bucket::default(),
            loaded_until: None,
            cookie_secret: None,
            cookie_key: cookie_key(&local.public),
            cookie_budget: Bucket::default(),
            sources: Sources::new(MAX_SOURCES),
            local,
        }
    }

    fn params(&self, cipher: Cipher) -> &NoiseParams {
        match cipher {
            Cipher::ChaChaPoly => &self.chacha,
            Cipher::AesGcm => &self.aesgcm,
        }
    }

    /// This host's static public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.local.public
    }

    /// Adds or updates a peer. A changed key drops that peer's sessions.
    pub fn set_peer(&mut self, id: PeerId, public: [u8; 32]) {
        if let Some(p) = self.peers.get_mut(&id) {
            if p.public == public {
                return;
            }
            p.clear(&mut self.indexes);
            self.by_key.remove(&p.public);
            *p = Peer::new(public);
        } else {
            self.peers.insert(id, Peer::new(public));
        }
        self.by_key.insert(public, id);
    }

    /// Removes a peer and its sessions.
    pub fn remove_peer(&mut self, id: PeerId) {
        if let Some(mut p) = self.peers.remove(&id) {
            p.clear(&mut self.indexes);
            self.by_key.remove(&p.public);
        }
    }

    /// The configured peers, in no particular order.
    pub fn peers(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.peers.keys().copied()
    }

    /// Handles one datagram from the underlay, which came from `from` (its source address:
    /// initiations are limited per source, and a cookie reply is for that address only).
    /// `out` must hold `datagram.len()` bytes, and [`RESPONSE_LEN`] (or [`DATA_OVERHEAD`]
    /// for the keepalive of [`Open::Established`]).
    pub fn open(
        &mut self,
        datagram: &[u8],
        from: SocketAddr,
        out: &mut [u8],
        now: Instant,
    ) -> Open {
        let result = match datagram {
            [TYPE_DATA, 0, 0, 0, ..] => match out.get_mut(..datagram.len()) {
                None => Open::Drop(DropReason::TooLarge),
                Some(copy) => {
                    copy.copy_from_slice(datagram);
                    let opened = self.open_data(copy, now);
                    if let Open::Data { len, .. } = opened {
                        out.copy_within(DATA_HEADER_LEN..DATA_HEADER_LEN + len, 0);
                    }
                    opened
                }
            },
            _ => self.open_handshake(datagram, from, out, now),
        };
        self.count(result)
    }

    /// Like [`Tunnels::open`], but a data message is opened where it lies: on
    /// [`Open::Data`] the inner bytes are `datagram[DATA_HEADER_LEN..][..len]`. `out` is
    /// only written for handshake messages (see [`Tunnels::open`] for its size).
    pub fn open_in_place(
        &mut self,
        datagram: &mut [u8],
        from: SocketAddr,
        out: &mut [u8],
        now: Instant,
    ) -> Open {
        let result = match datagram {
            [TYPE_DATA, 0, 0, 0, ..] => self.open_data(datagram, now),
            _ => self.open_handshake(datagram, from, out, now),
        };
        self.count(result)
    }

    fn count(&mut self, result: Open) -> Open {
        let reason = match result {
            Open::Drop(reason) => reason,
            Open::CookieReply { .. } => DropReason::CookieSent,
            _ => return result,
        };
        self.counters.drops[reason.index()] += 1;
        result
    }

    /// Any datagram but a well-formed data message's header.
    fn open_handshake(
        &mut self,
        datagram: &[u8],
        from: SocketAddr,
        out: &mut [u8],
        now: Instant,
    ) -> Open {
        match datagram {
            [_, a, b, c, ..] if (a | b | c) != 0 => Open::Drop(DropReason::Malformed),
            [TYPE_INITIATION, ..] => {
                self.open_initiation(datagram, from, out, now, Cipher::ChaChaPoly)
            }
            [TYPE_INITIATION_AESGCM, ..] => {
                self.open_initiation(datagram, from, out, now, Cipher::AesGcm)
            }
            [TYPE_RESPONSE, ..] => self.open_response(datagram, out, now),
            [TYPE_COOKIE_REPLY, ..] => self.open_cookie_reply(datagram, now),
            [_, _, _, _, ..] => Open::Drop(DropReason::UnknownType),
            _ => Open::Drop(DropReason::Malformed),
        }
    }

    /// Whether there is a session to send data on to `peer`.
    pub fn has_session(&self, peer: PeerId) -> bool {
        self.peers.get(&peer).is_some_and(|p| p.current.is_some())
    }

    /// The counters.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Statistics of one peer.
    pub fn peer_stats(&self, peer: PeerId) -> Option<PeerStats> {
        let p = self.peers.get(&peer)?;
        Some(PeerStats {
            established: p.current.is_some(),
            established_at: p.current.as_ref().map(|s| s.established),
            cipher: p.current.as_ref().map(|s| s.transport.cipher),
            ..p.stats
        })
    }
}

impl fmt::Debug for Tunnels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tunnels")
            .field("public", &self.local.public)
            .field("peers", &self.peers.len())
            .field("indexes", &self.indexes.len())
            .finish_non_exhaustive()
    }
}
