//! Behaviour of the switch, driven with hand-built packets and virtual time.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use vane_wire::{ipv4_checksum, ipv4_l4_checksum, Ipv4Packet, PROTO_ICMP, PROTO_TCP, PROTO_UDP};

use crate::*;

const NET_A: NetId = 1;
const NET_B: NetId = 2;

const A1: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
const A2: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
const B1: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 1);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);

const PA1: PortId = PortId(0);
const PA2: PortId = PortId(1);
const PB1: PortId = PortId(2);

fn net(id: NetId, subnet: &str, egress: bool) -> NetConfig {
    NetConfig {
        id,
        subnet: subnet.parse().unwrap(),
        egress,
    }
}

/// An IPv4 packet around `l4`, with correct IP and TCP/UDP checksums.
fn ipv4(proto: u8, src: Ipv4Addr, dst: Ipv4Addr, l4: &[u8]) -> Vec<u8> {
    let total = 20 + l4.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = proto;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p[20..].copy_from_slice(l4);
    let mut pkt = Ipv4Packet::new_checked(&mut p[..]).unwrap();
    pkt.fill_checksum();
    if let Some(at) = l4_checksum_at(proto) {
        let c = ipv4_l4_checksum(src, dst, proto, &p[20..]);
        p[20 + at..22 + at].copy_from_slice(&c.to_be_bytes());
    }
    p
}

fn l4_checksum_at(proto: u8) -> Option<usize> {
    match proto {
        PROTO_TCP => Some(16),
        PROTO_UDP => Some(6),
        _ => None,
    }
}

fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let mut seg = vec![0u8; 20];
    seg[0..2].copy_from_slice(&sport.to_be_bytes());
    seg[2..4].copy_from_slice(&dport.to_be_bytes());
    seg[12] = 0x50;
    seg[13] = 0x02;
    seg.extend_from_slice(b"hello");
    ipv4(PROTO_TCP, src, dst, &seg)
}

fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let mut d = vec![0u8; 8];
    d[0..2].copy_from_slice(&sport.to_be_bytes());
    d[2..4].copy_from_slice(&dport.to_be_bytes());
    d[4..6].copy_from_slice(&11u16.to_be_bytes());
    d.extend_from_slice(b"dns");
    ipv4(PROTO_UDP, src, dst, &d)
}

fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr, reply: bool, ident: u16) -> Vec<u8> {
    let mut m = vec![if reply { 0 } else { 8 }, 0, 0, 0, 0, 0, 0, 1];
    m[4..6].copy_from_slice(&ident.to_be_bytes());
    m.extend_from_slice(b"ping");
    let c = ipv4_checksum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    ipv4(PROTO_ICMP, src, dst, &m)
}

/// Whether both checksums of `p` equal a full recomputation.
fn checksums_ok(p: &[u8]) -> bool {
    let pkt = Ipv4Packet::new_checked(p).unwrap();
    if !pkt.verify_checksum() {
        return false;
    }
    let Some(at) = l4_checksum_at(pkt.protocol()) else {
        return true;
    };
    let mut seg = pkt.payload().to_vec();
    let stored = u16::from_be_bytes([seg[at], seg[at + 1]]);
    seg[at..at + 2].fill(0);
    stored == ipv4_l4_checksum(pkt.src(), pkt.dst(), pkt.protocol(), &seg)
}

fn src_of(p: &[u8]) -> Ipv4Addr {
    Ipv4Packet::new_checked(p).unwrap().src()
}

fn dst_of(p: &[u8]) -> Ipv4Addr {
    Ipv4Packet::new_checked(p).unwrap().dst()
}

/// Attaches `port` and makes it the member for `(net, ip)`, as the directory does once it
/// places the instance on this host.
fn join(sw: &mut Switch, port: PortId, net: NetId, ip: Ipv4Addr) {
    sw.attach_port(port, net, ip).unwrap();
    sw.set_member(net, ip, Location::Local(port));
}

/// Net A (10.1/16, egress) with local A1 and A2, net B (10.2/16, no egress) with local B1.
fn two_nets() -> Switch {
    two_nets_with(SwitchConfig::default())
}

fn two_nets_with(cfg: SwitchConfig) -> Switch {
    let mut sw = Switch::new(cfg);
    sw.upsert_net(net(NET_A, "10.1.0.0/16", true));
    sw.upsert_net(net(NET_B, "10.2.0.0/16", false));
    join(&mut sw, PA1, NET_A, A1);
    join(&mut sw, PA2, NET_A, A2);
    join(&mut sw, PB1, NET_B, B1);
    sw
}

fn allow(from: NetId, to: NetId, port: Option<(L4Proto, u16)>) -> PolicyRule {
    PolicyRule { from, to, port }
}

const REFUSED: Verdict = Verdict::Drop(DropReason::Refused);

#[test]
fn same_net_delivery() {
    let mut sw = two_nets();
    let now = Instant::now();
    let mut p = tcp(A1, 40000, A2, 22);
    let len = p.len() as u64;
    assert_eq!(
        sw.process_from_port(PA1, &mut p, now),
        Verdict::Deliver(PA2)
    );
    assert_eq!(
        sw.process_from_port(PA2, &mut tcp(A2, 22, A1, 40000), now),
        Verdict::Deliver(PA1)
    );

    let a1 = sw.port_counters(PA1).unwrap();
    assert_eq!(
        (a1.tx_packets, a1.tx_bytes, a1.rx_packets, a1.rx_bytes),
        (1, len, 1, len)
    );

    // A member on another host is forwarded; an address nobody has is not.
    let remote = Ipv4Addr::new(10, 1, 9, 9);
    sw.set_member(NET_A, remote, Location::Remote(7));
    assert_eq!(
        sw.process_from_port(PA1, &mut udp(A1, 1, remote, 53), now),
        Verdict::Forward {
            host: 7,
            src_net: NET_A,
            dst_net: NET_A
        }
    );
    sw.remove_member(NET_A, remote);
    assert_eq!(
        sw.process_from_port(PA1, &mut udp(A1, 1, remote, 53), now),
        Verdict::Unresolved { dst_net: NET_A }
    );
    assert_eq!(
        sw.drop_counters().no_route,
        0,
        "a miss waits for the directory"
    );
    assert_eq!(sw.flow_count(), 0, "same-net traffic keeps no state");
}

#[test]
fn spoofed_source_dropped_and_counted() {
    let mut sw = two_nets();
    let now = Instant::now();
    // A1 pretending to be A2, and to be a member of B.
    for src in [A2, B1, Ipv4Addr::new(1, 2, 3, 4)] {
        let v = sw.process_from_port(PA1, &mut tcp(src, 1, A2, 22), now);
        assert_eq!(v, Verdict::Drop(DropReason::Spoofed));
    }
    let c = sw.port_counters(PA1).unwrap();
    assert_eq!(
        (c.spoofed, c.tx_packets, c.refused, c.dropped),
        (3, 3, 0, 0)
    );
    assert_eq!(sw.drop_counters().spoofed, 3);
    assert_eq!(sw.port_counters(PA2).unwrap().rx_packets, 0);
}

#[test]
fn cross_net_refused_without_rule() {
    let mut sw = two_nets();
    let now = Instant::now();
    assert_eq!(
        sw.process_from_port(PA1, &mut tcp(A1, 1, B1, 80), now),
        REFUSED
    );
    assert_eq!(
        sw.process_from_port(PB1, &mut icmp_echo(B1, A1, false, 1), now),
        REFUSED
    );
    // Inside the global space but in no net at all: refused too, never egress.
    let nowhere = Ipv4Addr::new(10, 99, 0, 1);
    assert_eq!(
        sw.process_from_port(PA1, &mut udp(A1, 1, nowhere, 53), now),
        REFUSED
    );
    assert_eq!(sw.port_counters(PA1).unwrap().refused, 2);
    assert_eq!(sw.port_counters(PB1).unwrap().refused, 1);
    assert_eq!(sw.drop_counters().refused, 3);
}

