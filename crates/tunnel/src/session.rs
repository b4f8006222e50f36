//! Established sessions: the transport keys a handshake agreed on, and sealing and
//! opening data messages with them in place (counters, the replay window, key
//! confirmation).

use std::time::Instant;

use ring::aead::{self, LessSafeKey, UnboundKey};
use snow::HandshakeState;

use crate::replay::ReplayWindow;
#[cfg(doc)]
use crate::INITIATION_LEN;
use crate::{
    Cipher, Config, DropReason, Open, PeerId, Seal, Tunnels, DATA_HEADER_LEN, DATA_OVERHEAD,
    TAG_LEN, TYPE_DATA,
};

/// The keys of one direction pair, agreed by a handshake.
pub(crate) struct Transport {
    pub(crate) cipher: Cipher,
    pub(crate) send: LessSafeKey,
    pub(crate) recv: LessSafeKey,
}

impl Transport {
    /// The keys of a finished handshake: the initiator sends with the first half of the
    /// split, the responder with the second (Noise's `Split()`).
    pub(crate) fn from_handshake(
        handshake: &mut HandshakeState,
        cipher: Cipher,
    ) -> Option<Transport> {
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

/// The keys of a finished Noise handshake for a stream outside the tunnels (agent to
/// agent): each message is sealed and opened in place, with Noise's transport nonce (the
/// message's number) and no associated data, so a message is byte for byte what snow's
/// transport mode makes, without its copies of each message in and out.
pub struct StreamKeys(Transport);

impl StreamKeys {
    /// The keys of `handshake`, once it is finished.
    pub fn from_handshake(handshake: &mut HandshakeState, cipher: Cipher) -> Option<StreamKeys> {
        Transport::from_handshake(handshake, cipher).map(StreamKeys)
    }

    /// Seals the `len` plaintext bytes at the start of `buf` as message number `counter`:
    /// the ciphertext takes their place, the tag follows them. Returns the message's
    /// length, `len + TAG_LEN`, or `None` if `buf` has no room for the tag.
    pub fn seal_in_place(&self, counter: u64, buf: &mut [u8], len: usize) -> Option<usize> {
        let end = len.checked_add(TAG_LEN)?;
        if buf.len() < end {
            return None;
        }
        let t = &self.0;
        let tag = t
            .send
            .seal_in_place_separate_tag(
                t.cipher.nonce(counter),
                aead::Aad::empty(),
                &mut buf[..len],
            )
            .ok()?;
        buf[len..end].copy_from_slice(tag.as_ref());
        Some(end)
    }

    /// Opens message number `counter` (ciphertext and tag) in place; the plaintext's
    /// length, at the start of `msg`, or `None` if the message fails authentication.
    pub fn open_in_place(&self, counter: u64, msg: &mut [u8]) -> Option<usize> {
        let t = &self.0;
        t.recv
            .open_in_place(t.cipher.nonce(counter), aead::Aad::empty(), msg)
            .ok()
            .map(|plain| plain.len())
    }
}

/// One direction-pair of keys agreed by a handshake.
pub(crate) struct Session {
    pub(crate) transport: Transport,
    /// Index the peer puts in messages to us: our key in `Tunnels::indexes`.
    pub(crate) local_index: u32,
    /// Index we put in messages to the peer.
    pub(crate) remote_index: u32,
    pub(crate) established: Instant,
    /// Whether we initiated the handshake.
    pub(crate) initiator: bool,
    /// Messages sealed: the next counter.
    pub(crate) sent: u64,
    pub(crate) window: ReplayWindow,
}

impl Tunnels {
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

    /// Opens a data message in place: the inner bytes end up at `datagram[DATA_HEADER_LEN..]`.
    pub(crate) fn open_data(&mut self, datagram: &mut [u8], now: Instant) -> Open {
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
}

impl Session {
    pub(crate) fn new(
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
pub(crate) fn usable(s: &Session, cfg: &Config, now: Instant) -> bool {
    now.saturating_duration_since(s.established) < cfg.reject_after_time
        && s.sent < cfg.reject_after_messages
}

/// Seals the `inner_len` bytes at `buf[DATA_HEADER_LEN..]` into a data message in place;
/// `None` if `buf` cannot hold the header, the inner bytes and the tag.
pub(crate) fn seal_data(s: &mut Session, buf: &mut [u8], inner_len: usize) -> Option<usize> {
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
