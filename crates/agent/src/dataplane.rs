//! The switch's I/O shell: one thread that owns the sans-IO `Switch`, the sans-IO tunnel
//! sessions (`vane_tunnel::Tunnels`), the file descriptors of the instances' TUN devices and
//! the underlay UDP socket. It reads packets, asks the switch what to do with each, and
//! writes them where it says: to a local device, to the host's egress device, or sealed into
//! a datagram for another host's switch. The agent's async side talks to it through a
//! channel and a waker; nothing on the packet path takes a lock.
//!
//! Packets travel with the `virtio_net_hdr` of the devices (`vane_wire::vnet`): a program's
//! TCP stream comes out of its device in segments of up to 64 KiB with partial checksums.
//! Between local devices such a segment goes as it is; towards another host it is cut into
//! MTU-sized segments, each sealed in place into a batch of datagrams that leaves in one
//! UDP GSO send (`underlay`); the receiving switch reads coalesced datagrams (UDP GRO),
//! opens each in place and writes it to its device with the partial checksum marked. No
//! payload byte is copied more than once per host or summed on the way.
//!
//! Two things wait here rather than being lost (seed 003): a packet for an address the
//! table lacks waits while the directory is asked (bounded per address and in all, dropped
//! after `MISS_WAIT`), and a packet for a host without a tunnel session waits while the
//! handshake runs (bounded per host, dropped after `HANDSHAKE_WAIT`).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use tokio::sync::oneshot;

use vane_proto::api::{HostStats, PeerStats};
use vane_switch::{
    HostId, Location, NetConfig, NetId, PolicyRule, PortCounters, PortId, Switch, SwitchConfig,
    Verdict,
};
use vane_tunnel::{Keypair, Open, Seal, Tunnels, DATA_HEADER_LEN, TAG_LEN};
use vane_wire::overlay::{self, FLAG_CSUM_PARTIAL, NETS_LEN, PLAIN_HEADER_LEN};
use vane_wire::vnet::{self, TcpCoalescer, TcpSegments, VnetHdr, VNET_HDR_LEN};

use crate::underlay::{Underlay, MAX_DATAGRAM};

const WAKER: Token = Token(usize::MAX);
const EGRESS: Token = Token(usize::MAX - 1);
const UNDERLAY: Token = Token(usize::MAX - 2);
/// Packets (or coalesced datagram runs) read from one source before the others get their
/// turn.
const BATCH: usize = 64;
/// Largest packet a TUN device hands over (a 64 KiB segment), with its virtio header.
const MAX_DEVICE_READ: usize = VNET_HDR_LEN + 65535;
/// How long a packet waits for the directory's answer.
const MISS_WAIT: Duration = Duration::from_secs(2);
/// Packets held per unresolved address, and unresolved addresses held at once.
const MISS_QUEUE: usize = 16;
pub(crate) const MISS_ADDRESSES: usize = 256;
/// How long "no such member" is remembered, so a program sending to nobody does not make
/// the switch ask the directory for every packet.
const NEGATIVE_TTL: Duration = Duration::from_secs(1);
/// How long a packet waits for a tunnel handshake, and how many wait per host.
const HANDSHAKE_WAIT: Duration = Duration::from_secs(5);
const HANDSHAKE_QUEUE: usize = 256;

pub enum Command {
    /// Attach an instance's TUN device as `port`.
    Attach {
        port: PortId,
        tun: OwnedFd,
        net: NetConfig,
        ip: Ipv4Addr,
        /// Bandwidth limit, bits per second each direction.
        rate: Option<u64>,
        /// Attached on hold (`Switch::hold_port`), nothing passing until it is lifted.
        held: bool,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Detach {
        port: PortId,
    },
    /// Put a port on hold or take it off (`Switch::hold_port`); answers once it applies.
    Hold {
        port: PortId,
        held: bool,
        reply: oneshot::Sender<()>,
    },
    /// Who this host is in the cluster and how its tunnels work (from the controller's
    /// welcome, or the saved view after a restart).
    Identity {
        host_id: HostId,
        plaintext: bool,
        /// The cluster's global virtual address space (`Switch::set_global_space`).
        global_space: ipnet::Ipv4Net,
    },
    /// The directory as the controller last pushed it: other hosts, nets, members, policies.
    View {
        peers: Vec<PeerInfo>,
        nets: Vec<NetConfig>,
        members: Vec<(NetId, Ipv4Addr, Location)>,
        policies: Vec<PolicyRule>,
    },
    /// The directory's answer to a lookup: where member `ip` of `net` is, if anywhere.
    Resolved {
        net: NetId,
        ip: Ipv4Addr,
        host: Option<HostId>,
    },
    /// The host-side egress device.
    Egress {
        tun: OwnedFd,
    },
    Stats {
        port: PortId,
        reply: oneshot::Sender<Option<PortCounters>>,
    },
    HostStats {
        reply: oneshot::Sender<HostStats>,
    },
}

/// Another host as the directory gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    pub id: HostId,
    pub name: String,
    pub locator: Option<SocketAddr>,
    pub public_key: [u8; 32],
}

