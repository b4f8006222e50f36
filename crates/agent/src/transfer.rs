//! Bulk transfers of packed images between this agent and the controller.
//!
//! Images are too large for the control stream: they would hold up the directory lookups
//! and views behind them, and travel as base64 in JSON. Each transfer has a connection of
//! its own, opened by the agent (so that agents behind NAT keep working) to
//! `/v1/agents/transfers/TICKET` on the controller, inside TLS with the controller's pinned
//! certificate: a WebSocket carrying binary messages of up to [`CHUNK`] bytes, then a text
//! message `end`. The ticket comes with the request on the control stream and is good for
//! one connection; the agent also presents its host credential. The file is read and
//! written a chunk at a time: memory does not grow with the images, and a slow reader
//! slows the writer down (TCP's flow control all the way through).

use std::io;
use std::path::{Path, PathBuf};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use vane_proto::stream::AgentError;

use crate::Agent;

/// Bytes per message.
pub const CHUNK: usize = 1 << 20;
/// The text message that ends a transfer: anything short of it is a broken transfer.
pub const END: &str = "end";
/// Header naming the host whose credential the request carries.
pub const HOST_HEADER: &str = "x-vane-host";

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens the transfer connection of `ticket`.
async fn connect(agent: &Agent, ticket: &str) -> Result<Socket, AgentError> {
    let url = crate::control::controller_ws_url(agent, &format!("/v1/agents/transfers/{ticket}"));
    let (pin, credential) = {
        let state = agent.state();
        let id = &state.identity;
        (id.ca_pin.expect("checked at start"), id.credential.clone())
    };
    let credential = credential.ok_or("this host has no credential yet")?;
    let mut req = url
        .as_str()
        .into_client_request()
        .map_err(|e| format!("transfer {url}: {e}"))?;
    let headers = req.headers_mut();
    let value = |s: &str| {
        s.parse()
            .map_err(|_| AgentError::from(format!("transfer: a header cannot carry {s:?}")))
    };
    headers.insert("authorization", value(&format!("Bearer {credential}"))?);
    headers.insert(HOST_HEADER, value(&agent.cfg.name)?);
    let connector = tokio_tungstenite::Connector::Rustls(crate::pin::client_config(pin));
    let (ws, _) =
        tokio_tungstenite::connect_async_tls_with_config(req, None, true, Some(connector))
            .await
            .map_err(|e| format!("cannot open the transfer connection to the controller: {e}"))?;
    Ok(ws)
}

/// Sends the file at `path` as transfer `ticket`; returns its length.
pub async fn send(agent: &Agent, ticket: &str, path: &Path) -> Result<u64, AgentError> {
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|e| format!("reading {}: {e}", path.display()))?;
    let mut ws = connect(agent, ticket).await?;
    let lost = |e| AgentError::from(format!("the transfer connection broke: {e}"));
    let mut sent = 0u64;
    loop {
        let mut buf = vec![0u8; CHUNK];
        let filled = read_full(&mut file, &mut buf)
            .await
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        if filled == 0 {
            break;
        }
        buf.truncate(filled);
        sent += filled as u64;
        ws.send(Message::Binary(buf.into())).await.map_err(lost)?;
    }
    end(ws).await?;
    Ok(sent)
}

/// Sends the end of a transfer and waits for the controller to close, which it does once
/// it has everything.
async fn end(mut ws: Socket) -> Result<(), AgentError> {
    ws.send(Message::Text(END.into()))
        .await
        .map_err(|e| format!("the transfer connection broke: {e}"))?;
    while let Some(msg) = ws.next().await {
        if msg.is_err() {
            break;
        }
    }
    Ok(())
}

/// Sends what comes out of `frames` (each an encoded `api::frame`) as transfer `ticket`,
/// then the end. The channel is bounded: a slow reader at the far end holds the producer
/// back (the output of `vane exec` waits in the program's pipe, not in memory).
pub async fn send_frames(
    agent: &Agent,
    ticket: &str,
    mut frames: tokio::sync::mpsc::Receiver<Vec<u8>>,
) -> Result<(), AgentError> {
    let mut ws = connect(agent, ticket).await?;
    let lost = |e| AgentError::from(format!("the transfer connection broke: {e}"));
    while let Some(frame) = frames.recv().await {
        ws.send(Message::Binary(frame.into())).await.map_err(lost)?;
    }
    end(ws).await
}

