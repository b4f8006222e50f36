//! The embedded backend: a redb database file, one table per kind of object.

use std::path::Path;

use redb::{Database, ReadableTable, TableDefinition};

use super::{Op, StoreError, Tables, TABLES};

fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Db(e.to_string())
}

fn table(name: &str) -> TableDefinition<'_, &'static str, &'static [u8]> {
    TableDefinition::new(name)
}

pub struct Embedded {
    db: Database,
}

impl Embedded {
    pub(super) fn open(path: &Path) -> Result<Embedded, StoreError> {
        let db = Database::create(path).map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
        // Create every table up front so that readers never meet a missing one.
        let tx = db.begin_write().map_err(db_err)?;
        for name in TABLES {
            tx.open_table(table(name)).map_err(db_err)?;
        }
        tx.commit().map_err(db_err)?;
        Ok(Embedded { db })
    }

    pub(super) fn load(&self) -> Result<Tables, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let mut tables = Tables::new();
        for name in TABLES {
            let t = tx.open_table(table(name)).map_err(db_err)?;
            let mut rows = Vec::new();
            for item in t.iter().map_err(db_err)? {
                let (k, v) = item.map_err(db_err)?;
                rows.push((k.value().to_string(), v.value().to_vec()));
            }
            tables.insert(name, rows);
        }
        Ok(tables)
    }

    pub(super) fn commit(&self, ops: &[Op]) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        for op in ops {
            let mut t = tx.open_table(table(op.table)).map_err(db_err)?;
            match &op.value {
                Some(v) => {
                    t.insert(op.key.as_str(), v.as_slice()).map_err(db_err)?;
                }
                None => {
                    t.remove(op.key.as_str()).map_err(db_err)?;
                }
            }
        }
        tx.commit().map_err(db_err)
    }
}
