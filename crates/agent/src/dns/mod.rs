//! The resolver of every instance: the agent answers DNS at 127.0.0.53:53 inside each
//! instance's network namespace (UDP and TCP), from the directory it holds, and sends what
//! is not a name of the instance's world to the host's resolvers if the instance's net has
//! egress. What it answers is decided in `zone`; this file is the I/O around it.
//!
//! Why sockets inside the instance's namespace, made by the agent: the instance reaches
//! them over its own loopback, with no route or rule to add, and no packet of it crosses
//! the switch; the source of a query is the namespace it arrived in, so the agent knows who
//! asks without trusting a byte of the query. A short-lived thread joins the namespace to
//! make them (`vane_sys::netns::in_netns`, as for the TUN device); the agent's other
//! threads never change namespace. They are bound before the program starts and without
//! `SO_REUSEADDR`/`SO_REUSEPORT`, so no process inside can bind the address beside them
//! (a test tries). Root inside can still send its own queries elsewhere (its namespace and
//! its mounts are its own): it can only fool itself, and nothing it does changes what
//! another instance is told.
//!
//! The sockets are the agent's, not the instance's: a checkpoint does not carry them (the
//! tree does not hold them) and the agent makes new ones wherever the instance runs next
//! (`Agent::adopt`: a restore, a migration's destination, an agent restarted). They hold
//! the network namespace, so they are dropped (`Server`) before it is removed.
//!
//! Bounded: each instance's resolver takes at most `RATE` queries a second (beyond that
//! its socket is left unread and the kernel drops what overflows, at no cost to the agent),
//! `MAX_WORK` forwarded queries and TCP connections at once, and TCP connections that say
//! nothing for `IDLE` are closed.

mod zone;

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio::task::JoinSet;

use vane_proto::stream::AgentView;

pub(crate) use zone::{resolv_conf, Client};
use zone::{Outcome, Zone};

/// Where every instance finds its resolver (the address systemd-resolved uses for its stub,
/// which programs and people recognise).
pub(crate) const ADDR: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 53), 53);

/// Queries a second one instance may ask, and how many at once beyond that rate.
const RATE: f64 = 1000.0;
const BURST: f64 = 200.0;
/// Forwarded queries and TCP connections of one instance under way at once.
const MAX_WORK: usize = 16;
/// Queries one TCP connection may carry, and how long it may stay silent.
const MAX_TCP_QUERIES: usize = 100;
const IDLE: Duration = Duration::from_secs(10);
/// How long one of the host's resolvers has to answer a forwarded query.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);

/// The resolver's side of the agent: the directory as last applied, and the host's
/// resolvers.
pub(crate) struct Resolver {
    zone: watch::Sender<Arc<Zone>>,
    upstreams: Arc<Vec<SocketAddr>>,
}

impl Resolver {
    pub(crate) fn new(upstreams: Vec<SocketAddr>) -> Resolver {
        Resolver {
            zone: watch::channel(Arc::new(Zone::default())).0,
            upstreams: Arc::new(upstreams),
        }
    }

    /// The names as last applied, for answering without a socket (a gateway's client,
    /// from the switch's thread: `answer_datagram`).
    pub(crate) fn names(&self) -> Names {
        self.zone.subscribe()
    }

    /// Answers follow `view` from the next query on.
    pub(crate) fn update(&self, view: &AgentView) {
        self.zone.send_replace(Arc::new(Zone::from_view(view)));
    }

    /// Serves `client`'s queries on `sockets` until the returned `Server` is dropped. Must
    /// be called on the runtime.
    pub(crate) fn serve(&self, sockets: Sockets, client: Client) -> io::Result<Server> {
        let udp = UdpSocket::from_std(sockets.udp)?;
        let tcp = TcpListener::from_std(sockets.tcp)?;
        let ctx = Arc::new(Context {
            client,
            zone: self.zone.subscribe(),
            upstreams: self.upstreams.clone(),
            bucket: Mutex::new(Bucket::new(Instant::now())),
        });
        Ok(Server(tokio::spawn(serve(udp, tcp, ctx))))
    }
}

