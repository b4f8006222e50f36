//! The member table: where each (net, virtual IP) lives.
//!
//! This is the per-net forwarding table, flattened into one table keyed by
//! `(net, ip)`: nets may use the same addresses (overlapping tenant ranges), so the net id is
//! part of every key, and a single table gives one probe per packet however many nets and
//! members there are.
//!
//! It is an open-addressing table with linear probing whose 16-byte slots hold the key and
//! the location side by side, so that a lookup in a table larger than the CPU caches costs
//! one cache miss. A general-purpose map (hashbrown) keeps its control bytes apart from its
//! entries: two misses per lookup, which made the lookup the switch's largest cost with
//! 100,000 members. Removal shifts the following entries back instead of leaving
//! tombstones, so lookups never slow down as members come and go.

use std::hash::BuildHasher;
use std::net::Ipv4Addr;

use crate::{Location, NetId};

/// A slot: `key` is `net << 32 | ip`, `loc` the encoded location, 0 when the slot is empty.
#[derive(Clone, Copy, Debug, Default)]
struct Slot {
    key: u64,
    loc: u64,
}

const LOCAL: u64 = 1 << 32;
const REMOTE: u64 = 2 << 32;
const MIN_SLOTS: usize = 16;

fn encode(loc: Location) -> u64 {
    match loc {
        Location::Local(port) => LOCAL | u64::from(port.0),
        Location::Remote(host) => REMOTE | u64::from(host),
        // The switch keeps moving members apart (`Switch::set_member`).
        Location::Moving { .. } => unreachable!("a moving member is not kept in the table"),
    }
}

fn decode(loc: u64) -> Location {
    let id = loc as u32;
    if loc & LOCAL != 0 {
        Location::Local(crate::PortId(id))
    } else {
        Location::Remote(id)
    }
}

fn key(net: NetId, ip: Ipv4Addr) -> u64 {
    u64::from(net) << 32 | u64::from(u32::from(ip))
}

#[derive(Debug)]
pub(crate) struct MemberTable {
    /// A power of two long, never more than 7/8 full.
    slots: Box<[Slot]>,
    len: usize,
    /// Seeded per process: members are chosen by tenants, so where they land must not be
    /// predictable enough to pile them up in one run of slots.
    hasher: foldhash::fast::RandomState,
}

impl Default for MemberTable {
    fn default() -> Self {
        MemberTable {
            slots: vec![Slot::default(); MIN_SLOTS].into_boxed_slice(),
            len: 0,
            hasher: foldhash::fast::RandomState::default(),
        }
    }
}

impl MemberTable {
    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    fn home(&self, key: u64) -> usize {
        self.hasher.hash_one(key) as usize & self.mask()
    }

    /// The slot holding `key`, or the empty slot where it would go.
    fn find(&self, key: u64) -> (usize, bool) {
        let mask = self.mask();
        let mut i = self.home(key);
        loop {
            let slot = self.slots[i];
            if slot.loc == 0 {
                return (i, false);
            }
            if slot.key == key {
                return (i, true);
            }
            i = (i + 1) & mask;
        }
    }

    pub(crate) fn get(&self, net: NetId, ip: Ipv4Addr) -> Option<Location> {
        match self.find(key(net, ip)) {
            (i, true) => Some(decode(self.slots[i].loc)),
            _ => None,
        }
    }

    pub(crate) fn set(&mut self, net: NetId, ip: Ipv4Addr, loc: Location) {
        if (self.len + 1) * 8 > self.slots.len() * 7 {
            self.resize(self.slots.len() * 2);
        }
        let key = key(net, ip);
        let (i, found) = self.find(key);
        if !found {
            self.len += 1;
        }
        self.slots[i] = Slot {
            key,
            loc: encode(loc),
        };
    }

