//! Live migration (docs/api.md): prepare the destination, dump on the source, move the
//! images host to host, restore, flip the directory, release the source. A failed
//! restore resumes the instance on its source; a post-copy whose memory cannot all follow
//! loses it (and says so).

use std::sync::Arc;

use vane_proto::api::{HostState, Instance, MigrateSpec, Migration};
use vane_proto::stream::{AgentReply, AgentRequest};

use super::{
    agent_transfer_request, must_run, on_host, record_lost, set_migrating, ApiResult, Claim,
};
use crate::state::ApiError;
use crate::{now, transfers, Controller};

/// Moves instance `name` to host `spec.to` (see the module's docs and docs/migration.md);
/// answers with its record once it runs there, or says what the failure left.
///
/// The migration runs as a task of its own: a client that goes away (the HTTP server then
/// drops its request's future) must not cut it off between steps, with the instance
/// dumped and restored nowhere.
pub(crate) async fn migrate(
    c: &Arc<Controller>,
    name: &str,
    spec: MigrateSpec,
) -> ApiResult<Instance> {
    let (c, name) = (c.clone(), name.to_string());
    tokio::spawn(async move { migrate_to_end(&c, &name, spec).await })
        .await
        .map_err(|e| ApiError::Internal(format!("the migration's task ended: {e}")))?
}

