//! The sans-IO switch core: for each IPv4 packet, what happens to it.
//!
//! The switch is vane's security boundary (rules inside an instance only make refusals
//! friendly; a root program there can remove them). It sits between every instance's TUN
//! device and everything else, and implements the seeds' outgoing check (FIG. 6: the source
//! must be the sender's own address; the destination must be in the sender's net, allowed by
//! policy, or outside the global space with egress enabled) and incoming check (FIG. 7: a
//! packet from another host is checked again against this host's own tables).
//!
//! It does no I/O and reads no clock: the shell passes packets, where they came from and
//! `now`, and acts on the returned [`Verdict`]. That keeps the logic testable without
//! devices, namespaces or sleeping, and lets the shell batch and offload as it likes. The
//! `process_*` calls allocate nothing per packet (a new flow may grow the flow table) and
//! rewrite addresses in place.
//!
//! Modules: `table` (where members are), `policy` (compiled allow rules), `flow`
//! (stateful replies and egress NAT), `rate` (bandwidth limits), `counters`, `config`.

mod config;
mod counters;
mod flow;
mod policy;
mod rate;
mod table;
#[cfg(test)]
mod tests;

use std::fmt;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use vane_wire::{Ipv4Packet, L4Ports};

pub use config::{NetConfig, SwitchConfig};
pub use counters::{DropCounters, PortCounters};
pub use policy::{L4Proto, PolicyRule};
pub use rate::TokenBucket;

use flow::{EgressFlow, FlowKey, FlowTable, NetFlow};
use policy::Policy;
use table::MemberTable;

/// The switch's hash maps: keys come from packets that instances and other hosts write,
/// so the hash is seeded at random (no crafted collisions), and fast (a few nanoseconds
/// per probe, several probes per packet).
pub(crate) type Map<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// Cluster-wide id of a net, assigned by the controller.
pub type NetId = u32;

/// Cluster-wide id of a host, assigned by the controller.
pub type HostId = u32;

/// A local instance's TUN device, assigned by the agent. The switch knows which instance sent
/// a packet from the port it was read on, never from the packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortId(pub u32);

/// Where a member of a net is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Location {
    /// On this host, behind this port.
    Local(PortId),
    /// On another host.
    Remote(HostId),
}

/// What to do with a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Write it to this local port.
    Deliver(PortId),
    /// Send it through the tunnel to `host`, marked with both nets (the receiving switch
    /// checks it again).
    Forward {
        /// Host of the destination member.
        host: HostId,
        /// Net of the sender.
        src_net: NetId,
        /// Net of the destination member.
        dst_net: NetId,
    },
    /// The destination lies in net `dst_net`, whose table has no entry for it (yet): the
    /// shell holds the packet, asks the directory, and processes it again once the answer
    /// is in ([`Switch::set_member`]), or drops it if there is no such member. Nothing has
    /// been counted as dropped.
    Unresolved {
        /// Net in which the destination address was looked for.
        dst_net: NetId,
    },
    /// Hand it to the host's stack towards the outside world; the source address has been
    /// rewritten to the sender's egress address.
    Egress,
    /// Drop it.
    Drop(DropReason),
}

/// Why a packet was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// Not a well-formed IPv4 packet (truncated, bad header or total length).
    Malformed,
    /// Not IPv4 at all (for example IPv6).
    NotIpv4,
    /// Read from a port that is not attached.
    UnknownPort,
    /// The source address is not the sender's own (or not in the net a tunnel frame claims).
    Spoofed,
    /// No member has the destination address, or the destination cannot be routed.
    NoRoute,
    /// Policy does not allow it and it is not the reply of an allowed flow.
    Refused,
    /// Outside the global space, and the sender's net has no egress.
    NoEgress,
    /// It would open a new flow and the flow table is full.
    FlowTableFull,
    /// Over the bandwidth limit of the sending or the receiving port.
    RateLimited,
    /// A tunnel frame whose source member the directory does not place on the host whose
    /// session carried it: an enrolled host speaking for members it does not host.
    WrongHost,
    /// To or from a port on hold: its instance is being checkpointed, and its connections
    /// must neither move nor be answered by a kernel whose sockets are about to vanish.
    Held,
}

