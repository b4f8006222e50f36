//! Instances in the model: planning a run (name, template, host and address), the reports
//! and reconciliation of their agents, changes to their records, and forgetting them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use vane_proto::api::{HostState, Instance, InstanceState, Net, RunSpec};
use vane_proto::stream::{InstanceReport, InstanceSpec};
use vane_proto::validate;

use super::templates::check_settings;
use super::{ApiError, State};
use crate::store::Batch;

impl State {
    /// Validates a run request, places it, allocates its address and records the instance
    /// as `Creating`, so that the name and address are reserved while its host sets it up.
    pub fn plan_instance(
        &mut self,
        spec: RunSpec,
        id: String,
        now: u64,
    ) -> Result<(InstanceSpec, Batch), ApiError> {
        if spec.cmd.is_empty() {
            return Err(ApiError::BadRequest(
                "no command given: vane run --net NET -- CMD [ARGS...]".into(),
            ));
        }
        let net = self.net(&spec.net)?.clone();
        let name = match spec.name {
            Some(n) => n,
            None => format!("{}-{}", net.name, &id[..6]),
        };
        validate::name("instance name", &name)?;
        if self.instances.values().any(|i| i.name == name) {
            return Err(ApiError::Conflict(format!(
                "instance {name:?} already exists"
            )));
        }
        self.check_join(spec.service.as_deref(), &net, &name)?;
        let hostname = spec.hostname.unwrap_or_else(|| name.clone());
        validate::hostname(&hostname)?;
        // The template first, then what the request says.
        let (limits, mut env, space) = match &spec.template {
            Some(t) => {
                let t = self.templates.get(t).ok_or_else(|| {
                    ApiError::NotFound(format!(
                        "unknown template {t:?} (`vane template ls` lists them)"
                    ))
                })?;
                (
                    t.limits.overridden_by(spec.limits),
                    t.env.clone(),
                    t.space.overridden_by(&spec.space),
                )
            }
            None => (spec.limits, Vec::new(), spec.space.clone()),
        };
        for (k, v) in spec.env {
            env.retain(|(key, _)| *key != k);
            env.push((k, v));
        }
        check_settings(&env, &space)?;
        match spec.checkpoint_every {
            Some(0) => {
                return Err(ApiError::BadRequest(
                    "invalid checkpoint interval 0: at least one second".into(),
                ))
            }
            Some(_) if spec.restart.is_no() => {
                return Err(ApiError::BadRequest(
                    "checkpoints are kept to restart from: give --restart on-failure or always"
                        .into(),
                ))
            }
            _ => {}
        }
        let host = match spec.host {
            Some(h) => {
                let host = self
                    .hosts
                    .get(&h)
                    .ok_or_else(|| ApiError::NotFound(format!("unknown host {h:?}")))?;
                if let Some(why) = self.publish_clash(&h, &spec.publish, None) {
                    return Err(ApiError::Conflict(why));
                }
                match host.state {
                    HostState::Online => {}
                    HostState::Offline => {
                        return Err(ApiError::Unavailable(format!("host {h:?} is offline")))
                    }
                    HostState::Dead => {
                        return Err(ApiError::Unavailable(format!(
                            "host {h:?} is offline (declared dead)"
                        )))
                    }
                }
                h
            }
            None => self.least_loaded_host_for(&spec.publish, None)?,
        };
        for (i, p) in spec.publish.iter().enumerate() {
            if spec.publish[..i].iter().any(|q| q.clashes_with(p)) {
                return Err(ApiError::BadRequest(format!(
                    "host port {}/{} is published twice",
                    p.host_port,
                    p.proto.as_str()
                )));
            }
        }
        let ip = match spec.ip {
            Some(ip) => {
                self.check_free_address(&net, ip)?;
                ip
            }
            None => self.free_address(&net)?,
        };
        let instance = Instance {
            id: id.clone(),
            name: name.clone(),
            net: net.name.clone(),
            ip,
            hostname: hostname.clone(),
            host,
            cmd: spec.cmd.clone(),
            env: env.clone(),
            state: InstanceState::Creating,
            pid: None,
            exit: None,
            created: now,
            template: spec.template.clone(),
            limits,
            space: space.clone(),
            publish: spec.publish.clone(),
            service: spec.service.clone(),
            request: None,
            migrating: None,
            progress: None,
            migrations: Vec::new(),
            restart: spec.restart,
            restarts: 0,
            restart_reason: None,
            stopped: false,
            checkpoint_every: spec.checkpoint_every,
            checkpointed: None,
        };
        let mut batch = Batch::default();
        batch.put(&instance);
        self.instances.insert(id.clone(), instance);
        Ok((
            InstanceSpec {
                id,
                name,
                net,
                ip,
                hostname,
                cmd: spec.cmd,
                env,
                limits,
                space,
                publish: spec.publish,
            },
            batch,
        ))
    }

    /// Why `publish` cannot be published on `host`: a port another instance there has
    /// (other than `except`, the one moving).
    pub fn publish_clash(
        &self,
        host: &str,
        publish: &[vane_proto::validate::Publish],
        except: Option<&str>,
    ) -> Option<String> {
        self.instances
            .values()
            .filter(|i| i.host == host && i.state != InstanceState::Lost)
            .filter(|i| Some(i.id.as_str()) != except)
            .find_map(|i| {
                let (mine, theirs) = publish
                    .iter()
                    .find_map(|p| Some((p, i.publish.iter().find(|q| q.clashes_with(p))?)))?;
                Some(format!(
                    "host port {}/{} of host {host:?} is published already, by instance {:?} ({theirs}); {mine} cannot be",
                    mine.host_port,
                    mine.proto.as_str(),
                    i.name
                ))
            })
    }

