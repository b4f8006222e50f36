//! The agent's side of the control stream: connecting, the session's messages, lookups
//! forwarded, progress of long requests. The streamed requests are in `streams`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use vane_proto::api::GatewayEndpoint;
use vane_proto::stream::{FromAgent, HostAuth, ToAgent};

use crate::Agent;

/// Messages waiting for the controller. A controller that falls this far behind is treated
/// as lost: the agent reconnects, and its hello says where things stand.
pub const OUTBOX: usize = 1024;

/// The controller's address, from its base URL (`http://HOST:PORT`).
pub fn controller_addr(url: &str) -> Option<SocketAddr> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next()?;
    let with_port = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    with_port.to_socket_addrs().ok()?.next()
}

/// The controllers' base URLs in `list`: `--controller`, comma-separated replicas.
pub fn controller_urls(list: &str) -> Vec<String> {
    list.split(',')
        .map(|u| u.trim().trim_end_matches('/'))
        .filter(|u| !u.is_empty())
        .map(str::to_string)
        .collect()
}

/// The WebSocket URL of `path` on the replica the control stream is open to (its API speaks
/// only TLS).
pub fn controller_ws_url(agent: &Agent, path: &str) -> String {
    ws_url(&agent.controller_now.lock().expect("controller lock"), path)
}

fn ws_url(base: &str, path: &str) -> String {
    let rest = base.split_once("://").map_or(base, |(_, r)| r);
    format!("wss://{rest}{path}")
}

/// The address this host reaches `dst` from: the source address the kernel picks for it.
fn source_address(dst: SocketAddr) -> Option<IpAddr> {
    let probe = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    probe.connect(dst).ok()?;
    Some(probe.local_addr().ok()?.ip())
}

impl Agent {
    /// Where other hosts reach this host's switch: the configured locator, or the address
    /// this host reaches the controller from with the listen port.
    fn locator(&self) -> Option<SocketAddr> {
        if let Some(l) = self.cfg.locator {
            return Some(l);
        }
        let ip = source_address(self.controller_addr?)?;
        Some(SocketAddr::new(ip, self.cfg.listen.port()))
    }
}

/// Passes the switch's directory lookups to the controller. While disconnected they are
/// dropped: the packets that wait for them expire, as they would for a missing member.
pub async fn forward_lookups(agent: Arc<Agent>, mut rx: mpsc::Receiver<(u32, Ipv4Addr)>) {
    while let Some((net, ip)) = rx.recv().await {
        agent.send(FromAgent::Lookup { net, ip });
    }
}

/// Opens a control stream (or any WebSocket) at `url` on the controller, through TLS that
/// `tls` checks (the pinned CA: `pin::client_config`).
pub async fn connect(
    url: &str,
    tls: Arc<rustls::ClientConfig>,
) -> Result<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    tokio_tungstenite::tungstenite::Error,
> {
    let connector = tokio_tungstenite::Connector::Rustls(tls);
    // No Nagle: small messages that wait on each other (a lookup and its answer, a
    // request's reply) must not wait for the controller's delayed ACK.
    let (ws, _) =
        tokio_tungstenite::connect_async_tls_with_config(url, None, true, Some(connector)).await?;
    Ok(ws)
}

/// How a host proves who it is in its hello: its credential once it has one, else the
/// secret of its join token (the pin the token carries is this side's business).
pub fn hello_auth(credential: Option<&str>, join_token: Option<&str>) -> Option<HostAuth> {
    match (credential, join_token) {
        (Some(c), _) => Some(HostAuth::Credential(c.to_string())),
        (None, Some(t)) => Some(HostAuth::Token(
            vane_proto::trust::split_join_token(t).map_or(t.to_string(), |(s, _)| s.into()),
        )),
        (None, None) => None,
    }
}

