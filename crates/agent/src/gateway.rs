//! WireGuard gateways (`vane gateway add`): a stock WireGuard client becomes a member of a
//! net through this host.
//!
//! Each gateway is a port of the switch like an instance's device, attached with the
//! gateway's net and address, so everything the switch checks for an instance it checks
//! for the client: its source address, its net, policies, what it may receive. What the
//! client sends arrives as WireGuard datagrams on one UDP socket (`--gateway-listen`),
//! is opened by boringtun's `Tunn` (one per gateway, keyed with the host's gateway key and
//! the client's public key), and goes to the switch as if read from the port's device;
//! what the switch delivers to the port is sealed and sent to the client's last address.
//!
//! A datagram finds its gateway without trying keys: a handshake initiation by the client
//! key it carries (`parse_handshake_anon`, one DH), everything else by the index the gateway
//! gave in its handshake. A datagram of no gateway is dropped unanswered, and boringtun's
//! rate limiter answers a flood of handshakes with cookies instead of DH work.
//!
//! The client's queries to its resolver address (UDP port 53) are answered here, from the
//! names the instances' resolvers answer from, as the client's net sees them.
//!
//! This runs on the switch's thread: every call is non-blocking.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

use vane_switch::{NetConfig, PortId};
use vane_wire::vnet::{complete_checksum, TcpSegments, VnetHdr, VNET_HDR_LEN};
use vane_wire::{ipv4_checksum, ipv4_l4_checksum, PROTO_UDP};

use crate::dns;
use crate::underlay::Underlay;

/// How often each gateway's timers run (handshake retries, keepalives, expiry), as
/// boringtun's own device does.
const TICK: Duration = Duration::from_millis(250);
/// Handshake initiations a second the host takes before it answers with cookies: 100,
/// each counted twice (checked once before its gateway is known, and again by its `Tunn`).
const HANDSHAKES_PER_SECOND: u64 = 200;
/// Length of a handshake initiation.
const HANDSHAKE_INIT_LEN: usize = 148;
/// Length of a cookie reply.
const COOKIE_REPLY_LEN: usize = 64;
/// The type of a handshake response, the first byte of its message.
const HANDSHAKE_RESPONSE: u8 = 2;
/// WireGuard's overhead on a packet it carries: its data header and tag.
const OVERHEAD: usize = 32;
/// The largest datagram a client sends (a 64 KiB packet sealed).
pub(crate) const MAX_DATAGRAM: usize = 65535 + OVERHEAD;

/// A gateway as the switch's thread serves it.
#[derive(Clone, Debug)]
pub(crate) struct GatewayPort {
    pub(crate) port: PortId,
    pub(crate) net: NetConfig,
    pub(crate) ip: Ipv4Addr,
    /// Where its client asks names.
    pub(crate) resolver: Ipv4Addr,
    /// The client's public key.
    pub(crate) client_key: [u8; 32],
    /// The client as its resolver answers it.
    pub(crate) names_client: dns::Client,
}

struct Peer {
    gateway: GatewayPort,
    tunn: Tunn,
    /// The index its handshakes carry (boringtun shifts it 8 bits left, the low bits
    /// numbering sessions).
    index: u32,
    /// Where the client last sent from, in an authenticated datagram.
    endpoint: Option<SocketAddr>,
    queries: dns::Bucket,
}

/// The gateways of this host and their socket.
pub(crate) struct Gateways {
    /// The socket, batched as the underlay's is: GRO in, GSO out.
    socket: Option<Underlay>,
    secret: StaticSecret,
    public: PublicKey,
    limiter: Arc<RateLimiter>,
    peers: HashMap<PortId, Peer>,
    by_index: HashMap<u32, PortId>,
    next_index: u32,
    next_tick: Instant,
    next_reset: Instant,
    names: dns::Names,
    /// Room for one sealed datagram, and for one packet cut from a large segment.
    sealed: Vec<u8>,
    piece: Vec<u8>,
}

/// What the switch is to do with a datagram from a client.
pub(crate) enum Opened {
    /// Nothing (answered here, a handshake, a keepalive, or dropped).
    Nothing,
    /// The first `len` bytes of the buffer after its virtio header are a packet the
    /// client sent through gateway `port`.
    Packet { port: PortId, len: usize },
}

