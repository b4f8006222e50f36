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

/// A [`FlowKey`] as the table stores it: three whole words. Building a key of the enum's
/// scattered fields and reading it back as words for hashing stalled the CPU's store
/// forwarding on every packet; whole words go from registers to the hasher directly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PackedKey([u64; 3]);

impl std::hash::Hash for PackedKey {
    // Three words, without the length prefix and byte loop of hashing an array.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        for word in self.0 {
            state.write_u64(word);
        }
    }
}

/// Marks an egress key in the third word (a net key leaves the bit clear).
const EGRESS: u64 = 1 << 63;

impl From<FlowKey> for PackedKey {
    #[inline(always)]
    fn from(key: FlowKey) -> Self {
        let ports =
            |proto: u8, a: u16, b: u16| u64::from(proto) << 32 | u64::from(a) << 16 | u64::from(b);
        match key {
            FlowKey::Net(f) => PackedKey([
                u64::from(f.src_net) << 32 | u64::from(f.src_ip),
                u64::from(f.dst_net) << 32 | u64::from(f.dst_ip),
                ports(f.proto, f.src_port, f.dst_port),
            ]),
            FlowKey::Egress(f) => PackedKey([
                u64::from(f.port.0) << 32 | u64::from(f.remote_ip),
                0,
                EGRESS | ports(f.proto, f.local_port, f.remote_port),
            ]),
        }
    }
}

impl PackedKey {
    fn proto(self) -> u8 {
        (self.0[2] >> 32) as u8
    }

    fn unpack(self) -> FlowKey {
        let [a, b, c] = self.0;
        let (proto, first_port, second_port) = (self.proto(), (c >> 16) as u16, c as u16);
        if c & EGRESS != 0 {
            FlowKey::Egress(EgressFlow {
                port: PortId((a >> 32) as u32),
                proto,
                remote_ip: a as u32,
                local_port: first_port,
                remote_port: second_port,
            })
        } else {
            FlowKey::Net(NetFlow {
                src_net: (a >> 32) as NetId,
                src_ip: a as u32,
                dst_net: (b >> 32) as NetId,
                dst_ip: b as u32,
                proto,
                src_port: first_port,
                dst_port: second_port,
            })
        }
    }
}

/// The table was full and the flow is new.
#[derive(Debug)]
pub(crate) struct Full;

#[derive(Debug)]
pub(crate) struct FlowTable {
    /// Last time a packet of the flow was seen.
    map: Map<PackedKey, Instant>,
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

    fn timeout(&self, key: PackedKey) -> Duration {
        if key.proto() == PROTO_TCP {
            self.tcp_timeout
        } else {
            self.other_timeout
        }
    }

    /// Refreshes `key` if it is a live flow, and says whether it was. An idle flow that
    /// `expire` has not removed yet counts as gone, so behaviour does not depend on how often
    /// the shell calls `expire`.
    #[inline]
    pub(crate) fn touch(&mut self, key: FlowKey, now: Instant) -> bool {
        let key = PackedKey::from(key);
        let timeout = self.timeout(key);
        match self.map.get_mut(&key) {
            Some(last_seen) if now.saturating_duration_since(*last_seen) < timeout => {
                *last_seen = now;
                true
            }
            _ => false,
        }
    }

    /// Records `key` as seen now, creating it if there is room.
    #[inline]
    pub(crate) fn open(&mut self, key: FlowKey, now: Instant) -> Result<(), Full> {
        let key = PackedKey::from(key);
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
        self.map.retain(|key, _| keep(&key.unpack()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_keys_round_trip_and_keep_the_kinds_apart() {
        let net = FlowKey::Net(NetFlow {
            src_net: u32::MAX,
            src_ip: 0x0a00_0001,
            dst_net: 7,
            dst_ip: u32::MAX,
            proto: 17,
            src_port: u16::MAX,
            dst_port: 53,
        });
        let egress = FlowKey::Egress(EgressFlow {
            port: PortId(u32::MAX),
            proto: 6,
            remote_ip: 0x0808_0808,
            local_port: 40000,
            remote_port: u16::MAX,
        });
        for key in [net, egress] {
            let packed = PackedKey::from(key);
            assert_eq!(packed.unpack(), key);
        }
        assert_eq!(PackedKey::from(net).proto(), 17);
        assert_eq!(PackedKey::from(egress).proto(), 6);
        // The same numbers as a net flow and as an egress flow are different flows.
        let lookalike = FlowKey::Net(NetFlow {
            src_net: u32::MAX,
            src_ip: 0x0808_0808,
            dst_net: 0,
            dst_ip: 0,
            proto: 6,
            src_port: 40000,
            dst_port: u16::MAX,
        });
        assert_ne!(PackedKey::from(lookalike), PackedKey::from(egress));
    }
}