/// Connects to the controller and reconnects whenever the stream ends, until the
/// controller refuses this host; returns why. With several replicas it goes round them:
/// to the leader a standby names first, else to the next one. While disconnected the
/// switch keeps forwarding with the tables it has.
pub async fn connect_loop(agent: Arc<Agent>) -> String {
    let replicas = controller_urls(&agent.cfg.controller);
    let pin = agent.state().identity.ca_pin.expect("checked at start");
    let tls = crate::pin::client_config(pin);
    // Replicas are tried at once one after the other; the wait grows only after a round.
    let longest = if replicas.len() > 1 {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(2)
    };
    let mut backoff = Duration::from_millis(100);
    let mut next = 0;
    let mut named: Option<String> = None;
    loop {
        let base = named.take().unwrap_or_else(|| {
            let this = next;
            next = (next + 1) % replicas.len();
            replicas[this].clone()
        });
        let url = ws_url(&base, "/v1/agents/connect");
        match connect(&url, tls.clone()).await {
            Ok(ws) => {
                backoff = Duration::from_millis(100);
                *agent.controller_now.lock().expect("controller lock") = base;
                match session(agent.clone(), ws).await {
                    SessionEnd::Refused(reason) => {
                        return format!("the controller refused this host: {reason}")
                    }
                    SessionEnd::Moved => {
                        tracing::info!("this host's underlay address changed, reconnecting");
                        continue;
                    }
                    SessionEnd::Lost => tracing::warn!("lost the controller, reconnecting"),
                }
            }
            // A standby: it names the leader, if one leads.
            Err(tokio_tungstenite::tungstenite::Error::Http(resp))
                if resp.status()
                    == tokio_tungstenite::tungstenite::http::StatusCode::SERVICE_UNAVAILABLE =>
            {
                named = resp
                    .headers()
                    .get(vane_proto::LEADER_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
                    .filter(|l| *l != base);
                tracing::debug!(standby = %base, leader = ?named, "a standby replica");
                if named.is_some() {
                    continue;
                }
            }
            // A controller that fails the pin is worth a line; a stopped one is routine. A
            // host that has not joined yet gives up: its token names another controller.
            // One that has keeps trying (an impostor on the underlay must not stop it).
            Err(e) if e.to_string().contains("pinned") => {
                let enrolled = agent.state().identity.credential.is_some();
                if !enrolled {
                    return format!(
                        "the controller at {url} is not the one the join token names: {e}"
                    );
                }
                tracing::warn!("refusing the controller at {url}: {e}")
            }
            Err(e) => tracing::debug!("cannot reach the controller at {url}: {e}"),
        }
        if next == 0 || replicas.len() == 1 {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(longest);
        }
    }
}

enum SessionEnd {
    Lost,
    /// The locator changed: the controller must hear the new one (and the old connection
    /// may be bound to an address the host no longer has).
    Moved,
    Refused(String),
}

async fn session<S>(agent: Arc<Agent>, ws: tokio_tungstenite::WebSocketStream<S>) -> SessionEnd
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::channel::<FromAgent>(OUTBOX);
    // Registered before the hello is built, so no report can fall between the two.
    *agent.outbox.lock().expect("outbox lock") = Some(tx);
    let locator = agent.locator();
    let (public_key, gateway, auth) = {
        let state = agent.state();
        let id = &state.identity;
        let Some(auth) = hello_auth(id.credential.as_deref(), agent.cfg.join_token.as_deref())
        else {
            return SessionEnd::Refused("no credential and no join token".into());
        };
        let gateway = agent.cfg.gateway_listen.map(|listen| GatewayEndpoint {
            public_key: crate::gateway::Gateways::public_key_base64(id.gateway_key),
            port: listen.port(),
        });
        (id.public_key_hex(), gateway, auth)
    };
    let hello = FromAgent::Hello {
        name: agent.cfg.name.clone(),
        locator,
        public_key,
        gateway,
        auth,
        instances: agent.reports(),
    };
    let hello = serde_json::to_string(&hello).expect("serializes");
    if sink.send(Message::Text(hello.into())).await.is_err() {
        return SessionEnd::Lost;
    }
    let mut writer = tokio::spawn(async move {
        // Pings say this host is alive while the reader is busy (removing stale copies,
        // applying a large view), when it cannot answer the controller's pings.
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        loop {
            let msg = tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => Message::Text(serde_json::to_string(&m).expect("serializes").into()),
                    None => break,
                },
                _ = heartbeat.tick() => Message::Ping(Vec::new().into()),
            };
            if sink.send(msg).await.is_err() {
                break;
            }
        }
    });
    let mut check = tokio::time::interval(Duration::from_secs(1));
    let end = loop {
        let msg = tokio::select! {
            m = stream.next() => m,
            // The connection broke, or the outbox overflowed (`Agent::send`).
            _ = &mut writer => break SessionEnd::Lost,
            _ = check.tick() => {
                if agent.cfg.locator.is_none() && agent.locator() != locator {
                    break SessionEnd::Moved;
                }
                continue;
            }
        };
        let Some(Ok(msg)) = msg else {
            break SessionEnd::Lost;
        };
        let Message::Text(text) = msg else { continue };
        let msg: ToAgent = match serde_json::from_str(&text) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("bad message from controller: {e}");
                continue;
            }
        };
        match msg {
            ToAgent::Welcome {
                host_id,
                config,
                credential,
                stale,
            } => {
                tracing::info!(host_id, ?locator, "registered with the controller");
                // Copies that run elsewhere now (this host was declared dead) end before
                // anything else is read: no view that follows meets two of one identity.
                for id in stale {
                    tracing::warn!(instance = %id, "not this host's any more: ending and removing it");
                    if let Err(e) = agent.remove_now(&id).await {
                        tracing::warn!(instance = %id, "removing a stale instance: {e}");
                    }
                }
                if let Some(c) = credential {
                    if let Err(e) = agent.state().identity.set_credential(c) {
                        tracing::error!("cannot save this host's credential: {e:#}");
                    }
                }
                agent.set_cluster(host_id, config);
                if let Some(ready) = &agent.cfg.ready {
                    ready.notify_one();
                }
            }
            ToAgent::Refused { reason } => break SessionEnd::Refused(reason),
            ToAgent::Resolved { net, ip, member } => agent.resolved(net, ip, member),
            // Applied in order: a request that follows a view sees it.
            ToAgent::View(view) => agent.apply_view(view).await,
            ToAgent::Request { id, body } => {
                let agent = agent.clone();
                tokio::spawn(async move {
                    // Long work says every second that it goes on (and how far): the
                    // controller waits as long as it does.
                    let ticker = agent.progress_of(&body).map(|counted| {
                        let agent = agent.clone();
                        tokio::spawn(async move {
                            let mut every = tokio::time::interval(PROGRESS_EVERY);
                            every.tick().await;
                            loop {
                                every.tick().await;
                                let bytes = counted.bytes();
                                agent.send(FromAgent::Progress { id, bytes });
                            }
                        })
                    });
                    let result = agent.clone().handle(body).await;
                    if let Some(ticker) = ticker {
                        ticker.abort();
                    }
                    agent.send(FromAgent::Response { id, result });
                });
            }
        }
    };
    *agent.outbox.lock().expect("outbox lock") = None;
    writer.abort();
    end
}

/// How often the agent pings the controller (`vane controller --host-grace` should be
/// several times this).
const HEARTBEAT: Duration = Duration::from_millis(500);

/// How often long requests report progress (`FromAgent::Progress`): often enough for a
/// live display, a few small messages a second.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// What a long request counts as its progress (`Agent::progress_of`).
pub(crate) enum Counted {
    /// Only that it goes on.
    Nothing,
    /// The bytes at a path: a file's length, or a directory's files' (not below it).
    Size(std::path::PathBuf),
    /// The memory charged to an instance's cgroups.
    Memory(Vec<std::path::PathBuf>),
}

impl Counted {
    fn bytes(&self) -> u64 {
        match self {
            Counted::Nothing => 0,
            Counted::Size(path) => bytes_at(path),
            Counted::Memory(cgroups) => crate::cgroup::usage(cgroups).memory,
        }
    }
}

fn bytes_at(path: &std::path::Path) -> u64 {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => std::fs::read_dir(path)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum(),
        Ok(m) => m.len(),
        Err(_) => 0,
    }
}
