//! The agent of one host: creates and supervises the host's instances, runs the switch
//! that carries their packets, and keeps a control stream with the controller.
//!
//! Instances do not depend on the agent process: their init is adopted by the host's init,
//! their TUN devices are persistent, and their state lives in files. A restarted agent
//! takes them back (`Agent::recover`) before it reconnects.

mod binary;
pub mod cgroup;
mod checkpoint;
mod control;
pub use control::exec_helper_main;
mod dataplane;
mod direct;
mod identity;
mod images;
mod instance;
pub mod launch;
mod migration;
pub mod netconf;
mod pin;
pub mod sandbox;
mod transfer;
mod underlay;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use ipnet::Ipv4Net;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, watch};

use vane_proto::api::{ExitStatus, InstanceState, PortStats};
use vane_proto::stream::{
    AgentError, AgentReply, AgentRequest, AgentView, FromAgent, InstanceReport, InstanceSpec,
};
use vane_switch::{L4Proto, Location, NetConfig, PolicyRule, PortId, SwitchConfig};

use crate::cgroup::Layout;
use crate::dataplane::{Command, Dataplane, DataplaneConfig, PeerInfo};
use crate::instance::{CreateError, Found, Record};
use crate::netconf::OutboundRules;

pub struct AgentConfig {
    pub name: String,
    /// Base URL of the controller, e.g. `http://198.18.0.254:7946`.
    pub controller: String,
    pub state_dir: PathBuf,
    /// Join token, for the first connection of a host that has not enrolled yet.
    pub join_token: Option<String>,
    /// Where the switch's underlay socket listens.
    pub listen: SocketAddr,
    /// Underlay address and port of this host's switch, as other hosts reach it. `None`:
    /// the address this host reaches the controller from, followed when it changes.
    pub locator: Option<SocketAddr>,
    /// Idle time after which the tunnel to a host is torn down.
    pub tunnel_idle: Duration,
    /// Age at which a tunnel session is rekeyed.
    pub rekey_after: Duration,
    /// The `vane` binary, for the helper processes that enter instances.
    pub exe: PathBuf,
    /// Bytes an instance's output log may reach before it is rotated.
    pub log_cap: u64,
}

/// Name of the host-side egress device.
const EGRESS_DEVICE: &str = "vanegw0";

struct Local {
    record: Record,
    dir: PathBuf,
    state: InstanceState,
    exit: Option<ExitStatus>,
    port: Option<PortId>,
    /// Turns true when the program has ended.
    exited: watch::Sender<bool>,
    /// Last applied rules and hosts file, to skip rewriting what did not change.
    rules: Option<OutboundRules>,
    hosts: Option<String>,
    /// Restored here for a migration that no view has confirmed yet: its port is on hold
    /// (`adopt`), and `checkpoint::ARRIVED_FILE` says so across a restart.
    unconfirmed: bool,
}

impl Local {
    fn report(&self) -> InstanceReport {
        InstanceReport {
            id: self.record.spec.id.clone(),
            state: self.state,
            pid: (self.state == InstanceState::Running).then_some(self.record.pid),
            exit: self.exit,
        }
    }
}

pub(crate) struct Agent {
    cfg: AgentConfig,
    identity: Mutex<identity::Identity>,
    /// The controller's socket address (for the default locator and the underlay MTU).
    controller_addr: Option<SocketAddr>,
    /// MTU of instance devices: the underlay's less the encapsulation.
    instance_mtu: usize,
    /// This host's id and the cluster's configuration (tunnels, global space), once known.
    cluster: Mutex<Option<(u32, vane_proto::api::ClusterConfig)>>,
    egress_ready: std::sync::atomic::AtomicBool,
    layout: Layout,
    dataplane: Dataplane,
    switch_cfg: SwitchConfig,
    instances: Mutex<BTreeMap<String, Local>>,
    next_port: AtomicU32,
    view: Mutex<AgentView>,
    /// Spaces prepared for instances migrating here, until restored or discarded.
    prepared: Mutex<BTreeMap<String, checkpoint::Prepared>>,
    /// Instances whose tree was dumped and killed for a migration: their init's end is not
    /// an exit.
    dumped: Mutex<std::collections::BTreeSet<String>>,
    /// Messages to the controller, while connected.
    outbox: Mutex<Option<mpsc::Sender<FromAgent>>>,
    /// Images this host expects straight from another's (`direct`), by ticket.
    inbound: Mutex<BTreeMap<String, Inbound>>,
    /// One lock per instance with migration steps under way (`steps_of`).
    steps: Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Lazy dumps of instances migrating away: their page servers, by instance id.
    lazy_sources: Mutex<BTreeMap<String, LazySource>>,
    /// Links from the sources of lazy migrations to this host, kept after their images
    /// for the pages the restore fetches, by instance id.
    page_links: Mutex<BTreeMap<String, PageLink>>,
}

