//! The sans-IO switch core: for each IPv4 packet, what happens to it.
//!
//! The switch is vane's security boundary (rules inside an instance only make refusals
//! friendly; a root program there can remove them). It sits between every instance's TUN
//! device and everything else, and implements the outgoing check (the source
//! must be the sender's own address; the destination must be in the sender's net, allowed by
//! policy, or outside the global space with egress enabled) and the incoming check (a
//! packet from another host is checked again against this host's own tables).
//!
//! It does no I/O and reads no clock: the shell passes packets, where they came from and
//! `now`, and acts on the returned [`Verdict`]. That keeps the logic testable without
//! devices, namespaces or sleeping, and lets the shell batch and offload as it likes. The
//! `process_*` calls allocate nothing per packet (a new flow may grow the flow table) and
//! rewrite addresses in place.
//!

//! Modules: `types` (ids, verdicts, drop reasons), `configure` (the configuration calls),
//! `outgoing` (the outgoing check), `incoming` (the incoming check), `egress` (egress
//! addresses and what comes back to them), `table` (where members are), `policy` (compiled
//! allow rules), `flow` (stateful replies and egress NAT), `service` (virtual IPs spread
//! over members), `rate` (bandwidth limits),
//! `counters`, `config`.

mod config;
mod configure;
mod counters;
mod egress;
mod flow;
mod incoming;
mod outgoing;
mod policy;
mod rate;
mod service;
mod table;
#[cfg(test)]
mod tests;
mod types;

use std::net::Ipv4Addr;
use std::time::Instant;

pub use config::{NetConfig, SwitchConfig};
pub use counters::{DropCounters, PortCounters};
pub use egress::{egress_address, OutsideRule};
pub use policy::{L4Proto, PolicyRule};
pub use rate::TokenBucket;
pub use service::ServiceConfig;
pub use types::{AttachError, DropReason, HostId, Location, NetId, PortId, Verdict};

use flow::FlowTable;
use policy::Policy;
use table::MemberTable;

/// The switch's hash maps: keys come from packets that instances and other hosts write,
/// so the hash is seeded at random (no crafted collisions), and fast (a few nanoseconds
/// per probe, several probes per packet).
pub(crate) type Map<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// A local instance as the switch knows it.
#[derive(Clone, Copy, Debug)]
struct PortState {
    net: NetId,
    ip: Ipv4Addr,
    egress_ip: Ipv4Addr,
    counters: PortCounters,
    /// Bandwidth limit of what the instance sends, and of what it receives.
    limit: Option<(TokenBucket, TokenBucket)>,
    /// The local port this one last delivered to, if that port has a limit: the sender waits
    /// while the receiver's bucket is in debt.
    last_limited_peer: Option<PortId>,
    /// On hold ([`Switch::hold_port`]): nothing passes to or from it.
    held: bool,
}

/// The switch of one host. See the crate docs.
///
/// Configuration calls (`upsert_net`, `set_policies`, `attach_port`, ...) may scan tables;
/// `process_*` calls cost a few hash probes and a scan of the sender's net's rules.
#[derive(Debug)]
pub struct Switch {
    cfg: SwitchConfig,
    nets: Map<NetId, NetConfig>,
    members: MemberTable,
    /// Members frozen while they move (`Location::Moving`), absent from `members`: few, for
    /// the sender check's slow path only.
    moving: Map<(NetId, Ipv4Addr), (HostId, HostId)>,
    ports: Map<PortId, PortState>,
    /// Ports of local instances that the outside world may open flows to (`vane run
    /// --publish`), as (port, IP protocol, destination port).
    published: Map<(PortId, u8, u16), ()>,
    /// Which outside addresses may open flows to published ports, by net (none: any).
    outside: Map<NetId, Vec<OutsideRule>>,
    policy: Policy,
    flows: FlowTable,
    /// Services' addresses and the flows sent to them.
    services: service::Services,
    drops: DropCounters,
}

impl Switch {
    /// An empty switch: no nets, no ports, no rules.
    pub fn new(cfg: SwitchConfig) -> Self {
        let flows = FlowTable::new(cfg.max_flows, cfg.tcp_flow_timeout, cfg.other_flow_timeout);
        Switch {
            cfg,
            nets: Map::default(),
            members: MemberTable::default(),
            moving: Map::default(),
            ports: Map::default(),
            published: Map::default(),
            outside: Map::default(),
            policy: Policy::default(),
            flows,
            services: service::Services::default(),
            drops: DropCounters::default(),
        }
    }

    /// Forgets flows idle for longer than their timeout. Call it periodically; an idle flow
    /// stops passing packets at its timeout whether or not this has run, this only frees the
    /// memory (and room in the table).
    pub fn expire_flows(&mut self, now: Instant) {
        self.flows.expire(now);
        self.expire_service_flows(now);
    }

    /// Counters of an attached port.
    pub fn port_counters(&self, port: PortId) -> Option<PortCounters> {
        self.ports.get(&port).map(|p| p.counters)
    }

    /// The net and address of an attached port.
    pub fn port_address(&self, port: PortId) -> Option<(NetId, Ipv4Addr)> {
        self.ports.get(&port).map(|p| (p.net, p.ip))
    }

    /// Drop counters of the whole switch.
    pub fn drop_counters(&self) -> DropCounters {
        self.drops
    }

    /// Flows currently held (cross-net and egress), expired ones not yet removed included.
    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    /// Flows to services currently held, expired ones not yet removed included.
    pub fn service_flow_count(&self) -> usize {
        self.services.flow_count()
    }

    /// Counts a verdict: delivery on the receiving port, drops globally. A delivery over the
    /// receiving port's bandwidth limit becomes a drop.
    fn account(&mut self, len: u64, verdict: Verdict, now: Instant) -> Verdict {
        match verdict {
            Verdict::Deliver(port) => {
                if let Some(state) = self.ports.get_mut(&port) {
                    if state.held {
                        self.drops.bump(DropReason::Held);
                        return Verdict::Drop(DropReason::Held);
                    }
                    if let Some((_, rx)) = &mut state.limit {
                        if !rx.take(len as usize, now) {
                            state.counters.rate_limited += 1;
                            self.drops.bump(DropReason::RateLimited);
                            return Verdict::Drop(DropReason::RateLimited);
                        }
                    }
                    state.counters.rx_packets += 1;
                    state.counters.rx_bytes += len;
                }
            }
            Verdict::Drop(reason) => self.drops.bump(reason),
            Verdict::Forward { .. } | Verdict::Egress | Verdict::Unresolved { .. } => {}
        }
        verdict
    }

    /// Where member `ip` of `net` is, as a verdict for a packet from net `src_net`. A member
    /// that points at a port no longer attached is treated as absent.
    fn member_verdict(&self, src_net: NetId, net: NetId, ip: Ipv4Addr) -> Verdict {
        match self.members.get(net, ip) {
            Some(Location::Local(port)) if self.ports.contains_key(&port) => Verdict::Deliver(port),
            Some(Location::Remote(host)) => Verdict::Forward {
                host,
                src_net,
                dst_net: net,
            },
            _ => Verdict::Unresolved { dst_net: net },
        }
    }
}

fn parse_drop(e: vane_wire::Error) -> DropReason {
    match e {
        vane_wire::Error::NotIpv4 { .. } => DropReason::NotIpv4,
        _ => DropReason::Malformed,
    }
}