    pub(super) fn member_at(&self, net: &str, ip: Ipv4Addr) -> Option<&Instance> {
        self.instances.values().find(|i| i.net == net && i.ip == ip)
    }

    /// The lowest address of `net` that no instance, service or gateway has.
    pub(super) fn free_address(&self, net: &Net) -> Result<Ipv4Addr, ApiError> {
        let used = self.used_addresses(net);
        net.subnet
            .hosts()
            .find(|ip| !used.contains(ip))
            .ok_or_else(|| net_full(net))
    }

    /// The addresses of `net` that instances, services and gateways (theirs and their
    /// resolver) have.
    pub(super) fn used_addresses(&self, net: &Net) -> BTreeSet<Ipv4Addr> {
        self.instances
            .values()
            .filter(|i| i.net == net.name)
            .map(|i| i.ip)
            .chain(
                self.services
                    .values()
                    .filter(|s| s.net == net.name)
                    .map(|s| s.vip),
            )
            .chain(
                self.gateways
                    .values()
                    .filter(|g| g.net == net.name)
                    .flat_map(|g| [g.ip, g.resolver]),
            )
            .collect()
    }

    /// The least loaded online host where `publish` can be published (`except`: an
    /// instance whose own ports do not count, the one being placed again).
    pub(super) fn least_loaded_host_for(
        &self,
        publish: &[vane_proto::validate::Publish],
        except: Option<&str>,
    ) -> Result<String, ApiError> {
        self.hosts
            .values()
            .filter(|h| h.state == HostState::Online)
            .filter(|h| {
                publish.is_empty() || self.publish_clash(&h.name, publish, except).is_none()
            })
            .min_by_key(|h| (self.instances_on(&h.name), h.name.clone()))
            .map(|h| h.name.clone())
            .ok_or_else(|| {
                ApiError::Unavailable("no host is online: start an agent (vane agent)".into())
            })
    }

    /// Applies what the agent of `host` reports about an instance, only if the instance is
    /// that host's (a copy elsewhere, being removed, says nothing of it); returns the batch
    /// if anything changed.
    pub fn apply_report(&mut self, host: &str, report: &InstanceReport) -> Option<Batch> {
        let inst = self
            .instances
            .get_mut(&report.id)
            .filter(|i| i.host == host)?;
        if inst.state == report.state && inst.pid == report.pid && inst.exit == report.exit {
            return None;
        }
        inst.state = report.state;
        inst.pid = report.pid;
        inst.exit = report.exit;
        let mut batch = Batch::default();
        batch.put(&*inst);
        Some(batch)
    }

    /// What an agent needs to set up instance `inst` again (the destination of a migration).
    pub fn instance_spec(&self, inst: &Instance) -> Result<InstanceSpec, ApiError> {
        Ok(InstanceSpec {
            id: inst.id.clone(),
            name: inst.name.clone(),
            net: self.net(&inst.net)?.clone(),
            ip: inst.ip,
            hostname: inst.hostname.clone(),
            cmd: inst.cmd.clone(),
            env: inst.env.clone(),
            limits: inst.limits,
            space: inst.space.clone(),
            publish: inst.publish.clone(),
        })
    }

    /// Applies `change` to instance `id`: its new record and what to commit, if it exists.
    pub fn change_instance(
        &mut self,
        id: &str,
        change: impl FnOnce(&mut Instance),
    ) -> Option<(Instance, Batch)> {
        let inst = self.instances.get_mut(id)?;
        change(inst);
        let mut batch = Batch::default();
        batch.put(&*inst);
        Some((inst.clone(), batch))
    }

    /// Forgets an instance (after its host removed it, or when it failed to start).
    pub fn drop_instance(&mut self, id: &str) -> Batch {
        let mut batch = Batch::default();
        if let Some(inst) = self.instances.remove(id) {
            batch.delete(&inst);
        }
        batch
    }

    /// Reconciles the controller's instances on `host` with what its agent reports after
    /// (re)connecting: reported ones take the agent's state; ones the agent does not know
    /// are lost (their host's state was wiped). Returns the ids the agent has that it must
    /// not keep: ones the controller does not know, and stale copies of instances that run
    /// elsewhere (a migration that failed while the host was away, after its restore there
    /// had finished), unless a migration to this host is under way (`recovery` decides).
    pub fn reconcile(&mut self, host: &str, reports: &[InstanceReport]) -> (Batch, Vec<String>) {
        let mut batch = Batch::default();
        let by_id: BTreeMap<&str, &InstanceReport> =
            reports.iter().map(|r| (r.id.as_str(), r)).collect();
        for inst in self.instances.values_mut().filter(|i| i.host == host) {
            let (state, pid, exit) = match by_id.get(inst.id.as_str()) {
                Some(r) => (r.state, r.pid, r.exit),
                None => (InstanceState::Lost, None, inst.exit),
            };
            if (inst.state, inst.pid, inst.exit) != (state, pid, exit) {
                inst.state = state;
                inst.pid = pid;
                inst.exit = exit;
                batch.put(&*inst);
            }
        }
        let unknown = reports
            .iter()
            .filter(|r| match self.instances.get(&r.id) {
                None => true,
                Some(i) => i.host != host && i.migrating.as_deref() != Some(host),
            })
            .map(|r| r.id.clone())
            .collect();
        (batch, unknown)
    }
}

/// The error of a net without a free address.
pub(super) fn net_full(net: &Net) -> ApiError {
    ApiError::Conflict(format!(
        "net {:?} ({}) has no free address left",
        net.name, net.subnet
    ))
}
