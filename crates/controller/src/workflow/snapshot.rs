//! Snapshots and restores: a snapshot streams an instance's record, its packed images as
//! they come from its host, and the cluster's seal; a restore takes such a stream back,
//! checks the seal, and starts the instance from it on a host.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use tokio::sync::mpsc;

use vane_proto::api::{frame, Instance, RestoreSpec, RunSpec, SnapshotSpec};
use vane_proto::stream::{AgentReply, AgentRequest};

use super::{
    agent_transfer_request, running_instance, settled, start_instance, stop_on, ApiResult, Claim,
};
use crate::auth::Caller;
use crate::state::ApiError;
use crate::{transfers, Controller};

/// Dumps a running instance, leaving it running (or stopping it), and streams it to the
/// caller as frames (`RestoreSpec`): its record, its packed images as they arrive from its host, then
/// the cluster's seal of both (or an error frame). Not while it moves between hosts: its
/// dump would be of the tree a migration dumps, into the same images.
pub(crate) async fn snapshot(
    c: Arc<Controller>,
    name: String,
    spec: SnapshotSpec,
) -> ApiResult<mpsc::Receiver<Result<Bytes, std::io::Error>>> {
    let (id, host) = running_instance(&c, &name)?;
    settled(&c, &name)?;
    // Held until the stream ends: the pack is sent from after the dump.
    let claim = Claim::take(&c, &id, &name, "being snapshotted".into())?;
    let bytes = match c
        .agents
        .request(
            &host,
            AgentRequest::Checkpoint {
                id: id.clone(),
                leave_running: true,
                lazy: false,
                stream: false,
            },
        )
        .await
        .map_err(|e| e.from_host(&host))?
    {
        AgentReply::Checkpointed { bytes, .. } => bytes,
        other => {
            return Err(ApiError::Internal(format!(
                "unexpected answer from host {host:?}: {other:?}"
            )))
        }
    };
    let instance = c.state().instance_by_name(&name)?.clone();
    let (out, body) = mpsc::channel::<Result<Bytes, std::io::Error>>(2);
    tokio::spawn(async move {
        let _claim = claim;
        let mut sealing = c.sealer.begin(&instance);
        let record = serde_json::to_vec(&instance).expect("serializes");
        let _ = out
            .send(Ok(frame::encoded(frame::RECORD, &record).into()))
            .await;
        let (ticket, mut rx) = c.transfers.sent_by(&host);
        let send = agent_transfer_request(
            &c,
            &host,
            &ticket,
            AgentRequest::SendImages {
                id: id.clone(),
                ticket: ticket.clone(),
                to: None,
            },
            transfers::answer_within(bytes),
        );
        let out2 = out.clone();
        let from = host.clone();
        let forward = async move {
            let mut seen = 0u64;
            loop {
                match transfers::next(&mut rx).await? {
                    transfers::Piece::Data(d) => {
                        sealing.update(&d);
                        seen += d.len() as u64;
                        if out2
                            .send(Ok(frame::encoded(frame::IMAGES, &d).into()))
                            .await
                            .is_err()
                        {
                            return Err(ApiError::Unavailable("the client went away".into()));
                        }
                    }
                    transfers::Piece::End if seen == bytes => return Ok(sealing),
                    transfers::Piece::End => {
                        return Err(ApiError::Internal(format!(
                            "host {from:?} sent {seen} bytes of images, not the {bytes} it dumped"
                        )))
                    }
                }
            }
        };
        let (sent, forwarded) = tokio::join!(send, forward);
        let result = match (sent, forwarded) {
            (Ok(_), Ok(sealing)) => Ok(sealing),
            (Err(e), _) | (_, Err(e)) => Err(e),
        };
        let result = match result {
            Ok(sealing) if spec.stop => stop_on(&c, &host, &id).await.map(|_| sealing),
            other => other,
        };
        let last = match result {
            Ok(sealing) => frame::encoded(frame::SEAL, sealing.seal().as_bytes()),
            Err(e) => {
                tracing::warn!(instance = %name, "snapshot: {e}");
                frame::encoded(frame::ERROR, e.to_string().as_bytes())
            }
        };
        let _ = out.send(Ok(last.into())).await;
    });
    Ok(body)
}

/// Frames (`vane_proto::api::frame`) read from a request body as it arrives.
pub(crate) struct FrameReader {
    body: axum::body::BodyDataStream,
    buf: bytes::BytesMut,
}

