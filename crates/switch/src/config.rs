//! Settings the switch is built with, and the per-net settings the controller pushes.

use std::net::Ipv4Addr;
use std::time::Duration;

use ipnet::Ipv4Net;

use crate::NetId;

/// Cluster-wide settings of a switch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwitchConfig {
    /// The global virtual address space: every net's subnet lies inside it, and a destination
    /// inside it but outside the sender's net is cross-net traffic (policy applies), never
    /// egress.
    pub global_space: Ipv4Net,
    /// Addresses that instances' traffic to the outside world is rewritten to: the instance on
    /// port `p` gets `network + 1 + p`.
    pub egress_space: Ipv4Net,
    /// Idle time after which a TCP flow is forgotten.
    pub tcp_flow_timeout: Duration,
    /// Idle time after which a UDP, ICMP or other flow is forgotten.
    pub other_flow_timeout: Duration,
    /// Most flows (cross-net and egress together) held at once; beyond it new flows are
    /// refused, so memory stays bounded whatever instances send.
    pub max_flows: usize,
}

impl Default for SwitchConfig {
    fn default() -> Self {
        SwitchConfig {
            global_space: Ipv4Net::new_assert(Ipv4Addr::new(10, 0, 0, 0), 8),
            egress_space: Ipv4Net::new_assert(Ipv4Addr::new(100, 64, 0, 0), 10),
            tcp_flow_timeout: Duration::from_secs(300),
            other_flow_timeout: Duration::from_secs(60),
            max_flows: 65536,
        }
    }
}

/// A net as the switch needs to know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// Cluster-wide id.
    pub id: NetId,
    /// The net's subnet; members' addresses lie in it. Host bits are ignored.
    pub subnet: Ipv4Net,
    /// Whether members may reach addresses outside the global space (through egress NAT).
    pub egress: bool,
}