/// A direct transfer this host waits for: from whom, what, and who waits for its end.
struct Inbound {
    from: [u8; 32],
    expected: direct::Expected,
    done: tokio::sync::oneshot::Sender<Result<PageLink, String>>,
}

/// The link of a direct transfer, after its images.
type PageLink = direct::Link<direct::Buffered<tokio::net::TcpStream>>;

/// A lazy dump serving an instance's memory (`checkpoint::LazyDump`).
struct LazySource {
    /// CRIU's page connection, until the images' link takes it over.
    pages: Option<std::os::unix::net::UnixStream>,
    /// Another descriptor of the same connection, to break it off (`resume_lazy`).
    abort: std::os::unix::net::UnixStream,
    /// CRIU's end: whether it served every page (and ended the tree) or not (and resumed
    /// it).
    ended: tokio::sync::watch::Receiver<Option<bool>>,
    /// Stops the relay of the pages (a migration given up before the restore).
    cancel: Arc<tokio::sync::Notify>,
}

pub(crate) use vane_proto::unix_now as now;

/// Runs the agent until `shutdown` completes. Instances keep running when it stops.
pub async fn run(
    cfg: AgentConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    vane_proto::validate::name("host name", &cfg.name)?;
    let mut cfg = cfg;
    match binary::install(&cfg.exe) {
        Ok(copy) => cfg.exe = copy,
        Err(e) => tracing::warn!(
            "cannot copy {} for instances to run: {e}; instances started from it cannot be checkpointed where it is hidden",
            cfg.exe.display()
        ),
    }
    std::fs::create_dir_all(cfg.state_dir.join("instances"))
        .with_context(|| format!("create state directory {}", cfg.state_dir.display()))?;
    // The host's key and credential, and every instance's record: the agent's alone.
    for dir in [cfg.state_dir.clone(), cfg.state_dir.join("instances")] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("protect state directory {}", dir.display()))?;
    }
    let mut identity = identity::Identity::load_or_create(&cfg.state_dir)?;
    // A join token carries the pin of the controller's CA: kept from now on.
    if let Some(token) = &cfg.join_token {
        let (_, pin) = vane_proto::trust::split_join_token(token).ok_or_else(|| {
            anyhow::anyhow!(
                "the join token carries no controller pin: make one with `vane host token`"
            )
        })?;
        if identity.ca_pin != Some(pin) {
            identity.set_ca_pin(pin)?;
        }
    }
    if identity.ca_pin.is_none() {
        anyhow::bail!(
            "host {:?} knows no controller to trust: start its agent with --join TOKEN (`vane host token` makes one)",
            cfg.name
        );
    }
    if identity.credential.is_none() && cfg.join_token.is_none() {
        anyhow::bail!(
            "host {:?} is not enrolled yet: start its agent with --join TOKEN (`vane host token` makes one)",
            cfg.name
        );
    }
    let controller_addr = control::controller_addr(&cfg.controller);
    let underlay_mtu = controller_addr
        .and_then(|a| netconf::underlay_mtu(a.ip()))
        .unwrap_or(1500);
    let max_inner_packet = underlay_mtu.saturating_sub(netconf::ENCAPSULATION).max(576);
    let switch_cfg = SwitchConfig::default();
    let (lookups_tx, lookups_rx) = mpsc::channel(dataplane::MISS_ADDRESSES);
    let dataplane = Dataplane::start(DataplaneConfig {
        switch: switch_cfg.clone(),
        listen: cfg.listen,
        keypair: identity.keypair.clone(),
        tunnel: vane_tunnel::Config {
            idle_timeout: cfg.tunnel_idle,
            rekey_after_time: cfg.rekey_after,
            reject_after_time: cfg.rekey_after + cfg.rekey_after / 2,
            ..vane_tunnel::Config::default()
        },
        max_inner_packet,
        lookups: lookups_tx,
    })
    .context("start the switch")?;
    let agent = Arc::new(Agent {
        layout: Layout::detect(),
        dataplane,
        switch_cfg,
        instances: Mutex::new(BTreeMap::new()),
        next_port: AtomicU32::new(1),
        view: Mutex::new(AgentView::default()),
        outbox: Mutex::new(None),
        inbound: Mutex::new(BTreeMap::new()),
        lazy_sources: Mutex::new(BTreeMap::new()),
        steps: Mutex::new(BTreeMap::new()),
        page_links: Mutex::new(BTreeMap::new()),
        prepared: Mutex::new(BTreeMap::new()),
        dumped: Mutex::new(std::collections::BTreeSet::new()),
        identity: Mutex::new(identity),
        controller_addr,
        instance_mtu: max_inner_packet,
        cluster: Mutex::new(None),
        egress_ready: std::sync::atomic::AtomicBool::new(false),
        cfg,
    });
    agent.clone().recover().await;
    agent.load_saved_view().await;
    tokio::spawn(control::forward_lookups(agent.clone(), lookups_rx));
    tokio::spawn(agent.clone().rotate_logs());
    match tokio::net::TcpListener::bind(agent.cfg.listen).await {
        Ok(listener) => {
            tokio::spawn(agent.clone().accept_direct(listener));
        }
        Err(e) => tracing::warn!(
            "cannot listen for direct transfers on {} (migrations to this host go through the controller): {e}",
            agent.cfg.listen
        ),
    }
    tracing::info!(host = %agent.cfg.name, controller = %agent.cfg.controller, "agent ready");
    tokio::select! {
        refused = control::connect_loop(agent.clone()) => anyhow::bail!("{refused}"),
        _ = shutdown => tracing::info!("agent stopping; instances keep running"),
    }
    Ok(())
}

