//! The data path's I/O shell: one thread that owns the file descriptors of the instances'
//! TUN devices, the host's egress device and the underlay UDP socket, and the sans-IO
//! node (`vane_node`: the switch, the tunnels, the peers, the packets that wait). It reads
//! what the devices and the socket have, hands it to the node, and gives the node an `Io`
//! that writes to the devices and batches datagrams for the socket (UDP GSO, sent at the
//! end of each turn). Between turns it sleeps until a descriptor is ready or the node's
//! next timer is due. The agent's async side talks to it through a channel and a waker;
//! nothing on the packet path takes a lock.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use tokio::sync::oneshot;

use vane_node::{Io, Node, NodeConfig, Source};
use vane_proto::api::HostStats;
use vane_switch::{
    HostId, Location, NetConfig, NetId, PolicyRule, PortCounters, PortId, SwitchConfig,
};
use vane_tunnel::Keypair;
use vane_wire::vnet::VNET_HDR_LEN;

pub use vane_node::{PeerInfo, MISS_ADDRESSES};

use crate::gateway::{GatewayPort, Gateways, Opened};
use crate::underlay::{self, Underlay, MAX_DATAGRAM};

const WAKER: Token = Token(usize::MAX);
const EGRESS: Token = Token(usize::MAX - 1);
const UNDERLAY: Token = Token(usize::MAX - 2);
const GATEWAYS: Token = Token(usize::MAX - 3);
/// Packets (or coalesced datagram runs) read from one source before the others get their
/// turn.
const BATCH: usize = 64;
/// Largest packet a TUN device hands over (a 64 KiB segment), with its virtio header.
const MAX_DEVICE_READ: usize = VNET_HDR_LEN + 65535;

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
    /// What the outside world may open flows to on `port` (`Switch::set_published`).
    Publish {
        port: PortId,
        published: Vec<(vane_switch::L4Proto, u16)>,
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
        services: Vec<vane_switch::ServiceConfig>,
        /// Who outside may open flows to the nets' published ports.
        outside: Vec<vane_switch::OutsideRule>,
        /// The WireGuard gateways this host serves, each a port of the switch.
        gateways: Vec<GatewayPort>,
    },
    /// Where the directory's members are, after this host's ports changed.
    Members {
        members: Vec<(NetId, Ipv4Addr, Location)>,
    },
    /// The directory's answer to a lookup: where member `ip` of `net` is, if anywhere.
    Resolved {
        net: NetId,
        ip: Ipv4Addr,
        location: Option<Location>,
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
    /// The WireGuard gateways' socket and key, and the names their clients' queries are
    /// answered from.
    pub gateways: Gateways,
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
        let gateways = cfg.gateways;
        if let Some(fd) = gateways.raw_fd() {
            poll.registry()
                .register(&mut SourceFd(&fd), GATEWAYS, Interest::READABLE)?;
        }
        let mut worker = Worker {
            throttled: None,
            was_throttled: false,
            lone: false,
            written: None,
            poll,
            rx,
            ports: HashMap::new(),
            egress: None,
            underlay,
            gateways,
            now: Instant::now(),
            node: Node::new(NodeConfig {
                switch: cfg.switch,
                keypair: cfg.keypair,
                tunnel: cfg.tunnel,
                max_inner_packet: cfg.max_inner_packet,
            }),
            lookups: cfg.lookups,
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

/// The node's output, as the shell carries it out: packets to the devices, datagrams into
/// the socket's batch.
struct ShellIo<'a> {
    underlay: &'a mut Underlay,
    ports: &'a mut HashMap<PortId, File>,
    gateways: &'a mut Gateways,
    egress: &'a mut Option<File>,
    /// Set to the device a packet from the tunnel was written to, when `Some`.
    written: Option<&'a mut Option<PortId>>,
}

impl Io for ShellIo<'_> {
    fn slot(&mut self, to: SocketAddr, len: usize) -> &mut [u8] {
        self.underlay.slot(to, len)
    }

    fn commit(&mut self, len: usize) {
        self.underlay.commit(len);
    }

    fn send_now(&mut self, datagram: &[u8], to: SocketAddr) {
        self.underlay.send_now(datagram, to);
    }

    fn write_port(&mut self, port: PortId, packet: &[u8]) {
        if let Some(f) = self.ports.get_mut(&port) {
            // A full device queue drops the packet, as a full link would.
            let _ = f.write(packet);
            if let Some(written) = self.written.as_deref_mut() {
                *written = Some(port);
            }
        } else {
            self.gateways.send(port, packet);
        }
    }

    fn write_egress(&mut self, packet: &[u8]) {
        if let Some(f) = self.egress.as_mut() {
            let _ = f.write(packet);
        }
    }
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
    ports: HashMap<PortId, File>,
    egress: Option<File>,
    underlay: Underlay,
    gateways: Gateways,
    /// The time, read once per batch of packets rather than for each (a clock read costs
    /// as much as a table lookup); batches last well under a millisecond.
    now: Instant,
    node: Node,
    lookups: tokio::sync::mpsc::Sender<(NetId, Ipv4Addr)>,
}

