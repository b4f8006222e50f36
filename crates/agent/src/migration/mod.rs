//! The agent's side of migrations, snapshots and restores: preparing a space for an
//! instance that comes here, dumping one that leaves (whole, or lazily with its memory served
//! afterwards), moving images and pages straight between agents (`direct`), restoring, and
//! resuming an instance whose migration did not happen. The controller drives the steps
//! (its `workflow/migrate.rs`); ARCHITECTURE.md, "Migration", tells the whole story.
//!
//! This file holds the steps on this host's instances; `peer_transfers` holds the agent's
//! ends of the direct transfers between agents (images, then a lazy dump's pages).

use std::sync::Arc;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use vane_proto::api::InstanceState;
use vane_proto::stream::{AgentError, AgentReply, AgentRequest, InstanceSpec};
use vane_switch::PortId;

use crate::state::LazySource;
use crate::{cgroup, checkpoint, control, instance, Agent};

mod peer_transfers;

use peer_transfers::relay_pages;

/// More than one request to CRIU's page server (`struct page_server_iov`: command, pages,
/// address and image id, 32 bytes on x86-64), which reads whole requests: bytes enough for
/// it to read one, whatever its layout.
const PAGE_SERVER_REQUEST: usize = 4096;

/// Waits for a lazy dump's CRIU to end: whether it served every page; `None` if nothing
/// watches it any more.
async fn dump_ended(ended: &mut tokio::sync::watch::Receiver<Option<bool>>) -> Option<bool> {
    loop {
        if let Some(served) = *ended.borrow_and_update() {
            return Some(served);
        }
        ended.changed().await.ok()?;
    }
}

/// Makes the page server of a lazy dump fail (CRIU then resumes the tree), through
/// `abort`, a descriptor of its connection: a request it does not know. Should CRIU not be
/// reading (blocked sending pages nobody takes), the connection is shut instead, which
/// fails its sending.
fn break_off(abort: &std::os::unix::net::UnixStream) {
    if let Err(e) = std::io::Write::write_all(&mut &*abort, &[0xff; PAGE_SERVER_REQUEST]) {
        tracing::warn!("breaking off a lazy dump: {e}; shutting its connection");
        let _ = abort.shutdown(std::net::Shutdown::Read);
    }
}

impl Agent {
    /// Instance `id`'s record, directory and port, if it runs here and a checkpoint can
    /// carry it.
    fn dumpable(
        &self,
        id: &str,
    ) -> Result<(instance::Record, std::path::PathBuf, Option<PortId>), AgentError> {
        let (record, dir, port) =
            self.running(id, |l| (l.record.clone(), l.dir.clone(), l.port))?;
        checkpoint::portable(&record, &dir).map_err(AgentError::conflict)?;
        Ok((record, dir, port))
    }

    /// Marks instance `id` as dumped for a migration, or no longer: its init's end is not
    /// an exit then, and an agent that restarts meanwhile (the mark is also a file in its
    /// directory) brings the tree back from its images rather than report it ended.
    pub(crate) fn set_dumped(&self, id: &str, dumped: bool) {
        let mark = self.instance_dir(id).join(checkpoint::DUMPED_FILE);
        if dumped {
            self.state().migrations.dumped.insert(id.to_string());
            let _ = std::fs::write(&mark, b"");
        } else {
            self.state().migrations.dumped.remove(id);
            let _ = std::fs::remove_file(&mark);
        }
    }

    /// Waits for the migration steps under way on instance `id` here, and holds off the next
    /// ones while the guard lives.
    pub(crate) async fn steps_of(&self, id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .state()
            .migrations
            .steps
            .entry(id.to_string())
            .or_default()
            .clone();
        lock.lock_owned().await
    }

    /// `Resume` (see its description in the protocol).
    pub(crate) async fn resume(self: Arc<Self>, id: &str) -> Result<AgentReply, AgentError> {
        tracing::info!(instance = %id, "resuming after an interrupted migration, if here");
        let dumped = {
            let state = self.state();
            state.migrations.dumped.contains(id) || state.migrations.lazy_sources.contains_key(id)
        };
        if dumped {
            // A source whose tree was dumped: back from its lazy dump or its images.
            return self.restore(id, false).await;
        }
        let here = self.state().instances.get(id).map(|l| {
            (
                l.port,
                l.record.pid,
                l.state == InstanceState::Running && instance::is_alive(&l.record),
            )
        });
        match here {
            Some((port, pid, true)) => {
                // Running (a dump that never started leaves the port on hold at worst).
                self.hold(port, false).await;
                Ok(AgentReply::Created { pid })
            }
            Some(_) => Err(AgentError::conflict(format!(
                "instance {id} is here but not running"
            ))),
            None => Err(AgentError::not_found(format!(
                "instance {id} does not run on this host"
            ))),
        }
    }

