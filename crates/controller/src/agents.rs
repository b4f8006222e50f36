//! Connected agents: one control stream each. Requests to an agent carry an id and are
//! answered on the same stream. Streamed answers (exec, logs) and images come over
//! transfer connections of their own (`transfers`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch, Notify};

use vane_proto::stream::{AgentError, AgentReply, AgentRequest, AgentView, ErrorKind, ToAgent};

use crate::state::{ApiError, ViewKey};

/// A message for an agent's socket writer.
#[derive(Debug)]
pub enum Outgoing {
    Json(Box<ToAgent>),
    /// A WebSocket ping: the agent's pong says it is there (`session::run`).
    Ping,
    /// Closes the stream (another agent took the name over).
    Close,
}

struct Conn {
    /// Distinguishes this connection from a later one of the same host.
    epoch: u64,
    tx: mpsc::Sender<Outgoing>,
    /// Told when the agent does not keep up: its session ends (`session::run`).
    overflow: Arc<Notify>,
    pending: HashMap<u64, Pending>,
    /// What the last view sent was made of (`Controller::push_views`); `None` before the
    /// first and after one made otherwise (`push_view`). Only the key is kept, not the view:
    /// with 1000 hosts a view is over 100 KB of peers.
    last_view: Option<ViewKey>,
}

/// A request waiting for its answer, and its progress so far (`FromAgent::Progress`).
struct Pending {
    answer: oneshot::Sender<Result<AgentReply, AgentError>>,
    progress: watch::Sender<u64>,
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

/// What the controller's workflows need of the agents: whether a host's agent is there,
/// and requests to it. The live agents ([`Agents`]) answer over their control streams;
/// the workflows' tests put scripted agents in their place.
pub(crate) trait AgentLink: Send + Sync {
    /// Whether `host`'s agent is connected.
    fn is_connected(&self, host: &str) -> bool;

    /// Sends `body` to the agent of `host` and waits for its answer; `timeout` runs from
    /// the agent's last progress (see [`Agents::request_watched`]), whose bytes done
    /// `on_progress` gets.
    fn request_watched<'a>(
        &'a self,
        host: &'a str,
        body: AgentRequest,
        timeout: Duration,
        on_progress: &'a (dyn Fn(u64) + Send + Sync),
    ) -> futures_util::future::BoxFuture<'a, Result<AgentReply, ApiError>>;

    /// `request_watched` with the usual timeout and nobody watching.
    fn request<'a>(
        &'a self,
        host: &'a str,
        body: AgentRequest,
    ) -> futures_util::future::BoxFuture<'a, Result<AgentReply, ApiError>> {
        self.request_watched(host, body, REQUEST_TIMEOUT, &|_| {})
    }

    /// `request_watched` with nobody watching.
    fn request_within<'a>(
        &'a self,
        host: &'a str,
        body: AgentRequest,
        timeout: Duration,
    ) -> futures_util::future::BoxFuture<'a, Result<AgentReply, ApiError>> {
        self.request_watched(host, body, timeout, &|_| {})
    }
}

impl AgentLink for Agents {
    fn is_connected(&self, host: &str) -> bool {
        Agents::is_connected(self, host)
    }

    fn request_watched<'a>(
        &'a self,
        host: &'a str,
        body: AgentRequest,
        timeout: Duration,
        on_progress: &'a (dyn Fn(u64) + Send + Sync),
    ) -> futures_util::future::BoxFuture<'a, Result<AgentReply, ApiError>> {
        Box::pin(Agents::request_watched(
            self,
            host,
            body,
            timeout,
            on_progress,
        ))
    }
}

#[derive(Default)]
pub struct Agents {
    conns: Mutex<HashMap<String, Conn>>,
    next_id: AtomicU64,
    /// This controller's term (`Controller::open_with`): the first part of its views'
    /// revisions.
    term: AtomicU64,
    /// The last view sent: the second part.
    view_seq: AtomicU64,
}

/// How long the controller waits for an agent's answer. Creating an instance is the slowest
/// request (namespaces, devices, nftables, starting the program).
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

impl Agents {
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Sets the term of the views sent from now on.
    pub fn set_term(&self, term: u64) {
        self.term.store(term, Ordering::Relaxed);
    }

