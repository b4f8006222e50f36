//! Untrusted input: packets that instances write to their ports, that other hosts send
//! through the tunnel (with the nets their frame claims), and that arrive from the outside
//! world at egress addresses, interleaved with time passing and with configuration changes
//! (members moving, holds, policies, nets, the global space, a port detached). Input:
//! records (`vane_fuzz::Records`) on a `Switch` with three nets, four ports (one rate
//! limited), remote members and policies. Asserts: no panic; a packet delivered is IPv4
//! and goes to the attached, not held port that has its destination address; a packet a
//! port sent passes only with that port's own source address; a tunnel packet is
//! delivered only if the directory places its source on the host that sent it; egress
//! rewrites exactly the source to the port's egress address, and replies only the
//! destination to the instance's; a rewrite keeps a correct header checksum correct; and a
//! packet that is not passed on is left as it was (but for a reply from outside that the
//! receiving port's hold or limit drops after its rewrite).
#![no_main]

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use libfuzzer_sys::fuzz_target;
use vane_fuzz::{internet_checksum, Records};
use vane_switch::{
    DropReason, L4Proto, Location, NetConfig, NetId, PolicyRule, PortId, Switch, SwitchConfig,
    Verdict,
};
use vane_wire::Ipv4Packet;

const NET_A: NetId = 1;
const NET_B: NetId = 2;
const NET_C: NetId = 3;
/// Nets a tunnel frame may claim: the three, and one the switch does not know.
const NETS: [NetId; 4] = [NET_A, NET_B, NET_C, 4];
/// Ports an instance may write to: the four attached ones and one never attached.
const PORTS: [PortId; 5] = [PortId(0), PortId(1), PortId(2), PortId(3), PortId(9)];
/// Hosts a tunnel frame may come from: two that host members, one that hosts none.
const HOSTS: [u32; 3] = [7, 8, 9];
/// Members the directory may move around: remote ones and local ones.
const MEMBERS: [(NetId, [u8; 4]); 6] = [
    (NET_A, [10, 1, 0, 9]),
    (NET_B, [10, 2, 0, 9]),
    (NET_C, [10, 3, 0, 9]),
    (NET_A, [10, 1, 0, 1]),
    (NET_B, [10, 2, 0, 1]),
    (NET_A, [10, 1, 0, 77]),
];
/// Rules the controller may push, any subset.
const RULES: [PolicyRule; 5] = [
    PolicyRule {
        from: NET_A,
        to: NET_B,
        port: Some((L4Proto::Tcp, 80)),
    },
    PolicyRule {
        from: NET_B,
        to: NET_A,
        port: None,
    },
    PolicyRule {
        from: NET_C,
        to: NET_A,
        port: Some((L4Proto::Udp, 53)),
    },
    PolicyRule {
        from: NET_A,
        to: NET_C,
        port: None,
    },
    PolicyRule {
        from: NET_B,
        to: 4,
        port: None,
    },
];

fn net(id: NetId, subnet: &str, egress: bool) -> NetConfig {
    NetConfig {
        id,
        subnet: subnet.parse().unwrap(),
        egress,
    }
}

/// An attached port as the test knows it.
#[derive(Clone, Copy)]
struct Port {
    net: NetId,
    ip: Ipv4Addr,
    egress_ip: Ipv4Addr,
    held: bool,
}

/// The switch and what it was told, to check its verdicts against.
struct World {
    switch: Switch,
    now: Instant,
    ports: HashMap<PortId, Port>,
    members: HashMap<(NetId, Ipv4Addr), Location>,
    global_space: Ipv4Net,
    egress_space: Ipv4Net,
}

impl World {
    fn new() -> World {
        let cfg = SwitchConfig {
            max_flows: 16,
            ..SwitchConfig::default()
        };
        let (global_space, egress_space) = (cfg.global_space, cfg.egress_space);
        let mut switch = Switch::new(cfg);
        switch.upsert_net(net(NET_A, "10.1.0.0/16", true));
        switch.upsert_net(net(NET_B, "10.2.0.0/16", false));
        switch.upsert_net(net(NET_C, "10.3.0.0/24", false));
        let mut w = World {
            switch,
            now: Instant::now(),
            ports: HashMap::new(),
            members: HashMap::new(),
            global_space,
            egress_space,
        };
        w.attach(PortId(0), NET_A, Ipv4Addr::new(10, 1, 0, 1));
        w.attach(PortId(1), NET_A, Ipv4Addr::new(10, 1, 0, 2));
        w.attach(PortId(2), NET_B, Ipv4Addr::new(10, 2, 0, 1));
        w.attach(PortId(3), NET_C, Ipv4Addr::new(10, 3, 0, 1));
        // Slow enough that a few packets go over it.
        w.switch.set_port_rate(PortId(1), Some(100_000));
        w.set_member(0, Location::Remote(7));
        w.set_member(1, Location::Remote(8));
        w.set_member(2, Location::Remote(7));
        w.switch.set_policies(RULES[..3].to_vec());
        w
    }