/// What the agent keeps of the directory across restarts (`STATE/view.json`), so that a
/// restarted agent forwards between existing members even while the controller is down.
#[derive(serde::Serialize, serde::Deserialize)]
struct SavedView {
    host_id: u32,
    config: vane_proto::api::ClusterConfig,
    view: AgentView,
}

const SAVED_VIEW: &str = "view.json";

impl Agent {
    fn instances(&self) -> MutexGuard<'_, BTreeMap<String, Local>> {
        self.instances.lock().expect("instances lock poisoned")
    }

    /// `f` of instance `id`, if it runs on this host; else why not.
    fn running<T>(&self, id: &str, f: impl FnOnce(&Local) -> T) -> Result<T, AgentError> {
        let instances = self.instances();
        let local = instances
            .get(id)
            .ok_or_else(|| AgentError::not_found(format!("instance {id} is not on this host")))?;
        if local.state != InstanceState::Running {
            return Err(AgentError::conflict(format!(
                "instance {} is not running",
                local.record.spec.name
            )));
        }
        Ok(f(local))
    }

    fn instance_dir(&self, id: &str) -> PathBuf {
        self.cfg.state_dir.join("instances").join(id)
    }

    fn setup_egress(&self) {
        let space = self.switch_cfg.egress_space;
        // Complete packets from the host's stack: the switch rewrites their destination.
        let tun = vane_sys::tun::open(EGRESS_DEVICE, false, vane_sys::tun::Offloads::NONE)
            .map_err(|e| e.to_string())
            .and_then(|tun| {
                netconf::setup_egress(EGRESS_DEVICE, space)
                    .map(|_| tun)
                    .map_err(|e| e.to_string())
            });
        match tun {
            Ok(tun) => self.dataplane.send(Command::Egress { tun }),
            Err(e) => tracing::warn!("egress unavailable on this host: {e}"),
        }
    }

    /// Takes back the instances a previous agent left: running ones are re-attached to the
    /// switch and watched again, ended ones are remembered as exited, half-made ones removed.
    async fn recover(self: Arc<Self>) {
        let dir = self.cfg.state_dir.join("instances");
        let found = tokio::task::spawn_blocking(move || instance::scan(&dir))
            .await
            .unwrap_or_default();
        for f in found {
            match f {
                Found::HalfMade(id, dir) => {
                    tracing::warn!(instance = %id, "removing half-made instance");
                    let layout = self.layout.clone();
                    let _ =
                        tokio::task::spawn_blocking(move || instance::teardown(&dir, &id, &layout))
                            .await;
                }
                Found::Instance(record, dir) => {
                    let mut record = *record;
                    let id = record.spec.id.clone();
                    let dumped = dir.join(checkpoint::DUMPED_FILE);
                    let images = dir.join(checkpoint::IMAGES_DIR).join("inventory.img");
                    if !instance::is_alive(&record) && dumped.exists() && images.exists() {
                        // Dumped for a migration when this agent stopped (the dump finishes
                        // without it): back from its images, where its migration left it.
                        let (dir2, exe) = (dir.clone(), self.cfg.exe.clone());
                        let back = tokio::task::spawn_blocking(move || {
                            checkpoint::restore(&dir2, &exe, &mut record, false, None)
                                .map(|()| record)
                        })
                        .await;
                        match back {
                            Ok(Ok(back)) => {
                                tracing::warn!(instance = %id, "brought back from the images of a migration this agent did not finish");
                                record = back;
                            }
                            Ok(Err(e)) => {
                                tracing::error!(instance = %id, "cannot bring back from its images: {e}");
                                continue;
                            }
                            Err(e) => {
                                tracing::error!(instance = %id, "{e}");
                                continue;
                            }
                        }
                    }
                    let _ = std::fs::remove_file(&dumped);
                    if instance::is_alive(&record) {
                        let netns = record.netns.clone();
                        match tokio::task::spawn_blocking(move || instance::open_tun(&netns)).await
                        {
                            Ok(Ok(tun)) => {
                                if let Err(e) = self.adopt(record, dir, tun).await {
                                    tracing::error!(instance = %id, "cannot take back: {e}");
                                } else {
                                    tracing::info!(instance = %id, "took back running instance");
                                }
                            }
                            Ok(Err(e)) => {
                                tracing::error!(instance = %id, "cannot reopen TUN device: {e}")
                            }
                            Err(e) => tracing::error!(instance = %id, "{e}"),
                        }
                    } else {
                        let exit = instance::exit_status(&dir, &record.cgroups);
                        self.instances().insert(
                            id,
                            Local {
                                record,
                                dir,
                                state: InstanceState::Exited,
                                exit,
                                port: None,
                                exited: watch::channel(true).0,
                                rules: None,
                                hosts: None,
                                unconfirmed: false,
                            },
                        );
                    }
                }
            }
        }
    }

    /// Attaches a running instance to the switch and watches for its end.
    async fn adopt(
        self: &Arc<Self>,
        record: Record,
        dir: PathBuf,
        tun: std::os::fd::OwnedFd,
    ) -> Result<(), String> {
        let port = PortId(self.next_port.fetch_add(1, Ordering::Relaxed));
        let net = net_config(&record.spec.net);
        // A copy restored here for a migration that the directory has not confirmed yet
        // (this agent stopped in between) may be a second one, its source resumed: nothing
        // passes to or from it until a view places the instance here.
        let arrived = dir.join(checkpoint::ARRIVED_FILE);
        let placed_here = self
            .view
            .lock()
            .expect("view lock")
            .members
            .iter()
            .any(|m| m.instance == record.spec.id && m.host == self.cfg.name);
        if placed_here {
            let _ = std::fs::remove_file(&arrived);
        }
        let unconfirmed = arrived.exists();
        // The bandwidth limit lives in the switch, not the kernel: it comes from the record,
        // so a restarted agent sets it again.
        self.dataplane
            .attach(
                port,
                tun,
                net,
                record.spec.ip,
                record.spec.limits.bandwidth,
                unconfirmed,
            )
            .await?;
        let pidfd = vane_sys::pidfd::open(record.init_pid).map_err(|e| e.to_string())?;
        let id = record.spec.id.clone();
        let (exited, _) = watch::channel(false);
        self.instances().insert(
            id.clone(),
            Local {
                record,
                dir,
                state: InstanceState::Running,
                exit: None,
                port: Some(port),
                exited,
                rules: None,
                hosts: None,
                unconfirmed,
            },
        );
        let agent = self.clone();
        tokio::spawn(async move { agent.watch_exit(id, pidfd).await });
        Ok(())
    }

    async fn watch_exit(self: Arc<Self>, id: String, pidfd: std::os::fd::OwnedFd) {
        // `new` is deprecated because a registered descriptor could be closed behind the
        // reactor's back; here the AsyncFd owns the OwnedFd, so it cannot be.
        #[allow(deprecated)]
        let registered = AsyncFd::new(pidfd);
        match registered {
            Ok(fd) => {
                let _ = fd.readable().await;
            }
            Err(e) => {
                tracing::error!(instance = %id, "cannot watch instance: {e}");
                return;
            }
        }
        if self.dumped.lock().expect("dumped lock").contains(&id) {
            return;
        }
        let report = {
            let mut instances = self.instances();
            let Some(local) = instances.get_mut(&id) else {
                return;
            };
            let exit =
                instance::exit_status(&local.dir, &local.record.cgroups).unwrap_or(ExitStatus {
                    code: None,
                    signal: None,
                    at: now(),
                    oom: false,
                });
            local.state = InstanceState::Exited;
            local.exit = Some(exit);
            // The port stays attached until the instance is removed: its network namespace
            // outlives the program, and the kernel there still finishes the connections
            // the program closed on its way out (data in send buffers, FIN, TIME_WAIT), as
            // it would on any host.
            local.report()
        };
        tracing::info!(instance = %id, exit = ?report.exit, "instance ended");
        // The report goes out before anyone waiting on `exited` answers the controller.
        self.send(FromAgent::Report(report));
        if let Some(local) = self.instances().get(&id) {
            local.exited.send_replace(true);
        }
    }

    /// Queues `msg` for the controller. When the outbox is full the controller is not
    /// keeping up: a lookup is dropped (the switch asks again), anything else ends the
    /// session (the reconnection's hello carries the instances' states).
    fn send(&self, msg: FromAgent) {
        let mut outbox = self.outbox.lock().expect("outbox lock");
        let Some(tx) = outbox.as_ref() else { return };
        match tx.try_send(msg) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(FromAgent::Lookup { .. })) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(
                    "{} messages wait for the controller: reconnecting",
                    control::OUTBOX
                );
                *outbox = None;
            }
        }
    }

    fn reports(&self) -> Vec<InstanceReport> {
        self.instances().values().map(Local::report).collect()
    }

    async fn handle(self: Arc<Self>, req: AgentRequest) -> Result<AgentReply, AgentError> {
        // The steps of a migration that make or end a copy of an instance happen one at a
        // time, and `resume` after all that are under way. (Not the transfers: a discard
        // must not wait for images that will not come.)
        let _steps = match &req {
            AgentRequest::Prepare { instance } => Some(self.steps_of(&instance.id).await),
            AgentRequest::Checkpoint { id, .. }
            | AgentRequest::Restore { id, .. }
            | AgentRequest::Discard { id }
            | AgentRequest::Resume { id } => Some(self.steps_of(id).await),
            _ => None,
        };
        match req {
            AgentRequest::Create { instance } => self.create(*instance).await,
            AgentRequest::Stop { id, timeout_secs } => {
                self.stop(&id, Duration::from_secs(timeout_secs)).await?;
                Ok(AgentReply::Done)
            }
            AgentRequest::Remove { id } => self.remove(&id).await.map(|_| AgentReply::Done),
            AgentRequest::Exec {
                id,
                ticket,
                cmd,
                env,
            } => control::exec(self, &id, ticket, cmd, env).await,
            AgentRequest::Logs { id, ticket } => control::logs(self, &id, ticket).await,
            AgentRequest::HostStats => {
                let mut stats = self
                    .dataplane
                    .host_stats()
                    .await
                    .ok_or("switch thread is gone")?;
                stats.host = self.cfg.name.clone();
                Ok(AgentReply::HostStats(stats))
            }
            AgentRequest::Prepare { instance } => self.prepare(*instance).await,
            AgentRequest::Checkpoint {
                id,
                leave_running,
                lazy,
            } => {
                if lazy && !leave_running {
                    self.checkpoint_lazy(&id).await
                } else {
                    self.checkpoint(&id, leave_running).await
                }
            }
            AgentRequest::AwaitPages { id } => self.await_pages(&id).await,
            AgentRequest::SendImages { id, ticket, to } => {
                let path = self.instance_dir(&id).join(checkpoint::PACK_FILE);
                let sent = match to {
                    Some(peer) => self.send_direct(&id, &ticket, &peer, &path).await,
                    None => transfer::send(&self, &ticket, &path).await,
                };
                // Sent or not, the pack is not needed again: the images it was made of stay
                // (a source whose migration fails resumes from them).
                let _ = tokio::fs::remove_file(&path).await;
                let bytes = sent?;
                tracing::debug!(instance = %id, bytes, "images sent");
                Ok(AgentReply::Done)
            }
            AgentRequest::ReceiveImages {
                id,
                ticket,
                bytes,
                from,
                pages,
            } => {
                if !self
                    .prepared
                    .lock()
                    .expect("prepared lock")
                    .contains_key(&id)
                {
                    return Err(AgentError::not_found(format!(
                        "instance {id} is not prepared here"
                    )));
                }
                let path = self.instance_dir(&id).join(checkpoint::PACK_FILE);
                match from {
                    Some(key) => {
                        let link = self.receive_direct(ticket, &key, path, bytes).await?;
                        if pages {
                            self.page_links
                                .lock()
                                .expect("page links lock")
                                .insert(id, link);
                        }
                    }
                    None => transfer::receive(&self, &ticket, &path, bytes).await?,
                }
                Ok(AgentReply::Done)
            }
            AgentRequest::Restore { id, tcp_close } => self.restore(&id, tcp_close).await,
            AgentRequest::Resume { id } => self.resume(&id).await,
            AgentRequest::Discard { id } => {
                let prepared = self.prepared.lock().expect("prepared lock").remove(&id);
                if let Some(prepared) = prepared {
                    let key = prepared.record.space_key().to_string();
                    drop(prepared);
                    let dir = self.instance_dir(&id);
                    let layout = self.layout.clone();
                    let _ = tokio::task::spawn_blocking(move || {
                        instance::teardown(&dir, &key, &layout)
                    })
                    .await;
                }
                Ok(AgentReply::Done)
            }
            AgentRequest::Stats { id } => {
                let (port, cgroups) = self
                    .instances()
                    .get(&id)
                    .and_then(|l| {
                        let running = l.state == InstanceState::Running;
                        Some((l.port?, running.then(|| l.record.cgroups.clone())))
                    })
                    .ok_or_else(|| {
                        AgentError::not_found(format!("instance {id} is not running here"))
                    })?;
                let c = self.dataplane.stats(port).await.unwrap_or_default();
                let usage = match cgroups {
                    Some(paths) => tokio::task::spawn_blocking(move || cgroup::usage(&paths))
                        .await
                        .ok(),
                    None => None,
                };
                Ok(AgentReply::Stats {
                    usage,
                    port: PortStats {
                        tx_packets: c.tx_packets,
                        tx_bytes: c.tx_bytes,
                        rx_packets: c.rx_packets,
                        rx_bytes: c.rx_bytes,
                        refused: c.refused,
                        spoofed: c.spoofed,
                        dropped: c.dropped,
                        rate_limited: c.rate_limited,
                    },
                })
            }
        }
    }

    async fn create(self: Arc<Self>, spec: InstanceSpec) -> Result<AgentReply, AgentError> {
        let dir = self.instance_dir(&spec.id);
        let setup = self.setup_for(&spec);
        let (rules, hosts) = (setup.rules.clone(), setup.hosts.clone());
        let exe = self.cfg.exe.clone();
        let spec2 = spec.clone();
        let dir2 = dir.clone();
        let (record, tun) =
            tokio::task::spawn_blocking(move || instance::create(&dir2, &exe, &spec2, &setup))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| match e {
                    CreateError::Input(m) => AgentError::bad_request(m),
                    CreateError::Host(m) => AgentError::from(m),
                })?;
        let pid = record.pid;
        if let Err(e) = self.adopt(record, dir.clone(), tun).await {
            let _ = self.stop(&spec.id, Duration::from_secs(1)).await;
            let layout = self.layout.clone();
            let id = spec.id.clone();
            let _ =
                tokio::task::spawn_blocking(move || instance::teardown(&dir, &id, &layout)).await;
            self.instances().remove(&spec.id);
            return Err(e.into());
        }
        if let Some(local) = self.instances().get_mut(&spec.id) {
            local.rules = Some(rules);
            local.hosts = Some(hosts);
        }
        tracing::info!(instance = %spec.name, ip = %spec.ip, pid, "instance started");
        Ok(AgentReply::Created { pid })
    }

    /// SIGTERM to the instance's init (which passes it to the program), SIGKILL after
    /// `timeout`. Returns once the program has ended and the controller has been told.
    async fn stop(&self, id: &str, timeout: Duration) -> Result<(), AgentError> {
        let (init, mut exited, dir) = {
            let instances = self.instances();
            let local = instances.get(id).ok_or_else(|| {
                AgentError::not_found(format!("instance {id} is not on this host"))
            })?;
            if local.state != InstanceState::Running {
                return Ok(());
            }
            (
                Pid::from_raw(local.record.init_pid as i32),
                local.exited.subscribe(),
                local.dir.clone(),
            )
        };
        let _ = kill(init, Signal::SIGTERM);
        if tokio::time::timeout(timeout, exited.wait_for(|e| *e))
            .await
            .is_err()
        {
            instance::record_exit_if_missing(
                &dir,
                ExitStatus {
                    code: None,
                    signal: Some(Signal::SIGKILL as i32),
                    at: now(),
                    oom: false,
                },
            );
            let _ = kill(init, Signal::SIGKILL);
            let _ = tokio::time::timeout(Duration::from_secs(10), exited.wait_for(|e| *e)).await;
        }
        Ok(())
    }

    async fn remove(&self, id: &str) -> Result<(), AgentError> {
        self.steps.lock().expect("steps lock").remove(id);
        // A tree dumped for a migration is already gone (its init pid may be reused).
        if !self.dumped.lock().expect("dumped lock").remove(id) {
            self.stop(id, Duration::from_secs(10)).await?;
        }
        let dir = self.instance_dir(id);
        let layout = self.layout.clone();
        let key = self
            .instances()
            .get(id)
            .map_or_else(|| id.to_string(), |l| l.record.space_key().to_string());
        if let Some(port) = self.instances().get_mut(id).and_then(|l| l.port.take()) {
            self.dataplane.send(Command::Detach { port });
        }
        tokio::task::spawn_blocking(move || instance::teardown(&dir, &key, &layout))
            .await
            .map_err(|e| e.to_string())?;
        self.instances().remove(id);
        Ok(())
    }

    /// Outbound rules for an instance of `net`, from the current view.
    /// Keeps every instance's output log under the cap, for ever: an instance that writes
    /// without end fills no disk through its log.
    async fn rotate_logs(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let dirs: Vec<PathBuf> = self.instances().values().map(|l| l.dir.clone()).collect();
            let cap = self.cfg.log_cap;
            let _ = tokio::task::spawn_blocking(move || {
                for dir in dirs {
                    if let Err(e) = instance::rotate_log(&dir, cap) {
                        tracing::debug!("rotating the log in {}: {e}", dir.display());
                    }
                }
            })
            .await;
        }
    }

    fn setup_for(&self, spec: &InstanceSpec) -> instance::Setup {
        instance::Setup {
            layout: self.layout.clone(),
            rules: self.rules_for(&spec.net),
            hosts: self.hosts_for(spec),
            mtu: self.instance_mtu,
            hide: vec![self.cfg.state_dir.clone()],
        }
    }

    fn rules_for(&self, net: &vane_proto::api::Net) -> OutboundRules {
        let view = self.view.lock().expect("view lock");
        let subnet_of = |id: u32| view.nets.iter().find(|n| n.id == id).map(|n| n.subnet);
        let allowed = view
            .policies
            .iter()
            .filter(|p| p.from == net.id)
            .filter_map(|p| Some((subnet_of(p.to)?, p.port)))
            .collect();
        let mut routed: Vec<Ipv4Net> = view
            .policies
            .iter()
            .filter_map(|p| match (p.from == net.id, p.to == net.id) {
                (true, _) => subnet_of(p.to),
                (_, true) => subnet_of(p.from),
                _ => None,
            })
            .collect();
        routed.sort();
        routed.dedup();
        OutboundRules {
            own: net.subnet,
            allowed,
            routed,
            global_space: self.global_space(),
            egress: net.egress,
        }
    }

    fn hosts_for(&self, spec: &InstanceSpec) -> String {
        let view = self.view.lock().expect("view lock");
        let members: instance::HostEntries = view
            .members
            .iter()
            .filter(|m| m.net == spec.net.id)
            .map(|m| (m.name.clone(), m.hostname.clone(), m.ip))
            .collect();
        netconf::render_hosts((&spec.name, &spec.hostname, spec.ip), &members)
    }

    /// Applies a view pushed by the controller: the switch's tables, and each running
    /// instance's rules and hosts file where they changed.
    async fn apply_view(self: &Arc<Self>, view: AgentView) {
        let nets: Vec<NetConfig> = view.nets.iter().map(net_config).collect();
        let ports: BTreeMap<String, PortId> = self
            .instances()
            .iter()
            .filter_map(|(id, l)| Some((id.clone(), l.port?)))
            .collect();
        let host_ids: BTreeMap<&str, u32> =
            view.peers.iter().map(|p| (p.name.as_str(), p.id)).collect();
        let members: Vec<(u32, Ipv4Addr, Location)> = view
            .members
            .iter()
            .filter_map(|m| {
                let loc = if m.host == self.cfg.name {
                    Location::Local(*ports.get(&m.instance)?)
                } else {
                    Location::Remote(*host_ids.get(m.host.as_str())?)
                };
                Some((m.net, m.ip, loc))
            })
            .collect();
        let peers = view
            .peers
            .iter()
            .filter_map(|p| {
                Some(PeerInfo {
                    id: p.id,
                    name: p.name.clone(),
                    locator: p.locator,
                    public_key: vane_proto::hex::decode::<32>(&p.public_key)?,
                })
            })
            .collect();
        let policies = view
            .policies
            .iter()
            .map(|p| PolicyRule {
                from: p.from,
                to: p.to,
                port: p.port.map(|s| {
                    (
                        match s.proto {
                            vane_proto::validate::Proto::Tcp => L4Proto::Tcp,
                            vane_proto::validate::Proto::Udp => L4Proto::Udp,
                        },
                        s.port,
                    )
                }),
            })
            .collect();
        self.dataplane.send(Command::View {
            peers,
            nets,
            members,
            policies,
        });
        // Copies restored here for a migration pass packets once the directory places
        // them here (see `adopt`).
        let confirmed: Vec<(PathBuf, Option<PortId>)> = {
            let mut instances = self.instances();
            view.members
                .iter()
                .filter(|m| m.host == self.cfg.name)
                .filter_map(|m| {
                    let local = instances.get_mut(&m.instance)?;
                    std::mem::take(&mut local.unconfirmed).then(|| (local.dir.clone(), local.port))
                })
                .collect()
        };
        for (dir, port) in confirmed {
            self.hold(port, false).await;
            let _ = std::fs::remove_file(dir.join(checkpoint::ARRIVED_FILE));
        }
        *self.view.lock().expect("view lock") = view;
        self.save_view();

        type Update = (
            String,
            PathBuf,
            String,
            Option<(OutboundRules, Option<OutboundRules>)>,
            Option<String>,
        );
        let updates: Vec<Update> = {
            let instances = self.instances();
            instances
                .iter()
                .filter(|(_, l)| l.state == InstanceState::Running)
                .filter_map(|(id, l)| {
                    let rules = self.rules_for(&l.record.spec.net);
                    let hosts = self.hosts_for(&l.record.spec);
                    let rules =
                        (l.rules.as_ref() != Some(&rules)).then(|| (rules, l.rules.clone()));
                    let hosts = (l.hosts.as_ref() != Some(&hosts)).then_some(hosts);
                    (rules.is_some() || hosts.is_some()).then(|| {
                        (
                            id.clone(),
                            l.dir.clone(),
                            l.record.netns.clone(),
                            rules,
                            hosts,
                        )
                    })
                })
                .collect()
        };
        for (id, dir, netns, rules, hosts) in updates {
            let (r, h) = (rules.clone(), hosts.clone());
            let result = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                if let Some((r, previous)) = &r {
                    netconf::apply_rules(&netns, r, previous.as_ref())?;
                }
                if let Some(h) = &h {
                    netconf::rewrite_in_place(&dir.join(launch::HOSTS_FILE), h)?;
                }
                Ok(())
            })
            .await;
            match result {
                Ok(Ok(())) => {
                    if let Some(l) = self.instances().get_mut(&id) {
                        if let Some((r, _)) = rules {
                            l.rules = Some(r);
                        }
                        if hosts.is_some() {
                            l.hosts = hosts;
                        }
                    }
                }
                Ok(Err(e)) => tracing::warn!(instance = %id, "updating rules or hosts: {e}"),
                Err(e) => tracing::warn!(instance = %id, "{e}"),
            }
        }
    }
}