async fn migrate_to_end(c: &Arc<Controller>, name: &str, spec: MigrateSpec) -> ApiResult<Instance> {
    let (to, post_copy) = (spec.to, spec.post_copy);
    let (id, from, inst_spec) = {
        let s = c.state();
        let inst = s.instance_by_name(name)?;
        must_run(inst)?;
        let host = s
            .hosts
            .get(&to)
            .ok_or_else(|| ApiError::NotFound(format!("unknown host {to:?}")))?;
        if host.state != HostState::Online || !c.agents.is_connected(&to) {
            return Err(ApiError::Unavailable(format!("host {to:?} is offline")));
        }
        if inst.host == to {
            return Err(ApiError::BadRequest(format!(
                "instance {name:?} already runs on host {to:?}"
            )));
        }
        if let Some(other) = &inst.migrating {
            return Err(ApiError::Conflict(format!(
                "instance {name:?} is already moving to host {other:?}"
            )));
        }
        if let Some(why) = s.publish_clash(&to, &inst.publish, Some(&inst.id)) {
            return Err(ApiError::Conflict(why));
        }
        (inst.id.clone(), inst.host.clone(), s.instance_spec(inst)?)
    };
    if !c.agents.is_connected(&from) {
        return Err(ApiError::Unavailable(format!(
            "host {from:?} of instance {name:?} is offline"
        )));
    }
    let _claim = Claim::take(c, &id, name, format!("moving to host {to:?}"))?;
    set_migrating(c, &id, Some(to.clone()))?;
    // Counted from here: what was refused before is no migration.
    c.metrics.migration_started();
    let result: ApiResult<Instance> = async {
        // Before anything is frozen: the destination checks its CRIU and makes the space.
        c.agents
            .request(
                &to,
                AgentRequest::Prepare {
                    instance: Box::new(inst_spec),
                },
            )
            .await
            .map_err(|e| on_host(&to, e))?;
        crate::die_at("prepared");
        let discard = |c: Arc<Controller>, id: String, to: String| async move {
            let _ = c.agents.request(&to, AgentRequest::Discard { id }).await;
        };
        // Post-copy where the images can go host to host: the memory follows on the same
        // link after the freeze.
        let direct = direct_path(c, &from, &to).is_some();
        let lazy = post_copy && direct;
        // From here senders hold what they send to it, until it runs again (wherever).
        let frozen = std::time::Instant::now();
        let _thawed = Thawed(c, &id);
        c.freeze(&id, &to).await;
        let held = frozen.elapsed();
        c.set_progress(&id, Some(("dump", 0)));
        let (bytes, lazy) = match c
            .agents
            .request_watched(
                &from,
                AgentRequest::Checkpoint {
                    id: id.clone(),
                    leave_running: false,
                    lazy,
                    // Host to host, the images are packed as they go.
                    stream: direct,
                },
                crate::agents::REQUEST_TIMEOUT,
                &|b| c.set_progress(&id, Some(("dump", b))),
            )
            .await
        {
            Ok(AgentReply::Checkpointed { bytes, lazy }) => (bytes, lazy),
            Ok(other) => {
                discard(c.clone(), id.clone(), to.clone()).await;
                return Err(ApiError::Internal(format!(
                    "unexpected answer from host {from:?}: {other:?}"
                )));
            }
            Err(e) => {
                // A failed dump leaves the instance running where it was.
                discard(c.clone(), id.clone(), to.clone()).await;
                return Err(on_host(&from, e));
            }
        };
        let dumped = frozen.elapsed();
        crate::die_at("dumped");
        c.set_progress(&id, Some(("transfer", 0)));
        let moved = move_images(c, &from, &to, &id, bytes, lazy).await;
        let transferred = frozen.elapsed();
        if moved.is_ok() {
            crate::die_at("transferred");
        }
        c.set_progress(&id, Some(("restore", 0)));
        let restored = match moved {
            Ok(()) => c
                .agents
                .request(
                    &to,
                    AgentRequest::Restore {
                        id: id.clone(),
                        tcp_close: false,
                    },
                )
                .await
                .map_err(|e| on_host(&to, e)),
            Err(e) => Err(e),
        };
        let restored_at = frozen.elapsed();
        let pid = match restored {
            Ok(AgentReply::Created { pid }) => pid,
            Ok(other) => {
                return Err(ApiError::Internal(format!(
                    "unexpected answer from host {to:?}: {other:?}"
                )))
            }
            Err(e) => {
                discard(c.clone(), id.clone(), to.clone()).await;
                let resumed = c
                    .agents
                    .request(
                        &from,
                        AgentRequest::Restore {
                            id: id.clone(),
                            tcp_close: false,
                        },
                    )
                    .await;
                return Err(match resumed {
                    Ok(reply) => {
                        if let AgentReply::Created { pid } = reply {
                            c.change_instance(&id, |inst| inst.pid = Some(pid))?;
                        }
                        ApiError::Conflict(format!(
                            "migration of instance {name:?} to host {to:?} failed, it runs on host {from:?} again: {e}"
                        ))
                    }
                    // A post-copy source whose memory had all gone: the destination's copy
                    // is whole, unless the destination removed it on its own failure. It
                    // is still there if the destination's agent says it runs, or stopped
                    // before answering (it takes the copy back when it returns; what it
                    // then reports settles it): the directory places the instance there.
                    Err(ApiError::Moved(why))
                        if !c.agents.is_connected(&to)
                            || c
                                .agents
                                .request(&to, AgentRequest::Stats { id: id.clone() })
                                .await
                                .is_ok() =>
                    {
                        c.change_instance(&id, |inst| {
                            inst.host = to.clone();
                            inst.pid = None;
                        })?;
                        c.push_views();
                        ApiError::Conflict(format!(
                            "migration of instance {name:?} to host {to:?} was cut off ({e}) after {why}: it runs on host {to:?}"
                        ))
                    }
                    Err(e2) => {
                        // Nowhere running: say so, rather than keep it `running`.
                        record_lost(c, &id)?;
                        ApiError::Internal(format!(
                            "migration of instance {name:?} to host {to:?} failed ({e}), and resuming it on host {from:?} failed too: {e2}"
                        ))
                    }
                });
            }
        };
        crate::die_at("restored");
        // The directory now sends to the destination (once it has taken its view), and the
        // lookups held during the freeze are answered with it; the source's switch, whose
        // view says the same, forwards what its own instances still send there.
        c.change_instance(&id, |inst| {
            inst.host = to.clone();
            inst.pid = Some(pid);
        })?;
        c.thaw(&id).await;
        let switched = frozen.elapsed();
        if lazy {
            c.set_progress(&id, Some(("pages", 0)));
        }
        let ms = |d: std::time::Duration| d.as_millis() as u64;
        // Differences of whole milliseconds, so that the phases add up to the freeze.
        let phases = vane_proto::api::Phases {
            hold_ms: ms(held),
            dump_ms: ms(dumped) - ms(held),
            transfer_ms: ms(transferred) - ms(dumped),
            restore_ms: ms(restored_at) - ms(transferred),
            switch_ms: ms(switched) - ms(restored_at),
        };
        let freeze_ms = ms(switched);
        tracing::info!(
            instance = %name, %from, %to, freeze_ms, image_bytes = bytes, ?phases, lazy,
            "migrated"
        );
        // Post-copy: the instance runs on the destination, its memory still coming from the
        // source, which is released once the last page is through.
        let post_copy_ms = if lazy {
            let served = c
                .agents
                .request_within(
                    &from,
                    AgentRequest::AwaitPages { id: id.clone() },
                    POST_COPY_LIMIT,
                )
                .await;
            if let Err(e) = served {
                // The destination's copy is missing memory: it must not run on.
                let _ = c
                    .agents
                    .request(&to, AgentRequest::Remove { id: id.clone() })
                    .await;
                record_lost(c, &id)?;
                c.push_views();
                return Err(ApiError::Internal(format!(
                    "instance {name:?} was lost: its memory could not all be moved from host {from:?} after it resumed on host {to:?} ({e})"
                )));
            }
            Some(ms(frozen.elapsed()) - freeze_ms)
        } else {
            None
        };
        if let Err(e) = c
            .agents
            .request(&from, AgentRequest::Remove { id: id.clone() })
            .await
        {
            tracing::warn!(instance = %name, host = %from, "cleaning up after migration: {e}");
        }
        let migration = Migration {
            from,
            to,
            at: now(),
            freeze_ms,
            image_bytes: bytes,
            phases,
            post_copy_ms,
        };
        c.metrics.migration_done(freeze_ms, &phases);
        c.change_instance(&id, |inst| inst.migrations.push(migration))?
            .ok_or_else(|| ApiError::NotFound(format!("unknown instance {name:?}")))
    }
    .await;
    c.set_progress(&id, None);
    if result.is_err() {
        c.metrics.migration_failed();
    }
    set_migrating(c, &id, None)?;
    let inst = c.state().instances.get(&id).cloned();
    match (result, inst) {
        (Ok(_), Some(inst)) => Ok(inst),
        (Ok(moved), None) => Ok(moved),
        (Err(e), _) => Err(e),
    }
}