    fn attach(&mut self, port: PortId, net: NetId, ip: Ipv4Addr) {
        let egress_ip = self.switch.attach_port(port, net, ip).expect("attachable");
        // As the directory does once the instance is placed here.
        self.switch.set_member(net, ip, Location::Local(port));
        self.ports.insert(
            port,
            Port {
                net,
                ip,
                egress_ip,
                held: false,
            },
        );
        self.members.insert((net, ip), Location::Local(port));
    }

    fn detach(&mut self, port: PortId) {
        self.switch.detach_port(port);
        if let Some(p) = self.ports.remove(&port) {
            if self.members.get(&(p.net, p.ip)) == Some(&Location::Local(port)) {
                self.members.remove(&(p.net, p.ip));
            }
        }
    }

    fn set_member(&mut self, which: usize, loc: Location) {
        let (net, ip) = MEMBERS[which % MEMBERS.len()];
        let ip = Ipv4Addr::from(ip);
        self.switch.set_member(net, ip, loc);
        self.members.insert((net, ip), loc);
    }

    fn remove_member(&mut self, which: usize) {
        let (net, ip) = MEMBERS[which % MEMBERS.len()];
        let ip = Ipv4Addr::from(ip);
        self.switch.remove_member(net, ip);
        self.members.remove(&(net, ip));
    }

    /// Checks a delivery to `to` of a packet now in `pkt`.
    fn check_delivery(&self, to: PortId, pkt: &[u8]) {
        let port = self.ports.get(&to).expect("delivered to an attached port");
        assert!(!port.held, "delivered to a held port");
        let ip = Ipv4Packet::new_checked(pkt).expect("a delivered packet is IPv4");
        assert_eq!(
            ip.dst(),
            port.ip,
            "delivered to a port without that address"
        );
    }

    fn packet_from_port(&mut self, sel: u8, pkt: &mut [u8]) {
        let port = PORTS[usize::from(sel) % PORTS.len()];
        let before = pkt.to_vec();
        let verdict = self.switch.process_from_port(port, pkt, self.now);
        let Some(sender) = self.ports.get(&port).copied() else {
            assert_eq!(verdict, Verdict::Drop(DropReason::UnknownPort));
            assert_eq!(pkt, &before[..]);
            return;
        };
        if sender.held {
            assert_eq!(verdict, Verdict::Drop(DropReason::Held));
        }
        if let Verdict::Drop(_) | Verdict::Unresolved { .. } = verdict {
            assert_eq!(pkt, &before[..], "a packet not passed on was changed");
            return;
        }
        let original = Ipv4Packet::new_checked(&before[..]).expect("only IPv4 passes");
        assert_eq!(original.src(), sender.ip, "a spoofed source passed");
        match verdict {
            Verdict::Deliver(to) => {
                assert_eq!(pkt, &before[..]);
                self.check_delivery(to, pkt);
            }
            Verdict::Forward {
                host,
                src_net,
                dst_net,
            } => {
                assert_eq!(pkt, &before[..]);
                assert_eq!(src_net, sender.net);
                let member = self.members.get(&(dst_net, original.dst()));
                assert_eq!(member, Some(&Location::Remote(host)));
            }
            Verdict::Egress => {
                let ip = Ipv4Packet::new_checked(&*pkt).expect("egress is IPv4");
                assert_eq!(ip.src(), sender.egress_ip);
                assert_eq!(ip.dst(), original.dst());
                assert!(!self.global_space.contains(&ip.dst()));
                assert!(!self.egress_space.contains(&ip.dst()));
                check_rewrite(&before, pkt, 12..16);
            }
            Verdict::Drop(_) | Verdict::Unresolved { .. } => unreachable!(),
        }
    }

    fn packet_from_tunnel(&mut self, body: &[u8]) {
        let Some((&[h, s, d], rest)) = body.split_first_chunk::<3>() else {
            return;
        };
        let from = HOSTS[usize::from(h) % HOSTS.len()];
        let src_net = NETS[usize::from(s) % NETS.len()];
        let dst_net = NETS[usize::from(d) % NETS.len()];
        let mut pkt = rest.to_vec();
        let verdict = self
            .switch
            .process_from_tunnel(from, src_net, dst_net, &mut pkt, self.now);
        assert_eq!(pkt, rest, "the switch changed a packet from the tunnel");
        match verdict {
            Verdict::Deliver(to) => {
                self.check_delivery(to, &pkt);
                let ip = Ipv4Packet::new_checked(&pkt[..]).unwrap();
                let sender = self.members.get(&(src_net, ip.src()));
                assert_eq!(sender, Some(&Location::Remote(from)), "wrong host passed");
                let receiver = self.members.get(&(dst_net, ip.dst()));
                assert_eq!(receiver, Some(&Location::Local(to)));
            }
            Verdict::Drop(_) => {}
            other => panic!("a tunnel packet got {other:?}"),
        }
    }

