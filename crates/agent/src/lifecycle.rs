//! An instance's life on this host: created, watched until it exits, stopped, removed;
//! taken back from its files when the agent restarts (`Agent::recover`).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

use vane_proto::api::{ExitStatus, InstanceState};
use vane_proto::stream::{AgentError, AgentReply, FromAgent, InstanceSpec};
use vane_switch::PortId;

use crate::cgroup::Layout;
use crate::dataplane::Command;
use crate::instance::{CreateError, Found, Record};
use crate::view::net_config;
use crate::{checkpoint, instance, now, Agent, Local};

impl Agent {
    /// Takes back the instances a previous agent left: running ones are re-attached to the
    /// switch and watched again, ended ones are remembered as exited, half-made ones removed.
    pub(crate) async fn recover(self: Arc<Self>) {
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
                            checkpoint::restore(&dir2, &exe, &mut record, false, None, None)
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
                                if let Err(e) = self.adopt(record, dir, tun, None).await {
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
                        self.state().instances.insert(
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
                                dns: None,
                                unconfirmed: false,
                            },
                        );
                    }
                }
            }
        }
    }

    /// Attaches a running instance to the switch, serves its resolver (on `dns`, bound
    /// before its program started, or bound now) and watches for its end.
    pub(crate) async fn adopt(
        self: &Arc<Self>,
        record: Record,
        dir: PathBuf,
        tun: std::os::fd::OwnedFd,
        dns: Option<crate::dns::Sockets>,
    ) -> Result<(), String> {
        let port = PortId(self.next_port.fetch_add(1, Ordering::Relaxed));
        let net = net_config(&record.spec.net);
        // A copy restored here for a migration that the directory has not confirmed yet
        // (this agent stopped in between) may be a second one, its source resumed: nothing
        // passes to or from it until a view places the instance here.
        let arrived = dir.join(checkpoint::ARRIVED_FILE);
        if self.state().placed_here(&record.spec.id) {
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
        let dns = self.serve_dns(&record, dns).await;
        let id = record.spec.id.clone();
        let (exited, _) = watch::channel(false);
        self.state().instances.insert(
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
                dns,
                unconfirmed,
            },
        );
        let published = record_published(&self.state().instances[&id].record);
        if !published.is_empty() {
            self.dataplane.send(Command::Publish { port, published });
            self.publish_ports();
        }
        // The directory may already place it here (a run, a restarted agent).
        self.sync_members();
        let agent = self.clone();
        tokio::spawn(async move { agent.watch_exit(id, pidfd).await });
        Ok(())
    }

    /// Makes the host's NAT send each published port of a local instance to the instance's
    /// egress address, where the switch lets new flows in (`Switch::set_published`); the
    /// whole table at once, from what is attached now.
    pub(crate) fn publish_ports(&self) {
        let space = self.switch_cfg.egress_space;
        let rules: Vec<(vane_proto::validate::Publish, std::net::Ipv4Addr)> = {
            let state = self.state();
            state
                .instances
                .values()
                .filter_map(|l| Some((l, vane_switch::egress_address(space, l.port?)?)))
                .flat_map(|(l, to)| l.record.spec.publish.iter().map(move |p| (*p, to)))
                .collect()
        };
        if let Err(e) = crate::netconf::apply_published(&rules) {
            tracing::error!("publishing ports on this host: {e}");
        }
    }

    /// Serves the resolver of an instance that runs here. Without it the instance still
    /// runs (its /etc/hosts names its net's members): a restarted agent may find the address
    /// taken by a program of the instance, which then only answers itself.
    async fn serve_dns(
        &self,
        record: &Record,
        sockets: Option<crate::dns::Sockets>,
    ) -> Option<crate::dns::Server> {
        let sockets = match sockets {
            Some(s) => Ok(s),
            None => {
                let netns = record.netns.clone();
                tokio::task::spawn_blocking(move || crate::dns::bind(&netns))
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e)))
            }
        };
        let served = sockets.and_then(|s| self.dns.serve(s, crate::dns::Client::of(&record.spec)));
        match served {
            Ok(server) => Some(server),
            Err(e) => {
                tracing::warn!(instance = %record.spec.name, "no resolver: {e}");
                None
            }
        }
    }

    pub(crate) async fn watch_exit(self: Arc<Self>, id: String, pidfd: std::os::fd::OwnedFd) {
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
        let report = {
            let mut state = self.state();
            if state.migrations.dumped.contains(&id) {
                return;
            }
            let Some(local) = state.instances.get_mut(&id) else {
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
        if let Some(local) = self.state().instances.get(&id) {
            local.exited.send_replace(true);
        }
    }

    pub(crate) async fn create(
        self: Arc<Self>,
        spec: InstanceSpec,
    ) -> Result<AgentReply, AgentError> {
        let dir = self.instance_dir(&spec.id);
        let setup = self.setup_for(&spec);
        let (rules, hosts) = (setup.rules.clone(), setup.hosts.clone());
        let exe = self.cfg.exe.clone();
        let spec2 = spec.clone();
        let dir2 = dir.clone();
        // Its id names its namespace and cgroups, unless they are taken on this kernel: lab
        // hosts share one, and an instance started again here after its host died may
        // still have its old space there (until that host comes back and removes it).
        let key = if crate::netconf::netns_path(&instance::netns_name(&spec.id)).exists() {
            format!("{}-{}", spec.id, self.cfg.name)
        } else {
            spec.id.clone()
        };
        let (record, tun, dns) = tokio::task::spawn_blocking(move || {
            instance::create(&dir2, &key, &exe, &spec2, &setup)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| match e {
            CreateError::Input(m) => AgentError::bad_request(m),
            CreateError::Host(m) => AgentError::from(m),
        })?;
        let pid = record.pid;
        let key = record.space_key().to_string();
        if let Err(e) = self.adopt(record, dir.clone(), tun, Some(dns)).await {
            let _ = self.stop(&spec.id, Duration::from_secs(1)).await;
            let layout = self.layout.clone();
            let _ =
                tokio::task::spawn_blocking(move || instance::teardown(&dir, &key, &layout)).await;
            self.state().instances.remove(&spec.id);
            return Err(e.into());
        }
        if let Some(local) = self.state().instances.get_mut(&spec.id) {
            local.rules = Some(rules);
            local.hosts = Some(hosts);
        }
        tracing::info!(instance = %spec.name, ip = %spec.ip, pid, "instance started");
        Ok(AgentReply::Created { pid })
    }

    /// SIGTERM to the instance's init (which passes it to the program), SIGKILL after
    /// `timeout`. Returns once the program has ended and the controller has been told.
    pub(crate) async fn stop(&self, id: &str, timeout: Duration) -> Result<(), AgentError> {
        let (init, mut exited, dir) = {
            let state = self.state();
            let local = state.instances.get(id).ok_or_else(|| {
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

    pub(crate) async fn remove(&self, id: &str) -> Result<(), AgentError> {
        self.remove_within(id, Duration::from_secs(10)).await
    }

    /// Removes a copy that must not run a moment longer (it runs on another host now):
    /// killed, not asked to stop.
    pub(crate) async fn remove_now(&self, id: &str) -> Result<(), AgentError> {
        self.remove_within(id, Duration::ZERO).await
    }

    /// Stops instance `id` (SIGKILL after `timeout`), then removes every trace of it.
    async fn remove_within(&self, id: &str, timeout: Duration) -> Result<(), AgentError> {
        // A tree dumped for a migration is already gone (its init pid may be reused).
        let dumped = {
            let mut state = self.state();
            state.migrations.steps.remove(id);
            state.migrations.dumped.remove(id)
        };
        if !dumped {
            self.stop(id, timeout).await?;
        }
        let dir = self.instance_dir(id);
        let layout = self.layout.clone();
        let (key, port, published) = {
            let mut state = self.state();
            match state.instances.get_mut(id) {
                Some(l) => {
                    // Its resolver's sockets would keep the network namespace alive.
                    l.dns = None;
                    let published = !l.record.spec.publish.is_empty();
                    (l.record.space_key().to_string(), l.port.take(), published)
                }
                None => (id.to_string(), None, false),
            }
        };
        if let Some(port) = port {
            self.dataplane.send(Command::Detach { port });
            if published {
                self.publish_ports();
            }
        }
        tokio::task::spawn_blocking(move || instance::teardown(&dir, &key, &layout))
            .await
            .map_err(|e| e.to_string())?;
        self.state().instances.remove(id);
        Ok(())
    }

    /// Keeps every instance's output log under the cap, for ever: an instance that writes
    /// without end fills no disk through its log.
    pub(crate) async fn rotate_logs(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let dirs: Vec<PathBuf> = self
                .state()
                .instances
                .values()
                .map(|l| l.dir.clone())
                .collect();
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

    pub(crate) fn setup_for(&self, spec: &InstanceSpec) -> instance::Setup {
        let (rules, hosts) = {
            let state = self.state();
            (state.rules_for(&spec.net), state.hosts_for(spec))
        };
        instance::Setup {
            layout: self.layout.clone(),
            rules,
            hosts,
            mtu: self.instance_mtu,
            hide: vec![self.cfg.state_dir.clone()],
        }
    }
}

/// Kills the processes of every instance an agent left under `state_dir` and leaves the
/// rest (namespaces, devices, cgroups, state) as a power loss would: for `vane lab fail`,
/// with the agent already killed. Returns how many were running.
pub fn kill_instances(state_dir: &std::path::Path) -> usize {
    let mut killed = 0;
    for found in instance::scan(&state_dir.join("instances")) {
        if let Found::Instance(record, _) = found {
            if instance::is_alive(&record) {
                // Killing PID 1 of the instance's PID namespace kills all of it.
                let _ = kill(Pid::from_raw(record.init_pid as i32), Signal::SIGKILL);
                for _ in 0..100 {
                    if !instance::is_alive(&record) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                killed += 1;
            }
        }
    }
    killed
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

/// The ports `record`'s instance publishes, as the switch takes them.
fn record_published(record: &Record) -> Vec<(vane_switch::L4Proto, u16)> {
    record
        .spec
        .publish
        .iter()
        .map(|p| {
            crate::view::port_spec(vane_proto::validate::PortSpec {
                port: p.port,
                proto: p.proto,
            })
        })
        .collect()
}
