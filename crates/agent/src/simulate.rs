//! Simulated hosts, to measure the control plane at a scale one machine cannot run for real
//! (`vane __simulate-agents`, `bench/control.sh`). Each is a real client of the control
//! stream: its own static key, enrolled with a real join token, then connected with the
//! credential it got, through TLS pinned to the cluster's CA, speaking the stream's real
//! messages. It has no switch and runs nothing: it answers the controller's requests as an
//! agent whose instances start does (a made-up pid for `create`, `done` for stop and
//! remove, empty counters for stats), and records, of every view it receives, its size
//! and the time it first saw each member where it is (its name and host).
//!
//! All hosts are tasks of one process. `SIGUSR1` writes the report (JSON) to `report`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use vane_proto::api::{HostStats, InstanceState, PortStats};
use vane_proto::stream::{
    AgentError, AgentReply, AgentRequest, AgentView, ErrorKind, FromAgent, HostAuth,
    InstanceReport, ToAgent,
};
use vane_tunnel::Keypair;

use crate::control::{connect, hello_auth};

/// What to simulate, against which controller.
#[derive(Debug, Clone)]
pub struct Options {
    pub agents: usize,
    /// The controller's base URL (`https://HOST:PORT`).
    pub controller: String,
    /// A reusable join token (`vane host token --reusable`).
    pub join: String,
    /// Hosts are named PREFIX1 .. PREFIXN.
    pub prefix: String,
    /// Where `SIGUSR1` writes the report.
    pub report: PathBuf,
    /// Written once every host is connected and has had its first view.
    pub ready: Option<PathBuf>,
    /// Hosts enrolling at once. Each enrollment sends every connected host a new view (the
    /// new peer), so the hosts enroll first, a few at a time, and only then all connect.
    pub enroll_parallel: usize,
}

/// One simulated host.
struct Host {
    name: String,
    keypair: Keypair,
    credential: String,
    /// Its instances and their made-up pids, for the hello after a reconnection.
    instances: Mutex<BTreeMap<String, u32>>,
    /// Members it has seen, hashed (name and host): what is new in a view.
    seen: Mutex<HashSet<u64>>,
    /// The size of its last view message, bytes.
    last_view: AtomicU64,
}

/// When a member (name@host) was first seen by the last host to see it, and by how many.
#[derive(Debug, Clone, Copy, Serialize)]
struct Seen {
    last_first_seen_ms: u64,
    hosts: u32,
}

#[derive(Default)]
struct Totals {
    members: Mutex<HashMap<String, Seen>>,
    views: AtomicU64,
    view_bytes: AtomicU64,
    requests: AtomicU64,
    /// Hosts whose session has had its first view.
    ready: AtomicUsize,
    connections: AtomicU64,
    pids: AtomicU32,
}

#[derive(Serialize)]
struct Report {
    agents: usize,
    connections: u64,
    views: u64,
    view_bytes_total: u64,
    /// The size of each host's last view: mean and max.
    last_view_bytes_mean: u64,
    last_view_bytes_max: u64,
    requests: u64,
    members: BTreeMap<String, Seen>,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Enrolls and connects the hosts, then runs until killed.
pub async fn run(opts: Options) -> anyhow::Result<()> {
    let (_, pin) = vane_proto::trust::split_join_token(&opts.join)
        .ok_or_else(|| anyhow!("the join token carries no CA pin"))?;
    let tls = crate::pin::client_config(pin);
    let base = opts.controller.trim_end_matches('/');
    let rest = base.split_once("://").map_or(base, |(_, r)| r);
    let url = format!("wss://{rest}/v1/agents/connect");

    // Enrollment, a few at a time.
    let names: Vec<String> = (1..=opts.agents)
        .map(|i| format!("{}{i}", opts.prefix))
        .collect();
    let mut hosts = Vec::with_capacity(names.len());
    for chunk in names.chunks(opts.enroll_parallel.max(1)) {
        let enrolled = futures_util::future::join_all(chunk.iter().map(|name| {
            let (url, tls, join) = (url.clone(), tls.clone(), opts.join.clone());
            async move {
                let keypair = Keypair::generate();
                let credential = enroll(&url, tls, name, &keypair, &join)
                    .await
                    .with_context(|| format!("enroll {name}"))?;
                anyhow::Ok(Arc::new(Host {
                    name: name.clone(),
                    keypair,
                    credential,
                    instances: Mutex::new(BTreeMap::new()),
                    seen: Mutex::new(HashSet::new()),
                    last_view: AtomicU64::new(0),
                }))
            }
        }))
        .await;
        for h in enrolled {
            hosts.push(h?);
        }
    }
    tracing::info!(hosts = hosts.len(), "simulated hosts enrolled");

    let totals = Arc::new(Totals::default());
    for h in &hosts {
        tokio::spawn(host_loop(
            h.clone(),
            totals.clone(),
            url.clone(),
            tls.clone(),
        ));
    }
    let mut usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
        .context("handle SIGUSR1")?;
    let mut ready_written = false;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if !ready_written && totals.ready.load(Ordering::Relaxed) >= hosts.len() {
                    ready_written = true;
                    tracing::info!("every simulated host has its first view");
                    if let Some(path) = &opts.ready {
                        std::fs::write(path, b"ready\n")
                            .with_context(|| format!("write {}", path.display()))?;
                    }
                }
            }
            _ = usr1.recv() => write_report(&opts, &hosts, &totals)?,
        }
    }
}