    fn packet_from_egress(&mut self, pkt: &mut [u8]) {
        let before = pkt.to_vec();
        match self.switch.process_from_egress(pkt, self.now) {
            Verdict::Deliver(to) => {
                let original = Ipv4Packet::new_checked(&before[..]).unwrap();
                let port = self.ports.get(&to).expect("delivered to an attached port");
                assert_eq!(original.dst(), port.egress_ip);
                let ip = Ipv4Packet::new_checked(&*pkt).unwrap();
                assert_eq!(ip.src(), original.src());
                check_rewrite(&before, pkt, 16..20);
                self.check_delivery(to, pkt);
            }
            // The receiving port's hold and limit apply after the rewrite: the packet may
            // have been rewritten, and is dropped all the same.
            Verdict::Drop(DropReason::Held | DropReason::RateLimited) => {}
            Verdict::Drop(_) => assert_eq!(pkt, &before[..]),
            other => panic!("a packet from outside got {other:?}"),
        }
    }

    fn advance(&mut self, body: &[u8]) {
        let ms = match body {
            [a, b, ..] => u64::from(u16::from_be_bytes([*a, *b])) * 10,
            [a] => u64::from(*a),
            [] => 1000,
        };
        self.now += Duration::from_millis(ms);
        if ms % 2 == 0 {
            self.switch.expire_flows(self.now);
        }
        for port in PORTS {
            let _ = self.switch.port_delay(port, self.now);
        }
    }

    fn change(&mut self, body: &[u8]) {
        let [what, a, b, ..] = *body else {
            return;
        };
        match what % 7 {
            0 => self.remove_member(usize::from(a)),
            1 => self.set_member(
                usize::from(a),
                Location::Remote(HOSTS[usize::from(b) % HOSTS.len()]),
            ),
            2 => {
                let port = PORTS[usize::from(a) % PORTS.len()];
                let held = b & 1 == 1;
                self.switch.hold_port(port, held);
                if let Some(p) = self.ports.get_mut(&port) {
                    p.held = held;
                }
            }
            3 => {
                let rules = (0..RULES.len())
                    .filter(|i| a & (1 << i) != 0)
                    .map(|i| RULES[i])
                    .collect();
                self.switch.set_policies(rules);
            }
            4 => {
                self.switch
                    .upsert_net(net(NET_A, "10.1.0.0/16", a & 1 == 1));
                let c = if b & 1 == 1 {
                    "10.3.0.0/16"
                } else {
                    "10.3.0.0/24"
                };
                self.switch.upsert_net(net(NET_C, c, b & 2 == 2));
            }
            5 => {
                let space = if a & 1 == 1 {
                    "10.0.0.0/15"
                } else {
                    "10.0.0.0/8"
                };
                self.global_space = space.parse().unwrap();
                self.switch.set_global_space(self.global_space);
            }
            _ => {
                if self.ports.contains_key(&PortId(1)) {
                    self.detach(PortId(1));
                } else {
                    self.attach(PortId(1), NET_A, Ipv4Addr::new(10, 1, 0, 2));
                }
            }
        }
    }
}

/// A packet whose address at `field` was rewritten: nothing else but the checksums
/// changed, and a correct header checksum stayed correct.
fn check_rewrite(before: &[u8], after: &[u8], field: std::ops::Range<usize>) {
    let header_len = usize::from(before[0] & 0x0f) * 4;
    for (i, (old, new)) in before.iter().zip(after).enumerate() {
        let may_change = field.contains(&i) || (10..12).contains(&i) || i >= header_len;
        assert!(may_change || old == new, "byte {i} changed in a rewrite");
    }
    if internet_checksum(&before[..header_len], 0) == 0 {
        assert_eq!(internet_checksum(&after[..header_len], 0), 0);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut world = World::new();
    for (tag, body) in Records::new(data) {
        match tag % 6 {
            0 => {
                if let Some((&sel, pkt)) = body.split_first() {
                    world.packet_from_port(sel, &mut pkt.to_vec());
                }
            }
            1 => world.packet_from_tunnel(body),
            2 => world.packet_from_egress(&mut body.to_vec()),
            3 => world.advance(body),
            _ => world.change(body),
        }
    }
    let counters = world.switch.drop_counters();
    let _ = format!("{counters:?}");
});
