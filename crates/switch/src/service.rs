//! Services: a virtual IP in a net whose flows the switch spreads over the service's
//! members (`vane service create`, `vane run --service`).
//!
//! The switch that reads a client's packet to a service's address chooses a backend for
//! the flow, rewrites the destination to it, and routes the packet as one to that member
//! (locally or through the tunnel, the other host sees an ordinary member-to-member
//! packet). The backend's replies come back to the client's host, whose switch rewrites
//! their source back to the service's address before the client's device gets them, and
//! only for the flows it recorded itself: the incoming check runs first, unchanged.
//!
//! The choice is rendezvous hashing (highest hash of flow and backend wins), with a fixed
//! hash: every switch computes the same backend for the same flow from the same list,
//! whatever order the list came in, so a client switch that lost its table (an agent
//! restart) finds the same backends again, and a change of the list moves only the flows
//! of the backends that left. The table then keeps each flow on its choice for its life,
//! even when members are added; a backend that leaves the list (exited, its host dead) has
//! its flows forgotten at once, so their next packet chooses again (a TCP connection
//! then resets, which tells the client at once). A client is never its own backend while
//! another exists: its kernel would answer itself from its own address, not the service's.
//!
//! Bounded like the flow table: at `max_flows` service flows, new ones are refused.

use std::net::Ipv4Addr;
use std::time::Instant;

use vane_wire::{Ipv4Packet, L4Ports, PROTO_TCP, PROTO_UDP};

use crate::{DropReason, L4Proto, Map, NetId, PortId, Switch};

/// A service as the switch needs to know it: its net and address, the ports it answers
/// on, and the addresses of its running members.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceConfig {
    /// The service's net: its address and its members' are in its subnet.
    pub net: NetId,
    /// The service's virtual address.
    pub vip: Ipv4Addr,
    /// Ports the service answers on; packets to others are refused.
    pub ports: Vec<(L4Proto, u16)>,
    /// Members that take new flows.
    pub backends: Vec<Ipv4Addr>,
}

#[derive(Debug)]
pub(crate) struct Service {
    ports: Vec<(u8, u16)>,
    backends: Vec<Ipv4Addr>,
}

/// A flow from a client to a service, as the client sent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct ForwardKey {
    client_net: NetId,
    client: Ipv4Addr,
    client_port: u16,
    proto: u8,
    svc_net: NetId,
    vip: Ipv4Addr,
    port: u16,
}

/// The same flow as its backend's replies carry it (backend for the service's address).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct ReplyKey {
    client_net: NetId,
    client: Ipv4Addr,
    client_port: u16,
    proto: u8,
    svc_net: NetId,
    backend: Ipv4Addr,
    port: u16,
}

impl ForwardKey {
    fn reply(self, backend: Ipv4Addr) -> ReplyKey {
        ReplyKey {
            client_net: self.client_net,
            client: self.client,
            client_port: self.client_port,
            proto: self.proto,
            svc_net: self.svc_net,
            backend,
            port: self.port,
        }
    }
}

