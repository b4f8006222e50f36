//! Bulk transfers of packed images, streamed: from an agent to the CLI (`vane snapshot`),
//! from the CLI to an agent (`vane restore`), from one agent to another (`vane migrate`).
//!
//! The controller never holds an image whole. An agent moves images over a connection of
//! its own (`GET /v1/agents/transfers/TICKET`, a WebSocket inside TLS), named by a ticket
//! the controller gave it with the request on its control stream: single use, bound to that
//! host, claimed with the host's credential, forgotten after [`UNCLAIMED`]. Each transfer is
//! a bounded channel of pieces of up to 1 MiB: a slow reader holds the writer back, and
//! memory stays at a few pieces per transfer, whatever the images' size. A transfer that
//! makes no progress for [`STALL`] is broken off.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket};
use tokio::sync::mpsc;

use crate::state::ApiError;

/// What flows through a transfer.
#[derive(Debug)]
pub enum Piece {
    Data(Bytes),
    /// Everything was sent. A channel that closes without it is a broken transfer.
    End,
}

/// The largest piece an agent sends (its messages are 1 MiB).
pub const MAX_PIECE: usize = 1 << 20;
/// Pieces in flight per transfer.
const DEPTH: usize = 4;
/// How long a ticket waits for its agent.
pub const UNCLAIMED: Duration = Duration::from_secs(60);
/// How long a transfer may make no progress.
pub const STALL: Duration = Duration::from_secs(30);
/// The text message that ends a transfer on the agent's connection.
const END: &str = "end";

pub(crate) enum Side {
    /// The agent sends: its pieces go into this.
    FromAgent(mpsc::Sender<Piece>),
    /// The agent receives what comes out of this.
    ToAgent(mpsc::Receiver<Piece>),
    /// Both ways at once (an exec with a client on a WebSocket): the agent's pieces go
    /// into the sender, the client's messages come out of the receiver, whose end means the
    /// client is gone.
    Both(mpsc::Sender<Piece>, mpsc::Receiver<Bytes>),
}

struct Slot {
    host: String,
    made: Instant,
    side: Side,
    /// How long the agent's side may be silent: [`STALL`] for images, none for the
    /// output of a command (which may say nothing for hours).
    stall: Option<Duration>,
}

#[derive(Default)]
pub struct Transfers {
    open: Mutex<HashMap<String, Slot>>,
}

impl Transfers {
    fn add(&self, host: &str, side: Side, stall: Option<Duration>) -> String {
        let ticket = crate::enroll::new_secret("vanexfer-");
        let mut open = self.open.lock().expect("transfers lock");
        open.retain(|_, s| s.made.elapsed() < UNCLAIMED);
        open.insert(
            ticket.clone(),
            Slot {
                host: host.to_string(),
                made: Instant::now(),
                side,
                stall,
            },
        );
        ticket
    }

    /// A transfer `host` will send: its ticket, and where its pieces arrive.
    pub fn sent_by(&self, host: &str) -> (String, mpsc::Receiver<Piece>) {
        let (tx, rx) = mpsc::channel(DEPTH);
        (self.add(host, Side::FromAgent(tx), Some(STALL)), rx)
    }

    /// The output of a command `host` will send (exec, logs): frames, each a piece, with
    /// no limit on silence.
    pub fn output_of(&self, host: &str) -> (String, mpsc::Receiver<Piece>) {
        let (tx, rx) = mpsc::channel(DEPTH);
        (self.add(host, Side::FromAgent(tx), None), rx)
    }

    /// A command `host` will run for a client that talks back (an exec WebSocket): its
    /// ticket, where its frames arrive, and where the client's frames go to it. Dropping
    /// the sender tells the agent the client is gone.
    pub fn session_of(&self, host: &str) -> (String, mpsc::Receiver<Piece>, mpsc::Sender<Bytes>) {
        let (tx, rx) = mpsc::channel(DEPTH);
        let (in_tx, in_rx) = mpsc::channel(DEPTH);
        (self.add(host, Side::Both(tx, in_rx), None), rx, in_tx)
    }

