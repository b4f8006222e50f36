//! The persistent store: an embedded redb database, one table per kind of object, values
//! as JSON. Every change is committed (and fsynced) before the API answers, so a restarted
//! controller comes back with every net, instance, host and policy it had acknowledged.

use std::path::Path;

use redb::{Database, ReadableTable, TableDefinition, TableHandle};
use serde::de::DeserializeOwned;
use serde::Serialize;

use vane_proto::api::{ClusterConfig, Host, Instance, Net, Policy, Template};

use crate::enroll::{Enrollment, TokenRecord};

const NETS: TableDefinition<&str, &[u8]> = TableDefinition::new("nets");
const INSTANCES: TableDefinition<&str, &[u8]> = TableDefinition::new("instances");
const HOSTS: TableDefinition<&str, &[u8]> = TableDefinition::new("hosts");
const POLICIES: TableDefinition<&str, &[u8]> = TableDefinition::new("policies");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
const ENROLLMENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("enrollments");
const TEMPLATES: TableDefinition<&str, &[u8]> = TableDefinition::new("templates");
const CREDENTIALS: TableDefinition<&str, &[u8]> = TableDefinition::new("credentials");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {source}")]
    Open {
        path: String,
        source: redb::DatabaseError,
    },
    #[error("store: {0}")]
    Db(String),
    #[error("store: corrupt record {key:?} in {table}: {source}")]
    Corrupt {
        table: &'static str,
        key: String,
        source: serde_json::Error,
    },
}

fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Db(e.to_string())
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
}

/// Id counters, persisted so that ids are never reused (an id reused for another net would
/// let a stale frame in flight reach the wrong net).
#[derive(Debug, Default, Clone, Copy, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Counters {
    pub net: u32,
    pub host: u32,
    pub policy: u32,
}

pub struct Store {
    db: Database,
}

/// One kind of object, with the table that holds it and its key.
pub trait Record: Serialize + DeserializeOwned {
    const TABLE: TableDefinition<'static, &'static str, &'static [u8]>;
    const NAME: &'static str;
    fn key(&self) -> String;
}

impl Record for Net {
    const TABLE: TableDefinition<'static, &'static str, &'static [u8]> = NETS;
    const NAME: &'static str = "nets";
    fn key(&self) -> String {
        self.name.clone()
    }
}
impl Record for Instance {
    const TABLE: TableDefinition<'static, &'static str, &'static [u8]> = INSTANCES;
    const NAME: &'static str = "instances";
    fn key(&self) -> String {
        self.id.clone()
    }
}
impl Record for Host {
    const TABLE: TableDefinition<'static, &'static str, &'static [u8]> = HOSTS;
    const NAME: &'static str = "hosts";
    fn key(&self) -> String {
        self.name.clone()
    }
}
impl Record for Policy {
    const TABLE: TableDefinition<'static, &'static str, &'static [u8]> = POLICIES;
    const NAME: &'static str = "policies";
    fn key(&self) -> String {
        format!("{:010}", self.id)
    }
}

impl Record for TokenRecord {
    const TABLE: TableDefinition<'static, &'static str, &'static [u8]> = TOKENS;
    const NAME: &'static str = "tokens";
    fn key(&self) -> String {
        self.hash.clone()
    }
}
impl Record for Enrollment {
    const TABLE: TableDefinition<'static, &'static str, &'static [u8]> = ENROLLMENTS;
    const NAME: &'static str = "enrollments";
    fn key(&self) -> String {
        self.host.clone()
    }
}

impl Record for crate::auth::CredentialRecord {
    const TABLE: TableDefinition<'static, &'static str, &'static [u8]> = CREDENTIALS;
    const NAME: &'static str = "credentials";
    fn key(&self) -> String {
        self.hash.clone()
    }
}

