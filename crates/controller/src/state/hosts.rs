//! Hosts: admitting an agent (enrollment), checking its credential, marking it online or
//! offline, and removing or evicting it.

use std::net::SocketAddr;

use vane_proto::api::{GatewayEndpoint, Host, HostState};
use vane_proto::stream::HostAuth;
use vane_proto::validate;

use super::{ApiError, State};
use crate::enroll::{self, Admission, Refusal};
use crate::store::Batch;

impl State {
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
            let gateways: Vec<String> = self.gateways_on(name).map(|g| g.name.clone()).collect();
            for g in gateways {
                if let Some(g) = self.gateways.remove(&g) {
                    batch.delete(&g);
                }
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
        let gateways: Vec<&str> = self.gateways_on(name).map(|g| g.name.as_str()).collect();
        if !gateways.is_empty() {
            return Err(ApiError::Conflict(format!(
                "host {name:?} still has gateways: {} (vane gateway rm)",
                gateways.join(", ")
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

    /// Records where the agent of `name` takes WireGuard clients, as its hello says: none
    /// if it says nothing, or gives a key that is not one (then the reason is returned too,
    /// for the log).
    pub fn host_gateway(
        &mut self,
        name: &str,
        gateway: Option<GatewayEndpoint>,
    ) -> (Batch, Option<String>) {
        let mut batch = Batch::default();
        let (gateway, refused) = match gateway {
            Some(g) => match validate::wireguard_key("gateway key", &g.public_key) {
                Ok(_) if g.port != 0 => (Some(g), None),
                Ok(_) => (None, Some("gateway port 0".to_string())),
                Err(e) => (None, Some(e.to_string())),
            },
            None => (None, None),
        };
        if let Some(host) = self.hosts.get_mut(name) {
            if host.gateway != gateway {
                host.gateway = gateway;
                batch.put(&*host);
            }
        }
        (batch, refused)
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
                gateway: None,
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
}
