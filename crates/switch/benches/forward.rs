//! The switch's per-packet work with a large table: 100,000 members spread over two nets
//! of a /15 each, on 100 remote hosts, and a policy between the nets. Each iteration looks
//! up the next of 4,096 destinations (spread over the whole table, so the lookups miss the
//! CPU caches as a busy switch's would) for a 1,400-byte TCP packet, with the source and
//! policy checks: `same net` is a member of the sender's net, `across nets` goes through
//! the policy (and its flow table). Run: `cargo bench -p vane-switch`.

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use vane_switch::{L4Proto, Location, NetConfig, PolicyRule, PortId, Switch, SwitchConfig};

const MEMBERS: u32 = 100_000;
const DESTINATIONS: usize = 4096;

fn net(id: u32, first: u8) -> NetConfig {
    NetConfig {
        id,
        subnet: format!("10.{first}.0.0/15").parse().unwrap(),
        egress: false,
    }
}

fn address(base: u8, i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, base, 0, 0)) + 2 + i)
}

/// A switch with the table above and one local port (10.2.0.1 in net 1).
fn switch() -> Switch {
    let mut s = Switch::new(SwitchConfig::default());
    s.upsert_net(net(1, 2));
    s.upsert_net(net(2, 4));
    for i in 0..MEMBERS / 2 {
        s.set_member(1, address(2, i), Location::Remote(i % 100 + 2));
        s.set_member(2, address(4, i), Location::Remote(i % 100 + 2));
    }
    s.set_policies(vec![PolicyRule {
        from: 1,
        to: 2,
        port: Some((L4Proto::Tcp, 80)),
    }]);
    s.attach_port(PortId(1), 1, Ipv4Addr::new(10, 2, 0, 1))
        .unwrap();
    s
}

fn tcp_packet(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut p = vec![0u8; 1400];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&1400u16.to_be_bytes());
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p[20..22].copy_from_slice(&40000u16.to_be_bytes());
    p[22..24].copy_from_slice(&80u16.to_be_bytes());
    p[32] = 5 << 4;
    p[33] = 0x10;
    p
}

fn bench(c: &mut Criterion) {
    let src = Ipv4Addr::new(10, 2, 0, 1);
    let mut g = c.benchmark_group("lookup and policy, 100k members");
    g.throughput(Throughput::Elements(1));
    for (name, base) in [("same net", 2u8), ("across nets", 4u8)] {
        let mut s = switch();
        let step = MEMBERS / 2 / DESTINATIONS as u32;
        let mut packets: Vec<Vec<u8>> = (0..DESTINATIONS as u32)
            .map(|i| tcp_packet(src, address(base, i * step)))
            .collect();
        let now = Instant::now();
        let mut i = 0;
        g.bench_function(name, |b| {
            b.iter(|| {
                i = (i + 1) % DESTINATIONS;
                let v = s.process_from_port(PortId(1), &mut packets[i], now);
                black_box(v)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
