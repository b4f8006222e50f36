//! Connected agents: one control stream each. Requests to an agent carry an id and are
//! answered on the same stream; streamed answers (exec, logs) arrive as binary messages
//! tagged with a stream id and are routed to whoever waits for them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use vane_proto::stream::{AgentError, AgentReply, AgentRequest, AgentView, ErrorKind, ToAgent};

use crate::state::ApiError;

/// A message for an agent's socket writer.
#[derive(Debug)]
pub enum Outgoing {
    Json(Box<ToAgent>),
    /// Closes the stream (another agent took the name over).
    Close,
}

/// A frame of a streamed answer: (kind, bytes) as in `vane_proto::api::frame`.
pub type StreamFrame = (u8, Vec<u8>);

struct Conn {
    /// Distinguishes this connection from a later one of the same host.
    epoch: u64,
    tx: mpsc::UnboundedSender<Outgoing>,
    pending: HashMap<u64, oneshot::Sender<Result<AgentReply, AgentError>>>,
    streams: HashMap<u64, mpsc::Sender<StreamFrame>>,
    last_view: Option<AgentView>,
}

#[derive(Default)]
pub struct Agents {
    conns: Mutex<HashMap<String, Conn>>,
    next_id: AtomicU64,
}

/// How long the controller waits for an agent's answer. Creating an instance is the slowest
/// request (namespaces, devices, nftables, starting the program).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

impl Agents {
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Registers the connection of `host`, replacing (and closing) an older one.
    pub fn attach(&self, host: &str, tx: mpsc::UnboundedSender<Outgoing>) -> u64 {
        let epoch = self.next_id();
        let old = self.conns.lock().expect("agents lock").insert(
            host.to_string(),
            Conn {
                epoch,
                tx,
                pending: HashMap::new(),
                streams: HashMap::new(),
                last_view: None,
            },
        );
        if let Some(old) = old {
            let _ = old.tx.send(Outgoing::Close);
        }
        epoch
    }

    /// Forgets the connection of `host` if it is still the one of `epoch`; pending requests
    /// fail and open streams end. Returns whether it was.
    pub fn detach(&self, host: &str, epoch: u64) -> bool {
        let mut conns = self.conns.lock().expect("agents lock");
        if conns.get(host).map(|c| c.epoch) == Some(epoch) {
            conns.remove(host);
            true
        } else {
            false
        }
    }

    /// Tells the agent of `host` it is refused, and closes its stream.
    pub fn evict(&self, host: &str, reason: &str) {
        if let Some(conn) = self.conns.lock().expect("agents lock").remove(host) {
            let _ = conn.tx.send(Outgoing::Json(Box::new(ToAgent::Refused {
                reason: reason.to_string(),
            })));
            let _ = conn.tx.send(Outgoing::Close);
        }
    }

    pub fn is_connected(&self, host: &str) -> bool {
        self.conns.lock().expect("agents lock").contains_key(host)
    }

    /// Sends `body` to the agent of `host` and waits for its answer.
    pub async fn request(&self, host: &str, body: AgentRequest) -> Result<AgentReply, ApiError> {
        self.request_within(host, body, REQUEST_TIMEOUT).await
    }

    /// `request`, waiting up to `timeout` (a transfer's answer takes as long as its data).
    pub async fn request_within(
        &self,
        host: &str,
        body: AgentRequest,
        timeout: Duration,
    ) -> Result<AgentReply, ApiError> {
        let id = self.next_id();
        let (tx, rx) = oneshot::channel();
        {
            let mut conns = self.conns.lock().expect("agents lock");
            let conn = conns
                .get_mut(host)
                .ok_or_else(|| ApiError::Unavailable(format!("host {host:?} is offline")))?;
            conn.pending.insert(id, tx);
            conn.tx
                .send(Outgoing::Json(Box::new(ToAgent::Request { id, body })))
                .map_err(|_| ApiError::Unavailable(format!("host {host:?} is offline")))?;
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok(reply))) => Ok(reply),
            Ok(Ok(Err(e))) => Err(agent_error(e)),
            Ok(Err(_)) => Err(ApiError::Unavailable(format!(
                "host {host:?} disconnected before answering"
            ))),
            Err(_) => {
                if let Some(c) = self.conns.lock().expect("agents lock").get_mut(host) {
                    c.pending.remove(&id);
                }
                Err(ApiError::Unavailable(format!(
                    "host {host:?} did not answer within {}s",
                    timeout.as_secs()
                )))
            }
        }
    }

    /// Opens a stream for a streamed answer from `host`; frames arrive on the receiver.
    pub fn open_stream(&self, host: &str) -> Result<(u64, mpsc::Receiver<StreamFrame>), ApiError> {
        let id = self.next_id();
        let (tx, rx) = mpsc::channel(256);
        let mut conns = self.conns.lock().expect("agents lock");
        let conn = conns
            .get_mut(host)
            .ok_or_else(|| ApiError::Unavailable(format!("host {host:?} is offline")))?;
        conn.streams.insert(id, tx);
        Ok((id, rx))
    }

    pub fn close_stream(&self, host: &str, id: u64) {
        if let Some(c) = self.conns.lock().expect("agents lock").get_mut(host) {
            c.streams.remove(&id);
        }
    }

    pub fn resolve(&self, host: &str, id: u64, result: Result<AgentReply, AgentError>) {
        let waiter = self
            .conns
            .lock()
            .expect("agents lock")
            .get_mut(host)
            .and_then(|c| c.pending.remove(&id));
        if let Some(w) = waiter {
            let _ = w.send(result);
        }
    }

    /// The sender of stream `id` of `host`, if someone still listens.
    pub fn stream_sender(&self, host: &str, id: u64) -> Option<mpsc::Sender<StreamFrame>> {
        self.conns
            .lock()
            .expect("agents lock")
            .get(host)
            .and_then(|c| c.streams.get(&id).cloned())
    }

    pub fn send(&self, host: &str, msg: ToAgent) {
        if let Some(c) = self.conns.lock().expect("agents lock").get(host) {
            let _ = c.tx.send(Outgoing::Json(Box::new(msg)));
        }
    }

    /// Sends `view` to `host` unless it already has exactly this view.
    pub fn push_view(&self, host: &str, view: AgentView) {
        let mut conns = self.conns.lock().expect("agents lock");
        if let Some(c) = conns.get_mut(host) {
            if c.last_view.as_ref() != Some(&view) {
                c.last_view = Some(view.clone());
                let _ = c.tx.send(Outgoing::Json(Box::new(ToAgent::View(view))));
            }
        }
    }

    pub fn connected(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .conns
            .lock()
            .expect("agents lock")
            .keys()
            .cloned()
            .collect();
        v.sort();
        v
    }
}

/// The answer to a request an agent could not carry out.
fn agent_error(e: AgentError) -> ApiError {
    match e.kind {
        ErrorKind::BadRequest => ApiError::BadRequest(e.message),
        ErrorKind::NotFound => ApiError::NotFound(e.message),
        ErrorKind::Conflict => ApiError::Conflict(e.message),
        ErrorKind::Failed => ApiError::Internal(e.message),
    }
}