impl Gateways {
    /// The gateways' socket bound at `listen` (none: this host takes no clients), keyed
    /// with the host's gateway key.
    /// `largest`: the longest datagram the underlay carries unfragmented.
    pub(crate) fn bind(
        listen: Option<SocketAddr>,
        largest: usize,
        key: [u8; 32],
        names: dns::Names,
    ) -> io::Result<Gateways> {
        let socket = listen
            .map(|addr| {
                Underlay::bind(addr, largest).map_err(|e| {
                    io::Error::new(e.kind(), format!("gateway socket (--gateway-listen): {e}"))
                })
            })
            .transpose()?;
        let secret = StaticSecret::from(key);
        let public = PublicKey::from(&secret);
        let now = Instant::now();
        Ok(Gateways {
            socket,
            limiter: Arc::new(RateLimiter::new(&public, HANDSHAKES_PER_SECOND)),
            secret,
            public,
            peers: HashMap::new(),
            by_index: HashMap::new(),
            next_index: 1,
            next_tick: now + TICK,
            next_reset: now + Duration::from_secs(1),
            names,
            sealed: vec![0; MAX_DATAGRAM + HANDSHAKE_INIT_LEN],
            piece: vec![0; 65535],
        })
    }

    /// The public key of `key`, as WireGuard writes keys (base64).
    pub(crate) fn public_key_base64(key: [u8; 32]) -> String {
        use base64::Engine;
        let public = PublicKey::from(&StaticSecret::from(key));
        base64::engine::general_purpose::STANDARD.encode(public.as_bytes())
    }

