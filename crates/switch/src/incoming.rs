//! The incoming check: a packet another host's switch sent through the tunnel,
//! checked again against this host's own tables.

use std::time::Instant;

use vane_wire::{Ipv4Packet, L4Ports};

use crate::flow::{FlowKey, NetFlow};
use crate::{parse_drop, DropReason, HostId, Location, NetId, Switch, Verdict};

impl Switch {
    /// A packet the switch of host `from` sent through their tunnel, claiming nets `src_net`
    /// and `dst_net`. Checked again against this host's own tables: the source must be a
    /// member of `src_net` that the directory places on `from`, the destination a local
    /// member of `dst_net`, and the packet must stay in one net, be allowed by a rule
    /// `src_net -> dst_net`, or belong to a known flow.
    pub fn process_from_tunnel(
        &mut self,
        from: HostId,
        src_net: NetId,
        dst_net: NetId,
        pkt: &mut [u8],
        now: Instant,
    ) -> Verdict {
        let len = pkt.len() as u64;
        let verdict = self.route_from_tunnel(from, src_net, dst_net, pkt, now);
        if let Verdict::Deliver(to) = verdict {
            self.service_reply(to, src_net, pkt, now);
        }
        self.account(len, verdict, now)
    }

    /// The incoming check for a packet from another host.
    fn route_from_tunnel(
        &mut self,
        from: HostId,
        src_net: NetId,
        dst_net: NetId,
        pkt: &mut [u8],
        now: Instant,
    ) -> Verdict {
        let ip = match Ipv4Packet::new_checked(&*pkt) {
            Ok(ip) => ip,
            Err(e) => return Verdict::Drop(parse_drop(e)),
        };
        let (src, dst) = (ip.src(), ip.dst());
        let Some(dst_cfg) = self.nets.get(&dst_net) else {
            return Verdict::Drop(DropReason::NoRoute);
        };
        if !dst_cfg.subnet.contains(&dst) {
            return Verdict::Drop(DropReason::NoRoute);
        }
        // Only local members: sending a tunnel packet on to a third host could loop between
        // switches whose tables disagree for a moment.
        let port = match self.member_verdict(src_net, dst_net, dst) {
            Verdict::Deliver(port) => port,
            _ => return Verdict::Drop(DropReason::NoRoute),
        };
        let Some(src_cfg) = self.nets.get(&src_net) else {
            return Verdict::Drop(DropReason::Refused);
        };
        if !src_cfg.subnet.contains(&src) {
            return Verdict::Drop(DropReason::Spoofed);
        }
        // Sender binding: a host speaks only for the members it hosts (or, for one that
        // moves, for it on its way between two hosts).
        if self.members.get(src_net, src) != Some(Location::Remote(from))
            && !self
                .moving
                .get(&(src_net, src))
                .is_some_and(|(a, b)| *a == from || *b == from)
        {
            return Verdict::Drop(DropReason::WrongHost);
        }
        if src_net == dst_net {
            return Verdict::Deliver(port);
        }
        let proto = ip.protocol();
        let ports = L4Ports::of(&ip);
        let flow = NetFlow {
            src_net,
            src_ip: u32::from(src),
            dst_net,
            dst_ip: u32::from(dst),
            proto,
            src_port: ports.src,
            dst_port: ports.dst,
        };
        if self.flows.touch(FlowKey::Net(flow), now)
            || self.flows.touch(FlowKey::Net(flow.reversed()), now)
        {
            return Verdict::Deliver(port);
        }
        if !self.policy.allows(src_net, dst_net, dst, proto, ports.dst) {
            return Verdict::Drop(DropReason::Refused);
        }
        // Recorded here too, so the local instance's replies pass on their way back out.
        if self.flows.open(FlowKey::Net(flow), now).is_err() {
            return Verdict::Drop(DropReason::FlowTableFull);
        }
        Verdict::Deliver(port)
    }
}
