//! The member table: where each (net, virtual IP) lives.
//!
//! This is the seeds' per-net forwarding table, flattened into one hash map keyed by
//! `(net, ip)`: nets may use the same addresses (overlapping tenant ranges), so the net id is
//! part of every key, and a single map gives one O(1) probe per packet however many nets and
//! members there are.

use std::net::Ipv4Addr;

use crate::{Location, Map, NetId};

#[derive(Debug, Default)]
pub(crate) struct MemberTable {
    map: Map<(NetId, u32), Location>,
}

impl MemberTable {
    pub(crate) fn get(&self, net: NetId, ip: Ipv4Addr) -> Option<Location> {
        self.map.get(&(net, u32::from(ip))).copied()
    }

    pub(crate) fn set(&mut self, net: NetId, ip: Ipv4Addr, loc: Location) {
        self.map.insert((net, u32::from(ip)), loc);
    }

    pub(crate) fn remove(&mut self, net: NetId, ip: Ipv4Addr) -> Option<Location> {
        self.map.remove(&(net, u32::from(ip)))
    }

    /// Forgets every member of `net`. Scans the table: a control-plane operation.
    pub(crate) fn remove_net(&mut self, net: NetId) {
        self.map.retain(|&(n, _), _| n != net);
    }
}
