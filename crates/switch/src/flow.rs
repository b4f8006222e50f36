//! The flow table: what makes policy stateful.
//!
//! A rule A -> B lets A open flows to B; B's replies must pass although no rule B -> A
//! exists, and B must still not open flows of its own. So every flow a rule allowed is
//! recorded under its opener's direction, and a packet the rules refuse passes only if it is
//! the reverse of a recorded flow. Egress NAT needs the same thing for the outside world:
//! only replies to flows an instance opened may come back in.
//!
//! Entries time out when idle and the table is bounded: instances and the outside world
//! choose what goes in, so memory must not grow with what they send. When full, new flows
//! are refused (existing ones keep working) instead of evicting: eviction would let a
//! flooding instance break other instances' established connections.

use std::time::{Duration, Instant};

use vane_wire::PROTO_TCP;

use crate::{Map, NetId, PortId};

/// A cross-net flow, in the direction of the packet that opened it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct NetFlow {
    pub(crate) src_net: NetId,
    pub(crate) src_ip: u32,
    pub(crate) dst_net: NetId,
    pub(crate) dst_ip: u32,
    pub(crate) proto: u8,
    pub(crate) src_port: u16,
    pub(crate) dst_port: u16,
}

impl NetFlow {
    /// The key a packet going the other way would have.
    pub(crate) fn reversed(self) -> NetFlow {
        NetFlow {
            src_net: self.dst_net,
            src_ip: self.dst_ip,
            dst_net: self.src_net,
            dst_ip: self.src_ip,
            proto: self.proto,
            src_port: self.dst_port,
            dst_port: self.src_port,
        }
    }
}

/// A flow from a local instance to the outside world through egress NAT. The port stands for
/// both the instance and its egress address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct EgressFlow {
    pub(crate) port: PortId,
    pub(crate) proto: u8,
    pub(crate) remote_ip: u32,
    pub(crate) local_port: u16,
    pub(crate) remote_port: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum FlowKey {
    Net(NetFlow),
    Egress(EgressFlow),
}

impl FlowKey {
    fn proto(&self) -> u8 {
        match self {
            FlowKey::Net(f) => f.proto,
            FlowKey::Egress(f) => f.proto,
        }
    }
}

/// The table was full and the flow is new.
#[derive(Debug)]
pub(crate) struct Full;

#[derive(Debug)]
pub(crate) struct FlowTable {
    /// Last time a packet of the flow was seen.
    map: Map<FlowKey, Instant>,
    max: usize,
    tcp_timeout: Duration,
    other_timeout: Duration,
}

impl FlowTable {
    pub(crate) fn new(max: usize, tcp_timeout: Duration, other_timeout: Duration) -> Self {
        FlowTable {
            map: Map::default(),
            max,
            tcp_timeout,
            other_timeout,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    fn timeout(&self, key: &FlowKey) -> Duration {
        if key.proto() == PROTO_TCP {
            self.tcp_timeout
        } else {
            self.other_timeout
        }
    }

    /// Refreshes `key` if it is a live flow, and says whether it was. An idle flow that
    /// `expire` has not removed yet counts as gone, so behaviour does not depend on how often
    /// the shell calls `expire`.
    pub(crate) fn touch(&mut self, key: FlowKey, now: Instant) -> bool {
        let timeout = self.timeout(&key);
        match self.map.get_mut(&key) {
            Some(last_seen) if now.saturating_duration_since(*last_seen) < timeout => {
                *last_seen = now;
                true
            }
            _ => false,
        }
    }

    /// Records `key` as seen now, creating it if there is room.
    pub(crate) fn open(&mut self, key: FlowKey, now: Instant) -> Result<(), Full> {
        if let Some(last_seen) = self.map.get_mut(&key) {
            *last_seen = now;
            return Ok(());
        }
        if self.map.len() >= self.max {
            return Err(Full);
        }
        self.map.insert(key, now);
        Ok(())
    }

    /// Removes flows idle for longer than their timeout.
    pub(crate) fn expire(&mut self, now: Instant) {
        let (tcp, other) = (self.tcp_timeout, self.other_timeout);
        self.map.retain(|key, last_seen| {
            let timeout = if key.proto() == PROTO_TCP { tcp } else { other };
            now.saturating_duration_since(*last_seen) < timeout
        });
    }

    /// Keeps only the flows for which `keep` is true.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&FlowKey) -> bool) {
        self.map.retain(|key, _| keep(key));
    }
}
