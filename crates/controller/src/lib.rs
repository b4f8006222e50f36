//! The control plane: holds nets, hosts, instances and policies in a persistent store,
//! serves the HTTP/JSON API, keeps a control stream with every agent and pushes to each
//! agent the part of the directory its instances need.

mod agents;
mod api;
pub mod auth;
pub mod enroll;
pub mod leader;
mod metrics;
mod recovery;
mod seal;
mod secrets;
mod session;
pub mod state;
pub mod store;
pub mod tls;
mod transfers;
mod workflow;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Context;

use vane_proto::api::ClusterConfig;
use vane_proto::stream::{AgentRequest, ToAgent};

use crate::agents::{AgentLink, Agents};
use crate::state::{ApiError, State};
pub use crate::store::StoreLocation;
use crate::store::{Batch, Store};

/// How long a change waits for a store that refuses it before the controller gives up.
const STORE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);
/// The controller's exit status when its store stopped taking changes.
pub const STORE_LOST_EXIT: i32 = 75;

pub struct ControllerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Where the store is: embedded in `data_dir`, or an etcd cluster.
    pub store: StoreLocation,
    /// Used when the store is new; an existing store keeps its own.
    pub cluster: ClusterConfig,
    /// How long a host may be silent (its control stream gone or mute) before it is
    /// declared dead and its instances with a restart policy start elsewhere.
    pub host_grace: std::time::Duration,
    /// Notified once the API's listener is bound: what a service manager waits for before
    /// it starts what depends on the controller (systemd's `Type=notify`).
    pub ready: Option<Arc<tokio::sync::Notify>>,
    /// The URL other replicas' standbys give for this one while it leads (with an etcd
    /// store); `https://LISTEN` if not given.
    pub advertise: Option<String>,
}

/// The files of a controller's data directory that its replicas share: the cluster's CA
/// (which agents pin and the CLI trusts), the admin credential, and the key that seals
/// snapshots. Every replica must start with the same ones, copied from the first
/// (`vane lab up --controllers` does it); the rest is in the store.
pub const REPLICA_FILES: [&str; 4] = [
    tls::CA_CERT_FILE,
    tls::CA_KEY_FILE,
    auth::ADMIN_TOKEN_FILE,
    seal::KEY_FILE,
];

/// `vane controller --host-grace`'s default.
pub const DEFAULT_HOST_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

pub(crate) struct Controller {
    state: Mutex<State>,
    store: Store,
    /// The agents' control streams (sessions attach here).
    streams: Arc<Agents>,
    /// Requests to agents, as the workflows make them: the streams above, or in the
    /// workflows' tests, scripted agents.
    agents: Arc<dyn AgentLink>,
    /// Images on their way between agents, the CLI and back.
    transfers: transfers::Transfers,
    /// Seals snapshots that leave the cluster, and checks them when they come back.
    sealer: seal::Sealer,
    credentials: auth::Credentials,
    /// The pin of the cluster's CA, which join tokens carry.
    tls_pin: vane_proto::trust::Pin,
    /// Turns true when the controller stops, so that agent sessions (long-lived WebSockets
    /// that a graceful HTTP shutdown would otherwise wait for) end.
    shutdown: tokio::sync::watch::Sender<bool>,
    /// Migrations under way, by instance id: where they are (`Instance::progress`).
    progress: Mutex<std::collections::HashMap<String, (String, u64, std::time::Instant)>>,
    /// Instances whose images a workflow holds (`workflow::Claim`), by id: what it does.
    claims: Mutex<std::collections::HashMap<String, String>>,
    /// What the controller counts for `GET /metrics` (migrations, API requests).
    metrics: metrics::Metrics,
    /// How long a host may be silent before it is declared dead.
    host_grace: std::time::Duration,
    /// By host: the epoch of the control stream whose end its silence is counted from
    /// (0 for hosts not heard since the controller started). A watch whose epoch is not
    /// the host's any more has nothing to declare.
    silent_since: Mutex<std::collections::HashMap<String, u64>>,
    /// By instance id: the wait before its program starts again on its host.
    backoff: Mutex<std::collections::HashMap<String, state::Backoff>>,
    /// Where the last checkpoint of each instance that asked for them is kept.
    checkpoints: PathBuf,
    /// The parts of the views last pushed (`push_views`). Locked after `state`.
    views: Mutex<state::ViewCache>,
}