    /// The socket's descriptor, to wait on.
    pub(crate) fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        self.socket.as_ref().map(Underlay::raw_fd)
    }

    /// Receives what waits, as runs of datagrams (`Underlay::recv`); 0 when nothing does.
    pub(crate) fn recv(&mut self, buf: &mut [u8], out: &mut crate::underlay::Receptions) -> usize {
        self.socket.as_mut().map_or(0, |s| s.recv(buf, out))
    }

    /// Sends what was sealed for the clients since the last flush.
    pub(crate) fn flush(&mut self) {
        if let Some(socket) = self.socket.as_mut() {
            socket.flush();
        }
    }

    /// Serves exactly `wanted`: a gateway that left, or whose key, net or address changed,
    /// loses its sessions at once. Returns the ports to detach from the switch and those
    /// to attach.
    pub(crate) fn apply(&mut self, wanted: Vec<GatewayPort>) -> (Vec<PortId>, Vec<GatewayPort>) {
        let same = |a: &GatewayPort, b: &GatewayPort| {
            a.client_key == b.client_key && a.ip == b.ip && a.net == b.net
        };
        let gone: Vec<PortId> = self
            .peers
            .iter()
            .filter(|(port, peer)| {
                !wanted
                    .iter()
                    .any(|w| w.port == **port && same(w, &peer.gateway))
            })
            .map(|(port, _)| *port)
            .collect();
        for port in &gone {
            if let Some(peer) = self.peers.remove(port) {
                self.by_index.remove(&peer.index);
            }
        }
        let mut added = Vec::new();
        for g in wanted {
            if let Some(peer) = self.peers.get_mut(&g.port) {
                peer.gateway = g;
                continue;
            }
            let index = self.next_index;
            // Indexes are 24 bits; wrapping after 16 million gateways is harmless as long
            // as no two live ones share one.
            self.next_index = (self.next_index % 0x00ff_ffff) + 1;
            let tunn = Tunn::new(
                self.secret.clone(),
                PublicKey::from(g.client_key),
                None,
                None,
                index,
                Some(self.limiter.clone()),
            );
            self.by_index.insert(index, g.port);
            added.push(g.clone());
            self.peers.insert(
                g.port,
                Peer {
                    gateway: g,
                    tunn,
                    index,
                    endpoint: None,
                    queries: dns::Bucket::new(Instant::now()),
                },
            );
        }
        (gone, added)
    }

    /// When `tick` is next due, while there are gateways.
    pub(crate) fn next_timeout(&self) -> Option<Instant> {
        (!self.peers.is_empty()).then_some(self.next_tick)
    }

    /// Runs the gateways' timers when due: handshakes retried, keepalives, sessions
    /// expired, and the handshake rate limiter's count restarted each second.
    pub(crate) fn tick(&mut self, now: Instant) {
        if now >= self.next_reset {
            self.limiter.reset_count();
            self.next_reset = now + Duration::from_secs(1);
        }
        if now < self.next_tick {
            return;
        }
        self.next_tick = now + TICK;
        let Some(socket) = self.socket.as_mut() else {
            return;
        };
        for peer in self.peers.values_mut() {
            if let TunnResult::WriteToNetwork(datagram) = peer.tunn.update_timers(&mut self.sealed)
            {
                if let Some(to) = peer.endpoint {
                    socket.send_now(datagram, to);
                }
            }
        }
    }

    /// Opens a datagram from `from`: its packet, if any, is left behind `VNET_HDR_LEN`
    /// bytes of `out`.
    pub(crate) fn open(&mut self, datagram: &[u8], from: SocketAddr, out: &mut [u8]) -> Opened {
        // A handshake's MAC, and under load its cookie, are checked before the DH that
        // names its gateway: a flood of initiations costs a keyed hash each, not a DH.
        let mut cookie = [0u8; COOKIE_REPLY_LEN];
        let packet = match self
            .limiter
            .verify_packet(Some(from.ip()), datagram, &mut cookie)
        {
            Ok(packet) => packet,
            Err(TunnResult::WriteToNetwork(reply)) => {
                if let Some(socket) = self.socket.as_mut() {
                    socket.send_now(reply, from);
                }
                return Opened::Nothing;
            }
            Err(_) => return Opened::Nothing,
        };
        let port = match packet {
            Packet::HandshakeInit(init) => parse_handshake_anon(&self.secret, &self.public, &init)
                .ok()
                .and_then(|half| {
                    self.peers
                        .iter()
                        .find(|(_, p)| p.gateway.client_key == half.peer_static_public)
                        .map(|(port, _)| *port)
                }),
            Packet::HandshakeResponse(p) => self.by_index.get(&(p.receiver_idx >> 8)).copied(),
            Packet::PacketCookieReply(p) => self.by_index.get(&(p.receiver_idx >> 8)).copied(),
            Packet::PacketData(p) => self.by_index.get(&(p.receiver_idx >> 8)).copied(),
        };
        let Some(port) = port else {
            return Opened::Nothing;
        };
        let (Some(socket), Some(peer)) = (self.socket.as_mut(), self.peers.get_mut(&port)) else {
            return Opened::Nothing;
        };
        let inner = &mut out[VNET_HDR_LEN..];
        match peer.tunn.decapsulate(Some(from.ip()), datagram, inner) {
            TunnResult::WriteToNetwork(reply) => {
                // A handshake answered: the client is where it wrote from, since its
                // initiation checked out. A cookie (under load) answers a datagram nobody
                // authenticated yet, so the client's address stays.
                if reply.first() == Some(&HANDSHAKE_RESPONSE) {
                    peer.endpoint = Some(from);
                }
                socket.send_now(reply, from);
                // Packets that waited for the session go now.
                while let TunnResult::WriteToNetwork(queued) =
                    peer.tunn.decapsulate(None, &[], &mut self.sealed)
                {
                    socket.send_now(queued, from);
                }
                Opened::Nothing
            }
            TunnResult::WriteToTunnelV4(packet, _) => {
                peer.endpoint = Some(from);
                let len = packet.len();
                if let Some((client, query)) = resolver_query(&peer.gateway, &inner[..len]) {
                    // Over the resolver's rate, a query waits for nothing: it is dropped,
                    // as an instance's resolver leaves it waiting.
                    if peer.queries.take(Instant::now()).is_none() {
                        let names_client = &peer.gateway.names_client;
                        if let Some(answer) = dns::answer_datagram(&self.names, names_client, query)
                        {
                            let reply = udp_packet((peer.gateway.resolver, 53), client, &answer);
                            send_sealed(socket, peer, &reply);
                        }
                    }
                    return Opened::Nothing;
                }
                Opened::Packet { port, len }
            }
            TunnResult::WriteToTunnelV6(..) | TunnResult::Done => Opened::Nothing,
            TunnResult::Err(e) => {
                tracing::debug!(gateway = %peer.gateway.names_client.name, "datagram refused: {e:?}");
                Opened::Nothing
            }
        }
    }

    /// Sends `packet` (behind its virtio header), which the switch delivered to gateway
    /// `port`, to its client: whole packets only, so a large segment is cut and partial
    /// checksums are finished first. Dropped while the client has not been heard from.
    pub(crate) fn send(&mut self, port: PortId, packet: &[u8]) {
        let (Some(socket), Some(peer)) = (self.socket.as_mut(), self.peers.get_mut(&port)) else {
            return;
        };
        if peer.endpoint.is_none() {
            return;
        }
        let Some(hdr) = VnetHdr::parse(packet) else {
            return;
        };
        let packet = &packet[VNET_HDR_LEN..];
        if hdr.is_tcp_gso() {
            let Some(mut segments) = TcpSegments::new(packet, &hdr) else {
                return;
            };
            let partial = VnetHdr::partial_for(packet);
            while let Some(len) = segments.next_into(&mut self.piece) {
                if let Some(partial) = &partial {
                    complete_checksum(&mut self.piece[..len], partial);
                }
                send_sealed(socket, peer, &self.piece[..len]);
            }
        } else if hdr.needs_csum() {
            let Some(piece) = self.piece.get_mut(..packet.len()) else {
                return;
            };
            piece.copy_from_slice(packet);
            complete_checksum(piece, &hdr);
            send_sealed(socket, peer, piece);
        } else {
            send_sealed(socket, peer, packet);
        }
    }
}

