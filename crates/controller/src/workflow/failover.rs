//! Restart policies carried out: a host silent past the grace period is declared dead and
//! its instances start again on other hosts (`declare_dead`); an ended program starts
//! again on its host after a backoff (`schedule_restart`). The decisions are the model's
//! (`state/failover.rs`); here are the waits and the requests to agents.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vane_proto::api::InstanceState;
use vane_proto::stream::{AgentReply, AgentRequest};

use crate::state::Restart;
use crate::{now, Controller};

/// Watches host `host`, silent since the end of its control stream of `epoch` (0: since
/// the controller started): once `wait` has passed, if it has not come back meanwhile, it
/// is declared dead.
pub(crate) fn watch_silence(c: &Arc<Controller>, host: &str, epoch: u64, wait: Duration) {
    c.silent_since
        .lock()
        .expect("silence lock")
        .insert(host.to_string(), epoch);
    let (c, host) = (c.clone(), host.to_string());
    tokio::spawn(async move {
        tokio::time::sleep(wait).await;
        let still = c.silent_since.lock().expect("silence lock").get(&host) == Some(&epoch);
        if still && !c.streams.is_connected(&host) {
            declare_dead(&c, &host).await;
        }
    });
}

/// Declares `host` dead (`State::declare_dead`): commits it, pushes the views (the host
/// leaves its peers' views, its instances' members point to their new hosts), then has
/// each new host start its instances, all at once.
pub(crate) async fn declare_dead(c: &Arc<Controller>, host: &str) {
    let restarts = {
        let mut s = c.state();
        let Some((batch, restarts)) = s.declare_dead(host, now()) else {
            return;
        };
        if let Err(e) = c.commit(batch) {
            tracing::error!(host, "cannot record the host dead: {e}");
            return;
        }
        restarts
    };
    tracing::warn!(
        host,
        restarting = restarts.len(),
        "host silent past its grace period: declared dead"
    );
    c.push_views();
    let starts = restarts.into_iter().map(|r| {
        let c = c.clone();
        let reason = format!("host {host} died");
        tokio::spawn(async move { start(&c, r, &reason, InstanceState::Lost).await })
    });
    futures_util::future::join_all(starts).await;
}

/// Has `r.host` start instance `r.id` again, and settles the record: running, or
/// `failed` if it could not. From its kept checkpoint when its host died and it has one
/// (fresh if that restore fails), fresh otherwise.
async fn start(c: &Arc<Controller>, r: Restart, reason: &str, failed: InstanceState) {
    let restored = match failed {
        InstanceState::Lost => super::checkpoints::restore(c, &r).await,
        _ => None,
    };
    let reply = match restored {
        Some(Ok(pid)) => {
            tracing::info!(instance = %r.spec.name, host = %r.host, "restored from its checkpoint");
            let _ = c.change_instance(&r.id, |i| {
                i.restart_reason = Some(format!("{reason}, restored from its checkpoint"));
            });
            Ok(AgentReply::Created { pid })
        }
        other => {
            if let Some(Err(e)) = other {
                tracing::warn!(instance = %r.spec.name, host = %r.host, "cannot restore from its checkpoint, starting afresh: {e}");
            }
            c.agents
                .request(
                    &r.host,
                    AgentRequest::Create {
                        instance: Box::new(r.spec.clone()),
                    },
                )
                .await
        }
    };
    let pid = match reply {
        Ok(AgentReply::Created { pid }) => Ok(Some(pid)),
        Ok(_) => Ok(None),
        Err(e) => {
            tracing::warn!(instance = %r.spec.name, host = %r.host, "cannot start again ({reason}): {e}");
            Err(failed)
        }
    };
    if pid.is_ok() {
        tracing::info!(instance = %r.spec.name, host = %r.host, "started again ({reason})");
        c.backoff
            .lock()
            .expect("backoff lock")
            .entry(r.id.clone())
            .or_default()
            .started(Instant::now());
    }
    let failed_here = pid.is_err() && failed == InstanceState::Exited;
    {
        let mut s = c.state();
        if let Some(batch) = s.end_restart(&r.id, &r.host, pid) {
            if let Err(e) = c.commit(batch) {
                tracing::error!(instance = %r.spec.name, "cannot record its start: {e}");
            }
        }
    }
    c.push_views();
    // A host that could not start it again tries again, later.
    if failed_here {
        schedule_restart(c, &r.id);
    }
}

/// Instance `id` ended on its host: if its restart policy says so, it starts again there
/// after its backoff (1 s, doubling to 30 s, reset after 10 s of running), unless it was
/// stopped, removed or moved meanwhile.
pub(crate) fn schedule_restart(c: &Arc<Controller>, id: &str) {
    let host = {
        let s = c.state();
        let Some(host) = s.instances.get(id).map(|i| i.host.clone()) else {
            return;
        };
        if !s.restart_wanted(id, &host) {
            return;
        }
        host
    };
    let delay = c
        .backoff
        .lock()
        .expect("backoff lock")
        .entry(id.to_string())
        .or_default()
        .next(Instant::now());
    let (c, id) = (c.clone(), id.to_string());
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let begun = {
            let mut s = c.state();
            match s.begin_restart(&id, &host) {
                Some((batch, r)) => match c.commit(batch) {
                    Ok(()) => Some(r),
                    Err(e) => {
                        tracing::error!(instance = %id, "cannot record its restart: {e}");
                        None
                    }
                },
                None => None,
            }
        };
        let Some(r) = begun else { return };
        super::checkpoints::forget(&c, &id);
        let reason = c
            .state()
            .instances
            .get(&id)
            .and_then(|i| i.restart_reason.clone())
            .unwrap_or_default();
        // What is left of the ended copy (its namespace, address, cgroups) goes first.
        if let Err(e) = c
            .agents
            .request(&host, AgentRequest::Remove { id: id.clone() })
            .await
        {
            tracing::warn!(instance = %id, %host, "cannot clear the ended copy: {e}");
        }
        start(&c, r, &reason, InstanceState::Exited).await;
    });
}