impl Controller {
    /// Records that the migration of instance `id` is in `phase` (a new phase starts its
    /// clock), `bytes` of it done; `None` when it is over.
    fn set_progress(&self, id: &str, phase: Option<(&str, u64)>) {
        let mut all = self.progress.lock().expect("progress lock");
        match phase {
            None => {
                all.remove(id);
            }
            Some((phase, bytes)) => match all.get_mut(id) {
                Some(p) if p.0 == phase => p.1 = bytes,
                _ => {
                    all.insert(
                        id.to_string(),
                        (phase.to_string(), bytes, std::time::Instant::now()),
                    );
                }
            },
        }
    }

    /// `inst` as answered: with its migration's progress, if one is under way.
    fn with_progress(&self, mut inst: vane_proto::api::Instance) -> vane_proto::api::Instance {
        inst.progress = self
            .progress
            .lock()
            .expect("progress lock")
            .get(&inst.id)
            .map(|(phase, bytes, since)| vane_proto::api::Progress {
                phase: phase.clone(),
                bytes: *bytes,
                phase_ms: since.elapsed().as_millis() as u64,
            });
        inst
    }

    /// Opens the store and loads it: with a `fence`, as the leader among replicas.
    fn open(
        cfg: &ControllerConfig,
        tls_pin: vane_proto::trust::Pin,
        fence: Option<leader::Fence>,
    ) -> anyhow::Result<Controller> {
        let streams = Arc::new(Agents::default());
        let store = Store::open_fenced(&cfg.store, &cfg.data_dir, fence)?;
        Self::open_with(cfg, tls_pin, store, streams.clone(), streams)
    }