/// The node's `Io` over the worker's descriptors; `from_tunnel`: remember the device that
/// packets are written to (see `Worker::lone`).
macro_rules! io {
    ($w:expr, $from_tunnel:expr) => {
        ShellIo {
            underlay: &mut $w.underlay,
            ports: &mut $w.ports,
            gateways: &mut $w.gateways,
            egress: &mut $w.egress,
            written: if $from_tunnel {
                Some(&mut $w.written)
            } else {
                None
            },
        }
    };
}

impl Worker {
    fn run(&mut self) {
        let mut events = Events::with_capacity(256);
        let mut device = vec![0u8; MAX_DEVICE_READ];
        let mut datagrams = vec![0u8; MAX_DATAGRAM * vane_sys::udp::RECV_SLOTS];
        let mut backlog: Vec<Token> = Vec::new();
        // Whether a device in the backlog can be read at once (not only throttled ones).
        let mut ready = false;
        loop {
            // Until something is readable or the node's next timer: no periodic wake-up.
            let timer = match (self.node.poll_timeout(), self.gateways.next_timeout()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let wake = match (backlog.is_empty(), ready, self.throttled.take()) {
                (true, _, _) => timer,
                (false, false, Some(at)) => Some(timer.map_or(at, |t| t.min(at))),
                _ => Some(Instant::now()),
            };
            let timeout = wake.map(|at| at.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
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
                    if !self.commands() {
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
                    self.service_underlay(&mut datagrams, &mut device)
                } else if token == GATEWAYS {
                    self.service_gateways(&mut datagrams, &mut device)
                } else {
                    self.service_device(token, &mut device)
                };
                if !drained {
                    backlog.push(token);
                    ready |= !self.was_throttled;
                }
            }
            let now = Instant::now();
            self.now = now;
            self.node.handle_timeout(&mut io!(self, false), now);
            self.gateways.tick(now);
            while let Some(lookup) = self.node.poll_lookup() {
                // Full only while the controller is away: the miss expires like any other.
                let _ = self.lookups.try_send(lookup);
            }
            // What this turn sealed leaves before the thread waits again.
            self.flush();
        }
    }

    /// Sends what the turn queued on both sockets: the tunnels' and the gateways'.
    fn flush(&mut self) {
        self.underlay.flush();
        self.gateways.flush();
    }

    /// Applies queued commands; false when the agent side is gone.
    fn commands(&mut self) -> bool {
        loop {
            match self.rx.try_recv() {
                Ok(cmd) => self.command(cmd),
                Err(mpsc::TryRecvError::Empty) => return true,
                Err(mpsc::TryRecvError::Disconnected) => return false,
            }
        }
    }

    fn command(&mut self, cmd: Command) {
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
                let _ = reply.send(self.attach(port, tun, net, ip, rate, held));
            }
            Command::Publish { port, published } => self.node.set_published(port, &published),
            Command::Detach { port } => {
                if let Some(f) = self.ports.remove(&port) {
                    let _ = self
                        .poll
                        .registry()
                        .deregister(&mut SourceFd(&f.as_raw_fd()));
                }
                self.node.detach_port(port);
            }
            Command::Hold { port, held, reply } => {
                self.node.hold_port(&mut io!(self, false), port, held);
                let _ = reply.send(());
            }
            Command::Identity {
                host_id,
                plaintext,
                global_space,
            } => self.node.set_identity(host_id, plaintext, global_space),
            Command::View {
                peers,
                nets,
                members,
                policies,
                services,
                outside,
                gateways,
            } => {
                self.node.apply_peers(peers);
                self.node.apply_view(nets, members, policies);
                self.node.apply_services(&services);
                self.node.apply_outside_rules(outside);
                let (gone, added) = self.gateways.apply(gateways);
                for port in gone {
                    self.node.detach_port(port);
                }
                for g in added {
                    if let Err(e) = self.node.attach_port(g.port, g.net, g.ip, None, false) {
                        tracing::warn!(gateway = %g.names_client.name, "cannot attach: {e}");
                    }
                }
            }
            Command::Members { members } => self.node.apply_members(members),
            Command::Resolved { net, ip, location } => {
                let now = Instant::now();
                self.node
                    .resolved(&mut io!(self, false), net, ip, location, now);
            }
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
                let _ = reply.send(self.node.port_counters(port));
            }
            Command::HostStats { reply } => {
                let u = &self.underlay.counters;
                let _ = reply.send(self.node.host_stats(&[
                    ("send_errors", u.send_errors),
                    ("underlay_sends", u.sends),
                    ("underlay_datagrams_sent", u.datagrams_sent),
                    ("underlay_receives", u.receives),
                    ("underlay_datagrams_received", u.datagrams_received),
                ]));
            }
        }
    }

    fn attach(
        &mut self,
        port: PortId,
        tun: OwnedFd,
        net: NetConfig,
        ip: Ipv4Addr,
        rate: Option<u64>,
        held: bool,
    ) -> Result<(), String> {
        self.node.attach_port(port, net, ip, rate, held)?;
        let f = File::from(tun);
        if let Err(e) = self.poll.registry().register(
            &mut SourceFd(&f.as_raw_fd()),
            Token(port.0 as usize),
            Interest::READABLE,
        ) {
            self.node.detach_port(port);
            return Err(format!("register TUN device: {e}"));
        }
        self.ports.insert(port, f);
        Ok(())
    }

    /// Reads up to `BATCH` packets from the device of `token` and hands them to the node.
    /// Returns whether the device was drained.
    fn service_device(&mut self, token: Token, buf: &mut [u8]) -> bool {
        let source = if token == EGRESS {
            Source::Egress
        } else {
            Source::Port(PortId(token.0 as u32))
        };
        for _ in 0..BATCH {
            // Over its bandwidth limit (or its receiver's): leave the packets in the device,
            // so the kernel slows the instance's sockets down instead of losing packets.
            if let Source::Port(port) = source {
                let now = self.now;
                if let Some(wait) = self.node.port_delay(port, now) {
                    let at = now + wait;
                    self.throttled = Some(self.throttled.map_or(at, |t| t.min(at)));
                    self.was_throttled = true;
                    return false;
                }
            }
            let device = match source {
                Source::Egress => self.egress.as_mut(),
                Source::Port(port) => self.ports.get_mut(&port),
            };
            let Some(device) = device else { return true };
            let n = match device.read(buf) {
                Ok(0) => return true,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!("read from device {}: {e}", token.0);
                    return true;
                }
            };
            let now = self.now;
            self.node
                .handle_device_packet(&mut io!(self, false), source, &mut buf[..n], now);
            if std::mem::take(&mut self.lone) {
                self.flush();
            }
        }
        false
    }

    /// Reads up to `BATCH` batches of receptions (runs of datagrams) from WireGuard
    /// clients and hands the packets in them to the node, as read from their gateways'
    /// ports. Returns whether the socket was drained.
    fn service_gateways(&mut self, datagrams: &mut [u8], device: &mut [u8]) -> bool {
        let mut received = underlay::receptions();
        for _ in 0..BATCH {
            let n = self.gateways.recv(datagrams, &mut received);
            if n == 0 {
                return true;
            }
            for (i, r) in received[..n].iter().enumerate() {
                for datagram in underlay::datagrams_of(datagrams, i, r) {
                    let Opened::Packet { port, len } = self.gateways.open(datagram, r.from, device)
                    else {
                        continue;
                    };
                    vane_wire::vnet::VnetHdr::PLAIN.write(device);
                    let now = self.now;
                    self.node.handle_device_packet(
                        &mut io!(self, false),
                        Source::Port(port),
                        &mut device[..VNET_HDR_LEN + len],
                        now,
                    );
                    if std::mem::take(&mut self.lone) {
                        self.flush();
                    }
                }
            }
        }
        false
    }

    /// Reads up to `BATCH` batches of receptions (runs of datagrams) from the underlay and
    /// hands each datagram to the node. Returns whether it was drained.
    fn service_underlay(&mut self, datagrams: &mut [u8], device: &mut [u8]) -> bool {
        let mut received = underlay::receptions();
        for _ in 0..BATCH {
            let n = self.underlay.recv(datagrams, &mut received);
            if n == 0 {
                return true;
            }
            let now = self.now;
            for (i, r) in received[..n].iter().enumerate() {
                for datagram in underlay::datagrams_of(datagrams, i, r) {
                    self.node
                        .handle_datagram(&mut io!(self, true), datagram, r.from, now);
                }
                // A run is one sender's: what it merged goes out before the next run's.
                self.node.flush_coalesced(&mut io!(self, true));
            }
            // Once per turn: a device with nothing to read costs a read for nothing, and
            // bulk traffic would pay it for every run of datagrams.
            if let Some(port) = self.written.take().filter(|_| self.lone) {
                self.service_device(Token(port.0 as usize), device);
                self.lone = false;
            }
        }
        false
    }
}
