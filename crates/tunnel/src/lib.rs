//! Sans-IO host-to-host sessions: what carries the virtual networks between hosts.
//!
//! Every pair of hosts shares an encrypted, authenticated channel over UDP. Each host's
//! [`Tunnels`] runs a Noise IK handshake (`Noise_IK_25519_ChaChaPoly_BLAKE2s`) with each
//! peer host whose static public key the controller gave it, and then seals and opens the
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

mod limit;
mod replay;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ring::aead::{self, LessSafeKey, UnboundKey, AES_256_GCM, CHACHA20_POLY1305};
use ring::hmac;
use snow::params::{DHChoice, NoiseParams};
use snow::resolvers::{CryptoResolver, DefaultResolver};
use snow::{Builder, HandshakeState};

use limit::{Bucket, Rate, Sources};
use replay::ReplayWindow;

/// Cluster-wide id of a peer host, chosen by the caller (the controller's host id).
pub type PeerId = u32;

/// Message type of a handshake initiation for ChaCha20-Poly1305 sessions.
pub const TYPE_INITIATION: u8 = 1;
/// Message type of a handshake initiation for AES-256-GCM sessions (4 is the overlay's
/// plaintext datagram).
pub const TYPE_INITIATION_AESGCM: u8 = 5;
/// Message type of a handshake response.
pub const TYPE_RESPONSE: u8 = 2;
/// Message type of a data message (or keepalive).
pub const TYPE_DATA: u8 = 3;
/// Message type of a cookie reply: the answer to an initiation while under load (whitepaper
/// section 5.4.7).
pub const TYPE_COOKIE_REPLY: u8 = 6;

/// Header of a data message: type, 3 zero bytes, receiver index, counter.
pub const DATA_HEADER_LEN: usize = 16;
/// The AEAD tag after the ciphertext.
pub const TAG_LEN: usize = 16;
/// What a data message adds to the inner bytes.
pub const DATA_OVERHEAD: usize = DATA_HEADER_LEN + TAG_LEN;
/// Length of a handshake initiation: header 8, ephemeral 32, encrypted static 48,
/// encrypted timestamp 28, mac1 16, mac2 16.
pub const INITIATION_LEN: usize = 8 + 32 + 48 + TIMESTAMP_LEN + TAG_LEN + MAC_LEN + MAC_LEN;
/// The length of each of the two MACs that end an initiation (whitepaper section 5.4.4).
///
/// mac1: HMAC-SHA256, truncated, under a key derived from the responder's public key, over
/// the message before it. The responder checks it before any Diffie-Hellman: a flood of
/// initiations from whoever does not know its public key costs it one HMAC each.
///
/// mac2: HMAC-SHA256, truncated, under the cookie of the last [`TYPE_COOKIE_REPLY`] from
/// the responder if it is younger than [`COOKIE_LIFETIME`], over the message up to mac2
/// (mac1 included); all zero without one. Only checked under load. WireGuard uses keyed
/// BLAKE2s for both; ring has no BLAKE2s, and HMAC-SHA256 costs about as much.
pub const MAC_LEN: usize = 16;
/// Initiations that pass mac1 and get Diffie-Hellman work, per second, after a burst of
/// as many: a flood of valid-looking initiations (replays, or a peer gone mad) takes at
/// most that much of the switch thread; established sessions keep the rest.
pub const HANDSHAKES_PER_SECOND: u32 = 100;
/// A responder is under load when more initiations than this pass mac1 in a second (or in
/// one burst: the meter is a bucket of as many), and stays so for [`UNDER_LOAD_HOLD`] after
/// the last one over: half the handshake budget, so that cookies are asked for before
/// that budget runs out rather than after. The meter counts arrivals, not the work done:
/// a flood keeps the host under load even though none of it gets processed. Genuine
/// traffic stays far below: a peer handshakes every two minutes plus retries, so it takes
/// thousands of peers rekeying at once to get there, and then they pay one round trip more.
pub const UNDER_LOAD_PER_SECOND: u32 = HANDSHAKES_PER_SECOND / 2;
/// How long a responder stays under load after the meter last overflowed: long enough
/// that an initiator that got a cookie reply and retries after [`Config::handshake_retry`]
/// (1 s by default) is still asked for its mac2, rather than flapping with each burst.
pub const UNDER_LOAD_HOLD: Duration = Duration::from_secs(1);
/// Initiations given Diffie-Hellman work per source address and second, after a burst of
/// [`SOURCE_BURST`]. A genuine peer retries once a second; 20 leaves room for several
/// peers behind one address and for simultaneous rekeys, and is a fifth of the global
/// budget, so that one flooding source leaves most of it to the others. The same limit
/// applies, separately, to the cookie replies sent to a source.
pub const SOURCE_HANDSHAKES_PER_SECOND: u32 = 20;
/// The burst of [`SOURCE_HANDSHAKES_PER_SECOND`].
pub const SOURCE_BURST: u32 = 5;
/// Source addresses whose limits are tracked (IPv6 by /64). A source's entry is forgotten
/// once its buckets are full again (250 ms of silence), so only sources sending now count;
/// past this many the oldest entry is evicted. At most about 64 bytes each: 256 KiB.
pub const MAX_SOURCES: usize = 4096;
/// Cookie replies sent per second by the whole host, after a burst of as many. A cookie
/// reply is smaller than the initiation it answers and goes only to that initiation's
/// source, so it amplifies nothing; this bounds what a flood from many spoofed addresses
/// gets us to send (52 KB/s) and the work (an HMAC and a 16-byte seal each). Ten times the
/// handshake budget, because under load each processed handshake needs a cookie first and
/// a cookie serves its initiator for two minutes.
pub const COOKIE_REPLIES_PER_SECOND: u32 = 1000;
/// How long a cookie secret is used before a new random one replaces it, and how long an
/// initiator uses a cookie (whitepaper section 5.4.7: "changing every two minutes"; section
/// 5.4.4: a cookie older than 120 s is not used). A cookie made just before the secret
/// changes is refused when used after: the initiator gets a new one in the cookie reply
/// to that try.
pub const COOKIE_LIFETIME: Duration = Duration::from_secs(120);
/// Length of a cookie reply: header 8 (type, 3 zero, the initiator's sender index), nonce
/// 12, encrypted cookie 16 + 16.
pub const COOKIE_REPLY_LEN: usize = 8 + COOKIE_NONCE_LEN + COOKIE_LEN + TAG_LEN;
/// A cookie: a truncated HMAC-SHA256 of the source address.
const COOKIE_LEN: usize = 16;
/// The nonce of a cookie reply's AEAD. WireGuard uses XChaCha20-Poly1305 with a random
/// 24-byte nonce (section 5.4.7); ring has no XChaCha, so this is ChaCha20-Poly1305 with a
/// random 12-byte nonce. All cookie replies of a host are sealed under one key (derived
/// from its public key, so the initiator can derive it too), and random 96-bit nonces are
/// safe for 2^32 messages per key (NIST SP 800-38D, 8.3): at
/// [`COOKIE_REPLIES_PER_SECOND`], more than 130 years of replies. A counter nonce is not an
/// option: it would restart with the process while the key, tied to the long-lived public
/// key, stays the same.
const COOKIE_NONCE_LEN: usize = 12;

