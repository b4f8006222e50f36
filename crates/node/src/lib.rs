//! Sans-IO core of one host's data path: the switch (`vane_switch`), the tunnel sessions
//! (`vane_tunnel`), the other hosts' endpoints and their roaming, the packets that wait for
//! the directory or for a handshake, the overlay's framing and the merging of a stream's
//! segments for a device. It does no I/O and reads no clock: the shell (the agent's
//! `dataplane`) hands it what its devices and its socket read with `handle_*`, gives it the
//! time, and provides an [`Io`] that the node writes datagrams and packets into. Between
//! events the shell sleeps until [`Node::poll_timeout`] and then calls
//! [`Node::handle_timeout`]. Two nodes run together in virtual time in `tests`.
//!
//! Packets travel with the `virtio_net_hdr` of the devices (`vane_wire::vnet`): a program's
//! TCP stream comes out of its device in segments of up to 64 KiB with partial checksums.
//! Between local devices such a segment goes as it is; towards another host it is cut into
//! MTU-sized segments, each sealed in place into the [`Io`]'s batch of datagrams; the
//! receiving node opens each datagram in place and writes its packet to the device with
//! the partial checksum marked, merged with the stream's next segments where they join.
//!
//! Two things wait here rather than being lost: a packet for an address the table lacks
//! waits while the directory is asked (bounded per address and in all, dropped after
//! `MISS_WAIT`), and a packet for a host without a tunnel session waits while the
//! handshake runs (bounded per host, dropped after `HANDSHAKE_WAIT`).

mod stats;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vane_switch::{
    HostId, Location, NetConfig, NetId, PolicyRule, PortCounters, PortId, Switch, SwitchConfig,
    Verdict,
};
use vane_tunnel::{Keypair, Open, Seal, Tunnels, DATA_HEADER_LEN, TAG_LEN};
use vane_wire::overlay::{self, FLAG_CSUM_PARTIAL, NETS_LEN, PLAIN_HEADER_LEN};
use vane_wire::vnet::{self, TcpCoalescer, TcpSegments, VnetHdr, VNET_HDR_LEN};

/// How long a packet waits for the directory's answer.
pub const MISS_WAIT: Duration = Duration::from_secs(2);
/// Packets held per unresolved address.
pub const MISS_QUEUE: usize = 16;
/// Unresolved addresses held at once (and lookups waiting to be asked).
pub const MISS_ADDRESSES: usize = 256;
/// How long "no such member" is remembered, so a program sending to nobody does not make
/// the node ask the directory for every packet.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(1);
/// How long a packet waits for a tunnel handshake, and how many wait per host.
pub const HANDSHAKE_WAIT: Duration = Duration::from_secs(5);
pub const HANDSHAKE_QUEUE: usize = 256;
/// How often forgotten flows are swept from the switch's table.
pub const FLOW_SWEEP: Duration = Duration::from_secs(1);
/// Room for a handshake message, a cookie reply or an ICMP error with its virtio header.
const SCRATCH: usize = 512;

/// Where a node's output goes: the shell's devices and underlay socket, or a test's memory.
/// The node never waits on it: a write that cannot be done drops the packet, as a full
/// queue would.
pub trait Io {
    /// Room for the next datagram to `to`, of up to `len` bytes, in the batch being built.
    /// Until [`Io::commit`], another call for the same datagram returns the same bytes.
    fn slot(&mut self, to: SocketAddr, len: usize) -> &mut [u8];
    /// The datagram in the last slot is its first `len` bytes: it goes with the batch.
    fn commit(&mut self, len: usize);
    /// Sends `datagram` to `to` now, apart from the batch (handshakes, cookies).
    fn send_now(&mut self, datagram: &[u8], to: SocketAddr);
    /// Writes a packet, behind its virtio header, to the device of local port `port`.
    fn write_port(&mut self, port: PortId, packet: &[u8]);
    /// Writes a packet, behind its virtio header, to the host's egress device.
    fn write_egress(&mut self, packet: &[u8]);
}

/// Where a packet read from a device came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Port(PortId),
    Egress,
}

/// Another host as the directory gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    pub id: HostId,
    pub name: String,
    pub locator: Option<SocketAddr>,
    pub public_key: [u8; 32],
}

/// What a node starts with.
pub struct NodeConfig {
    pub switch: SwitchConfig,
    pub keypair: Keypair,
    pub tunnel: vane_tunnel::Config,
    /// Largest IPv4 packet that fits one underlay datagram after the overlay's headers.
    pub max_inner_packet: usize,
}

