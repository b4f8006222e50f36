//! Handlers of instances: listing, inspecting, and the workflows (`crate::workflow`)
//! that run, stop, move, snapshot, restore and remove them; exec, logs and stats streams.

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State as AxState};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use vane_proto::api::{ExecSpec, Instance, InstanceStats, MigrateSpec, RunSpec, SnapshotSpec};
use vane_proto::stream::{AgentReply, AgentRequest};

use std::sync::Arc;

use tokio::sync::mpsc;

use super::{parse, ApiResult, Ctl, Who};
use crate::state::ApiError;
use crate::workflow::{self, locate, running_instance, settled, stop_on};
use crate::{transfers, Controller};

pub(super) async fn list_instances(
    AxState(c): Ctl,
    axum::Extension(who): Who,
) -> Json<Vec<Instance>> {
    let s = c.state();
    let mut v: Vec<Instance> = s
        .instances
        .values()
        .filter(|i| s.net_tenant(&i.net).is_ok_and(|t| who.may(&t)))
        .map(|i| c.with_progress(i.clone()))
        .collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    Json(v)
}

pub(super) async fn inspect_instance(
    AxState(c): Ctl,
    Path(name): Path<String>,
) -> ApiResult<Json<Instance>> {
    let inst = c.state().instance_by_name(&name)?.clone();
    Ok(Json(c.with_progress(inst)))
}

pub(super) async fn run_instance(
    AxState(c): Ctl,
    axum::Extension(who): Who,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Instance>)> {
    let spec: RunSpec = parse(&body)?;
    {
        let s = c.state();
        who.check(&s.net_tenant(&spec.net)?, &format!("net {:?}", spec.net))?;
        if let Some(t) = &spec.template {
            if let Some(owner) = s.templates.get(t).and_then(|t| t.tenant.clone()) {
                who.check(&owner, &format!("template {t:?}"))?;
            }
        }
    }
    let inst = workflow::create(&c, spec).await?;
    Ok((StatusCode::CREATED, Json(inst)))
}

pub(super) async fn stop_instance(
    AxState(c): Ctl,
    Path(name): Path<String>,
) -> ApiResult<Json<Instance>> {
    let (id, host) = settled(&c, &name)?;
    stop_on(&c, &host, &id).await?;
    let s = c.state();
    Ok(Json(s.instances.get(&id).cloned().ok_or_else(|| {
        ApiError::NotFound(format!("unknown instance {name:?}"))
    })?))
}

/// Live migration: `workflow::migrate`.
pub(super) async fn migrate_instance(
    AxState(c): Ctl,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Instance>> {
    let spec: MigrateSpec = parse(&body)?;
    Ok(Json(workflow::migrate(&c, &name, spec).await?))
}

/// A snapshot, streamed as it is taken: `workflow::snapshot`.
pub(super) async fn snapshot_instance(
    AxState(c): Ctl,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let spec: SnapshotSpec = if body.is_empty() {
        SnapshotSpec::default()
    } else {
        parse(&body)?
    };
    let frames = workflow::snapshot(c, name, spec).await?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            vane_proto::api::SNAPSHOT_MEDIA_TYPE,
        )],
        Body::from_stream(receiver_stream(frames)),
    )
        .into_response())
}

/// The items of `rx` as a stream.
pub(super) fn receiver_stream<T>(mut rx: mpsc::Receiver<T>) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// A new instance from a snapshot stream: `workflow::restore`.
pub(super) async fn restore_instance(
    AxState(c): Ctl,
    axum::Extension(who): Who,
    body: Body,
) -> ApiResult<(StatusCode, Json<Instance>)> {
    let frames = Arc::new(tokio::sync::Mutex::new(workflow::FrameReader::new(body)));
    let answer = workflow::restore(c, who, frames.clone())
        .await
        .map(|inst| (StatusCode::CREATED, Json(inst)));
    if answer.is_err() {
        // A client blocked sending the rest of its images would never read the answer: the
        // images are read to their end (and thrown away) first.
        frames.lock().await.drain().await;
    }
    answer
}

#[derive(Deserialize)]
pub(super) struct RemoveQuery {
    #[serde(default)]
    pub(super) force: bool,
}

pub(super) async fn remove_instance(
    AxState(c): Ctl,
    Path(name): Path<String>,
    Query(q): Query<RemoveQuery>,
) -> ApiResult<StatusCode> {
    workflow::remove(&c, &name, q.force).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn exec_instance(
    AxState(c): Ctl,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let spec: ExecSpec = parse(&body)?;
    if spec.cmd.is_empty() {
        return Err(ApiError::BadRequest(
            "no command given: vane exec NAME -- CMD [ARGS...]".into(),
        ));
    }
    let (id, host) = running_instance(&c, &name)?;
    streamed(c, host, |ticket| AgentRequest::Exec {
        id,
        ticket,
        cmd: spec.cmd,
        env: spec.env,
    })
    .await
}

pub(super) async fn instance_logs(
    AxState(c): Ctl,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let (id, host) = locate(&c, &name)?;
    streamed(c, host, |ticket| AgentRequest::Logs { id, ticket }).await
}

/// Sends a request whose answer is a stream of frames (the agent sends it over a transfer
/// connection), and passes the frames on as the response body, at the pace the client
/// reads them.
pub(super) async fn streamed(
    c: Arc<Controller>,
    host: String,
    request: impl FnOnce(String) -> AgentRequest,
) -> ApiResult<Response> {
    let (ticket, rx) = c.transfers.output_of(&host);
    if let Err(e) = c.agents.request(&host, request(ticket.clone())).await {
        c.transfers.cancel(&ticket);
        return Err(e);
    }
    // An agent that dies before it claims the stream must not leave the client waiting.
    {
        let (c, ticket) = (c.clone(), ticket.clone());
        tokio::spawn(async move {
            tokio::time::sleep(transfers::UNCLAIMED).await;
            c.transfers.cancel(&ticket);
        });
    }
    // A broken stream ends the body without its exit frame: the client says so.
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        match rx.recv().await? {
            transfers::Piece::Data(frame) => Some((Ok::<_, std::convert::Infallible>(frame), rx)),
            transfers::Piece::End => None,
        }
    });
    Ok(Response::builder()
        .header("content-type", "application/vnd.vane.stream")
        .body(Body::from_stream(body))
        .expect("static response parts"))
}

pub(super) async fn instance_stats(
    AxState(c): Ctl,
    Path(name): Path<String>,
) -> ApiResult<Json<InstanceStats>> {
    let (id, host) = running_instance(&c, &name)?;
    match c.agents.request(&host, AgentRequest::Stats { id }).await? {
        AgentReply::Stats { port, usage } => Ok(Json(InstanceStats { name, port, usage })),
        other => Err(ApiError::Internal(format!(
            "unexpected answer from host {host:?}: {other:?}"
        ))),
    }
}
