//! Handlers of instances: listing, inspecting, and the workflows (`crate::workflow`)
//! that run, stop, move, snapshot, restore and remove them; exec, logs and stats streams.

use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State as AxState};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use vane_proto::api::{ExecSpec, Instance, InstanceStats, MigrateSpec, RunSpec, SnapshotSpec};
use vane_proto::stream::{AgentReply, AgentRequest};

use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
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
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Instance>)> {
    let spec: RunSpec = parse(&body)?;
    let request = match headers.get(vane_proto::IDEMPOTENCY_HEADER) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .filter(|k| vane_proto::validate::request_key(k))
                .ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "invalid {}: 8 to 64 letters, digits and '-'",
                        vane_proto::IDEMPOTENCY_HEADER
                    ))
                })?
                .to_string(),
        ),
    };
    {
        let s = c.state();
        who.check(&s.net_tenant(&spec.net)?, &format!("net {:?}", spec.net))?;
        if let Some(t) = &spec.template {
            if let Some(owner) = s.templates.get(t).and_then(|t| t.tenant.clone()) {
                who.check(&owner, &format!("template {t:?}"))?;
            }
        }
    }
    let inst = workflow::create(&c, spec, request).await?;
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
    check_exec(&spec)?;
    if spec.stdin || spec.tty.is_some() {
        return Err(ApiError::BadRequest(
            "stdin and tty need the exec WebSocket (GET /v1/instances/{name}/exec)".into(),
        ));
    }
    let (id, host) = running_instance(&c, &name)?;
    streamed(c, host, |ticket| AgentRequest::Exec {
        id,
        ticket,
        cmd: spec.cmd,
        env: spec.env,
        stdin: false,
        tty: None,
    })
    .await
}

fn check_exec(spec: &ExecSpec) -> ApiResult<()> {
    if spec.cmd.is_empty() {
        return Err(ApiError::BadRequest(
            "no command given: vane exec NAME -- CMD [ARGS...]".into(),
        ));
    }
    Ok(())
}

/// How long the client of an exec WebSocket has to send its `ExecSpec`.
const SPEC_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);

/// `GET /v1/instances/{name}/exec`, upgraded to a WebSocket: an exec whose client talks
/// back (stdin, a terminal's size) and whose leaving ends the command. Who may ask was
/// checked by `instance_scope`; the instance must run.
pub(super) async fn exec_session(
    AxState(c): Ctl,
    Path(name): Path<String>,
    ws: WebSocketUpgrade,
) -> ApiResult<Response> {
    let (id, host) = running_instance(&c, &name)?;
    Ok(ws
        .max_message_size(2 * transfers::MAX_PIECE)
        .on_upgrade(move |socket| exec_relay(c, id, host, socket)))
}

/// The exec WebSocket once open: the client's `ExecSpec` (a text message), then frames both
/// ways, one a binary message, between the client and the agent's transfer connection.
async fn exec_relay(c: Arc<Controller>, id: String, host: String, mut socket: WebSocket) {
    let spec = match tokio::time::timeout(SPEC_WITHIN, socket.recv()).await {
        Ok(Some(Ok(Message::Text(t)))) => serde_json::from_str::<ExecSpec>(t.as_str())
            .map_err(|e| ApiError::BadRequest(format!("invalid request: {e}")))
            .and_then(|spec| check_exec(&spec).map(|()| spec)),
        Ok(_) => Err(ApiError::BadRequest(
            "the exec WebSocket starts with the ExecSpec as a text message".into(),
        )),
        Err(_) => return,
    };
    let spec = match spec {
        Ok(s) => s,
        Err(e) => return refuse(socket, e).await,
    };
    let (ticket, mut from_agent, to_agent) = c.transfers.session_of(&host);
    let request = AgentRequest::Exec {
        id,
        ticket: ticket.clone(),
        cmd: spec.cmd,
        env: spec.env,
        stdin: spec.stdin,
        tty: spec.tty,
    };
    if let Err(e) = c.agents.request(&host, request).await {
        c.transfers.cancel(&ticket);
        return refuse(socket, e).await;
    }
    cancel_unclaimed(&c, &ticket);
    let (mut sink, mut stream) = socket.split();
    let output = async {
        while let Some(transfers::Piece::Data(frame)) = from_agent.recv().await {
            if sink.send(Message::Binary(frame)).await.is_err() {
                return;
            }
        }
        // After the exit frame, or without it if the agent's stream broke: the client
        // says so.
        let _ = sink.send(Message::Close(None)).await;
    };
    let input = async {
        while let Some(Ok(msg)) = stream.next().await {
            match msg {
                // The agent checks each frame; one that arrives after the command ended
                // goes nowhere.
                Message::Binary(frame) => {
                    let _ = to_agent.send(frame).await;
                }
                Message::Close(_) => break,
                _ => {}
            }
        }
    };
    // Whichever ends first ends the relay: the command's end, or the client's, which drops
    // `to_agent` and so tells the agent to hang the command up.
    tokio::select! {
        () = output => {}
        () = input => {}
    }
}

/// Ends an exec WebSocket with an error frame.
async fn refuse(mut socket: WebSocket, e: ApiError) {
    let frame =
        vane_proto::api::frame::encoded(vane_proto::api::frame::ERROR, e.to_string().as_bytes());
    let _ = socket.send(Message::Binary(frame.into())).await;
    let _ = socket.send(Message::Close(None)).await;
}

/// An agent that dies before it claims its stream must not leave the client waiting.
fn cancel_unclaimed(c: &Arc<Controller>, ticket: &str) {
    let (c, ticket) = (c.clone(), ticket.to_string());
    tokio::spawn(async move {
        tokio::time::sleep(transfers::UNCLAIMED).await;
        c.transfers.cancel(&ticket);
    });
}

#[derive(Deserialize)]
pub(super) struct LogsQuery {
    #[serde(default)]
    follow: bool,
    tail: Option<u64>,
}

pub(super) async fn instance_logs(
    AxState(c): Ctl,
    Path(name): Path<String>,
    Query(q): Query<LogsQuery>,
) -> ApiResult<Response> {
    let (id, host) = locate(&c, &name)?;
    streamed(c, host, |ticket| AgentRequest::Logs {
        id,
        ticket,
        follow: q.follow,
        tail: q.tail,
    })
    .await
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
    cancel_unclaimed(&c, &ticket);
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