// A cookie reply must never be larger than what it answers (no amplification), and it is
// written into the `out` that holds a response.
const _: () = assert!(COOKIE_REPLY_LEN < INITIATION_LEN && COOKIE_REPLY_LEN <= RESPONSE_LEN);

const HANDSHAKE_RATE: Rate = Rate::new(HANDSHAKES_PER_SECOND, HANDSHAKES_PER_SECOND);
const LOAD_RATE: Rate = Rate::new(UNDER_LOAD_PER_SECOND, UNDER_LOAD_PER_SECOND);
const SOURCE_RATE: Rate = Rate::new(SOURCE_HANDSHAKES_PER_SECOND, SOURCE_BURST);
const COOKIE_REPLY_RATE: Rate = Rate::new(COOKIE_REPLIES_PER_SECOND, COOKIE_REPLIES_PER_SECOND);
/// Length of a handshake response: header 12, ephemeral 32, empty encrypted payload 16.
pub const RESPONSE_LEN: usize = 12 + 32 + TAG_LEN;

/// The AEAD of a session's transport (and of its handshake).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cipher {
    ChaChaPoly,
    AesGcm,
}

impl Cipher {
    /// The faster on this CPU: AES-GCM where it has AES and carry-less multiply
    /// instructions, ChaCha20-Poly1305 otherwise.
    pub fn fastest() -> Cipher {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("aes")
                && std::arch::is_x86_feature_detected!("pclmulqdq")
            {
                return Cipher::AesGcm;
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            if std::arch::is_aarch64_feature_detected!("aes")
                && std::arch::is_aarch64_feature_detected!("pmull")
            {
                return Cipher::AesGcm;
            }
        }
        Cipher::ChaChaPoly
    }

    /// A short name, for reports.
    pub fn name(self) -> &'static str {
        match self {
            Cipher::ChaChaPoly => "chacha20-poly1305",
            Cipher::AesGcm => "aes-256-gcm",
        }
    }

    /// The Noise protocol name.
    pub fn noise_pattern(self) -> &'static str {
        match self {
            Cipher::ChaChaPoly => "Noise_IK_25519_ChaChaPoly_BLAKE2s",
            Cipher::AesGcm => "Noise_IK_25519_AESGCM_BLAKE2s",
        }
    }

    /// The type of an initiation for sessions of this cipher.
    fn initiation_type(self) -> u8 {
        match self {
            Cipher::ChaChaPoly => TYPE_INITIATION,
            Cipher::AesGcm => TYPE_INITIATION_AESGCM,
        }
    }

    fn algorithm(self) -> &'static aead::Algorithm {
        match self {
            Cipher::ChaChaPoly => &CHACHA20_POLY1305,
            Cipher::AesGcm => &AES_256_GCM,
        }
    }

    /// Noise's nonce for counter `n`: 32 zero bits, then `n` little-endian for ChaChaPoly,
    /// big-endian for AESGCM.
    fn nonce(self, n: u64) -> aead::Nonce {
        let mut nonce = [0; 12];
        nonce[4..].copy_from_slice(&match self {
            Cipher::ChaChaPoly => n.to_le_bytes(),
            Cipher::AesGcm => n.to_be_bytes(),
        });
        aead::Nonce::assume_unique_for_key(nonce)
    }
}
/// The initiation payload: wall clock nanoseconds (u64) and 4 zero bytes.
const TIMESTAMP_LEN: usize = 12;

/// The type of a vane tunnel datagram (1, 2, 3, 5 or 6), or `None` if it is not one. Lets a
/// shell that shares a socket with other traffic tell them apart without opening.
pub fn message_type(datagram: &[u8]) -> Option<u8> {
    match datagram {
        [t @ (TYPE_INITIATION
        | TYPE_INITIATION_AESGCM
        | TYPE_RESPONSE
        | TYPE_DATA
        | TYPE_COOKIE_REPLY), 0, 0, 0, ..] => Some(*t),
        _ => None,
    }
}

