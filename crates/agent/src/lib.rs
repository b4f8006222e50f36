//! The agent of one host: creates and supervises the host's instances, runs the switch
//! that carries their packets, and keeps a control stream with the controller.
//!
//! This file holds the agent's state (`Agent`), its start (`run`) and the dispatch of the
//! controller's requests (`Agent::handle`). The jobs live apart: an instance's life in
//! `lifecycle`, the directory applied to the switch in `view`, migrations in `migration`,
//! the packet path in `dataplane`, the control stream in `control`.
//!
//! Instances do not depend on the agent process: their init is adopted by the host's init,
//! their TUN devices are persistent, and their state lives in files. A restarted agent
//! takes them back (`Agent::recover`) before it reconnects.

mod binary;
pub mod cgroup;
mod checkpoint;
mod control;
pub use streams::exec_helper_main;
mod dataplane;
mod direct;
mod dns;
mod gateway;
mod identity;
mod images;
mod instance;
pub mod launch;
mod lifecycle;
pub use lifecycle::{kill_instances, purge_instances};
mod migration;
pub mod netconf;
mod pin;
pub mod sandbox;
pub mod simulate;
mod state;
mod streams;
mod transfer;
mod underlay;
mod view;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::mpsc;

use vane_proto::api::{InstanceState, PortStats};
use vane_proto::stream::{AgentError, AgentReply, AgentRequest, FromAgent, InstanceReport};
use vane_switch::SwitchConfig;

use crate::cgroup::Layout;
use crate::dataplane::{Command, Dataplane, DataplaneConfig};
use crate::state::{Local, State};

pub struct AgentConfig {
    pub name: String,
    /// Base URL of the controller, e.g. `http://198.18.0.254:7946`.
    pub controller: String,
    pub state_dir: PathBuf,
    /// Join token, for the first connection of a host that has not enrolled yet.
    pub join_token: Option<String>,
    /// Where the switch's underlay socket listens.
    pub listen: SocketAddr,
    /// Where this host takes WireGuard clients of its gateways (`vane gateway add`), if it
    /// does.
    pub gateway_listen: Option<SocketAddr>,
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
    /// Notified each time the controller welcomes this host, the first of which is what a
    /// service manager waits for (systemd's `Type=notify`): only then is the host part of
    /// the cluster, its instances reachable from the others.
    pub ready: Option<Arc<tokio::sync::Notify>>,
}

/// Name of the host-side egress device.
const EGRESS_DEVICE: &str = "vanegw0";

pub(crate) struct Agent {
    cfg: AgentConfig,
    /// Everything the agent knows and changes (see `state`).
    state: Mutex<State>,
    /// Messages to the controller, while connected. Apart from `state`: the connection's,
    /// not the host's, and taken by `send` wherever a step is.
    outbox: Mutex<Option<mpsc::Sender<FromAgent>>>,
    /// The controller's socket address (for the default locator and the underlay MTU): the
    /// first replica's.
    controller_addr: Option<SocketAddr>,
    /// The base URL of the replica the control stream is open to (or was last), which the
    /// streams that go with it (transfers) use too.
    controller_now: Mutex<String>,
    /// MTU of instance devices: the underlay's less the encapsulation.
    instance_mtu: usize,
    egress_ready: std::sync::atomic::AtomicBool,
    layout: Layout,
    dataplane: Dataplane,
    switch_cfg: SwitchConfig,
    next_port: AtomicU32,
    /// The instances' resolver: the directory it answers from, the host's resolvers.
    dns: dns::Resolver,
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
    let replicas = control::controller_urls(&cfg.controller);
    let Some(first) = replicas.first().cloned() else {
        anyhow::bail!("no controller URL in {:?}", cfg.controller);
    };
    let controller_addr = control::controller_addr(&first);
    let underlay_mtu = controller_addr
        .and_then(|a| netconf::underlay_mtu(a.ip()))
        .unwrap_or(1500);
    let max_inner_packet = underlay_mtu.saturating_sub(netconf::ENCAPSULATION).max(576);
    let switch_cfg = SwitchConfig::default();
    let (lookups_tx, lookups_rx) = mpsc::channel(dataplane::MISS_ADDRESSES);
    let dns = dns::Resolver::new(dns::upstreams(
        &std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
    ));
    let gateways = gateway::Gateways::bind(
        cfg.gateway_listen,
        // The longest datagram the underlay carries whole, as for the tunnels.
        max_inner_packet + netconf::ENCAPSULATION - 28,
        identity.gateway_key,
        dns.names(),
    )?;
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
        gateways,
    })
    .context("start the switch")?;
    let agent = Arc::new(Agent {
        layout: Layout::detect(),
        dataplane,
        switch_cfg,
        next_port: AtomicU32::new(1),
        state: Mutex::new(State::new(identity)),
        outbox: Mutex::new(None),
        controller_addr,
        controller_now: Mutex::new(first),
        instance_mtu: max_inner_packet,
        egress_ready: std::sync::atomic::AtomicBool::new(false),
        dns,
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

impl Agent {
    /// The agent's state, locked: for a lookup or a change, not across an await.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("agent state lock poisoned")
    }

    /// `f` of instance `id`, if it runs on this host; else why not.
    fn running<T>(&self, id: &str, f: impl FnOnce(&Local) -> T) -> Result<T, AgentError> {
        self.state().running(id).map(f)
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
        self.state().reports()
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
                stdin,
                tty,
            } => streams::exec(self, &id, ticket, cmd, env, stdin, tty).await,
            AgentRequest::Logs {
                id,
                ticket,
                follow,
                tail,
            } => streams::logs(self, &id, ticket, follow, tail).await,
            // Views are applied before the next message is read (`control::session`).
            AgentRequest::Sync => Ok(AgentReply::Done),
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
                stream,
            } => {
                if lazy && !leave_running {
                    self.checkpoint_lazy(&id, stream).await
                } else {
                    self.checkpoint(&id, leave_running, stream).await
                }
            }
            AgentRequest::AwaitPages { id } => self.await_pages(&id).await,
            AgentRequest::SendImages { id, ticket, to } => {
                let path = self.instance_dir(&id).join(checkpoint::PACK_FILE);
                let sent = match to {
                    Some(peer) => self.send_direct(&id, &ticket, &peer).await,
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
                let owner = match self.state().migrations.prepared.get(&id) {
                    Some(prepared) => prepared.record.confinement().idmap,
                    None => {
                        return Err(AgentError::not_found(format!(
                            "instance {id} is not prepared here"
                        )))
                    }
                };
                let dir = self.instance_dir(&id);
                let path = dir.join(checkpoint::PACK_FILE);
                match from {
                    Some(key) => {
                        let link = self.receive_direct(ticket, &key, dir, bytes, owner).await?;
                        if pages {
                            self.state().migrations.page_links.insert(id, link);
                        }
                    }
                    None => transfer::receive(&self, &ticket, &path, bytes).await?,
                }
                Ok(AgentReply::Done)
            }
            AgentRequest::Restore { id, tcp_close } => self.restore(&id, tcp_close).await,
            AgentRequest::Resume { id } => self.resume(&id).await,
            AgentRequest::Discard { id } => {
                let prepared = self.state().migrations.prepared.remove(&id);
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
                    .state()
                    .instances
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
}
