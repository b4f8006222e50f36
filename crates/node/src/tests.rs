//! Two nodes talking through memory in virtual time: handshakes, waiting packets, the
//! directory's lookups, timers driven by `poll_timeout`, roaming. No root, no sockets: the
//! "underlay" is each node's list of datagrams sent, which a test delivers, drops or
//! redirects.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use vane_switch::{Location, NetConfig, PortId, SwitchConfig};
use vane_tunnel::Keypair;
use vane_wire::vnet::{VnetHdr, VNET_HDR_LEN};
use vane_wire::{ipv4_l4_checksum, Ipv4Packet, PROTO_UDP};

use crate::*;

/// What a node wrote, kept in memory.
#[derive(Default)]
struct Memory {
    batch: Vec<u8>,
    to: Option<SocketAddr>,
    sent: Vec<(SocketAddr, Vec<u8>)>,
    ports: Vec<(PortId, Vec<u8>)>,
}

impl Io for Memory {
    fn slot(&mut self, to: SocketAddr, len: usize) -> &mut [u8] {
        if self.batch.len() < len {
            self.batch.resize(len, 0);
        }
        self.to = Some(to);
        &mut self.batch[..len]
    }

    fn commit(&mut self, len: usize) {
        let to = self.to.take().expect("a slot before a commit");
        self.sent.push((to, self.batch[..len].to_vec()));
    }

    fn send_now(&mut self, datagram: &[u8], to: SocketAddr) {
        self.sent.push((to, datagram.to_vec()));
    }

    fn write_port(&mut self, port: PortId, packet: &[u8]) {
        self.ports.push((port, packet.to_vec()));
    }

    fn write_egress(&mut self, _packet: &[u8]) {
        panic!("nothing in these tests goes out through egress");
    }
}

const NET: NetConfig = NetConfig {
    id: 1,
    subnet: ipnet::Ipv4Net::new_assert(Ipv4Addr::new(10, 1, 0, 0), 24),
    egress: false,
};

/// Host `i` (1 or 2): its underlay address, its instance's address and port.
fn addr(i: u8) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, i], 7947))
}
fn ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 1, 0, i)
}
fn port(i: u8) -> PortId {
    PortId(u32::from(i))
}
fn keys(i: u8) -> Keypair {
    Keypair::from_private([i; 32])
}

struct Host {
    node: Node,
    io: Memory,
}

/// Hosts 1 and 2, each with one instance (10.1.0.1 and 10.1.0.2) in net 1, in virtual
/// time. `known` says whether each view holds the other's instance already.
struct Pair {
    h: [Host; 2],
    now: Instant,
}

impl Pair {
    fn new(plaintext: bool, known: bool) -> Pair {
        let h = [1u8, 2].map(|i| {
            let mut node = Node::new(NodeConfig {
                switch: SwitchConfig::default(),
                keypair: keys(i),
                tunnel: vane_tunnel::Config::default(),
                max_inner_packet: 1400,
            });
            node.set_identity(u32::from(i), plaintext, "10.0.0.0/8".parse().unwrap());
            node.attach_port(port(i), NET, ip(i), None, false).unwrap();
            let other = 3 - i;
            node.apply_peers(vec![PeerInfo {
                id: u32::from(other),
                name: format!("h{other}"),
                locator: Some(addr(other)),
                public_key: keys(other).public,
            }]);
            // The directory places this host's instance here, and the other's there if
            // `known` (else it is looked up).
            let mut members = vec![(1, ip(i), Location::Local(port(i)))];
            if known {
                members.push((1, ip(other), Location::Remote(u32::from(other))));
            }
            node.apply_view(vec![NET], members, vec![]);
            Host {
                node,
                io: Memory::default(),
            }
        });
        Pair {
            h,
            now: Instant::now(),
        }
    }

