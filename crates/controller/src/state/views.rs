//! What each agent sees: the view of nets, members, policies and peers its switch needs,
//! and the answer to a switch that misses an entry.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;

use vane_proto::api::{Gateway, HostState, Instance};
use vane_proto::api::{InstanceState, Net, Policy};
use vane_proto::stream::{
    AgentView, GatewayView, Member, OutsidePolicy, Peer, PolicyRule, ServiceView,
};

use super::State;

impl State {
    /// What the agent of `host` needs to switch its instances' packets. Makes the parts of
    /// every view (one pass over hosts and instances): to make many, use [`ViewCache`].
    pub fn view_for(&self, host: &str) -> AgentView {
        let mut parts = ViewCache::default();
        parts.refresh(self);
        parts.view(self, host)
    }

    /// The nets whose members the switch of `host` needs: those of its instances and
    /// gateways and those a policy links them with, and those policies.
    fn nets_wanted_by(&self, host: &str) -> (BTreeSet<&str>, Vec<&Policy>) {
        let local: BTreeSet<&str> = self
            .instances
            .values()
            .filter(|i| i.host == host)
            .map(|i| i.net.as_str())
            .chain(self.gateways_on(host).map(|g| g.net.as_str()))
            .collect();
        self.nets_wanted_with(local)
    }

    /// `nets_wanted_by` for a host whose instances are in the nets `local`.
    fn nets_wanted_with<'a>(
        &'a self,
        local: BTreeSet<&'a str>,
    ) -> (BTreeSet<&'a str>, Vec<&'a Policy>) {
        let policies: Vec<&Policy> = self
            .policies
            .values()
            .filter(|p| local.contains(p.from.as_str()) || local.contains(p.to.as_str()))
            .collect();
        let mut wanted = local.clone();
        for p in &policies {
            // An outside policy's `from` is an address range, no net.
            if p.outside().is_none() {
                wanted.insert(p.from.as_str());
            }
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
            gateway: false,
        })
    }

    /// A gateway as an entry of its net's forwarding table, on its host, from its creation
    /// to its removal (a dead host's gateway stays: it comes back with its host).
    fn gateway_member(&self, g: &Gateway) -> Option<Member> {
        Some(Member {
            net: self.nets.get(&g.net)?.id,
            ip: g.ip,
            name: g.name.clone(),
            hostname: g.name.clone(),
            host: g.host.clone(),
            host_id: self.hosts.get(&g.host)?.id,
            instance: String::new(),
            moving_to: None,
            gateway: true,
        })
    }

    /// Whether instance `i` is a member (`member` would make one).
    fn is_member(&self, i: &Instance) -> bool {
        i.state != InstanceState::Lost
            && self.nets.contains_key(&i.net)
            && self.hosts.contains_key(&i.host)
    }

    /// Whether `m` is the member instance `i` makes (`member`), without making it.
    fn member_is(&self, i: &Instance, m: &Member) -> bool {
        m.instance == i.id
            && m.ip == i.ip
            && m.name == i.name
            && m.hostname == i.hostname
            && m.host == i.host
            && Some(m.net) == self.nets.get(&i.net).map(|n| n.id)
            && Some(m.host_id) == self.hosts.get(&i.host).map(|h| h.id)
            && m.moving_to == self.frozen.get(&i.id).map(|f| f.to)
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
            .or_else(|| {
                self.gateways
                    .values()
                    .filter(|g| g.net == name && g.ip == ip)
                    .find_map(|g| self.gateway_member(g))
            })
    }
}

/// The parts views are cut from, each with a generation that changes only when the part
/// does, kept from one push of views to the next (`Controller::push_views`). Views used to
/// be made whole for every connected host on every change, each from a pass over every
/// instance: with 1000 hosts and 10,000 instances, seconds of work per change under the
/// state lock. Now one pass over hosts and instances makes the parts (`refresh`), a host's
/// [`ViewKey`] (its nets and policies, and the generations of its parts) says whether its
/// view can have changed, and only then is the view made (`view`).
#[derive(Debug, Default)]
pub struct ViewCache {
    /// The last generation given out; 0 stands for "no members".
    generation: u64,
    /// Every host with a key, in name order (a view leaves out its receiver).
    peers: (u64, Vec<Peer>),
    /// The members of each net (by name): its instances' in instance order, then its
    /// gateways' in name order.
    members: BTreeMap<String, (u64, Vec<Member>)>,
    /// The nets of each host's instances and gateways, by host name.
    local: BTreeMap<String, BTreeSet<String>>,
    /// The gateways of each host (by name), in name order. Made whole on each refresh, as
    /// services are.
    gateways: BTreeMap<String, Vec<GatewayView>>,
    /// The services of each net (by name), with their backends, in service name order.
    /// Made whole on each refresh: services are few, and a view's key compares them.
    services: BTreeMap<String, Vec<ServiceView>>,
}

