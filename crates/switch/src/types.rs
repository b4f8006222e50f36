//! The switch's public vocabulary: the ids of nets, hosts and ports, where a member is,
//! the verdict on a packet and why one was dropped, and why a port was refused.

use std::fmt;
use std::net::Ipv4Addr;

#[cfg(doc)]
use crate::Switch;

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
    /// Frozen while it moves from host `from` to host `to` (either may be this one): packets
    /// for it are `Unresolved` (the shell holds them for the directory's answer, given once
    /// it runs again), and packets from it are taken from either host, whichever speaks
    /// for it first.
    Moving { from: HostId, to: HostId },
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
