//! Egress addresses: which address each port's traffic leaves the host with, and the
//! packets from the outside world that come to one: replies of egress flows, and new
//! flows to a port the instance publishes (the host's NAT sends those to its egress
//! address).

use std::net::Ipv4Addr;
use std::time::Instant;

use ipnet::Ipv4Net;
use vane_wire::{Ipv4Packet, L4Ports, PROTO_TCP, PROTO_UDP};

use crate::flow::{EgressFlow, FlowKey};
use crate::{parse_drop, DropReason, L4Proto, NetId, PortId, Switch, Verdict};

/// Outside addresses `from` may open flows to the published ports of net `to`'s instances
/// (to port `port` only, if set): a policy from an address range (`vane policy allow
/// 198.51.100.0/24 red`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutsideRule {
    pub from: Ipv4Net,
    pub to: NetId,
    pub port: Option<(L4Proto, u16)>,
}

impl Switch {
    /// A packet from the outside world to an egress address. It passes only as the reply of
    /// an egress flow a local instance opened; then its destination is rewritten in place to
    /// the instance's address.
    pub fn process_from_egress(&mut self, pkt: &mut [u8], now: Instant) -> Verdict {
        let len = pkt.len() as u64;
        let verdict = self.route_from_egress(pkt, now);
        self.account(len, verdict, now)
    }

    /// The egress address of `port`, if the egress space has one for it.
    pub(crate) fn egress_address(&self, port: PortId) -> Option<Ipv4Addr> {
        egress_address(self.cfg.egress_space, port)
    }

    /// Lets the outside world open flows to `published` ports of the instance on `port`
    /// (protocol and port), replacing what it had.
    pub fn set_published(&mut self, port: PortId, published: &[(crate::L4Proto, u16)]) {
        self.published.retain(|(p, _, _), _| *p != port);
        if !self.ports.contains_key(&port) {
            return;
        }
        for (proto, dst) in published {
            self.published.insert((port, proto.number(), *dst), ());
        }
    }

    /// Replaces the rules that say which outside addresses may open flows to the
    /// published ports of each net's instances. A net with no rule takes them from
    /// anywhere; one with rules, only from an address and to a port a rule allows. Flows
    /// already open stay (as a cross-net flow does when its policy goes, until its timeout).
    pub fn set_outside_rules(&mut self, rules: Vec<OutsideRule>) {
        self.outside.clear();
        for rule in rules {
            self.outside.entry(rule.to).or_default().push(rule);
        }
    }

    /// Whether a new flow from outside address `src` to port `dst` of `proto` of the
    /// instance on `port` passes its net's outside rules.
    fn outside_allows(&self, port: PortId, src: Ipv4Addr, proto: u8, dst: u16) -> bool {
        let Some(net) = self.ports.get(&port).map(|p| p.net) else {
            return false;
        };
        let Some(rules) = self.outside.get(&net) else {
            return true;
        };
        rules.iter().any(|r| {
            r.from.contains(&src) && r.port.is_none_or(|(p, n)| n == dst && p.number() == proto)
        })
    }

    /// The attached port whose egress address is `addr`, with the instance's own address.
    fn egress_port(&self, addr: Ipv4Addr) -> Option<(PortId, Ipv4Addr)> {
        let space = self.cfg.egress_space;
        if !space.contains(&addr) {
            return None;
        }
        let offset = u32::from(addr) - u32::from(space.network());
        let port = PortId(offset.checked_sub(1)?);
        let state = self.ports.get(&port)?;
        (state.egress_ip == addr).then_some((port, state.ip))
    }

    /// A packet from the outside world to an egress address.
    fn route_from_egress(&mut self, pkt: &mut [u8], now: Instant) -> Verdict {
        let mut ip = match Ipv4Packet::new_checked(pkt) {
            Ok(ip) => ip,
            Err(e) => return Verdict::Drop(parse_drop(e)),
        };
        let Some((port, instance_ip)) = self.egress_port(ip.dst()) else {
            return Verdict::Drop(DropReason::Refused);
        };
        let ports = L4Ports::of(&ip);
        let key = FlowKey::Egress(EgressFlow {
            port,
            proto: ip.protocol(),
            remote_ip: u32::from(ip.src()),
            local_port: ports.dst,
            remote_port: ports.src,
        });
        if !self.flows.touch(key, now) {
            // A new flow to a published port: a TCP connection opens with a SYN (any
            // other segment of no known flow is refused), a UDP flow with any datagram.
            let opens = match ip.protocol() {
                PROTO_TCP => ports.tcp_syn,
                PROTO_UDP => true,
                _ => false,
            };
            if !(opens
                && self
                    .published
                    .contains_key(&(port, ip.protocol(), ports.dst))
                && self.outside_allows(port, ip.src(), ip.protocol(), ports.dst))
            {
                return Verdict::Drop(DropReason::Refused);
            }
            if self.flows.open(key, now).is_err() {
                return Verdict::Drop(DropReason::FlowTableFull);
            }
        }
        ip.set_dst(instance_ip);
        Verdict::Deliver(port)
    }
}

/// The egress address of `port` in `space`, if the space has one for it: network + 1 +
/// port number, short of the broadcast address. The agent sends published ports' flows
/// there.
pub fn egress_address(space: Ipv4Net, port: PortId) -> Option<Ipv4Addr> {
    let size = 1u64 << (32 - u32::from(space.prefix_len()));
    let offset = u64::from(port.0) + 1;
    if offset + 1 >= size {
        return None;
    }
    let addr = u64::from(u32::from(space.network())) + offset;
    u32::try_from(addr).ok().map(Ipv4Addr::from)
}
