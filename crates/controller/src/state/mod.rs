//! The controller's model: nets, hosts, instances and policies, and the rules that keep
//! them consistent. No I/O here: each change returns the `Batch` to persist, and the caller
//! commits it before answering, so these rules are tested without sockets or disks.
//!
//! This file holds the state itself, its loading from the store and the lookups the other
//! parts share; each kind of object has its own file:
//! - `nets`: nets and the policies between them, with the address rules;
//! - `services`: services (a name and virtual address spread over members);
//! - `gateways`: WireGuard gateways (a member of a net that a WireGuard client becomes);
//! - `templates`: resource templates and the checks of an instance's settings;
//! - `instances`: planning a run, agents' reports and reconciliation, changes, forgetting;
//! - `access`: join tokens and tenant credentials;
//! - `hosts`: admitting agents, online and offline, removal and eviction;
//! - `failover`: restart policies: a dead host's instances placed elsewhere, ended
//!   programs started again, the backoff between starts;
//! - `views`: what each agent's switch sees, and the answers to its misses.

use std::collections::BTreeMap;

use vane_proto::api::{
    ClusterConfig, Gateway, Host, HostState, Instance, Net, Policy, Service, Template,
};
use vane_proto::validate;

use crate::enroll::{Enrollment, TokenRecord};
use crate::store::{Batch, Counters, Snapshot};

pub use failover::{Backoff, Restart};

mod access;
mod failover;
mod gateways;
mod hosts;
mod instances;
mod nets;
mod services;
mod templates;
mod views;
pub use gateways::new_private_key;
pub use views::{ViewCache, ViewKey};

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
    /// An agent says the instance left its host (`ErrorKind::Moved`).
    #[error("{0}")]
    Moved(String),
}

impl ApiError {
    /// The same error, its message saying which host gave it (a restore may run on a host
    /// the user did not name).
    pub fn from_host(self, host: &str) -> ApiError {
        let said = |m: String| format!("host {host:?}: {m}");
        match self {
            ApiError::BadRequest(m) => ApiError::BadRequest(said(m)),
            ApiError::NotFound(m) => ApiError::NotFound(said(m)),
            ApiError::Conflict(m) => ApiError::Conflict(said(m)),
            ApiError::Unavailable(m) => ApiError::Unavailable(said(m)),
            ApiError::Internal(m) => ApiError::Internal(said(m)),
            ApiError::Unauthorized(m) => ApiError::Unauthorized(said(m)),
            ApiError::Forbidden(m) => ApiError::Forbidden(said(m)),
            ApiError::Moved(m) => ApiError::Moved(said(m)),
        }
    }
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
    /// Services by name.
    pub services: BTreeMap<String, Service>,
    /// WireGuard gateways by name.
    pub gateways: BTreeMap<String, Gateway>,
    /// Instances frozen for a migration, by id, with the lookups that wait for them to run
    /// again (`views.rs`). Not stored: a controller that stops thaws everything, and the
    /// switches ask again.
    frozen: BTreeMap<String, views::Frozen>,
}

impl State {
    /// Builds the state from what the store holds. A new store takes `config`; an existing
    /// one keeps the config it was created with. Every host starts offline until its agent
    /// connects again; a host declared dead stays dead (its instances went elsewhere).
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
            services: snap
                .services
                .into_iter()
                .map(|s| (s.name.clone(), s))
                .collect(),
            gateways: snap
                .gateways
                .into_iter()
                .map(|g| (g.name.clone(), g))
                .collect(),
            frozen: BTreeMap::new(),
        };
        for host in state.hosts.values_mut() {
            if host.state != HostState::Dead {
                host.state = HostState::Offline;
            }
        }
        // A term of its own, above every earlier controller's: its views are newer.
        state.counters.term += 1;
        batch.counters(&state.counters);
        // A migration the controller was running when it stopped keeps its mark until
        // `recovery` has finished it.
        (state, batch)
    }

    /// This controller's term, taken when it loaded the store.
    pub fn term(&self) -> u64 {
        self.counters.term
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

    /// The tenant of net `name`.
    pub fn net_tenant(&self, name: &str) -> Result<String, ApiError> {
        self.nets
            .get(name)
            .map(|n| n.tenant.clone())
            .ok_or_else(|| ApiError::NotFound(format!("unknown net {name:?}")))
    }

    pub fn instances_on(&self, host: &str) -> usize {
        self.instances.values().filter(|i| i.host == host).count()
    }
}

#[cfg(test)]
mod tests;
