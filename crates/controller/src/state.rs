//! The controller's model: nets, hosts, instances and policies, and the rules that keep
//! them consistent. No I/O here: each change returns the `Batch` to persist, and the caller
//! commits it before answering, so these rules are tested without sockets or disks.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};

use ipnet::Ipv4Net;

use vane_proto::api::{
    ClusterConfig, Host, HostState, Instance, InstanceState, Net, NetSpec, Policy, PolicySpec,
    RunSpec, SpaceSpec, Template,
};
use vane_proto::stream::{
    AgentView, HostAuth, InstanceReport, InstanceSpec, Member, Peer, PolicyRule,
};
use vane_proto::validate;

use crate::enroll::{self, Admission, Enrollment, Refusal, TokenRecord};
use crate::store::{Batch, Counters, Snapshot};

/// An error of the API, with the HTTP status class it maps to.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
}

impl From<validate::InputError> for ApiError {
    fn from(e: validate::InputError) -> Self {
        ApiError::BadRequest(e.to_string())
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::Internal(e.to_string())
    }
}

#[derive(Debug, Default)]
pub struct State {
    pub config: ClusterConfig,
    counters: Counters,
    pub nets: BTreeMap<String, Net>,
    /// By instance id.
    pub instances: BTreeMap<String, Instance>,
    pub hosts: BTreeMap<String, Host>,
    pub policies: BTreeMap<u32, Policy>,
    /// Join tokens by hash.
    tokens: BTreeMap<String, TokenRecord>,
    /// By host name.
    enrollments: BTreeMap<String, Enrollment>,
    /// Resource templates by name.
    pub templates: BTreeMap<String, Template>,
    /// Tenant credentials by hash.
    credentials: BTreeMap<String, crate::auth::CredentialRecord>,
}

impl State {
    /// Builds the state from what the store holds. A new store takes `config`; an existing
    /// one keeps the config it was created with. Every host starts offline until its agent
    /// connects again.
    pub fn from_snapshot(snap: Snapshot, config: ClusterConfig) -> (State, Batch) {
        let mut batch = Batch::default();
        let config = match snap.config {
            Some(c) => c,
            None => {
                batch.config(&config);
                config
            }
        };
        let mut state = State {
            config,
            counters: snap.counters,
            nets: snap.nets.into_iter().map(|n| (n.name.clone(), n)).collect(),
            instances: snap
                .instances
                .into_iter()
                .map(|i| (i.id.clone(), i))
                .collect(),
            hosts: snap
                .hosts
                .into_iter()
                .map(|h| (h.name.clone(), h))
                .collect(),
            policies: snap.policies.into_iter().map(|p| (p.id, p)).collect(),
            tokens: snap
                .tokens
                .into_iter()
                .map(|t| (t.hash.clone(), t))
                .collect(),
            credentials: snap
                .credentials
                .into_iter()
                .map(|c| (c.hash.clone(), c))
                .collect(),
            enrollments: snap
                .enrollments
                .into_iter()
                .map(|e| (e.host.clone(), e))
                .collect(),
            templates: snap
                .templates
                .into_iter()
                .map(|t| (t.name.clone(), t))
                .collect(),
        };
        for host in state.hosts.values_mut() {
            host.state = HostState::Offline;
        }
        // A migration the controller was running when it stopped keeps its mark until
        // `recovery` has finished it.
        (state, batch)
    }

    pub fn net(&self, name: &str) -> Result<&Net, ApiError> {
        self.nets
            .get(name)
            .ok_or_else(|| ApiError::NotFound(format!("unknown net {name:?}")))
    }

    pub fn instance_by_name(&self, name: &str) -> Result<&Instance, ApiError> {
        self.instances
            .values()
            .find(|i| i.name == name)
            .ok_or_else(|| ApiError::NotFound(format!("unknown instance {name:?}")))
    }