/// What the data plane starts with.
pub struct DataplaneConfig {
    pub switch: SwitchConfig,
    /// Where the underlay socket listens.
    pub listen: SocketAddr,
    pub keypair: Keypair,
    pub tunnel: vane_tunnel::Config,
    /// Largest IPv4 packet that fits one underlay datagram after the overlay's headers.
    pub max_inner_packet: usize,
    /// Where directory lookups go (to the controller, through the agent's control stream).
    pub lookups: tokio::sync::mpsc::Sender<(NetId, Ipv4Addr)>,
}

/// Handle to the data-plane thread.
#[derive(Clone)]
pub struct Dataplane {
    tx: mpsc::Sender<Command>,
    waker: Arc<Waker>,
}

impl Dataplane {
    pub fn start(cfg: DataplaneConfig) -> io::Result<Dataplane> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (tx, rx) = mpsc::channel();
        // The largest datagram that crosses the underlay unfragmented: the inner packet and
        // the encapsulation less the outer IP and UDP headers.
        let largest = cfg.max_inner_packet + crate::netconf::ENCAPSULATION - 28;
        let underlay = Underlay::bind(cfg.listen, largest)?;
        poll.registry().register(
            &mut SourceFd(&underlay.raw_fd()),
            UNDERLAY,
            Interest::READABLE,
        )?;
        let mut worker = Worker {
            throttled: None,
            was_throttled: false,
            lone: false,
            written: None,
            poll,
            rx,
            switch: Switch::new(cfg.switch),
            ports: HashMap::new(),
            egress: None,
            view_members: HashSet::new(),
            view_nets: HashSet::new(),
            underlay,
            now: Instant::now(),
            coalescer: TcpCoalescer::default(),
            tunnels: Tunnels::new(cfg.tunnel, cfg.keypair),
            identity: None,
            peers: HashMap::new(),
            misses: HashMap::new(),
            negative: HashMap::new(),
            lookups: cfg.lookups,
            max_inner_packet: cfg.max_inner_packet,
            counters: ShellCounters::default(),
        };
        std::thread::Builder::new()
            .name("vane-switch".into())
            .spawn(move || worker.run())?;
        Ok(Dataplane { tx, waker })
    }

    pub fn send(&self, cmd: Command) {
        if self.tx.send(cmd).is_ok() {
            let _ = self.waker.wake();
        }
    }

    /// Attaches an instance's TUN device as `port` (on hold if `held`).
    pub async fn attach(
        &self,
        port: PortId,
        tun: OwnedFd,
        net: NetConfig,
        ip: Ipv4Addr,
        rate: Option<u64>,
        held: bool,
    ) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Attach {
            port,
            tun,
            net,
            ip,
            rate,
            held,
            reply,
        });
        rx.await
            .unwrap_or_else(|_| Err("switch thread is gone".into()))
    }

    /// Puts `port` on hold (nothing passes to or from it) or takes it off; returns once the
    /// switch applies it.
    pub async fn hold(&self, port: PortId, held: bool) {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Hold { port, held, reply });
        let _ = rx.await;
    }

    pub async fn stats(&self, port: PortId) -> Option<PortCounters> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Stats { port, reply });
        rx.await.ok().flatten()
    }

    pub async fn host_stats(&self) -> Option<HostStats> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::HostStats { reply });
        rx.await.ok()
    }
}

/// Counters of the shell itself (the switch and the tunnels count their own).
#[derive(Default)]
struct ShellCounters {
    lookups: u64,
    lookup_misses: u64,
    miss_queue_dropped: u64,
    handshake_queue_dropped: u64,
    frag_needed_sent: u64,
    drop_no_locator: u64,
    drop_plaintext_unknown_sender: u64,
    drop_wrong_mode: u64,
    drop_frame_too_large: u64,
    drop_bad_offload: u64,
}

/// Another host, as the shell reaches it.
struct PeerIo {
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

/// Scratch buffers, one per stage, so that a packet never needs copying between them.
struct Buffers {
    /// What a device handed over: virtio header, then the packet.
    device: Vec<u8>,
    /// Datagrams read from the underlay, opened in place.
    datagrams: Vec<u8>,
    /// Handshake messages, keepalives, ICMP errors.
    scratch: Vec<u8>,
}

/// Where a packet read from a device came from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    Port(PortId),
    Egress,
}

