//! Replicas: several controllers on one etcd, of which one leads. The leader alone loads the
//! store, serves the API and the agents' streams, and does what must happen once (host
//! liveness, failover, migrations, ids); the others stand by, answer every request with 503
//! naming the leader, and campaign. This is etcd's own election (its `v3election` service,
//! the recipe of its `concurrency` package): each replica campaigns with a lease that it
//! keeps alive; the holder of the oldest key under the election's name leads. When the
//! leader dies its lease expires within `LEASE_TTL` and the next replica leads.
//!
//! A leader that stops hearing from etcd cannot know whether it still leads, so its writes
//! are fenced: every transaction compares the creation revision of its election key
//! (`Fence`), which no other replica's key can have. A deposed leader's writes are refused
//! (`StoreError::Deposed`), and it exits rather than serve from a state that is no longer
//! the store's: its supervisor starts it again, as a standby.

use std::time::{Duration, Instant};

use anyhow::Context;
use etcd_client::{Client, ConnectOptions};
use tokio::sync::watch;

/// Seconds a leader's lease lasts without a keep-alive: the longest a dead leader blocks
/// the next one. etcd's smallest lease is about 1.5 s (3/2 of its election timeout). It
/// must outlast etcd's own election when an etcd member that leads dies (no keep-alive is
/// answered meanwhile): that took from about 1 s to over 1.7 s under load, and a lease of
/// 2 s was lost in it, its controller standing down with no other replica left.
pub const LEASE_TTL: i64 = 3;
/// How often the lease is kept alive: six times per TTL, so a lost answer or a member
/// that died costs nothing.
const KEEP_ALIVE_EVERY: Duration = Duration::from_millis(500);

/// What makes a leader's transactions hold: its election key and the revision that created
/// it.
#[derive(Debug, Clone)]
pub struct Fence {
    pub key: Vec<u8>,
    pub rev: i64,
}

/// A replica's side of the election.
#[derive(Clone)]
pub struct Elector {
    client: Client,
    /// For the campaign, which waits as long as another replica leads: no request timeout.
    campaigner: Client,
    endpoints: Vec<String>,
    /// The election's name: `PREFIX/leader`.
    name: String,
    /// This replica's API URL, which the leader key holds for the standbys to name.
    me: String,
}

impl Elector {
    pub async fn connect(endpoints: &[String], prefix: &str, me: &str) -> anyhow::Result<Elector> {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(KEEP_ALIVE_PING, Duration::from_secs(2));
        let client = Client::connect(endpoints, Some(options))
            .await
            .with_context(|| format!("connect to etcd at {}", endpoints.join(",")))?;
        let campaigner = Client::connect(endpoints, Some(patient()))
            .await
            .with_context(|| format!("connect to etcd at {}", endpoints.join(",")))?;
        Ok(Elector {
            client,
            campaigner,
            endpoints: endpoints.to_vec(),
            name: format!("{prefix}/leader"),
            me: me.to_string(),
        })
    }

    /// The leader's URL, if one leads.
    pub async fn leader(&mut self) -> Option<String> {
        let answer = self.client.leader(self.name.clone()).await.ok()?;
        let url = answer.kv()?.value_str().ok()?.to_string();
        Some(url)
    }

    /// Gives the lease of the leadership `fence` up at once, as its expiry would.
    #[cfg(test)]
    pub async fn resign_for_tests(&mut self, fence: &Fence) {
        let key = self
            .client
            .get(fence.key.clone(), None)
            .await
            .expect("the leader key");
        let lease = key.kvs()[0].lease();
        self.client.lease_revoke(lease).await.expect("revoked");
    }

