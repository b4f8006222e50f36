//! Turning handshake floods away (see the crate's documentation): the budgets and the
//! under-load meter, mac1 and mac2, and the cookies and cookie replies that carry them.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ring::aead::{self, LessSafeKey, UnboundKey, CHACHA20_POLY1305};
use ring::hmac;

use crate::handshake::awaiting;
use crate::limit::Rate;
use crate::message::{COOKIE_LEN, COOKIE_NONCE_LEN};
#[cfg(doc)]
use crate::Config;
use crate::{DropReason, Open, Tunnels, COOKIE_REPLY_LEN, MAC_LEN, TAG_LEN, TYPE_COOKIE_REPLY};

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

pub(crate) const HANDSHAKE_RATE: Rate = Rate::new(HANDSHAKES_PER_SECOND, HANDSHAKES_PER_SECOND);
const LOAD_RATE: Rate = Rate::new(UNDER_LOAD_PER_SECOND, UNDER_LOAD_PER_SECOND);
pub(crate) const SOURCE_RATE: Rate = Rate::new(SOURCE_HANDSHAKES_PER_SECOND, SOURCE_BURST);
pub(crate) const COOKIE_REPLY_RATE: Rate =
    Rate::new(COOKIE_REPLIES_PER_SECOND, COOKIE_REPLIES_PER_SECOND);

/// The mac1 key for initiations to the host whose public key is `public`.
pub(crate) fn mac1_key(public: &[u8; 32]) -> hmac::Key {
    let label = ring::digest::digest(
        &ring::digest::SHA256,
        &[b"vane mac1\0" as &[u8], public].concat(),
    );
    hmac::Key::new(hmac::HMAC_SHA256, label.as_ref())
}

/// The mac1 (or mac2, or cookie) of `message` under `key`.
pub(crate) fn mac1(key: &hmac::Key, message: &[u8]) -> [u8; MAC_LEN] {
    let tag = hmac::sign(key, message);
    let mut out = [0; MAC_LEN];
    out.copy_from_slice(&tag.as_ref()[..MAC_LEN]);
    out
}

/// The mac2 of `message` under `cookie`.
pub(crate) fn mac2(cookie: &[u8; COOKIE_LEN], message: &[u8]) -> [u8; MAC_LEN] {
    mac1(&hmac::Key::new(hmac::HMAC_SHA256, cookie), message)
}

/// Whether two MACs are equal, in time that does not depend on where they differ (an
/// early exit would tell a forger how many leading bytes were right).
pub(crate) fn macs_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// The key of the cookie replies of the host whose public key is `public`: anyone may
/// derive it (like WireGuard's, whitepaper section 5.4.7); what binds a reply to one
/// initiation is that initiation's mac1 as associated data.
pub(crate) fn cookie_key(public: &[u8; 32]) -> LessSafeKey {
    let key = ring::digest::digest(
        &ring::digest::SHA256,
        &[b"vane cookie\0" as &[u8], public].concat(),
    );
    LessSafeKey::new(
        UnboundKey::new(&CHACHA20_POLY1305, key.as_ref()).expect("a SHA-256 is a 32-byte key"),
    )
}

impl Tunnels {
    /// Meters one initiation that passed mac1 and says whether the host is under load.
    pub(crate) fn under_load(&mut self, now: Instant) -> bool {
        if !self.load.take(LOAD_RATE, now) {
            self.loaded_until = now.checked_add(UNDER_LOAD_HOLD);
        }
        self.loaded_until.is_some_and(|until| now < until)
    }

    /// The cookie of source `from` (whitepaper section 5.4.7: a MAC of the source IP address
    /// and port under a secret that changes every two minutes). Only the holder of that
    /// address gets it, in a cookie reply; so a valid mac2 shows the initiation really
    /// comes from its source address, and the per-source limit cannot be dodged by spoofing.
    pub(crate) fn cookie(&mut self, from: SocketAddr, now: Instant) -> [u8; COOKIE_LEN] {
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

    /// Writes to `out` the cookie reply to `initiation`, whose mac1 is `initiation_mac1`
    /// (whitepaper section 5.4.7): the cookie, sealed under our cookie key with the mac1 as
    /// associated data, so that only who saw the initiation (its sender, normally) can
    /// make or use a reply to it.
    pub(crate) fn cookie_reply(
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
    pub(crate) fn open_cookie_reply(&mut self, datagram: &[u8], now: Instant) -> Open {
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
}
