//! Untrusted input: everything one host's data path (`vane_node::Node`) takes in: what
//! instances write to their devices (a virtio header and a packet, any bytes: a root
//! program in an instance chooses both), what arrives from outside at the egress device,
//! and datagrams on the underlay socket (any bytes from the peer host's address or a
//! stranger's, or a datagram the peer sent, altered), in an encrypted or a plaintext
//! cluster, with time passing and the directory answering lookups. Two nodes, each with an
//! instance in each of two nets, run in memory and deliver to each other what they send.
//! Input: a mode byte, then records (`vane_fuzz::Records`). Asserts: no panic; every packet
//! written to a device is a virtio header and an IPv4 packet for that device's own
//! address; a packet an instance wrote reaches another device or the peer host only with
//! the instance's own source address; what goes out through egress has an egress address
//! as its source and a destination outside the global space; a packet from net A reaches
//! net B only as the policies allow; every datagram sent is a tunnel message (a plaintext
//! one in a plaintext cluster) no longer than its slot; and in an encrypted cluster nothing
//! but the peer's own datagrams, unaltered, reaches a device.
#![no_main]

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use vane_fuzz::Records;
use vane_node::{Io, Node, NodeConfig, PeerInfo, Source};
use vane_switch::{L4Proto, Location, NetConfig, PolicyRule, PortId, SwitchConfig};
use vane_tunnel::{message_type, Keypair};
use vane_wire::overlay::PLAIN_TYPE;
use vane_wire::vnet::{VnetHdr, VNET_HDR_LEN};
use vane_wire::{Ipv4Packet, L4Ports, PROTO_ICMP, PROTO_TCP};

const NET_A: NetConfig = NetConfig {
    id: 1,
    subnet: ipnet::Ipv4Net::new_assert(Ipv4Addr::new(10, 1, 0, 0), 24),
    egress: true,
};
const NET_B: NetConfig = NetConfig {
    id: 2,
    subnet: ipnet::Ipv4Net::new_assert(Ipv4Addr::new(10, 2, 0, 0), 24),
    egress: false,
};

fn keys(i: usize) -> Keypair {
    static KEYS: OnceLock<[Keypair; 2]> = OnceLock::new();
    KEYS.get_or_init(|| [1u8, 2].map(|k| Keypair::from_private([k; 32])))[i].clone()
}

/// Host `i` (0 or 1) is host id `i + 1` at this underlay address.
fn underlay(i: usize) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, i as u8 + 1], 7947))
}

/// The instances of host `i`: port, net and address; the first in net A, the second in B.
fn instances(i: usize) -> [(PortId, NetConfig, Ipv4Addr); 2] {
    let n = i as u8 + 1;
    [
        (PortId(u32::from(n)), NET_A, Ipv4Addr::new(10, 1, 0, n)),
        (PortId(u32::from(n) + 2), NET_B, Ipv4Addr::new(10, 2, 0, n)),
    ]
}

/// What a node wrote, kept for the checks.
#[derive(Default)]
struct Memory {
    batch: Vec<u8>,
    slot: Option<(SocketAddr, usize)>,
    sent: Vec<(SocketAddr, Vec<u8>)>,
    ports: Vec<(PortId, Vec<u8>)>,
    egress: Vec<Vec<u8>>,
}

impl Io for Memory {
    fn slot(&mut self, to: SocketAddr, len: usize) -> &mut [u8] {
        if self.batch.len() < len {
            self.batch.resize(len, 0);
        }
        self.slot = Some((to, len));
        &mut self.batch[..len]
    }

    fn commit(&mut self, len: usize) {
        let (to, room) = self.slot.take().expect("a slot before a commit");
        assert!(len <= room, "a datagram of {len} bytes in a slot of {room}");
        self.sent.push((to, self.batch[..len].to_vec()));
    }

    fn send_now(&mut self, datagram: &[u8], to: SocketAddr) {
        self.sent.push((to, datagram.to_vec()));
    }

    fn write_port(&mut self, port: PortId, packet: &[u8]) {
        self.ports.push((port, packet.to_vec()));
    }

