//! Migrations a controller did not finish because it stopped (crashed, was killed, lost its
//! machine) are finished by the next one: afterwards the instance runs on exactly one of
//! its two hosts, the directory points there, and the other host keeps nothing of it.
//!
//! The store keeps `migrating` (the destination) for as long as a migration lasts, so a
//! controller that starts knows which instances were moving and between which hosts. Once
//! both hosts' agents are connected it asks the destination to `resume` the instance: the
//! agent waits for any step of the migration still under way there, and answers with the
//! instance's pid only if its restore finished. Then the destination's copy is the one: the
//! source ends its dump (a lazy one once every page is through) and removes what it had.
//! Otherwise the destination forgets its prepared space and the source resumes the
//! instance, from its frozen tree, its lazy dump or its images, whichever it has.

use std::sync::Arc;
use std::time::Duration;

use vane_proto::api::InstanceState;
use vane_proto::stream::{AgentReply, AgentRequest};

use crate::Controller;

/// How often a recovery looks whether both hosts' agents are back.
const POLL: Duration = Duration::from_millis(200);

/// Starts finishing every migration the store says was under way.
pub(crate) fn finish_interrupted(c: &Arc<Controller>) {
    let interrupted: Vec<(String, String, String)> = c
        .state()
        .instances
        .values()
        .filter_map(|i| Some((i.id.clone(), i.host.clone(), i.migrating.clone()?)))
        .collect();
    for (id, from, to) in interrupted {
        tracing::warn!(instance = %id, %from, %to, "finishing a migration interrupted by a restart");
        tokio::spawn(finish(c.clone(), id, from, to));
    }
}

async fn finish(c: Arc<Controller>, id: String, from: String, to: String) {
    while !(c.agents.is_connected(&from) && c.agents.is_connected(&to)) {
        tokio::time::sleep(POLL).await;
    }
    let resume = AgentRequest::Resume { id: id.clone() };
    let (host, pid) = match c.agents.request(&to, resume.clone()).await {
        Ok(AgentReply::Created { pid }) => {
            // The destination's restore finished: its copy is the one.
            let _ = c
                .agents
                .request_within(
                    &from,
                    AgentRequest::AwaitPages { id: id.clone() },
                    crate::workflow::POST_COPY_LIMIT,
                )
                .await;
            if let Err(e) = c
                .agents
                .request(&from, AgentRequest::Remove { id: id.clone() })
                .await
            {
                tracing::warn!(instance = %id, host = %from, "cleaning up after a migration: {e}");
            }
            (to.clone(), Some(pid))
        }
        _ => {
            let _ = c
                .agents
                .request(&to, AgentRequest::Discard { id: id.clone() })
                .await;
            match c.agents.request(&from, resume).await {
                Ok(AgentReply::Created { pid }) => (from.clone(), Some(pid)),
                other => {
                    tracing::error!(instance = %id, host = %from, "the instance could not be resumed: {other:?}");
                    (from.clone(), None)
                }
            }
        }
    };
    let finished = c.change_instance(&id, |inst| {
        inst.migrating = None;
        inst.host = host.clone();
        inst.pid = pid;
        if pid.is_none() {
            inst.state = InstanceState::Lost;
        }
    });
    if let Err(e) = finished {
        tracing::error!(instance = %id, "cannot record a finished migration: {e}");
    }
    c.push_views();
    tracing::info!(instance = %id, %host, "interrupted migration finished");
}