/// Seals `packet` for `peer`'s client into the socket's batch, for where the client last
/// wrote from. Sent at the end of the switch thread's turn (or sooner, as the batch fills).
fn send_sealed(socket: &mut Underlay, peer: &mut Peer, packet: &[u8]) {
    let Some(to) = peer.endpoint else {
        return;
    };
    // Room for the sealed packet, or for the handshake that starts a session.
    let slot = socket.slot(to, (packet.len() + OVERHEAD).max(HANDSHAKE_INIT_LEN));
    if let TunnResult::WriteToNetwork(datagram) = peer.tunn.encapsulate(packet, slot) {
        let n = datagram.len();
        socket.commit(n);
    }
}

/// Whether `packet` is a query to the client's resolver (UDP, port 53, at its resolver
/// address): the client's address and port, and the query.
fn resolver_query<'p>(
    gateway: &GatewayPort,
    packet: &'p [u8],
) -> Option<((Ipv4Addr, u16), &'p [u8])> {
    let ip = vane_wire::Ipv4Packet::new_checked(packet).ok()?;
    if ip.protocol() != PROTO_UDP
        || ip.dst() != gateway.resolver
        || ip.src() != gateway.ip
        || ip.frag_offset() != 0
        || ip.more_fragments()
    {
        return None;
    }
    let udp = packet.get(ip.header_len()..ip.total_len())?;
    if udp.len() < 8 || u16::from_be_bytes([udp[2], udp[3]]) != 53 {
        return None;
    }
    let client_port = u16::from_be_bytes([udp[0], udp[1]]);
    Some(((ip.src(), client_port), &udp[8..]))
}

/// An IPv4 UDP packet with checksums filled in.
fn udp_packet(from: (Ipv4Addr, u16), to: (Ipv4Addr, u16), payload: &[u8]) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let len = 20 + udp_len;
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[6] = 0x40; // don't fragment
    p[8] = 64;
    p[9] = PROTO_UDP;
    p[12..16].copy_from_slice(&from.0.octets());
    p[16..20].copy_from_slice(&to.0.octets());
    let sum = ipv4_checksum(&p[..20]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p[20..22].copy_from_slice(&from.1.to_be_bytes());
    p[22..24].copy_from_slice(&to.1.to_be_bytes());
    p[24..26].copy_from_slice(&(udp_len as u16).to_be_bytes());
    p[28..].copy_from_slice(payload);
    let mut sum = ipv4_l4_checksum(from.0, to.0, PROTO_UDP, &p[20..]);
    if sum == 0 {
        sum = 0xffff;
    }
    p[26..28].copy_from_slice(&sum.to_be_bytes());
    p
}