    fn write_egress(&mut self, packet: &[u8]) {
        self.egress.push(packet.to_vec());
    }
}

struct Host {
    node: Node,
    io: Memory,
    /// The addresses of this host's instances, by port.
    ports: HashMap<PortId, Ipv4Addr>,
}

struct Pair {
    h: [Host; 2],
    plaintext: bool,
    now: Instant,
    /// Every datagram each host sent, to tell the peer's own from anything else.
    sent_by: [Vec<Vec<u8>>; 2],
    /// How many of each host's datagrams in flight are in `sent_by` already.
    recorded: [usize; 2],
    /// Protocol and ports of every packet an instance of net B wrote towards net A: what
    /// replies from A to B may answer.
    b_to_a: HashSet<(u8, u16, u16)>,
}

impl Pair {
    fn new(plaintext: bool) -> Pair {
        let policies = vec![
            PolicyRule {
                from: NET_A.id,
                to: NET_B.id,
                port: Some((L4Proto::Tcp, 80)),
            },
            PolicyRule {
                from: NET_B.id,
                to: NET_A.id,
                port: None,
            },
        ];
        let h = [0, 1].map(|i| {
            let mut node = Node::new(NodeConfig {
                switch: SwitchConfig {
                    max_flows: 64,
                    ..SwitchConfig::default()
                },
                keypair: keys(i),
                tunnel: vane_tunnel::Config::default(),
                max_inner_packet: 1400,
            });
            node.set_identity(i as u32 + 1, plaintext, "10.0.0.0/8".parse().unwrap());
            let mut ports = HashMap::new();
            for (k, (port, net, ip)) in instances(i).into_iter().enumerate() {
                // One instance with a bandwidth limit that a few packets exceed.
                let rate = (k == 1).then_some(1_000_000);
                node.attach_port(port, net, ip, rate, false).unwrap();
                ports.insert(port, ip);
            }
            let other = 1 - i;
            node.apply_peers(vec![PeerInfo {
                id: other as u32 + 1,
                name: format!("h{}", other + 1),
                locator: Some(underlay(other)),
                public_key: keys(other).public,
            }]);
            let members = instances(i)
                .map(|(port, net, ip)| (net.id, ip, Location::Local(port)))
                .into_iter()
                .chain(
                    instances(other)
                        .map(|(_, net, ip)| (net.id, ip, Location::Remote(other as u32 + 1))),
                )
                .collect();
            node.apply_view(vec![NET_A, NET_B], members, policies.clone());
            Host {
                node,
                io: Memory::default(),
                ports,
            }
        });
        Pair {
            h,
            plaintext,
            now: Instant::now(),
            sent_by: Default::default(),
            recorded: [0; 2],
            b_to_a: HashSet::new(),
        }
    }

    /// Checks and clears what host `i` wrote to its devices, and keeps what it sent. A
    /// packet that one of its instances wrote (`from_instance`, with its address) may only
    /// have left with that source address.
    fn check_output(&mut self, i: usize, from_instance: Option<Ipv4Addr>) {
        let h = &mut self.h[i];
        for (port, bytes) in std::mem::take(&mut h.io.ports) {
            let ip = packet_of(&bytes);
            let own = h
                .ports
                .get(&port)
                .expect("written to a port of another host");
            assert_eq!(
                ip.dst(),
                *own,
                "written to a device that does not have the address"
            );
            // An ICMP error goes back to the sender, from the destination it could not reach.
            let answered = from_instance == Some(ip.dst());
            if let Some(src) = from_instance.filter(|_| !answered) {
                assert_eq!(ip.src(), src, "a spoofed source reached a device");
            }
            if NET_A.subnet.contains(&ip.src()) && NET_B.subnet.contains(&ip.dst()) {
                assert!(
                    allowed_a_to_b(&ip, &self.b_to_a),
                    "no policy lets {ip:?} through"
                );
            }
        }
        for bytes in std::mem::take(&mut h.io.egress) {
            let ip = packet_of(&bytes);
            let egress_space: ipnet::Ipv4Net = "100.64.0.0/10".parse().unwrap();
            let global_space: ipnet::Ipv4Net = "10.0.0.0/8".parse().unwrap();
            assert!(egress_space.contains(&ip.src()), "egress from {}", ip.src());
            assert!(!global_space.contains(&ip.dst()), "egress to {}", ip.dst());
        }
        for (_, d) in &h.io.sent[self.recorded[i]..] {
            if self.plaintext {
                assert_eq!(
                    d.first(),
                    Some(&PLAIN_TYPE),
                    "a plaintext cluster sent {d:?}"
                );
            } else {
                assert!(
                    message_type(d).is_some(),
                    "sent a datagram of no tunnel type"
                );
            }
            self.sent_by[i].push(d.clone());
        }
        self.recorded[i] = h.io.sent.len();
    }