/// The host's resolvers, from the text of its /etc/resolv.conf (read by the agent in its
/// own namespaces, never an instance's).
pub(crate) fn upstreams(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("nameserver")).then_some(())?;
            let ip: std::net::IpAddr = words.next()?.split('%').next()?.parse().ok()?;
            Some(SocketAddr::new(ip, 53))
        })
        .take(3)
        .collect()
}

/// The names a resolver answers from, as the directory last gave them.
pub(crate) type Names = watch::Receiver<Arc<Zone>>;

/// The answer to a query that came as `bytes` in a UDP datagram from `client`, from
/// `names` alone: a WireGuard gateway's client, whose queries its host's switch thread
/// answers itself (it forwards nothing, so names of the outside are refused). `None`: not
/// a query, left unanswered.
pub(crate) fn answer_datagram(names: &Names, client: &Client, bytes: &[u8]) -> Option<Vec<u8>> {
    let query = Message::from_vec(bytes).ok()?;
    if query.metadata.message_type != MessageType::Query {
        return None;
    }
    let zone = names.borrow().clone();
    let reply = match zone::answer(&zone, client, &query) {
        Outcome::Answer(reply) => reply,
        Outcome::Forward => failure(&query, ResponseCode::Refused),
    };
    encode(reply, udp_limit(&query))
}

/// An answer with no records: the query's failure with `code`.
fn failure(query: &Message, code: ResponseCode) -> Message {
    let mut r = Message::error_msg(query.metadata.id, query.metadata.op_code, code);
    r.metadata.recursion_desired = query.metadata.recursion_desired;
    r.add_queries(query.queries.iter().cloned());
    r
}

/// The largest answer a UDP client of `query` takes.
fn udp_limit(query: &Message) -> usize {
    query.edns.as_ref().map_or(512, |e| {
        usize::from(e.max_payload().clamp(512, zone::EDNS_PAYLOAD))
    })
}

/// `reply` in at most `limit` bytes: whole if it fits, else the question alone, truncated
/// (the client asks again over TCP).
fn encode(reply: Message, limit: usize) -> Option<Vec<u8>> {
    let encoded = reply.to_vec().ok()?;
    if encoded.len() <= limit {
        return Some(encoded);
    }
    reply.truncate().to_vec().ok()
}

/// An instance's resolver sockets, bound inside its network namespace.
pub(crate) struct Sockets {
    udp: std::net::UdpSocket,
    tcp: std::net::TcpListener,
}

/// Binds `ADDR` (UDP and TCP) inside the network namespace `netns`. Blocking.
pub(crate) fn bind(netns: &str) -> io::Result<Sockets> {
    let path = crate::netconf::netns_path(netns);
    vane_sys::netns::in_netns(&path, || {
        // Neither sets SO_REUSEPORT, and the UDP socket not SO_REUSEADDR: nothing binds
        // beside them. (std sets SO_REUSEADDR on TCP listeners, which on Linux lets no one
        // bind a port that is listened on.)
        let udp = std::net::UdpSocket::bind(ADDR)?;
        let tcp = std::net::TcpListener::bind(ADDR)?;
        udp.set_nonblocking(true)?;
        tcp.set_nonblocking(true)?;
        Ok(Sockets { udp, tcp })
    })
    .map_err(|e| io::Error::new(e.kind(), format!("resolver {ADDR} in {netns}: {e}")))
}

/// One instance's resolver: it stops, and its sockets close, when this is dropped.
pub(crate) struct Server(tokio::task::JoinHandle<()>);

impl Drop for Server {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Context {
    client: Client,
    zone: watch::Receiver<Arc<Zone>>,
    upstreams: Arc<Vec<SocketAddr>>,
    bucket: Mutex<Bucket>,
}

impl Context {
    /// Waits for the instance's turn to ask (`RATE`).
    async fn turn(&self) {
        loop {
            let wait = self.bucket.lock().expect("bucket").take(Instant::now());
            match wait {
                None => return,
                Some(d) => tokio::time::sleep(d).await,
            }
        }
    }

