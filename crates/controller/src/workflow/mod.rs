//! The controller's workflows: what takes several steps on agents (run, migrate,
//! snapshot, restore, failover and restarts), apart from HTTP. Each step is a request to an agent (`AgentLink`)
//! and a commit of what it changed; each failure says what it leaves behind. Tested
//! in-process against scripted agents (`tests`, `snapshot_tests`), and for real on labs.

mod checkpoints;
mod failover;
#[cfg(test)]
mod failover_tests;
mod migrate;
mod run;
mod snapshot;
#[cfg(test)]
mod snapshot_tests;
#[cfg(test)]
mod tests;

pub(crate) use checkpoints::keep as keep_checkpoints;
pub(crate) use failover::{schedule_restart, watch_silence};
pub(crate) use migrate::{migrate, POST_COPY_LIMIT};
pub(crate) use run::{create, remove, start_instance, stop_on};
pub(crate) use snapshot::{restore, snapshot, FrameReader};

use std::sync::Arc;

use vane_proto::api::InstanceState;
use vane_proto::stream::{AgentReply, AgentRequest};

use crate::state::ApiError;
use crate::Controller;

pub(crate) type ApiResult<T> = Result<T, ApiError>;

/// Records that instance `id` runs nowhere any more.
pub(crate) fn record_lost(c: &Controller, id: &str) -> ApiResult<()> {
    c.change_instance(id, |inst| {
        inst.state = InstanceState::Lost;
        inst.pid = None;
    })?;
    Ok(())
}

/// A failure of `host`'s agent, as the API answers it.
pub(crate) fn on_host(host: &str, e: ApiError) -> ApiError {
    ApiError::Unavailable(format!("host {host:?}: {e}"))
}

/// An instance's images taken by one workflow (a migration, a snapshot) until it ends:
/// both dump into and send from the same pack on the instance's host, so a second one
/// would overwrite the first's images under it. Released when dropped.
pub(crate) struct Claim {
    c: Arc<Controller>,
    id: String,
}

impl Claim {
    /// Takes instance `id` (`name` to the user) for `doing` (`"moving to host \"h2\""`,
    /// `"being snapshotted"`), or says what already has it.
    pub(crate) fn take(
        c: &Arc<Controller>,
        id: &str,
        name: &str,
        doing: String,
    ) -> ApiResult<Claim> {
        let mut claims = c.claims.lock().expect("claims lock poisoned");
        if let Some(other) = claims.get(id) {
            return Err(ApiError::Conflict(format!(
                "instance {name:?} is {other}; try again once it is done"
            )));
        }
        claims.insert(id.to_string(), doing);
        Ok(Claim {
            c: c.clone(),
            id: id.to_string(),
        })
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.c
            .claims
            .lock()
            .expect("claims lock poisoned")
            .remove(&self.id);
    }
}

/// Marks instance `id` as moving to a host (`vane ps` shows it), or no longer.
pub(crate) fn set_migrating(c: &Controller, id: &str, to: Option<String>) -> ApiResult<()> {
    c.change_instance(id, |inst| inst.migrating = to)?;
    Ok(())
}

/// Asks `host` to move transfer `ticket`; once it answers, the ticket goes, so that a
/// transfer its agent never claimed ends for the other side too.
pub(crate) async fn agent_transfer_request(
    c: &Controller,
    host: &str,
    ticket: &str,
    request: AgentRequest,
    within: std::time::Duration,
) -> ApiResult<AgentReply> {
    let answer = c.agents.request_within(host, request, within).await;
    c.transfers.cancel(ticket);
    answer
}

/// The id and host of instance `name`.
pub(crate) fn locate(c: &Controller, name: &str) -> ApiResult<(String, String)> {
    let s = c.state();
    let inst = s.instance_by_name(name)?;
    Ok((inst.id.clone(), inst.host.clone()))
}

/// The id and host of instance `name`, which must not be moving between hosts.
pub(crate) fn settled(c: &Controller, name: &str) -> ApiResult<(String, String)> {
    let s = c.state();
    let inst = s.instance_by_name(name)?;
    if let Some(to) = &inst.migrating {
        return Err(ApiError::Conflict(format!(
            "instance {name:?} is moving to host {to:?}; try again once it has"
        )));
    }
    Ok((inst.id.clone(), inst.host.clone()))
}

/// The id and host of instance `name`, which must be running.
pub(crate) fn running_instance(c: &Controller, name: &str) -> ApiResult<(String, String)> {
    let s = c.state();
    let inst = s.instance_by_name(name)?;
    must_run(inst)?;
    Ok((inst.id.clone(), inst.host.clone()))
}

/// Refuses what needs a running instance when `inst` is not.
pub(crate) fn must_run(inst: &vane_proto::api::Instance) -> ApiResult<()> {
    if inst.state != InstanceState::Running {
        return Err(ApiError::Conflict(format!(
            "instance {:?} is not running ({})",
            inst.name,
            inst.state.as_str()
        )));
    }
    Ok(())
}