/// As [`send_frames`], while what the far end sends (one frame a message: a client's stdin
/// and resize frames) goes into `incoming`, each direction at its own pace. `Ok` once every
/// frame was sent and the controller closed; an error if the connection ended first: the
/// client is gone.
pub async fn duplex(
    agent: &Agent,
    ticket: &str,
    mut frames: tokio::sync::mpsc::Receiver<Vec<u8>>,
    incoming: tokio::sync::mpsc::Sender<Vec<u8>>,
) -> Result<(), AgentError> {
    let ws = connect(agent, ticket).await?;
    let (mut sink, mut stream) = ws.split();
    let lost = |e| AgentError::from(format!("the transfer connection broke: {e}"));
    let send = async {
        while let Some(frame) = frames.recv().await {
            sink.send(Message::Binary(frame.into()))
                .await
                .map_err(lost)?;
        }
        sink.send(Message::Text(END.into())).await.map_err(lost)
    };
    // Ends when the controller closes: after the end was sent, or because the client left.
    let receive = async {
        let mut incoming = Some(incoming);
        while let Some(Ok(msg)) = stream.next().await {
            match msg {
                Message::Binary(data) => {
                    // A command that no longer reads: the rest is dropped, and the
                    // connection still watched for its end.
                    if let Some(tx) = &incoming {
                        if tx.send(data.into()).await.is_err() {
                            incoming = None;
                        }
                    }
                }
                Message::Close(_) => break,
                _ => {}
            }
        }
    };
    tokio::pin!(send, receive);
    tokio::select! {
        sent = &mut send => {
            sent?;
            receive.await;
            Ok(())
        }
        () = &mut receive => Err("the client went away before the command ended".into()),
    }
}

/// Receives transfer `ticket`, `bytes` long, into a new file at `path` (0600); a transfer
/// that ends early or runs long leaves no file.
pub async fn receive(
    agent: &Agent,
    ticket: &str,
    path: &Path,
    bytes: u64,
) -> Result<(), AgentError> {
    let result = receive_into(agent, ticket, path, bytes).await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(path).await;
    }
    result
}

async fn receive_into(
    agent: &Agent,
    ticket: &str,
    path: &Path,
    bytes: u64,
) -> Result<(), AgentError> {
    let mut file = ImageFile::create(path, bytes).await?;
    let mut ws = connect(agent, ticket).await?;
    loop {
        let msg = match ws.next().await {
            Some(Ok(m)) => m,
            Some(Err(e)) => return Err(format!("the transfer connection broke: {e}").into()),
            None => break,
        };
        match msg {
            Message::Binary(data) => file.write(&data).await?,
            Message::Text(t) if t.as_str() == END => {
                file.finish().await?;
                let _ = ws.close(None).await;
                return Ok(());
            }
            Message::Close(_) => break,
            _ => {}
        }
    }
    Err(file.cut_short().into())
}

/// Reads from `r` until `buf` is full or the end comes: a short read is not the end of a
/// file. Returns how much it read.
pub async fn read_full(r: &mut (impl AsyncRead + Unpin), buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = r.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

/// Packed images as they arrive, from the controller or straight from another host: a new
/// file only the agent can read, never longer than announced, and whole only once all the
/// announced bytes came.
pub struct ImageFile {
    file: tokio::io::BufWriter<tokio::fs::File>,
    path: PathBuf,
    received: u64,
    bytes: u64,
}

impl ImageFile {
    /// A new file at `path` (whatever was there goes) for `bytes` bytes.
    pub async fn create(path: &Path, bytes: u64) -> Result<ImageFile, String> {
        let _ = tokio::fs::remove_file(path).await;
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .await
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
        Ok(ImageFile {
            file: tokio::io::BufWriter::with_capacity(1 << 20, file),
            path: path.to_path_buf(),
            received: 0,
            bytes,
        })
    }

    /// The next bytes.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), String> {
        self.received += data.len() as u64;
        if self.received > self.bytes {
            return Err(format!(
                "the images are longer than the {} bytes announced",
                self.bytes
            ));
        }
        self.file
            .write_all(data)
            .await
            .map_err(|e| format!("writing {}: {e}", self.path.display()))
    }

    /// The end: all the bytes came, and are in the file.
    pub async fn finish(mut self) -> Result<(), String> {
        if self.received != self.bytes {
            return Err(self.cut_short());
        }
        // Flushed, not synced: the restore reads them back through the page cache at once,
        // and a host that crashes first fails the migration whatever is on its disk.
        self.file
            .flush()
            .await
            .map_err(|e| format!("writing {}: {e}", self.path.display()))
    }

    /// Why images that stop here are not whole.
    pub fn cut_short(&self) -> String {
        format!(
            "the images ended after {} of {} bytes",
            self.received, self.bytes
        )
    }
}
