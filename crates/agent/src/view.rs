//! The directory as this host applies it: the controller's view (other hosts, nets,
//! members, policies) turned into switch state, each instance's outbound rules and
//! /etc/hosts; saved so that a restarted agent forwards before the controller is back.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use ipnet::Ipv4Net;

use vane_proto::api::InstanceState;
use vane_proto::stream::{AgentView, InstanceSpec};
use vane_switch::{L4Proto, Location, NetConfig, PolicyRule, PortId};

use crate::dataplane::{Command, PeerInfo};
use crate::netconf::OutboundRules;
use crate::{checkpoint, instance, launch, netconf, Agent};

/// What the agent keeps of the directory across restarts (`STATE/view.json`), so that a
/// restarted agent forwards between existing members even while the controller is down.
#[derive(serde::Serialize, serde::Deserialize)]
struct SavedView {
    host_id: u32,
    config: vane_proto::api::ClusterConfig,
    view: AgentView,
}

const SAVED_VIEW: &str = "view.json";

impl Agent {
    pub(crate) fn rules_for(&self, net: &vane_proto::api::Net) -> OutboundRules {
        let view = self.view.lock().expect("view lock");
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

    pub(crate) fn hosts_for(&self, spec: &InstanceSpec) -> String {
        let view = self.view.lock().expect("view lock");
        let members: instance::HostEntries = view
            .members
            .iter()
            .filter(|m| m.net == spec.net.id)
            .map(|m| (m.name.clone(), m.hostname.clone(), m.ip))
            .collect();
        netconf::render_hosts((&spec.name, &spec.hostname, spec.ip), &members)
    }

    /// Applies a view pushed by the controller: the switch's tables, and each running
    /// instance's rules and hosts file where they changed.
    pub(crate) async fn apply_view(self: &Arc<Self>, view: AgentView) {
        let nets: Vec<NetConfig> = view.nets.iter().map(net_config).collect();
        let ports: BTreeMap<String, PortId> = self
            .instances()
            .iter()
            .filter_map(|(id, l)| Some((id.clone(), l.port?)))
            .collect();
        let here = self.host_id();
        let members: Vec<(u32, Ipv4Addr, Location)> = view
            .members
            .iter()
            .filter(|m| m.host_id != 0)
            .filter_map(|m| {
                let loc = if Some(m.host_id) == here {
                    Location::Local(*ports.get(&m.instance)?)
                } else {
                    Location::Remote(m.host_id)
                };
                Some((m.net, m.ip, loc))
            })
            .collect();
        let peers = view
            .peers
            .iter()
            .filter_map(|p| {
                Some(PeerInfo {
                    id: p.id,
                    name: p.name.clone(),
                    locator: p.locator,
                    public_key: vane_proto::hex::decode::<32>(&p.public_key)?,
                })
            })
            .collect();
        let policies = view
            .policies
            .iter()
            .map(|p| PolicyRule {
                from: p.from,
                to: p.to,
                port: p.port.map(|s| {
                    (
                        match s.proto {
                            vane_proto::validate::Proto::Tcp => L4Proto::Tcp,
                            vane_proto::validate::Proto::Udp => L4Proto::Udp,
                        },
                        s.port,
                    )
                }),
            })
            .collect();
        self.dataplane.send(Command::View {
            peers,
            nets,
            members,
            policies,
        });
        // Copies restored here for a migration pass packets once the directory places
        // them here (see `adopt`).
        let confirmed: Vec<(PathBuf, Option<PortId>)> = {
            let mut instances = self.instances();
            view.members
                .iter()
                .filter(|m| Some(m.host_id) == here)
                .filter_map(|m| {
                    let local = instances.get_mut(&m.instance)?;
                    std::mem::take(&mut local.unconfirmed).then(|| (local.dir.clone(), local.port))
                })
                .collect()
        };
        for (dir, port) in confirmed {
            self.hold(port, false).await;
            let _ = std::fs::remove_file(dir.join(checkpoint::ARRIVED_FILE));
        }
        *self.view.lock().expect("view lock") = view;
        self.save_view();

        type Update = (
            String,
            PathBuf,
            String,
            Option<(OutboundRules, Option<OutboundRules>)>,
            Option<String>,
        );
        let updates: Vec<Update> = {
            let instances = self.instances();
            instances
                .iter()
                .filter(|(_, l)| l.state == InstanceState::Running)
                .filter_map(|(id, l)| {
                    let rules = self.rules_for(&l.record.spec.net);
                    let hosts = self.hosts_for(&l.record.spec);
                    let rules =
                        (l.rules.as_ref() != Some(&rules)).then(|| (rules, l.rules.clone()));
                    let hosts = (l.hosts.as_ref() != Some(&hosts)).then_some(hosts);
                    (rules.is_some() || hosts.is_some()).then(|| {
                        (
                            id.clone(),
                            l.dir.clone(),
                            l.record.netns.clone(),
                            rules,
                            hosts,
                        )
                    })
                })
                .collect()
        };
        for (id, dir, netns, rules, hosts) in updates {
            let (r, h) = (rules.clone(), hosts.clone());
            let result = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                if let Some((r, previous)) = &r {
                    netconf::apply_rules(&netns, r, previous.as_ref())?;
                }
                if let Some(h) = &h {
                    netconf::rewrite_in_place(&dir.join(launch::HOSTS_FILE), h)?;
                }
                Ok(())
            })
            .await;
            match result {
                Ok(Ok(())) => {
                    if let Some(l) = self.instances().get_mut(&id) {
                        if let Some((r, _)) = rules {
                            l.rules = Some(r);
                        }
                        if hosts.is_some() {
                            l.hosts = hosts;
                        }
                    }
                }
                Ok(Err(e)) => tracing::warn!(instance = %id, "updating rules or hosts: {e}"),
                Err(e) => tracing::warn!(instance = %id, "{e}"),
            }
        }
    }
    /// This host's id in the cluster, once the controller (or the saved view) said it.
    pub(crate) fn host_id(&self) -> Option<u32> {
        self.cluster
            .lock()
            .expect("cluster lock")
            .as_ref()
            .map(|(id, _)| *id)
    }

    /// The cluster's global virtual address space (the default until the controller says).
    pub(crate) fn global_space(&self) -> Ipv4Net {
        self.cluster
            .lock()
            .expect("cluster lock")
            .as_ref()
            .map_or(self.switch_cfg.global_space, |(_, c)| c.global_space)
    }

    /// The controller welcomed this host: who it is and how the cluster's tunnels work.
    pub(crate) fn set_cluster(&self, host_id: u32, config: vane_proto::api::ClusterConfig) {
        // Once the host is known to belong to the cluster: a refused agent leaves nothing.
        if !self.egress_ready.swap(true, Ordering::Relaxed) {
            self.setup_egress();
        }
        self.dataplane.send(Command::Identity {
            host_id,
            plaintext: config.plaintext,
            global_space: config.global_space,
        });
        *self.cluster.lock().expect("cluster lock") = Some((host_id, config));
        self.save_view();
    }

    /// Where the controller says member `ip` of `net` is, for a packet that waits.
    pub(crate) fn resolved(
        &self,
        net: u32,
        ip: Ipv4Addr,
        member: Option<vane_proto::stream::Member>,
    ) {
        let host = member.map(|m| m.host_id).filter(|id| *id != 0);
        self.dataplane.send(Command::Resolved { net, ip, host });
    }

    pub(crate) fn save_view(&self) {
        let Some((host_id, config)) = self.cluster.lock().expect("cluster lock").clone() else {
            return;
        };
        let saved = SavedView {
            host_id,
            config,
            view: self.view.lock().expect("view lock").clone(),
        };
        let path = self.cfg.state_dir.join(SAVED_VIEW);
        let tmp = path.with_extension("json.tmp");
        let written = std::fs::write(&tmp, serde_json::to_vec(&saved).expect("serializes"))
            .and_then(|_| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            tracing::warn!("cannot save the view to {}: {e}", path.display());
        }
    }

    /// Applies the view a previous agent saved, so that traffic between existing members
    /// flows before (or without) the controller.
    pub(crate) async fn load_saved_view(self: &Arc<Self>) {
        let path = self.cfg.state_dir.join(SAVED_VIEW);
        let Ok(bytes) = std::fs::read(&path) else {
            return;
        };
        match serde_json::from_slice::<SavedView>(&bytes) {
            Ok(saved) => {
                self.set_cluster(saved.host_id, saved.config);
                let view = saved.view.with_host_ids((saved.host_id, &self.cfg.name));
                self.apply_view(view).await;
                tracing::info!("applied the saved view");
            }
            Err(e) => tracing::warn!("ignoring saved view {}: {e}", path.display()),
        }
    }
}

pub(crate) fn net_config(net: &vane_proto::api::Net) -> NetConfig {
    NetConfig {
        id: net.id,
        subnet: net.subnet,
        egress: net.egress,
    }
}