    fn device(&mut self, body: &[u8]) {
        let Some((&sel, read)) = body.split_first() else {
            return;
        };
        let i = usize::from(sel & 1);
        let mut read = read.to_vec();
        let (source, sender) = match (sel >> 1) % 3 {
            2 => (Source::Egress, None),
            k => {
                let (port, _, ip) = instances(i)[usize::from(k)];
                (Source::Port(port), Some(ip))
            }
        };
        if let Some(ip) = sender
            .filter(|ip| NET_B.subnet.contains(ip))
            .and_then(|_| Ipv4Packet::new_checked(read.get(VNET_HDR_LEN..)?).ok())
            .filter(|ip| NET_A.subnet.contains(&ip.dst()))
        {
            let ports = L4Ports::of(&ip);
            self.b_to_a.insert((ip.protocol(), ports.src, ports.dst));
        }
        let h = &mut self.h[i];
        let before = h.io.sent.len();
        h.node
            .handle_device_packet(&mut h.io, source, &mut read, self.now);
        self.check_output(i, sender);
        // What the instance sent the peer host carries its address too.
        if let Some(src) = sender {
            let h = &self.h[i];
            for (to, d) in &h.io.sent[before..] {
                if *to == underlay(1 - i) && self.plaintext && d.len() >= 8 + 12 + 20 {
                    let ip = Ipv4Packet::new_checked(&d[20..]);
                    if let Ok(ip) = ip {
                        assert_eq!(ip.src(), src, "a spoofed source left for the peer");
                    }
                }
            }
        }
    }

    /// Host `i` gets `d` from `from`; `genuine`: it is a datagram the peer sent, unaltered.
    fn datagram(&mut self, i: usize, mut d: Vec<u8>, from: SocketAddr, genuine: bool) {
        // Segments merged from earlier datagrams are written first, on their own account.
        let h = &mut self.h[i];
        h.node.flush_coalesced(&mut h.io);
        self.check_output(i, None);
        let h = &mut self.h[i];
        h.node.handle_datagram(&mut h.io, &mut d, from, self.now);
        h.node.flush_coalesced(&mut h.io);
        let reached = !self.h[i].io.ports.is_empty();
        // In plaintext the source address is all a datagram is judged by.
        let trusted = genuine || (self.plaintext && from == underlay(1 - i));
        assert!(
            trusted || !reached,
            "a datagram the peer never sent reached a device"
        );
        self.check_output(i, None);
    }

    /// Delivers what both hosts sent to each other until neither sends more (bounded).
    fn exchange(&mut self) {
        for _ in 0..8 {
            let mut moved = false;
            for i in 0..2 {
                self.recorded[i] = 0;
                for (to, d) in std::mem::take(&mut self.h[i].io.sent) {
                    if to == underlay(1 - i) {
                        moved = true;
                        self.datagram(1 - i, d, underlay(i), true);
                    }
                }
            }
            if !moved {
                return;
            }
        }
    }

