//! What the calls of [`Tunnels`] report: the results of sealing and opening, why a
//! datagram was dropped, the counters and each peer's statistics.

use std::time::Instant;

use crate::{Cipher, PeerId};
#[cfg(doc)]
use crate::{
    Config, Tunnels, COOKIE_REPLIES_PER_SECOND, HANDSHAKES_PER_SECOND, SOURCE_HANDSHAKES_PER_SECOND,
};

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

    pub(crate) fn index(self) -> usize {
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
    pub(crate) drops: [u64; DropReason::ALL.len()],
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