impl Record for Template {
    const TABLE: TableDefinition<'static, &'static str, &'static [u8]> = TEMPLATES;
    const NAME: &'static str = "templates";
    fn key(&self) -> String {
        self.name.clone()
    }
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = Database::create(path).map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
        // Create every table up front so that readers never meet a missing one.
        let tx = db.begin_write().map_err(db_err)?;
        for t in [
            NETS,
            INSTANCES,
            HOSTS,
            POLICIES,
            META,
            TOKENS,
            ENROLLMENTS,
            TEMPLATES,
            CREDENTIALS,
        ] {
            tx.open_table(t).map_err(db_err)?;
        }
        tx.commit().map_err(db_err)?;
        Ok(Store { db })
    }

    pub fn load(&self) -> Result<Snapshot, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let meta = tx.open_table(META).map_err(db_err)?;
        let get_meta = |key: &str| -> Result<Option<Vec<u8>>, StoreError> {
            Ok(meta.get(key).map_err(db_err)?.map(|v| v.value().to_vec()))
        };
        let config = get_meta("config")?
            .map(|b| serde_json::from_slice(&b))
            .transpose()
            .map_err(|source| StoreError::Corrupt {
                table: "meta",
                key: "config".into(),
                source,
            })?;
        let counters = get_meta("counters")?
            .map(|b| serde_json::from_slice(&b))
            .transpose()
            .map_err(|source| StoreError::Corrupt {
                table: "meta",
                key: "counters".into(),
                source,
            })?
            .unwrap_or_default();
        Ok(Snapshot {
            config,
            counters,
            nets: self.all::<Net>(&tx)?,
            instances: self.all::<Instance>(&tx)?,
            hosts: self.all::<Host>(&tx)?,
            policies: self.all::<Policy>(&tx)?,
            tokens: self.all::<TokenRecord>(&tx)?,
            enrollments: self.all::<Enrollment>(&tx)?,
            templates: self.all::<Template>(&tx)?,
            credentials: self.all::<crate::auth::CredentialRecord>(&tx)?,
        })
    }

    fn all<R: Record>(&self, tx: &redb::ReadTransaction) -> Result<Vec<R>, StoreError> {
        let table = tx.open_table(R::TABLE).map_err(db_err)?;
        let mut out = Vec::new();
        for item in table.iter().map_err(db_err)? {
            let (k, v) = item.map_err(db_err)?;
            out.push(
                serde_json::from_slice(v.value()).map_err(|source| StoreError::Corrupt {
                    table: R::NAME,
                    key: k.value().to_string(),
                    source,
                })?,
            );
        }
        Ok(out)
    }

    /// Applies a batch of changes in one transaction: all of them or none.
    pub fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        if batch.ops.is_empty() {
            return Ok(());
        }
        let tx = self.db.begin_write().map_err(db_err)?;
        for op in &batch.ops {
            let mut table = tx.open_table(op.table).map_err(db_err)?;
            match &op.value {
                Some(v) => {
                    table
                        .insert(op.key.as_str(), v.as_slice())
                        .map_err(db_err)?;
                }
                None => {
                    table.remove(op.key.as_str()).map_err(db_err)?;
                }
            }
        }
        tx.commit().map_err(db_err)
    }
}

struct Op {
    table: TableDefinition<'static, &'static str, &'static [u8]>,
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
            .entries(self.ops.iter().map(|o| (o.table.name(), &o.key)))
            .finish()
    }
}

impl Batch {
    pub fn put<R: Record>(&mut self, r: &R) -> &mut Self {
        self.ops.push(Op {
            table: R::TABLE,
            key: r.key(),
            value: Some(serde_json::to_vec(r).expect("API objects serialize")),
        });
        self
    }

    pub fn delete<R: Record>(&mut self, r: &R) -> &mut Self {
        self.ops.push(Op {
            table: R::TABLE,
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
mod tests {
    use super::*;

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let net = Net {
            id: 1,
            name: "red".into(),
            tenant: "a".into(),
            subnet: "10.10.2.0/24".parse().unwrap(),
            egress: false,
            created: 1,
        };
        {
            let store = Store::open(&path).unwrap();
            let mut b = Batch::default();
            b.put(&net).counters(&Counters {
                net: 1,
                host: 0,
                policy: 0,
            });
            store.commit(b).unwrap();
        }
        let store = Store::open(&path).unwrap();
        let snap = store.load().unwrap();
        assert_eq!(snap.nets, vec![net.clone()]);
        assert_eq!(snap.counters.net, 1);
        let mut b = Batch::default();
        b.delete(&net);
        store.commit(b).unwrap();
        assert!(store.load().unwrap().nets.is_empty());
    }
}