#[test]
fn overlapping_nets_stay_apart() {
    let mut sw = Switch::new(SwitchConfig::default());
    let (x1, x2) = (Ipv4Addr::new(10, 10, 2, 1), Ipv4Addr::new(10, 10, 2, 2));
    sw.upsert_net(net(1, "10.10.2.0/24", false));
    sw.upsert_net(net(2, "10.10.2.0/24", false));
    let ports = [
        (PortId(10), 1, x1),
        (PortId(11), 1, x2),
        (PortId(20), 2, x1),
        (PortId(21), 2, x2),
    ];
    for (port, n, ip) in ports {
        join(&mut sw, port, n, ip);
    }
    let now = Instant::now();
    assert_eq!(
        sw.process_from_port(PortId(10), &mut tcp(x1, 1, x2, 80), now),
        Verdict::Deliver(PortId(11))
    );
    assert_eq!(
        sw.process_from_port(PortId(20), &mut tcp(x1, 1, x2, 80), now),
        Verdict::Deliver(PortId(21))
    );
    assert_eq!(
        sw.process_from_port(PortId(21), &mut tcp(x2, 80, x1, 1), now),
        Verdict::Deliver(PortId(20))
    );
    assert_eq!(
        sw.process_from_port(PortId(11), &mut tcp(x2, 80, x1, 1), now),
        Verdict::Deliver(PortId(10))
    );
    for port in [PortId(10), PortId(11), PortId(20), PortId(21)] {
        assert_eq!(sw.port_counters(port).unwrap().rx_packets, 1);
    }
}

#[test]
fn port_rule_is_one_way_and_stateful() {
    let mut sw = two_nets();
    sw.set_policies(vec![allow(NET_A, NET_B, Some((L4Proto::Tcp, 80)))]);
    let now = Instant::now();

    assert_eq!(
        sw.process_from_port(PA1, &mut tcp(A1, 40000, B1, 80), now),
        Verdict::Deliver(PB1)
    );
    assert_eq!(
        sw.process_from_port(PA1, &mut tcp(A1, 40000, B1, 81), now),
        REFUSED
    );
    assert_eq!(
        sw.process_from_port(PA1, &mut udp(A1, 40000, B1, 80), now),
        REFUSED
    );
    assert_eq!(
        sw.process_from_port(PA1, &mut icmp_echo(A1, B1, false, 3), now),
        REFUSED
    );

    // B's reply passes; B opening anything towards A does not.
    assert_eq!(
        sw.process_from_port(PB1, &mut tcp(B1, 80, A1, 40000), now),
        Verdict::Deliver(PA1)
    );
    assert_eq!(
        sw.process_from_port(PB1, &mut tcp(B1, 80, A1, 40001), now),
        REFUSED
    );
    assert_eq!(
        sw.process_from_port(PB1, &mut tcp(B1, 80, A2, 40000), now),
        REFUSED
    );
    assert_eq!(
        sw.process_from_port(PB1, &mut tcp(B1, 5000, A1, 22), now),
        REFUSED
    );
    assert_eq!(sw.flow_count(), 1);
    assert_eq!(sw.port_counters(PB1).unwrap().refused, 3);
}

#[test]
fn rules_both_ways_keep_one_flow_per_conversation() {
    let mut sw = two_nets();
    sw.set_policies(vec![allow(NET_A, NET_B, None), allow(NET_B, NET_A, None)]);
    let now = Instant::now();
    assert_eq!(
        sw.process_from_port(PA1, &mut tcp(A1, 40000, B1, 80), now),
        Verdict::Deliver(PB1)
    );
    assert_eq!(
        sw.process_from_port(PB1, &mut tcp(B1, 80, A1, 40000), now),
        Verdict::Deliver(PA1)
    );
    assert_eq!(sw.flow_count(), 1);
}

#[test]
fn any_port_rule_lets_icmp_echo_and_reply_through() {
    let mut sw = two_nets();
    sw.set_policies(vec![allow(NET_A, NET_B, None)]);
    let now = Instant::now();
    assert_eq!(
        sw.process_from_port(PA1, &mut icmp_echo(A1, B1, false, 77), now),
        Verdict::Deliver(PB1)
    );
    assert_eq!(
        sw.process_from_port(PB1, &mut icmp_echo(B1, A1, true, 77), now),
        Verdict::Deliver(PA1)
    );
    // A reply with another identifier belongs to no flow; B's own pings are refused.
    assert_eq!(
        sw.process_from_port(PB1, &mut icmp_echo(B1, A1, true, 78), now),
        REFUSED
    );
    assert_eq!(
        sw.process_from_port(PB1, &mut icmp_echo(B1, A1, false, 77), now),
        Verdict::Deliver(PA1)
    );
}

#[test]
fn flows_expire_when_idle() {
    let cfg = SwitchConfig {
        tcp_flow_timeout: Duration::from_secs(300),
        other_flow_timeout: Duration::from_secs(60),
        ..SwitchConfig::default()
    };
    let mut sw = two_nets_with(cfg);
    sw.set_policies(vec![allow(NET_A, NET_B, None)]);
    let t0 = Instant::now();
    sw.process_from_port(PA1, &mut tcp(A1, 1000, B1, 80), t0);
    sw.process_from_port(PA1, &mut udp(A1, 1000, B1, 53), t0);
    assert_eq!(sw.flow_count(), 2);

    // Replies keep a flow alive.
    let t1 = t0 + Duration::from_secs(50);
    assert_eq!(
        sw.process_from_port(PB1, &mut udp(B1, 53, A1, 1000), t1),
        Verdict::Deliver(PA1)
    );

    // The UDP flow idles past 60 s; the TCP flow is still within 300 s.
    let t2 = t1 + Duration::from_secs(61);
    assert_eq!(
        sw.process_from_port(PB1, &mut udp(B1, 53, A1, 1000), t2),
        REFUSED
    );
    assert_eq!(
        sw.process_from_port(PB1, &mut tcp(B1, 80, A1, 1000), t2),
        Verdict::Deliver(PA1)
    );
    sw.expire_flows(t2);
    assert_eq!(sw.flow_count(), 1);

    let t3 = t2 + Duration::from_secs(300);
    assert_eq!(
        sw.process_from_port(PB1, &mut tcp(B1, 80, A1, 1000), t3),
        REFUSED
    );
    sw.expire_flows(t3);
    assert_eq!(sw.flow_count(), 0);
}

#[test]
fn full_flow_table_refuses_new_flows_only() {
    let cfg = SwitchConfig {
        max_flows: 2,
        ..SwitchConfig::default()
    };
    let mut sw = two_nets_with(cfg);
    sw.set_policies(vec![allow(NET_A, NET_B, None)]);
    let t0 = Instant::now();
    assert_eq!(
        sw.process_from_port(PA1, &mut udp(A1, 1, B1, 53), t0),
        Verdict::Deliver(PB1)
    );
    assert_eq!(
        sw.process_from_port(PA1, &mut tcp(A1, 2, OUTSIDE, 443), t0),
        Verdict::Egress
    );

    let full = Verdict::Drop(DropReason::FlowTableFull);
    assert_eq!(sw.process_from_port(PA1, &mut udp(A1, 3, B1, 53), t0), full);
    assert_eq!(
        sw.process_from_port(PA1, &mut tcp(A1, 4, OUTSIDE, 443), t0),
        full
    );
    // Existing flows and same-net traffic still work.
    assert_eq!(
        sw.process_from_port(PA1, &mut udp(A1, 1, B1, 53), t0),
        Verdict::Deliver(PB1)
    );
    assert_eq!(
        sw.process_from_port(PB1, &mut udp(B1, 53, A1, 1), t0),
        Verdict::Deliver(PA1)
    );
    assert_eq!(
        sw.process_from_port(PA1, &mut udp(A1, 3, A2, 53), t0),
        Verdict::Deliver(PA2)
    );
    assert_eq!(sw.drop_counters().flow_table_full, 2);
    assert_eq!(sw.port_counters(PA1).unwrap().dropped, 2);

    // Room comes back when flows expire.
    let later = t0 + Duration::from_secs(61);
    sw.expire_flows(later);
    assert_eq!(
        sw.process_from_port(PA1, &mut udp(A1, 3, B1, 53), later),
        Verdict::Deliver(PB1)
    );
}