impl Agent {
    /// The cluster's global virtual address space (the default until the controller says).
    fn global_space(&self) -> Ipv4Net {
        self.cluster
            .lock()
            .expect("cluster lock")
            .as_ref()
            .map_or(self.switch_cfg.global_space, |(_, c)| c.global_space)
    }

    /// The controller welcomed this host: who it is and how the cluster's tunnels work.
    fn set_cluster(&self, host_id: u32, config: vane_proto::api::ClusterConfig) {
        // Once the host is known to belong to the cluster: a refused agent leaves nothing.
        if !self.egress_ready.swap(true, Ordering::Relaxed) {
            self.setup_egress();
        }
        self.dataplane.send(Command::Identity {
            host_id,
            plaintext: config.plaintext,
            global_space: config.global_space,
        });
        *self.cluster.lock().expect("cluster lock") = Some((host_id, config));
        self.save_view();
    }

    /// Where the controller says member `ip` of `net` is, for a packet that waits.
    fn resolved(&self, net: u32, ip: Ipv4Addr, member: Option<vane_proto::stream::Member>) {
        let host = member.and_then(|m| {
            let view = self.view.lock().expect("view lock");
            view.peers.iter().find(|p| p.name == m.host).map(|p| p.id)
        });
        self.dataplane.send(Command::Resolved { net, ip, host });
    }