    /// `open` on `store`, with requests to agents going through `agents`.
    fn open_with(
        cfg: &ControllerConfig,
        tls_pin: vane_proto::trust::Pin,
        store: Store,
        streams: Arc<Agents>,
        agents: Arc<dyn AgentLink>,
    ) -> anyhow::Result<Controller> {
        std::fs::create_dir_all(&cfg.data_dir)
            .with_context(|| format!("create data directory {}", cfg.data_dir.display()))?;
        let snapshot = store.load()?;
        let (state, batch) = State::from_snapshot(snapshot, cfg.cluster.clone());
        store.commit(&batch)?;
        streams.set_term(state.term());
        let sealer = seal::Sealer::load_or_create(&cfg.data_dir)?;
        let credentials = auth::Credentials::load_or_create(&cfg.data_dir)?;
        Ok(Controller {
            credentials,
            tls_pin,
            state: Mutex::new(state),
            store,
            streams,
            agents,
            transfers: transfers::Transfers::default(),
            sealer,
            shutdown: tokio::sync::watch::channel(false).0,
            progress: Mutex::new(std::collections::HashMap::new()),
            claims: Mutex::new(std::collections::HashMap::new()),
            metrics: metrics::Metrics::default(),
            host_grace: cfg.host_grace,
            silent_since: Mutex::new(std::collections::HashMap::new()),
            backoff: Mutex::new(std::collections::HashMap::new()),
            checkpoints: cfg.data_dir.join("checkpoints"),
            views: Mutex::new(state::ViewCache::default()),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("state lock poisoned")
    }

    /// Commits `batch`. Called with the state lock held, so the store sees changes in the
    /// order the state took them.
    ///
    /// The state in memory already holds the change, and nothing can take it back out: so
    /// a store that does not take it (etcd without a majority, a full disk) is asked again
    /// for `STORE_PATIENCE`, every other request waiting on the lock meanwhile, and then the
    /// controller exits. Its next start loads the store as it is: no change that the store
    /// lacks lives on in memory, nor in the views sent from it, and the request that made it
    /// was never answered as done.
    fn commit(&self, batch: Batch) -> Result<(), ApiError> {
        let deadline = std::time::Instant::now() + STORE_PATIENCE;
        loop {
            match self.store.commit(&batch) {
                Ok(()) => return Ok(()),
                Err(crate::store::StoreError::Deposed) => {
                    tracing::error!(
                        "another controller leads now: exiting, so that nothing of this one's \
                         term lives on (started again, it stands by)"
                    );
                    std::process::exit(STORE_LOST_EXIT);
                }
                Err(e) if std::time::Instant::now() < deadline => {
                    tracing::warn!("the store did not take a change, trying again: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(500));
                }
                Err(e) => {
                    tracing::error!(
                        "the store did not take a change for {} s, exiting so that no change \
                         it lacks stays in memory (a restart loads the store): {e}",
                        STORE_PATIENCE.as_secs()
                    );
                    std::process::exit(STORE_LOST_EXIT);
                }
            }
        }
    }

    /// Changes instance `id` (`State::change_instance`) and commits it: its new record, or
    /// `None` if it is gone.
    fn change_instance(
        &self,
        id: &str,
        change: impl FnOnce(&mut vane_proto::api::Instance),
    ) -> Result<Option<vane_proto::api::Instance>, ApiError> {
        let mut s = self.state();
        match s.change_instance(id, change) {
            Some((inst, batch)) => {
                self.commit(batch)?;
                Ok(Some(inst))
            }
            None => Ok(None),
        }
    }

    /// Freezes instance `id` for a migration to host `to` (`State::freeze`): the switches
    /// that could
    /// send to it stop, and hold what their instances send, rather than lose it at the
    /// frozen copy. Returns once they all switch so (or `SYNC_LIMIT` has passed), before
    /// anything is frozen: what they sent before reaches the instance still running.
    async fn freeze(&self, id: &str, to: &str) {
        self.state().freeze(id, to);
        self.push_views_and_wait(id).await;
    }

    /// Pushes views, and returns once every connected host that sees the net of instance
    /// `id` has applied its view (or `SYNC_LIMIT` has passed): a service member no longer
    /// listed as a backend is then chosen by no switch for new flows.
    async fn drain(&self, id: &str) {
        self.push_views_and_wait(id).await;
    }

    /// Pushes views, then waits (up to `SYNC_LIMIT`) until every connected host whose view
    /// has the net of instance `id` has applied its own.
    async fn push_views_and_wait(&self, id: &str) {
        self.push_views();
        let hosts: Vec<String> = {
            let s = self.state();
            // Refreshed by `push_views` just now.
            let cache = self.views.lock().expect("views lock");
            match s.instances.get(id) {
                Some(i) => self
                    .streams
                    .connected()
                    .into_iter()
                    .filter(|h| cache.wants(&s, h, &i.net))
                    .collect(),
                None => Vec::new(),
            }
        };
        let synced = hosts
            .iter()
            .map(|h| self.agents.request(h, AgentRequest::Sync));
        let _ = tokio::time::timeout(SYNC_LIMIT, futures_util::future::join_all(synced)).await;
    }

    /// Ends the freeze of instance `id` where it now runs: views as they now are, its
    /// host's first, and once that host has applied it (a request after a view is handled
    /// after it) the others', and the lookups that waited, whose switches then send what
    /// they held. Nothing if it was not frozen.
    async fn thaw(&self, id: &str) {
        let host = self.state().instances.get(id).map(|i| i.host.clone());
        if let Some(host) = &host {
            // Its host's view places it there, running: the rest wait for that host.
            let mut view = self.state().view_for(host);
            for m in view.members.iter_mut().filter(|m| m.instance == id) {
                m.moving_to = None;
            }
            self.streams.push_view(host, view);
            let _ = tokio::time::timeout(SYNC_LIMIT, self.agents.request(host, AgentRequest::Sync))
                .await;
        }
        self.thaw_now(id);
    }

    /// `thaw` without waiting for the instance's host (a migration that failed: its copy
    /// there runs on, or nowhere).
    fn thaw_now(&self, id: &str) {
        let waiting = self.state().thaw(id);
        self.push_views();
        for w in waiting {
            let member = self.state().lookup(&w.host, w.net, w.ip);
            let (net, ip) = (w.net, w.ip);
            self.streams
                .send(&w.host, ToAgent::Resolved { net, ip, member });
        }
    }

    /// Sends each connected agent its view, where it changed: the parts of views are made
    /// once (`ViewCache::refresh`), and a host's view only when what it is made of changed.
    /// The state stays locked until every view is queued, so that two pushes cannot queue
    /// their views in the opposite order of the states they were made from.
    fn push_views(&self) {
        let state = self.state();
        let mut cache = self.views.lock().expect("views lock");
        cache.refresh(&state);
        for host in self.streams.connected() {
            let key = cache.key(&state, &host);
            if self.streams.view_changed(&host, &key) {
                self.streams
                    .push_view_of(&host, key, cache.view(&state, &host));
            }
        }
    }
}

pub(crate) use vane_proto::unix_now as now;

/// How long a migration waits for switches to take a view that freezes or thaws an
/// instance: a host slower than that loses what it sends meanwhile (its peers retransmit),
/// and does not hold the migration up.
const SYNC_LIMIT: std::time::Duration = std::time::Duration::from_millis(500);

/// The controller's steps of a migration where the crash tests kill it.
pub(crate) fn die_at(step: &str) {
    vane_proto::test_die_at(step);
}

/// Runs the controller until `shutdown` completes: the leader at once with the embedded
/// store; with etcd, a standby until it is elected (`leader`).
pub async fn run(
    cfg: ControllerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("create data directory {}", cfg.data_dir.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cfg.data_dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("protect {}", cfg.data_dir.display()))?;
    }
    let tls = tls::Tls::load_or_create(&cfg.data_dir, cfg.listen)?;
    let me = cfg
        .advertise
        .clone()
        .unwrap_or_else(|| format!("https://{}", cfg.listen));
    let cfg = Arc::new(cfg);
    let routes = Arc::new(Routes::default());
    match &cfg.store {
        StoreLocation::Etcd { endpoints, prefix } => {
            let elector = leader::Elector::connect(endpoints, prefix, &me).await?;
            let hint = Arc::new(Mutex::new(None::<String>));
            routes.serve(api::standby_router(me.clone(), hint.clone()));
            tracing::info!(%me, "standing by: campaigning for the leadership");
            tokio::spawn(stand_by_then_lead(
                cfg.clone(),
                tls.pin,
                me.clone(),
                elector,
                hint,
                routes.clone(),
            ));
        }
        StoreLocation::Embedded => {
            let controller = start_leading(&cfg, tls.pin, None)?;
            *routes.leading.lock().expect("leading lock") = Some(controller.clone());
            routes.serve(api::router(controller));
        }
    }
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("listen on {}", cfg.listen))?;
    tracing::info!(listen = %cfg.listen, data = %cfg.data_dir.display(), "controller ready");
    if let Some(ready) = &cfg.ready {
        ready.notify_one();
    }
    // Each request goes to what serves now: a standby's connection that stays open (a
    // browser's) reaches the API once it leads.
    let app = {
        let routes = routes.clone();
        axum::Router::new().fallback_service(tower::service_fn(
            move |req: axum::extract::Request| {
                tower::ServiceExt::oneshot(routes.router_for(req.uri().path()), req)
            },
        ))
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server);
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    continue;
                }
            },
        };
        // Control streams carry small messages that wait on each other (a view, then the
        // request behind it): Nagle's algorithm would hold them for the peer's delayed ACK.
        let _ = tcp.set_nodelay(true);
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            // A peer that does not finish its handshake in time holds nothing for long.
            let tls = match tokio::time::timeout(
                std::time::Duration::from_secs(10),
                acceptor.accept(tcp),
            )
            .await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, "TLS handshake: {e}");
                    return;
                }
                Err(_) => return,
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
        });
    }
    tracing::info!("controller stopping");
    if let Some(controller) = routes.leading.lock().expect("leading lock").as_ref() {
        controller.shutdown.send_replace(true);
    }
    Ok(())
}

