//! Noise IK handshakes: writing initiations (first tries, retries and rekeys), answering
//! them, and completing on the response; the indexes that name sessions and handshakes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Instant;

use snow::{Builder, HandshakeState};

use crate::flood::{mac1, mac2, macs_equal, COOKIE_REPLY_RATE, HANDSHAKE_RATE, SOURCE_RATE};
use crate::message::TIMESTAMP_LEN;
use crate::session::{seal_data, Session, Transport};
use crate::{
    Cipher, DropReason, Open, Peer, PeerId, Tunnels, COOKIE_LIFETIME, DATA_OVERHEAD,
    INITIATION_LEN, MAC_LEN, RESPONSE_LEN, TYPE_RESPONSE,
};

/// Our initiation waiting for a response.
pub(crate) struct Pending {
    pub(crate) handshake: HandshakeState,
    pub(crate) cipher: Cipher,
    pub(crate) index: u32,
    /// The initiation's mac1: the associated data of a cookie reply to it, which ties the
    /// reply to this initiation (whitepaper section 5.4.7).
    pub(crate) mac1: [u8; MAC_LEN],
    pub(crate) sent: Instant,
    pub(crate) first: Instant,
}

impl Tunnels {
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

    /// Writes a fresh initiation to `peer` into `out` and makes it the pending handshake
    /// (replacing an older one, whose first attempt time it keeps).
    pub(crate) fn start_handshake(
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

    pub(crate) fn open_initiation(
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

    pub(crate) fn open_response(&mut self, datagram: &[u8], out: &mut [u8], now: Instant) -> Open {
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
pub(crate) fn awaiting<'a>(
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

/// A random index not in use, registered for `peer`.
pub(crate) fn new_index(indexes: &mut HashMap<u32, PeerId>, peer: PeerId) -> u32 {
    loop {
        let index = rand::random();
        if let std::collections::hash_map::Entry::Vacant(e) = indexes.entry(index) {
            e.insert(peer);
            return index;
        }
    }
}