    pub fn create_net(&mut self, spec: NetSpec, now: u64) -> Result<(Net, Batch), ApiError> {
        validate::name("net name", &spec.name)?;
        validate::name("tenant", &spec.tenant)?;
        if self.nets.contains_key(&spec.name) {
            return Err(ApiError::Conflict(format!(
                "net {:?} already exists",
                spec.name
            )));
        }
        if spec.subnet.trunc() != spec.subnet {
            return Err(ApiError::BadRequest(format!(
                "subnet {} has host bits set (did you mean {}?)",
                spec.subnet,
                spec.subnet.trunc()
            )));
        }
        if spec.subnet.prefix_len() > 30 {
            return Err(ApiError::BadRequest(format!(
                "subnet {} is too small: a net needs at least a /30",
                spec.subnet
            )));
        }
        if !self.config.global_space.contains(&spec.subnet) {
            return Err(ApiError::BadRequest(format!(
                "subnet {} is outside the global virtual space {}",
                spec.subnet, self.config.global_space
            )));
        }
        // Overlapping subnets are how tenants keep their own address plans; within one
        // tenant they would make addresses ambiguous.
        if let Some(other) = self
            .nets
            .values()
            .find(|n| n.tenant == spec.tenant && overlaps(&n.subnet, &spec.subnet))
        {
            return Err(ApiError::Conflict(format!(
                "subnet {} overlaps net {:?} ({}) of the same tenant {:?}",
                spec.subnet, other.name, other.subnet, spec.tenant
            )));
        }
        self.counters.net += 1;
        let net = Net {
            id: self.counters.net,
            name: spec.name,
            tenant: spec.tenant,
            subnet: spec.subnet,
            egress: spec.egress,
            created: now,
        };
        let mut batch = Batch::default();
        batch.put(&net).counters(&self.counters);
        self.nets.insert(net.name.clone(), net.clone());
        Ok((net, batch))
    }