impl DropReason {
    /// Every reason, in declaration order.
    pub const ALL: [DropReason; 11] = [
        DropReason::Malformed,
        DropReason::NotIpv4,
        DropReason::UnknownPort,
        DropReason::Spoofed,
        DropReason::NoRoute,
        DropReason::Refused,
        DropReason::NoEgress,
        DropReason::FlowTableFull,
        DropReason::RateLimited,
        DropReason::WrongHost,
        DropReason::Held,
    ];

    /// A short snake_case name, for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::NotIpv4 => "not_ipv4",
            DropReason::UnknownPort => "unknown_port",
            DropReason::Spoofed => "spoofed",
            DropReason::NoRoute => "no_route",
            DropReason::Refused => "refused",
            DropReason::NoEgress => "no_egress",
            DropReason::FlowTableFull => "flow_table_full",
            DropReason::RateLimited => "rate_limited",
            DropReason::WrongHost => "wrong_host",
            DropReason::Held => "held",
        }
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why [`Switch::attach_port`] refused a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachError {
    /// The net has not been given to [`Switch::upsert_net`].
    UnknownNet {
        /// The port being attached.
        port: PortId,
        /// The unknown net.
        net: NetId,
    },
    /// The instance's address is outside its net's subnet.
    AddressOutsideNet {
        /// The port being attached.
        port: PortId,
        /// The instance's address.
        ip: Ipv4Addr,
        /// The net's subnet.
        subnet: ipnet::Ipv4Net,
    },
    /// The egress space has no address for this port number.
    NoEgressAddress {
        /// The port being attached.
        port: PortId,
        /// The configured egress space.
        space: ipnet::Ipv4Net,
    },
}

impl fmt::Display for AttachError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttachError::UnknownNet { port, net } => {
                write!(f, "cannot attach port {}: unknown net {net}", port.0)
            }
            AttachError::AddressOutsideNet { port, ip, subnet } => write!(
                f,
                "cannot attach port {}: address {ip} is outside its net's subnet {subnet}",
                port.0
            ),
            AttachError::NoEgressAddress { port, space } => write!(
                f,
                "cannot attach port {}: egress space {space} has no address for it",
                port.0
            ),
        }
    }
}