    /// Instance of host `from` (1 or 2) sends a UDP datagram with `payload` to `to`.
    fn send(&mut self, from: u8, to: Ipv4Addr, payload: &[u8]) {
        let mut read = udp(ip(from), to, payload);
        let h = &mut self.h[usize::from(from - 1)];
        h.node
            .handle_device_packet(&mut h.io, Source::Port(port(from)), &mut read, self.now);
    }

    /// Delivers every datagram in flight, both ways, until none is left; `lose` may drop
    /// some (true: lost). Returns how many were delivered.
    fn exchange(&mut self, mut lose: impl FnMut(&[u8]) -> bool) -> usize {
        let mut delivered = 0;
        loop {
            let mut moved = false;
            for i in 0..2 {
                for (to, mut d) in std::mem::take(&mut self.h[i].io.sent) {
                    let from = addr(i as u8 + 1);
                    let j = [addr(1), addr(2)].iter().position(|a| *a == to);
                    let Some(j) = j else { continue };
                    moved = true;
                    if lose(&d) {
                        continue;
                    }
                    delivered += 1;
                    let h = &mut self.h[j];
                    h.node.handle_datagram(&mut h.io, &mut d, from, self.now);
                    h.node.flush_coalesced(&mut h.io);
                }
            }
            if !moved {
                return delivered;
            }
        }
    }

    /// Lets time pass until the earlier of `limit` and host `i`'s next timer, and runs it.
    fn wait(&mut self, i: usize, limit: Duration) -> Option<Instant> {
        let due = self.h[i].node.poll_timeout();
        let until = due.map_or(self.now + limit, |d| d.min(self.now + limit));
        self.now = self.now.max(until);
        let h = &mut self.h[i];
        h.node.handle_timeout(&mut h.io, self.now);
        due
    }

    /// The UDP payloads host `i`'s instance received.
    fn received(&mut self, i: u8) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.h[usize::from(i - 1)].io.ports)
            .into_iter()
            .map(|(p, packet)| {
                assert_eq!(p, port(i));
                packet[VNET_HDR_LEN + 28..].to_vec()
            })
            .collect()
    }
}

