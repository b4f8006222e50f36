//! What instances send: a packet from a device is switched, delivered to a local device,
//! sent out through egress, held for the directory, or framed and sealed for another host
//! (cut into MTU-sized segments first if the device handed over a large one).

use std::time::Instant;

use vane_switch::{HostId, NetId, PortId, Verdict};
use vane_tunnel::{Seal, DATA_HEADER_LEN, TAG_LEN};
use vane_wire::overlay::{self, FLAG_CSUM_PARTIAL, NETS_LEN, PLAIN_HEADER_LEN};
use vane_wire::vnet::{self, TcpSegments, VnetHdr, VNET_HDR_LEN};

use crate::*;

impl Node {
    /// Switches what a device handed over: `read` is its virtio header and packet.
    pub fn handle_device_packet<I: Io>(
        &mut self,
        io: &mut I,
        source: Source,
        read: &mut [u8],
        now: Instant,
    ) {
        self.switch_device_packet(io, source, read, now, false);
    }

    /// A packet for an address not resolved yet waits for the directory, unless it is
    /// `replayed` after waiting once already.
    pub(crate) fn switch_device_packet<I: Io>(
        &mut self,
        io: &mut I,
        source: Source,
        read: &mut [u8],
        now: Instant,
        replayed: bool,
    ) {
        let Some(hdr) = VnetHdr::parse(read) else {
            return;
        };
        let pkt = &mut read[VNET_HDR_LEN..];
        // The switch adjusts checksums as complete ones when it rewrites an address; a
        // partial checksum is the complement of such a one as far as the adjustment goes,
        // so complementing it around the call keeps it right.
        let partial = hdr.needs_csum() && vnet::complement_checksum_field(pkt, &hdr);
        if hdr.needs_csum() && !partial {
            // A partial checksum said to be anywhere but the packet's own TCP or UDP
            // checksum field: whoever computes it later would write over bytes the switch
            // checked (an address, a port).
            self.counters.drop_bad_offload += 1;
            return;
        }
        let verdict = match source {
            Source::Egress => self.switch.process_from_egress(pkt, now),
            Source::Port(port) => self.switch.process_from_port(port, pkt, now),
        };
        if partial {
            vnet::complement_checksum_field(pkt, &hdr);
        }
        match verdict {
            // Local devices take the packet as it came, offloads and all.
            Verdict::Deliver(port) => io.write_port(port, read),
            Verdict::Egress => io.write_egress(read),
            Verdict::Forward {
                host,
                src_net,
                dst_net,
            } => self.forward(io, source, (host, src_net, dst_net), &hdr, read, now),
            Verdict::Unresolved { dst_net } => match source {
                Source::Port(port) if !replayed => {
                    self.hold_for_directory(port, dst_net, read, now)
                }
                _ => self.counters.miss_queue_dropped += 1,
            },
            Verdict::Drop(_) => {}
        }
    }

    /// Sends the packet in `read` (behind its virtio header) to another host: cut into
    /// MTU-sized segments if the device handed over a large one, each framed with both nets
    /// and sealed into the batch.
    pub(crate) fn forward<I: Io>(
        &mut self,
        io: &mut I,
        source: Source,
        (host, src_net, dst_net): (HostId, NetId, NetId),
        hdr: &VnetHdr,
        read: &[u8],
        now: Instant,
    ) {
        let pkt = &read[VNET_HDR_LEN..];
        let flags = if hdr.needs_csum() {
            FLAG_CSUM_PARTIAL
        } else {
            0
        };
        if hdr.is_tcp_gso() {
            let Some(mut segments) = TcpSegments::new(pkt, hdr) else {
                self.counters.drop_bad_offload += 1;
                return;
            };
            if segments.max_segment_len() > self.max_inner_packet {
                self.too_large(io, source, pkt);
                return;
            }
            let room = segments.max_segment_len();
            while let Some(frame) = self.frame_slot(io, host, room) {
                let Some(len) = segments.next_into(&mut frame[NETS_LEN..]) else {
                    break;
                };
                overlay::write_nets(frame, src_net, dst_net, FLAG_CSUM_PARTIAL);
                self.seal_frame(io, host, NETS_LEN + len, now);
            }
            return;
        }
        if pkt.len() > self.max_inner_packet && dont_fragment(pkt) {
            self.too_large(io, source, pkt);
            return;
        }
        if let Some(frame) = self.frame_slot(io, host, pkt.len()) {
            frame[NETS_LEN..NETS_LEN + pkt.len()].copy_from_slice(pkt);
            overlay::write_nets(frame, src_net, dst_net, flags);
            self.seal_frame(io, host, NETS_LEN + pkt.len(), now);
        }
    }

    /// Where the datagram header goes in front of an inner frame.
    pub(crate) fn frame_offset(&self) -> usize {
        match self.identity {
            Some((_, true)) => PLAIN_HEADER_LEN,
            _ => DATA_HEADER_LEN,
        }
    }