/// What answers requests, as a replica's role changes: the leader's API, a standby's
/// refusals, and while a new leader waits for its agents, refusals for all but them.
#[derive(Default)]
struct Routes {
    api: std::sync::RwLock<axum::Router>,
    /// While a new leader waits for its hosts' agents: what answers everything else.
    settling: std::sync::RwLock<Option<axum::Router>>,
    /// The controller, once this replica leads.
    leading: Mutex<Option<Arc<Controller>>>,
}

impl Routes {
    fn serve(&self, router: axum::Router) {
        *self.api.write().expect("router lock") = router;
    }

    fn settle(&self, router: Option<axum::Router>) {
        *self.settling.write().expect("router lock") = router;
    }

    /// What answers a request for `path` now.
    fn router_for(&self, path: &str) -> axum::Router {
        match self.settling.read().expect("router lock").as_ref() {
            Some(r) if !path.starts_with("/v1/agents/") => r.clone(),
            _ => self.api.read().expect("router lock").clone(),
        }
    }
}

/// A replica on etcd: names the leader to clients while it stands by, campaigns, and
/// once elected loads the store and serves (its agents first). It leads until it loses
/// its lease, and then exits: nothing of its term may live on.
async fn stand_by_then_lead(
    cfg: Arc<ControllerConfig>,
    pin: vane_proto::trust::Pin,
    me: String,
    mut elector: leader::Elector,
    hint: Arc<Mutex<Option<String>>>,
    routes: Arc<Routes>,
) {
    let mut watcher = elector.clone();
    let naming = tokio::spawn(async move {
        loop {
            let seen = watcher.leader().await;
            *hint.lock().expect("hint lock") = seen;
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    });
    let (fence, lost) = match elector.lead().await {
        Ok(won) => won,
        Err(e) => {
            tracing::error!("campaigning for the leadership: {e:#}; exiting");
            std::process::exit(STORE_LOST_EXIT);
        }
    };
    naming.abort();
    tracing::info!(%me, "elected the leader");
    exit_when_lost(lost);
    let controller = match start_leading(&cfg, pin, Some(fence)) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("taking the lead: {e:#}; exiting");
            std::process::exit(STORE_LOST_EXIT);
        }
    };
    *routes.leading.lock().expect("leading lock") = Some(controller.clone());
    routes.settle(Some(api::settling_router(me)));
    routes.serve(api::router(controller.clone()));
    controller.await_agents(SETTLE_LIMIT).await;
    routes.settle(None);
    std::future::pending::<()>().await;
}