/// Counters of the node itself (the switch and the tunnels count their own).
#[derive(Default, Clone, Copy, Debug)]
pub struct NodeCounters {
    pub lookups: u64,
    pub lookup_misses: u64,
    pub miss_queue_dropped: u64,
    pub handshake_queue_dropped: u64,
    pub frag_needed_sent: u64,
    pub drop_no_locator: u64,
    pub drop_plaintext_unknown_sender: u64,
    pub drop_wrong_mode: u64,
    pub drop_frame_too_large: u64,
    pub drop_bad_offload: u64,
}

/// Another host, as this node reaches it.
struct Peer {
    name: String,
    /// Where the directory says it is.
    locator: Option<SocketAddr>,
    /// Where its packets go: the locator, or the address an authenticated packet of it last
    /// came from (it moved before the directory knew).
    endpoint: Option<SocketAddr>,
    /// Inner frames waiting for a tunnel session.
    waiting: VecDeque<(Instant, Vec<u8>)>,
    /// Counted here in plaintext mode (the tunnels count encrypted traffic).
    plain_tx: (u64, u64),
    plain_rx: (u64, u64),
}

/// Packets waiting for the directory to resolve one address, each as read from its device
/// (virtio header and packet).
struct Miss {
    since: Instant,
    packets: Vec<(PortId, Vec<u8>)>,
}

/// One host's data path, without I/O. See the crate docs.
pub struct Node {
    switch: Switch,
    tunnels: Tunnels,
    /// This host's id and whether the cluster is plaintext, once known.
    identity: Option<(HostId, bool)>,
    peers: HashMap<HostId, Peer>,
    /// Members and nets set from the last view, so that the next view can remove what
    /// disappeared without touching ports attached since.
    view_members: HashSet<(NetId, Ipv4Addr)>,
    view_nets: HashSet<NetId>,
    misses: HashMap<(NetId, Ipv4Addr), Miss>,
    negative: HashMap<(NetId, Ipv4Addr), Instant>,
    /// Addresses to ask the directory about ([`Node::poll_lookup`]).
    lookups: VecDeque<(NetId, Ipv4Addr)>,
    /// Segments from the tunnel waiting to be merged for their device.
    coalescer: TcpCoalescer,
    max_inner_packet: usize,
    last_sweep: Option<Instant>,
    /// The wall clock at one instant, for the timestamps of initiations: derived from the
    /// time the shell gives, so that virtual time is wall time too.
    epoch: Option<(Instant, u64)>,
    scratch: Vec<u8>,
    counters: NodeCounters,
}

impl Node {
    pub fn new(cfg: NodeConfig) -> Node {
        Node {
            switch: Switch::new(cfg.switch),
            tunnels: Tunnels::new(cfg.tunnel, cfg.keypair),
            identity: None,
            peers: HashMap::new(),
            view_members: HashSet::new(),
            view_nets: HashSet::new(),
            misses: HashMap::new(),
            negative: HashMap::new(),
            lookups: VecDeque::new(),
            coalescer: TcpCoalescer::default(),
            max_inner_packet: cfg.max_inner_packet,
            last_sweep: None,
            epoch: None,
            scratch: vec![0; SCRATCH],
            counters: NodeCounters::default(),
        }
    }

    /// Who this host is in the cluster, whether its tunnels are plaintext, and the
    /// cluster's global space (from the controller's welcome, or the saved view).
    pub fn set_identity(&mut self, host: HostId, plaintext: bool, global_space: ipnet::Ipv4Net) {
        self.identity = Some((host, plaintext));
        self.switch.set_global_space(global_space);
    }

    /// Attaches local port `port` (an instance's device) to `net` with address `ip`, its
    /// bandwidth limit `rate` (bits per second each way), on hold if `held`.
    pub fn attach_port(
        &mut self,
        port: PortId,
        net: NetConfig,
        ip: Ipv4Addr,
        rate: Option<u64>,
        held: bool,
    ) -> Result<(), String> {
        self.switch.upsert_net(net);
        self.switch
            .attach_port(port, net.id, ip)
            .map_err(|e| e.to_string())?;
        self.switch.set_port_rate(port, rate);
        self.switch.hold_port(port, held);
        Ok(())
    }

    pub fn detach_port(&mut self, port: PortId) {
        self.switch.detach_port(port);
    }

