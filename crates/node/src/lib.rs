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

mod receive;
mod stats;
#[cfg(test)]
mod tests;
mod timers;
mod transmit;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vane_switch::{
    HostId, Location, NetConfig, NetId, PolicyRule, PortCounters, PortId, Switch, SwitchConfig,
};
use vane_tunnel::{Keypair, Tunnels};
use vane_wire::vnet::TcpCoalescer;

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
    /// bandwidth limit `rate` (bits per second each way), on hold if `held`. Packets for
    /// `ip` reach the port once the directory places the member here (`apply_members`).
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

    /// The ports (protocol, port) that the outside world may open flows to on `port`'s
    /// instance (`Switch::set_published`).
    pub fn set_published(&mut self, port: PortId, published: &[(vane_switch::L4Proto, u16)]) {
        self.switch.set_published(port, published);
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
        self.apply_members(members);
        self.switch.set_policies(policies);
    }

    /// Takes the directory's services (after `apply_view`, which gives their nets).
    pub fn apply_services(&mut self, services: &[vane_switch::ServiceConfig]) {
        self.switch.set_services(services);
    }

    /// Takes the policies from outside address ranges (`Switch::set_outside_rules`).
    pub fn apply_outside_rules(&mut self, rules: Vec<vane_switch::OutsideRule>) {
        self.switch.set_outside_rules(rules);
    }

    /// Takes where the directory's members are: the only way members enter the switch
    /// (attaching a port does not make it one). Members no longer listed are forgotten.
    pub fn apply_members(&mut self, members: Vec<(NetId, Ipv4Addr, Location)>) {
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
        location: Option<Location>,
        now: Instant,
    ) {
        let local = self.identity.map(|(id, _)| id);
        // The shell maps a member placed here to its port; one that names this host as
        // remote would come straight back.
        let loops_back = matches!(location, Some(Location::Remote(h)) if Some(h) == local);
        match location.filter(|_| !loops_back) {
            Some(loc) => self.switch.set_member(net, ip, loc),
            None => {
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

    pub fn counters(&self) -> NodeCounters {
        self.counters
    }
}

/// The wall clock at `now` in nanoseconds since the Unix epoch, for the timestamps of
/// initiations (which must grow from one to the next): from the wall clock read once at
/// the first call (`epoch`) and the time the shell gives, so that virtual time is wall time
/// too.
pub(crate) fn wall_at(epoch: &mut Option<(Instant, u64)>, now: Instant) -> u64 {
    let (base, wall) = *epoch.get_or_insert_with(|| {
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
