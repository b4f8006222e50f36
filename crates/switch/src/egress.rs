//! Egress addresses: which address each port's traffic leaves the host with, and the
//! packets from the outside world that come to one: replies of egress flows, and new
//! flows to a port the instance publishes (the host's NAT sends those to its egress
//! address).

use std::net::Ipv4Addr;
use std::time::Instant;

use ipnet::Ipv4Net;
use vane_wire::{Ipv4Packet, L4Ports, PROTO_TCP, PROTO_UDP};

use crate::flow::{EgressFlow, FlowKey};
use crate::{parse_drop, DropReason, PortId, Switch, Verdict};

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
            let proto = match proto {
                crate::L4Proto::Tcp => PROTO_TCP,
                crate::L4Proto::Udp => PROTO_UDP,
            };
            self.published.insert((port, proto, *dst), ());
        }
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
                    .contains_key(&(port, ip.protocol(), ports.dst)))
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
