//! What other hosts send: datagrams opened in place (handshakes answered, sessions
//! established, roaming followed), their frames checked again by this host's switch and
//! written to local devices, a stream's segments merged again where they join.

use std::net::SocketAddr;
use std::time::Instant;

use vane_switch::{HostId, PortId, Verdict};
use vane_tunnel::{Open, Seal, DATA_HEADER_LEN, TAG_LEN};
use vane_wire::overlay::{self, FLAG_CSUM_PARTIAL, NETS_LEN};
use vane_wire::vnet::{self, VnetHdr, VNET_HDR_LEN};

use crate::*;

impl Node {
    /// Writes the merged segments waiting for their device. The shell calls it after each
    /// run of datagrams from one sender (what it merged goes before the next run's).
    pub fn flush_coalesced<I: Io>(&mut self, io: &mut I) {
        if let Some((port, bytes)) = self.coalescer.take() {
            io.write_port(PortId(port), bytes);
        }
    }

    /// One datagram from another host's node, opened in place.
    pub fn handle_datagram<I: Io>(
        &mut self,
        io: &mut I,
        datagram: &mut [u8],
        from: SocketAddr,
        now: Instant,
    ) {
        let Some((_, plaintext)) = self.identity else {
            self.counters.drop_wrong_mode += 1;
            return;
        };
        if plaintext {
            let Some((sender, frame)) = overlay::parse_plain(datagram) else {
                self.counters.drop_wrong_mode += 1;
                return;
            };
            // Without authentication, the source address is all there is to go by.
            let known = self
                .peers
                .get_mut(&sender)
                .filter(|p| p.endpoint.map(|e| e.ip()) == Some(from.ip()));
            let Some(peer) = known else {
                self.counters.drop_plaintext_unknown_sender += 1;
                return;
            };
            peer.plain_rx.0 += 1;
            peer.plain_rx.1 += frame.len() as u64;
            self.deliver_from_tunnel(io, sender, frame, now);
            return;
        }
        match self
            .tunnels
            .open_in_place(datagram, from, &mut self.scratch, now)
        {
            Open::Data { peer, len } => {
                self.roam(peer, from);
                if len > 0 {
                    let frame = &mut datagram[DATA_HEADER_LEN..DATA_HEADER_LEN + len];
                    self.deliver_from_tunnel(io, peer, frame, now);
                }
            }
            Open::Respond { peer, len } => {
                self.roam(peer, from);
                io.send_now(&self.scratch[..len], from);
            }
            Open::Established { peer, len } => {
                self.roam(peer, from);
                io.send_now(&self.scratch[..len], from);
                self.flush_waiting(io, peer, now);
            }
            // This host is under load: the initiator proves its address with the cookie on
            // its next try. To the source only, and no roaming: nothing is authenticated.
            Open::CookieReply { len } => io.send_now(&self.scratch[..len], from),
            // The peer is under load; the tunnels put the cookie in the next initiation.
            Open::Cookie { .. } => {}
            Open::Drop(vane_tunnel::DropReason::UnknownIndex) => {
                // Data for a session this host does not have: its agent restarted, or the
                // peer kept a session this side tore down. Rebuild from this side.
                let peer = self
                    .peers
                    .iter()
                    .find(|(_, p)| p.endpoint == Some(from))
                    .map(|(id, _)| *id);
                if let Some(peer) = peer {
                    let wall = crate::wall_at(&mut self.epoch, now);
                    if let Some(n) = self.tunnels.initiate(peer, &mut self.scratch, now, wall) {
                        io.send_now(&self.scratch[..n], from);
                    }
                }
            }
            // Counted by the tunnels.
            Open::Drop(_) => {}
        }
    }

    /// An authenticated packet of `peer` came from `from`: send its packets there from now
    /// on (the host's underlay address changed before the directory knew).
    pub(crate) fn roam(&mut self, peer: HostId, from: SocketAddr) {
        if let Some(p) = self.peers.get_mut(&peer) {
            if p.endpoint != Some(from) {
                tracing::info!(host = %p.name, %from, "peer moved on the underlay");
                p.endpoint = Some(from);
            }
        }
    }

    /// Seals and sends the frames that waited for a session with `peer`.
    pub(crate) fn flush_waiting<I: Io>(&mut self, io: &mut I, peer: HostId, now: Instant) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        let waiting = std::mem::take(&mut p.waiting);
        let Some(endpoint) = p.endpoint else {
            return;
        };
        for (_, frame) in waiting {
            let slot = io.slot(endpoint, DATA_HEADER_LEN + frame.len() + TAG_LEN);
            slot[DATA_HEADER_LEN..DATA_HEADER_LEN + frame.len()].copy_from_slice(&frame);
            match self.tunnels.seal_in_place(peer, slot, frame.len(), now) {
                Seal::Data(n) => io.commit(n),
                _ => self.counters.handshake_queue_dropped += 1,
            }
        }
    }

    /// An inner frame from another host: checked again by this host's switch, then
    /// written to a local instance's device, its checksum marked partial if the sender's
    /// was. The virtio header takes the place of the frame header.
    pub(crate) fn deliver_from_tunnel<I: Io>(
        &mut self,
        io: &mut I,
        from: HostId,
        frame: &mut [u8],
        now: Instant,
    ) {
        let Some((src_net, dst_net, flags, _)) = overlay::split_frame(frame) else {
            self.counters.drop_bad_offload += 1;
            return;
        };
        let pkt = &mut frame[NETS_LEN..];
        let partial = flags & FLAG_CSUM_PARTIAL != 0;
        // The switch may rewrite a service reply's source (see `transmit` for why the
        // complement around the call keeps a partial checksum right).
        let flip = partial
            && self.switch.service_flow_count() > 0
            && VnetHdr::partial_for(pkt).is_some_and(|h| vnet::complement_checksum_field(pkt, &h));
        let verdict = self
            .switch
            .process_from_tunnel(from, src_net, dst_net, pkt, now);
        if flip {
            if let Some(h) = VnetHdr::partial_for(pkt) {
                vnet::complement_checksum_field(pkt, &h);
            }
        }
        let Verdict::Deliver(port) = verdict else {
            return;
        };
        // Segments of a stream are merged again for the device, in order: what cannot join
        // goes after what waits.
        if partial && self.coalescer.push(port.0, pkt) {
            return;
        }
        self.flush_coalesced(io);
        if partial && self.coalescer.push(port.0, pkt) {
            return;
        }
        let hdr = if partial {
            match VnetHdr::partial_for(pkt) {
                Some(hdr) => hdr,
                None => {
                    self.counters.drop_bad_offload += 1;
                    return;
                }
            }
        } else {
            VnetHdr::PLAIN
        };
        let written = &mut frame[NETS_LEN - VNET_HDR_LEN..];
        hdr.write(written);
        io.write_port(port, written);
    }
}
