//! The directory as this host applies it: the controller's view (other hosts, nets,
//! members, policies) turned into switch state, each instance's outbound rules and
//! /etc/hosts; saved so that a restarted agent forwards before the controller is back.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use vane_proto::api::InstanceState;
use vane_proto::stream::AgentView;
use vane_proto::validate;
use vane_switch::{L4Proto, NetConfig, OutsideRule, PolicyRule, PortId, ServiceConfig};

use crate::dataplane::{Command, PeerInfo};
use crate::gateway::GatewayPort;
use crate::netconf::OutboundRules;
use crate::{checkpoint, launch, netconf, Agent};

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
    /// Applies a view pushed by the controller: the switch's tables, and each running
    /// instance's rules and hosts file where they changed.
    pub(crate) async fn apply_view(self: &Arc<Self>, view: AgentView) {
        {
            let last = self.state().view.revision;
            if !view.revision.supersedes(last) {
                tracing::info!(
                    revision = ?view.revision,
                    applied = ?last,
                    "ignoring a view older than the one applied"
                );
                return;
            }
        }
        let nets: Vec<NetConfig> = view.nets.iter().map(net_config).collect();
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
                port: p.port.map(port_spec),
            })
            .collect();
        let services = view
            .services
            .iter()
            .map(|s| ServiceConfig {
                net: s.net,
                vip: s.vip,
                ports: s.ports.iter().copied().map(port_spec).collect(),
                backends: s.backends.clone(),
            })
            .collect();
        let outside = view
            .outside
            .iter()
            .map(|o| OutsideRule {
                from: o.from,
                to: o.to,
                port: o.port.map(port_spec),
            })
            .collect();
        // Copies restored here for a migration pass packets once the directory places
        // them here (see `adopt`).
        let (members, confirmed, gateways) = {
            let mut state = self.state();
            state.view = view;
            state.gateways = gateway_ports(&state, &self.next_port);
            // Answers follow the view from the next query on.
            self.dns.update(&state.view);
            let here = state.host_id();
            let placed: Vec<String> = state
                .view
                .members
                .iter()
                .filter(|m| Some(m.host_id) == here)
                .map(|m| m.instance.clone())
                .collect();
            let confirmed: Vec<(PathBuf, Option<PortId>)> = placed
                .iter()
                .filter_map(|id| {
                    let local = state.instances.get_mut(id)?;
                    std::mem::take(&mut local.unconfirmed).then(|| (local.dir.clone(), local.port))
                })
                .collect();
            (state.member_locations(), confirmed, state.gateways.clone())
        };
        self.dataplane.send(Command::View {
            peers,
            nets,
            members,
            policies,
            services,
            outside,
            gateways,
        });
        for (dir, port) in confirmed {
            self.hold(port, false).await;
            let _ = std::fs::remove_file(dir.join(checkpoint::ARRIVED_FILE));
        }
        self.save_view();

        type Update = (
            String,
            PathBuf,
            String,
            Option<(OutboundRules, Option<OutboundRules>)>,
            Option<String>,
        );
        let updates: Vec<Update> = {
            let state = self.state();
            state
                .instances
                .iter()
                .filter(|(_, l)| l.state == InstanceState::Running)
                .filter_map(|(id, l)| {
                    let rules = state.rules_for(&l.record.spec.net);
                    let hosts = state.hosts_for(&l.record.spec);
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
                    if let Some(l) = self.state().instances.get_mut(&id) {
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
    /// Gives the switch where the directory's members are, after this host's ports
    /// changed (an instance attached or detached): a port becomes the member the directory
    /// places here only through this (or a view, or a lookup), never by being attached.
    pub(crate) fn sync_members(&self) {
        let members = self.state().member_locations();
        self.dataplane.send(Command::Members { members });
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
        self.state().cluster = Some((host_id, config));
        self.save_view();
    }

    /// Where the controller says member `ip` of `net` is, for a packet that waits.
    pub(crate) fn resolved(
        &self,
        net: u32,
        ip: Ipv4Addr,
        member: Option<vane_proto::stream::Member>,
    ) {
        let location = member.and_then(|m| self.state().locate(&m));
        self.dataplane.send(Command::Resolved { net, ip, location });
    }

    pub(crate) fn save_view(&self) {
        let saved = {
            let state = self.state();
            let Some((host_id, config)) = state.cluster.clone() else {
                return;
            };
            SavedView {
                host_id,
                config,
                view: state.view.clone(),
            }
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

/// The gateways of the applied view as the switch's thread serves them: a gateway keeps its
/// port while its net, address and client key stay; a new or changed one gets a new port.
fn gateway_ports(state: &crate::state::State, next_port: &AtomicU32) -> Vec<GatewayPort> {
    let view = &state.view;
    view.gateways
        .iter()
        .filter_map(|g| {
            let net = view.nets.iter().find(|n| n.id == g.net)?;
            let client_key = match validate::wireguard_key("gateway key", &g.public_key) {
                Ok(key) => key,
                Err(e) => {
                    tracing::warn!(gateway = %g.name, "not served: {e}");
                    return None;
                }
            };
            let port = state
                .gateways
                .iter()
                .find(|p| {
                    p.names_client.name == g.name
                        && p.net.id == g.net
                        && p.ip == g.ip
                        && p.client_key == client_key
                })
                .map_or_else(
                    || PortId(next_port.fetch_add(1, Ordering::Relaxed)),
                    |p| p.port,
                );
            Some(GatewayPort {
                port,
                net: net_config(net),
                ip: g.ip,
                resolver: g.resolver,
                client_key,
                names_client: crate::dns::Client {
                    net: net.id,
                    net_name: net.name.clone(),
                    // Its queries are answered on the switch's thread, which forwards none.
                    egress: false,
                    name: g.name.clone(),
                    hostname: g.name.clone(),
                    ip: g.ip,
                },
            })
        })
        .collect()
}

/// A port as the switch takes it.
pub(crate) fn port_spec(s: vane_proto::validate::PortSpec) -> (L4Proto, u16) {
    let proto = match s.proto {
        vane_proto::validate::Proto::Tcp => L4Proto::Tcp,
        vane_proto::validate::Proto::Udp => L4Proto::Udp,
    };
    (proto, s.port)
}

pub(crate) fn net_config(net: &vane_proto::api::Net) -> NetConfig {
    NetConfig {
        id: net.id,
        subnet: net.subnet,
        egress: net.egress,
    }
}