#[test]
fn egress_rewrites_source_and_lets_replies_back() {
    let mut sw = two_nets();
    let now = Instant::now();
    let egress_a1 = Ipv4Addr::new(100, 64, 0, 1); // network + 1 + port 0

    for (mut out, mut back) in [
        (
            tcp(A1, 40000, OUTSIDE, 443),
            tcp(OUTSIDE, 443, egress_a1, 40000),
        ),
        (
            udp(A1, 5353, OUTSIDE, 53),
            udp(OUTSIDE, 53, egress_a1, 5353),
        ),
        (
            icmp_echo(A1, OUTSIDE, false, 9),
            icmp_echo(OUTSIDE, egress_a1, true, 9),
        ),
    ] {
        assert_eq!(sw.process_from_port(PA1, &mut out, now), Verdict::Egress);
        assert_eq!(src_of(&out), egress_a1);
        assert!(checksums_ok(&out));

        assert_eq!(
            sw.process_from_egress(&mut back, now),
            Verdict::Deliver(PA1)
        );
        assert_eq!(dst_of(&back), A1);
        assert!(checksums_ok(&back));
    }
    assert_eq!(sw.port_counters(PA1).unwrap().rx_packets, 3);

    // Unsolicited: another remote port, another egress address, an address no port has.
    let refused = [
        tcp(OUTSIDE, 444, egress_a1, 40000),
        tcp(OUTSIDE, 443, Ipv4Addr::new(100, 64, 0, 2), 40000),
        tcp(OUTSIDE, 443, Ipv4Addr::new(100, 64, 9, 9), 40000),
        tcp(OUTSIDE, 443, Ipv4Addr::new(100, 64, 0, 0), 40000),
    ];
    for mut p in refused {
        let before = p.clone();
        assert_eq!(sw.process_from_egress(&mut p, now), REFUSED);
        assert_eq!(p, before, "a refused packet is not rewritten");
    }
    assert_eq!(sw.drop_counters().refused, 4);

    // The egress flow idles out like any other.
    let later = now + Duration::from_secs(301);
    assert_eq!(
        sw.process_from_egress(&mut tcp(OUTSIDE, 443, egress_a1, 40000), later),
        REFUSED
    );
}

/// A published port: the outside world opens flows to it (through the host's NAT, which
/// sends them to the instance's egress address) and gets its replies, in a net without
/// egress too; nothing else of the instance is reachable, and nothing but replies leaves.
#[test]
fn published_ports_take_new_flows_and_nothing_else() {
    let mut sw = two_nets();
    let now = Instant::now();
    // B1 is in NET_B, which has no egress.
    let egress_b1 = egress_address(SwitchConfig::default().egress_space, PB1).unwrap();
    assert_eq!(egress_b1, Ipv4Addr::new(100, 64, 0, 3));
    sw.set_published(PB1, &[(L4Proto::Tcp, 80), (L4Proto::Udp, 53)]);

    let mut syn = tcp(OUTSIDE, 51000, egress_b1, 80);
    assert_eq!(sw.process_from_egress(&mut syn, now), Verdict::Deliver(PB1));
    assert_eq!(dst_of(&syn), B1);
    assert_eq!(
        src_of(&syn),
        OUTSIDE,
        "the program sees its client's address"
    );
    assert!(checksums_ok(&syn));
    // The reply leaves, from the egress address the host's NAT expects.
    let mut reply = tcp(B1, 80, OUTSIDE, 51000);
    assert_eq!(sw.process_from_port(PB1, &mut reply, now), Verdict::Egress);
    assert_eq!(src_of(&reply), egress_b1);
    assert!(checksums_ok(&reply));
    let mut datagram = udp(OUTSIDE, 5000, egress_b1, 53);
    assert_eq!(
        sw.process_from_egress(&mut datagram, now),
        Verdict::Deliver(PB1)
    );
    assert_eq!(
        sw.process_from_port(PB1, &mut udp(B1, 53, OUTSIDE, 5000), now),
        Verdict::Egress
    );

    // Refused: a port it does not publish, the wrong protocol, a TCP segment that opens
    // nothing, another client's reply it never asked for, a flow it would open itself.
    let mut not_syn = tcp(OUTSIDE, 51001, egress_b1, 80);
    not_syn[33] = 0x10; // ACK alone
    for mut p in [
        tcp(OUTSIDE, 51000, egress_b1, 81),
        udp(OUTSIDE, 51000, egress_b1, 80),
        not_syn,
        icmp_echo(OUTSIDE, egress_b1, false, 7),
    ] {
        let before = p.clone();
        assert_eq!(sw.process_from_egress(&mut p, now), REFUSED);
        assert_eq!(p, before);
    }
    assert_eq!(
        sw.process_from_port(PB1, &mut tcp(B1, 80, OUTSIDE, 51999), now),
        Verdict::Drop(DropReason::NoEgress)
    );
    assert_eq!(
        sw.process_from_port(PB1, &mut tcp(B1, 40000, OUTSIDE, 443), now),
        Verdict::Drop(DropReason::NoEgress)
    );
    // Another instance's egress address publishes nothing.
    let egress_a1 = egress_address(SwitchConfig::default().egress_space, PA1).unwrap();
    assert_eq!(
        sw.process_from_egress(&mut tcp(OUTSIDE, 51000, egress_a1, 80), now),
        REFUSED
    );

    // Unpublished, or detached (the instance removed, or moved away): no new flows.
    sw.set_published(PB1, &[]);
    assert_eq!(
        sw.process_from_egress(&mut tcp(OUTSIDE, 52000, egress_b1, 80), now),
        REFUSED
    );
    sw.set_published(PB1, &[(L4Proto::Tcp, 80)]);
    sw.detach_port(PB1);
    assert_eq!(
        sw.process_from_egress(&mut tcp(OUTSIDE, 52001, egress_b1, 80), now),
        REFUSED
    );
    sw.set_published(PB1, &[(L4Proto::Tcp, 80)]);
    assert!(
        sw.published.is_empty(),
        "a port not attached publishes nothing"
    );
}

