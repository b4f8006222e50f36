//! The control plane: holds nets, hosts, instances and policies in a persistent store,
//! serves the HTTP/JSON API, keeps a control stream with every agent and pushes to each
//! agent the part of the directory its instances need.

mod agents;
mod api;
pub mod enroll;
mod seal;
mod session;
pub mod state;
pub mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Context;

use vane_proto::api::ClusterConfig;

use crate::agents::Agents;
use crate::state::{ApiError, State};
use crate::store::{Batch, Store};

pub struct ControllerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Used when the store is new; an existing store keeps its own.
    pub cluster: ClusterConfig,
}

pub(crate) struct Controller {
    state: Mutex<State>,
    store: Store,
    agents: Agents,
    /// Seals snapshots that leave the cluster, and checks them when they come back.
    sealer: seal::Sealer,
    /// Turns true when the controller stops, so that agent sessions (long-lived WebSockets
    /// that a graceful HTTP shutdown would otherwise wait for) end.
    shutdown: tokio::sync::watch::Sender<bool>,
}

impl Controller {
    fn open(cfg: &ControllerConfig) -> anyhow::Result<Controller> {
        std::fs::create_dir_all(&cfg.data_dir)
            .with_context(|| format!("create data directory {}", cfg.data_dir.display()))?;
        let store = Store::open(&cfg.data_dir.join("store.redb"))?;
        let snapshot = store.load()?;
        let (state, batch) = State::from_snapshot(snapshot, cfg.cluster.clone());
        store.commit(batch)?;
        let sealer = seal::Sealer::load_or_create(&cfg.data_dir)?;
        Ok(Controller {
            state: Mutex::new(state),
            store,
            agents: Agents::default(),
            sealer,
            shutdown: tokio::sync::watch::channel(false).0,
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("state lock poisoned")
    }

    /// Commits `batch`. Called with the state lock held, so the store sees changes in the
    /// order the state took them.
    fn commit(&self, batch: Batch) -> Result<(), ApiError> {
        self.store.commit(batch).map_err(ApiError::from)
    }

    /// Sends each connected agent its view, where it changed.
    fn push_views(&self) {
        let views: Vec<_> = {
            let state = self.state();
            self.agents
                .connected()
                .into_iter()
                .map(|h| {
                    let v = state.view_for(&h);
                    (h, v)
                })
                .collect()
        };
        for (host, view) in views {
            self.agents.push_view(&host, view);
        }
    }
}

pub(crate) use vane_proto::unix_now as now;

/// Runs the controller until `shutdown` completes.
pub async fn run(
    cfg: ControllerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let controller = Arc::new(Controller::open(&cfg)?);
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("listen on {}", cfg.listen))?;
    tracing::info!(listen = %cfg.listen, data = %cfg.data_dir.display(), "controller ready");
    let app = api::router(controller.clone());
    let stopping = controller.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!("controller stopping");
            stopping.shutdown.send_replace(true);
        })
        .await
        .context("serve API")?;
    Ok(())
}
