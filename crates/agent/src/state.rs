//! The agent's state, under one lock (`Agent::state`): the host's instances, the directory
//! as the controller last pushed it, who this host is in the cluster, its credentials, and
//! the migrations under way. One lock, so that a step sees instances and directory of the
//! same moment, and no order between locks can be got wrong.
//!
//! The lock is held for lookups and changes only, never across an await or while waiting
//! for the switch thread or a process: a step takes what it needs, lets go, then acts. What
//! depends on the state alone (rules, hosts files, where members are) is computed here by
//! methods of `State` that take no lock themselves.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;

use ipnet::Ipv4Net;
use tokio::sync::watch;

use vane_proto::api::{ClusterConfig, ExitStatus, InstanceState};
use vane_proto::stream::{AgentError, AgentView, InstanceReport, InstanceSpec, Member};
use vane_switch::{Location, PortId, SwitchConfig};

use crate::instance::Record;
use crate::netconf::OutboundRules;
use crate::{checkpoint, direct, identity, instance, netconf};

pub(crate) struct State {
    /// This host's instances, by id.
    pub(crate) instances: BTreeMap<String, Local>,
    /// The directory as the controller last pushed it (or as a previous agent saved it).
    pub(crate) view: AgentView,
    /// This host's id and the cluster's configuration (tunnels, global space), once known.
    pub(crate) cluster: Option<(u32, ClusterConfig)>,
    /// The host's key pair, the controller's pin and the host's credential.
    pub(crate) identity: identity::Identity,
    pub(crate) migrations: Migrations,
    /// The WireGuard gateways this host serves, as the last view gave them.
    pub(crate) gateways: Vec<crate::gateway::GatewayPort>,
}

/// An instance on this host.
pub(crate) struct Local {
    pub(crate) record: Record,
    pub(crate) dir: PathBuf,
    pub(crate) state: InstanceState,
    pub(crate) exit: Option<ExitStatus>,
    pub(crate) port: Option<PortId>,
    /// Turns true when the program has ended.
    pub(crate) exited: watch::Sender<bool>,
    /// Last applied rules and hosts file, to skip rewriting what did not change.
    pub(crate) rules: Option<OutboundRules>,
    pub(crate) hosts: Option<String>,
    /// Its resolver, while it runs here (its sockets hold its network namespace).
    pub(crate) dns: Option<crate::dns::Server>,
    /// Restored here for a migration that no view has confirmed yet: its port is on hold
    /// (`adopt`), and `checkpoint::ARRIVED_FILE` says so across a restart.
    pub(crate) unconfirmed: bool,
}

/// Migrations, snapshots and restores under way on this host.
#[derive(Default)]
pub(crate) struct Migrations {
    /// Spaces prepared for instances migrating here, until restored or discarded.
    pub(crate) prepared: BTreeMap<String, checkpoint::Prepared>,
    /// Instances whose tree was dumped and killed for a migration: their init's end is not
    /// an exit.
    pub(crate) dumped: BTreeSet<String>,
    /// Images this host expects straight from another's (`direct`), by ticket.
    pub(crate) inbound: BTreeMap<String, Inbound>,
    /// One lock per instance with migration steps under way (`Agent::steps_of`).
    pub(crate) steps: BTreeMap<String, Arc<tokio::sync::Mutex<()>>>,
    /// Lazy dumps of instances migrating away: their page servers, by instance id.
    pub(crate) lazy_sources: BTreeMap<String, LazySource>,
    /// Links from the sources of lazy migrations to this host, kept after their images
    /// for the pages the restore fetches, by instance id.
    pub(crate) page_links: BTreeMap<String, PageLink>,
}

/// A direct transfer this host waits for: from whom, what, and who waits for its end.
pub(crate) struct Inbound {
    pub(crate) from: [u8; 32],
    pub(crate) expected: direct::Expected,
    pub(crate) done: tokio::sync::oneshot::Sender<Result<PageLink, String>>,
}

/// The link of a direct transfer, after its images.
pub(crate) type PageLink = direct::Link<direct::Buffered<tokio::net::TcpStream>>;

/// A lazy dump serving an instance's memory (`checkpoint::LazyDump`).
pub(crate) struct LazySource {
    /// CRIU's page connection, until the images' link takes it over.
    pub(crate) pages: Option<std::os::unix::net::UnixStream>,
    /// Another descriptor of the same connection, to break it off (`resume_lazy`).
    pub(crate) abort: std::os::unix::net::UnixStream,
    /// CRIU's end: whether it served every page (and ended the tree) or not (and resumed
    /// it).
    pub(crate) ended: tokio::sync::watch::Receiver<Option<bool>>,
    /// Stops the relay of the pages (a migration given up before the restore).
    pub(crate) cancel: Arc<tokio::sync::Notify>,
}