    pub(crate) fn remove(&mut self, net: NetId, ip: Ipv4Addr) -> Option<Location> {
        let (mut hole, found) = self.find(key(net, ip));
        if !found {
            return None;
        }
        let removed = decode(self.slots[hole].loc);
        self.len -= 1;
        // Move back every later entry of the run that may sit in the hole: one whose home is
        // not cyclically inside (hole, i].
        let mask = self.mask();
        let mut i = hole;
        loop {
            i = (i + 1) & mask;
            let slot = self.slots[i];
            if slot.loc == 0 {
                break;
            }
            let home = self.home(slot.key);
            if (i.wrapping_sub(home) & mask) >= (i.wrapping_sub(hole) & mask) {
                self.slots[hole] = slot;
                hole = i;
            }
        }
        self.slots[hole] = Slot::default();
        Some(removed)
    }

    /// Forgets every member of `net`. Rebuilds the table: a control-plane operation.
    pub(crate) fn remove_net(&mut self, net: NetId) {
        let kept: Vec<Slot> = self
            .slots
            .iter()
            .filter(|s| s.loc != 0 && (s.key >> 32) as NetId != net)
            .copied()
            .collect();
        let mut size = MIN_SLOTS;
        while kept.len() * 8 > size * 7 {
            size *= 2;
        }
        self.rebuild(size, kept);
    }

    fn resize(&mut self, size: usize) {
        let kept: Vec<Slot> = self.slots.iter().filter(|s| s.loc != 0).copied().collect();
        self.rebuild(size, kept);
    }

    fn rebuild(&mut self, size: usize, entries: Vec<Slot>) {
        self.slots = vec![Slot::default(); size].into_boxed_slice();
        self.len = entries.len();
        for slot in entries {
            let (i, _) = self.find(slot.key);
            self.slots[i] = slot;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::PortId;

    /// A small deterministic generator, so that a failure replays.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
    }

    #[test]
    fn behaves_like_a_map_through_inserts_removals_and_growth() {
        let mut table = MemberTable::default();
        let mut model: HashMap<(NetId, u32), Location> = HashMap::new();
        let mut rng = Lcg(7);
        for step in 0..200_000u32 {
            // Few nets and a narrow address range, so that keys collide, runs form and
            // removals shift entries back.
            let net = (rng.next() % 3) as NetId;
            let ip = (rng.next() % 4096) as u32;
            let addr = Ipv4Addr::from(ip);
            match rng.next() % 10 {
                0..=5 => {
                    let loc = if step % 2 == 0 {
                        Location::Local(PortId(step))
                    } else {
                        Location::Remote(u32::MAX - step)
                    };
                    table.set(net, addr, loc);
                    model.insert((net, ip), loc);
                }
                6..=8 => assert_eq!(table.remove(net, addr), model.remove(&(net, ip))),
                _ => assert_eq!(table.get(net, addr), model.get(&(net, ip)).copied()),
            }
            assert_eq!(table.len, model.len());
        }
        for (&(net, ip), &loc) in &model {
            assert_eq!(table.get(net, Ipv4Addr::from(ip)), Some(loc));
        }
        table.remove_net(1);
        model.retain(|&(net, _), _| net != 1);
        assert_eq!(table.len, model.len());
        for ip in 0..4096u32 {
            for net in 0..3 {
                let addr = Ipv4Addr::from(ip);
                assert_eq!(table.get(net, addr), model.get(&(net, ip)).copied());
            }
        }
    }

    #[test]
    fn the_largest_ids_round_trip() {
        let mut table = MemberTable::default();
        let top = Ipv4Addr::new(255, 255, 255, 255);
        table.set(NetId::MAX, top, Location::Remote(u32::MAX));
        table.set(0, top, Location::Local(PortId(u32::MAX)));
        assert_eq!(table.get(NetId::MAX, top), Some(Location::Remote(u32::MAX)));
        assert_eq!(table.get(0, top), Some(Location::Local(PortId(u32::MAX))));
        assert_eq!(table.get(1, top), None);
    }
}
