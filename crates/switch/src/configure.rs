//! The configuration calls of [`Switch`]: nets, the global space, policies, ports (their
//! attachment, bandwidth limits and hold) and members.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::flow::FlowKey;
#[cfg(doc)]
use crate::DropReason;
use crate::{
    AttachError, Location, NetConfig, NetId, PolicyRule, PortCounters, PortId, PortState, Switch,
    TokenBucket,
};

impl Switch {
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
        self.moving.retain(|(net, _), _| *net != id);
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

    /// Attaches a local instance's port, in net `net` with address `ip` (what it may send
    /// from). Returns the port's egress address (`egress_space` network + 1 + port number).
    /// Attaching an attached port detaches it first (counters restart).
    ///
    /// The port does not become the member for `(net, ip)`: only the directory says where a
    /// member is (`set_member` with `Location::Local`), so that a copy of an instance
    /// attached ahead of a migration's end draws no traffic from the copy still running.
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
        self.published.retain(|(p, _, _), _| *p != port);
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
        match loc {
            Location::Moving { from, to } => {
                self.members.remove(net, ip);
                self.moving.insert((net, ip), (from, to));
            }
            loc => {
                self.moving.remove(&(net, ip));
                self.members.set(net, ip, loc);
            }
        }
    }

    /// Forgets member `ip` of `net`.
    pub fn remove_member(&mut self, net: NetId, ip: Ipv4Addr) {
        self.moving.remove(&(net, ip));
        self.members.remove(net, ip);
    }
}