    pub fn remove_net(&mut self, name: &str) -> Result<Batch, ApiError> {
        let net = self.net(name)?.clone();
        let users: Vec<&str> = self
            .instances
            .values()
            .filter(|i| i.net == net.name)
            .map(|i| i.name.as_str())
            .collect();
        if !users.is_empty() {
            return Err(ApiError::Conflict(format!(
                "net {name:?} is used by instances: {}",
                users.join(", ")
            )));
        }
        let rules: Vec<String> = self
            .policies
            .values()
            .filter(|p| p.from == net.name || p.to == net.name)
            .map(|p| p.id.to_string())
            .collect();
        if !rules.is_empty() {
            return Err(ApiError::Conflict(format!(
                "net {name:?} is named in policies {}: remove them first",
                rules.join(", ")
            )));
        }
        self.nets.remove(name);
        let mut batch = Batch::default();
        batch.delete(&net);
        Ok(batch)
    }

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
        let host = match spec.host {
            Some(h) => {
                let host = self
                    .hosts
                    .get(&h)
                    .ok_or_else(|| ApiError::NotFound(format!("unknown host {h:?}")))?;
                if host.state != HostState::Online {
                    return Err(ApiError::Unavailable(format!("host {h:?} is offline")));
                }
                h
            }
            None => self.least_loaded_host()?,
        };
        let ip = match spec.ip {
            Some(ip) => {
                if !net.subnet.contains(&ip) {
                    return Err(ApiError::BadRequest(format!(
                        "address {ip} is outside net {:?} ({})",
                        net.name, net.subnet
                    )));
                }
                if ip == net.subnet.network() || ip == net.subnet.broadcast() {
                    return Err(ApiError::BadRequest(format!(
                        "address {ip} is the network or broadcast address of {}",
                        net.subnet
                    )));
                }
                if let Some(other) = self.member_at(&net.name, ip) {
                    return Err(ApiError::Conflict(format!(
                        "address {ip} is already in use by instance {:?} in net {:?}",
                        other.name, net.name
                    )));
                }
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
            migrating: None,
            progress: None,
            migrations: Vec::new(),
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
            },
            batch,
        ))
    }

    /// Adds or replaces a template.
    pub fn put_template(&mut self, t: Template) -> Result<(Template, Batch), ApiError> {
        validate::name("template name", &t.name)?;
        check_settings(&t.env, &t.space)?;
        let mut batch = Batch::default();
        batch.put(&t);
        self.templates.insert(t.name.clone(), t.clone());
        Ok((t, batch))
    }

    pub fn remove_template(&mut self, name: &str) -> Result<Batch, ApiError> {
        let t = self
            .templates
            .remove(name)
            .ok_or_else(|| ApiError::NotFound(format!("unknown template {name:?}")))?;
        let mut batch = Batch::default();
        batch.delete(&t);
        Ok(batch)
    }

    fn member_at(&self, net: &str, ip: Ipv4Addr) -> Option<&Instance> {
        self.instances.values().find(|i| i.net == net && i.ip == ip)
    }

    fn free_address(&self, net: &Net) -> Result<Ipv4Addr, ApiError> {
        let used: BTreeSet<Ipv4Addr> = self
            .instances
            .values()
            .filter(|i| i.net == net.name)
            .map(|i| i.ip)
            .collect();
        net.subnet
            .hosts()
            .find(|ip| !used.contains(ip))
            .ok_or_else(|| {
                ApiError::Conflict(format!(
                    "net {:?} ({}) has no free address left",
                    net.name, net.subnet
                ))
            })
    }

    fn least_loaded_host(&self) -> Result<String, ApiError> {
        self.hosts
            .values()
            .filter(|h| h.state == HostState::Online)
            .min_by_key(|h| (self.instances_on(&h.name), h.name.clone()))
            .map(|h| h.name.clone())
            .ok_or_else(|| {
                ApiError::Unavailable("no host is online: start an agent (vane agent)".into())
            })
    }

    pub fn instances_on(&self, host: &str) -> usize {
        self.instances.values().filter(|i| i.host == host).count()
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

    /// Forgets an instance (after its host removed it, or when it failed to start).
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

    pub fn drop_instance(&mut self, id: &str) -> Batch {
        let mut batch = Batch::default();
        if let Some(inst) = self.instances.remove(id) {
            batch.delete(&inst);
        }
        batch
    }

    pub fn add_policy(&mut self, spec: PolicySpec) -> Result<(Policy, Batch), ApiError> {
        let from = self.net(&spec.from)?.clone();
        let to = self.net(&spec.to)?.clone();
        if from.name == to.name {
            return Err(ApiError::BadRequest(format!(
                "net {:?} always reaches itself: a policy needs two different nets",
                from.name
            )));
        }
        if let Some(p) = self
            .policies
            .values()
            .find(|p| p.from == from.name && p.to == to.name && p.port == spec.port)
        {
            return Err(ApiError::Conflict(format!(
                "policy {} already allows this",
                p.id
            )));
        }
        // An address must name one member: from `from`'s point of view its own subnet and
        // the subnets of every net it may reach must not overlap.
        if overlaps(&from.subnet, &to.subnet) {
            return Err(ApiError::Conflict(format!(
                "ambiguous: {:?} ({}) overlaps {:?}'s own subnet {}",
                to.name, to.subnet, from.name, from.subnet
            )));
        }
        for p in self.policies.values().filter(|p| p.from == from.name) {
            let other = self.net(&p.to)?;
            if other.name != to.name && overlaps(&other.subnet, &to.subnet) {
                return Err(ApiError::Conflict(format!(
                    "ambiguous: {:?} may already reach {:?} ({}), which overlaps {:?} ({})",
                    from.name, other.name, other.subnet, to.name, to.subnet
                )));
            }
        }
        self.counters.policy += 1;
        let policy = Policy {
            id: self.counters.policy,
            from: from.name,
            to: to.name,
            port: spec.port,
        };
        let mut batch = Batch::default();
        batch.put(&policy).counters(&self.counters);
        self.policies.insert(policy.id, policy.clone());
        Ok((policy, batch))
    }

    pub fn remove_policy(&mut self, id: u32) -> Result<Batch, ApiError> {
        let policy = self
            .policies
            .remove(&id)
            .ok_or_else(|| ApiError::NotFound(format!("unknown policy {id}")))?;
        let mut batch = Batch::default();
        batch.delete(&policy);
        Ok(batch)
    }

    /// A join token valid for `ttl_secs` from `now`, spent by the first host that joins
    /// with it unless `reusable`. Expired tokens are forgotten. Returns the token, its
    /// expiry and its id.
    pub fn create_token(
        &mut self,
        ttl_secs: u64,
        reusable: bool,
        now: u64,
    ) -> Result<(String, u64, String, Batch), ApiError> {
        if ttl_secs == 0 || ttl_secs > 365 * 24 * 3600 {
            return Err(ApiError::BadRequest(
                "token lifetime must be between 1 second and 365 days".into(),
            ));
        }
        let mut batch = Batch::default();
        let expired: Vec<TokenRecord> = self
            .tokens
            .values()
            .filter(|t| t.expires <= now)
            .cloned()
            .collect();
        for t in expired {
            self.tokens.remove(&t.hash);
            batch.delete(&t);
        }
        let token = enroll::new_token();
        let record = TokenRecord {
            hash: enroll::hash(&token),
            expires: now + ttl_secs,
            single_use: !reusable,
        };
        batch.put(&record);
        self.tokens.insert(record.hash.clone(), record.clone());
        Ok((token, record.expires, record.id().to_string(), batch))
    }

    /// Join tokens still valid at `now`, soonest to expire first.
    pub fn tokens(&self, now: u64) -> Vec<vane_proto::api::TokenInfo> {
        let mut list: Vec<_> = self
            .tokens
            .values()
            .filter(|t| t.expires > now)
            .map(|t| vane_proto::api::TokenInfo {
                id: t.id().to_string(),
                expires: t.expires,
                single_use: t.single_use,
            })
            .collect();
        list.sort_by(|a, b| (a.expires, &a.id).cmp(&(b.expires, &b.id)));
        list
    }

    /// A credential for `tenant`, valid for `ttl_secs` from `now` (or until revoked).
    pub fn create_credential(
        &mut self,
        tenant: &str,
        ttl_secs: Option<u64>,
        now: u64,
    ) -> Result<(vane_proto::api::TenantCredential, Batch), ApiError> {
        validate::name("tenant", tenant)?;
        if ttl_secs.is_some_and(|t| t == 0 || t > 10 * 365 * 24 * 3600) {
            return Err(ApiError::BadRequest(
                "credential lifetime must be between 1 second and 10 years".into(),
            ));
        }
        let (secret, record) =
            crate::auth::new_tenant_credential(tenant, ttl_secs.map(|t| now + t));
        let mut batch = Batch::default();
        batch.put(&record);
        let info = record.info();
        self.credentials.insert(record.hash.clone(), record);
        Ok((
            vane_proto::api::TenantCredential {
                credential: secret,
                info,
            },
            batch,
        ))
    }

    /// Tenant credentials still valid at `now`.
    pub fn credentials(&self, now: u64) -> Vec<vane_proto::api::CredentialInfo> {
        let mut list: Vec<_> = self
            .credentials
            .values()
            .filter(|c| c.expires.is_none_or(|e| e > now))
            .map(|c| c.info())
            .collect();
        list.sort_by(|a, b| (&a.tenant, &a.id).cmp(&(&b.tenant, &b.id)));
        list
    }

    /// Revokes the tenant credential whose id is `id`.
    pub fn revoke_credential(&mut self, id: &str) -> Result<Batch, ApiError> {
        remove_by_id(&mut self.credentials, id, |c| c.id(), "credential")
    }

    /// The tenant whose valid credential `secret` is.
    pub fn tenant_of(&self, secret: &str, now: u64) -> Option<String> {
        self.credentials
            .get(&enroll::hash(secret))
            .filter(|c| c.expires.is_none_or(|e| e > now))
            .map(|c| c.tenant.clone())
    }

    /// The tenant of net `name`.
    pub fn net_tenant(&self, name: &str) -> Result<String, ApiError> {
        self.nets
            .get(name)
            .map(|n| n.tenant.clone())
            .ok_or_else(|| ApiError::NotFound(format!("unknown net {name:?}")))
    }

    /// Revokes the join token whose id is `id`: no host joins with it any more.
    pub fn revoke_token(&mut self, id: &str) -> Result<Batch, ApiError> {
        remove_by_id(&mut self.tokens, id, |t| t.id(), "join token")
    }

    /// Whether `credential` is the one host `name` enrolled with (compared as hashes).
    pub fn host_credential_ok(&self, name: &str, credential: &str) -> bool {
        self.enrollments
            .get(name)
            .is_some_and(|e| enroll::hash(credential) == e.credential_hash)
    }

    /// Decides whether the agent of `name` may join, and records a new enrollment. Returns
    /// the credential to hand to a newly enrolled agent.
    pub fn admit_host(
        &mut self,
        name: &str,
        public_key: &str,
        auth: &HostAuth,
        now: u64,
    ) -> Result<(Option<String>, Batch), Refusal> {
        let tokens = &self.tokens;
        let admission =
            enroll::admit(name, public_key, auth, self.enrollments.get(name), |hash| {
                tokens.get(hash).is_some_and(|t| t.expires > now)
            })?;
        let mut batch = Batch::default();
        match admission {
            Admission::Known => Ok((None, batch)),
            Admission::Enrolled {
                enrollment,
                credential,
            } => {
                // A single-use token is spent.
                if let HostAuth::Token(t) = auth {
                    let secret =
                        vane_proto::trust::split_join_token(t).map_or(t.as_str(), |(s, _)| s);
                    let hash = enroll::hash(secret);
                    if self.tokens.get(&hash).is_some_and(|t| t.single_use) {
                        if let Some(t) = self.tokens.remove(&hash) {
                            batch.delete(&t);
                        }
                    }
                }
                batch.put(&enrollment);
                self.enrollments.insert(name.to_string(), enrollment);
                Ok((Some(credential), batch))
            }
        }
    }

    /// Forgets a host that is offline and has no instances, with its enrollment, so that
    /// its name can be enrolled again (by a reinstalled machine, with a new key). `evict`:
    /// whatever its state, with its instances (an untrusted host is cut off: its credential
    /// and key are gone, the other hosts stop talking to it).
    pub fn remove_host(&mut self, name: &str, evict: bool) -> Result<Batch, ApiError> {
        let host = self
            .hosts
            .get(name)
            .ok_or_else(|| ApiError::NotFound(format!("unknown host {name:?}")))?;
        if evict {
            let mut batch = Batch::default();
            let ids: Vec<String> = self
                .instances
                .values()
                .filter(|i| i.host == name)
                .map(|i| i.id.clone())
                .collect();
            for id in ids {
                batch.extend(self.drop_instance(&id));
            }
            if let Some(host) = self.hosts.remove(name) {
                batch.delete(&host);
            }
            if let Some(e) = self.enrollments.remove(name) {
                batch.delete(&e);
            }
            return Ok(batch);
        }
        if host.state == HostState::Online {
            return Err(ApiError::Conflict(format!(
                "host {name:?} is online: stop its agent first"
            )));
        }
        let n = self.instances_on(name);
        if n > 0 {
            return Err(ApiError::Conflict(format!(
                "host {name:?} still has {n} instance(s): remove them first (vane rm --force)"
            )));
        }
        let mut batch = Batch::default();
        if let Some(host) = self.hosts.remove(name) {
            batch.delete(&host);
        }
        if let Some(e) = self.enrollments.remove(name) {
            batch.delete(&e);
        }
        Ok(batch)
    }

    /// Records that the agent of `name` connected from `locator` with `public_key`.
    pub fn host_online(
        &mut self,
        name: &str,
        locator: Option<SocketAddr>,
        public_key: Option<&str>,
        now: u64,
    ) -> Batch {
        let counters = &mut self.counters;
        let mut batch = Batch::default();
        let host = self.hosts.entry(name.to_string()).or_insert_with(|| {
            counters.host += 1;
            batch.counters(counters);
            Host {
                id: counters.host,
                name: name.to_string(),
                locator,
                public_key: None,
                state: HostState::Offline,
                instances: 0,
                since: now,
            }
        });
        host.state = HostState::Online;
        host.locator = locator;
        if let Some(key) = public_key {
            host.public_key = Some(key.to_string());
        }
        host.since = now;
        batch.put(&*host);
        batch
    }

    pub fn host_offline(&mut self, name: &str, now: u64) -> Batch {
        let mut batch = Batch::default();
        if let Some(host) = self.hosts.get_mut(name) {
            host.state = HostState::Offline;
            host.since = now;
            batch.put(&*host);
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
        let peers = self
            .hosts
            .values()
            .filter(|h| h.name != host)
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
}

impl State {
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
            instance: i.id.clone(),
        })
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

/// Removes from `records` (secrets' records by hash) the one whose id (`id_of`) is `id`;
/// `what` names its kind in the error.
fn remove_by_id<R: crate::store::Record>(
    records: &mut BTreeMap<String, R>,
    id: &str,
    id_of: impl Fn(&R) -> &str,
    what: &str,
) -> Result<Batch, ApiError> {
    let key = records
        .iter()
        .find(|(_, r)| id_of(r) == id)
        .map(|(k, _)| k.clone())
        .ok_or_else(|| ApiError::NotFound(format!("unknown {what} {id:?}")))?;
    let mut batch = Batch::default();
    if let Some(r) = records.remove(&key) {
        batch.delete(&r);
    }
    Ok(batch)
}

fn overlaps(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Checks the environment and file-system settings of a request or template: well-formed
/// pairs and paths, known variables only. Limits are checked as they are parsed (CLI) and
/// again by the agent, which knows what its host can give.
fn check_settings(env: &[(String, String)], space: &SpaceSpec) -> Result<(), ApiError> {
    for (k, v) in env {
        validate::env_pair(&format!("{k}={v}"))?;
        validate::variables("environment variable", v)?;
    }
    if let Some(root) = &space.rootfs {
        validate::rootfs(root)?;
    }
    for (host, inside) in &space.volumes {
        validate::volume(&format!("{host}:{inside}"))?;
    }
    for (target, source) in &space.redirects {
        validate::redirect(&format!("{target}={source}"))?;
    }
    validate::capability_set(&space.cap_add, &space.cap_drop)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vane_proto::validate::PortSpec;

    fn state_with_host() -> State {
        let (mut s, _) = State::from_snapshot(Snapshot::default(), ClusterConfig::default());
        s.host_online("h1", None, None, 0);
        s
    }

    fn net(s: &mut State, name: &str, subnet: &str, tenant: &str) -> Result<Net, ApiError> {
        s.create_net(
            NetSpec {
                name: name.into(),
                subnet: subnet.parse().unwrap(),
                tenant: tenant.into(),
                egress: false,
            },
            0,
        )
        .map(|(n, _)| n)
    }

    fn run(s: &mut State, name: &str, net: &str, ip: Option<&str>) -> Result<Ipv4Addr, ApiError> {
        let id = format!("{name}-0123456789");
        s.plan_instance(
            RunSpec {
                name: Some(name.into()),
                net: net.into(),
                ip: ip.map(|i| i.parse().unwrap()),
                cmd: vec!["true".into()],
                ..Default::default()
            },
            id,
            0,
        )
        .map(|(spec, _)| spec.ip)
    }

    #[test]
    fn nets_of_different_tenants_may_overlap() {
        let mut s = state_with_host();
        let red = net(&mut s, "red", "10.10.2.0/24", "a").unwrap();
        let blue = net(&mut s, "blue", "10.10.2.0/24", "b").unwrap();
        assert_ne!(red.id, blue.id);
        assert!(matches!(
            net(&mut s, "pink", "10.10.0.0/16", "a"),
            Err(ApiError::Conflict(_))
        ));
        assert!(matches!(
            net(&mut s, "red", "10.30.0.0/24", "c"),
            Err(ApiError::Conflict(_))
        ));
        assert!(matches!(
            net(&mut s, "out", "192.168.0.0/24", "c"),
            Err(ApiError::BadRequest(_))
        ));
        assert!(matches!(
            net(&mut s, "bits", "10.40.0.1/24", "c"),
            Err(ApiError::BadRequest(_))
        ));
    }

    #[test]
    fn addresses_are_allocated_and_checked() {
        let mut s = state_with_host();
        net(&mut s, "red", "10.10.2.0/24", "a").unwrap();
        assert_eq!(
            run(&mut s, "web1", "red", Some("10.10.2.1")).unwrap(),
            "10.10.2.1".parse::<Ipv4Addr>().unwrap()
        );
        assert_eq!(
            run(&mut s, "cli1", "red", None).unwrap(),
            "10.10.2.2".parse::<Ipv4Addr>().unwrap()
        );
        let e = run(&mut s, "web2", "red", Some("10.10.2.1")).unwrap_err();
        assert!(e.to_string().contains("already in use"), "{e}");
        let e = run(&mut s, "web3", "red", Some("10.10.3.1")).unwrap_err();
        assert!(e.to_string().contains("outside"), "{e}");
        let e = run(&mut s, "web1", "red", None).unwrap_err();
        assert!(e.to_string().contains("already exists"), "{e}");
        let e = run(&mut s, "x", "nope", None).unwrap_err();
        assert_eq!(e, ApiError::NotFound("unknown net \"nope\"".into()));
        let e = s.remove_net("red").unwrap_err();
        assert!(e.to_string().contains("web1"), "{e}");
    }

    #[test]
    fn ambiguous_policies_are_refused() {
        let mut s = state_with_host();
        net(&mut s, "red", "10.10.2.0/24", "a").unwrap();
        net(&mut s, "blue", "10.10.2.0/24", "b").unwrap();
        net(&mut s, "green", "10.20.0.0/24", "a").unwrap();
        net(&mut s, "teal", "10.10.2.0/25", "c").unwrap();
        let allow = |s: &mut State, from: &str, to: &str, port: Option<&str>| {
            s.add_policy(PolicySpec {
                from: from.into(),
                to: to.into(),
                port: port.map(|p| p.parse::<PortSpec>().unwrap()),
            })
        };
        allow(&mut s, "green", "red", Some("80/tcp")).unwrap();
        allow(&mut s, "green", "red", Some("443/tcp")).unwrap();
        assert!(matches!(
            allow(&mut s, "green", "red", Some("80/tcp")),
            Err(ApiError::Conflict(_))
        ));
        let e = allow(&mut s, "green", "teal", None).unwrap_err();
        assert!(e.to_string().contains("ambiguous"), "{e}");
        let e = allow(&mut s, "red", "blue", None).unwrap_err();
        assert!(e.to_string().contains("ambiguous"), "{e}");
        assert!(allow(&mut s, "red", "red", None).is_err());
        allow(&mut s, "red", "green", None).unwrap();
        let e = s.remove_net("green").unwrap_err();
        assert!(e.to_string().contains("policies"), "{e}");
    }

    #[test]
    fn views_hold_what_a_host_needs() {
        let mut s = state_with_host();
        s.host_online("h2", None, None, 0);
        net(&mut s, "red", "10.10.2.0/24", "a").unwrap();
        net(&mut s, "green", "10.20.0.0/24", "a").unwrap();
        net(&mut s, "blue", "10.10.2.0/24", "b").unwrap();
        run(&mut s, "web1", "red", None).unwrap();
        s.plan_instance(
            RunSpec {
                name: Some("g1".into()),
                net: "green".into(),
                host: Some("h2".into()),
                cmd: vec!["true".into()],
                ..Default::default()
            },
            "g1-0123456789".into(),
            0,
        )
        .unwrap();
        let v = s.view_for("h1");
        assert_eq!(v.nets.len(), 1);
        assert_eq!(v.members.len(), 1);
        s.add_policy(PolicySpec {
            from: "green".into(),
            to: "red".into(),
            port: None,
        })
        .unwrap();
        let v = s.view_for("h1");
        let names: Vec<&str> = v.nets.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["green", "red"]);
        assert_eq!(v.members.len(), 2);
        assert_eq!(v.policies.len(), 1);
    }

    #[test]
    fn tenant_credentials_name_their_tenant_until_they_expire_or_are_revoked() {
        let (mut s, _) = State::from_snapshot(Snapshot::default(), ClusterConfig::default());
        let (a, _) = s.create_credential("a", None, 0).unwrap();
        let (b, _) = s.create_credential("b", Some(100), 0).unwrap();
        assert_eq!(s.tenant_of(&a.credential, 50).as_deref(), Some("a"));
        assert_eq!(s.tenant_of(&b.credential, 50).as_deref(), Some("b"));
        assert_eq!(s.tenant_of(&b.credential, 100), None);
        assert_eq!(s.tenant_of("vanetenant-00", 0), None);
        assert_eq!(s.credentials(50).len(), 2);
        assert_eq!(s.credentials(200).len(), 1);
        s.revoke_credential(&a.info.id).unwrap();
        assert_eq!(s.tenant_of(&a.credential, 50), None);
        assert!(s.revoke_credential(&a.info.id).is_err());
        assert!(s.create_credential("Not A Name", None, 0).is_err());
        assert!(s.create_credential("a", Some(0), 0).is_err());
    }

    #[test]
    fn join_tokens_are_spent_listed_and_revoked() {
        let (mut s, _) = State::from_snapshot(Snapshot::default(), ClusterConfig::default());
        let key = |n: u8| format!("{n:02x}").repeat(32);
        let join = |s: &mut State, name: &str, n: u8, token: &str| {
            s.admit_host(name, &key(n), &HostAuth::Token(token.into()), 10)
        };
        let (once, _, id, _) = s.create_token(60, false, 0).unwrap();
        let (many, _, _, _) = s.create_token(60, true, 0).unwrap();
        assert_eq!(s.tokens(0).len(), 2);
        assert!(s.tokens(0).iter().any(|t| t.id == id && t.single_use));
        // The single-use token enrolls one host, then no other.
        assert!(join(&mut s, "a", 1, &once).unwrap().0.is_some());
        assert!(matches!(
            join(&mut s, "b", 2, &once),
            Err(Refusal::BadToken)
        ));
        assert_eq!(s.tokens(0).len(), 1);
        // The reusable one enrolls several (a token as printed carries the CA's pin).
        let printed = vane_proto::trust::join_token(&many, &[9; 32]);
        assert!(join(&mut s, "b", 2, &printed).unwrap().0.is_some());
        assert!(join(&mut s, "c", 3, &many).unwrap().0.is_some());
        // Revoked, it enrolls nobody; expired tokens are not listed.
        let many_id = s.tokens(0)[0].id.clone();
        s.revoke_token(&many_id).unwrap();
        assert!(matches!(
            join(&mut s, "d", 4, &many),
            Err(Refusal::BadToken)
        ));
        assert!(s.revoke_token(&many_id).is_err());
        s.create_token(5, false, 0).unwrap();
        assert!(s.tokens(10).is_empty());
    }

    #[test]
    fn templates_apply_first_and_flags_override_them() {
        use vane_proto::api::{Limits, SpaceSpec, Template};
        let mut s = state_with_host();
        net(&mut s, "red", "10.1.0.0/24", "a").unwrap();
        s.put_template(Template {
            name: "small".into(),
            tenant: None,
            limits: Limits {
                memory: Some(128 << 20),
                cpu_millis: Some(250),
                ..Limits::default()
            },
            env: vec![
                ("HOME".into(), "/srv/{name}".into()),
                ("A".into(), "1".into()),
            ],
            space: SpaceSpec {
                redirects: vec![("/etc/app".into(), "{state}/app".into())],
                ..SpaceSpec::default()
            },
        })
        .unwrap();
        let (spec, _) = s
            .plan_instance(
                RunSpec {
                    name: Some("web".into()),
                    net: "red".into(),
                    cmd: vec!["true".into()],
                    template: Some("small".into()),
                    env: vec![("A".into(), "2".into())],
                    limits: Limits {
                        cpu_millis: Some(500),
                        pids: Some(10),
                        ..Limits::default()
                    },
                    ..Default::default()
                },
                "web-0123456789".into(),
                0,
            )
            .unwrap();
        assert_eq!(
            spec.limits,
            Limits {
                memory: Some(128 << 20),
                cpu_millis: Some(500),
                pids: Some(10),
                bandwidth: None
            }
        );
        assert_eq!(
            spec.env,
            vec![
                ("HOME".to_string(), "/srv/{name}".to_string()),
                ("A".to_string(), "2".to_string())
            ]
        );
        assert_eq!(spec.space.redirects.len(), 1);
        assert_eq!(
            s.instance_by_name("web").unwrap().template.as_deref(),
            Some("small")
        );

        let unknown = RunSpec {
            name: Some("x".into()),
            net: "red".into(),
            cmd: vec!["true".into()],
            template: Some("nope".into()),
            ..Default::default()
        };
        let e = s
            .plan_instance(unknown, "x-0123456789".into(), 0)
            .unwrap_err();
        assert!(e.to_string().contains("unknown template \"nope\""), "{e}");
        let bad = Template {
            name: "bad".into(),
            env: vec![("X".into(), "{nope}".into())],
            ..Template::default()
        };
        assert!(s.put_template(bad).is_err());
        let bad_cap = Template {
            name: "bad".into(),
            space: SpaceSpec {
                cap_add: vec!["SYS_FOO".into()],
                ..SpaceSpec::default()
            },
            ..Template::default()
        };
        let e = s.put_template(bad_cap).unwrap_err();
        assert!(e.to_string().contains("SYS_FOO"), "{e}");
        assert!(s.remove_template("small").is_ok());
        assert!(s.remove_template("small").is_err());
    }
}