impl FrameReader {
    pub(crate) fn new(body: Body) -> FrameReader {
        FrameReader {
            body: body.into_data_stream(),
            buf: bytes::BytesMut::new(),
        }
    }

    /// Reads what is left of the body, for nothing.
    pub(crate) async fn drain(&mut self) {
        use futures_util::StreamExt;
        self.buf.clear();
        while let Ok(Some(Ok(_))) = tokio::time::timeout(transfers::STALL, self.body.next()).await {
        }
    }

    /// The next frame, `None` at a clean end of the body.
    async fn next(&mut self) -> ApiResult<Option<(u8, Bytes)>> {
        use futures_util::StreamExt;
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes(self.buf[1..5].try_into().expect("4 bytes")) as usize;
                if len > frame::MAX_LEN {
                    return Err(ApiError::BadRequest(format!(
                        "a frame of {len} bytes is over the limit of {}",
                        frame::MAX_LEN
                    )));
                }
                if self.buf.len() >= 5 + len {
                    let mut whole = self.buf.split_to(5 + len);
                    let kind = whole[0];
                    let data = whole.split_off(5).freeze();
                    return Ok(Some((kind, data)));
                }
            }
            match tokio::time::timeout(transfers::STALL, self.body.next()).await {
                Ok(Some(Ok(chunk))) => self.buf.extend_from_slice(&chunk),
                Ok(Some(Err(e))) => {
                    return Err(ApiError::BadRequest(format!("reading the request: {e}")))
                }
                Ok(None) if self.buf.is_empty() => return Ok(None),
                Ok(None) => {
                    return Err(ApiError::BadRequest(
                        "the request ends inside a frame".into(),
                    ))
                }
                Err(_) => {
                    return Err(ApiError::BadRequest(format!(
                        "the request made no progress for {}s",
                        transfers::STALL.as_secs()
                    )))
                }
            }
        }
    }
}

/// A new instance from a snapshot stream (`RestoreSpec`): with the snapshot's identity,
/// or a clone with its own name, address and hostname. The images go to the host as they
/// arrive; the host restores them only once the seal has checked out.
///
/// A task of its own: a client that goes away once its images are up must not leave the
/// record `creating` while the host restores them (one that goes away before ends the
/// upload short, which the restore refuses).
pub(crate) async fn restore(
    c: Arc<Controller>,
    who: Caller,
    frames: Arc<tokio::sync::Mutex<FrameReader>>,
) -> ApiResult<Instance> {
    tokio::spawn(restore_to_end(c, who, frames))
        .await
        .map_err(|e| ApiError::Internal(format!("the restore's task ended: {e}")))?
}

async fn restore_to_end(
    c: Arc<Controller>,
    who: Caller,
    frames: Arc<tokio::sync::Mutex<FrameReader>>,
) -> ApiResult<Instance> {
    let first = frames.lock().await.next().await?;
    let spec: RestoreSpec = match first {
        Some((frame::RECORD, record)) => crate::api::parse(&record)?,
        _ => {
            return Err(ApiError::BadRequest(format!(
                "a restore is a snapshot stream ({}): its record first",
                vane_proto::api::SNAPSHOT_MEDIA_TYPE
            )))
        }
    };
    {
        let net = &spec.instance.net;
        who.check(&c.state().net_tenant(net)?, &format!("net {net:?}"))?;
    }
    if vane_proto::hex::decode::<32>(&spec.seal).is_none() {
        return Err(not_sealed());
    }
    let from = spec.instance.clone();
    // Under a new name it is a clone: a free address and its name as hostname unless told.
    let clone = spec.name.is_some();
    let run = RunSpec {
        ip: spec.ip.or((!clone).then_some(from.ip)),
        hostname: spec.hostname.or((!clone).then_some(from.hostname)),
        name: Some(spec.name.unwrap_or(from.name)),
        net: from.net,
        host: spec.host,
        env: from.env,
        cmd: from.cmd,
        template: None,
        limits: from.limits,
        space: from.space,
        restart: from.restart,
        // A clone would take its original's ports: it publishes none.
        publish: if clone { Vec::new() } else { from.publish },
        // Original or clone, it serves as a member of its service, if that still exists.
        service: from
            .service
            .filter(|name| c.state().services.contains_key(name)),
        checkpoint_every: from.checkpoint_every,
    };
    let sealing = c.sealer.begin(&spec.instance);
    let images = Incoming {
        frames,
        bytes: spec.images_bytes,
        sealing,
        seal: spec.seal,
    };
    let ctl: &Controller = &c;
    start_instance(ctl, run, None, |spec, host| async move {
        let bytes = images.bytes;
        restore_on(ctl, &host, spec, bytes, |tx| images.forward(tx))
            .await
            .map(Some)
    })
    .await
}

