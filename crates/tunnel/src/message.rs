//! The tunnel's datagrams on the wire: message types, header and message lengths, and
//! telling a tunnel datagram apart from other traffic.

#[cfg(doc)]
use crate::COOKIE_LIFETIME;

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

/// Length of a cookie reply: header 8 (type, 3 zero, the initiator's sender index), nonce
/// 12, encrypted cookie 16 + 16.
pub const COOKIE_REPLY_LEN: usize = 8 + COOKIE_NONCE_LEN + COOKIE_LEN + TAG_LEN;
/// A cookie: a truncated HMAC-SHA256 of the source address.
pub(crate) const COOKIE_LEN: usize = 16;
/// The nonce of a cookie reply's AEAD. WireGuard uses XChaCha20-Poly1305 with a random
/// 24-byte nonce (section 5.4.7); ring has no XChaCha, so this is ChaCha20-Poly1305 with a
/// random 12-byte nonce. All cookie replies of a host are sealed under one key (derived
/// from its public key, so the initiator can derive it too), and random 96-bit nonces are
/// safe for 2^32 messages per key (NIST SP 800-38D, 8.3): at
/// [`COOKIE_REPLIES_PER_SECOND`], more than 130 years of replies. A counter nonce is not an
/// option: it would restart with the process while the key, tied to the long-lived public
/// key, stays the same.
pub(crate) const COOKIE_NONCE_LEN: usize = 12;

// A cookie reply must never be larger than what it answers (no amplification), and it is
// written into the `out` that holds a response.
const _: () = assert!(COOKIE_REPLY_LEN < INITIATION_LEN && COOKIE_REPLY_LEN <= RESPONSE_LEN);

/// Length of a handshake response: header 12, ephemeral 32, empty encrypted payload 16.
pub const RESPONSE_LEN: usize = 12 + 32 + TAG_LEN;

/// The initiation payload: wall clock nanoseconds (u64) and 4 zero bytes.
pub(crate) const TIMESTAMP_LEN: usize = 12;

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