struct Worker {
    /// Earliest time a device left unread for its bandwidth limit may be read again.
    throttled: Option<Instant>,
    /// Set when the last device serviced was left unread for its limit.
    was_throttled: bool,
    /// Nothing has been sent yet in this turn of the loop. The first packet a turn switches
    /// leaves at once, and a reply the kernel queued on a device while this thread wrote
    /// to it is read at once: a lone packet (a request, its reply) is answered before the
    /// reads that find the queues empty, the timers and the next wait, not after.
    lone: bool,
    /// The device the last packet from the tunnel was written to.
    written: Option<PortId>,
    poll: Poll,
    rx: mpsc::Receiver<Command>,
    switch: Switch,
    ports: HashMap<PortId, File>,
    egress: Option<File>,
    /// Members and nets set from the last view, so that the next view can remove what
    /// disappeared without touching ports attached since.
    view_members: HashSet<(NetId, Ipv4Addr)>,
    view_nets: HashSet<NetId>,
    underlay: Underlay,
    /// The time, read once per batch of packets rather than for each (a clock read costs
    /// as much as a table lookup); batches last well under a millisecond.
    now: Instant,
    /// Segments from the tunnel waiting to be merged for their device.
    coalescer: TcpCoalescer,
    tunnels: Tunnels,
    /// This host's id and whether the cluster is plaintext, once known.
    identity: Option<(HostId, bool)>,
    peers: HashMap<HostId, PeerIo>,
    misses: HashMap<(NetId, Ipv4Addr), Miss>,
    negative: HashMap<(NetId, Ipv4Addr), Instant>,
    lookups: tokio::sync::mpsc::Sender<(NetId, Ipv4Addr)>,
    max_inner_packet: usize,
    counters: ShellCounters,
}

fn wall_clock() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