/// Policies from outside address ranges: once a net has one, its published ports take new
/// flows only from the ranges (and to the ports) its rules allow; flows already open stay.
#[test]
fn outside_rules_narrow_who_opens_flows_to_published_ports() {
    let mut sw = two_nets();
    let now = Instant::now();
    let egress_b1 = egress_address(SwitchConfig::default().egress_space, PB1).unwrap();
    sw.set_published(PB1, &[(L4Proto::Tcp, 80), (L4Proto::Tcp, 22)]);
    let mut open = tcp(OUTSIDE, 50000, egress_b1, 22);
    assert_eq!(
        sw.process_from_egress(&mut open, now),
        Verdict::Deliver(PB1)
    );

    sw.set_outside_rules(vec![
        OutsideRule {
            from: "198.51.100.0/24".parse().unwrap(),
            to: NET_B,
            port: Some((L4Proto::Tcp, 80)),
        },
        OutsideRule {
            from: "203.0.113.0/24".parse().unwrap(),
            to: NET_B,
            port: None,
        },
    ]);
    let other = Ipv4Addr::new(192, 0, 2, 9);
    let admin = Ipv4Addr::new(203, 0, 113, 5);
    assert_eq!(
        sw.process_from_egress(&mut tcp(OUTSIDE, 50001, egress_b1, 80), now),
        Verdict::Deliver(PB1)
    );
    assert_eq!(
        sw.process_from_egress(&mut tcp(OUTSIDE, 50002, egress_b1, 22), now),
        REFUSED,
        "that range may open port 80 only"
    );
    assert_eq!(
        sw.process_from_egress(&mut tcp(other, 50003, egress_b1, 80), now),
        REFUSED,
        "no rule for that range"
    );
    assert_eq!(
        sw.process_from_egress(&mut tcp(admin, 50004, egress_b1, 22), now),
        Verdict::Deliver(PB1)
    );
    let mut ack = tcp(OUTSIDE, 50000, egress_b1, 22);
    ack[33] = 0x10;
    assert_eq!(
        sw.process_from_egress(&mut ack, now),
        Verdict::Deliver(PB1),
        "a flow already open stays"
    );
    // Rules of another net change nothing here.
    sw.set_outside_rules(vec![OutsideRule {
        from: "203.0.113.0/24".parse().unwrap(),
        to: NET_A,
        port: None,
    }]);
    assert_eq!(
        sw.process_from_egress(&mut tcp(other, 50005, egress_b1, 80), now),
        Verdict::Deliver(PB1)
    );
}

#[test]
fn egress_needs_the_net_to_allow_it() {
    let mut sw = two_nets();
    let now = Instant::now();
    let mut p = tcp(B1, 1, OUTSIDE, 443);
    let before = p.clone();
    assert_eq!(
        sw.process_from_port(PB1, &mut p, now),
        Verdict::Drop(DropReason::NoEgress)
    );
    assert_eq!(p, before);
    assert_eq!(sw.drop_counters().no_egress, 1);

    // Turning egress off cuts existing egress flows.
    let egress_a1 = Ipv4Addr::new(100, 64, 0, 1);
    assert_eq!(
        sw.process_from_port(PA1, &mut tcp(A1, 1, OUTSIDE, 443), now),
        Verdict::Egress
    );
    sw.upsert_net(net(NET_A, "10.1.0.0/16", false));
    assert_eq!(
        sw.process_from_egress(&mut tcp(OUTSIDE, 443, egress_a1, 1), now),
        REFUSED
    );
    assert_eq!(
        sw.process_from_port(PA1, &mut tcp(A1, 1, OUTSIDE, 443), now),
        Verdict::Drop(DropReason::NoEgress)
    );
}

#[test]
fn egress_refuses_other_egress_addresses_and_non_unicast() {
    let mut sw = two_nets();
    let now = Instant::now();
    // Reaching B1's egress address would be a way around the A/B isolation.
    let egress_b1 = Ipv4Addr::new(100, 64, 0, 3);
    assert_eq!(
        sw.process_from_port(PA1, &mut tcp(A1, 1, egress_b1, 80), now),
        REFUSED
    );
    for dst in [
        Ipv4Addr::new(127, 0, 0, 1),
        Ipv4Addr::new(224, 0, 0, 251),
        Ipv4Addr::BROADCAST,
        Ipv4Addr::new(169, 254, 169, 254),
    ] {
        assert_eq!(
            sw.process_from_port(PA1, &mut udp(A1, 1, dst, 53), now),
            Verdict::Drop(DropReason::NoRoute),
            "{dst}"
        );
    }
    assert_eq!(sw.flow_count(), 0);
}

#[test]
fn tunnel_ingress_is_checked_again() {
    let mut sw = two_nets();
    sw.set_policies(vec![allow(NET_A, NET_B, Some((L4Proto::Tcp, 80)))]);
    let now = Instant::now();
    let remote_a = Ipv4Addr::new(10, 1, 5, 5);
    let remote_b = Ipv4Addr::new(10, 2, 5, 5);
    sw.set_member(NET_A, remote_a, Location::Remote(3));
    sw.set_member(NET_B, remote_b, Location::Remote(3));

    // Allowed by rule, then the local instance's reply goes back to the remote host.
    let v = sw.process_from_tunnel(3, NET_A, NET_B, &mut tcp(remote_a, 5000, B1, 80), now);
    assert_eq!(v, Verdict::Deliver(PB1));
    assert_eq!(
        sw.process_from_port(PB1, &mut tcp(B1, 80, remote_a, 5000), now),
        Verdict::Forward {
            host: 3,
            src_net: NET_B,
            dst_net: NET_A
        }
    );

    // Refused: wrong port, wrong direction.
    assert_eq!(
        sw.process_from_tunnel(3, NET_A, NET_B, &mut tcp(remote_a, 5000, B1, 81), now),
        REFUSED
    );
    assert_eq!(
        sw.process_from_tunnel(3, NET_B, NET_A, &mut tcp(remote_b, 5000, A1, 80), now),
        REFUSED
    );

    // A reply to a flow a local instance opened.
    assert_eq!(
        sw.process_from_port(PA1, &mut tcp(A1, 6000, remote_b, 80), now),
        Verdict::Forward {
            host: 3,
            src_net: NET_A,
            dst_net: NET_B
        }
    );
    assert_eq!(
        sw.process_from_tunnel(3, NET_B, NET_A, &mut tcp(remote_b, 80, A1, 6000), now),
        Verdict::Deliver(PA1)
    );

    // Same net passes without rules.
    assert_eq!(
        sw.process_from_tunnel(3, NET_A, NET_A, &mut udp(remote_a, 1, A2, 53), now),
        Verdict::Deliver(PA2)
    );

    // A source outside the claimed net, a destination not local, an unknown net.
    assert_eq!(
        sw.process_from_tunnel(3, NET_A, NET_A, &mut udp(remote_b, 1, A2, 53), now),
        Verdict::Drop(DropReason::Spoofed)
    );
    assert_eq!(
        sw.process_from_tunnel(3, NET_A, NET_A, &mut udp(A1, 1, remote_a, 53), now),
        Verdict::Drop(DropReason::NoRoute)
    );
    assert_eq!(
        sw.process_from_tunnel(3, NET_A, 99, &mut udp(remote_a, 1, A2, 53), now),
        Verdict::Drop(DropReason::NoRoute)
    );
    assert_eq!(sw.port_counters(PA1).unwrap().rx_packets, 1);
    assert_eq!(sw.port_counters(PB1).unwrap().rx_packets, 1);
}

#[test]
fn two_hosts_talk_through_the_tunnel() {
    // Host 1 has A1, host 2 has B1; each switch knows the other's member as remote. The
    // "tunnel" here is handing the bytes from one switch to the other.
    let now = Instant::now();
    let mut h1 = Switch::new(SwitchConfig::default());
    let mut h2 = Switch::new(SwitchConfig::default());
    for sw in [&mut h1, &mut h2] {
        sw.upsert_net(net(NET_A, "10.1.0.0/16", false));
        sw.upsert_net(net(NET_B, "10.2.0.0/16", false));
        sw.set_policies(vec![allow(NET_A, NET_B, Some((L4Proto::Tcp, 80)))]);
    }
    join(&mut h1, PA1, NET_A, A1);
    h1.set_member(NET_B, B1, Location::Remote(2));
    join(&mut h2, PB1, NET_B, B1);
    h2.set_member(NET_A, A1, Location::Remote(1));

    let mut syn = tcp(A1, 40000, B1, 80);
    assert_eq!(
        h1.process_from_port(PA1, &mut syn, now),
        Verdict::Forward {
            host: 2,
            src_net: NET_A,
            dst_net: NET_B
        }
    );
    assert_eq!(
        h2.process_from_tunnel(1, NET_A, NET_B, &mut syn, now),
        Verdict::Deliver(PB1)
    );

    let mut syn_ack = tcp(B1, 80, A1, 40000);
    assert_eq!(
        h2.process_from_port(PB1, &mut syn_ack, now),
        Verdict::Forward {
            host: 1,
            src_net: NET_B,
            dst_net: NET_A
        }
    );
    assert_eq!(
        h1.process_from_tunnel(2, NET_B, NET_A, &mut syn_ack, now),
        Verdict::Deliver(PA1)
    );

    // B1 cannot open a connection, even if its host's switch were compromised and sent it.
    let mut sneaky = tcp(B1, 80, A1, 22);
    assert_eq!(h2.process_from_port(PB1, &mut sneaky, now), REFUSED);
    assert_eq!(
        h1.process_from_tunnel(2, NET_B, NET_A, &mut sneaky, now),
        REFUSED
    );
}

