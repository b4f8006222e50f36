//! The persistent store: one table per kind of object, values as JSON, in one of two
//! backends: an embedded redb database in the data directory (`embedded`, the default), or
//! an etcd cluster (`etcd`), which outlives any one controller's machine. Every change is
//! committed (durably: fsynced, or agreed by a majority of etcd's members) before the API
//! answers, so a restarted controller comes back with every net, instance, host and policy
//! it had acknowledged.

use serde::de::DeserializeOwned;
use serde::Serialize;

use vane_proto::api::{ClusterConfig, Gateway, Host, Instance, Net, Policy, Service, Template};

use crate::enroll::{Enrollment, TokenRecord};

mod embedded;
mod etcd;

pub(crate) use etcd::Members;

/// The tables, by name: the kinds of object the store holds.
const NETS: &str = "nets";
const INSTANCES: &str = "instances";
const HOSTS: &str = "hosts";
const POLICIES: &str = "policies";
const META: &str = "meta";
const TOKENS: &str = "tokens";
const ENROLLMENTS: &str = "enrollments";
const TEMPLATES: &str = "templates";
const CREDENTIALS: &str = "credentials";
const SERVICES: &str = "services";
const GATEWAYS: &str = "gateways";
const TABLES: [&str; 11] = [
    NETS,
    INSTANCES,
    HOSTS,
    POLICIES,
    META,
    TOKENS,
    ENROLLMENTS,
    TEMPLATES,
    CREDENTIALS,
    SERVICES,
    GATEWAYS,
];

/// Where the store is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// `store.redb` in the controller's data directory.
    Embedded,
    /// An etcd cluster: its members' client URLs, and the prefix of vane's keys.
    Etcd {
        endpoints: Vec<String>,
        prefix: String,
    },
}

impl std::str::FromStr for StoreLocation {
    type Err = String;

    /// `embedded`, or `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]` (prefix default `vane`).
    fn from_str(s: &str) -> Result<StoreLocation, String> {
        if s == "embedded" {
            return Ok(StoreLocation::Embedded);
        }
        let Some(rest) = s.strip_prefix("etcd://") else {
            return Err(format!(
                "invalid store {s:?}: use `embedded` or etcd://HOST:PORT[,HOST:PORT...][/PREFIX]"
            ));
        };
        let (members, prefix) = rest.split_once('/').unwrap_or((rest, "vane"));
        let prefix = prefix.trim_matches('/');
        if prefix.is_empty()
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'/')
        {
            return Err(format!(
                "invalid etcd key prefix {prefix:?}: use letters, digits, '-', '_' and '/'"
            ));
        }
        let mut endpoints = Vec::new();
        for m in members.split(',') {
            let valid = m
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !valid {
                return Err(format!(
                    "invalid etcd member {m:?} in {s:?}: use HOST:PORT, comma-separated"
                ));
            }
            endpoints.push(format!("http://{m}"));
        }
        Ok(StoreLocation::Etcd {
            endpoints,
            prefix: prefix.to_string(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {source}")]
    Open {
        path: String,
        source: redb::DatabaseError,
    },
    #[error("store at etcd {endpoints}: {why}")]
    Etcd { endpoints: String, why: String },
    #[error("store: {0}")]
    Db(String),
    #[error("store: another controller leads now; this one's changes are refused")]
    Deposed,
    #[error("store: corrupt record {key:?} in {table}: {source}")]
    Corrupt {
        table: &'static str,
        key: String,
        source: serde_json::Error,
    },
}

/// Everything the store holds, loaded at start.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub config: Option<ClusterConfig>,
    pub counters: Counters,
    pub nets: Vec<Net>,
    pub instances: Vec<Instance>,
    pub hosts: Vec<Host>,
    pub policies: Vec<Policy>,
    pub tokens: Vec<TokenRecord>,
    pub enrollments: Vec<Enrollment>,
    pub templates: Vec<Template>,
    pub credentials: Vec<crate::auth::CredentialRecord>,
    pub services: Vec<Service>,
    pub gateways: Vec<Gateway>,
}

/// Id counters, persisted so that ids are never reused (an id reused for another net would
/// let a stale frame in flight reach the wrong net).
#[derive(Debug, Default, Clone, Copy, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Counters {
    pub net: u32,
    pub host: u32,
    pub policy: u32,
    /// The term of the last controller that took the store on: each start, or each new
    /// leader among replicas, takes the next one (`AgentView::revision`).
    #[serde(default)]
    pub term: u64,
}

/// The store, whichever its backend.
pub enum Store {
    Embedded(embedded::Embedded),
    Etcd(etcd::Etcd),
}

/// One kind of object, with the table that holds it and its key.
pub trait Record: Serialize + DeserializeOwned {
    const NAME: &'static str;
    fn key(&self) -> String;
}

impl Record for Net {
    const NAME: &'static str = NETS;
    fn key(&self) -> String {
        self.name.clone()
    }
}
impl Record for Instance {
    const NAME: &'static str = INSTANCES;
    fn key(&self) -> String {
        self.id.clone()
    }
}
impl Record for Host {
    const NAME: &'static str = HOSTS;
    fn key(&self) -> String {
        self.name.clone()
    }
}
impl Record for Policy {
    const NAME: &'static str = POLICIES;
    fn key(&self) -> String {
        format!("{:010}", self.id)
    }
}

impl Record for TokenRecord {
    const NAME: &'static str = TOKENS;
    fn key(&self) -> String {
        self.hash.clone()
    }
}
impl Record for Enrollment {
    const NAME: &'static str = ENROLLMENTS;
    fn key(&self) -> String {
        self.host.clone()
    }
}

impl Record for crate::auth::CredentialRecord {
    const NAME: &'static str = CREDENTIALS;
    fn key(&self) -> String {
        self.hash.clone()
    }
}

impl Record for Template {
    const NAME: &'static str = TEMPLATES;
    fn key(&self) -> String {
        self.name.clone()
    }
}

impl Record for Service {
    const NAME: &'static str = SERVICES;
    fn key(&self) -> String {
        self.name.clone()
    }
}

impl Record for Gateway {
    const NAME: &'static str = GATEWAYS;
    fn key(&self) -> String {
        self.name.clone()
    }
}

impl Store {
    /// Opens the store at `location`: for the embedded one, in `data_dir`.
    pub fn open(location: &StoreLocation, data_dir: &std::path::Path) -> Result<Store, StoreError> {
        Store::open_fenced(location, data_dir, None)
    }