    /// `view` with the next revision. Called with the connections locked, while the view
    /// is queued: revisions go out in the order they were given.
    fn stamped(&self, mut view: AgentView) -> Box<ToAgent> {
        view.revision = vane_proto::stream::ViewRevision {
            term: self.term.load(Ordering::Relaxed),
            seq: self.view_seq.fetch_add(1, Ordering::Relaxed) + 1,
        };
        Box::new(ToAgent::View(view))
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

    /// Pings the agent of `host` (an agent too far behind to take it is disconnected).
    pub fn ping(&self, host: &str) {
        if let Some(c) = self.conns.lock().expect("agents lock").get(host) {
            c.queue(Outgoing::Ping);
        }
    }

    /// Sends `body` to the agent of `host` and waits for its answer, up to `timeout` after
    /// the agent's last progress, not after the request: a long piece of work (dumping a large instance) whose count of bytes done
    /// keeps growing is waited for as long as it lasts, one whose count stalls is given up
    /// `timeout` after it last grew. `on_progress` gets the bytes the agent reports done.
    pub async fn request_watched(
        &self,
        host: &str,
        body: AgentRequest,
        timeout: Duration,
        on_progress: impl Fn(u64),
    ) -> Result<AgentReply, ApiError> {
        let id = self.next_id();
        let (tx, mut rx) = oneshot::channel();
        let (progress, mut progressed) = watch::channel(0u64);
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
            conn.pending.insert(
                id,
                Pending {
                    answer: tx,
                    progress,
                },
            );
        }
        let mut deadline = tokio::time::Instant::now() + timeout;
        let mut done = 0u64;
        let answer = loop {
            tokio::select! {
                answer = &mut rx => break Some(answer),
                changed = progressed.changed() => match changed {
                    Ok(()) => {
                        let bytes = *progressed.borrow_and_update();
                        if bytes != done {
                            done = bytes;
                            deadline = tokio::time::Instant::now() + timeout;
                            on_progress(bytes);
                        }
                    }
                    // The request is gone (answered, or its host disconnected): the answer
                    // says which.
                    Err(_) => break Some((&mut rx).await),
                },
                () = tokio::time::sleep_until(deadline) => break None,
            }
        };
        match answer {
            Some(Ok(Ok(reply))) => Ok(reply),
            Some(Ok(Err(e))) => Err(agent_error(e)),
            Some(Err(_)) => Err(ApiError::Unavailable(format!(
                "host {host:?} disconnected before answering"
            ))),
            None => {
                if let Some(c) = self.conns.lock().expect("agents lock").get_mut(host) {
                    c.pending.remove(&id);
                }
                Err(ApiError::Unavailable(format!(
                    "host {host:?} did not answer nor report progress within {}s",
                    timeout.as_secs()
                )))
            }
        }
    }

    /// An agent says request `id` is under way, `bytes` done.
    pub fn progress(&self, host: &str, id: u64, bytes: u64) {
        if let Some(p) = self
            .conns
            .lock()
            .expect("agents lock")
            .get(host)
            .and_then(|c| c.pending.get(&id))
        {
            p.progress.send_replace(bytes);
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
            let _ = w.answer.send(result);
        }
    }

    pub fn send(&self, host: &str, msg: ToAgent) {
        if let Some(c) = self.conns.lock().expect("agents lock").get(host) {
            c.queue(Outgoing::Json(Box::new(msg)));
        }
    }

    /// Sends `view` to `host`, a view made otherwise than by `push_views` (the next one
    /// from there is sent whatever its key).
    pub fn push_view(&self, host: &str, view: AgentView) {
        let mut conns = self.conns.lock().expect("agents lock");
        if let Some(c) = conns.get_mut(host) {
            c.last_view = None;
            c.queue(Outgoing::Json(self.stamped(view)));
        }
    }

    /// Whether `host` is connected and its last view was not made of `key`.
    pub fn view_changed(&self, host: &str, key: &ViewKey) -> bool {
        let conns = self.conns.lock().expect("agents lock");
        conns
            .get(host)
            .is_some_and(|c| c.last_view.as_ref() != Some(key))
    }

    /// Sends `host` its view `view`, made of `key`.
    pub fn push_view_of(&self, host: &str, key: ViewKey, view: AgentView) {
        let mut conns = self.conns.lock().expect("agents lock");
        if let Some(c) = conns.get_mut(host) {
            c.last_view = Some(key);
            c.queue(Outgoing::Json(self.stamped(view)));
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
        ErrorKind::Moved => ApiError::Moved(e.message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The id of the next request `rx` carries for the agent.
    async fn next_request(rx: &mut mpsc::Receiver<Outgoing>) -> u64 {
        loop {
            if let Some(Outgoing::Json(msg)) = rx.recv().await {
                if let ToAgent::Request { id, .. } = *msg {
                    return id;
                }
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_whose_work_keeps_growing_is_waited_for_and_one_that_stalls_is_not() {
        let agents = Arc::new(Agents::default());
        let (_, mut rx, _) = agents.attach("h1");
        let timeout = Duration::from_secs(5);
        // Growing for 30 s, six times the timeout: answered.
        let a = agents.clone();
        let seen = Arc::new(AtomicU64::new(0));
        let seen2 = seen.clone();
        let waiting = tokio::spawn(async move {
            a.request_watched("h1", AgentRequest::HostStats, timeout, |b| {
                seen2.store(b, Ordering::Relaxed)
            })
            .await
        });
        let id = next_request(&mut rx).await;
        for second in 1..=30u64 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            agents.progress("h1", id, second << 20);
        }
        agents.resolve("h1", id, Ok(AgentReply::Done));
        assert!(matches!(waiting.await.unwrap(), Ok(AgentReply::Done)));
        // What came before the answer was seen (the last report may race the answer).
        assert!(seen.load(Ordering::Relaxed) >= 29 << 20);
        // Reports that say nothing grew: given up one timeout after the last growth.
        let a = agents.clone();
        let started = tokio::time::Instant::now();
        let waiting = tokio::spawn(async move {
            let result = a
                .request_watched("h1", AgentRequest::HostStats, timeout, |_| {})
                .await;
            (result, started.elapsed())
        });
        let id = next_request(&mut rx).await;
        agents.progress("h1", id, 7);
        for _ in 0..30 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            agents.progress("h1", id, 7);
        }
        let (result, after) = waiting.await.unwrap();
        assert!(
            matches!(&result, Err(ApiError::Unavailable(m)) if m.contains("progress")),
            "{result:?}"
        );
        assert!(after < Duration::from_secs(7), "given up after {after:?}");
    }
}