impl Worker {
    fn run(&mut self) {
        let mut events = Events::with_capacity(256);
        let mut bufs = Buffers {
            device: vec![0u8; MAX_DEVICE_READ],
            datagrams: vec![0u8; MAX_DATAGRAM * vane_sys::udp::RECV_SLOTS],
            scratch: vec![0u8; 512],
        };
        let mut backlog: Vec<Token> = Vec::new();
        let mut last_expiry = Instant::now();
        // Whether a device in the backlog can be read at once (not only throttled ones).
        let mut ready = false;
        loop {
            let timeout = match (backlog.is_empty(), ready, self.throttled.take()) {
                (true, _, _) => Duration::from_millis(100),
                (false, false, Some(at)) => at.saturating_duration_since(Instant::now()),
                _ => Duration::ZERO,
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!("switch poll failed: {e}");
                    return;
                }
            }
            self.now = Instant::now();
            self.lone = true;
            self.written = None;
            for ev in events.iter() {
                if ev.token() == WAKER {
                    if !self.commands(&mut bufs) {
                        return;
                    }
                } else if !backlog.contains(&ev.token()) {
                    backlog.push(ev.token());
                }
            }
            // mio is edge-triggered: a source not drained to EAGAIN stays in the backlog.
            ready = false;
            for token in std::mem::take(&mut backlog) {
                self.was_throttled = false;
                self.now = Instant::now();
                let drained = if token == UNDERLAY {
                    self.service_underlay(&mut bufs)
                } else {
                    self.service_device(token, &mut bufs)
                };
                if !drained {
                    backlog.push(token);
                    ready |= !self.was_throttled;
                }
            }
            let now = Instant::now();
            self.now = now;
            self.timers(now, &mut bufs);
            // What this turn sealed leaves before the thread waits again.
            self.underlay.flush();
            if now.duration_since(last_expiry) >= Duration::from_secs(1) {
                self.switch.expire_flows(now);
                last_expiry = now;
            }
        }
    }

    /// Applies queued commands; false when the agent side is gone.
    fn commands(&mut self, bufs: &mut Buffers) -> bool {
        loop {
            match self.rx.try_recv() {
                Ok(cmd) => self.command(cmd, bufs),
                Err(mpsc::TryRecvError::Empty) => return true,
                Err(mpsc::TryRecvError::Disconnected) => return false,
            }
        }
    }

    fn command(&mut self, cmd: Command, bufs: &mut Buffers) {
        match cmd {
            Command::Attach {
                port,
                tun,
                net,
                ip,
                rate,
                held,
                reply,
            } => {
                let result = self.attach(port, tun, net, ip);
                if result.is_ok() {
                    self.switch.set_port_rate(port, rate);
                    self.switch.hold_port(port, held);
                }
                let _ = reply.send(result);
            }
            Command::Detach { port } => {
                if let Some(f) = self.ports.remove(&port) {
                    let _ = self
                        .poll
                        .registry()
                        .deregister(&mut SourceFd(&f.as_raw_fd()));
                }
                self.switch.detach_port(port);
            }
            Command::Hold { port, held, reply } => {
                // Segments merged for it before the hold go first.
                self.flush_coalesced();
                self.switch.hold_port(port, held);
                let _ = reply.send(());
            }
            Command::Identity {
                host_id,
                plaintext,
                global_space,
            } => {
                self.identity = Some((host_id, plaintext));
                self.switch.set_global_space(global_space);
            }
            Command::View {
                peers,
                nets,
                members,
                policies,
            } => {
                self.apply_peers(peers);
                self.apply_view(nets, members, policies);
            }
            Command::Resolved { net, ip, host } => self.resolved(net, ip, host, bufs),
            Command::Egress { tun } => {
                let f = File::from(tun);
                match self.poll.registry().register(
                    &mut SourceFd(&f.as_raw_fd()),
                    EGRESS,
                    Interest::READABLE,
                ) {
                    Ok(()) => self.egress = Some(f),
                    Err(e) => tracing::warn!("egress device not usable: {e}"),
                }
            }
            Command::Stats { port, reply } => {
                let _ = reply.send(self.switch.port_counters(port));
            }
            Command::HostStats { reply } => {
                let _ = reply.send(self.host_stats());
            }
        }
    }

    fn attach(
        &mut self,
        port: PortId,
        tun: OwnedFd,
        net: NetConfig,
        ip: Ipv4Addr,
    ) -> Result<(), String> {
        self.switch.upsert_net(net);
        self.switch
            .attach_port(port, net.id, ip)
            .map_err(|e| e.to_string())?;
        let f = File::from(tun);
        if let Err(e) = self.poll.registry().register(
            &mut SourceFd(&f.as_raw_fd()),
            Token(port.0 as usize),
            Interest::READABLE,
        ) {
            self.switch.detach_port(port);
            return Err(format!("register TUN device: {e}"));
        }
        self.ports.insert(port, f);
        Ok(())
    }

    /// Takes the directory's list of hosts: keys for the tunnels, locators for the socket.
    /// A locator that changed replaces wherever the host's packets went before.
    fn apply_peers(&mut self, peers: Vec<PeerInfo>) {
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
            let io = self.peers.entry(p.id).or_insert_with(|| PeerIo {
                name: p.name.clone(),
                locator: None,
                endpoint: None,
                waiting: VecDeque::new(),
                plain_tx: (0, 0),
                plain_rx: (0, 0),
            });
            io.name = p.name;
            if io.locator != p.locator {
                io.locator = p.locator;
                io.endpoint = p.locator;
            }
        }
    }

    fn apply_view(
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

    /// The directory answered a lookup: replay the packets that waited for it.
    fn resolved(&mut self, net: NetId, ip: Ipv4Addr, host: Option<HostId>, bufs: &mut Buffers) {
        let local = self.identity.map(|(id, _)| id);
        match host {
            // An entry for this host that the switch lacks is an instance not attached
            // (any more): nothing to send to.
            Some(h) if Some(h) != local => {
                self.switch.set_member(net, ip, Location::Remote(h));
            }
            _ => {
                self.counters.lookup_misses += 1;
                self.negative.insert((net, ip), Instant::now());
            }
        }
        let Some(miss) = self.misses.remove(&(net, ip)) else {
            return;
        };
        for (port, read) in miss.packets {
            bufs.device[..read.len()].copy_from_slice(&read);
            self.switch_device_packet(Source::Port(port), read.len(), bufs, true);
        }
    }

    /// Reads up to `BATCH` packets from the device of `token` and forwards them. Returns
    /// whether the device was drained.
    fn service_device(&mut self, token: Token, bufs: &mut Buffers) -> bool {
        let source = if token == EGRESS {
            Source::Egress
        } else {
            Source::Port(PortId(token.0 as u32))
        };
        for _ in 0..BATCH {
            let device = match source {
                Source::Egress => self.egress.as_mut(),
                Source::Port(port) => self.ports.get_mut(&port),
            };
            let Some(device) = device else { return true };
            // Over its bandwidth limit (or its receiver's): leave the packets in the device,
            // so the kernel slows the instance's sockets down instead of losing packets.
            if let Source::Port(port) = source {
                let now = self.now;
                if let Some(wait) = self.switch.port_delay(port, now) {
                    let at = now + wait;
                    self.throttled = Some(self.throttled.map_or(at, |t| t.min(at)));
                    self.was_throttled = true;
                    return false;
                }
            }
            let n = match device.read(&mut bufs.device) {
                Ok(0) => return true,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!("read from device {}: {e}", token.0);
                    return true;
                }
            };
            self.switch_device_packet(source, n, bufs, false);
            if std::mem::take(&mut self.lone) {
                self.underlay.flush();
            }
        }
        false
    }

    /// Switches what a device handed over (`bufs.device[..n]`: virtio header and packet).
    /// A packet for an address not resolved yet waits for the directory, unless it is
    /// `replayed` after waiting once already.
    fn switch_device_packet(
        &mut self,
        source: Source,
        n: usize,
        bufs: &mut Buffers,
        replayed: bool,
    ) {
        let Some(hdr) = VnetHdr::parse(&bufs.device[..n]) else {
            return;
        };
        let pkt = &mut bufs.device[VNET_HDR_LEN..n];
        // The switch adjusts checksums as complete ones when it rewrites an address; a
        // partial checksum is the complement of such a one as far as the adjustment goes,
        // so complementing it around the call keeps it right.
        let partial = hdr.needs_csum() && vnet::complement_checksum_field(pkt, &hdr);
        let now = self.now;
        let verdict = match source {
            Source::Egress => self.switch.process_from_egress(pkt, now),
            Source::Port(port) => self.switch.process_from_port(port, pkt, now),
        };
        if partial {
            vnet::complement_checksum_field(pkt, &hdr);
        }
        let out = match verdict {
            // Local devices take the packet as it came, offloads and all.
            Verdict::Deliver(port) => self.ports.get_mut(&port),
            Verdict::Egress => self.egress.as_mut(),
            Verdict::Forward {
                host,
                src_net,
                dst_net,
            } => {
                self.forward(host, src_net, dst_net, &hdr, n, bufs);
                return;
            }
            Verdict::Unresolved { dst_net } => {
                match source {
                    Source::Port(port) if !replayed => {
                        self.hold_for_directory(port, dst_net, &bufs.device[..n])
                    }
                    _ => self.counters.miss_queue_dropped += 1,
                }
                return;
            }
            Verdict::Drop(_) => None,
        };
        if let Some(out) = out {
            // A full device queue drops the packet, as a full link would.
            let _ = out.write(&bufs.device[..n]);
        }
    }

    /// Sends the packet at `bufs.device[VNET_HDR_LEN..n]` to another host: cut into
    /// MTU-sized segments if the device handed over a large one, each framed with both nets
    /// and sealed into the underlay's batch.
    fn forward(
        &mut self,
        host: HostId,
        src_net: NetId,
        dst_net: NetId,
        hdr: &VnetHdr,
        n: usize,
        bufs: &mut Buffers,
    ) {
        let pkt = &bufs.device[VNET_HDR_LEN..n];
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
                self.too_large(pkt, &mut bufs.scratch);
                return;
            }
            let room = segments.max_segment_len();
            while let Some(frame) = self.frame_slot(host, room) {
                let Some(len) = segments.next_into(&mut frame[NETS_LEN..]) else {
                    break;
                };
                overlay::write_nets(frame, src_net, dst_net, FLAG_CSUM_PARTIAL);
                self.seal_frame(host, NETS_LEN + len, &mut bufs.scratch);
            }
            return;
        }
        if pkt.len() > self.max_inner_packet && dont_fragment(pkt) {
            self.too_large(pkt, &mut bufs.scratch);
            return;
        }
        if let Some(frame) = self.frame_slot(host, pkt.len()) {
            frame[NETS_LEN..NETS_LEN + pkt.len()].copy_from_slice(pkt);
            overlay::write_nets(frame, src_net, dst_net, flags);
            self.seal_frame(host, NETS_LEN + pkt.len(), &mut bufs.scratch);
        }
    }

    /// Where the datagram header goes in front of an inner frame.
    fn frame_offset(&self) -> usize {
        match self.identity {
            Some((_, true)) => PLAIN_HEADER_LEN,
            _ => DATA_HEADER_LEN,
        }
    }

    /// Room in the underlay's batch for an inner frame holding a packet of up to
    /// `packet_len` bytes to `host`, at its place in the datagram. `None` if the host cannot
    /// be sent to (counted).
    fn frame_slot(&mut self, host: HostId, packet_len: usize) -> Option<&mut [u8]> {
        if self.identity.is_none() {
            self.counters.drop_wrong_mode += 1;
            return None;
        }
        let Some(endpoint) = self.peers.get(&host).and_then(|p| p.endpoint) else {
            self.counters.drop_no_locator += 1;
            return None;
        };
        let at = self.frame_offset();
        let slot = self
            .underlay
            .slot(endpoint, at + NETS_LEN + packet_len + TAG_LEN);
        Some(&mut slot[at..])
    }

    /// Seals the inner frame of `inner_len` bytes just written into the last
    /// [`Worker::frame_slot`] and queues the datagram: behind a plain header in a plaintext
    /// cluster; encrypted otherwise, or, without a session yet, kept aside while a
    /// handshake runs.
    fn seal_frame(&mut self, host: HostId, inner_len: usize, scratch: &mut [u8]) {
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
        let slot = self.underlay.slot(endpoint, at + inner_len + TAG_LEN);
        if plaintext {
            overlay::write_plain_header(slot, local);
            peer.plain_tx.0 += 1;
            peer.plain_tx.1 += inner_len as u64;
            self.underlay.commit(PLAIN_HEADER_LEN + inner_len);
            return;
        }
        match self.tunnels.seal_in_place(host, slot, inner_len, self.now) {
            Seal::Data(len) => self.underlay.commit(len),
            Seal::NoSession => {
                let frame = slot[at..at + inner_len].to_vec();
                if peer.waiting.len() >= HANDSHAKE_QUEUE {
                    self.counters.handshake_queue_dropped += 1;
                } else {
                    peer.waiting.push_back((self.now, frame));
                }
                if let Some(n) = self.tunnels.initiate(host, scratch, self.now, wall_clock()) {
                    self.underlay.send_now(&scratch[..n], endpoint);
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
    fn too_large(&mut self, pkt: &[u8], scratch: &mut [u8]) {
        if !dont_fragment(pkt) {
            self.counters.drop_frame_too_large += 1;
            return;
        }
        let Some((src, _)) = overlay::addresses(pkt) else {
            return;
        };
        let mtu = self.max_inner_packet.min(usize::from(u16::MAX)) as u16;
        let Some(n) = overlay::icmp_frag_needed(pkt, mtu, &mut scratch[VNET_HDR_LEN..]) else {
            return;
        };
        VnetHdr::PLAIN.write(scratch);
        // Back to whichever local port owns the sender's address.
        let port = self.ports.keys().copied().find(|p| {
            self.switch
                .port_address(*p)
                .is_some_and(|(_, ip)| ip == src)
        });
        if let Some(f) = port.and_then(|p| self.ports.get_mut(&p)) {
            let _ = f.write(&scratch[..VNET_HDR_LEN + n]);
            self.counters.frag_needed_sent += 1;
        }
    }

    /// Holds a packet until the directory says where its destination is.
    fn hold_for_directory(&mut self, port: PortId, net: NetId, read: &[u8]) {
        let Some((_, dst)) = overlay::addresses(&read[VNET_HDR_LEN..]) else {
            return;
        };
        let key = (net, dst);
        if let Some(at) = self.negative.get(&key) {
            if at.elapsed() < NEGATIVE_TTL {
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
            // Full only while the controller is away: the miss expires like any other.
            let _ = self.lookups.try_send(key);
            self.misses.insert(
                key,
                Miss {
                    since: Instant::now(),
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

    /// Reads up to `BATCH` batches of receptions (runs of datagrams) from the underlay.
    /// Returns whether it was drained.
    fn service_underlay(&mut self, bufs: &mut Buffers) -> bool {
        let mut received = [vane_sys::udp::Received {
            len: 0,
            from: SocketAddr::from(([0, 0, 0, 0], 0)),
            segment: 0,
        }; vane_sys::udp::RECV_SLOTS];
        for _ in 0..BATCH {
            let n = self.underlay.recv(&mut bufs.datagrams, &mut received);
            if n == 0 {
                return true;
            }
            for (i, r) in received[..n].iter().enumerate() {
                let base = i * MAX_DATAGRAM;
                let segment = r.segment.max(1);
                let mut at = 0;
                while at < r.len {
                    let end = (at + segment).min(r.len);
                    self.datagram(base + at..base + end, r.from, bufs);
                    at = end;
                }
                // A run is one sender's: what it merged goes out before the next run's.
                self.flush_coalesced();
            }
            // Once per turn: a device with nothing to read costs a read for nothing, and
            // bulk traffic would pay it for every run of datagrams.
            if let Some(port) = self.written.take().filter(|_| self.lone) {
                self.service_device(Token(port.0 as usize), bufs);
                self.lone = false;
            }
        }
        false
    }

    /// Writes the merged segments waiting in the coalescer to their device.
    fn flush_coalesced(&mut self) {
        if let Some((port, bytes)) = self.coalescer.take() {
            if let Some(f) = self.ports.get_mut(&PortId(port)) {
                let _ = f.write(bytes);
                self.written = Some(PortId(port));
            }
        }
    }

    /// One datagram from another host's switch, at `bufs.datagrams[range]`.
    fn datagram(&mut self, range: std::ops::Range<usize>, from: SocketAddr, bufs: &mut Buffers) {
        let Some((_, plaintext)) = self.identity else {
            self.counters.drop_wrong_mode += 1;
            return;
        };
        let datagram = &mut bufs.datagrams[range];
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
            self.deliver_from_tunnel(sender, frame);
            return;
        }
        let now = self.now;
        match self
            .tunnels
            .open_in_place(datagram, from, &mut bufs.scratch, now)
        {
            Open::Data { peer, len } => {
                self.roam(peer, from);
                if len > 0 {
                    self.deliver_from_tunnel(
                        peer,
                        &mut datagram[DATA_HEADER_LEN..DATA_HEADER_LEN + len],
                    );
                }
            }
            Open::Respond { peer, len } => {
                self.roam(peer, from);
                self.underlay.send_now(&bufs.scratch[..len], from);
            }
            Open::Established { peer, len } => {
                self.roam(peer, from);
                self.underlay.send_now(&bufs.scratch[..len], from);
                self.flush_waiting(peer);
            }
            // This host is under load: the initiator proves its address with the cookie on
            // its next try. To the source only, and no roaming: nothing is authenticated.
            Open::CookieReply { len } => self.underlay.send_now(&bufs.scratch[..len], from),
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
                    if let Some(n) =
                        self.tunnels
                            .initiate(peer, &mut bufs.scratch, now, wall_clock())
                    {
                        self.underlay.send_now(&bufs.scratch[..n], from);
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
    fn flush_waiting(&mut self, peer: HostId) {
        let Some(io) = self.peers.get_mut(&peer) else {
            return;
        };
        let waiting = std::mem::take(&mut io.waiting);
        let Some(endpoint) = io.endpoint else {
            return;
        };
        let now = self.now;
        for (_, frame) in waiting {
            let slot = self
                .underlay
                .slot(endpoint, DATA_HEADER_LEN + frame.len() + TAG_LEN);
            slot[DATA_HEADER_LEN..DATA_HEADER_LEN + frame.len()].copy_from_slice(&frame);
            match self.tunnels.seal_in_place(peer, slot, frame.len(), now) {
                Seal::Data(n) => self.underlay.commit(n),
                _ => self.counters.handshake_queue_dropped += 1,
            }
        }
    }

    /// An inner frame from another host: checked again by this host's switch (FIG. 7), then
    /// written to a local instance's device, its checksum marked partial if the sender's
    /// was. The virtio header takes the place of the frame header.
    fn deliver_from_tunnel(&mut self, from: HostId, frame: &mut [u8]) {
        let Some((src_net, dst_net, flags, _)) = overlay::split_frame(frame) else {
            self.counters.drop_bad_offload += 1;
            return;
        };
        let pkt = &mut frame[NETS_LEN..];
        let verdict = self
            .switch
            .process_from_tunnel(from, src_net, dst_net, pkt, self.now);
        let Verdict::Deliver(port) = verdict else {
            return;
        };
        let partial = flags & FLAG_CSUM_PARTIAL != 0;
        // Segments of a stream are merged again for the device, in order: what cannot join
        // goes after what waits.
        if partial && self.coalescer.push(port.0, pkt) {
            return;
        }
        self.flush_coalesced();
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
        if let Some(f) = self.ports.get_mut(&port) {
            let _ = f.write(written);
            self.written = Some(port);
        }
    }

    /// Tunnel timers (handshake retries, rekeys, expiry, idle teardown) and the expiry of
    /// packets that waited too long.
    fn timers(&mut self, now: Instant, bufs: &mut Buffers) {
        if matches!(self.identity, Some((_, false))) {
            while let Some((peer, n)) =
                self.tunnels
                    .poll_timers(now, wall_clock(), &mut bufs.scratch)
            {
                if let Some(endpoint) = self.peers.get(&peer).and_then(|p| p.endpoint) {
                    self.underlay.send_now(&bufs.scratch[..n], endpoint);
                }
            }
        }
        for peer in self.peers.values_mut() {
            while peer
                .waiting
                .front()
                .is_some_and(|(at, _)| now.duration_since(*at) > HANDSHAKE_WAIT)
            {
                peer.waiting.pop_front();
                self.counters.handshake_queue_dropped += 1;
            }
        }
        let before = self.misses.len();
        let mut expired = 0;
        self.misses.retain(|_, m| {
            let keep = now.duration_since(m.since) <= MISS_WAIT;
            if !keep {
                expired += m.packets.len() as u64;
            }
            keep
        });
        if self.misses.len() != before {
            self.counters.miss_queue_dropped += expired;
        }
        self.negative
            .retain(|_, at| now.duration_since(*at) < NEGATIVE_TTL);
    }

    fn host_stats(&self) -> HostStats {
        let mut counters = BTreeMap::new();
        let t = self.tunnels.counters();
        for (name, value) in [
            ("handshakes_initiated", t.handshakes_initiated),
            ("handshakes_completed", t.handshakes_completed),
            ("handshake_timeouts", t.handshake_timeouts),
            ("rekeys", t.rekeys),
            ("sessions_expired", t.sessions_expired),
            ("idle_teardowns", t.idle_teardowns),
            ("data_sealed", t.data_sealed),
            ("data_opened", t.data_opened),
        ] {
            counters.insert(name.to_string(), value);
        }
        for reason in vane_tunnel::DropReason::ALL {
            counters.insert(
                format!("drop_{}", tunnel_drop_name(reason)),
                t.drops(reason),
            );
        }
        let d = self.switch.drop_counters();
        for reason in vane_switch::DropReason::ALL {
            counters.insert(format!("switch_drop_{}", reason.as_str()), d.get(reason));
        }
        let c = &self.counters;
        for (name, value) in [
            ("directory_lookups", c.lookups),
            ("directory_lookup_misses", c.lookup_misses),
            ("miss_queue_dropped", c.miss_queue_dropped),
            ("handshake_queue_dropped", c.handshake_queue_dropped),
            ("frag_needed_sent", c.frag_needed_sent),
            ("drop_no_locator", c.drop_no_locator),
            (
                "drop_plaintext_unknown_sender",
                c.drop_plaintext_unknown_sender,
            ),
            ("drop_wrong_mode", c.drop_wrong_mode),
            ("drop_frame_too_large", c.drop_frame_too_large),
            ("drop_bad_offload", c.drop_bad_offload),
            ("send_errors", self.underlay.counters.send_errors),
            ("underlay_sends", self.underlay.counters.sends),
            (
                "underlay_datagrams_sent",
                self.underlay.counters.datagrams_sent,
            ),
            ("underlay_receives", self.underlay.counters.receives),
            (
                "underlay_datagrams_received",
                self.underlay.counters.datagrams_received,
            ),
        ] {
            counters.insert(name.to_string(), value);
        }
        let plaintext = self.identity.is_some_and(|(_, p)| p);
        let mut peers: Vec<PeerStats> = self
            .peers
            .iter()
            .map(|(id, p)| {
                let mut s = PeerStats {
                    host: p.name.clone(),
                    endpoint: p.endpoint,
                    ..PeerStats::default()
                };
                if plaintext {
                    s.established = true;
                    s.cipher = Some("none".into());
                    (s.tx_packets, s.tx_bytes) = p.plain_tx;
                    (s.rx_packets, s.rx_bytes) = p.plain_rx;
                } else if let Some(t) = self.tunnels.peer_stats(*id) {
                    s.established = t.established;
                    s.cipher = t.cipher.map(|c| c.name().to_string());
                    s.handshakes = t.handshakes;
                    s.tx_packets = t.tx_packets;
                    s.tx_bytes = t.tx_bytes;
                    s.rx_packets = t.rx_packets;
                    s.rx_bytes = t.rx_bytes;
                }
                s
            })
            .collect();
        peers.sort_by(|a, b| a.host.cmp(&b.host));
        HostStats {
            host: String::new(),
            encrypted: !plaintext,
            counters,
            peers,
        }
    }
}

/// Counter name of a tunnel drop reason.
fn tunnel_drop_name(reason: vane_tunnel::DropReason) -> &'static str {
    use vane_tunnel::DropReason as R;
    match reason {
        R::Malformed => "malformed",
        R::UnknownType => "unknown_type",
        R::UnknownPeer => "unknown_peer",
        R::UnknownIndex => "unknown_index",
        R::AuthFailed => "auth_failed",
        R::Replayed => "replayed",
        R::StaleInitiation => "stale_initiation",
        R::Expired => "expired",
        R::TooLarge => "too_large",
        R::BadMac => "bad_mac",
        R::RateLimited => "rate_limited",
        R::CookieSent => "cookie_sent",
        R::UnderLoad => "under_load",
        R::SourceRateLimited => "source_rate_limited",
    }
}

/// Whether an IPv4 packet forbids fragmentation (DF set). Not IPv4: false.
fn dont_fragment(pkt: &[u8]) -> bool {
    vane_wire::Ipv4Packet::new_checked(pkt).is_ok_and(|ip| ip.dont_fragment())
}
