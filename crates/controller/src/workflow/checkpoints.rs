//! Checkpoints kept to fail over from (`vane run --checkpoint-every`): the controller has
//! each such instance's host dump it, leaving it running, as often as asked, and keeps the
//! last packed images in its data directory (`checkpoints/ID.pack`, the controller's
//! alone); when the host dies, the instance is restored from them on its new host instead
//! of starting fresh. Each dump holds the instance's packets for its length, as a
//! snapshot's does.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use vane_proto::api::InstanceState;
use vane_proto::stream::{AgentReply, AgentRequest};

use super::{agent_transfer_request, ApiResult};
use crate::state::{ApiError, Restart};
use crate::{now, transfers, Controller};

/// Where the last checkpoint of instance `id` is kept.
pub(crate) fn pack_of(c: &Controller, id: &str) -> PathBuf {
    c.checkpoints.join(format!("{id}.pack"))
}

/// Forgets the checkpoint of instance `id` (removed, or its program started afresh).
pub(crate) fn forget(c: &Controller, id: &str) {
    let _ = std::fs::remove_file(pack_of(c, id));
}

/// Takes the checkpoints that are due, for ever: each instance with an interval, running
/// on a connected host and not moving, once its interval has passed since its last
/// attempt, one at a time per instance.
pub(crate) async fn keep(c: Arc<Controller>) {
    let mut last: HashMap<String, Instant> = HashMap::new();
    let busy: Arc<std::sync::Mutex<std::collections::HashSet<String>>> = Arc::default();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let due: Vec<(String, String)> = {
            let s = c.state();
            s.instances
                .values()
                .filter(|i| {
                    i.state == InstanceState::Running
                        && i.migrating.is_none()
                        && c.agents.is_connected(&i.host)
                })
                .filter_map(|i| {
                    let every = Duration::from_secs(i.checkpoint_every?);
                    let waited = last.get(&i.id).is_none_or(|t| t.elapsed() >= every);
                    waited.then(|| (i.id.clone(), i.host.clone()))
                })
                .collect()
        };
        for (id, host) in due {
            if !busy.lock().expect("busy lock").insert(id.clone()) {
                continue;
            }
            last.insert(id.clone(), Instant::now());
            let (c, busy) = (c.clone(), busy.clone());
            tokio::spawn(async move {
                if let Err(e) = take(&c, &id, &host).await {
                    tracing::warn!(instance = %id, %host, "checkpoint: {e}");
                }
                busy.lock().expect("busy lock").remove(&id);
            });
        }
    }
}

/// Dumps instance `id` on `host`, leaving it running, and keeps its images in place of
/// the previous ones once they have all arrived.
async fn take(c: &Controller, id: &str, host: &str) -> ApiResult<()> {
    let bytes = match c
        .agents
        .request(
            host,
            AgentRequest::Checkpoint {
                id: id.to_string(),
                leave_running: true,
                lazy: false,
                stream: false,
            },
        )
        .await?
    {
        AgentReply::Checkpointed { bytes, .. } => bytes,
        other => {
            return Err(ApiError::Internal(format!(
                "unexpected answer from host {host:?}: {other:?}"
            )))
        }
    };
    let path = pack_of(c, id);
    let tmp = path.with_extension("pack.tmp");
    let (ticket, mut rx) = c.transfers.sent_by(host);
    let send = agent_transfer_request(
        c,
        host,
        &ticket,
        AgentRequest::SendImages {
            id: id.to_string(),
            ticket: ticket.clone(),
            to: None,
        },
        transfers::answer_within(bytes),
    );
    let write = async {
        let io = |e: std::io::Error| ApiError::Internal(format!("{}: {e}", tmp.display()));
        tokio::fs::create_dir_all(&c.checkpoints)
            .await
            .map_err(io)?;
        let mut file = tokio::fs::File::create(&tmp).await.map_err(io)?;
        let mut seen = 0u64;
        loop {
            match transfers::next(&mut rx).await? {
                transfers::Piece::Data(d) => {
                    seen += d.len() as u64;
                    file.write_all(&d).await.map_err(io)?;
                }
                transfers::Piece::End if seen == bytes => break,
                transfers::Piece::End => {
                    return Err(ApiError::Internal(format!(
                        "host {host:?} sent {seen} bytes of images, not the {bytes} it dumped"
                    )))
                }
            }
        }
        file.sync_all().await.map_err(io)
    };
    let (sent, written) = tokio::join!(send, write);
    if let Err(e) = sent.and(written) {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(e);
    }
    // Still the instance's, and still where it was dumped: then it is the one to keep.
    let mut s = c.state();
    if s.instances.get(id).is_none_or(|i| i.host != host) {
        let _ = std::fs::remove_file(&tmp);
        return Ok(());
    }
    std::fs::rename(&tmp, &path)
        .map_err(|e| ApiError::Internal(format!("{}: {e}", path.display())))?;
    if let Some((_, batch)) = s.change_instance(id, |i| i.checkpointed = Some(now())) {
        c.commit(batch)?;
    }
    tracing::debug!(instance = %id, %host, bytes, "checkpoint kept");
    Ok(())
}

/// Restores instance `r.id` on `r.host` from its kept checkpoint (its established TCP
/// connections closed: their peers moved on meanwhile): its pid, or why not, the space
/// prepared on the host discarded again. `None` when it has no checkpoint.
pub(crate) async fn restore(c: &Controller, r: &Restart) -> Option<ApiResult<u32>> {
    let path = pack_of(c, &r.id);
    let mut file = tokio::fs::File::open(&path).await.ok()?;
    let bytes = file.metadata().await.ok()?.len();
    let feed = |tx| async move {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = file
                .read(&mut buf)
                .await
                .map_err(|e| ApiError::Internal(format!("{}: {e}", path.display())))?;
            if n == 0 {
                return transfers::put(&tx, transfers::Piece::End).await;
            }
            let piece = bytes::Bytes::copy_from_slice(&buf[..n]);
            transfers::put(&tx, transfers::Piece::Data(piece)).await?;
        }
    };
    Some(super::snapshot::restore_on(c, &r.host, r.spec.clone(), bytes, feed).await)
}