    /// A transfer `host` will receive: its ticket, and where to put its pieces.
    pub fn sent_to(&self, host: &str) -> (String, mpsc::Sender<Piece>) {
        let (tx, rx) = mpsc::channel(DEPTH);
        (self.add(host, Side::ToAgent(rx), Some(STALL)), tx)
    }

    /// Forgets `ticket` if its agent never claimed it, which ends the transfer for whoever
    /// waits on the other side.
    pub fn cancel(&self, ticket: &str) {
        self.open.lock().expect("transfers lock").remove(ticket);
    }

    /// Tickets no agent has claimed yet.
    #[cfg(test)]
    pub(crate) fn unclaimed(&self) -> usize {
        self.open.lock().expect("transfers lock").len()
    }

    /// Takes `ticket` for `host` (once): `None` when it is unknown, spent, expired or
    /// another host's.
    pub fn claim(&self, ticket: &str, host: &str) -> Option<Claimed> {
        let mut open = self.open.lock().expect("transfers lock");
        let slot = open.get(ticket)?;
        if slot.host != host || slot.made.elapsed() >= UNCLAIMED {
            return None;
        }
        open.remove(ticket).map(|s| Claimed(s.side, s.stall))
    }
}

/// A transfer its agent has claimed (`GET /v1/agents/transfers/{ticket}`).
pub struct Claimed(Side, Option<Duration>);

impl Claimed {
    /// Moves the transfer's pieces over the agent's connection.
    pub async fn serve(self, ws: WebSocket) {
        let result = match self.0 {
            Side::FromAgent(tx) => from_agent(ws, tx, self.1).await,
            Side::ToAgent(rx) => to_agent(ws, rx).await,
            Side::Both(tx, rx) => both(ws, tx, rx).await,
        };
        if let Err(e) = result {
            tracing::warn!("transfer: {e}");
        }
    }
}

#[cfg(test)]
impl Claimed {
    /// The agent's end of the transfer, for agents played in-process (the workflows'
    /// tests) rather than over a connection.
    pub(crate) fn side(self) -> Side {
        self.0
    }
}

/// What the agent's next message on a transfer connection is: a piece, nothing to pass on
/// (`None`: pings and the like), or the end of the connection before its `end`.
fn piece_of(next: Option<Result<Message, axum::Error>>) -> Result<Option<Piece>, String> {
    match next {
        Some(Ok(Message::Binary(data))) => Ok(Some(Piece::Data(data))),
        Some(Ok(Message::Text(t))) if t.as_str() == END => Ok(Some(Piece::End)),
        Some(Ok(Message::Close(_))) | None => Err("the agent closed its connection early".into()),
        Some(Ok(_)) => Ok(None),
        Some(Err(e)) => Err(format!("the agent's connection broke: {e}")),
    }
}

/// Pieces the agent sends, into `tx`, up to its `end`.
async fn from_agent(
    mut ws: WebSocket,
    tx: mpsc::Sender<Piece>,
    stall: Option<Duration>,
) -> Result<(), String> {
    loop {
        let next = match stall {
            Some(limit) => tokio::time::timeout(limit, ws.recv())
                .await
                .map_err(|_| stalled())?,
            None => ws.recv().await,
        };
        let Some(piece) = piece_of(next)? else {
            continue;
        };
        let end = matches!(piece, Piece::End);
        if tx.send(piece).await.is_err() {
            return Err("nobody waits for the images any more".into());
        }
        if end {
            let _ = ws.send(Message::Close(None)).await;
            return Ok(());
        }
    }
}