    /// Makes the space of an instance that is to be restored here (migration destination).
    pub(crate) async fn prepare(
        self: Arc<Self>,
        spec: InstanceSpec,
    ) -> Result<AgentReply, AgentError> {
        let taken = {
            let state = self.state();
            state.instances.contains_key(&spec.id)
                || state.migrations.prepared.contains_key(&spec.id)
        };
        if taken {
            return Err(AgentError::conflict(format!(
                "instance {} already exists on this host",
                spec.name
            )));
        }
        let dir = self.instance_dir(&spec.id);
        let setup = self.setup_for(&spec);
        let id = spec.id.clone();
        let key = format!("{}-{}", spec.id, self.cfg.name);
        let exe = self.cfg.exe.clone();
        let prepared = tokio::task::spawn_blocking(move || {
            checkpoint::prepare(&dir, &exe, &key, &spec, &setup)
        })
        .await
        .map_err(|e| e.to_string())??;
        self.state().migrations.prepared.insert(id, prepared);
        Ok(AgentReply::Done)
    }

    /// Dumps an instance's tree and packs its images (migration source, snapshots), or
    /// leaves them to be packed as they go (`stream`).
    pub(crate) async fn checkpoint(
        self: Arc<Self>,
        id: &str,
        leave_running: bool,
        stream: bool,
    ) -> Result<AgentReply, AgentError> {
        let (record, dir, port) = self.dumpable(id)?;
        if !leave_running {
            self.set_dumped(id, true);
        }
        // The network lock of the dump (CRIU is told to skip its own): nothing passes to or
        // from the instance until it runs again, here or on the destination.
        self.hold(port, true).await;
        let record2 = record.clone();
        let result = tokio::task::spawn_blocking(move || {
            checkpoint::dump(&dir, &record2, leave_running, stream)
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        match result {
            Ok(bytes) => {
                if leave_running {
                    self.hold(port, false).await;
                } else {
                    vane_proto::test_die_at("agent-dumped");
                }
                Ok(AgentReply::Checkpointed { bytes, lazy: false })
            }
            Err(e) if leave_running || instance::is_alive(&record) => {
                // A failed dump leaves the tree running.
                self.hold(port, false).await;
                self.set_dumped(id, false);
                Err(e.into())
            }
            Err(e) => {
                // Dumped, then failed (packing): bring the tree back from its images.
                match self.clone().restore(id, false).await {
                    Ok(_) => Err(e.into()),
                    Err(e2) => Err(format!("{e}, and restoring the instance failed: {e2}").into()),
                }
            }
        }
    }

    /// Dumps an instance lazily (post-copy migration source): everything but its memory,
    /// which stays here with CRIU, frozen, until the destination has fetched it. Falls back
    /// to a whole dump where CRIU or the host cannot.
    pub(crate) async fn checkpoint_lazy(
        self: Arc<Self>,
        id: &str,
        stream: bool,
    ) -> Result<AgentReply, AgentError> {
        let (record, dir, port) = self.dumpable(id)?;
        self.set_dumped(id, true);
        self.hold(port, true).await;
        let record2 = record.clone();
        let started =
            tokio::task::spawn_blocking(move || checkpoint::dump_lazy(&dir, &record2, stream))
                .await
                .map_err(|e| e.to_string())?;
        let dump = match started {
            Ok(dump) => dump,
            Err(e) => {
                // CRIU leaves the tree running when it fails: dump it whole instead.
                tracing::warn!(instance = %record.spec.name, "no lazy dump here, a whole one instead: {e}");
                self.hold(port, false).await;
                self.set_dumped(id, false);
                return self.checkpoint(id, false, stream).await;
            }
        };
        vane_proto::test_die_at("agent-dumped");
        let checkpoint::LazyDump {
            mut criu,
            pages,
            bytes,
        } = dump;
        let (ended_tx, ended) = tokio::sync::watch::channel(None);
        let name = record.spec.name.clone();
        std::thread::spawn(move || {
            let served = criu.wait().is_ok_and(|s| s.success());
            if !served {
                tracing::warn!(instance = %name, "the lazy dump ended without serving every page");
            }
            let _ = ended_tx.send(Some(served));
        });
        self.state().migrations.lazy_sources.insert(
            id.to_string(),
            LazySource {
                abort: pages
                    .try_clone()
                    .map_err(|e| format!("the lazy dump's connection: {e}"))?,
                pages: Some(pages),
                ended,
                cancel: Arc::new(tokio::sync::Notify::new()),
            },
        );
        Ok(AgentReply::Checkpointed { bytes, lazy: true })
    }

    /// Waits until the lazy dump of `id` has served every page and ended the tree (the
    /// source is released), or says it failed. A failure after the destination resumed
    /// the instance leaves no copy here either: CRIU resumes the tree when it fails, and
    /// this ends it, so that two copies never run.
    pub(crate) async fn await_pages(&self, id: &str) -> Result<AgentReply, AgentError> {
        let mut ended = self
            .state()
            .migrations
            .lazy_sources
            .get(id)
            .map(|l| l.ended.clone())
            .ok_or_else(|| AgentError::not_found(format!("instance {id} has no lazy dump here")))?;
        let served = dump_ended(&mut ended).await.unwrap_or(false);
        self.state().migrations.lazy_sources.remove(id);
        if served {
            return Ok(AgentReply::Done);
        }
        let cgroups = self
            .state()
            .instances
            .get(id)
            .map(|l| l.record.cgroups.clone())
            .unwrap_or_default();
        cgroup::kill_all(&cgroups);
        Err(AgentError::from(
            "the source could not serve every page of the instance's memory",
        ))
    }

    /// A source whose lazy migration was given up before the restore: the page relay stops,
    /// CRIU sees its page connection close and resumes the tree where it was.
    pub(crate) async fn resume_lazy(&self, id: &str) -> Option<Result<(), AgentError>> {
        let (mut ended, cancel, pages, abort) = {
            let mut state = self.state();
            let source = state.migrations.lazy_sources.get_mut(id)?;
            (
                source.ended.clone(),
                source.cancel.clone(),
                source.pages.take(),
                source.abort.try_clone(),
            )
        };
        // CRIU's page server takes a closed connection for the end of its work (and would
        // end the tree): what it must take for a failure is a request it does not know.
        // Then it resumes the tree, its connections out of repair mode (our patch).
        match abort {
            Ok(abort) => break_off(&abort),
            Err(e) => tracing::warn!(instance = %id, "breaking off a lazy dump: {e}"),
        }
        cancel.notify_one();
        drop(pages);
        let served = dump_ended(&mut ended).await.unwrap_or(true);
        let alive = {
            let mut state = self.state();
            state.migrations.lazy_sources.remove(id);
            state
                .instances
                .get(id)
                .is_some_and(|l| !served && instance::is_alive(&l.record))
        };
        Some(if alive {
            Ok(())
        } else if served {
            Err(AgentError::new(
                vane_proto::stream::ErrorKind::Moved,
                "its memory had all gone to the destination: the instance lives there now",
            ))
        } else {
            Err(AgentError::from(
                "the instance's lazy dump did not resume it",
            ))
        })
    }

    /// Whether `body` is long work that reports progress, and what to count while it goes
    /// on.
    pub(crate) fn progress_of(&self, body: &AgentRequest) -> Option<control::Counted> {
        use control::Counted;
        match body {
            // The images a dump writes.
            AgentRequest::Checkpoint { id, .. } => Some(Counted::Size(
                self.instance_dir(id).join(checkpoint::IMAGES_DIR),
            )),
            // The pack a transfer receives, or what it unpacked so far.
            AgentRequest::ReceiveImages { id, from, .. } => {
                Some(Counted::Size(self.instance_dir(id).join(match from {
                    Some(_) => checkpoint::IMAGES_DIR,
                    None => checkpoint::PACK_FILE,
                })))
            }
            // The memory a restore gives back to the instance.
            AgentRequest::Restore { id, .. } => {
                let state = self.state();
                let cgroups = match state.migrations.prepared.get(id) {
                    Some(p) => p.record.cgroups.clone(),
                    None => state
                        .instances
                        .get(id)
                        .map(|l| l.record.cgroups.clone())
                        .unwrap_or_default(),
                };
                Some(Counted::Memory(cgroups))
            }
            AgentRequest::SendImages { .. } | AgentRequest::AwaitPages { .. } => {
                Some(Counted::Nothing)
            }
            _ => None,
        }
    }

    /// Puts an instance's port (if attached) on hold, or takes it off.
    pub(crate) async fn hold(&self, port: Option<PortId>, held: bool) {
        if let Some(port) = port {
            self.dataplane.hold(port, held).await;
        }
    }

    /// Restores a dumped tree: into a prepared space (migration destination), or back into
    /// its own space (a source whose migration failed).
    pub(crate) async fn restore(
        self: Arc<Self>,
        id: &str,
        tcp_close: bool,
    ) -> Result<AgentReply, AgentError> {
        let dir = self.instance_dir(id);
        let prepared = self.state().migrations.prepared.remove(id);
        if let Some(prepared) = prepared {
            let checkpoint::Prepared {
                tun,
                mut record,
                helper,
            } = prepared;
            let key = record.space_key().to_string();
            let dir2 = dir.clone();
            let exe = self.cfg.exe.clone();
            let started = std::time::Instant::now();
            // The images of a lazy dump came with a link to its page server: CRIU's
            // lazy-pages daemon reaches it through a socket pair relayed over the link.
            let link = self.state().migrations.page_links.remove(id);
            // Unconfirmed until a view places the instance here (see `Agent::adopt`).
            let _ = std::fs::write(dir.join(checkpoint::ARRIVED_FILE), b"");
            let pages = match link {
                Some(link) => Some(relay_pages(id, link)?),
                None => None,
            };
            let restored = tokio::task::spawn_blocking(move || {
                // Images straight from the source were unpacked as they came.
                if dir2.join(checkpoint::PACK_FILE).exists() {
                    checkpoint::unpack(&dir2, record.confinement().idmap)?;
                }
                let unpacked = started.elapsed();
                // The resolver's address, taken before the tree runs again.
                let dns = crate::dns::bind(&record.netns).map_err(|e| e.to_string())?;
                checkpoint::restore(&dir2, &exe, &mut record, tcp_close, pages, helper)?;
                tracing::debug!(
                    unpack_ms = unpacked.as_millis() as u64,
                    criu_ms = (started.elapsed() - unpacked).as_millis() as u64,
                    "restored"
                );
                Ok::<_, String>((record, dns))
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r);
            let (record, dns) = match restored {
                Ok(r) => r,
                Err(e) => {
                    drop(tun);
                    let layout = self.layout.clone();
                    let _ = tokio::task::spawn_blocking(move || {
                        instance::teardown(&dir, &key, &layout)
                    })
                    .await;
                    return Err(e.into());
                }
            };
            vane_proto::test_die_at("agent-restored");
            let pid = record.pid;
            let spec = record.spec.clone();
            let init = record.init_pid;
            if let Err(e) = self.adopt(record, dir.clone(), tun, Some(dns)).await {
                // Not reachable here: end it, so that it does not run twice once the source
                // resumes it.
                let _ = kill(Pid::from_raw(init as i32), Signal::SIGKILL);
                self.state().instances.remove(id);
                let layout = self.layout.clone();
                let _ =
                    tokio::task::spawn_blocking(move || instance::teardown(&dir, &key, &layout))
                        .await;
                return Err(e.into());
            }
            {
                let mut state = self.state();
                let (rules, hosts) = (state.rules_for(&spec.net), state.hosts_for(&spec));
                if let Some(local) = state.instances.get_mut(id) {
                    local.rules = Some(rules);
                    local.hosts = Some(hosts);
                }
            }
            tracing::info!(
                instance = %spec.name, ip = %spec.ip, pid,
                ms = started.elapsed().as_millis() as u64,
                "instance restored"
            );
            return Ok(AgentReply::Created { pid });
        }
        // Back on the source, from a lazy dump: the tree never stopped being there.
        if let Some(resumed) = self.resume_lazy(id).await {
            resumed?;
            let resumed = self.state().instances.get_mut(id).map(|local| {
                local.state = InstanceState::Running;
                (local.port, local.record.pid)
            });
            let (port, pid) = resumed.unwrap_or((None, 0));
            self.hold(port, false).await;
            self.set_dumped(id, false);
            tracing::info!(instance = %id, pid, "instance resumed after a failed migration");
            return Ok(AgentReply::Created { pid });
        }
        // Back on the source: same namespace, same port.
        let mut record = self
            .state()
            .instances
            .get(id)
            .map(|l| l.record.clone())
            .ok_or_else(|| AgentError::not_found(format!("instance {id} is not on this host")))?;
        let dir2 = dir.clone();
        let exe = self.cfg.exe.clone();
        let record = tokio::task::spawn_blocking(move || {
            checkpoint::restore(&dir2, &exe, &mut record, tcp_close, None, None).map(|_| record)
        })
        .await
        .map_err(|e| e.to_string())??;
        let pidfd = vane_sys::pidfd::open(record.init_pid).map_err(|e| e.to_string())?;
        let pid = record.pid;
        let port = self.state().instances.get_mut(id).and_then(|local| {
            local.record = record;
            local.state = InstanceState::Running;
            local.port
        });
        self.hold(port, false).await;
        self.set_dumped(id, false);
        let agent = self.clone();
        let id2 = id.to_string();
        tokio::spawn(async move { agent.watch_exit(id2, pidfd).await });
        tracing::info!(instance = %id, pid, "instance resumed after a failed migration");
        Ok(AgentReply::Created { pid })
    }
}