    /// Takes the `k`th datagram host `i` sent, applies `edits` (position, XOR value), and
    /// delivers it to the other host.
    fn altered(&mut self, body: &[u8]) {
        let [sel, k, edits @ ..] = body else {
            return;
        };
        let i = usize::from(sel & 1);
        let Some(mut d) = self.sent_by[i]
            .get(usize::from(*k) % self.sent_by[i].len().max(1))
            .cloned()
        else {
            return;
        };
        let original = d.clone();
        for e in edits.chunks_exact(3) {
            if let Some(b) =
                d.get_mut(usize::from(u16::from_be_bytes([e[0], e[1]])) % original.len().max(1))
            {
                *b ^= e[2];
            }
        }
        let genuine = d == original;
        self.datagram(1 - i, d, underlay(i), genuine);
    }

    /// A datagram of any bytes to a host, from its peer's address or a stranger's.
    fn raw(&mut self, body: &[u8]) {
        let Some((&sel, d)) = body.split_first() else {
            return;
        };
        let i = usize::from(sel & 1);
        let from = if sel & 2 == 0 {
            underlay(1 - i)
        } else {
            SocketAddr::from(([198, 51, 100, 66], 7947))
        };
        let genuine = self.sent_by[1 - i].iter().any(|s| s == d);
        self.datagram(i, d.to_vec(), from, genuine);
    }

    fn advance(&mut self, body: &[u8]) {
        let ms = match body {
            [a, b, ..] => u64::from(u16::from_be_bytes([*a, *b])),
            _ => 1000,
        };
        self.now += Duration::from_millis(ms);
        for i in 0..2 {
            let h = &mut self.h[i];
            if h.node.poll_timeout().is_some_and(|t| t <= self.now) {
                h.node.handle_timeout(&mut h.io, self.now);
            }
            let _ = h.node.port_delay(PortId(i as u32 + 3), self.now);
            self.check_output(i, None);
        }
    }

    /// Answers the directory's lookups: where the address is, per `sel`.
    fn directory(&mut self, body: &[u8]) {
        let sel = body.first().copied().unwrap_or(0);
        for i in 0..2 {
            let h = &mut self.h[i];
            while let Some((net, ip)) = h.node.poll_lookup() {
                let location = match sel % 3 {
                    0 => None,
                    k => Some(Location::Remote(u32::from(k))),
                };
                h.node.resolved(&mut h.io, net, ip, location, self.now);
            }
            // Packets that waited were an instance's: their source is checked on the way.
            self.check_output(i, None);
        }
    }

    fn hold(&mut self, body: &[u8]) {
        let sel = body.first().copied().unwrap_or(0);
        let i = usize::from(sel & 1);
        let (port, _, _) = instances(i)[usize::from(sel >> 1 & 1)];
        let h = &mut self.h[i];
        h.node.hold_port(&mut h.io, port, sel & 4 != 0);
        self.check_output(i, None);
    }
}

/// Whether the policies let a packet from net A to net B through: TCP to port 80 (the rule
/// A -> B), a reply to what an instance of B sent towards A (the rule B -> A, any), or an
/// ICMP error the node itself sends back to a sender whose packet was too large.
fn allowed_a_to_b(ip: &Ipv4Packet<&[u8]>, b_to_a: &HashSet<(u8, u16, u16)>) -> bool {
    let ports = L4Ports::of(ip);
    (ip.protocol() == PROTO_TCP && ports.dst == 80)
        || b_to_a.contains(&(ip.protocol(), ports.dst, ports.src))
        || (ip.protocol() == PROTO_ICMP && ports.icmp_type == Some(3))
}

/// The IPv4 packet behind the virtio header of what was written to a device.
fn packet_of(bytes: &[u8]) -> Ipv4Packet<&[u8]> {
    assert!(VnetHdr::parse(bytes).is_some(), "no virtio header");
    Ipv4Packet::new_checked(&bytes[VNET_HDR_LEN..]).expect("an IPv4 packet written")
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut pair = Pair::new(mode & 1 == 1);
    for (tag, body) in Records::new(rest) {
        match tag % 7 {
            0 => pair.device(body),
            1 => pair.exchange(),
            2 => pair.altered(body),
            3 => pair.raw(body),
            4 => pair.advance(body),
            5 => pair.directory(body),
            _ => pair.hold(body),
        }
    }
    pair.exchange();
});