    fn save_view(&self) {
        let Some((host_id, config)) = self.cluster.lock().expect("cluster lock").clone() else {
            return;
        };
        let saved = SavedView {
            host_id,
            config,
            view: self.view.lock().expect("view lock").clone(),
        };
        let path = self.cfg.state_dir.join(SAVED_VIEW);
        let tmp = path.with_extension("json.tmp");
        let written = std::fs::write(&tmp, serde_json::to_vec(&saved).expect("serializes"))
            .and_then(|_| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            tracing::warn!("cannot save the view to {}: {e}", path.display());
        }
    }

    /// Applies the view a previous agent saved, so that traffic between existing members
    /// flows before (or without) the controller.
    async fn load_saved_view(self: &Arc<Self>) {
        let path = self.cfg.state_dir.join(SAVED_VIEW);
        let Ok(bytes) = std::fs::read(&path) else {
            return;
        };
        match serde_json::from_slice::<SavedView>(&bytes) {
            Ok(saved) => {
                self.set_cluster(saved.host_id, saved.config);
                self.apply_view(saved.view).await;
                tracing::info!("applied the saved view");
            }
            Err(e) => tracing::warn!("ignoring saved view {}: {e}", path.display()),
        }
    }
}

fn net_config(net: &vane_proto::api::Net) -> NetConfig {
    NetConfig {
        id: net.id,
        subnet: net.subnet,
        egress: net.egress,
    }
}

/// Removes every instance an agent left under `state_dir`, running or not: kills their
/// processes and removes their namespaces, devices, cgroups and state. For `vane lab down`,
/// with the agent already stopped.
pub fn purge_instances(state_dir: &std::path::Path) {
    let layout = Layout::detect();
    for found in instance::scan(&state_dir.join("instances")) {
        let (id, dir) = match found {
            Found::Instance(record, dir) => {
                if instance::is_alive(&record) {
                    // Killing PID 1 of the instance's PID namespace kills all of it.
                    let _ = kill(Pid::from_raw(record.init_pid as i32), Signal::SIGKILL);
                    for _ in 0..100 {
                        if !instance::is_alive(&record) {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
                (record.space_key().to_string(), dir)
            }
            Found::HalfMade(id, dir) => (id, dir),
        };
        instance::teardown(&dir, &id, &layout);
    }
}