/// The agent's pieces into `tx` up to its `end` (as [`from_agent`]), and at the same time,
/// each at its own pace, the client's messages from `rx` to the agent. A client that goes
/// (`rx` ends) closes the agent's connection: the agent hangs its command up.
async fn both(
    ws: WebSocket,
    tx: mpsc::Sender<Piece>,
    mut rx: mpsc::Receiver<Bytes>,
) -> Result<(), String> {
    use futures_util::{SinkExt, StreamExt};
    let (mut sink, mut stream) = ws.split();
    let from = async {
        loop {
            let Some(piece) = piece_of(stream.next().await)? else {
                continue;
            };
            let end = matches!(piece, Piece::End);
            if tx.send(piece).await.is_err() {
                return Err("the client is gone".into());
            }
            if end {
                return Ok(());
            }
        }
    };
    let to = async {
        while let Some(data) = rx.recv().await {
            if sink.send(Message::Binary(data)).await.is_err() {
                break;
            }
        }
    };
    let result = {
        tokio::pin!(from, to);
        tokio::select! {
            r = &mut from => r,
            // The client is gone: the close tells the agent.
            () = &mut to => Err("the client is gone".into()),
        }
    };
    let _ = sink.send(Message::Close(None)).await;
    result
}

/// Pieces from `rx`, to the agent, and `end` if they all came.
async fn to_agent(mut ws: WebSocket, mut rx: mpsc::Receiver<Piece>) -> Result<(), String> {
    loop {
        let piece = match tokio::time::timeout(STALL, rx.recv()).await {
            Ok(Some(p)) => p,
            // The sending side gave up: the agent sees a transfer without its end.
            Ok(None) => {
                let _ = ws.send(Message::Close(None)).await;
                return Err("the images ended early".into());
            }
            Err(_) => return Err(stalled()),
        };
        let msg = match piece {
            Piece::Data(data) => Message::Binary(data),
            Piece::End => Message::Text(END.into()),
        };
        let end = matches!(msg, Message::Text(_));
        tokio::time::timeout(STALL, ws.send(msg))
            .await
            .map_err(|_| stalled())?
            .map_err(|e| format!("the agent's connection broke: {e}"))?;
        if end {
            // The agent closes once the images are on its disk.
            let _ = tokio::time::timeout(STALL, ws.recv()).await;
            return Ok(());
        }
    }
}

fn stalled() -> String {
    format!("the transfer made no progress for {}s", STALL.as_secs())
}

/// The next piece from `rx`, with [`STALL`] as the limit.
pub async fn next(rx: &mut mpsc::Receiver<Piece>) -> Result<Piece, ApiError> {
    match tokio::time::timeout(STALL, rx.recv()).await {
        Ok(Some(p)) => Ok(p),
        Ok(None) => Err(ApiError::Unavailable("the images ended early".into())),
        Err(_) => Err(ApiError::Unavailable(stalled())),
    }
}

/// Puts `piece` into `tx`, with [`STALL`] as the limit.
pub async fn put(tx: &mpsc::Sender<Piece>, piece: Piece) -> Result<(), ApiError> {
    match tokio::time::timeout(STALL, tx.send(piece)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(ApiError::Unavailable(
            "the receiving host stopped taking the images".into(),
        )),
        Err(_) => Err(ApiError::Unavailable(stalled())),
    }
}

/// Moves pieces from `rx` to `tx` up to the end; returns the number of bytes.
pub async fn pipe(mut rx: mpsc::Receiver<Piece>, tx: mpsc::Sender<Piece>) -> Result<u64, ApiError> {
    let mut bytes = 0u64;
    loop {
        let piece = next(&mut rx).await?;
        let end = matches!(piece, Piece::End);
        if let Piece::Data(d) = &piece {
            bytes += d.len() as u64;
        }
        put(&tx, piece).await?;
        if end {
            return Ok(bytes);
        }
    }
}

/// How long an agent may take to answer a transfer of `bytes`: generous, since a stalled
/// transfer is broken off much earlier ([`STALL`]).
pub fn answer_within(bytes: u64) -> Duration {
    Duration::from_secs(60 + bytes / (1 << 20))
}
