//! Packet counters, kept as plain integers in the switch (no atomics: one switch core is
//! owned by one worker, and the shell reads the counters through `&Switch`).

use crate::DropReason;

/// Counters of one port (one local instance).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortCounters {
    /// Packets the instance sent (every packet read from its port, whatever the verdict).
    pub tx_packets: u64,
    /// Bytes of those packets.
    pub tx_bytes: u64,
    /// Packets delivered to the instance, from any source.
    pub rx_packets: u64,
    /// Bytes of those packets.
    pub rx_bytes: u64,
    /// Packets the instance sent that policy refused ([`DropReason::Refused`]).
    pub refused: u64,
    /// Packets the instance sent with a source address not its own ([`DropReason::Spoofed`]).
    pub spoofed: u64,
    /// Packets the instance sent that were dropped for any other reason.
    pub dropped: u64,
    /// Packets to or from the instance dropped over its bandwidth limit
    /// ([`DropReason::RateLimited`]).
    pub rate_limited: u64,
}

/// Drops of the whole switch, one counter per [`DropReason`], whatever the packet's origin.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropCounters {
    /// [`DropReason::Malformed`].
    pub malformed: u64,
    /// [`DropReason::NotIpv4`].
    pub not_ipv4: u64,
    /// [`DropReason::UnknownPort`].
    pub unknown_port: u64,
    /// [`DropReason::Spoofed`].
    pub spoofed: u64,
    /// [`DropReason::NoRoute`].
    pub no_route: u64,
    /// [`DropReason::Refused`].
    pub refused: u64,
    /// [`DropReason::NoEgress`].
    pub no_egress: u64,
    /// [`DropReason::FlowTableFull`].
    pub flow_table_full: u64,
    /// [`DropReason::RateLimited`].
    pub rate_limited: u64,
    /// [`DropReason::WrongHost`].
    pub wrong_host: u64,
    /// [`DropReason::Held`].
    pub held: u64,
}

impl DropCounters {
    /// The counter for `reason`.
    pub fn get(&self, reason: DropReason) -> u64 {
        *self.slot(reason)
    }

    /// Every reason with its counter, in declaration order (for metrics export).
    pub fn iter(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL.into_iter().map(|r| (r, self.get(r)))
    }

    pub(crate) fn bump(&mut self, reason: DropReason) {
        *self.slot_mut(reason) += 1;
    }

    fn slot(&self, reason: DropReason) -> &u64 {
        match reason {
            DropReason::Malformed => &self.malformed,
            DropReason::NotIpv4 => &self.not_ipv4,
            DropReason::UnknownPort => &self.unknown_port,
            DropReason::Spoofed => &self.spoofed,
            DropReason::NoRoute => &self.no_route,
            DropReason::Refused => &self.refused,
            DropReason::NoEgress => &self.no_egress,
            DropReason::FlowTableFull => &self.flow_table_full,
            DropReason::RateLimited => &self.rate_limited,
            DropReason::WrongHost => &self.wrong_host,
            DropReason::Held => &self.held,
        }
    }

    fn slot_mut(&mut self, reason: DropReason) -> &mut u64 {
        match reason {
            DropReason::Malformed => &mut self.malformed,
            DropReason::NotIpv4 => &mut self.not_ipv4,
            DropReason::UnknownPort => &mut self.unknown_port,
            DropReason::Spoofed => &mut self.spoofed,
            DropReason::NoRoute => &mut self.no_route,
            DropReason::Refused => &mut self.refused,
            DropReason::NoEgress => &mut self.no_egress,
            DropReason::FlowTableFull => &mut self.flow_table_full,
            DropReason::RateLimited => &mut self.rate_limited,
            DropReason::WrongHost => &mut self.wrong_host,
            DropReason::Held => &mut self.held,
        }
    }
}