#[test]
fn a_host_speaks_only_for_the_members_it_hosts() {
    let mut sw = two_nets();
    let now = Instant::now();
    let on_3 = Ipv4Addr::new(10, 1, 5, 5);
    let on_4 = Ipv4Addr::new(10, 1, 6, 6);
    sw.set_member(NET_A, on_3, Location::Remote(3));
    sw.set_member(NET_A, on_4, Location::Remote(4));
    // Host 3 for its own member: delivered.
    assert_eq!(
        sw.process_from_tunnel(3, NET_A, NET_A, &mut udp(on_3, 1, A2, 53), now),
        Verdict::Deliver(PA2)
    );
    // Host 3 for host 4's member, for a member nobody has, for one of this host's own:
    // dropped and counted, whatever else the frame gets right.
    let unknown = Ipv4Addr::new(10, 1, 7, 7);
    for src in [on_4, unknown, A1] {
        assert_eq!(
            sw.process_from_tunnel(3, NET_A, NET_A, &mut udp(src, 1, A2, 53), now),
            Verdict::Drop(DropReason::WrongHost),
            "{src}"
        );
    }
    assert_eq!(sw.drop_counters().get(DropReason::WrongHost), 3);
    assert_eq!(sw.port_counters(PA2).unwrap().rx_packets, 1);
    // A member that moved to host 4 (a migration): host 3 no longer speaks for it.
    sw.set_member(NET_A, on_3, Location::Remote(4));
    assert_eq!(
        sw.process_from_tunnel(3, NET_A, NET_A, &mut udp(on_3, 1, A2, 53), now),
        Verdict::Drop(DropReason::WrongHost)
    );
    assert_eq!(
        sw.process_from_tunnel(4, NET_A, NET_A, &mut udp(on_3, 1, A2, 53), now),
        Verdict::Deliver(PA2)
    );
}

#[test]
fn non_ipv4_and_malformed_are_dropped() {
    let mut sw = two_nets();
    let now = Instant::now();
    let mut v6 = vec![0u8; 60];
    v6[0] = 0x60;
    assert_eq!(
        sw.process_from_port(PA1, &mut v6, now),
        Verdict::Drop(DropReason::NotIpv4)
    );
    let mut short = tcp(A1, 1, A2, 2);
    short.truncate(19);
    assert_eq!(
        sw.process_from_port(PA1, &mut short, now),
        Verdict::Drop(DropReason::Malformed)
    );
    assert_eq!(
        sw.process_from_port(PA1, &mut [], now),
        Verdict::Drop(DropReason::Malformed)
    );
    assert_eq!(
        sw.process_from_egress(&mut v6, now),
        Verdict::Drop(DropReason::NotIpv4)
    );
    assert_eq!(
        sw.process_from_tunnel(3, NET_A, NET_A, &mut v6, now),
        Verdict::Drop(DropReason::NotIpv4)
    );

    let drops = sw.drop_counters();
    assert_eq!((drops.not_ipv4, drops.malformed), (3, 2));
    assert_eq!(drops.get(DropReason::NotIpv4), 3);
    assert_eq!(drops.iter().map(|(_, n)| n).sum::<u64>(), 5);
    let c = sw.port_counters(PA1).unwrap();
    assert_eq!((c.tx_packets, c.dropped), (3, 3));
}

#[test]
fn unknown_port_is_dropped() {
    let mut sw = two_nets();
    let v = sw.process_from_port(PortId(99), &mut tcp(A1, 1, A2, 2), Instant::now());
    assert_eq!(v, Verdict::Drop(DropReason::UnknownPort));
    assert_eq!(sw.drop_counters().unknown_port, 1);
    assert_eq!(sw.port_counters(PortId(99)), None);
}

#[test]
fn removing_a_rule_kills_its_flows() {
    let mut sw = two_nets();
    let tcp80 = allow(NET_A, NET_B, Some((L4Proto::Tcp, 80)));
    let udp53 = allow(NET_A, NET_B, Some((L4Proto::Udp, 53)));
    sw.set_policies(vec![tcp80, udp53]);
    let now = Instant::now();
    sw.process_from_port(PA1, &mut tcp(A1, 1000, B1, 80), now);
    sw.process_from_port(PA1, &mut udp(A1, 1000, B1, 53), now);
    sw.process_from_port(PA1, &mut tcp(A1, 1000, OUTSIDE, 80), now);
    assert_eq!(sw.flow_count(), 3);

    sw.set_policies(vec![udp53]);
    assert_eq!(sw.flow_count(), 2, "the egress and udp flows stay");
    assert_eq!(
        sw.process_from_port(PB1, &mut tcp(B1, 80, A1, 1000), now),
        REFUSED
    );
    assert_eq!(
        sw.process_from_port(PB1, &mut udp(B1, 53, A1, 1000), now),
        Verdict::Deliver(PA1)
    );
    assert_eq!(
        sw.process_from_port(PA1, &mut tcp(A1, 1000, B1, 80), now),
        REFUSED
    );
}

#[test]
fn attach_validates_and_detach_forgets() {
    let mut sw = Switch::new(SwitchConfig {
        egress_space: "100.64.0.0/30".parse().unwrap(),
        ..SwitchConfig::default()
    });
    assert_eq!(
        sw.attach_port(PA1, NET_A, A1),
        Err(AttachError::UnknownNet {
            port: PA1,
            net: NET_A
        })
    );
    sw.upsert_net(net(NET_A, "10.1.0.0/16", true));
    assert!(matches!(
        sw.attach_port(PA1, NET_A, B1),
        Err(AttachError::AddressOutsideNet { .. })
    ));
    // A /30 has two usable addresses: .1 and .2 for ports 0 and 1; .3 is the broadcast.
    assert_eq!(
        sw.attach_port(PA2, NET_A, A2),
        Ok(Ipv4Addr::new(100, 64, 0, 2))
    );
    let err = sw
        .attach_port(PortId(2), NET_A, Ipv4Addr::new(10, 1, 0, 3))
        .unwrap_err();
    assert!(matches!(err, AttachError::NoEgressAddress { .. }));
    assert_eq!(
        err.to_string(),
        "cannot attach port 2: egress space 100.64.0.0/30 has no address for it"
    );

    let now = Instant::now();
    assert_eq!(
        sw.process_from_port(PA2, &mut tcp(A2, 1, OUTSIDE, 80), now),
        Verdict::Egress
    );
    sw.detach_port(PA2);
    assert_eq!(sw.flow_count(), 0);
    assert_eq!(sw.port_counters(PA2), None);
    assert_eq!(
        sw.process_from_egress(&mut tcp(OUTSIDE, 80, Ipv4Addr::new(100, 64, 0, 2), 1), now),
        REFUSED
    );
    sw.attach_port(PA1, NET_A, A1).unwrap();
    assert_eq!(
        sw.process_from_port(PA1, &mut tcp(A1, 1, A2, 80), now),
        Verdict::Unresolved { dst_net: NET_A }
    );
}