/// What a host's view is made of: two equal keys (of one [`ViewCache`]) make equal views.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewKey {
    peers: u64,
    nets: Vec<Net>,
    /// The generation of each net's members, in the order of `nets`.
    members: Vec<u64>,
    policies: Vec<PolicyRule>,
    outside: Vec<OutsidePolicy>,
    services: Vec<ServiceView>,
    gateways: Vec<GatewayView>,
}

impl ViewCache {
    /// Takes the parts as `state` now has them; a part equal to the one before keeps its
    /// generation.
    pub fn refresh(&mut self, state: &State) {
        // Compared in place first: a push after a change to one instance allocates only for
        // its net.
        // A dead host is nobody's peer: its sessions are dropped, and whatever copy it may
        // still run (cut off, not powered off) reaches no one until it is back and has
        // ended its stale copies.
        let peer_hosts = || {
            state
                .hosts
                .values()
                .filter(|h| h.public_key.is_some() && h.state != HostState::Dead)
        };
        let with_keys = peer_hosts();
        let same_peers = with_keys.clone().count() == self.peers.1.len()
            && with_keys.zip(&self.peers.1).all(|(h, p)| {
                p.id == h.id
                    && p.name == h.name
                    && p.locator == h.locator
                    && h.public_key.as_deref() == Some(p.public_key.as_str())
            });
        if !same_peers {
            let peers = peer_hosts()
                .filter_map(|h| {
                    Some(Peer {
                        id: h.id,
                        name: h.name.clone(),
                        locator: h.locator,
                        public_key: h.public_key.clone()?,
                    })
                })
                .collect();
            self.generation += 1;
            self.peers = (self.generation, peers);
        }
        self.services = services_by_net(state);
        self.gateways = gateways_by_host(state);

        // Each net's members against the last push's, in order: how many, and whether one
        // differs.
        let mut local: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut counted: HashMap<&str, (usize, bool)> = HashMap::new();
        for i in state.instances.values() {
            match local.get_mut(&i.host) {
                Some(nets) if nets.contains(&i.net) => {}
                Some(nets) => {
                    nets.insert(i.net.clone());
                }
                None => {
                    local.insert(i.host.clone(), BTreeSet::from([i.net.clone()]));
                }
            }
            if !state.is_member(i) {
                continue;
            }
            let (n, differs) = counted.entry(i.net.as_str()).or_insert((0, false));
            if !*differs {
                let before = self.members.get(&i.net).and_then(|(_, m)| m.get(*n));
                *differs = !before.is_some_and(|m| state.member_is(i, m));
            }
            *n += 1;
        }
        // Then the gateways, which make their host want their net as an instance does.
        for g in state.gateways.values() {
            local
                .entry(g.host.clone())
                .or_default()
                .insert(g.net.clone());
            let Some(m) = state.gateway_member(g) else {
                continue;
            };
            let (n, differs) = counted.entry(g.net.as_str()).or_insert((0, false));
            if !*differs {
                let before = self.members.get(&g.net).and_then(|(_, m)| m.get(*n));
                *differs = before != Some(&m);
            }
            *n += 1;
        }
        self.local = local;
        self.members
            .retain(|net, _| counted.contains_key(net.as_str()));
        let changed: HashSet<&str> = counted
            .iter()
            .filter(|(net, (n, differs))| {
                *differs || self.members.get(**net).map(|(_, m)| m.len()) != Some(*n)
            })
            .map(|(net, _)| *net)
            .collect();
        if changed.is_empty() {
            return;
        }
        let mut members: BTreeMap<&str, Vec<Member>> = BTreeMap::new();
        for i in state.instances.values() {
            if changed.contains(i.net.as_str()) {
                if let Some(m) = state.member(i) {
                    members.entry(i.net.as_str()).or_default().push(m);
                }
            }
        }
        for g in state.gateways.values() {
            if changed.contains(g.net.as_str()) {
                if let Some(m) = state.gateway_member(g) {
                    members.entry(g.net.as_str()).or_default().push(m);
                }
            }
        }
        for (net, now) in members {
            self.generation += 1;
            self.members.insert(net.to_string(), (self.generation, now));
        }
    }