/// Exits once `lost` turns true: nothing of a leader's term may live on after its lease.
/// On a thread of its own: the runtime's workers may all be waiting on the state (a commit
/// that etcd does not answer holds it), and the exit must not wait for a turn (it once
/// came 3 s late, after etcd had given the leadership up).
fn exit_when_lost(mut lost: tokio::sync::watch::Receiver<bool>) {
    let watch = move || {
        match tokio::runtime::Builder::new_current_thread().build() {
            Ok(runtime) => runtime.block_on(async {
                let _ = lost.wait_for(|l| *l).await;
            }),
            Err(e) => tracing::error!("a runtime to watch the leadership: {e}"),
        }
        tracing::error!(
            "lost the leadership (etcd did not hear this controller for {} s): exiting, so \
             that nothing of its term lives on (started again, it stands by)",
            leader::LEASE_TTL
        );
        std::process::exit(STORE_LOST_EXIT)
    };
    if let Err(e) = std::thread::Builder::new()
        .name("leadership".into())
        .spawn(watch)
    {
        tracing::error!("a thread to watch the leadership: {e}; exiting");
        std::process::exit(STORE_LOST_EXIT);
    }
}

/// The longest a new leader waits for its hosts' agents before it serves the rest.
const SETTLE_LIMIT: std::time::Duration = std::time::Duration::from_secs(3);

impl Controller {
    /// Waits until every host that is not dead has its agent connected, or `limit`.
    async fn await_agents(&self, limit: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            let missing = {
                let s = self.state();
                s.hosts
                    .values()
                    .filter(|h| h.state != vane_proto::api::HostState::Dead)
                    .any(|h| !self.streams.is_connected(&h.name))
            };
            if !missing {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

/// Loads the store as its leader (`fence` among replicas) and starts what a leader runs:
/// interrupted migrations finished, hosts' silence watched, checkpoints kept.
fn start_leading(
    cfg: &ControllerConfig,
    pin: vane_proto::trust::Pin,
    fence: Option<leader::Fence>,
) -> anyhow::Result<Arc<Controller>> {
    let controller = Arc::new(Controller::open(cfg, pin, fence)?);
    recovery::finish_interrupted(&controller);
    // Every host is offline until its agent connects: one that stays silent for the grace
    // period is dead.
    let hosts: Vec<String> = controller.state().hosts.keys().cloned().collect();
    for host in hosts {
        workflow::watch_silence(&controller, &host, 0, controller.host_grace);
    }
    tokio::spawn(workflow::keep_checkpoints(controller.clone()));
    Ok(controller)
}