    /// `bytes` read as a query, and what to do with it; `None`: not a query we can read,
    /// left unanswered.
    fn decide(&self, bytes: &[u8]) -> Option<(Message, Outcome)> {
        let query = Message::from_vec(bytes).ok()?;
        if query.metadata.message_type != MessageType::Query {
            return None;
        }
        let zone = self.zone.borrow().clone();
        let outcome = zone::answer(&zone, &self.client, &query);
        Some((query, outcome))
    }

    /// The bytes to send back for `query`, which came as `bytes` over UDP or TCP.
    async fn respond(
        &self,
        query: &Message,
        outcome: Outcome,
        bytes: &[u8],
        tcp: bool,
    ) -> Option<Vec<u8>> {
        let reply = match outcome {
            Outcome::Answer(reply) => reply,
            Outcome::Forward => match forward(&self.upstreams, query, bytes, tcp).await {
                Some(r) => return Some(r),
                None => failure(query, ResponseCode::ServFail),
            },
        };
        let limit = if tcp {
            usize::from(u16::MAX)
        } else {
            udp_limit(query)
        };
        encode(reply, limit)
    }
}

async fn serve(udp: UdpSocket, tcp: TcpListener, ctx: Arc<Context>) {
    let udp = Arc::new(udp);
    // Forwarded queries and TCP connections: aborted with this task.
    let mut work: JoinSet<()> = JoinSet::new();
    let mut buf = vec![0u8; 4096];
    loop {
        ctx.turn().await;
        tokio::select! {
            received = udp.recv_from(&mut buf) => {
                let Ok((n, peer)) = received else { continue };
                let bytes = &buf[..n];
                let Some((query, outcome)) = ctx.decide(bytes) else { continue };
                if let Outcome::Forward = outcome {
                    // The host's resolvers take their time: off the loop, a bounded number.
                    if work.len() >= MAX_WORK {
                        continue;
                    }
                    let (ctx, udp, bytes) = (ctx.clone(), udp.clone(), bytes.to_vec());
                    work.spawn(async move {
                        if let Some(reply) = ctx.respond(&query, outcome, &bytes, false).await {
                            let _ = udp.send_to(&reply, peer).await;
                        }
                    });
                } else if let Some(reply) = ctx.respond(&query, outcome, bytes, false).await {
                    let _ = udp.send_to(&reply, peer).await;
                }
            }
            accepted = tcp.accept(), if work.len() < MAX_WORK => {
                if let Ok((stream, _)) = accepted {
                    work.spawn(tcp_connection(stream, ctx.clone()));
                }
            }
            Some(_) = work.join_next(), if !work.is_empty() => {}
        }
    }
}

async fn tcp_connection(mut stream: TcpStream, ctx: Arc<Context>) {
    for _ in 0..MAX_TCP_QUERIES {
        let Ok(Ok(len)) = tokio::time::timeout(IDLE, stream.read_u16()).await else {
            return;
        };
        let mut bytes = vec![0u8; usize::from(len)];
        if !matches!(
            tokio::time::timeout(IDLE, stream.read_exact(&mut bytes)).await,
            Ok(Ok(_))
        ) {
            return;
        }
        ctx.turn().await;
        let Some((query, outcome)) = ctx.decide(&bytes) else {
            return;
        };
        let Some(reply) = ctx.respond(&query, outcome, &bytes, true).await else {
            return;
        };
        let Ok(len) = u16::try_from(reply.len()) else {
            return;
        };
        let mut out = Vec::with_capacity(reply.len() + 2);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&reply);
        if !matches!(
            tokio::time::timeout(IDLE, stream.write_all(&out)).await,
            Ok(Ok(()))
        ) {
            return;
        }
    }
}

