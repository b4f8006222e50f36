//! Running an instance: planned, created on its host, settled as running or forgotten;
//! stopping and removing it.

use std::sync::Arc;

use vane_proto::api::{Instance, InstanceState, RunSpec};
use vane_proto::stream::{AgentReply, AgentRequest};

use super::{settled, ApiResult};
use crate::state::ApiError;
use crate::{now, Controller};

pub(crate) fn new_instance_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Plans an instance from `run` (recorded as creating), has `start` set it up on its host,
/// and settles the record: running with the pid `start` returns, or forgotten if it failed
/// (the host has cleaned up its side: nothing half-made). The host gets the net's policies
/// and members before `start`, so the instance starts with its rules in place.
pub(crate) async fn start_instance<F, Fut>(
    c: &Controller,
    run: RunSpec,
    request: Option<String>,
    start: F,
) -> ApiResult<Instance>
where
    F: FnOnce(vane_proto::stream::InstanceSpec, String) -> Fut,
    Fut: std::future::Future<Output = ApiResult<Option<u32>>>,
{
    let (spec, host) = {
        let mut s = c.state();
        let (spec, mut batch) = s.plan_instance(run, new_instance_id(), now())?;
        if let Some(planned) = s.instances.get_mut(&spec.id).filter(|_| request.is_some()) {
            planned.request = request;
            batch.put(&*planned);
        }
        c.commit(batch)?;
        let host = s.instances[&spec.id].host.clone();
        (spec, host)
    };
    let id = spec.id.clone();
    c.push_views();
    let result = start(spec, host).await;
    let answer = match result {
        Ok(pid) => c
            .change_instance(&id, |inst| {
                // A report that the program already exited may have overtaken us.
                if inst.state == InstanceState::Creating {
                    inst.state = InstanceState::Running;
                    if pid.is_some() {
                        inst.pid = pid;
                    }
                }
            })?
            .ok_or_else(|| ApiError::Internal("instance vanished while starting".into())),
        Err(e) => {
            let mut s = c.state();
            let batch = s.drop_instance(&id);
            c.commit(batch)?;
            Err(e)
        }
    };
    c.push_views();
    answer
}

/// Stops instance `id` on `host` (SIGTERM, SIGKILL after 10 s) and pushes the views. Its
/// restart policy does not start it again.
pub(crate) async fn stop_on(c: &Controller, host: &str, id: &str) -> ApiResult<()> {
    let changed = c.change_instance(id, |inst| inst.stopped = true)?;
    if changed.is_some_and(|i| i.service.is_some()) {
        // A stopped member takes no new flows: every switch that may choose it knows
        // before its program ends.
        c.drain(id).await;
    }
    c.agents
        .request(
            host,
            AgentRequest::Stop {
                id: id.to_string(),
                timeout_secs: 10,
            },
        )
        .await?;
    c.push_views();
    Ok(())
}

/// Runs a new instance from `run` on its host (`start_instance`), as a task of its own: a
/// client that goes away must not leave the record `creating` while its host starts it.
/// A `request` key seen before answers with the instance that request made.
pub(crate) async fn create(
    c: &Arc<Controller>,
    run: RunSpec,
    request: Option<String>,
) -> ApiResult<Instance> {
    if let Some(key) = &request {
        if let Some(made) = made_by(c, key, &run.net).await? {
            return Ok(made);
        }
    }
    let c = c.clone();
    tokio::spawn(async move { create_to_end(&c, run, request).await })
        .await
        .map_err(|e| ApiError::Internal(format!("the run's task ended: {e}")))?
}

/// How long a repeated run waits for the instance its first sending made to settle.
const REPEAT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

/// The instance that the request of key `key` made in net `net` (which the caller may use:
/// a key alone shows no one another tenant's instance), once it has settled (its host
/// reconnected and said where it stands). None if there is none, or if it never started
/// (lost: its record goes, and the run is made anew).
async fn made_by(c: &Controller, key: &str, net: &str) -> ApiResult<Option<Instance>> {
    let deadline = tokio::time::Instant::now() + REPEAT_PATIENCE;
    loop {
        {
            let mut s = c.state();
            let made = s
                .instances
                .values()
                .find(|i| i.request.as_deref() == Some(key) && i.net == net)
                .cloned();
            match made {
                None => return Ok(None),
                Some(i) if i.state == InstanceState::Lost => {
                    let batch = s.drop_instance(&i.id);
                    c.commit(batch)?;
                    drop(s);
                    c.push_views();
                    return Ok(None);
                }
                Some(i) if i.state != InstanceState::Creating => return Ok(Some(i)),
                Some(i) if tokio::time::Instant::now() >= deadline => {
                    return Err(ApiError::Unavailable(format!(
                        "instance {:?} of this request is still being created on host {:?}",
                        i.name, i.host
                    )))
                }
                Some(_) => {}
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

async fn create_to_end(
    c: &Controller,
    run: RunSpec,
    request: Option<String>,
) -> ApiResult<Instance> {
    start_instance(c, run, request, |spec, host| async move {
        let reply = c
            .agents
            .request(
                &host,
                AgentRequest::Create {
                    instance: Box::new(spec),
                },
            )
            .await?;
        Ok(match reply {
            AgentReply::Created { pid } => Some(pid),
            _ => None,
        })
    })
    .await
}

/// Removes instance `name` from its host, then from the directory. With its host offline
/// only when `force`d (the host removes its copy when it comes back: it is not its own).
pub(crate) async fn remove(c: &Controller, name: &str, force: bool) -> ApiResult<()> {
    let (id, host) = settled(c, name)?;
    // Its program ends now on purpose: no restart policy starts it again.
    c.change_instance(&id, |inst| inst.stopped = true)?;
    c.backoff.lock().expect("backoff lock").remove(&id);
    if c.agents.is_connected(&host) {
        match c
            .agents
            .request(&host, AgentRequest::Remove { id: id.clone() })
            .await
        {
            // Its host has no copy any more (a removal whose controller died before it
            // recorded it): what the removal wants is done there.
            Ok(_) | Err(ApiError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
    } else if !force {
        return Err(ApiError::Unavailable(format!(
            "host {host:?} of instance {name:?} is offline (--force forgets the instance anyway)"
        )));
    }
    {
        let mut s = c.state();
        let batch = s.drop_instance(&id);
        c.commit(batch)?;
    }
    super::checkpoints::forget(c, &id);
    c.push_views();
    Ok(())
}