impl std::error::Error for AttachError {}

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
    ports: Map<PortId, PortState>,
    policy: Policy,
    flows: FlowTable,
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
            ports: Map::default(),
            policy: Policy::default(),
            flows,
            drops: DropCounters::default(),
        }
    }

    /// Adds a net or changes one. If its subnet changes, its cross-net flows are forgotten
    /// (they were allowed for addresses that may no longer be its); if egress is turned off,
    /// its members' egress flows are forgotten, so replies from outside stop at once.
    pub fn upsert_net(&mut self, mut net: NetConfig) {
        net.subnet = net.subnet.trunc();
        let id = net.id;
        if let Some(old) = self.nets.insert(id, net) {
            let subnet_changed = old.subnet != net.subnet;
            let egress_revoked = old.egress && !net.egress;
            let ports = &self.ports;
            self.flows.retain(|key| match key {
                FlowKey::Net(f) => !(subnet_changed && (f.src_net == id || f.dst_net == id)),
                FlowKey::Egress(f) => {
                    !(egress_revoked && ports.get(&f.port).is_some_and(|p| p.net == id))
                }
            });
        }
        self.policy.compile(&self.nets);
    }

    /// The cluster's global virtual address space, as its controller was created with: a
    /// destination inside it is cross-net traffic (policy applies), outside it egress. When
    /// it changes, every flow is forgotten (each was classified against the old space).
    pub fn set_global_space(&mut self, space: ipnet::Ipv4Net) {
        let space = space.trunc();
        if space != self.cfg.global_space {
            self.cfg.global_space = space;
            self.flows.retain(|_| false);
        }
    }

    /// The global virtual address space this switch classifies destinations with.
    pub fn global_space(&self) -> ipnet::Ipv4Net {
        self.cfg.global_space
    }

    /// Removes a net with its members, the local ports attached to it and every flow that
    /// involves it. Rules naming it stay, inert, until [`Switch::set_policies`] replaces them.
    pub fn remove_net(&mut self, id: NetId) {
        self.nets.remove(&id);
        self.members.remove_net(id);
        self.ports.retain(|_, p| p.net != id);
        let ports = &self.ports;
        self.flows.retain(|key| match key {
            FlowKey::Net(f) => f.src_net != id && f.dst_net != id,
            FlowKey::Egress(f) => ports.contains_key(&f.port),
        });
        self.policy.compile(&self.nets);
    }

    /// Replaces all allow rules. Flows that no rule allows any more are forgotten, so their
    /// replies stop too.
    pub fn set_policies(&mut self, rules: Vec<PolicyRule>) {
        self.policy.set_rules(rules, &self.nets);
        let policy = &self.policy;
        self.flows.retain(|key| match key {
            FlowKey::Net(f) => policy.allows(
                f.src_net,
                f.dst_net,
                Ipv4Addr::from(f.dst_ip),
                f.proto,
                f.dst_port,
            ),
            FlowKey::Egress(_) => true,
        });
    }

    /// Attaches a local instance's port, in net `net` with address `ip`, and makes it the
    /// member for `(net, ip)`. Returns the port's egress address (`egress_space` network + 1
    /// + port number). Attaching an attached port detaches it first (counters restart).
    pub fn attach_port(
        &mut self,
        port: PortId,
        net: NetId,
        ip: Ipv4Addr,
    ) -> Result<Ipv4Addr, AttachError> {
        let Some(cfg) = self.nets.get(&net) else {
            return Err(AttachError::UnknownNet { port, net });
        };
        if !cfg.subnet.contains(&ip) {
            return Err(AttachError::AddressOutsideNet {
                port,
                ip,
                subnet: cfg.subnet,
            });
        }
        let egress_ip = self
            .egress_address(port)
            .ok_or(AttachError::NoEgressAddress {
                port,
                space: self.cfg.egress_space,
            })?;
        self.detach_port(port);
        self.ports.insert(
            port,
            PortState {
                net,
                ip,
                egress_ip,
                counters: PortCounters::default(),
                limit: None,
                last_limited_peer: None,
                held: false,
            },
        );
        self.members.set(net, ip, Location::Local(port));
        Ok(egress_ip)
    }

    /// Detaches a port: it stops being a member (if it still was) and its egress flows are
    /// forgotten. Cross-net flows are kept: they are keyed by net and address, which belong
    /// to the instance, not the port, and stay valid when the instance moves to another host.
    pub fn detach_port(&mut self, port: PortId) {
        let Some(state) = self.ports.remove(&port) else {
            return;
        };
        if self.members.get(state.net, state.ip) == Some(Location::Local(port)) {
            self.members.remove(state.net, state.ip);
        }
        self.flows
            .retain(|key| !matches!(key, FlowKey::Egress(f) if f.port == port));
    }

    /// Limits what an attached port sends, and what is delivered to it, to `rate` bits per
    /// second each (`None`: unlimited). Packets over the limit are dropped and counted as
    /// [`DropReason::RateLimited`] and in the port's `rate_limited`.
    pub fn set_port_rate(&mut self, port: PortId, rate: Option<u64>) {
        if let Some(state) = self.ports.get_mut(&port) {
            state.limit = rate.map(|r| (TokenBucket::new(r), TokenBucket::new(r)));
        }
    }

    /// Puts a port on hold, or takes it off: while held, what the instance sends and what
    /// is sent to it are dropped ([`DropReason::Held`]). This is the network lock of a
    /// checkpoint: the instance's only way out is its port, so a held port keeps peers from
    /// moving its connections on while they are dumped, and keeps the kernel's answers for
    /// sockets that the dump took away (resets) from reaching the peers.
    pub fn hold_port(&mut self, port: PortId, held: bool) {
        if let Some(state) = self.ports.get_mut(&port) {
            state.held = held;
        }
    }

    /// How long the shell should wait before reading the next packet from `port`: while its
    /// own bandwidth bucket, or that of the limited local port it last sent to, is in debt.
    /// `None`: read now. Waiting is how limits shape traffic without loss (see `rate`);
    /// packets read regardless are dropped once a bucket is a full burst in debt.
    pub fn port_delay(&mut self, port: PortId, now: Instant) -> Option<Duration> {
        let state = self.ports.get_mut(&port)?;
        let own = state.limit.as_mut().and_then(|(tx, _)| tx.delay(now));
        let peer = state.last_limited_peer;
        let theirs = peer.and_then(|p| {
            let (_, rx) = self.ports.get_mut(&p)?.limit.as_mut()?;
            rx.delay(now)
        });
        match (own, theirs) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// Sets where member `ip` of `net` is.
    pub fn set_member(&mut self, net: NetId, ip: Ipv4Addr, loc: Location) {
        self.members.set(net, ip, loc);
    }

    /// Forgets member `ip` of `net`.
    pub fn remove_member(&mut self, net: NetId, ip: Ipv4Addr) {
        self.members.remove(net, ip);
    }

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

    /// A packet from the outside world to an egress address. It passes only as the reply of
    /// an egress flow a local instance opened; then its destination is rewritten in place to
    /// the instance's address.
    pub fn process_from_egress(&mut self, pkt: &mut [u8], now: Instant) -> Verdict {
        let len = pkt.len() as u64;
        let verdict = self.route_from_egress(pkt, now);
        self.account(len, verdict, now)
    }

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
        self.account(len, verdict, now)
    }

    /// Forgets flows idle for longer than their timeout. Call it periodically; an idle flow
    /// stops passing packets at its timeout whether or not this has run, this only frees the
    /// memory (and room in the table).
    pub fn expire_flows(&mut self, now: Instant) {
        self.flows.expire(now);
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

    /// The egress address of `port`, if the egress space has one for it: network + 1 +
    /// port number, short of the broadcast address.
    fn egress_address(&self, port: PortId) -> Option<Ipv4Addr> {
        let space = self.cfg.egress_space;
        let size = 1u64 << (32 - u32::from(space.prefix_len()));
        let offset = u64::from(port.0) + 1;
        if offset + 1 >= size {
            return None;
        }
        let addr = u64::from(u32::from(space.network())) + offset;
        u32::try_from(addr).ok().map(Ipv4Addr::from)
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

    /// The outgoing check (FIG. 6).
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
            return self.member_verdict(net.id, net.id, dst);
        }
        let proto = ip.protocol();
        let ports = L4Ports::of(&ip);
        if self.cfg.global_space.contains(&dst) {
            return self.cross_net_from_port(net.id, src, dst, proto, ports, now);
        }
        if !net.egress {
            return Verdict::Drop(DropReason::NoEgress);
        }
        if self.cfg.egress_space.contains(&dst) {
            // Another instance's egress address: going there through NAT would bypass the
            // isolation between nets.
            return Verdict::Drop(DropReason::Refused);
        }
        if !is_unicast_outside(dst) {
            return Verdict::Drop(DropReason::NoRoute);
        }
        let key = FlowKey::Egress(EgressFlow {
            port,
            proto,
            remote_ip: u32::from(dst),
            local_port: ports.src,
            remote_port: ports.dst,
        });
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

    /// The incoming check (FIG. 7) for a packet from another host.
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
        // Sender binding: a host speaks only for the members it hosts.
        if self.members.get(src_net, src) != Some(Location::Remote(from)) {
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
            return Verdict::Drop(DropReason::Refused);
        }
        ip.set_dst(instance_ip);
        Verdict::Deliver(port)
    }
}

fn parse_drop(e: vane_wire::Error) -> DropReason {
    match e {
        vane_wire::Error::NotIpv4 { .. } => DropReason::NotIpv4,
        _ => DropReason::Malformed,
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