impl Local {
    pub(crate) fn report(&self) -> InstanceReport {
        InstanceReport {
            id: self.record.spec.id.clone(),
            state: self.state,
            pid: (self.state == InstanceState::Running).then_some(self.record.pid),
            exit: self.exit,
        }
    }
}

impl State {
    pub(crate) fn new(identity: identity::Identity) -> State {
        State {
            instances: BTreeMap::new(),
            view: AgentView::default(),
            cluster: None,
            identity,
            migrations: Migrations::default(),
            gateways: Vec::new(),
        }
    }

    /// Instance `id`, if it runs on this host; else why not.
    pub(crate) fn running(&self, id: &str) -> Result<&Local, AgentError> {
        let local = self
            .instances
            .get(id)
            .ok_or_else(|| AgentError::not_found(format!("instance {id} is not on this host")))?;
        if local.state != InstanceState::Running {
            return Err(AgentError::conflict(format!(
                "instance {} is not running",
                local.record.spec.name
            )));
        }
        Ok(local)
    }

    pub(crate) fn reports(&self) -> Vec<InstanceReport> {
        self.instances.values().map(Local::report).collect()
    }

    /// This host's id in the cluster, once the controller (or the saved view) said it.
    pub(crate) fn host_id(&self) -> Option<u32> {
        self.cluster.as_ref().map(|(id, _)| *id)
    }

    /// The cluster's global virtual address space (the default until the controller says).
    pub(crate) fn global_space(&self) -> Ipv4Net {
        self.cluster.as_ref().map_or_else(
            || SwitchConfig::default().global_space,
            |(_, c)| c.global_space,
        )
    }

    /// Whether the directory places instance `id` on this host.
    pub(crate) fn placed_here(&self, id: &str) -> bool {
        let here = self.host_id();
        self.view
            .members
            .iter()
            .any(|m| m.instance == id && Some(m.host_id) == here)
    }

    /// Where the switch must send packets for `member`: the port of a local instance,
    /// another host, or nowhere while it moves. `None`: nowhere at all (a member placed here
    /// that has no port, or a host the directory does not know).
    ///
    /// This is the only way a member's address enters the switch (views and lookups both
    /// come through it): attaching a port does not make it a member, the directory does.
    pub(crate) fn locate(&self, member: &Member) -> Option<Location> {
        if member.host_id == 0 {
            return None;
        }
        // Frozen for a migration: what local instances send it waits in the miss queue for
        // the controller's answer, given once it runs again.
        if let Some(to) = member.moving_to {
            return Some(Location::Moving {
                from: member.host_id,
                to,
            });
        }
        if Some(member.host_id) == self.host_id() {
            if member.gateway {
                let g = self
                    .gateways
                    .iter()
                    .find(|g| g.net.id == member.net && g.ip == member.ip)?;
                return Some(Location::Local(g.port));
            }
            let local = self.instances.get(&member.instance)?;
            return local.port.map(Location::Local);
        }
        Some(Location::Remote(member.host_id))
    }

    /// Every member of the directory the switch can reach, with where it is.
    pub(crate) fn member_locations(&self) -> Vec<(u32, Ipv4Addr, Location)> {
        self.view
            .members
            .iter()
            .filter_map(|m| Some((m.net, m.ip, self.locate(m)?)))
            .collect()
    }

    /// Outbound rules for an instance of `net`, from the current view.
    pub(crate) fn rules_for(&self, net: &vane_proto::api::Net) -> OutboundRules {
        let view = &self.view;
        let subnet_of = |id: u32| view.nets.iter().find(|n| n.id == id).map(|n| n.subnet);
        let allowed = view
            .policies
            .iter()
            .filter(|p| p.from == net.id)
            .filter_map(|p| Some((subnet_of(p.to)?, p.port)))
            .collect();
        let mut routed: Vec<Ipv4Net> = view
            .policies
            .iter()
            .filter_map(|p| match (p.from == net.id, p.to == net.id) {
                (true, _) => subnet_of(p.to),
                (_, true) => subnet_of(p.from),
                _ => None,
            })
            .collect();
        routed.sort();
        routed.dedup();
        OutboundRules {
            own: net.subnet,
            allowed,
            routed,
            global_space: self.global_space(),
            egress: net.egress,
        }
    }

    /// The /etc/hosts of an instance: itself and the members of its net.
    pub(crate) fn hosts_for(&self, spec: &InstanceSpec) -> String {
        let members: instance::HostEntries = self
            .view
            .members
            .iter()
            .filter(|m| m.net == spec.net.id)
            .map(|m| (m.name.clone(), m.hostname.clone(), m.ip))
            .collect();
        netconf::render_hosts((&spec.name, &spec.hostname, spec.ip), &members)
    }
}