/// A UDP packet from `src` to `dst` behind a plain virtio header, checksums filled in.
fn udp(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let total = 28 + payload.len();
    let mut p = vec![0u8; VNET_HDR_LEN + total];
    VnetHdr::PLAIN.write(&mut p);
    let ip_bytes = &mut p[VNET_HDR_LEN..];
    ip_bytes[0] = 0x45;
    ip_bytes[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    ip_bytes[8] = 64;
    ip_bytes[9] = PROTO_UDP;
    ip_bytes[12..16].copy_from_slice(&src.octets());
    ip_bytes[16..20].copy_from_slice(&dst.octets());
    ip_bytes[20..22].copy_from_slice(&4000u16.to_be_bytes());
    ip_bytes[22..24].copy_from_slice(&5000u16.to_be_bytes());
    ip_bytes[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    ip_bytes[28..].copy_from_slice(payload);
    let c = ipv4_l4_checksum(src, dst, PROTO_UDP, &ip_bytes[20..]);
    ip_bytes[26..28].copy_from_slice(&c.to_be_bytes());
    Ipv4Packet::new_checked(&mut ip_bytes[..])
        .unwrap()
        .fill_checksum();
    p
}

/// A handshake initiation (with either cipher).
fn is_initiation(d: &[u8]) -> bool {
    [
        vane_tunnel::TYPE_INITIATION,
        vane_tunnel::TYPE_INITIATION_AESGCM,
    ]
    .contains(&d[0])
}

#[test]
fn a_packet_waits_for_the_handshake_and_arrives_then_replies_need_none() {
    let mut p = Pair::new(false, true);
    p.send(1, ip(2), b"hello");
    assert_eq!(p.h[0].io.sent.len(), 1, "only the initiation leaves");
    assert!(is_initiation(&p.h[0].io.sent[0].1));
    // Initiation, response, the initiator's confirmation, then the packet that waited.
    assert_eq!(p.exchange(|_| false), 4);
    assert_eq!(p.received(2), [b"hello".to_vec()]);
    p.send(2, ip(1), b"hi back");
    assert_eq!(p.exchange(|_| false), 1, "the session is there: data only");
    assert_eq!(p.received(1), [b"hi back".to_vec()]);
}

#[test]
fn a_lost_initiation_is_sent_again_when_the_node_said_it_would_be() {
    let mut p = Pair::new(false, true);
    p.send(1, ip(2), b"hello");
    assert_eq!(p.exchange(is_initiation), 0, "the initiation is lost");
    let start = p.now;
    let due = p.wait(0, Duration::from_secs(60)).expect("a retry is due");
    assert_eq!(due, start + vane_tunnel::Config::default().handshake_retry);
    assert_eq!(
        p.exchange(|_| false),
        4,
        "retry, response, confirmation, the packet"
    );
    assert_eq!(p.received(2), [b"hello".to_vec()]);
}

#[test]
fn packets_waiting_for_an_unreachable_host_are_dropped_after_handshake_wait() {
    let mut p = Pair::new(false, true);
    p.send(1, ip(2), b"hello");
    let start = p.now;
    // The retries come and go unanswered; the packet's own expiry is one of the timers.
    while p.now < start + HANDSHAKE_WAIT {
        p.wait(0, Duration::from_secs(60))
            .expect("timers while a packet waits");
        p.h[0].io.sent.clear();
    }
    assert_eq!(p.h[0].node.counters().handshake_queue_dropped, 1);
}

#[test]
fn an_address_the_view_lacks_is_looked_up_and_its_packets_replayed() {
    let mut p = Pair::new(false, false);
    // Host 2 knows where host 1's instance is (it checks who speaks for whom).
    let members = vec![
        (1, ip(1), Location::Remote(1)),
        (1, ip(2), Location::Local(port(2))),
    ];
    p.h[1].node.apply_view(vec![NET], members, vec![]);
    p.send(1, ip(2), b"one");
    p.send(1, ip(2), b"two");
    assert_eq!(p.h[0].node.poll_lookup(), Some((1, ip(2))));
    assert_eq!(p.h[0].node.poll_lookup(), None, "one lookup per address");
    assert!(p.h[0].io.sent.is_empty());
    let h = &mut p.h[0];
    h.node
        .resolved(&mut h.io, 1, ip(2), Some(Location::Remote(2)), p.now);
    p.exchange(|_| false);
    assert_eq!(p.received(2), [b"one".to_vec(), b"two".to_vec()]);
}

#[test]
fn an_attached_port_receives_once_the_directory_places_its_member_here() {
    let mut p = Pair::new(false, true);
    // Host 1's instance is attached, but the directory places it elsewhere for now (a
    // copy restored for a migration that has not moved it yet).
    let there = (1, ip(2), Location::Remote(2));
    p.h[0].node.apply_members(vec![there]);
    p.send(2, ip(1), b"early");
    p.exchange(|_| false);
    assert!(
        p.received(1).is_empty(),
        "nothing for a member not placed here"
    );
    p.h[0]
        .node
        .apply_members(vec![there, (1, ip(1), Location::Local(port(1)))]);
    p.send(2, ip(1), b"placed");
    p.exchange(|_| false);
    assert_eq!(p.received(1), [b"placed".to_vec()]);
}

#[test]
fn what_is_sent_to_a_moving_member_waits_for_where_it_runs_again() {
    let mut p = Pair::new(false, true);
    let own = (1, ip(1), Location::Local(port(1)));
    let moving = Location::Moving { from: 2, to: 2 };
    p.h[0].node.apply_members(vec![own, (1, ip(2), moving)]);
    p.send(1, ip(2), b"held");
    assert!(p.h[0].io.sent.is_empty(), "nothing goes to a frozen copy");
    assert_eq!(p.h[0].node.poll_lookup(), Some((1, ip(2))));
    // The controller answers once it runs again.
    let h = &mut p.h[0];
    h.node
        .resolved(&mut h.io, 1, ip(2), Some(Location::Remote(2)), p.now);
    p.exchange(|_| false);
    assert_eq!(p.received(2), [b"held".to_vec()]);
}

#[test]
fn nobody_at_an_address_is_remembered_for_a_while_then_asked_again() {
    let mut p = Pair::new(false, false);
    p.send(1, ip(9), b"anyone?");
    assert_eq!(p.h[0].node.poll_lookup(), Some((1, ip(9))));
    let h = &mut p.h[0];
    h.node.resolved(&mut h.io, 1, ip(9), None, p.now);
    p.send(1, ip(9), b"anyone?");
    assert_eq!(
        p.h[0].node.poll_lookup(),
        None,
        "remembered: not asked again"
    );
    let due = p.wait(0, Duration::from_secs(60)).expect("the memory ends");
    assert!(due <= p.now);
    p.send(1, ip(9), b"anyone?");
    assert_eq!(p.h[0].node.poll_lookup(), Some((1, ip(9))));
    let c = p.h[0].node.counters();
    assert_eq!((c.lookups, c.lookup_misses), (2, 1));
}

#[test]
fn a_peer_that_moved_on_the_underlay_is_followed() {
    let mut p = Pair::new(false, true);
    p.send(1, ip(2), b"hello");
    p.exchange(|_| false);
    p.received(2);
    // Host 2's reply comes from a new address: host 1 sends there from now on.
    let moved = SocketAddr::from(([192, 0, 2, 22], 7947));
    p.send(2, ip(1), b"from afar");
    let (_, mut d) = p.h[1].io.sent.pop().unwrap();
    let h = &mut p.h[0];
    h.node.handle_datagram(&mut h.io, &mut d, moved, p.now);
    assert_eq!(p.received(1), [b"from afar".to_vec()]);
    p.send(1, ip(2), b"follow");
    assert_eq!(p.h[0].io.sent.last().unwrap().0, moved);
}

#[test]
fn an_idle_node_has_no_timer_and_a_plaintext_pair_needs_no_handshake() {
    let p = Pair::new(false, true);
    assert_eq!(p.h[0].node.poll_timeout(), None);
    let mut p = Pair::new(true, true);
    p.send(1, ip(2), b"in the clear");
    assert_eq!(p.exchange(|_| false), 1);
    assert_eq!(p.received(2), [b"in the clear".to_vec()]);
}

#[test]
fn a_partial_checksum_said_to_be_outside_the_l4_checksum_field_is_dropped() {
    let mut p = Pair::new(false, true);
    // The instance's root writes the virtio header: a partial checksum "at" the source
    // address would have the switch check other bytes than the ones that leave.
    let mut read = udp(ip(1), ip(2), b"spoof");
    VnetHdr {
        flags: vane_wire::vnet::F_NEEDS_CSUM,
        gso_type: 0,
        hdr_len: 0,
        gso_size: 0,
        csum_start: 0,
        csum_offset: 12,
    }
    .write(&mut read);
    let h = &mut p.h[0];
    h.node
        .handle_device_packet(&mut h.io, Source::Port(port(1)), &mut read, p.now);
    assert!(h.io.sent.is_empty() && h.io.ports.is_empty());
    assert_eq!(h.node.counters().drop_bad_offload, 1);
    // The same packet with its header pointing at its UDP checksum goes.
    let mut read = udp(ip(1), ip(2), b"fine");
    VnetHdr::partial_for(&read[VNET_HDR_LEN..])
        .unwrap()
        .write(&mut read);
    let h = &mut p.h[0];
    h.node
        .handle_device_packet(&mut h.io, Source::Port(port(1)), &mut read, p.now);
    assert_eq!(h.io.sent.len(), 1, "an initiation for it");
}