/// Timers and limits. The defaults are WireGuard's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Start a new handshake when the current session was established this long ago (the
    /// side that initiated it; the responder waits `10 * handshake_retry` longer, so that
    /// both sides do not rekey at once while still covering an initiator that went away).
    pub rekey_after_time: Duration,
    /// Sessions older than this are dropped: never used to send or receive again.
    pub reject_after_time: Duration,
    /// Start a new handshake when the current session has sealed this many messages.
    pub rekey_after_messages: u64,
    /// A session that has sealed this many messages, or a received counter this high, is
    /// refused (the counter must never wrap).
    pub reject_after_messages: u64,
    /// Re-send an unanswered initiation (a fresh one) after this long.
    pub handshake_retry: Duration,
    /// Give up retrying this long after the first initiation; the next seal starts again.
    pub handshake_timeout: Duration,
    /// Drop all sessions of a peer when no data (keepalives do not count) was sealed for it
    /// or opened from it for this long.
    pub idle_timeout: Duration,
    /// The cipher of the sessions this host initiates (a responder takes the initiator's).
    pub cipher: Cipher,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            rekey_after_time: Duration::from_secs(120),
            reject_after_time: Duration::from_secs(180),
            rekey_after_messages: 1 << 60,
            reject_after_messages: u64::MAX - (1 << 13),
            handshake_retry: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(180),
            cipher: Cipher::fastest(),
        }
    }
}

/// A host's static X25519 key pair.
#[derive(Clone, PartialEq, Eq)]
pub struct Keypair {
    /// The private key: keep it on the host.
    pub private: [u8; 32],
    /// The public key: the controller gives it to the other hosts.
    pub public: [u8; 32],
}

impl Keypair {
    /// A new random key pair (from the thread-local CSPRNG, seeded by the OS).
    pub fn generate() -> Keypair {
        Keypair::from_private(rand::random())
    }

    /// The key pair of a stored private key.
    pub fn from_private(private: [u8; 32]) -> Keypair {
        let mut dh = DefaultResolver
            .resolve_dh(&DHChoice::Curve25519)
            .expect("snow's default resolver has X25519");
        dh.set(&private);
        let mut public = [0; 32];
        public.copy_from_slice(dh.pubkey());
        Keypair { private, public }
    }
}

impl fmt::Debug for Keypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keypair")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

/// What [`Tunnels::seal`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seal {
    /// `out[..n]` is a data message for the peer.
    Data(usize),
    /// There was no session: `out[..n]` is a handshake initiation to send to the peer. The
    /// caller queues the inner bytes and seals them again after [`Open::Established`].
    Handshake(usize),
    /// A handshake is under way: the caller queues the inner bytes.
    Pending,
    /// [`Tunnels::seal_in_place`] found no usable session and wrote nothing.
    NoSession,
    /// No such peer.
    UnknownPeer,
    /// `out` is too small (see [`Tunnels::seal`]) or the inner bytes exceed a Noise message.
    TooLarge,
}

/// What [`Tunnels::open`] made of a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Open {
    /// An authenticated, fresh data message: `out[..len]` is the inner bytes (0: a keepalive,
    /// to be ignored). Only now may the caller move the peer's underlay address to the
    /// datagram's source (roaming).
    Data {
        /// The sender.
        peer: PeerId,
        /// Length of the inner bytes in `out`.
        len: usize,
    },
    /// A valid initiation: `out[..len]` is the response, to send to the datagram's source.
    Respond {
        /// The initiator.
        peer: PeerId,
        /// Length of the response in `out`.
        len: usize,
    },
    /// Our initiation was answered: `out[..len]` is a keepalive to send to the peer at once
    /// (it confirms the session to the responder); then the caller seals what it queued.
    Established {
        /// The responder.
        peer: PeerId,
        /// Length of the keepalive in `out`.
        len: usize,
    },
    /// An initiation that arrived under load without a valid mac2 was not processed:
    /// `out[..len]` is a cookie reply to send to the datagram's source, and only there (it
    /// is smaller than the initiation, so that address gets less than it sent). Nothing is
    /// authenticated yet: not a reason to roam. Counted as [`DropReason::CookieSent`].
    CookieReply {
        /// Length of the cookie reply in `out`.
        len: usize,
    },
    /// A cookie reply to our pending initiation to `peer`: the peer is under load. The
    /// cookie is kept, and the next initiation to the peer (the retry after
    /// [`Config::handshake_retry`], from [`Tunnels::poll_timers`]) carries mac2. Nothing to
    /// send now, and not a reason to roam: anyone who saw our initiation can make one.
    Cookie {
        /// The responder.
        peer: PeerId,
    },
    /// The datagram is of no use.
    Drop(DropReason),
}

/// Why [`Tunnels::open`] dropped a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Too short, wrong length for its type, or non-zero reserved bytes.
    Malformed,
    /// A type byte this version does not know.
    UnknownType,
    /// An initiation from a static key that is not a configured peer.
    UnknownPeer,
    /// No session (or pending handshake) has that receiver index: e.g. this host restarted.
    UnknownIndex,
    /// Authentication failed: forged, corrupted, or not meant for our key.
    AuthFailed,
    /// A data counter already seen, or too far behind the window.
    Replayed,
    /// An initiation whose timestamp is not newer than the last accepted from that peer.
    StaleInitiation,
    /// Data for a session past its age or message limit.
    Expired,
    /// The result would not fit `out`.
    TooLarge,
    /// An initiation whose mac1 is not made with our public key (dropped before any
    /// public-key work).
    BadMac,
    /// An initiation over the handshake budget ([`HANDSHAKES_PER_SECOND`]).
    RateLimited,
    /// An initiation under load without a valid mac2, answered with a cookie reply
    /// ([`Open::CookieReply`], counted here because the initiation itself was not
    /// processed).
    CookieSent,
    /// An initiation under load without a valid mac2, when its source or the host had no
    /// cookie replies left to send ([`SOURCE_HANDSHAKES_PER_SECOND`],
    /// [`COOKIE_REPLIES_PER_SECOND`]).
    UnderLoad,
    /// An initiation over its source address's limit ([`SOURCE_HANDSHAKES_PER_SECOND`]).
    SourceRateLimited,
}