/// How long a post-copy migration's source may take to serve the last page after the
/// freeze: the agents break a link off after 30 s without progress, so this only bounds a
/// transfer that keeps moving.
pub(crate) const POST_COPY_LIMIT: std::time::Duration = std::time::Duration::from_secs(3600);

/// The source's key and the destination's address and key, when the images of a migration
/// can go straight from one host to the other.
fn direct_path(
    c: &Controller,
    from: &str,
    to: &str,
) -> Option<(String, vane_proto::stream::DirectPeer)> {
    let s = c.state();
    let (src, dst) = (s.hosts.get(from), s.hosts.get(to));
    Some((
        src?.public_key.clone()?,
        vane_proto::stream::DirectPeer {
            locator: dst?.locator?,
            public_key: dst?.public_key.clone()?,
        },
    ))
}

/// Streams the packed images of instance `id` (`bytes` long) from host `from` to host `to`:
/// straight from agent to agent when the controller knows where the destination's switch
/// is and both hosts' keys, else through the controller (`pages`: and keeps the link for
/// the memory of a lazy dump, which needs the direct path).
async fn move_images(
    c: &Controller,
    from: &str,
    to: &str,
    id: &str,
    bytes: u64,
    pages: bool,
) -> ApiResult<()> {
    let direct = direct_path(c, from, to);
    if let Some((sender, peer)) = direct {
        let ticket = crate::enroll::new_secret("vanexfer-");
        let within = transfers::answer_within(bytes);
        let watch = |b| c.set_progress(id, Some(("transfer", b)));
        let receive = c.agents.request_watched(
            to,
            AgentRequest::ReceiveImages {
                id: id.to_string(),
                ticket: ticket.clone(),
                bytes,
                from: Some(sender),
                pages,
            },
            within,
            &watch,
        );
        let send = c.agents.request_within(
            from,
            AgentRequest::SendImages {
                id: id.to_string(),
                ticket,
                to: Some(peer),
            },
            within,
        );
        tokio::pin!(receive, send);
        // Whichever fails first says why, at once: a source that cannot reach the
        // destination does not wait for the destination to give up waiting.
        tokio::select! {
            sent = &mut send => {
                sent.map_err(|e| on_host(from, e))?;
                receive.await.map_err(|e| on_host(to, e))?;
            }
            received = &mut receive => {
                received.map_err(|e| on_host(to, e))?;
                send.await.map_err(|e| on_host(from, e))?;
            }
        }
        return Ok(());
    }
    let (up, rx) = c.transfers.sent_by(from);
    let (down, tx) = c.transfers.sent_to(to);
    let within = transfers::answer_within(bytes);
    let send = agent_transfer_request(
        c,
        from,
        &up,
        AgentRequest::SendImages {
            id: id.to_string(),
            ticket: up.clone(),
            to: None,
        },
        within,
    );
    let receive = agent_transfer_request(
        c,
        to,
        &down,
        AgentRequest::ReceiveImages {
            id: id.to_string(),
            ticket: down.clone(),
            bytes,
            from: None,
            pages: false,
        },
        within,
    );
    let (sent, received, piped) = tokio::join!(send, receive, transfers::pipe(rx, tx));
    sent.map_err(|e| on_host(from, e))?;
    received.map_err(|e| on_host(to, e))?;
    let piped = piped?;
    if piped != bytes {
        return Err(ApiError::Internal(format!(
            "host {from:?} sent {piped} bytes of images, not the {bytes} it dumped"
        )));
    }
    Ok(())
}

/// Ends an instance's freeze when its migration ends, however it ends
/// (`Controller::thaw_now`; nothing left to do where `Controller::thaw` did it).
struct Thawed<'a>(&'a Controller, &'a str);

impl Drop for Thawed<'_> {
    fn drop(&mut self) {
        self.0.thaw_now(self.1);
    }
}
