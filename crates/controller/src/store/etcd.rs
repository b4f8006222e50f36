//! The etcd backend: each record is one key, `PREFIX/TABLE/KEY`, holding its JSON; a batch
//! is one etcd transaction. etcd is the store Kubernetes, Calico and Flannel keep their
//! state in: a majority of its members must agree before a change counts, so the store
//! outlives the controller's machine.
//!
//! The controller's state changes under a plain mutex, and commits happen while it is held
//! (so the store sees changes in the order the state took them). The etcd client is async:
//! it runs on a thread of its own, with its own runtime, and each call waits for its
//! answer there, as a commit to the embedded store waits for its fsync.

use std::sync::mpsc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp};

use super::{Op, StoreError, Tables, TABLES};

/// Most operations in one etcd transaction (etcd's `--max-txn-ops`, 128 by default).
const MAX_TXN_OPS: usize = 128;
/// Keys read per request when loading: an answer stays far below gRPC's 4 MiB limit.
const PAGE: i64 = 500;
/// How long a request may take before the store is reported unavailable.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

type Reply<T> = std::sync::mpsc::SyncSender<Result<T, String>>;

enum Request {
    Load(Reply<Vec<(String, Vec<u8>)>>),
    /// A transaction, and whether it is fenced (its refusal means another replica leads).
    Commit(Txn, bool, Reply<()>),
}

/// What a fenced transaction's refusal says: the `StoreError::Deposed` sign.
const DEPOSED: &str = "deposed";

pub struct Etcd {
    requests: mpsc::Sender<Request>,
    endpoints: String,
    prefix: String,
    /// The leadership this controller commits under, among replicas (`crate::leader`).
    fence: Option<crate::leader::Fence>,
}

impl Etcd {
    /// Connects to the cluster at `endpoints` (its members' client URLs); vane's keys are
    /// under `prefix/`.
    /// With a `fence`, every transaction holds only while that leadership does.
    pub(super) fn connect(
        endpoints: &[String],
        prefix: &str,
        fence: Option<crate::leader::Fence>,
    ) -> Result<Etcd, StoreError> {
        let joined = endpoints.join(",");
        let failed = |why: String| StoreError::Etcd {
            endpoints: joined.clone(),
            why,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| failed(format!("start its client: {e}")))?;
        let options = ConnectOptions::new()
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5));
        let client = std::thread::scope(|s| {
            // Off the caller's thread: it may be a worker of another runtime.
            s.spawn(|| runtime.block_on(Members::connect(endpoints, options)))
                .join()
                .expect("the etcd connect thread")
        })
        .map_err(|e| failed(e.to_string()))?;
        let (requests, inbox) = mpsc::channel();
        let key_prefix = format!("{prefix}/");
        std::thread::Builder::new()
            .name("etcd-store".into())
            .spawn(move || serve(runtime, client, key_prefix, inbox))
            .map_err(|e| failed(format!("start its thread: {e}")))?;
        let store = Etcd {
            requests,
            endpoints: joined,
            prefix: prefix.to_string(),
            fence,
        };
        // A first round trip: a wrong address fails here, with one line, not at the first
        // change.
        store.ask(Request::Load)?;
        Ok(store)
    }

    fn ask<T>(&self, request: impl FnOnce(Reply<T>) -> Request) -> Result<T, StoreError> {
        let (reply, answer) = mpsc::sync_channel(1);
        let failed = |why: String| StoreError::Etcd {
            endpoints: self.endpoints.clone(),
            why,
        };
        self.requests
            .send(request(reply))
            .map_err(|_| failed("its client thread is gone".into()))?;
        answer
            .recv()
            .map_err(|_| failed("its client thread is gone".into()))?
            .map_err(|why| {
                if why == DEPOSED {
                    StoreError::Deposed
                } else {
                    failed(why)
                }
            })
    }

    fn key(&self, table: &str, key: &str) -> String {
        format!("{}/{table}/{key}", self.prefix)
    }

    pub(super) fn load(&self) -> Result<Tables, StoreError> {
        let rows = self.ask(Request::Load)?;
        let mut tables: Tables = TABLES.iter().map(|t| (*t, Vec::new())).collect();
        let skip = self.prefix.len() + 1;
        for (key, value) in rows {
            // PREFIX/TABLE/KEY; a key of a table this version does not know stays where
            // it is, unread.
            let Some((table, key)) = key.get(skip..).and_then(|k| k.split_once('/')) else {
                continue;
            };
            if let Some(rows) = TABLES
                .iter()
                .find(|t| **t == table)
                .and_then(|t| tables.get_mut(t))
            {
                rows.push((key.to_string(), value));
            }
        }
        Ok(tables)
    }

    /// Commits `ops` as one transaction when they fit in one (every batch the API makes
    /// does); a longer batch (the rewrite of every record at start, after an upgrade) goes
    /// in transactions of `MAX_TXN_OPS`, each of whose writes stands on its own.
    pub(super) fn commit(&self, ops: &[Op]) -> Result<(), StoreError> {
        // etcd refuses a transaction that names a key twice: the last change of each key
        // is the one that counts, as it would be in the embedded store.
        let mut last = std::collections::HashMap::new();
        for (i, op) in ops.iter().enumerate() {
            last.insert((op.table, op.key.as_str()), i);
        }
        let ops: Vec<&Op> = ops
            .iter()
            .enumerate()
            .filter(|(i, op)| last[&(op.table, op.key.as_str())] == *i)
            .map(|(_, op)| op)
            .collect();
        for chunk in ops.chunks(MAX_TXN_OPS) {
            let txn_ops: Vec<TxnOp> = chunk
                .iter()
                .map(|op| {
                    let key = self.key(op.table, &op.key);
                    match &op.value {
                        Some(v) => TxnOp::put(key, v.clone(), None),
                        None => TxnOp::delete(key, None),
                    }
                })
                .collect();
            let txn = match &self.fence {
                // etcd's own recipe for a leader's writes: they hold while its election key
                // is the one it created (a new leader's key has another revision).
                Some(f) => Txn::new().when(vec![Compare::create_revision(
                    f.key.clone(),
                    CompareOp::Equal,
                    f.rev,
                )]),
                None => Txn::new(),
            }
            .and_then(txn_ops);
            let fenced = self.fence.is_some();
            self.ask(|reply| Request::Commit(txn, fenced, reply))?;
        }
        Ok(())
    }
}