impl ReplyKey {
    fn forward(self, vip: Ipv4Addr) -> ForwardKey {
        ForwardKey {
            client_net: self.client_net,
            client: self.client,
            client_port: self.client_port,
            proto: self.proto,
            svc_net: self.svc_net,
            vip,
            port: self.port,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Chosen {
    backend: Ipv4Addr,
    last_seen: Instant,
}

/// Services and their flows.
#[derive(Debug, Default)]
pub(crate) struct Services {
    by_vip: Map<(NetId, Ipv4Addr), Service>,
    flows: Map<ForwardKey, Chosen>,
    /// For each flow, its service's address, found from a reply.
    replies: Map<ReplyKey, Ipv4Addr>,
}

impl Services {
    pub(crate) fn is_service(&self, net: NetId, addr: Ipv4Addr) -> bool {
        !self.by_vip.is_empty() && self.by_vip.contains_key(&(net, addr))
    }

    pub(crate) fn flow_count(&self) -> usize {
        self.flows.len()
    }
}

fn proto_number(proto: L4Proto) -> u8 {
    match proto {
        L4Proto::Tcp => PROTO_TCP,
        L4Proto::Udp => PROTO_UDP,
    }
}

/// A fixed 64-bit mix (splitmix64's finalizer): the same on every host, unlike the
/// switch's seeded maps.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl ForwardKey {
    fn weight(&self, backend: Ipv4Addr) -> u64 {
        let a = u64::from(self.client_net) << 32 | u64::from(u32::from(self.client));
        let b = u64::from(self.svc_net) << 32 | u64::from(u32::from(self.vip));
        let c =
            u64::from(self.proto) << 32 | u64::from(self.client_port) << 16 | u64::from(self.port);
        mix(mix(mix(mix(a) ^ b) ^ c) ^ u64::from(u32::from(backend)))
    }
}

impl Switch {
    /// Replaces the services. Flows whose service is gone, or whose backend left its list
    /// or whose port it no longer answers on, are forgotten: their next packet chooses
    /// again.
    pub fn set_services(&mut self, services: &[ServiceConfig]) {
        let svc = &mut self.services;
        svc.by_vip.clear();
        for s in services {
            let mut backends = s.backends.clone();
            backends.sort_unstable();
            backends.dedup();
            svc.by_vip.insert(
                (s.net, s.vip),
                Service {
                    ports: s
                        .ports
                        .iter()
                        .map(|(p, n)| (proto_number(*p), *n))
                        .collect(),
                    backends,
                },
            );
        }
        let by_vip = &svc.by_vip;
        svc.flows.retain(|key, chosen| {
            by_vip.get(&(key.svc_net, key.vip)).is_some_and(|s| {
                s.ports.contains(&(key.proto, key.port)) && s.backends.contains(&chosen.backend)
            })
        });
        let flows = &svc.flows;
        svc.replies.retain(|key, vip| {
            flows
                .get(&key.forward(*vip))
                .is_some_and(|c| c.backend == key.backend)
        });
    }

    /// Forgets service flows idle for longer than their timeout.
    pub(crate) fn expire_service_flows(&mut self, now: Instant) {
        let (tcp, other) = (self.cfg.tcp_flow_timeout, self.cfg.other_flow_timeout);
        let svc = &mut self.services;
        if svc.flows.is_empty() {
            return;
        }
        svc.flows.retain(|key, chosen| {
            let timeout = if key.proto == PROTO_TCP { tcp } else { other };
            now.saturating_duration_since(chosen.last_seen) < timeout
        });
        let flows = &svc.flows;
        svc.replies.retain(|key, vip| {
            flows
                .get(&key.forward(*vip))
                .is_some_and(|c| c.backend == key.backend)
        });
    }

    /// The backend of a packet from `client` in `client_net` to service address `vip` of
    /// `svc_net`: the flow's, or a new choice; the destination is rewritten to it.
    pub(crate) fn service_backend(
        &mut self,
        client_net: NetId,
        svc_net: NetId,
        ip: &mut Ipv4Packet<&mut [u8]>,
        now: Instant,
    ) -> Result<Ipv4Addr, DropReason> {
        let (client, vip, proto) = (ip.src(), ip.dst(), ip.protocol());
        let ports = L4Ports::of(ip);
        let timeout = if proto == PROTO_TCP {
            self.cfg.tcp_flow_timeout
        } else {
            self.cfg.other_flow_timeout
        };
        let svc = &mut self.services;
        let Some(service) = svc.by_vip.get(&(svc_net, vip)) else {
            return Err(DropReason::NoRoute);
        };
        if !service.ports.contains(&(proto, ports.dst)) {
            return Err(DropReason::Refused);
        }
        let key = ForwardKey {
            client_net,
            client,
            client_port: ports.src,
            proto,
            svc_net,
            vip,
            port: ports.dst,
        };
        let backend = match svc.flows.get_mut(&key) {
            Some(chosen) if now.saturating_duration_since(chosen.last_seen) < timeout => {
                chosen.last_seen = now;
                chosen.backend
            }
            old => {
                // Rendezvous: the backend with the highest weight for this flow, the
                // client itself only if it is the only one.
                let pick = |skip_self: bool| {
                    service
                        .backends
                        .iter()
                        .filter(|b| !(skip_self && client_net == svc_net && **b == client))
                        .max_by_key(|b| key.weight(**b))
                        .copied()
                };
                let Some(backend) = pick(true).or_else(|| pick(false)) else {
                    return Err(DropReason::NoRoute);
                };
                if let Some(stale) = old.map(|c| c.backend) {
                    svc.replies.remove(&key.reply(stale));
                } else if svc.flows.len() >= self.cfg.max_flows {
                    return Err(DropReason::FlowTableFull);
                }
                svc.flows.insert(
                    key,
                    Chosen {
                        backend,
                        last_seen: now,
                    },
                );
                svc.replies.insert(key.reply(backend), vip);
                backend
            }
        };
        ip.set_dst(backend);
        Ok(backend)
    }

    /// A packet about to be delivered to local port `to` from a member of `src_net`: if it
    /// is the reply of a service flow this switch recorded, its source becomes the
    /// service's address again.
    pub(crate) fn service_reply(
        &mut self,
        to: PortId,
        src_net: NetId,
        pkt: &mut [u8],
        now: Instant,
    ) {
        if self.services.replies.is_empty() {
            return;
        }
        let Some(client_net) = self.ports.get(&to).map(|p| p.net) else {
            return;
        };
        let Ok(mut ip) = Ipv4Packet::new_checked(pkt) else {
            return;
        };
        let ports = L4Ports::of(&ip);
        let key = ReplyKey {
            client_net,
            client: ip.dst(),
            client_port: ports.dst,
            proto: ip.protocol(),
            svc_net: src_net,
            backend: ip.src(),
            port: ports.src,
        };
        let svc = &mut self.services;
        let Some(vip) = svc.replies.get(&key).copied() else {
            return;
        };
        if let Some(chosen) = svc.flows.get_mut(&key.forward(vip)) {
            chosen.last_seen = now;
        }
        ip.set_src(vip);
    }
}