/// Asks the host's resolvers, one after the other, the query `bytes` under an id of our
/// own; their answer with the client's id again, or `None`.
async fn forward(
    upstreams: &[SocketAddr],
    query: &Message,
    bytes: &[u8],
    tcp: bool,
) -> Option<Vec<u8>> {
    for upstream in upstreams {
        let id: u16 = rand::random();
        let mut out = bytes.to_vec();
        out[..2].copy_from_slice(&id.to_be_bytes());
        let exchanged = tokio::time::timeout(FORWARD_TIMEOUT, async {
            if tcp {
                exchange_tcp(*upstream, &out).await
            } else {
                exchange_udp(*upstream, &out, id, query).await
            }
        })
        .await;
        if let Ok(Ok(mut reply)) = exchanged {
            if answers(&reply, id, query) {
                reply[..2].copy_from_slice(&query.metadata.id.to_be_bytes());
                return Some(reply);
            }
        }
    }
    None
}

/// Whether `reply` is the answer to `query` asked under `id`.
fn answers(reply: &[u8], id: u16, query: &Message) -> bool {
    let Ok(r) = Message::from_vec(reply) else {
        return false;
    };
    r.metadata.message_type == MessageType::Response
        && r.metadata.id == id
        && r.queries.len() == query.queries.len()
        && r.queries.iter().zip(&query.queries).all(|(a, b)| {
            a.query_type() == b.query_type()
                && a.query_class() == b.query_class()
                && a.name() == b.name()
        })
}

async fn exchange_udp(
    upstream: SocketAddr,
    out: &[u8],
    id: u16,
    query: &Message,
) -> io::Result<Vec<u8>> {
    let local: SocketAddr = if upstream.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(upstream).await?;
    socket.send(out).await?;
    let mut buf = vec![0u8; usize::from(u16::MAX)];
    loop {
        let n = socket.recv(&mut buf).await?;
        if answers(&buf[..n], id, query) {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn exchange_tcp(upstream: SocketAddr, out: &[u8]) -> io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(upstream).await?;
    let len = u16::try_from(out.len()).map_err(|_| io::Error::other("query too long"))?;
    stream.write_all(&len.to_be_bytes()).await?;
    stream.write_all(out).await?;
    let len = stream.read_u16().await?;
    let mut reply = vec![0u8; usize::from(len)];
    stream.read_exact(&mut reply).await?;
    Ok(reply)
}

/// A token bucket: `RATE` a second, at most `BURST` saved.
pub(crate) struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    pub(crate) fn new(now: Instant) -> Bucket {
        Bucket {
            tokens: BURST,
            at: now,
        }
    }

    /// Takes a token, or says how long until there is one.
    pub(crate) fn take(&mut self, now: Instant) -> Option<Duration> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * RATE).min(BURST);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            None
        } else {
            Some(Duration::from_secs_f64((1.0 - self.tokens) / RATE))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hosts_resolvers_come_from_its_resolv_conf() {
        let text = "# comment\nnameserver 10.255.255.53\nsearch example.org\n\
                    nameserver fe80::1%eth0\nnameserver bogus\noptions edns0\n";
        assert_eq!(
            upstreams(text),
            vec![
                "10.255.255.53:53".parse().unwrap(),
                "[fe80::1]:53".parse().unwrap()
            ]
        );
    }

    #[test]
    fn the_bucket_keeps_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(t0);
        for _ in 0..BURST as usize {
            assert_eq!(b.take(t0), None);
        }
        let wait = b.take(t0).expect("empty");
        assert!(wait <= Duration::from_secs_f64(1.0 / RATE) + Duration::from_micros(1));
        assert_eq!(b.take(t0 + Duration::from_millis(10)), None);
        // 10 ms give RATE / 100 tokens, minus the one just taken.
        let n = (0..1000)
            .take_while(|_| b.take(t0 + Duration::from_millis(10)).is_none())
            .count();
        assert_eq!(n, (RATE / 100.0) as usize - 1);
    }
}
