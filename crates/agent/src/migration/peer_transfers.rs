//! The agent's ends of direct transfers between agents (`direct`) for migrations: sending
//! images to the destination's agent (then relaying a lazy dump's pages over the same
//! link), waiting for and accepting transfers from other agents, and relaying the pages a
//! destination fetches to CRIU's lazy-pages daemon.

use std::sync::Arc;
use std::time::Duration;

use vane_proto::stream::AgentError;

use super::break_off;
use tokio::io::AsyncRead;

use crate::state::{Inbound, PageLink};
use crate::{checkpoint, direct, Agent};

impl Agent {
    /// Sends the images of instance `id` straight to `peer`'s agent as transfer `ticket`:
    /// its pack if it has one, else packed as they go; then, if it has a lazy dump, its
    /// pages go over the same link.
    pub(crate) async fn send_direct(
        &self,
        id: &str,
        ticket: &str,
        peer: &vane_proto::stream::DirectPeer,
    ) -> Result<u64, AgentError> {
        let remote = vane_proto::hex::decode::<32>(&peer.public_key)
            .ok_or_else(|| AgentError::bad_request("a peer key is 64 hex digits"))?;
        let dir = self.instance_dir(id);
        let path = dir.join(checkpoint::PACK_FILE);
        let pack: (Box<dyn AsyncRead + Unpin + Send>, _) = if path.exists() {
            let file = tokio::fs::File::open(&path)
                .await
                .map_err(|e| format!("reading {}: {e}", path.display()))?;
            let file = tokio::io::BufReader::with_capacity(1 << 20, file);
            (Box::new(file), None)
        } else {
            let ids = self
                .state()
                .instances
                .get(id)
                .ok_or_else(|| AgentError::not_found(format!("instance {id} is not here")))?
                .record
                .confinement()
                .idmap;
            let (pipe, ended) = checkpoint::pack_to_pipe(&dir, ids)?;
            (Box::new(pipe), Some(ended))
        };
        let stream = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect(peer.locator),
        )
        .await
        .map_err(|_| format!("cannot reach {} within 5s", peer.locator))?
        .map_err(|e| format!("cannot reach {}: {e}", peer.locator))?;
        let _ = stream.set_nodelay(true);
        let private = self.state().identity.keypair.private;
        let (pack, ended) = pack;
        let ended = async move {
            match ended {
                Some(ended) => ended.await,
                None => Ok(()),
            }
        };
        let (sent, link) = direct::send(stream, &private, &remote, ticket, pack, ended)
            .await
            .map_err(|e| format!("sending the images to {}: {e}", peer.locator))?;
        let lazy = self
            .state()
            .migrations
            .lazy_sources
            .get_mut(id)
            .and_then(|l| Some((l.pages.take()?, l.cancel.clone(), l.abort.try_clone().ok()?)));
        if let Some((pages, cancel, abort)) = lazy {
            let id = id.to_string();
            tokio::spawn(async move {
                let relayed = match pages
                    .set_nonblocking(true)
                    .and_then(|()| tokio::net::UnixStream::from_std(pages))
                {
                    Ok(pages) => tokio::select! {
                        relayed = link.relay(pages) => relayed.map(|(out, _)| out),
                        () = cancel.notified() => return,
                    },
                    Err(e) => Err(e.to_string()),
                };
                match relayed {
                    Ok(out) => tracing::info!(instance = %id, bytes = out, "pages served"),
                    Err(e) => {
                        // A broken link must not look like the end of the work to CRIU,
                        // which would end the tree: it resumes it instead.
                        tracing::warn!(instance = %id, "serving pages: {e}");
                        break_off(&abort);
                    }
                }
            });
        }
        Ok(sent)
    }

    /// Waits for transfer `ticket` from the host whose key is `from` (hex), a pack of at
    /// most `bytes` bytes, and unpacks it into instance directory `dir` as it comes, its
    /// files becoming `owner`'s.
    pub(crate) async fn receive_direct(
        &self,
        ticket: String,
        from: &str,
        dir: std::path::PathBuf,
        bytes: u64,
        owner: Option<crate::sandbox::IdMap>,
    ) -> Result<PageLink, AgentError> {
        let from = vane_proto::hex::decode::<32>(from)
            .ok_or_else(|| AgentError::bad_request("a peer key is 64 hex digits"))?;
        let (done, result) = tokio::sync::oneshot::channel();
        self.state().migrations.inbound.insert(
            ticket.clone(),
            Inbound {
                from,
                expected: direct::Expected { dir, bytes, owner },
                done,
            },
        );
        // Claimed at once in practice (the source connects as soon as it is asked); the
        // transfer itself then has its own limit on silence.
        let waited = Duration::from_secs(60 + bytes / (1 << 20));
        let outcome = tokio::time::timeout(waited, result).await;
        self.state().migrations.inbound.remove(&ticket);
        match outcome {
            Ok(Ok(r)) => r.map_err(AgentError::from),
            Ok(Err(_)) => Err("the direct transfer was dropped".into()),
            Err(_) => Err(format!("no images came within {}s", waited.as_secs()).into()),
        }
    }

    /// Takes direct transfers (`direct`) from other hosts' agents.
    pub(crate) async fn accept_direct(self: Arc<Self>, listener: tokio::net::TcpListener) {
        let permits = Arc::new(tokio::sync::Semaphore::new(direct::MAX_INBOUND));
        loop {
            let Ok((stream, addr)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                tracing::debug!(%addr, "too many direct transfers at once, closing one");
                continue;
            };
            // The destination's page requests of a post-copy go out at once, not behind
            // Nagle's wait for the last one's acknowledgement.
            let _ = stream.set_nodelay(true);
            let agent = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let private = agent.state().identity.keypair.private;
                let mut done = None;
                let claim = async |ticket: &str, from: &[u8; 32]| {
                    // The source may be faster than the request that announces it.
                    for _ in 0..250 {
                        {
                            let mut state = agent.state();
                            let inbound = &mut state.migrations.inbound;
                            match inbound.get(ticket) {
                                Some(i) if i.from == *from => {
                                    let i = inbound.remove(ticket).expect("just seen");
                                    done = Some(i.done);
                                    return Some(i.expected);
                                }
                                Some(_) => return None,
                                None => {}
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    None
                };
                match direct::accept(stream, &private, claim).await {
                    Ok((_, result)) => {
                        match &result {
                            Ok(_) => tracing::info!(%addr, "images received directly"),
                            Err(e) => tracing::warn!(%addr, "a direct transfer failed: {e}"),
                        }
                        if let Some(done) = done {
                            let _ = done.send(result);
                        }
                    }
                    Err(e) => tracing::warn!(%addr, "refused a direct transfer: {e}"),
                }
            });
        }
    }
}

/// Relays `link` (from a lazy dump's host) to one end of a new socket pair, in the
/// background; returns the other end, for CRIU's lazy-pages daemon.
pub(crate) fn relay_pages(
    id: &str,
    link: PageLink,
) -> Result<std::os::unix::net::UnixStream, String> {
    let (ours, theirs) = checkpoint::page_socket_pair()?;
    ours.set_nonblocking(true)
        .map_err(|e| format!("a socket pair: {e}"))?;
    let ours = tokio::net::UnixStream::from_std(ours).map_err(|e| format!("a socket pair: {e}"))?;
    let id = id.to_string();
    tokio::spawn(async move {
        match link.relay(ours).await {
            Ok((_, pages)) => tracing::info!(instance = %id, bytes = pages, "pages fetched"),
            Err(e) => tracing::warn!(instance = %id, "fetching pages: {e}"),
        }
    });
    Ok(theirs)
}