#[test]
fn an_attached_port_draws_traffic_only_once_the_directory_places_its_member_there() {
    let mut sw = Switch::new(SwitchConfig::default());
    sw.upsert_net(net(NET_A, "10.1.0.0/16", true));
    sw.attach_port(PA1, NET_A, A1).unwrap();
    sw.attach_port(PA2, NET_A, A2).unwrap();
    let now = Instant::now();
    // A copy attached here while the directory places the member elsewhere (a migration
    // not finished yet): traffic for it goes where the directory says.
    sw.set_member(NET_A, A2, Location::Remote(9));
    assert!(matches!(
        sw.process_from_port(PA1, &mut tcp(A1, 1, A2, 80), now),
        Verdict::Forward { host: 9, .. }
    ));
    sw.set_member(NET_A, A2, Location::Local(PA2));
    assert_eq!(
        sw.process_from_port(PA1, &mut tcp(A1, 1, A2, 80), now),
        Verdict::Deliver(PA2)
    );
    // Detaching the port forgets the member that pointed at it.
    sw.detach_port(PA2);
    assert_eq!(
        sw.process_from_port(PA1, &mut tcp(A1, 2, A2, 80), now),
        Verdict::Unresolved { dst_net: NET_A }
    );
}

#[test]
fn a_moving_member_is_sent_nothing_and_heard_from_either_of_its_hosts() {
    let mut sw = two_nets();
    let now = Instant::now();
    let mover = Ipv4Addr::new(10, 1, 9, 9);
    sw.set_member(NET_A, mover, Location::Moving { from: 3, to: 4 });
    // What is sent to it waits for the directory.
    assert_eq!(
        sw.process_from_port(PA1, &mut tcp(A1, 1, mover, 80), now),
        Verdict::Unresolved { dst_net: NET_A }
    );
    // Either host may speak for it (its last packets from one, its first from the other);
    // no third one.
    for host in [3, 4] {
        assert_eq!(
            sw.process_from_tunnel(host, NET_A, NET_A, &mut tcp(mover, 80, A1, 1), now),
            Verdict::Deliver(PA1)
        );
    }
    assert_eq!(
        sw.process_from_tunnel(5, NET_A, NET_A, &mut tcp(mover, 80, A1, 1), now),
        Verdict::Drop(DropReason::WrongHost)
    );
    // Placed again: only its host speaks for it.
    sw.set_member(NET_A, mover, Location::Remote(4));
    assert_eq!(
        sw.process_from_tunnel(3, NET_A, NET_A, &mut tcp(mover, 80, A1, 1), now),
        Verdict::Drop(DropReason::WrongHost)
    );
    assert!(matches!(
        sw.process_from_port(PA1, &mut tcp(A1, 1, mover, 80), now),
        Verdict::Forward { host: 4, .. }
    ));
}

#[test]
fn removing_a_net_forgets_its_members_ports_and_flows() {
    let mut sw = two_nets();
    sw.set_policies(vec![allow(NET_A, NET_B, None)]);
    let now = Instant::now();
    sw.set_member(NET_B, Ipv4Addr::new(10, 2, 7, 7), Location::Remote(4));
    sw.process_from_port(PA1, &mut tcp(A1, 1, B1, 80), now);
    sw.process_from_port(PA1, &mut tcp(A1, 1, OUTSIDE, 80), now);
    assert_eq!(sw.flow_count(), 2);

    sw.remove_net(NET_B);
    assert_eq!(sw.flow_count(), 1, "A's egress flow stays");
    assert_eq!(sw.port_counters(PB1), None);
    assert_eq!(
        sw.process_from_port(PA1, &mut tcp(A1, 1, B1, 80), now),
        REFUSED
    );
    // Re-adding the net brings the rule back, but not the members.
    sw.upsert_net(net(NET_B, "10.2.0.0/16", false));
    assert_eq!(
        sw.process_from_port(PA1, &mut tcp(A1, 1, Ipv4Addr::new(10, 2, 7, 7), 80), now),
        Verdict::Unresolved { dst_net: NET_B }
    );
}

/// Hostile input: random headers from a port, from egress and from a tunnel, with
/// addresses drawn from the nets the switch knows. Nothing may panic, and nothing may
/// cross from one net to another without the policy.
#[test]
fn random_packets_never_panic_or_cross_nets() {
    let mut sw = Switch::new(SwitchConfig::default());
    sw.upsert_net(net(NET_A, "10.1.0.0/24", true));
    sw.upsert_net(net(NET_B, "10.2.0.0/24", false));
    join(&mut sw, PA1, NET_A, A1);
    join(&mut sw, PA2, NET_A, A2);
    join(&mut sw, PB1, NET_B, B1);
    let addrs = [
        A1,
        A2,
        B1,
        OUTSIDE,
        Ipv4Addr::new(100, 64, 0, 2),
        Ipv4Addr::new(10, 9, 9, 9),
    ];
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let now = Instant::now();
    let mut delivered = 0;
    for i in 0..100_000u32 {
        let r = next();
        let proto = [PROTO_TCP, PROTO_UDP, PROTO_ICMP, (r >> 8) as u8][(r % 4) as usize];
        let src = addrs[((r >> 16) % addrs.len() as u64) as usize];
        let dst = addrs[((r >> 24) % addrs.len() as u64) as usize];
        let l4: Vec<u8> = (0..20 + (r >> 32) % 40).map(|_| next() as u8).collect();
        let mut pkt = ipv4(proto, src, dst, &l4);
        if i % 7 == 0 {
            let at = (next() as usize) % pkt.len();
            pkt[at] = next() as u8;
        }
        let from_port = [PA1, PA2, PB1][(i % 3) as usize];
        let verdict = match i % 5 {
            3 => sw.process_from_egress(&mut pkt, now),
            4 => sw.process_from_tunnel(3, NET_A, NET_B, &mut pkt, now),
            _ => sw.process_from_port(from_port, &mut pkt, now),
        };
        if let Verdict::Deliver(to) = verdict {
            delivered += 1;
            if i % 5 < 3 {
                // No policy exists: a port only ever reaches its own net.
                let same = matches!((from_port, to), (PB1, PB1)) || (from_port != PB1 && to != PB1);
                assert!(same, "packet {i} crossed nets: {from_port:?} -> {to:?}");
            }
            if i % 5 == 4 {
                panic!("tunnel packet {i} from net A delivered into net B without a policy");
            }
        }
    }
    // The inputs are not all refused at the door: same-net packets do get through.
    assert!(delivered > 1000, "only {delivered} packets delivered");
}

#[test]
fn bandwidth_limit_applies_both_directions_per_port() {
    let mut sw = two_nets();
    let t0 = Instant::now();
    // A1 limited to 800 kbit/s = 100,000 bytes/s (burst: the 32 KiB minimum).
    sw.set_port_rate(PA1, Some(800_000));
    let len = tcp(A1, 1, A2, 2).len() as u64;
    let (mut out, mut inn) = (0u64, 0u64);
    // Two virtual seconds, a packet each way every 100 µs: far more than the limit.
    for i in 0..20_000u64 {
        let now = t0 + Duration::from_micros(100 * i);
        if let Verdict::Deliver(_) = sw.process_from_port(PA1, &mut tcp(A1, 1, A2, 2), now) {
            out += len;
        }
        if let Verdict::Deliver(_) = sw.process_from_port(PA2, &mut tcp(A2, 2, A1, 1), now) {
            inn += len;
        }
    }
    // Two seconds at the rate, the full bucket, and one burst of debt.
    let expected = 200_000 + 2 * 32 * 1024;
    for got in [out, inn] {
        assert!(
            got <= expected && got >= expected - 2 * len,
            "{got} bytes, expected about {expected}"
        );
    }
    let a1 = sw.port_counters(PA1).unwrap();
    assert_eq!(a1.tx_packets, 20_000);
    assert_eq!(a1.rx_bytes, inn);
    assert!(a1.rate_limited > 25_000);
    assert_eq!(
        sw.drop_counters().get(DropReason::RateLimited),
        a1.rate_limited
    );
    // A2 is not limited: everything it was sent by others passed.
    assert_eq!(sw.port_counters(PA2).unwrap().rate_limited, 0);
    // Lifting the limit lets everything through.
    sw.set_port_rate(PA1, None);
    let now = t0 + Duration::from_secs(3);
    for _ in 0..1000 {
        assert_eq!(
            sw.process_from_port(PA1, &mut tcp(A1, 1, A2, 2), now),
            Verdict::Deliver(PA2)
        );
    }
}

