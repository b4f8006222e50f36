//! Connected agents: one control stream each. Requests to an agent carry an id and are
//! answered on the same stream. Streamed answers (exec, logs) and images come over
//! transfer connections of their own (`transfers`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Notify};

use vane_proto::stream::{AgentError, AgentReply, AgentRequest, AgentView, ErrorKind, ToAgent};

use crate::state::ApiError;

/// A message for an agent's socket writer.
#[derive(Debug)]
pub enum Outgoing {
    Json(Box<ToAgent>),
    /// Closes the stream (another agent took the name over).
    Close,
}

struct Conn {
    /// Distinguishes this connection from a later one of the same host.
    epoch: u64,
    tx: mpsc::Sender<Outgoing>,
    /// Told when the agent does not keep up: its session ends (`session::run`).
    overflow: Arc<Notify>,
    pending: HashMap<u64, oneshot::Sender<Result<AgentReply, AgentError>>>,
    last_view: Option<AgentView>,
}

impl Conn {
    /// Queues `msg` for the agent's socket; false if it cannot be. An agent that falls
    /// [`OUTBOX`] messages behind is disconnected: it reconnects, and its hello and the
    /// view it then gets put both sides back in step.
    fn queue(&self, msg: Outgoing) -> bool {
        match self.tx.try_send(msg) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.overflow.notify_one();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

/// Messages waiting for one agent's socket.
const OUTBOX: usize = 1024;

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

    /// Registers the connection of `host`, replacing (and closing) an older one. Returns
    /// its epoch, the messages for its socket, and what tells the session that the agent
    /// fell [`OUTBOX`] messages behind.
    pub fn attach(&self, host: &str) -> (u64, mpsc::Receiver<Outgoing>, Arc<Notify>) {
        let epoch = self.next_id();
        let (tx, rx) = mpsc::channel(OUTBOX);
        let overflow = Arc::new(Notify::new());
        let old = self.conns.lock().expect("agents lock").insert(
            host.to_string(),
            Conn {
                epoch,
                tx,
                overflow: overflow.clone(),
                pending: HashMap::new(),
                last_view: None,
            },
        );
        if let Some(old) = old {
            old.queue(Outgoing::Close);
        }
        (epoch, rx, overflow)
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
            conn.queue(Outgoing::Json(Box::new(ToAgent::Refused {
                reason: reason.to_string(),
            })));
            conn.queue(Outgoing::Close);
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
            if !conn.queue(Outgoing::Json(Box::new(ToAgent::Request { id, body }))) {
                return Err(ApiError::Unavailable(format!(
                    "host {host:?} is not keeping up with its control stream"
                )));
            }
            conn.pending.insert(id, tx);
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

    pub fn send(&self, host: &str, msg: ToAgent) {
        if let Some(c) = self.conns.lock().expect("agents lock").get(host) {
            c.queue(Outgoing::Json(Box::new(msg)));
        }
    }

    /// Sends `view` to `host` unless it already has exactly this view.
    pub fn push_view(&self, host: &str, view: AgentView) {
        let mut conns = self.conns.lock().expect("agents lock");
        if let Some(c) = conns.get_mut(host) {
            if c.last_view.as_ref() != Some(&view) {
                c.last_view = Some(view.clone());
                c.queue(Outgoing::Json(Box::new(ToAgent::View(view))));
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