/// A client of each etcd member, and the one in use. etcd-client's own balancing over
/// several members keeps choosing a member that died (its connections are made lazily, so
/// a dead member looks ready): a third of the requests failed for as long as it stayed
/// dead. One client per member, and the next one after a failure, fails once.
pub(crate) struct Members {
    clients: Vec<Client>,
    current: usize,
}

impl Members {
    pub(crate) async fn connect(
        endpoints: &[String],
        options: ConnectOptions,
    ) -> Result<Members, etcd_client::Error> {
        let mut clients = Vec::new();
        for e in endpoints {
            clients.push(Client::connect([e], Some(options.clone())).await?);
        }
        Ok(Members {
            clients,
            current: 0,
        })
    }

    /// The client of the member in use.
    pub(crate) fn client(&mut self) -> &mut Client {
        &mut self.clients[self.current]
    }

    /// Moves on to the next member, after the one in use failed.
    pub(crate) fn next(&mut self) {
        self.current = (self.current + 1) % self.clients.len();
    }

    pub(crate) fn len(&self) -> usize {
        self.clients.len()
    }
}

/// The client's thread: answers requests one at a time, in order, until the store is
/// dropped. A request that fails on one member is tried on the next, once on each: its
/// transactions put and delete whole records, so one that took effect before its answer
/// was lost does the same again.
fn serve(
    runtime: tokio::runtime::Runtime,
    mut members: Members,
    prefix: String,
    inbox: mpsc::Receiver<Request>,
) {
    while let Ok(request) = inbox.recv() {
        match request {
            Request::Load(reply) => {
                let done = runtime.block_on(async {
                    let mut tried = 0;
                    loop {
                        match load_all(members.client(), &prefix).await {
                            Err(e) if tried + 1 < members.len() => {
                                tracing::debug!(
                                    "an etcd member failed a load, trying the next: {e}"
                                );
                                tried += 1;
                                members.next();
                            }
                            done => return done,
                        }
                    }
                });
                let _ = reply.send(done);
            }
            Request::Commit(txn, fenced, reply) => {
                let done = runtime.block_on(async {
                    let mut tried = 0;
                    let answer = loop {
                        match members.client().txn(txn.clone()).await {
                            Err(e) if tried + 1 < members.len() => {
                                tracing::debug!(
                                    "an etcd member failed a change, trying the next: {e}"
                                );
                                tried += 1;
                                members.next();
                            }
                            answer => break answer.map_err(|e| e.to_string())?,
                        }
                    };
                    if answer.succeeded() {
                        Ok(())
                    } else if fenced {
                        Err(DEPOSED.to_string())
                    } else {
                        Err("the transaction was refused".to_string())
                    }
                });
                let _ = reply.send(done);
            }
        }
    }
}

/// Every key under `prefix`, in pages.
async fn load_all(client: &mut Client, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, String> {
    let end = prefix_end(prefix);
    let mut from = prefix.as_bytes().to_vec();
    let mut rows = Vec::new();
    loop {
        let page = client
            .get(
                from.clone(),
                Some(GetOptions::new().with_range(end.clone()).with_limit(PAGE)),
            )
            .await
            .map_err(|e| e.to_string())?;
        for kv in page.kvs() {
            let key = kv
                .key_str()
                .map_err(|e| format!("a key that is not UTF-8: {e}"))?;
            rows.push((key.to_string(), kv.value().to_vec()));
        }
        match page.kvs().last() {
            Some(last) if page.more() => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => return Ok(rows),
        }
    }
}

/// The first key after every key that starts with `prefix` (which ends in '/', so the
/// last byte can be incremented).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    let last = end.last_mut().expect("a prefix ends in '/'");
    *last += 1;
    end
}