fn write_report(opts: &Options, hosts: &[Arc<Host>], totals: &Totals) -> anyhow::Result<()> {
    let last: Vec<u64> = hosts
        .iter()
        .map(|h| h.last_view.load(Ordering::Relaxed))
        .collect();
    let report = Report {
        agents: hosts.len(),
        connections: totals.connections.load(Ordering::Relaxed),
        views: totals.views.load(Ordering::Relaxed),
        view_bytes_total: totals.view_bytes.load(Ordering::Relaxed),
        last_view_bytes_mean: last.iter().sum::<u64>() / last.len().max(1) as u64,
        last_view_bytes_max: last.iter().copied().max().unwrap_or(0),
        requests: totals.requests.load(Ordering::Relaxed),
        members: totals
            .members
            .lock()
            .expect("members lock")
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect(),
    };
    let tmp = opts.report.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(&report)?)
        .with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, &opts.report)
        .with_context(|| format!("write {}", opts.report.display()))?;
    Ok(())
}

fn hello(host: &Host, auth: HostAuth, instances: Vec<InstanceReport>) -> Message {
    let hello = FromAgent::Hello {
        name: host.name.clone(),
        locator: None,
        public_key: vane_proto::hex::encode(&host.keypair.public),
        gateway: None,
        auth,
        instances,
    };
    Message::Text(serde_json::to_string(&hello).expect("serializes").into())
}

/// Joins the cluster as `name` with the join token: the credential the controller gives.
async fn enroll(
    url: &str,
    tls: Arc<rustls::ClientConfig>,
    name: &str,
    keypair: &Keypair,
    join: &str,
) -> anyhow::Result<String> {
    let mut ws = connect(url, tls).await?;
    let auth = hello_auth(None, Some(join)).expect("a token");
    let hello = FromAgent::Hello {
        name: name.to_string(),
        locator: None,
        public_key: vane_proto::hex::encode(&keypair.public),
        gateway: None,
        auth,
        instances: Vec::new(),
    };
    ws.send(Message::Text(serde_json::to_string(&hello)?.into()))
        .await?;
    while let Some(msg) = ws.next().await {
        let Message::Text(text) = msg? else { continue };
        match serde_json::from_str::<ToAgent>(&text)? {
            ToAgent::Welcome {
                credential: Some(c),
                ..
            } => {
                let _ = ws.close(None).await;
                return Ok(c);
            }
            ToAgent::Welcome { .. } => bail!("welcomed without a credential"),
            ToAgent::Refused { reason } => bail!("refused: {reason}"),
            _ => {}
        }
    }
    bail!("the controller closed the stream before its welcome")
}