    /// Campaigns until this replica leads. Returns its fence and what turns true if it
    /// loses its lease (etcd unreachable for `LEASE_TTL`, or the lease gone).
    pub async fn lead(&mut self) -> anyhow::Result<(Fence, watch::Receiver<bool>)> {
        loop {
            // etcd may not have its majority yet (all started together): wait for it.
            let lease = match self.client.lease_grant(LEASE_TTL, None).await {
                Ok(granted) => granted.id(),
                Err(e) => {
                    tracing::warn!("asking etcd for a lease: {e}; again");
                    tokio::time::sleep(KEEP_ALIVE_EVERY).await;
                    continue;
                }
            };
            let (lost_tx, lost) = watch::channel(false);
            keep_alive_apart(self.endpoints.clone(), lease, lost_tx)?;
            let mut campaign = self.campaigner.clone();
            let (name, me) = (self.name.clone(), self.me.clone());
            let mut lost_while = lost.clone();
            let elected = tokio::select! {
                won = campaign.campaign(name, me, lease) => won,
                // A lease lost while waiting: campaign again with a new one.
                _ = lost_while.wait_for(|l| *l) => continue,
            };
            match elected.map(|mut r| r.take_leader()) {
                Ok(Some(key)) => {
                    return Ok((
                        Fence {
                            key: key.key().to_vec(),
                            rev: key.rev(),
                        },
                        lost,
                    ))
                }
                Ok(None) => anyhow::bail!("etcd elected this replica without a key"),
                Err(e) => {
                    tracing::warn!("campaigning for the leadership: {e}; again");
                    let _ = self.client.lease_revoke(lease).await;
                    tokio::time::sleep(KEEP_ALIVE_EVERY).await;
                }
            }
        }
    }
}

/// A client's options with no request timeout, for calls that wait (a campaign), and a
/// keep-alive that finds a dead member.
fn patient() -> ConnectOptions {
    ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_keep_alive(KEEP_ALIVE_PING, Duration::from_secs(2))
}

/// How often a connection to etcd is pinged to find a dead member: etcd closes one that
/// pings more often than its `--grpc-keepalive-min-time` (5 s by default).
const KEEP_ALIVE_PING: Duration = Duration::from_secs(5);

/// Runs `keep_alive` on a thread of its own, with a runtime and an etcd client of its own:
/// a controller whose runtime is busy (a commit that waits for etcd blocks its thread)
/// must not lose its lease for want of a turn, nor keep one it has lost.
fn keep_alive_apart(
    endpoints: Vec<String>,
    lease: i64,
    lost: watch::Sender<bool>,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("a runtime for the lease")?;
    std::thread::Builder::new()
        .name("etcd-lease".into())
        .spawn(move || {
            runtime.block_on(async {
                match crate::store::Members::connect(&endpoints, patient()).await {
                    Ok(members) => keep_alive(members, lease, lost).await,
                    Err(e) => {
                        tracing::warn!("connecting to etcd to keep the lease: {e}");
                        let _ = lost.send(true);
                    }
                }
            })
        })
        .context("a thread for the lease")?;
    Ok(())
}

/// Keeps `lease` alive until it is lost: no answer for `LEASE_TTL`, or etcd says it is
/// gone. A keep-alive stream that breaks (its etcd member died) is opened again on the
/// next member.
async fn keep_alive(mut members: crate::store::Members, lease: i64, lost: watch::Sender<bool>) {
    let ttl = Duration::from_secs(LEASE_TTL as u64);
    let mut last_kept = Instant::now();
    'streams: while last_kept.elapsed() < ttl {
        let opened =
            tokio::time::timeout(KEEP_ALIVE_EVERY, members.client().lease_keep_alive(lease)).await;
        let Ok(Ok((mut keeper, mut answers))) = opened else {
            members.next();
            continue;
        };
        loop {
            if keeper.keep_alive().await.is_err() {
                members.next();
                continue 'streams;
            }
            match tokio::time::timeout(KEEP_ALIVE_EVERY, answers.message()).await {
                Ok(Ok(Some(answer))) if answer.ttl() > 0 => last_kept = Instant::now(),
                // etcd says the lease is gone: it expired while no keep-alive got through.
                Ok(Ok(Some(_))) => break 'streams,
                _ => {
                    members.next();
                    continue 'streams;
                }
            }
            if last_kept.elapsed() >= ttl {
                break 'streams;
            }
            tokio::time::sleep(KEEP_ALIVE_EVERY).await;
        }
    }
    tracing::warn!(lease, "this controller's lease in etcd is lost");
    let _ = lost.send(true);
}