    /// `open`, for the leader among replicas: its changes hold only while it leads.
    pub fn open_fenced(
        location: &StoreLocation,
        data_dir: &std::path::Path,
        fence: Option<crate::leader::Fence>,
    ) -> Result<Store, StoreError> {
        Ok(match location {
            StoreLocation::Embedded => {
                Store::Embedded(embedded::Embedded::open(&data_dir.join("store.redb"))?)
            }
            StoreLocation::Etcd { endpoints, prefix } => {
                Store::Etcd(etcd::Etcd::connect(endpoints, prefix, fence)?)
            }
        })
    }

    /// Everything the store holds.
    pub fn load(&self) -> Result<Snapshot, StoreError> {
        let mut tables = match self {
            Store::Embedded(s) => s.load()?,
            Store::Etcd(s) => s.load()?,
        };
        let mut take = |table: &'static str| tables.remove(table).unwrap_or_default();
        let meta = take(META);
        let get_meta = |key: &str| meta.iter().find(|(k, _)| k == key).map(|(_, v)| v);
        let config = get_meta("config")
            .map(|b| serde_json::from_slice(b))
            .transpose()
            .map_err(|source| StoreError::Corrupt {
                table: META,
                key: "config".into(),
                source,
            })?;
        let counters = get_meta("counters")
            .map(|b| serde_json::from_slice(b))
            .transpose()
            .map_err(|source| StoreError::Corrupt {
                table: META,
                key: "counters".into(),
                source,
            })?
            .unwrap_or_default();
        Ok(Snapshot {
            config,
            counters,
            nets: decode(take(NETS))?,
            instances: decode(take(INSTANCES))?,
            hosts: decode(take(HOSTS))?,
            policies: decode(take(POLICIES))?,
            tokens: decode(take(TOKENS))?,
            enrollments: decode(take(ENROLLMENTS))?,
            templates: decode(take(TEMPLATES))?,
            services: decode(take(SERVICES))?,
            gateways: decode(take(GATEWAYS))?,
            credentials: decode(take(CREDENTIALS))?,
        })
    }

    /// Applies a batch of changes in one transaction: all of them or none.
    pub fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        if batch.ops.is_empty() {
            return Ok(());
        }
        match self {
            Store::Embedded(s) => s.commit(&batch.ops),
            Store::Etcd(s) => s.commit(&batch.ops),
        }
    }
}

/// A table's records, read from their JSON.
fn decode<R: Record>(rows: Vec<(String, Vec<u8>)>) -> Result<Vec<R>, StoreError> {
    rows.into_iter()
        .map(|(key, value)| {
            serde_json::from_slice(&value).map_err(|source| StoreError::Corrupt {
                table: R::NAME,
                key,
                source,
            })
        })
        .collect()
}

/// Every table's rows, (key, value) in key order: what a backend loads.
type Tables = std::collections::HashMap<&'static str, Vec<(String, Vec<u8>)>>;

struct Op {
    table: &'static str,
    key: String,
    value: Option<Vec<u8>>,
}

/// Changes to commit together.
#[derive(Default)]
pub struct Batch {
    ops: Vec<Op>,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.ops.iter().map(|o| (o.table, &o.key)))
            .finish()
    }
}

impl Batch {
    pub fn put<R: Record>(&mut self, r: &R) -> &mut Self {
        self.ops.push(Op {
            table: R::NAME,
            key: r.key(),
            value: Some(serde_json::to_vec(r).expect("API objects serialize")),
        });
        self
    }

    pub fn delete<R: Record>(&mut self, r: &R) -> &mut Self {
        self.ops.push(Op {
            table: R::NAME,
            key: r.key(),
            value: None,
        });
        self
    }

    /// Adds the operations of `other`, after this batch's.
    pub fn extend(&mut self, other: Batch) -> &mut Self {
        self.ops.extend(other.ops);
        self
    }

    pub fn config(&mut self, c: &ClusterConfig) -> &mut Self {
        self.meta("config", serde_json::to_vec(c).expect("config serializes"))
    }

    pub fn counters(&mut self, c: &Counters) -> &mut Self {
        self.meta(
            "counters",
            serde_json::to_vec(c).expect("counters serialize"),
        )
    }

    fn meta(&mut self, key: &str, value: Vec<u8>) -> &mut Self {
        self.ops.push(Op {
            table: META,
            key: key.to_string(),
            value: Some(value),
        });
        self
    }
}

#[cfg(test)]
pub mod test_etcd;
#[cfg(test)]
mod tests;