    /// Puts `port` on hold (nothing passes to or from it) or takes it off. Segments merged
    /// for it before the hold go first.
    pub fn hold_port<I: Io>(&mut self, io: &mut I, port: PortId, held: bool) {
        self.flush_coalesced(io);
        self.switch.hold_port(port, held);
    }

    /// How long `port`'s device must be left unread for its bandwidth limit (or its
    /// receiver's), if it must.
    pub fn port_delay(&mut self, port: PortId, now: Instant) -> Option<Duration> {
        self.switch.port_delay(port, now)
    }

    pub fn port_counters(&self, port: PortId) -> Option<PortCounters> {
        self.switch.port_counters(port)
    }

    /// Takes the directory's list of hosts: keys for the tunnels, locators for the socket.
    /// A locator that changed replaces wherever the host's packets went before.
    pub fn apply_peers(&mut self, peers: Vec<PeerInfo>) {
        let ids: HashSet<HostId> = peers.iter().map(|p| p.id).collect();
        let gone: Vec<HostId> = self
            .peers
            .keys()
            .filter(|id| !ids.contains(id))
            .copied()
            .collect();
        for id in gone {
            self.peers.remove(&id);
            self.tunnels.remove_peer(id);
        }
        for p in peers {
            self.tunnels.set_peer(p.id, p.public_key);
            let peer = self.peers.entry(p.id).or_insert_with(|| Peer {
                name: p.name.clone(),
                locator: None,
                endpoint: None,
                waiting: VecDeque::new(),
                plain_tx: (0, 0),
                plain_rx: (0, 0),
            });
            peer.name = p.name;
            if peer.locator != p.locator {
                peer.locator = p.locator;
                peer.endpoint = p.locator;
            }
        }
    }

    /// Takes the directory's nets, members and policies.
    pub fn apply_view(
        &mut self,
        nets: Vec<NetConfig>,
        members: Vec<(NetId, Ipv4Addr, Location)>,
        policies: Vec<PolicyRule>,
    ) {
        let new_nets: HashSet<NetId> = nets.iter().map(|n| n.id).collect();
        for net in nets {
            self.switch.upsert_net(net);
        }
        for gone in self.view_nets.difference(&new_nets) {
            self.switch.remove_net(*gone);
        }
        self.view_nets = new_nets;
        let new_members: HashSet<(NetId, Ipv4Addr)> =
            members.iter().map(|(n, ip, _)| (*n, *ip)).collect();
        for (net, ip) in self.view_members.difference(&new_members) {
            self.switch.remove_member(*net, *ip);
        }
        for (net, ip, loc) in members {
            // A member that appears is no longer "nobody"; one that waits is answered.
            self.negative.remove(&(net, ip));
            self.switch.set_member(net, ip, loc);
        }
        self.view_members = new_members;
        self.switch.set_policies(policies);
    }

    /// The next address to ask the directory about, if any.
    pub fn poll_lookup(&mut self) -> Option<(NetId, Ipv4Addr)> {
        self.lookups.pop_front()
    }

