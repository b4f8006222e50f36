//! The outgoing check: what a local instance sends, to its own net, across nets
//! inside the global space (policy and flows), or out through egress NAT.

use std::net::Ipv4Addr;
use std::time::Instant;

use vane_wire::{Ipv4Packet, L4Ports};

use crate::flow::{EgressFlow, FlowKey, NetFlow};
use crate::{parse_drop, DropReason, NetId, PortId, PortState, Switch, Verdict};

impl Switch {
    /// A packet read from a local instance's port. On [`Verdict::Egress`] its source address
    /// has been rewritten in place.
    pub fn process_from_port(&mut self, port: PortId, pkt: &mut [u8], now: Instant) -> Verdict {
        let len = pkt.len() as u64;
        let Some(state) = self.ports.get_mut(&port) else {
            return self.account(len, Verdict::Drop(DropReason::UnknownPort), now);
        };
        state.counters.tx_packets += 1;
        state.counters.tx_bytes += len;
        if state.held {
            state.counters.dropped += 1;
            return self.account(len, Verdict::Drop(DropReason::Held), now);
        }
        if let Some((tx, _)) = &mut state.limit {
            if !tx.take(pkt.len(), now) {
                state.counters.rate_limited += 1;
                return self.account(len, Verdict::Drop(DropReason::RateLimited), now);
            }
        }
        let state = *state;
        let routed = self.route_from_port(port, &state, pkt, now);
        if let Verdict::Deliver(to) = routed {
            self.service_reply(to, state.net, pkt, now);
        }
        // A limited receiver makes this sender wait (`port_delay`) while it is in debt.
        let peer = match routed {
            Verdict::Deliver(to) if self.ports.get(&to).is_some_and(|p| p.limit.is_some()) => {
                Some(to)
            }
            _ => None,
        };
        // The port's entry again only when something changes (one probe less per packet).
        let changed = peer != state.last_limited_peer || matches!(routed, Verdict::Drop(_));
        if let Some(state) = self.ports.get_mut(&port).filter(|_| changed) {
            state.last_limited_peer = peer;
            if let Verdict::Drop(reason) = routed {
                match reason {
                    DropReason::Refused => state.counters.refused += 1,
                    DropReason::Spoofed => state.counters.spoofed += 1,
                    _ => state.counters.dropped += 1,
                }
            }
        }
        // Over the receiver's limit, counted on the receiver.
        self.account(len, routed, now)
    }

    /// The outgoing check.
    fn route_from_port(
        &mut self,
        port: PortId,
        sender: &PortState,
        pkt: &mut [u8],
        now: Instant,
    ) -> Verdict {
        let mut ip = match Ipv4Packet::new_checked(pkt) {
            Ok(ip) => ip,
            Err(e) => return Verdict::Drop(parse_drop(e)),
        };
        let (src, dst) = (ip.src(), ip.dst());
        if src != sender.ip {
            return Verdict::Drop(DropReason::Spoofed);
        }
        let Some(net) = self.nets.get(&sender.net).copied() else {
            // remove_net detaches the net's ports, so this is unreachable; be safe anyway.
            return Verdict::Drop(DropReason::UnknownPort);
        };
        if net.subnet.contains(&dst) {
            if self.services.is_service(net.id, dst) {
                return match self.service_backend(net.id, net.id, &mut ip, now) {
                    Ok(backend) => self.member_verdict(net.id, net.id, backend),
                    Err(reason) => Verdict::Drop(reason),
                };
            }
            return self.member_verdict(net.id, net.id, dst);
        }
        let proto = ip.protocol();
        let ports = L4Ports::of(&ip);
        if self.cfg.global_space.contains(&dst) {
            // A service of a net a rule lets this one reach: its backend is the destination,
            // checked again below like any member.
            let mut dst = dst;
            if let Some(dst_net) = self.policy.route(net.id, dst, proto, ports.dst) {
                if self.services.is_service(dst_net, dst) {
                    match self.service_backend(net.id, dst_net, &mut ip, now) {
                        Ok(backend) => dst = backend,
                        Err(reason) => return Verdict::Drop(reason),
                    }
                }
            }
            return self.cross_net_from_port(net.id, src, dst, proto, ports, now);
        }
        let key = FlowKey::Egress(EgressFlow {
            port,
            proto,
            remote_ip: u32::from(dst),
            local_port: ports.src,
            remote_port: ports.dst,
        });
        if !net.egress {
            // Without egress, only the replies of flows the outside world opened to a
            // published port leave.
            if !self.flows.touch(key, now) {
                return Verdict::Drop(DropReason::NoEgress);
            }
            ip.set_src(sender.egress_ip);
            return Verdict::Egress;
        }
        if self.cfg.egress_space.contains(&dst) {
            // Another instance's egress address: going there through NAT would bypass the
            // isolation between nets.
            return Verdict::Drop(DropReason::Refused);
        }
        if !is_unicast_outside(dst) {
            return Verdict::Drop(DropReason::NoRoute);
        }
        // Open the flow before rewriting, so a refused packet is left as it was.
        if self.flows.open(key, now).is_err() {
            return Verdict::Drop(DropReason::FlowTableFull);
        }
        ip.set_src(sender.egress_ip);
        Verdict::Egress
    }

    /// A packet from a local instance to another net inside the global space.
    fn cross_net_from_port(
        &mut self,
        net: NetId,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        proto: u8,
        ports: L4Ports,
        now: Instant,
    ) -> Verdict {
        if let Some(dst_net) = self.policy.route(net, dst, proto, ports.dst) {
            let verdict = self.member_verdict(net, dst_net, dst);
            if !matches!(verdict, Verdict::Deliver(_) | Verdict::Forward { .. }) {
                return verdict;
            }
            let flow = NetFlow {
                src_net: net,
                src_ip: u32::from(src),
                dst_net,
                dst_ip: u32::from(dst),
                proto,
                src_port: ports.src,
                dst_port: ports.dst,
            };
            // With rules both ways, this may be the reply of a flow the other side opened:
            // refresh that one rather than record the same conversation twice.
            let known = self.flows.touch(FlowKey::Net(flow), now)
                || self.flows.touch(FlowKey::Net(flow.reversed()), now);
            if !known && self.flows.open(FlowKey::Net(flow), now).is_err() {
                return Verdict::Drop(DropReason::FlowTableFull);
            }
            return verdict;
        }
        // No rule lets this net open the flow: pass it only as the reply of a flow that a net
        // with a rule into this one opened. Which net that is, the flow tells.
        for opener in self.policy.openers(net) {
            if !opener.subnet.contains(&dst) {
                continue;
            }
            let opened = NetFlow {
                src_net: opener.net,
                src_ip: u32::from(dst),
                dst_net: net,
                dst_ip: u32::from(src),
                proto,
                src_port: ports.dst,
                dst_port: ports.src,
            };
            if self.flows.touch(FlowKey::Net(opened), now) {
                return self.member_verdict(net, opener.net, dst);
            }
        }
        Verdict::Drop(DropReason::Refused)
    }
}

/// Whether `addr` can be a destination in the outside world: not "this network", loopback,
/// link-local, multicast, reserved or broadcast. Instances must not reach the host's own
/// loopback or spray multicast out of the host.
fn is_unicast_outside(addr: Ipv4Addr) -> bool {
    let first = addr.octets()[0];
    !(first == 0
        || addr.is_loopback()
        || addr.is_link_local()
        || addr.is_multicast()
        || first >= 240)
}