/// Keeps the host connected, until the controller refuses it.
async fn host_loop(
    host: Arc<Host>,
    totals: Arc<Totals>,
    url: String,
    tls: Arc<rustls::ClientConfig>,
) {
    let mut first = true;
    loop {
        match connect(&url, tls.clone()).await {
            Ok(ws) => {
                totals.connections.fetch_add(1, Ordering::Relaxed);
                match session(&host, &totals, ws, &mut first).await {
                    Ok(()) => tracing::warn!(host = %host.name, "simulated host lost its stream"),
                    Err(e) => {
                        tracing::error!(host = %host.name, "simulated host stops: {e:#}");
                        return;
                    }
                }
            }
            Err(e) => tracing::warn!(host = %host.name, "cannot connect: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One control stream: `Ok` when it ends, `Err` when the controller refuses the host.
async fn session<S>(
    host: &Host,
    totals: &Totals,
    ws: tokio_tungstenite::WebSocketStream<S>,
    first: &mut bool,
) -> anyhow::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut stream) = ws.split();
    let reports = host
        .instances
        .lock()
        .expect("instances lock")
        .iter()
        .map(|(id, pid)| InstanceReport {
            id: id.clone(),
            state: InstanceState::Running,
            pid: Some(*pid),
            exit: None,
        })
        .collect();
    let auth = hello_auth(Some(&host.credential), None).expect("a credential");
    if sink.send(hello(host, auth, reports)).await.is_err() {
        return Ok(());
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<FromAgent>();
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            let msg = Message::Text(serde_json::to_string(&m).expect("serializes").into());
            if sink.send(msg).await.is_err() {
                break;
            }
        }
    });
    let end = loop {
        let Some(Ok(msg)) = stream.next().await else {
            break Ok(());
        };
        let Message::Text(text) = msg else { continue };
        let msg: ToAgent = match serde_json::from_str(&text) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(host = %host.name, "bad message from the controller: {e}");
                continue;
            }
        };
        match msg {
            ToAgent::Refused { reason } => break Err(anyhow!("refused: {reason}")),
            ToAgent::View(view) => {
                record_view(host, totals, &view, text.len() as u64);
                if std::mem::take(first) {
                    totals.ready.fetch_add(1, Ordering::Relaxed);
                }
            }
            ToAgent::Request { id, body } => {
                totals.requests.fetch_add(1, Ordering::Relaxed);
                let result = answer(host, totals, body);
                let _ = tx.send(FromAgent::Response { id, result });
            }
            ToAgent::Welcome { .. } | ToAgent::Resolved { .. } => {}
        }
    };
    writer.abort();
    end
}

/// Records a view: its size, and the members this host sees for the first time.
fn record_view(host: &Host, totals: &Totals, view: &AgentView, bytes: u64) {
    let now = unix_ms();
    totals.views.fetch_add(1, Ordering::Relaxed);
    totals.view_bytes.fetch_add(bytes, Ordering::Relaxed);
    host.last_view.store(bytes, Ordering::Relaxed);
    let mut new = Vec::new();
    {
        let mut seen = host.seen.lock().expect("seen lock");
        for m in &view.members {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (&m.name, &m.host).hash(&mut h);
            if seen.insert(h.finish()) {
                new.push(format!("{}@{}", m.name, m.host));
            }
        }
    }
    if new.is_empty() {
        return;
    }
    let mut members = totals.members.lock().expect("members lock");
    for key in new {
        let e = members.entry(key).or_insert(Seen {
            last_first_seen_ms: now,
            hosts: 0,
        });
        e.last_first_seen_ms = e.last_first_seen_ms.max(now);
        e.hosts += 1;
    }
}

/// What an agent whose instances start (and stop) answers; what needs a real host (exec,
/// logs, migrations) fails.
fn answer(host: &Host, totals: &Totals, body: AgentRequest) -> Result<AgentReply, AgentError> {
    let mut instances = host.instances.lock().expect("instances lock");
    match body {
        AgentRequest::Create { instance } => {
            let pid = 100_000 + totals.pids.fetch_add(1, Ordering::Relaxed);
            instances.insert(instance.id.clone(), pid);
            Ok(AgentReply::Created { pid })
        }
        AgentRequest::Stop { .. } | AgentRequest::Sync | AgentRequest::Discard { .. } => {
            Ok(AgentReply::Done)
        }
        AgentRequest::Remove { id } => {
            instances.remove(&id);
            Ok(AgentReply::Done)
        }
        AgentRequest::Stats { id } if instances.contains_key(&id) => Ok(AgentReply::Stats {
            port: PortStats::default(),
            usage: None,
        }),
        AgentRequest::Resume { id } => match instances.get(&id) {
            Some(pid) => Ok(AgentReply::Created { pid: *pid }),
            None => Err(AgentError::not_found(format!("no instance {id} here"))),
        },
        AgentRequest::Stats { id } => Err(AgentError::not_found(format!("no instance {id} here"))),
        AgentRequest::HostStats => Ok(AgentReply::HostStats(HostStats::default())),
        _ => Err(AgentError::new(
            ErrorKind::Failed,
            "a simulated host does not do this",
        )),
    }
}