#[test]
fn limited_ports_make_senders_wait_instead_of_dropping() {
    let mut sw = two_nets();
    let t0 = Instant::now();
    // A2 receives at most 800 kbit/s; A1 sends to it as fast as the switch lets it.
    sw.set_port_rate(PA2, Some(800_000));
    assert_eq!(sw.port_delay(PA1, t0), None);
    let mut now = t0;
    let mut delivered = 0u64;
    let end = t0 + Duration::from_secs(2);
    while now < end {
        if let Some(wait) = sw.port_delay(PA1, now) {
            now += wait;
            continue;
        }
        match sw.process_from_port(PA1, &mut tcp(A1, 1, A2, 2), now) {
            Verdict::Deliver(PA2) => delivered += 1,
            v => panic!("a sender that waits loses nothing, got {v:?}"),
        }
    }
    let len = tcp(A1, 1, A2, 2).len() as u64;
    let bytes = delivered * len;
    let expected = 200_000 + 32 * 1024;
    assert!(
        bytes <= expected + 2 * 32 * 1024 && bytes >= expected - 2 * len,
        "{bytes} bytes, expected about {expected}"
    );
    assert_eq!(sw.port_counters(PA2).unwrap().rate_limited, 0);
    // Its own limit makes a port wait too.
    sw.set_port_rate(PB1, Some(800_000));
    let mut n = 0;
    while sw.port_delay(PB1, t0).is_none() {
        sw.process_from_port(PB1, &mut tcp(B1, 1, B1, 2), t0);
        n += 1;
    }
    assert!(n > 0 && sw.port_delay(PB1, t0).unwrap() > Duration::ZERO);
}

#[test]
fn a_held_port_neither_sends_nor_receives_until_released() {
    let mut sw = two_nets();
    let now = Instant::now();
    let remote = Ipv4Addr::new(10, 1, 9, 9);
    sw.set_member(NET_A, remote, Location::Remote(7));
    sw.hold_port(PA1, true);
    const HELD: Verdict = Verdict::Drop(DropReason::Held);
    // Nothing from it: to a local member, to another host, out to the world.
    assert_eq!(
        sw.process_from_port(PA1, &mut tcp(A1, 1, A2, 22), now),
        HELD
    );
    assert_eq!(
        sw.process_from_port(PA1, &mut tcp(A1, 1, remote, 22), now),
        HELD
    );
    let world = Ipv4Addr::new(192, 0, 2, 1);
    assert_eq!(
        sw.process_from_port(PA1, &mut tcp(A1, 1, world, 80), now),
        HELD
    );
    // Nothing to it: from a local port, from a tunnel.
    assert_eq!(
        sw.process_from_port(PA2, &mut tcp(A2, 22, A1, 1), now),
        HELD
    );
    assert_eq!(
        sw.process_from_tunnel(7, NET_A, NET_A, &mut tcp(remote, 22, A1, 1), now),
        HELD
    );
    assert_eq!(sw.drop_counters().get(DropReason::Held), 5);
    assert_eq!(sw.port_counters(PA1).unwrap().rx_packets, 0);
    // The others are not held.
    assert_eq!(
        sw.process_from_port(PA2, &mut tcp(A2, 1, remote, 22), now),
        Verdict::Forward {
            host: 7,
            src_net: NET_A,
            dst_net: NET_A
        }
    );
    sw.hold_port(PA1, false);
    assert_eq!(
        sw.process_from_port(PA1, &mut tcp(A1, 1, A2, 22), now),
        Verdict::Deliver(PA2)
    );
    assert_eq!(
        sw.process_from_tunnel(7, NET_A, NET_A, &mut tcp(remote, 22, A1, 1), now),
        Verdict::Deliver(PA1)
    );
}

#[test]
fn the_cluster_global_space_decides_what_is_cross_net() {
    let mut sw = Switch::new(SwitchConfig::default());
    let (a, b) = (Ipv4Addr::new(172, 16, 1, 1), Ipv4Addr::new(172, 16, 2, 1));
    sw.upsert_net(net(NET_A, "172.16.1.0/24", true));
    sw.upsert_net(net(NET_B, "172.16.2.0/24", false));
    join(&mut sw, PA1, NET_A, a);
    join(&mut sw, PB1, NET_B, b);
    let now = Instant::now();
    // Outside the default space, another net's address looks like the outside world.
    assert_eq!(
        sw.process_from_port(PA1, &mut tcp(a, 1, b, 80), now),
        Verdict::Egress
    );
    sw.set_global_space("172.16.0.0/12".parse().unwrap());
    assert_eq!(sw.global_space(), "172.16.0.0/12".parse().unwrap());
    // Inside it: cross-net, refused without a rule, and the egress flow is gone.
    assert_eq!(
        sw.process_from_port(PA1, &mut tcp(a, 1, b, 80), now),
        REFUSED
    );
    sw.set_policies(vec![PolicyRule {
        from: NET_A,
        to: NET_B,
        port: None,
    }]);
    assert_eq!(
        sw.process_from_port(PA1, &mut tcp(a, 1, b, 80), now),
        Verdict::Deliver(PB1)
    );
}

// Services: a virtual address in net A spread over members.

const VIP: Ipv4Addr = Ipv4Addr::new(10, 1, 255, 1);
/// A member of net A on host 7.
const A_REMOTE: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 9);

fn web(backends: &[Ipv4Addr]) -> ServiceConfig {
    ServiceConfig {
        net: NET_A,
        vip: VIP,
        ports: vec![(L4Proto::Tcp, 80)],
        backends: backends.to_vec(),
    }
}

/// Two nets, with A_REMOTE on host 7 and service `web` over A2 and A_REMOTE.
fn with_service() -> Switch {
    let mut sw = two_nets();
    sw.set_member(NET_A, A_REMOTE, Location::Remote(7));
    sw.set_services(&[web(&[A2, A_REMOTE])]);
    sw
}

/// Sends a SYN from A1 port `sport` to the service and says where it went, checking the
/// rewrite and the checksums.
fn to_vip(sw: &mut Switch, sport: u16, now: Instant) -> (Verdict, Ipv4Addr) {
    let mut p = tcp(A1, sport, VIP, 80);
    let v = sw.process_from_port(PA1, &mut p, now);
    assert!(checksums_ok(&p));
    assert_eq!(src_of(&p), A1);
    (v, dst_of(&p))
}