    /// Room in the batch for an inner frame holding a packet of up to `packet_len` bytes to
    /// `host`, at its place in the datagram. `None` if the host cannot be sent to (counted).
    pub(crate) fn frame_slot<'a, I: Io>(
        &mut self,
        io: &'a mut I,
        host: HostId,
        packet_len: usize,
    ) -> Option<&'a mut [u8]> {
        if self.identity.is_none() {
            self.counters.drop_wrong_mode += 1;
            return None;
        }
        let Some(endpoint) = self.peers.get(&host).and_then(|p| p.endpoint) else {
            self.counters.drop_no_locator += 1;
            return None;
        };
        let at = self.frame_offset();
        let slot = io.slot(endpoint, at + NETS_LEN + packet_len + TAG_LEN);
        Some(&mut slot[at..])
    }

    /// Seals the inner frame of `inner_len` bytes just written into the last
    /// [`Node::frame_slot`] and commits the datagram: behind a plain header in a plaintext
    /// cluster; encrypted otherwise, or, without a session yet, kept aside while a
    /// handshake runs.
    pub(crate) fn seal_frame<I: Io>(
        &mut self,
        io: &mut I,
        host: HostId,
        inner_len: usize,
        now: Instant,
    ) {
        let Some((local, plaintext)) = self.identity else {
            return;
        };
        let at = self.frame_offset();
        let Some(peer) = self.peers.get_mut(&host) else {
            return;
        };
        let Some(endpoint) = peer.endpoint else {
            return;
        };
        // The slot is still there: nothing touched the batch since `frame_slot`.
        let slot = io.slot(endpoint, at + inner_len + TAG_LEN);
        if plaintext {
            overlay::write_plain_header(slot, local);
            peer.plain_tx.0 += 1;
            peer.plain_tx.1 += inner_len as u64;
            io.commit(PLAIN_HEADER_LEN + inner_len);
            return;
        }
        match self.tunnels.seal_in_place(host, slot, inner_len, now) {
            Seal::Data(len) => io.commit(len),
            Seal::NoSession => {
                let frame = slot[at..at + inner_len].to_vec();
                if peer.waiting.len() >= HANDSHAKE_QUEUE {
                    self.counters.handshake_queue_dropped += 1;
                } else {
                    peer.waiting.push_back((now, frame));
                }
                // Only here, off the path of every packet: the handshake's timestamp.
                let wall = crate::wall_at(&mut self.epoch, now);
                if let Some(n) = self.tunnels.initiate(host, &mut self.scratch, now, wall) {
                    io.send_now(&self.scratch[..n], endpoint);
                }
            }
            Seal::TooLarge => self.counters.drop_frame_too_large += 1,
            Seal::UnknownPeer | Seal::Handshake(_) | Seal::Pending => {
                self.counters.drop_no_locator += 1
            }
        }
    }

    /// A packet too large for the tunnel: answered with ICMP "fragmentation needed" if it
    /// forbids fragmentation (so that the sender's path MTU discovery works through the
    /// overlay), dropped otherwise.
    pub(crate) fn too_large<I: Io>(&mut self, io: &mut I, source: Source, pkt: &[u8]) {
        if !dont_fragment(pkt) {
            self.counters.drop_frame_too_large += 1;
            return;
        }
        let Source::Port(port) = source else {
            return;
        };
        let mtu = self.max_inner_packet.min(usize::from(u16::MAX)) as u16;
        let Some(n) = overlay::icmp_frag_needed(pkt, mtu, &mut self.scratch[VNET_HDR_LEN..]) else {
            return;
        };
        VnetHdr::PLAIN.write(&mut self.scratch);
        // Back to the sender's device.
        io.write_port(port, &self.scratch[..VNET_HDR_LEN + n]);
        self.counters.frag_needed_sent += 1;
    }

    /// Holds a packet until the directory says where its destination is.
    pub(crate) fn hold_for_directory(
        &mut self,
        port: PortId,
        net: NetId,
        read: &[u8],
        now: Instant,
    ) {
        let Some((_, dst)) = overlay::addresses(&read[VNET_HDR_LEN..]) else {
            return;
        };
        let key = (net, dst);
        if let Some(at) = self.negative.get(&key) {
            if now.saturating_duration_since(*at) < NEGATIVE_TTL {
                self.counters.miss_queue_dropped += 1;
                return;
            }
            self.negative.remove(&key);
        }
        if !self.misses.contains_key(&key) {
            if self.misses.len() >= MISS_ADDRESSES {
                self.counters.miss_queue_dropped += 1;
                return;
            }
            self.counters.lookups += 1;
            self.lookups.push_back(key);
            self.misses.insert(
                key,
                Miss {
                    since: now,
                    packets: Vec::new(),
                },
            );
        }
        let miss = self.misses.get_mut(&key).expect("inserted above");
        if miss.packets.len() >= MISS_QUEUE {
            self.counters.miss_queue_dropped += 1;
            return;
        }
        miss.packets.push((port, read.to_vec()));
    }
}

/// Whether an IPv4 packet forbids fragmentation.
fn dont_fragment(pkt: &[u8]) -> bool {
    vane_wire::Ipv4Packet::new_checked(pkt).is_ok_and(|ip| ip.dont_fragment())
}