impl DropReason {
    /// Every reason, for reporting counters.
    pub const ALL: [DropReason; 14] = [
        DropReason::Malformed,
        DropReason::UnknownType,
        DropReason::UnknownPeer,
        DropReason::UnknownIndex,
        DropReason::AuthFailed,
        DropReason::Replayed,
        DropReason::StaleInitiation,
        DropReason::Expired,
        DropReason::TooLarge,
        DropReason::BadMac,
        DropReason::RateLimited,
        DropReason::CookieSent,
        DropReason::UnderLoad,
        DropReason::SourceRateLimited,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

/// Counters of a [`Tunnels`], plain integers read through `&Tunnels`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Initiations sent (first attempts, retries and rekeys).
    pub handshakes_initiated: u64,
    /// Handshakes completed: as initiator on a valid response, as responder on a valid
    /// initiation.
    pub handshakes_completed: u64,
    /// Handshakes given up after [`Config::handshake_timeout`].
    pub handshake_timeouts: u64,
    /// Rekeys started by time or message count.
    pub rekeys: u64,
    /// Sessions dropped for age or message count.
    pub sessions_expired: u64,
    /// Peers whose sessions were dropped for idleness.
    pub idle_teardowns: u64,
    /// Data messages sealed, keepalives included.
    pub data_sealed: u64,
    /// Data messages opened, keepalives included.
    pub data_opened: u64,
    drops: [u64; DropReason::ALL.len()],
}

impl Counters {
    /// Datagrams dropped for `reason`.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()]
    }

    /// Datagrams dropped for any reason.
    pub fn drops_total(&self) -> u64 {
        self.drops.iter().sum()
    }
}

/// What [`Tunnels::peer_stats`] tells about one peer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// Whether there is a session to send on.
    pub established: bool,
    /// When that session was established (its age is `now - established_at`).
    pub established_at: Option<Instant>,
    /// Its cipher.
    pub cipher: Option<Cipher>,
    /// Data messages sealed for the peer, keepalives included.
    pub tx_packets: u64,
    /// Inner bytes of those.
    pub tx_bytes: u64,
    /// Data messages opened from the peer, keepalives included.
    pub rx_packets: u64,
    /// Inner bytes of those.
    pub rx_bytes: u64,
    /// Handshakes completed with the peer, in either role.
    pub handshakes: u64,
}

/// The keys of one direction pair, agreed by a handshake.
struct Transport {
    cipher: Cipher,
    send: LessSafeKey,
    recv: LessSafeKey,
}

impl Transport {
    /// The keys of a finished handshake: the initiator sends with the first half of the
    /// split, the responder with the second (Noise's `Split()`).
    fn from_handshake(handshake: &mut HandshakeState, cipher: Cipher) -> Option<Transport> {
        if !handshake.is_handshake_finished() {
            return None;
        }
        let (first, second) = handshake.dangerously_get_raw_split();
        let key = |k: [u8; 32]| {
            UnboundKey::new(cipher.algorithm(), &k)
                .ok()
                .map(LessSafeKey::new)
        };
        let (send, recv) = if handshake.is_initiator() {
            (first, second)
        } else {
            (second, first)
        };
        Some(Transport {
            cipher,
            send: key(send)?,
            recv: key(recv)?,
        })
    }
}

/// One direction-pair of keys agreed by a handshake.
struct Session {
    transport: Transport,
    /// Index the peer puts in messages to us: our key in `Tunnels::indexes`.
    local_index: u32,
    /// Index we put in messages to the peer.
    remote_index: u32,
    established: Instant,
    /// Whether we initiated the handshake.
    initiator: bool,
    /// Messages sealed: the next counter.
    sent: u64,
    window: ReplayWindow,
}

/// Our initiation waiting for a response.
struct Pending {
    handshake: HandshakeState,
    cipher: Cipher,
    index: u32,
    /// The initiation's mac1: the associated data of a cookie reply to it, which ties the
    /// reply to this initiation (whitepaper section 5.4.7).
    mac1: [u8; MAC_LEN],
    sent: Instant,
    first: Instant,
}

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

/// The mac1 key for initiations to the host whose public key is `public`.
fn mac1_key(public: &[u8; 32]) -> hmac::Key {
    let label = ring::digest::digest(
        &ring::digest::SHA256,
        &[b"vane mac1\0" as &[u8], public].concat(),
    );
    hmac::Key::new(hmac::HMAC_SHA256, label.as_ref())
}

/// The mac1 (or mac2, or cookie) of `message` under `key`.
fn mac1(key: &hmac::Key, message: &[u8]) -> [u8; MAC_LEN] {
    let tag = hmac::sign(key, message);
    let mut out = [0; MAC_LEN];
    out.copy_from_slice(&tag.as_ref()[..MAC_LEN]);
    out
}

/// The mac2 of `message` under `cookie`.
fn mac2(cookie: &[u8; COOKIE_LEN], message: &[u8]) -> [u8; MAC_LEN] {
    mac1(&hmac::Key::new(hmac::HMAC_SHA256, cookie), message)
}