    /// The nets and policies of the view of `host`.
    fn wanted<'a>(&'a self, state: &'a State, host: &str) -> (BTreeSet<&'a str>, Vec<&'a Policy>) {
        let local = self
            .local
            .get(host)
            .map(|nets| nets.iter().map(String::as_str).collect())
            .unwrap_or_default();
        state.nets_wanted_with(local)
    }

    /// The nets the view of `host` has (`wanted`), as records, and its policies.
    fn nets_and_policies<'a>(
        &'a self,
        state: &'a State,
        host: &str,
    ) -> (Vec<Net>, Vec<&'a Policy>) {
        let (wanted, policies) = self.wanted(state, host);
        let nets = wanted
            .iter()
            .filter_map(|n| state.nets.get(*n).cloned())
            .collect();
        (nets, policies)
    }

    /// What the view of `host` is made of, without making it.
    pub fn key(&self, state: &State, host: &str) -> ViewKey {
        let (nets, policies) = self.nets_and_policies(state, host);
        let members = nets
            .iter()
            .map(|n| self.members.get(&n.name).map_or(0, |(g, _)| *g))
            .collect();
        ViewKey {
            peers: self.peers.0,
            services: self.services_of(&nets),
            nets,
            members,
            policies: policy_rules(state, &policies),
            outside: outside_rules(state, &policies),
            gateways: self.gateways_of(host),
        }
    }

    /// The view of `host`: its nets, their members (net by net, in instance order), its
    /// policies and every other host with a key.
    pub fn view(&self, state: &State, host: &str) -> AgentView {
        let (nets, policies) = self.nets_and_policies(state, host);
        let members = nets
            .iter()
            .filter_map(|n| self.members.get(&n.name))
            .flat_map(|(_, m)| m.iter().cloned())
            .collect();
        let peers = self
            .peers
            .1
            .iter()
            .filter(|p| p.name != host)
            .cloned()
            .collect();
        AgentView {
            revision: Default::default(),
            peers,
            services: self.services_of(&nets),
            nets,
            members,
            policies: policy_rules(state, &policies),
            outside: outside_rules(state, &policies),
            gateways: self.gateways_of(host),
        }
    }

    /// The gateways placed on `host`.
    fn gateways_of(&self, host: &str) -> Vec<GatewayView> {
        self.gateways.get(host).cloned().unwrap_or_default()
    }

    /// The services of `nets`, net by net.
    fn services_of(&self, nets: &[Net]) -> Vec<ServiceView> {
        nets.iter()
            .filter_map(|n| self.services.get(&n.name))
            .flatten()
            .cloned()
            .collect()
    }

    /// Whether the view of `host` has members of net `net` (by name).
    pub fn wants(&self, state: &State, host: &str, net: &str) -> bool {
        self.wanted(state, host).0.contains(net)
    }
}

/// Every service with its backends (`State::backends`), by net name.
fn services_by_net(state: &State) -> BTreeMap<String, Vec<ServiceView>> {
    let mut backends: BTreeMap<&str, Vec<Ipv4Addr>> = BTreeMap::new();
    for i in state.instances.values() {
        let Some(service) = i.service.as_deref() else {
            continue;
        };
        let live = i.state == InstanceState::Running
            && !i.stopped
            && state
                .hosts
                .get(&i.host)
                .is_some_and(|h| h.state != HostState::Dead);
        if live && state.services.get(service).is_some_and(|s| s.net == i.net) {
            backends.entry(service).or_default().push(i.ip);
        }
    }
    let mut by_net: BTreeMap<String, Vec<ServiceView>> = BTreeMap::new();
    for s in state.services.values() {
        let Some(net) = state.nets.get(&s.net) else {
            continue;
        };
        let mut ips = backends.remove(s.name.as_str()).unwrap_or_default();
        ips.sort_unstable();
        by_net.entry(s.net.clone()).or_default().push(ServiceView {
            net: net.id,
            name: s.name.clone(),
            vip: s.vip,
            ports: s.ports.clone(),
            backends: ips,
        });
    }
    by_net
}

/// Every gateway as its host's agent serves it, by host name (a gateway whose net is gone
/// is left out, as its member is).
fn gateways_by_host(state: &State) -> BTreeMap<String, Vec<GatewayView>> {
    let mut by_host: BTreeMap<String, Vec<GatewayView>> = BTreeMap::new();
    for g in state.gateways.values() {
        let Some(net) = state.nets.get(&g.net) else {
            continue;
        };
        by_host
            .entry(g.host.clone())
            .or_default()
            .push(GatewayView {
                net: net.id,
                name: g.name.clone(),
                ip: g.ip,
                resolver: g.resolver,
                public_key: g.public_key.clone(),
            });
    }
    by_host
}

/// Policies with their nets as ids.
fn policy_rules(state: &State, policies: &[&Policy]) -> Vec<PolicyRule> {
    let id_of = |name: &str| state.nets.get(name).map(|n| n.id);
    policies
        .iter()
        .filter_map(|p| {
            Some(PolicyRule {
                from: id_of(&p.from)?,
                to: id_of(&p.to)?,
                port: p.port,
            })
        })
        .collect()
}

/// Policies from outside address ranges, with their nets as ids.
fn outside_rules(state: &State, policies: &[&Policy]) -> Vec<OutsidePolicy> {
    policies
        .iter()
        .filter_map(|p| {
            Some(OutsidePolicy {
                from: p.outside()?,
                to: state.nets.get(&p.to)?.id,
                port: p.port,
            })
        })
        .collect()
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