    /// The directory answered a lookup: where member `ip` of `net` is, if anywhere. The
    /// packets that waited for it are switched again.
    pub fn resolved<I: Io>(
        &mut self,
        io: &mut I,
        net: NetId,
        ip: Ipv4Addr,
        host: Option<HostId>,
        now: Instant,
    ) {
        let local = self.identity.map(|(id, _)| id);
        match host {
            // An entry for this host that the switch lacks is an instance not attached
            // (any more): nothing to send to.
            Some(h) if Some(h) != local => {
                self.switch.set_member(net, ip, Location::Remote(h));
            }
            _ => {
                self.counters.lookup_misses += 1;
                self.negative.insert((net, ip), now);
            }
        }
        let Some(miss) = self.misses.remove(&(net, ip)) else {
            return;
        };
        for (port, mut read) in miss.packets {
            self.switch_device_packet(io, Source::Port(port), &mut read, now, true);
        }
    }

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
    fn switch_device_packet<I: Io>(
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
    fn forward<I: Io>(
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
    fn frame_offset(&self) -> usize {
        match self.identity {
            Some((_, true)) => PLAIN_HEADER_LEN,
            _ => DATA_HEADER_LEN,
        }
    }

    /// Room in the batch for an inner frame holding a packet of up to `packet_len` bytes to
    /// `host`, at its place in the datagram. `None` if the host cannot be sent to (counted).
    fn frame_slot<'a, I: Io>(
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
    fn seal_frame<I: Io>(&mut self, io: &mut I, host: HostId, inner_len: usize, now: Instant) {
        let Some((local, plaintext)) = self.identity else {
            return;
        };
        let at = self.frame_offset();
        let wall = self.wall(now);
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
    fn too_large<I: Io>(&mut self, io: &mut I, source: Source, pkt: &[u8]) {
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
    fn hold_for_directory(&mut self, port: PortId, net: NetId, read: &[u8], now: Instant) {
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
                    let wall = self.wall(now);
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
    fn roam(&mut self, peer: HostId, from: SocketAddr) {
        if let Some(p) = self.peers.get_mut(&peer) {
            if p.endpoint != Some(from) {
                tracing::info!(host = %p.name, %from, "peer moved on the underlay");
                p.endpoint = Some(from);
            }
        }
    }

    /// Seals and sends the frames that waited for a session with `peer`.
    fn flush_waiting<I: Io>(&mut self, io: &mut I, peer: HostId, now: Instant) {
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
    fn deliver_from_tunnel<I: Io>(
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
        let verdict = self
            .switch
            .process_from_tunnel(from, src_net, dst_net, pkt, now);
        let Verdict::Deliver(port) = verdict else {
            return;
        };
        let partial = flags & FLAG_CSUM_PARTIAL != 0;
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

    /// When [`Node::handle_timeout`] has work next: a tunnel timer, a waiting packet's
    /// expiry, a remembered "nobody" to forget, the sweep of forgotten flows.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut next = self.tunnels.next_timer();
        let mut at = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        for p in self.peers.values() {
            if let Some((since, _)) = p.waiting.front() {
                at(*since + HANDSHAKE_WAIT);
            }
        }
        for m in self.misses.values() {
            at(m.since + MISS_WAIT);
        }
        for since in self.negative.values() {
            at(*since + NEGATIVE_TTL);
        }
        if self.switch.flow_count() > 0 {
            at(self
                .last_sweep
                .map_or_else(Instant::now, |t| t + FLOW_SWEEP));
        }
        next
    }

    /// Runs what is due at `now`: tunnel timers (handshake retries, rekeys, expiry, idle
    /// teardown), the expiry of packets that waited too long, the sweep of flows.
    pub fn handle_timeout<I: Io>(&mut self, io: &mut I, now: Instant) {
        if matches!(self.identity, Some((_, false))) {
            let wall = self.wall(now);
            while let Some((peer, n)) = self.tunnels.poll_timers(now, wall, &mut self.scratch) {
                if let Some(endpoint) = self.peers.get(&peer).and_then(|p| p.endpoint) {
                    io.send_now(&self.scratch[..n], endpoint);
                }
            }
        }
        for peer in self.peers.values_mut() {
            while peer
                .waiting
                .front()
                .is_some_and(|(at, _)| now.saturating_duration_since(*at) >= HANDSHAKE_WAIT)
            {
                peer.waiting.pop_front();
                self.counters.handshake_queue_dropped += 1;
            }
        }
        let mut expired = 0;
        self.misses.retain(|_, m| {
            let keep = now.saturating_duration_since(m.since) < MISS_WAIT;
            if !keep {
                expired += m.packets.len() as u64;
            }
            keep
        });
        self.counters.miss_queue_dropped += expired;
        self.negative
            .retain(|_, at| now.saturating_duration_since(*at) < NEGATIVE_TTL);
        if self
            .last_sweep
            .is_none_or(|t| now.saturating_duration_since(t) >= FLOW_SWEEP)
        {
            self.switch.expire_flows(now);
            self.last_sweep = Some(now);
        }
    }

    /// The wall clock at `now` in nanoseconds since the Unix epoch, for the timestamps of
    /// initiations (which must grow from one to the next).
    fn wall(&mut self, now: Instant) -> u64 {
        let (base, wall) = *self.epoch.get_or_insert_with(|| {
            let wall = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            (now, wall)
        });
        match now.checked_duration_since(base) {
            Some(d) => wall + d.as_nanos() as u64,
            None => wall - (base - now).as_nanos().min(u128::from(wall)) as u64,
        }
    }

    pub fn counters(&self) -> NodeCounters {
        self.counters
    }
}

/// Whether an IPv4 packet forbids fragmentation.
fn dont_fragment(pkt: &[u8]) -> bool {
    vane_wire::Ipv4Packet::new_checked(pkt).is_ok_and(|ip| ip.dont_fragment())
}