/// Whether two MACs are equal, in time that does not depend on where they differ (an
/// early exit would tell a forger how many leading bytes were right).
fn macs_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// The key of the cookie replies of the host whose public key is `public`: anyone may
/// derive it (like WireGuard's, whitepaper section 5.4.7); what binds a reply to one
/// initiation is that initiation's mac1 as associated data.
fn cookie_key(public: &[u8; 32]) -> LessSafeKey {
    let key = ring::digest::digest(
        &ring::digest::SHA256,
        &[b"vane cookie\0" as &[u8], public].concat(),
    );
    LessSafeKey::new(
        UnboundKey::new(&CHACHA20_POLY1305, key.as_ref()).expect("a SHA-256 is a 32-byte key"),
    )
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

    /// Meters one initiation that passed mac1 and says whether the host is under load.
    fn under_load(&mut self, now: Instant) -> bool {
        if !self.load.take(LOAD_RATE, now) {
            self.loaded_until = now.checked_add(UNDER_LOAD_HOLD);
        }
        self.loaded_until.is_some_and(|until| now < until)
    }

    /// The cookie of source `from` (whitepaper section 5.4.7: a MAC of the source IP address
    /// and port under a secret that changes every two minutes). Only the holder of that
    /// address gets it, in a cookie reply; so a valid mac2 shows the initiation really
    /// comes from its source address, and the per-source limit cannot be dodged by spoofing.
    fn cookie(&mut self, from: SocketAddr, now: Instant) -> [u8; COOKIE_LEN] {
        if self
            .cookie_secret
            .as_ref()
            .is_some_and(|(_, made)| now.saturating_duration_since(*made) >= COOKIE_LIFETIME)
        {
            self.cookie_secret = None;
        }
        let (secret, _) = self.cookie_secret.get_or_insert_with(|| {
            let secret: [u8; 32] = rand::random();
            (hmac::Key::new(hmac::HMAC_SHA256, &secret), now)
        });
        let mut input = [0; 18];
        let n = match from.ip().to_canonical() {
            IpAddr::V4(ip) => {
                input[..4].copy_from_slice(&ip.octets());
                4
            }
            IpAddr::V6(ip) => {
                input[..16].copy_from_slice(&ip.octets());
                16
            }
        };
        input[n..n + 2].copy_from_slice(&from.port().to_be_bytes());
        mac1(secret, &input[..n + 2])
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

    /// Seals `inner` for `peer` into `out`, which must hold `inner.len() + DATA_OVERHEAD`
    /// bytes, and [`INITIATION_LEN`] in case a handshake starts (256 covers that). Never
    /// blocks on a rekey while the current session is usable: rekeys start in
    /// [`Tunnels::poll_timers`].
    pub fn seal(
        &mut self,
        peer: PeerId,
        inner: &[u8],
        out: &mut [u8],
        now: Instant,
        wall: u64,
    ) -> Seal {
        let Some(p) = self.peers.get(&peer) else {
            return Seal::UnknownPeer;
        };
        if p.current
            .as_ref()
            .is_some_and(|s| usable(s, &self.cfg, now))
        {
            let Some(room) = out.get_mut(DATA_HEADER_LEN..DATA_HEADER_LEN + inner.len()) else {
                return Seal::TooLarge;
            };
            room.copy_from_slice(inner);
            return self.seal_in_place(peer, out, inner.len(), now);
        }
        if p.pending.is_some() {
            return Seal::Pending;
        }
        match self.initiate(peer, out, now, wall) {
            Some(n) => Seal::Handshake(n),
            None => Seal::TooLarge,
        }
    }

    /// Seals, in place, the `inner_len` inner bytes at `buf[DATA_HEADER_LEN..]` for `peer`:
    /// writes the header in front of them and the tag behind (`buf` must hold `inner_len +
    /// DATA_OVERHEAD` bytes) and returns [`Seal::Data`] with the message length. Without a
    /// usable session it touches nothing and returns [`Seal::NoSession`]: the caller keeps
    /// the inner bytes and starts a handshake ([`Tunnels::initiate`]).
    pub fn seal_in_place(
        &mut self,
        peer: PeerId,
        buf: &mut [u8],
        inner_len: usize,
        now: Instant,
    ) -> Seal {
        let Some(p) = self.peers.get_mut(&peer) else {
            return Seal::UnknownPeer;
        };
        let Some(s) = p.current.as_mut().filter(|s| usable(s, &self.cfg, now)) else {
            return Seal::NoSession;
        };
        let Some(n) = seal_data(s, buf, inner_len) else {
            return Seal::TooLarge;
        };
        self.counters.data_sealed += 1;
        p.stats.tx_packets += 1;
        p.stats.tx_bytes += inner_len as u64;
        if inner_len > 0 {
            p.last_activity = Some(now);
        }
        Seal::Data(n)
    }

    /// Starts a handshake with `peer` unless one is under way, and returns the length of
    /// the initiation written to `out` (at least [`INITIATION_LEN`] bytes). For when the
    /// peer sends data for an index we do not know (this host restarted).
    pub fn initiate(
        &mut self,
        peer: PeerId,
        out: &mut [u8],
        now: Instant,
        wall: u64,
    ) -> Option<usize> {
        let p = self.peers.get(&peer)?;
        if p.pending.is_some() {
            return None;
        }
        let n = self.start_handshake(peer, out, now, wall)?;
        if let Some(p) = self.peers.get_mut(&peer) {
            p.last_activity = Some(now);
        }
        Some(n)
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

    /// Runs the timers: handshake retries and give-ups, rekeys by time and message count,
    /// session expiry, idle teardown. Call after every batch of datagrams and at least every
    /// 100 ms, repeatedly until it returns `None`: each `Some` is an initiation in
    /// `out[..n]` (at least [`INITIATION_LEN`] bytes) to send to that peer.
    pub fn poll_timers(
        &mut self,
        now: Instant,
        wall: u64,
        out: &mut [u8],
    ) -> Option<(PeerId, usize)> {
        let cfg = &self.cfg;
        let mut initiate = None;
        for (&id, p) in self.peers.iter_mut() {
            let idle = p
                .last_activity
                .is_none_or(|t| now.saturating_duration_since(t) >= cfg.idle_timeout);
            if p.has_sessions() && idle {
                p.clear(&mut self.indexes);
                self.counters.idle_teardowns += 1;
                continue;
            }
            for slot in [&mut p.current, &mut p.previous, &mut p.next] {
                if slot.as_ref().is_some_and(|s| !usable(s, cfg, now)) {
                    if let Some(s) = slot.take() {
                        self.indexes.remove(&s.local_index);
                    }
                    self.counters.sessions_expired += 1;
                }
            }
            if let Some(pending) = &p.pending {
                if now.saturating_duration_since(pending.first) >= cfg.handshake_timeout {
                    self.indexes.remove(&pending.index);
                    p.pending = None;
                    self.counters.handshake_timeouts += 1;
                } else if now.saturating_duration_since(pending.sent) >= cfg.handshake_retry {
                    initiate = Some(id);
                    break;
                }
                continue;
            }
            if let Some(s) = &p.current {
                let mut after = cfg.rekey_after_time;
                if !s.initiator {
                    after += cfg.handshake_retry * 10;
                }
                if now.saturating_duration_since(s.established) >= after
                    || s.sent >= cfg.rekey_after_messages
                {
                    self.counters.rekeys += 1;
                    initiate = Some(id);
                    break;
                }
            }
        }
        let id = initiate?;
        // If `out` is too small, the retry or rekey comes again on the next call.
        self.start_handshake(id, out, now, wall).map(|n| (id, n))
    }

    /// When [`Tunnels::poll_timers`] has something to do next by time (an idle teardown, a
    /// session's expiry, a handshake's retry or timeout, a rekey); `None` if nothing is
    /// due ever without new traffic. A rekey by message count is not timed: it is found by
    /// the `poll_timers` call after the seals that reach it.
    pub fn next_timer(&self) -> Option<Instant> {
        let cfg = &self.cfg;
        let mut next: Option<Instant> = None;
        let mut at = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        for p in self.peers.values() {
            for s in [&p.current, &p.previous, &p.next].into_iter().flatten() {
                at(s.established + cfg.reject_after_time);
                // Idle teardown, after the last activity (or the session's start: a wake-up
                // a little late for a session never used costs nothing).
                at(p.last_activity.unwrap_or(s.established) + cfg.idle_timeout);
            }
            if let Some(pending) = &p.pending {
                at((pending.first + cfg.handshake_timeout).min(pending.sent + cfg.handshake_retry));
                continue;
            }
            if let Some(s) = &p.current {
                let mut after = cfg.rekey_after_time;
                if !s.initiator {
                    after += cfg.handshake_retry * 10;
                }
                at(s.established + after);
            }
        }
        next
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

    /// Writes a fresh initiation to `peer` into `out` and makes it the pending handshake
    /// (replacing an older one, whose first attempt time it keeps).
    fn start_handshake(
        &mut self,
        peer: PeerId,
        out: &mut [u8],
        now: Instant,
        wall: u64,
    ) -> Option<usize> {
        let cipher = self.cfg.cipher;
        let params = self.params(cipher).clone();
        let p = self.peers.get_mut(&peer)?;
        if out.len() < INITIATION_LEN {
            return None;
        }
        let mut handshake = Builder::new(params)
            .local_private_key(&self.local.private)
            .and_then(|b| b.remote_public_key(&p.public))
            .and_then(|b| b.build_initiator())
            .ok()?;
        let timestamp = wall.max(self.last_timestamp_sent.saturating_add(1));
        let mut payload = [0; TIMESTAMP_LEN];
        payload[..8].copy_from_slice(&timestamp.to_be_bytes());
        let n = handshake.write_message(&payload, &mut out[8..]).ok()?;
        self.last_timestamp_sent = timestamp;
        let index = new_index(&mut self.indexes, peer);
        out[..4].copy_from_slice(&[cipher.initiation_type(), 0, 0, 0]);
        out[4..8].copy_from_slice(&index.to_be_bytes());
        // Over the whole message, header included.
        let tag = mac1(&p.mac1, &out[..8 + n]);
        out[8 + n..8 + n + MAC_LEN].copy_from_slice(&tag);
        // Over the message up to mac2, mac1 included (whitepaper section 5.4.4).
        let end = 8 + n + MAC_LEN;
        let mac2 = match p.cookie {
            Some((cookie, at)) if now.saturating_duration_since(at) < COOKIE_LIFETIME => {
                mac2(&cookie, &out[..end])
            }
            _ => [0; MAC_LEN],
        };
        out[end..end + MAC_LEN].copy_from_slice(&mac2);
        let first = match p.pending.take() {
            Some(old) => {
                self.indexes.remove(&old.index);
                old.first
            }
            None => now,
        };
        p.pending = Some(Pending {
            handshake,
            cipher,
            index,
            mac1: tag,
            sent: now,
            first,
        });
        self.counters.handshakes_initiated += 1;
        Some(end + MAC_LEN)
    }

    /// Opens a data message in place: the inner bytes end up at `datagram[DATA_HEADER_LEN..]`.
    fn open_data(&mut self, datagram: &mut [u8], now: Instant) -> Open {
        if datagram.len() < DATA_OVERHEAD {
            return Open::Drop(DropReason::Malformed);
        }
        let index = u32::from_be_bytes([datagram[4], datagram[5], datagram[6], datagram[7]]);
        let mut counter = [0; 8];
        counter.copy_from_slice(&datagram[8..16]);
        let counter = u64::from_be_bytes(counter);
        let Some(&peer) = self.indexes.get(&index) else {
            return Open::Drop(DropReason::UnknownIndex);
        };
        let Some(p) = self.peers.get_mut(&peer) else {
            return Open::Drop(DropReason::UnknownIndex);
        };
        let is_next = p.next.as_ref().is_some_and(|s| s.local_index == index);
        let Some(s) = [&mut p.current, &mut p.previous, &mut p.next]
            .into_iter()
            .flatten()
            .find(|s| s.local_index == index)
        else {
            return Open::Drop(DropReason::UnknownIndex);
        };
        if !usable(s, &self.cfg, now) || counter >= self.cfg.reject_after_messages {
            return Open::Drop(DropReason::Expired);
        }
        if !s.window.check(counter) {
            return Open::Drop(DropReason::Replayed);
        }
        let sealed = &mut datagram[DATA_HEADER_LEN..];
        let Ok(inner) = s.transport.recv.open_in_place(
            s.transport.cipher.nonce(counter),
            aead::Aad::empty(),
            sealed,
        ) else {
            return Open::Drop(DropReason::AuthFailed);
        };
        let len = inner.len();
        s.window.mark(counter);
        if is_next {
            // Key confirmation: the initiator uses the new session, so we may too.
            if let Some(old) = p.previous.take() {
                self.indexes.remove(&old.local_index);
            }
            p.previous = p.current.take();
            p.current = p.next.take();
        }
        self.counters.data_opened += 1;
        p.stats.rx_packets += 1;
        p.stats.rx_bytes += len as u64;
        if len > 0 {
            p.last_activity = Some(now);
        }
        Open::Data { peer, len }
    }

    fn open_initiation(
        &mut self,
        datagram: &[u8],
        from: SocketAddr,
        out: &mut [u8],
        now: Instant,
        cipher: Cipher,
    ) -> Open {
        if datagram.len() != INITIATION_LEN {
            return Open::Drop(DropReason::Malformed);
        }
        if out.len() < RESPONSE_LEN {
            return Open::Drop(DropReason::TooLarge);
        }
        // Cheap checks first, in order of cost, all before any public-key work (see the
        // crate's documentation). Whoever does not know our public key costs one HMAC.
        let (message, macs) = datagram.split_at(INITIATION_LEN - 2 * MAC_LEN);
        let (tag1, tag2) = macs.split_at(MAC_LEN);
        if !macs_equal(&mac1(&self.mac1, message), tag1) {
            return Open::Drop(DropReason::BadMac);
        }
        if self.under_load(now) {
            let cookie = self.cookie(from, now);
            let expected = mac2(&cookie, &datagram[..INITIATION_LEN - MAC_LEN]);
            if !macs_equal(&expected, tag2) {
                // No cookie, an old one, or one for another address: send the current one.
                // Per source first, so that one source cannot take all the host's replies.
                let source = self.sources.get(from.ip(), now);
                if !source.cookies.take(SOURCE_RATE, now)
                    || !self.cookie_budget.take(COOKIE_REPLY_RATE, now)
                {
                    return Open::Drop(DropReason::UnderLoad);
                }
                return self.cookie_reply(datagram, tag1, &cookie, out);
            }
        }
        if !self
            .sources
            .get(from.ip(), now)
            .handshakes
            .take(SOURCE_RATE, now)
        {
            return Open::Drop(DropReason::SourceRateLimited);
        }
        if !self.budget.take(HANDSHAKE_RATE, now) {
            return Open::Drop(DropReason::RateLimited);
        }
        let Ok(mut handshake) = Builder::new(self.params(cipher).clone())
            .local_private_key(&self.local.private)
            .and_then(|b| b.build_responder())
        else {
            return Open::Drop(DropReason::AuthFailed);
        };
        let mut payload = [0; INITIATION_LEN];
        let Ok(TIMESTAMP_LEN) = handshake.read_message(&message[8..], &mut payload) else {
            return Open::Drop(DropReason::AuthFailed);
        };
        let Some(&peer) = handshake
            .get_remote_static()
            .and_then(|k| <[u8; 32]>::try_from(k).ok())
            .and_then(|k| self.by_key.get(&k))
        else {
            return Open::Drop(DropReason::UnknownPeer);
        };
        let Some(p) = self.peers.get_mut(&peer) else {
            return Open::Drop(DropReason::UnknownPeer);
        };
        let mut timestamp = [0; 8];
        timestamp.copy_from_slice(&payload[..8]);
        let timestamp = u64::from_be_bytes(timestamp);
        if p.last_timestamp.is_some_and(|last| timestamp <= last) {
            return Open::Drop(DropReason::StaleInitiation);
        }
        let Ok(n) = handshake.write_message(&[], &mut out[12..]) else {
            return Open::Drop(DropReason::AuthFailed);
        };
        let Some(transport) = Transport::from_handshake(&mut handshake, cipher) else {
            return Open::Drop(DropReason::AuthFailed);
        };
        let index = new_index(&mut self.indexes, peer);
        out[..4].copy_from_slice(&[TYPE_RESPONSE, 0, 0, 0]);
        out[4..8].copy_from_slice(&index.to_be_bytes());
        out[8..12].copy_from_slice(&datagram[4..8]);
        let remote_index = u32::from_be_bytes([datagram[4], datagram[5], datagram[6], datagram[7]]);
        let session = Session::new(transport, index, remote_index, now, false);
        if let Some(old) = p.next.replace(session) {
            self.indexes.remove(&old.local_index);
        }
        p.last_timestamp = Some(timestamp);
        if p.current.is_none() {
            p.last_activity = Some(now);
        }
        p.stats.handshakes += 1;
        self.counters.handshakes_completed += 1;
        Open::Respond { peer, len: 12 + n }
    }

    /// Writes to `out` the cookie reply to `initiation`, whose mac1 is `initiation_mac1`
    /// (whitepaper section 5.4.7): the cookie, sealed under our cookie key with the mac1 as
    /// associated data, so that only who saw the initiation (its sender, normally) can
    /// make or use a reply to it.
    fn cookie_reply(
        &self,
        initiation: &[u8],
        initiation_mac1: &[u8],
        cookie: &[u8; COOKIE_LEN],
        out: &mut [u8],
    ) -> Open {
        let Some(out) = out.get_mut(..COOKIE_REPLY_LEN) else {
            return Open::Drop(DropReason::TooLarge);
        };
        let nonce: [u8; COOKIE_NONCE_LEN] = rand::random();
        let sealed = 8 + COOKIE_NONCE_LEN;
        out[sealed..sealed + COOKIE_LEN].copy_from_slice(cookie);
        let Ok(tag) = self.cookie_key.seal_in_place_separate_tag(
            aead::Nonce::assume_unique_for_key(nonce),
            aead::Aad::from(initiation_mac1),
            &mut out[sealed..sealed + COOKIE_LEN],
        ) else {
            return Open::Drop(DropReason::UnderLoad);
        };
        out[sealed + COOKIE_LEN..].copy_from_slice(tag.as_ref());
        out[..4].copy_from_slice(&[TYPE_COOKIE_REPLY, 0, 0, 0]);
        // The initiator's sender index: it finds its pending handshake by it.
        out[4..8].copy_from_slice(&initiation[4..8]);
        out[8..sealed].copy_from_slice(&nonce);
        Open::CookieReply {
            len: COOKIE_REPLY_LEN,
        }
    }

    /// A cookie reply to one of our initiations: keep the cookie for the next.
    fn open_cookie_reply(&mut self, datagram: &[u8], now: Instant) -> Open {
        if datagram.len() != COOKIE_REPLY_LEN {
            return Open::Drop(DropReason::Malformed);
        }
        let index = u32::from_be_bytes([datagram[4], datagram[5], datagram[6], datagram[7]]);
        let Some((peer, p)) = awaiting(&self.indexes, &mut self.peers, index) else {
            return Open::Drop(DropReason::UnknownIndex);
        };
        let mac1 = p.pending.as_ref().expect("awaiting a response").mac1;
        let sealed = 8 + COOKIE_NONCE_LEN;
        let mut nonce = [0; COOKIE_NONCE_LEN];
        nonce.copy_from_slice(&datagram[8..sealed]);
        let mut cookie = [0; COOKIE_LEN + TAG_LEN];
        cookie.copy_from_slice(&datagram[sealed..]);
        let Ok(opened) = p.cookie_key.open_in_place(
            aead::Nonce::assume_unique_for_key(nonce),
            aead::Aad::from(mac1),
            &mut cookie,
        ) else {
            return Open::Drop(DropReason::AuthFailed);
        };
        let mut kept = [0; COOKIE_LEN];
        kept.copy_from_slice(opened);
        p.cookie = Some((kept, now));
        Open::Cookie { peer }
    }

    fn open_response(&mut self, datagram: &[u8], out: &mut [u8], now: Instant) -> Open {
        if datagram.len() != RESPONSE_LEN {
            return Open::Drop(DropReason::Malformed);
        }
        if out.len() < DATA_OVERHEAD {
            return Open::Drop(DropReason::TooLarge);
        }
        let remote_index = u32::from_be_bytes([datagram[4], datagram[5], datagram[6], datagram[7]]);
        let index = u32::from_be_bytes([datagram[8], datagram[9], datagram[10], datagram[11]]);
        let Some((peer, p)) = awaiting(&self.indexes, &mut self.peers, index) else {
            return Open::Drop(DropReason::UnknownIndex);
        };
        let pending = p.pending.as_mut().expect("awaiting a response");
        // A failed read leaves the handshake as it was (snow restores its state), so a
        // forged response does not spoil the genuine one.
        let mut payload = [0; RESPONSE_LEN];
        if pending
            .handshake
            .read_message(&datagram[12..], &mut payload)
            .is_err()
        {
            return Open::Drop(DropReason::AuthFailed);
        }
        let Some(mut pending) = p.pending.take() else {
            return Open::Drop(DropReason::UnknownIndex);
        };
        let Some(transport) = Transport::from_handshake(&mut pending.handshake, pending.cipher)
        else {
            self.indexes.remove(&index);
            return Open::Drop(DropReason::AuthFailed);
        };
        let session = Session::new(transport, index, remote_index, now, true);
        if let Some(old) = p.previous.take() {
            self.indexes.remove(&old.local_index);
        }
        p.previous = p.current.replace(session);
        p.stats.handshakes += 1;
        self.counters.handshakes_completed += 1;
        let mut len = 0;
        if let Some(n) = p.current.as_mut().and_then(|s| seal_data(s, out, 0)) {
            len = n;
            p.stats.tx_packets += 1;
            self.counters.data_sealed += 1;
        }
        Open::Established { peer, len }
    }
}

/// The peer whose handshake in progress has local index `index`: what a response or a
/// cookie reply to one of our initiations names. Over the two maps rather than `Tunnels`,
/// so that its other fields stay free while the peer is borrowed.
fn awaiting<'a>(
    indexes: &HashMap<u32, PeerId>,
    peers: &'a mut HashMap<PeerId, Peer>,
    index: u32,
) -> Option<(PeerId, &'a mut Peer)> {
    let &peer = indexes.get(&index)?;
    let p = peers.get_mut(&peer)?;
    p.pending
        .as_ref()
        .is_some_and(|h| h.index == index)
        .then_some((peer, p))
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

impl Session {
    fn new(
        transport: Transport,
        local_index: u32,
        remote_index: u32,
        now: Instant,
        initiator: bool,
    ) -> Session {
        Session {
            transport,
            local_index,
            remote_index,
            established: now,
            initiator,
            sent: 0,
            window: ReplayWindow::new(),
        }
    }
}

/// Whether a session may still be used (to send, or to receive on).
fn usable(s: &Session, cfg: &Config, now: Instant) -> bool {
    now.saturating_duration_since(s.established) < cfg.reject_after_time
        && s.sent < cfg.reject_after_messages
}

/// Seals the `inner_len` bytes at `buf[DATA_HEADER_LEN..]` into a data message in place;
/// `None` if `buf` cannot hold the header, the inner bytes and the tag.
fn seal_data(s: &mut Session, buf: &mut [u8], inner_len: usize) -> Option<usize> {
    let end = DATA_HEADER_LEN.checked_add(inner_len)?;
    if buf.len() < end.checked_add(TAG_LEN)? {
        return None;
    }
    let counter = s.sent;
    let tag = s
        .transport
        .send
        .seal_in_place_separate_tag(
            s.transport.cipher.nonce(counter),
            aead::Aad::empty(),
            &mut buf[DATA_HEADER_LEN..end],
        )
        .ok()?;
    buf[end..end + TAG_LEN].copy_from_slice(tag.as_ref());
    buf[..4].copy_from_slice(&[TYPE_DATA, 0, 0, 0]);
    buf[4..8].copy_from_slice(&s.remote_index.to_be_bytes());
    buf[8..16].copy_from_slice(&counter.to_be_bytes());
    s.sent += 1;
    Some(end + TAG_LEN)
}

/// A random index not in use, registered for `peer`.
fn new_index(indexes: &mut HashMap<u32, PeerId>, peer: PeerId) -> u32 {
    loop {
        let index = rand::random();
        if let std::collections::hash_map::Entry::Vacant(e) = indexes.entry(index) {
            e.insert(peer);
            return index;
        }
    }
}