#[test]
fn service_flows_spread_over_backends_and_keep_theirs() {
    let mut sw = with_service();
    let now = Instant::now();
    let (mut local, mut remote) = (0, 0);
    for sport in 1000..1200 {
        match to_vip(&mut sw, sport, now) {
            (Verdict::Deliver(PA2), A2) => local += 1,
            (
                Verdict::Forward {
                    host: 7,
                    src_net: NET_A,
                    dst_net: NET_A,
                },
                A_REMOTE,
            ) => remote += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(local > 50 && remote > 50, "{local} local, {remote} remote");
    // Every later packet of a flow goes where its first went, even when a member is added.
    let first: Vec<_> = (1000..1200).map(|s| to_vip(&mut sw, s, now).1).collect();
    sw.set_services(&[web(&[A2, A_REMOTE, Ipv4Addr::new(10, 1, 0, 10)])]);
    let later: Vec<_> = (1000..1200).map(|s| to_vip(&mut sw, s, now)).collect();
    assert!(first.iter().zip(&later).all(|(a, (_, b))| a == b));
    assert_eq!(sw.service_flow_count(), 200);
    // Another switch with the list in another order chooses the same (an agent restart).
    let mut other = two_nets();
    other.set_member(NET_A, A_REMOTE, Location::Remote(7));
    other.set_services(&[web(&[A_REMOTE, A2])]);
    for (i, sport) in (1000..1200).enumerate() {
        assert_eq!(to_vip(&mut other, sport, now).1, first[i]);
    }
}

#[test]
fn service_replies_get_the_service_address_back() {
    let mut sw = with_service();
    let now = Instant::now();
    let mut by_backend = std::collections::HashMap::new();
    for sport in 1000..1100 {
        by_backend
            .entry(to_vip(&mut sw, sport, now).1)
            .or_insert(sport);
    }
    // From the local backend.
    let sport = by_backend[&A2];
    let mut reply = tcp(A2, 80, A1, sport);
    assert_eq!(
        sw.process_from_port(PA2, &mut reply, now),
        Verdict::Deliver(PA1)
    );
    assert_eq!(src_of(&reply), VIP);
    assert!(checksums_ok(&reply));
    // From the remote one, through the tunnel, after the incoming check.
    let sport = by_backend[&A_REMOTE];
    let mut reply = tcp(A_REMOTE, 80, A1, sport);
    let v = sw.process_from_tunnel(7, NET_A, NET_A, &mut reply, now);
    assert_eq!(v, Verdict::Deliver(PA1));
    assert_eq!(src_of(&reply), VIP);
    assert!(checksums_ok(&reply));
    // ...which still binds the sender to its host.
    let mut wrong = tcp(A_REMOTE, 80, A1, sport);
    assert_eq!(
        sw.process_from_tunnel(8, NET_A, NET_A, &mut wrong, now),
        Verdict::Drop(DropReason::WrongHost)
    );
    // A packet from a backend that is no reply of a recorded flow keeps its source.
    let mut direct = tcp(A2, 80, A1, 999);
    assert_eq!(
        sw.process_from_port(PA2, &mut direct, now),
        Verdict::Deliver(PA1)
    );
    assert_eq!(src_of(&direct), A2);
    // Nor does a reply on another port of the same pair.
    let mut other = tcp(A2, 81, A1, by_backend[&A2]);
    sw.process_from_port(PA2, &mut other, now);
    assert_eq!(src_of(&other), A2);
}

#[test]
fn a_backend_that_left_is_not_chosen_and_its_flows_choose_again() {
    let mut sw = with_service();
    let now = Instant::now();
    let remote_flow = (1000..1100)
        .find(|s| to_vip(&mut sw, *s, now).1 == A_REMOTE)
        .unwrap();
    sw.set_services(&[web(&[A2])]);
    for sport in 1000..1100 {
        assert_eq!(to_vip(&mut sw, sport, now), (Verdict::Deliver(PA2), A2));
    }
    // The flow that was on the remote member is on A2 now, and its replies map back.
    let mut reply = tcp(A2, 80, A1, remote_flow);
    assert_eq!(
        sw.process_from_port(PA2, &mut reply, now),
        Verdict::Deliver(PA1)
    );
    assert_eq!(src_of(&reply), VIP);
    // The remote member's late replies are not the service's any more.
    let mut late = tcp(A_REMOTE, 80, A1, remote_flow);
    sw.process_from_tunnel(7, NET_A, NET_A, &mut late, now);
    assert_eq!(src_of(&late), A_REMOTE);
    // No members: nothing to send to.
    sw.set_services(&[web(&[])]);
    assert_eq!(
        to_vip(&mut sw, 2000, now).0,
        Verdict::Drop(DropReason::NoRoute)
    );
    // No service: an address no member has.
    sw.set_services(&[]);
    assert_eq!(sw.service_flow_count(), 0);
    assert_eq!(
        to_vip(&mut sw, 2001, now).0,
        Verdict::Unresolved { dst_net: NET_A }
    );
}

#[test]
fn service_flows_time_out() {
    let mut sw = with_service();
    let now = Instant::now();
    to_vip(&mut sw, 1000, now);
    sw.expire_flows(now + Duration::from_secs(299));
    assert_eq!(sw.service_flow_count(), 1);
    sw.expire_flows(now + Duration::from_secs(601));
    assert_eq!(sw.service_flow_count(), 0);
}

#[test]
fn a_service_port_it_does_not_have_is_refused() {
    let mut sw = with_service();
    let now = Instant::now();
    let mut p = tcp(A1, 1000, VIP, 81);
    assert_eq!(sw.process_from_port(PA1, &mut p, now), REFUSED);
    assert_eq!(dst_of(&p), VIP);
    let mut p = udp(A1, 1000, VIP, 80);
    assert_eq!(sw.process_from_port(PA1, &mut p, now), REFUSED);
    let mut p = icmp_echo(A1, VIP, false, 1);
    assert_eq!(sw.process_from_port(PA1, &mut p, now), REFUSED);
}

#[test]
fn a_client_is_its_own_backend_only_when_alone() {
    let mut sw = with_service();
    sw.set_services(&[web(&[A1, A2])]);
    let now = Instant::now();
    for sport in 1000..1050 {
        assert_eq!(to_vip(&mut sw, sport, now).1, A2);
    }
    sw.set_services(&[web(&[A1])]);
    assert_eq!(to_vip(&mut sw, 3000, now), (Verdict::Deliver(PA1), A1));
}

#[test]
fn services_of_another_net_need_a_rule() {
    let mut sw = with_service();
    let now = Instant::now();
    let mut p = tcp(B1, 1000, VIP, 80);
    assert_eq!(sw.process_from_port(PB1, &mut p, now), REFUSED);
    assert_eq!(dst_of(&p), VIP);
    assert_eq!(sw.service_flow_count(), 0);
    sw.set_policies(vec![allow(NET_B, NET_A, Some((L4Proto::Tcp, 80)))]);
    let mut chosen = Vec::new();
    for sport in 1000..1100 {
        let mut p = tcp(B1, sport, VIP, 80);
        let v = sw.process_from_port(PB1, &mut p, now);
        assert!(checksums_ok(&p));
        chosen.push((sport, v, dst_of(&p)));
    }
    let (sport, v, _) = *chosen.iter().find(|c| c.2 == A2).unwrap();
    assert_eq!(v, Verdict::Deliver(PA2));
    // The backend's reply passes as the reply of the flow, as from the service.
    let mut reply = tcp(A2, 80, B1, sport);
    assert_eq!(
        sw.process_from_port(PA2, &mut reply, now),
        Verdict::Deliver(PB1)
    );
    assert_eq!(src_of(&reply), VIP);
    assert!(checksums_ok(&reply));
    let (sport, v, _) = *chosen.iter().find(|c| c.2 == A_REMOTE).unwrap();
    assert_eq!(
        v,
        Verdict::Forward {
            host: 7,
            src_net: NET_B,
            dst_net: NET_A
        }
    );
    let mut reply = tcp(A_REMOTE, 80, B1, sport);
    assert_eq!(
        sw.process_from_tunnel(7, NET_A, NET_B, &mut reply, now),
        Verdict::Deliver(PB1)
    );
    assert_eq!(src_of(&reply), VIP);
    // The rule's port bounds the service too.
    let mut p = tcp(B1, 5000, VIP, 81);
    assert_eq!(sw.process_from_port(PB1, &mut p, now), REFUSED);
}