fn not_sealed() -> ApiError {
    ApiError::BadRequest(
        "the snapshot is not sealed by this cluster: it was changed since it was made, \
         or another cluster made it"
            .into(),
    )
}

/// The images of a restore, as they arrive, with what they must add up to.
struct Incoming {
    frames: Arc<tokio::sync::Mutex<FrameReader>>,
    bytes: u64,
    sealing: crate::seal::Sealing,
    seal: String,
}

impl Incoming {
    /// Passes the images on to `tx`; the end only if they are all there and sealed.
    async fn forward(mut self, tx: mpsc::Sender<transfers::Piece>) -> ApiResult<()> {
        let mut seen = 0u64;
        let mut frames = self.frames.lock().await;
        while let Some((kind, data)) = frames.next().await? {
            if kind != frame::IMAGES {
                return Err(ApiError::BadRequest(format!(
                    "unexpected frame of kind {kind} in a snapshot's images"
                )));
            }
            seen += data.len() as u64;
            if seen > self.bytes {
                return Err(ApiError::BadRequest(format!(
                    "the snapshot's images are longer than the {} bytes announced",
                    self.bytes
                )));
            }
            self.sealing.update(&data);
            transfers::put(&tx, transfers::Piece::Data(data)).await?;
        }
        if seen != self.bytes {
            return Err(ApiError::BadRequest(format!(
                "the snapshot's images end after {seen} of {} bytes",
                self.bytes
            )));
        }
        if !self.sealing.verify(&self.seal) {
            return Err(not_sealed());
        }
        transfers::put(&tx, transfers::Piece::End).await
    }
}

/// Prepares `spec` on `host`, streams it the `bytes` of images that `feed` puts in the
/// transfer, and restores them there (established connections closed): the restored
/// pid, or why not, with what was prepared on the host discarded again. For restores
/// from a client's snapshot and from a kept checkpoint alike.
pub(crate) async fn restore_on<F, Fut>(
    c: &Controller,
    host: &str,
    spec: vane_proto::stream::InstanceSpec,
    bytes: u64,
    feed: F,
) -> ApiResult<u32>
where
    F: FnOnce(mpsc::Sender<transfers::Piece>) -> Fut,
    Fut: std::future::Future<Output = ApiResult<()>>,
{
    let id = spec.id.clone();
    c.agents
        .request(
            host,
            AgentRequest::Prepare {
                instance: Box::new(spec),
            },
        )
        .await
        .map_err(|e| e.from_host(host))?;
    let result = async {
        let (ticket, tx) = c.transfers.sent_to(host);
        let receive = agent_transfer_request(
            c,
            host,
            &ticket,
            AgentRequest::ReceiveImages {
                id: id.clone(),
                ticket: ticket.clone(),
                bytes,
                from: None,
                pages: false,
            },
            transfers::answer_within(bytes),
        );
        let (received, forwarded) = tokio::join!(receive, feed(tx));
        // What the client sent (a bad request) says more than what the host made of it;
        // the host says more than that it stopped taking the images.
        match (forwarded, received) {
            (Err(e @ ApiError::BadRequest(_)), _) => return Err(e),
            (_, Err(e)) => return Err(e.from_host(host)),
            (Err(e), _) => return Err(e),
            (Ok(()), Ok(_)) => {}
        }
        match c
            .agents
            .request(
                host,
                AgentRequest::Restore {
                    id: id.clone(),
                    tcp_close: true,
                },
            )
            .await
            .map_err(|e| e.from_host(host))?
        {
            AgentReply::Created { pid } => Ok(pid),
            other => Err(ApiError::Internal(format!(
                "unexpected answer from host {host:?}: {other:?}"
            ))),
        }
    }
    .await;
    if result.is_err() {
        let _ = c.agents.request(host, AgentRequest::Discard { id }).await;
    }
    result
}
