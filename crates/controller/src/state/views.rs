//! What each agent sees: the view of nets, members, policies and peers its switch needs,
//! and the answer to a switch that misses an entry.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use vane_proto::api::{HostState, Instance};
use vane_proto::api::{InstanceState, Net, Policy};
use vane_proto::stream::{AgentView, Member, Peer, PolicyRule};

use super::State;

impl State {
    /// What the agent of `host` needs to switch its instances' packets.
    pub fn view_for(&self, host: &str) -> AgentView {
        let (wanted, policies) = self.nets_wanted_by(host);
        let nets: Vec<Net> = wanted
            .iter()
            .filter_map(|n| self.nets.get(*n).cloned())
            .collect();
        let id_of = |name: &str| self.nets.get(name).map(|n| n.id);
        let members = self
            .instances
            .values()
            .filter(|i| wanted.contains(i.net.as_str()))
            .filter_map(|i| self.member(i))
            .collect();
        let policies = policies
            .iter()
            .filter_map(|p| {
                Some(PolicyRule {
                    from: id_of(&p.from)?,
                    to: id_of(&p.to)?,
                    port: p.port,
                })
            })
            .collect();
        // A dead host is nobody's peer: its sessions are dropped, and whatever copy it may
        // still run (cut off, not powered off) reaches no one until it is back and has
        // ended its stale copies.
        let peers = self
            .hosts
            .values()
            .filter(|h| h.name != host && h.state != HostState::Dead)
            .filter_map(|h| {
                Some(Peer {
                    id: h.id,
                    name: h.name.clone(),
                    locator: h.locator,
                    public_key: h.public_key.clone()?,
                })
            })
            .collect();
        AgentView {
            peers,
            nets,
            members,
            policies,
        }
    }

    /// The nets whose members the switch of `host` needs: those of its instances and those
    /// a policy links them with, and those policies.
    fn nets_wanted_by(&self, host: &str) -> (BTreeSet<&str>, Vec<&Policy>) {
        let local: BTreeSet<&str> = self
            .instances
            .values()
            .filter(|i| i.host == host)
            .map(|i| i.net.as_str())
            .collect();
        let policies: Vec<&Policy> = self
            .policies
            .values()
            .filter(|p| local.contains(p.from.as_str()) || local.contains(p.to.as_str()))
            .collect();
        let mut wanted = local.clone();
        for p in &policies {
            wanted.insert(p.from.as_str());
            wanted.insert(p.to.as_str());
        }
        (wanted, policies)
    }

    /// An instance as an entry of its net's forwarding table, while it has a place there:
    /// from creation until removal. An exited instance keeps its address, and its network
    /// stack still finishes the connections its program closed on the way out.
    fn member(&self, i: &Instance) -> Option<Member> {
        if i.state == InstanceState::Lost {
            return None;
        }
        Some(Member {
            net: self.nets.get(&i.net)?.id,
            ip: i.ip,
            name: i.name.clone(),
            hostname: i.hostname.clone(),
            host: i.host.clone(),
            host_id: self.hosts.get(&i.host)?.id,
            instance: i.id.clone(),
            moving_to: self.frozen.get(&i.id).map(|f| f.to),
        })
    }

    /// Answers a switch that misses an entry, or has it wait: `None` while the member is
    /// frozen for a migration (the lookup is answered when it thaws: `thaw`), else the
    /// answer (`lookup`).
    pub fn lookup_or_wait(&mut self, host: &str, net: u32, ip: Ipv4Addr) -> Option<Option<Member>> {
        let member = self.lookup(host, net, ip);
        if let Some(frozen) = member
            .as_ref()
            .and_then(|m| self.frozen.get_mut(&m.instance))
        {
            frozen.waiting.push(Waiting {
                host: host.to_string(),
                net,
                ip,
            });
            return None;
        }
        Some(member)
    }

    /// Marks instance `id` frozen for a migration to host `to`: views say its member is
    /// moving there, and lookups for it wait. Nothing if `to` is unknown.
    pub fn freeze(&mut self, id: &str, to: &str) {
        if let Some(host) = self.hosts.get(to) {
            let to = host.id;
            self.frozen.entry(id.to_string()).or_insert_with(|| Frozen {
                to,
                waiting: Vec::new(),
            });
        }
    }

    /// Ends the freeze of instance `id`: the lookups that waited for it, to be answered now
    /// (nothing if it was not frozen).
    pub fn thaw(&mut self, id: &str) -> Vec<Waiting> {
        self.frozen
            .remove(id)
            .map(|f| f.waiting)
            .unwrap_or_default()
    }

    /// Answers a switch that misses an entry: the member `ip` of net `net`, if the asking
    /// host has business with that net.
    pub fn lookup(&self, host: &str, net: u32, ip: Ipv4Addr) -> Option<Member> {
        let (wanted, _) = self.nets_wanted_by(host);
        let name = self.nets.values().find(|n| n.id == net)?.name.as_str();
        if !wanted.contains(name) {
            return None;
        }
        self.instances
            .values()
            .filter(|i| i.net == name && i.ip == ip)
            .find_map(|i| self.member(i))
    }
}

/// An instance frozen for a migration: the id of the host it moves to, and the lookups
/// waiting for it.
#[derive(Debug)]
pub struct Frozen {
    to: u32,
    waiting: Vec<Waiting>,
}

/// A lookup that waits for a frozen instance: who asked, for what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    pub host: String,
    pub net: u32,
    pub ip: Ipv4Addr,
}