#[cfg(test)]
mod tests {
    //! A WireGuard client (boringtun's `Tunn`, as wireguard-go would speak) against the
    //! gateways over loopback UDP. The lab test (`tests/gateway.rs`) runs the stock client.

    use super::*;
    use std::net::UdpSocket;

    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RData, RecordType};
    use vane_proto::api::Net;
    use vane_proto::stream::{AgentView, Member};

    const NET: u32 = 7;
    const GW_IP: Ipv4Addr = Ipv4Addr::new(10, 7, 0, 9);
    const RESOLVER: Ipv4Addr = Ipv4Addr::new(10, 7, 0, 254);

    fn net() -> NetConfig {
        NetConfig {
            id: NET,
            subnet: "10.7.0.0/24".parse().unwrap(),
            egress: false,
        }
    }

    fn names() -> dns::Names {
        let resolver = dns::Resolver::new(Vec::new());
        resolver.update(&AgentView {
            nets: vec![Net {
                id: NET,
                name: "red".into(),
                tenant: "t".into(),
                subnet: "10.7.0.0/24".parse().unwrap(),
                egress: false,
                created: 0,
            }],
            members: vec![Member {
                net: NET,
                ip: Ipv4Addr::new(10, 7, 0, 1),
                name: "web".into(),
                hostname: "web".into(),
                host: "h1".into(),
                host_id: 1,
                instance: "i1".into(),
                moving_to: None,
                gateway: false,
            }],
            ..AgentView::default()
        });
        resolver.names()
    }

    fn gateway(port: u32, client_key: [u8; 32]) -> GatewayPort {
        GatewayPort {
            port: PortId(port),
            net: net(),
            ip: GW_IP,
            resolver: RESOLVER,
            client_key,
            names_client: dns::Client {
                net: NET,
                net_name: "red".into(),
                egress: false,
                name: "laptop".into(),
                hostname: "laptop".into(),
                ip: GW_IP,
            },
        }
    }

    struct Client {
        tunn: Tunn,
        socket: UdpSocket,
        to: SocketAddr,
        buf: Vec<u8>,
    }

    impl Client {
        fn new(secret: [u8; 32], gateway_key: [u8; 32], to: SocketAddr) -> Client {
            let host_public = PublicKey::from(&StaticSecret::from(gateway_key));
            let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
            socket
                .set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            Client {
                tunn: Tunn::new(StaticSecret::from(secret), host_public, None, None, 1, None),
                socket,
                to,
                buf: vec![0; MAX_DATAGRAM + HANDSHAKE_INIT_LEN],
            }
        }

        /// Seals `packet` (starting a handshake if there is no session) and sends it.
        fn send(&mut self, packet: &[u8]) {
            if let TunnResult::WriteToNetwork(d) = self.tunn.encapsulate(packet, &mut self.buf) {
                self.socket.send_to(d, self.to).unwrap();
            }
        }

        /// The next packet the gateway sent, answering handshakes on the way; `None` when
        /// nothing comes.
        fn receive(&mut self) -> Option<Vec<u8>> {
            let mut datagram = vec![0; MAX_DATAGRAM];
            loop {
                let (n, from) = self.socket.recv_from(&mut datagram).ok()?;
                match self
                    .tunn
                    .decapsulate(Some(from.ip()), &datagram[..n], &mut self.buf)
                {
                    TunnResult::WriteToNetwork(d) => {
                        self.socket.send_to(d, from).unwrap();
                        while let TunnResult::WriteToNetwork(d) =
                            self.tunn.decapsulate(None, &[], &mut self.buf)
                        {
                            self.socket.send_to(d, from).unwrap();
                        }
                    }
                    TunnResult::WriteToTunnelV4(p, _) => return Some(p.to_vec()),
                    _ => {}
                }
            }
        }
    }

    /// Everything the gateways' socket has within `wait`, opened (as the switch's thread
    /// does, run by run): the packets for the switch.
    fn drain(gateways: &mut Gateways, wait: Duration) -> Vec<(PortId, Vec<u8>)> {
        let mut datagrams = vec![0; crate::underlay::MAX_DATAGRAM * vane_sys::udp::RECV_SLOTS];
        let mut received = crate::underlay::receptions();
        let mut out = vec![0; VNET_HDR_LEN + 65535];
        let mut packets = Vec::new();
        let until = Instant::now() + wait;
        while Instant::now() < until {
            let n = gateways.recv(&mut datagrams, &mut received);
            if n == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
            for (i, r) in received[..n].iter().enumerate() {
                for datagram in crate::underlay::datagrams_of(&mut datagrams, i, r) {
                    if let Opened::Packet { port, len } = gateways.open(datagram, r.from, &mut out)
                    {
                        packets.push((port, out[VNET_HDR_LEN..VNET_HDR_LEN + len].to_vec()));
                    }
                }
            }
            gateways.flush();
        }
        packets
    }

    fn bound(key: [u8; 32]) -> (Gateways, SocketAddr) {
        let gateways =
            Gateways::bind(Some("127.0.0.1:0".parse().unwrap()), 1472, key, names()).unwrap();
        let addr = gateways.socket.as_ref().unwrap().local_addr().unwrap();
        (gateways, addr)
    }

    fn ping(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
        let mut p = udp_packet((src, 4000), (dst, 5000), b"hello");
        p[9] = PROTO_UDP;
        p
    }

    #[test]
    fn a_client_with_its_key_reaches_the_switch_and_hears_back_from_it() {
        let (host_key, client_key) = ([1u8; 32], [2u8; 32]);
        let (mut gateways, addr) = bound(host_key);
        let client_public = *PublicKey::from(&StaticSecret::from(client_key)).as_bytes();
        let (gone, added) = gateways.apply(vec![gateway(40, client_public)]);
        assert!(gone.is_empty());
        assert_eq!(added.len(), 1);

        let mut client = Client::new(client_key, host_key, addr);
        let packet = ping(GW_IP, Ipv4Addr::new(10, 7, 0, 1));
        // The first packet waits in the client for the handshake, then goes.
        client.send(&packet);
        drain(&mut gateways, Duration::from_millis(100));
        assert!(client.receive().is_none(), "a handshake answer only");
        client.send(&packet);
        let got = drain(&mut gateways, Duration::from_millis(100));
        assert!(got.contains(&(PortId(40), packet.clone())), "{got:?}");

        // What the switch delivers to the port reaches the client; a partial checksum is
        // finished on the way.
        let reply = ping(Ipv4Addr::new(10, 7, 0, 1), GW_IP);
        let mut partial = reply.clone();
        partial[26..28].fill(0);
        let sum = crate::gateway::tests::pseudo_sum(&partial);
        partial[26..28].copy_from_slice(&sum.to_be_bytes());
        let mut framed = vec![0u8; VNET_HDR_LEN];
        VnetHdr::partial_for(&partial).unwrap().write(&mut framed);
        framed.extend_from_slice(&partial);
        gateways.send(PortId(40), &framed);
        gateways.flush();
        assert_eq!(client.receive().as_deref(), Some(&reply[..]));

        // Removed: cut at once.
        let (gone, _) = gateways.apply(Vec::new());
        assert_eq!(gone, vec![PortId(40)]);
        client.send(&packet);
        assert!(drain(&mut gateways, Duration::from_millis(100)).is_empty());
    }

    /// The pseudo-header sum a kernel leaves in a UDP packet whose checksum is partial.
    fn pseudo_sum(p: &[u8]) -> u16 {
        let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
        let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
        // The complement of the checksum over an empty segment of the same length is the
        // folded pseudo-header sum.
        let len = p.len() - 20;
        !ipv4_l4_checksum(src, dst, PROTO_UDP, &vec![0u8; len])
    }

    #[test]
    fn a_stranger_key_gets_no_answer() {
        let (host_key, client_key) = ([1u8; 32], [2u8; 32]);
        let (mut gateways, addr) = bound(host_key);
        let client_public = *PublicKey::from(&StaticSecret::from(client_key)).as_bytes();
        gateways.apply(vec![gateway(40, client_public)]);
        let mut stranger = Client::new([3u8; 32], host_key, addr);
        stranger.send(&ping(GW_IP, Ipv4Addr::new(10, 7, 0, 1)));
        assert!(drain(&mut gateways, Duration::from_millis(100)).is_empty());
        assert!(stranger.receive().is_none());
        // Garbage and a data packet with a made-up index: nothing either.
        let garbage = UdpSocket::bind("127.0.0.1:0").unwrap();
        garbage.send_to(&[4, 0, 0, 0, 1, 1, 0, 0], addr).unwrap();
        garbage.send_to(&[0xff; 200], addr).unwrap();
        assert!(drain(&mut gateways, Duration::from_millis(100)).is_empty());
    }

    /// A flood of handshake initiations from a key no gateway has, each with a valid MAC
    /// (anyone with a client configuration knows the host's public key): past the rate,
    /// the host answers with cookies, so it does no DH work for them.
    #[test]
    fn a_flood_of_handshakes_gets_cookies() {
        let (host_key, client_key) = ([1u8; 32], [2u8; 32]);
        let (mut gateways, addr) = bound(host_key);
        let client_public = *PublicKey::from(&StaticSecret::from(client_key)).as_bytes();
        gateways.apply(vec![gateway(40, client_public)]);
        let stranger = Client::new([3u8; 32], host_key, addr);
        let mut init = vec![0u8; 256];
        for _ in 0..300 {
            // A new initiation each time, as a flood would send.
            let mut tunn = Tunn::new(
                StaticSecret::from([3u8; 32]),
                PublicKey::from(&StaticSecret::from(host_key)),
                None,
                None,
                1,
                None,
            );
            if let TunnResult::WriteToNetwork(d) =
                tunn.format_handshake_initiation(&mut init, false)
            {
                stranger.socket.send_to(d, addr).unwrap();
            }
        }
        drain(&mut gateways, Duration::from_millis(200));
        let mut datagram = [0u8; 512];
        let mut cookies = 0;
        while let Ok((n, _)) = stranger.socket.recv_from(&mut datagram) {
            assert_eq!((n, datagram[0]), (COOKIE_REPLY_LEN, 3), "only cookies");
            cookies += 1;
        }
        assert!(cookies >= 100, "{cookies} cookies");
    }

    #[test]
    fn the_client_resolves_its_net_at_its_resolver() {
        let (host_key, client_key) = ([1u8; 32], [2u8; 32]);
        let (mut gateways, addr) = bound(host_key);
        let client_public = *PublicKey::from(&StaticSecret::from(client_key)).as_bytes();
        gateways.apply(vec![gateway(40, client_public)]);
        let mut client = Client::new(client_key, host_key, addr);

        let ask = |name: &str| {
            let mut q = Message::query();
            q.metadata.id = 77;
            q.metadata.recursion_desired = true;
            q.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
            udp_packet((GW_IP, 3333), (RESOLVER, 53), &q.to_vec().unwrap())
        };
        client.send(&ask("web.red."));
        drain(&mut gateways, Duration::from_millis(100));
        client.receive();
        client.send(&ask("web.red."));
        let switched = drain(&mut gateways, Duration::from_millis(100));
        assert!(
            switched.is_empty(),
            "a query stays with the resolver: {switched:?}"
        );
        let reply = client.receive().expect("an answer");
        assert_eq!(&reply[12..16], &RESOLVER.octets());
        assert_eq!(u16::from_be_bytes([reply[20], reply[21]]), 53);
        assert_eq!(u16::from_be_bytes([reply[22], reply[23]]), 3333);
        let answer = Message::from_vec(&reply[28..]).unwrap();
        let ips: Vec<_> = answer
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect();
        assert_eq!(ips, vec![Ipv4Addr::new(10, 7, 0, 1)]);

        // A query from another source address than the gateway's goes to the switch, which
        // refuses a forged source.
        let mut forged = ask("web.red.");
        forged[12..16].copy_from_slice(&[10, 7, 0, 50]);
        let mut sum_fixed = forged.clone();
        sum_fixed[10..12].fill(0);
        let sum = ipv4_checksum(&sum_fixed[..20]);
        forged[10..12].copy_from_slice(&sum.to_be_bytes());
        client.send(&forged);
        assert_eq!(drain(&mut gateways, Duration::from_millis(100)).len(), 1);
    }
}
