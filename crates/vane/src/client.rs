//! The CLI's HTTP client of the controller API: one clear error line for every failure.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;

use vane_proto::api::ErrorBody;

/// Where the CLI finds the controller when neither `--controller` nor `VANE_CONTROLLER` is
/// given: `vane lab up` writes the URL of the default lab's controller here.
pub const CURRENT_CONTROLLER_FILE: &str = "/run/vane/controller";

pub fn default_controller() -> String {
    std::fs::read_to_string(CURRENT_CONTROLLER_FILE)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("https://127.0.0.1:{}", vane_proto::DEFAULT_API_PORT))
}

/// Where labs keep their state, each with its controller's data directory.
pub const LABS_DIR: &str = "/var/lib/vane/labs";
/// The data directory of a `vane controller` started with the defaults.
const DEFAULT_DATA_DIR: &str = "/var/lib/vane/controller";

/// What the CLI needs to talk to a controller: its URL, the CA that certifies it, the
/// credential it presents.
pub struct Access {
    pub url: String,
    pub ca: Option<PathBuf>,
    pub token: Option<String>,
}

impl Access {
    /// The controller at `url` (its API speaks only HTTPS: `http://` is taken to mean
    /// `https://`), with the CA certificate and credential given, or else those of the lab
    /// (or of the default `vane controller`) on this machine that serves that URL.
    /// `url` may name several replicas, comma-separated.
    pub fn resolve(url: &str, ca: Option<PathBuf>, token: Option<String>) -> Access {
        let url = url
            .split(',')
            .map(|u| match u.trim().strip_prefix("http://") {
                Some(rest) => format!("https://{rest}"),
                None => u.trim().to_string(),
            })
            .collect::<Vec<_>>()
            .join(",");
        let local = local_data_dir(&url);
        let ca = ca.or_else(|| {
            local
                .as_ref()
                .map(|d| d.join(vane_controller::tls::CA_CERT_FILE))
        });
        let token = token.or_else(|| {
            let file = local
                .as_ref()?
                .join(vane_controller::auth::ADMIN_TOKEN_FILE);
            std::fs::read_to_string(file)
                .ok()
                .map(|t| t.trim().to_string())
        });
        Access { url, ca, token }
    }

    /// The controller of the lab whose state is in `lab_dir`.
    pub fn of_lab(url: &str, lab_dir: &Path) -> Access {
        let data = lab_dir.join("controller");
        Access {
            url: url.to_string(),
            ca: Some(data.join(vane_controller::tls::CA_CERT_FILE)),
            token: std::fs::read_to_string(data.join(vane_controller::auth::ADMIN_TOKEN_FILE))
                .ok()
                .map(|t| t.trim().to_string()),
        }
    }
}

/// The data directory of the controller on this machine that serves `url`: a lab's, or
/// the default one for a local address.
fn local_data_dir(url: &str) -> Option<PathBuf> {
    let authority = |u: &str| {
        u.split_once("://")
            .map_or(u, |(_, r)| r)
            .trim_end_matches('/')
            .to_string()
    };
    let wanted: Vec<String> = url.split(',').map(authority).collect();
    for entry in std::fs::read_dir(LABS_DIR).into_iter().flatten().flatten() {
        let file = entry.path().join("lab.json");
        let Ok(bytes) = std::fs::read(&file) else {
            continue;
        };
        let lab: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        // A lab's replicas share its first one's CA and credential.
        let serves = lab["controller"]
            .as_str()
            .is_some_and(|list| list.split(',').any(|u| wanted.contains(&authority(u))));
        if serves {
            return Some(entry.path().join("controller"));
        }
    }
    let wanted = wanted.first().cloned().unwrap_or_default();
    let local = wanted.starts_with("127.0.0.1:") || wanted.starts_with("localhost:");
    (local && Path::new(DEFAULT_DATA_DIR).is_dir()).then(|| PathBuf::from(DEFAULT_DATA_DIR))
}

pub struct Client {
    /// The replicas' base URLs; requests go to `leader` first.
    bases: Vec<String>,
    /// The replica that answered last (or a standby named as the leader).
    leader: std::sync::Mutex<String>,
    base: String,
    agent: ureq::Agent,
    /// The controller's CA certificate, for the connections ureq does not make (WebSockets).
    ca: Option<PathBuf>,
    /// The `Authorization` header, if there is a credential.
    auth: Option<String>,
}

type Resp = ureq::http::Response<ureq::Body>;

impl Client {
    pub fn new(access: &Access) -> Result<Client> {
        let mut tls = ureq::tls::TlsConfig::builder();
        if let Some(ca) = &access.ca {
            let pem = std::fs::read(ca).map_err(|e| {
                anyhow!(
                    "cannot read the controller's CA certificate {}: {e} (give it with --ca or VANE_CA)",
                    ca.display()
                )
            })?;
            let cert = ureq::tls::Certificate::from_pem(&pem)
                .map_err(|e| anyhow!("{} is not a PEM certificate: {e}", ca.display()))?;
            tls = tls.root_certs(ureq::tls::RootCerts::Specific(Arc::new(vec![cert])));
        }
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(3)))
            .tls_config(tls.build())
            .build()
            .into();
        let bases: Vec<String> = access
            .url
            .split(',')
            .map(|u| u.trim().trim_end_matches('/').to_string())
            .filter(|u| !u.is_empty())
            .collect();
        let first = bases
            .first()
            .cloned()
            .ok_or_else(|| anyhow!("no controller URL in {:?}", access.url))?;
        Ok(Client {
            leader: std::sync::Mutex::new(first),
            bases,
            base: access.url.trim_end_matches('/').to_string(),
            agent,
            ca: access.ca.clone(),
            auth: access.token.as_deref().map(vane_proto::trust::bearer),
        })
    }

    /// `req` with the credential, if there is one.
    fn authorized<B>(&self, req: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.auth {
            Some(a) => req.header("Authorization", a),
            None => req,
        }
    }

    fn unreachable(&self, e: ureq::Error) -> anyhow::Error {
        anyhow!(
            "cannot reach the controller at {}: {e} (start a lab with `vane lab up`, or set --controller / VANE_CONTROLLER)",
            self.base
        )
    }

    fn current(&self) -> String {
        self.leader.lock().expect("leader lock").clone()
    }

    /// Sends a request made by `make` (given the base URL of a replica) to the leader: to
    /// the replica that answered last, else to the leader a standby names, else round the
    /// replicas, for up to `FAILOVER_PATIENCE` while none leads (an election after the
    /// leader died). A single controller is asked once (and the leader it names, if it is
    /// a standby). `retried` tells whether the answer came after a request that may have
    /// reached a replica that then died.
    fn send(&self, make: &dyn Fn(&str) -> Result<Resp, ureq::Error>) -> Result<(Resp, bool)> {
        let patient = self.bases.len() > 1;
        let deadline = std::time::Instant::now() + FAILOVER_PATIENCE;
        let mut base = self.current();
        let mut retried = false;
        let mut tried = 0;
        // Leaders named in a row: standbys that name each other (an election in between)
        // do not keep the client going round.
        let mut hops = 0;
        loop {
            let failure = match make(&base) {
                Ok(resp) if resp.status() == 503 && self.is_standby(&resp) => {
                    let named = resp
                        .headers()
                        .get(vane_proto::LEADER_HEADER)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                        .filter(|l| *l != base);
                    if let Some(leader) = named.filter(|_| hops < 3) {
                        hops += 1;
                        base = leader;
                        continue;
                    }
                    if !patient {
                        return Ok((resp, retried));
                    }
                    format!("{base} is a standby")
                }
                Ok(resp) => {
                    *self.leader.lock().expect("leader lock") = base;
                    return Ok((resp, retried));
                }
                Err(e) if !patient => return Err(self.unreachable(e)),
                Err(e) => {
                    // Refused before the request went out: nothing happened. Otherwise
                    // the replica may have done it before it died.
                    let before_sending = matches!(
                        e,
                        ureq::Error::ConnectionFailed | ureq::Error::HostNotFound
                    ) || matches!(&e, ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused);
                    retried |= !before_sending;
                    format!("{base}: {e}")
                }
            };
            tried += 1;
            hops = 0;
            if std::time::Instant::now() >= deadline {
                bail!(
                    "no controller replica answers as the leader ({failure}; tried {}) (set --controller / VANE_CONTROLLER)",
                    self.bases.join(", ")
                );
            }
            let at = self
                .bases
                .iter()
                .position(|b| *b == base)
                .map_or(0, |i| i + 1);
            base = self.bases[at % self.bases.len()].clone();
            if tried % self.bases.len() == 0 {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }

    /// Whether a 503 comes from a standby that knows no leader yet (rather than from the
    /// leader, about something unavailable).
    fn is_standby(&self, resp: &Resp) -> bool {
        resp.headers()
            .get("x-vane-role")
            .is_some_and(|v| v.as_bytes() == b"standby")
    }

    /// Turns a non-2xx answer into its error line.
    fn check(&self, mut resp: Resp) -> Result<Resp> {
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        match serde_json::from_str::<ErrorBody>(&text) {
            Ok(e) => bail!("{}", e.error),
            Err(_) => bail!("controller answered {status}: {}", text.trim()),
        }
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let (resp, _) = self.send(&|base| {
            self.authorized(self.agent.get(format!("{base}{path}")))
                .call()
        })?;
        read_json(self.check(resp)?)
    }

    pub fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        self.post_keyed(path, body, None)
    }

    /// `post`, with a key that makes sending it again safe (`vane run`): a replica that
    /// took it and died, and the leader after it, answer it once.
    pub fn post_keyed<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        key: Option<&str>,
    ) -> Result<T> {
        let (resp, _) = self.send(&|base| {
            let req = self.authorized(self.agent.post(format!("{base}{path}")));
            match key {
                Some(k) => req.header(vane_proto::IDEMPOTENCY_HEADER, k),
                None => req,
            }
            .send_json(body)
        })?;
        read_json(self.check(resp)?)
    }

    pub fn delete(&self, path: &str) -> Result<()> {
        let (resp, retried) = self.send(&|base| {
            self.authorized(self.agent.delete(format!("{base}{path}")))
                .call()
        })?;
        // Sent again after a replica died with it: it may have done it already.
        if retried && resp.status() == 404 {
            return Ok(());
        }
        self.check(resp).map(|_| ())
    }

    /// A request whose answer is a stream of frames (exec, logs).
    pub fn stream<B: Serialize>(&self, path: &str, body: Option<&B>) -> Result<impl Read> {
        let (resp, _) = self.send(&|base| {
            let url = format!("{base}{path}");
            match body {
                Some(b) => self.authorized(self.agent.post(url)).send_json(b),
                None => self.authorized(self.agent.get(url)).call(),
            }
        })?;
        Ok(self.check(resp)?.into_body().into_reader())
    }

    /// The base URL of the replica that leads now (the only one given, if one is).
    pub fn leader_url(&self) -> Result<String> {
        self.find_leader()
    }

    /// The leader's base URL, asked first where a request cannot be sent twice (a body
    /// streamed from a file, a WebSocket).
    fn find_leader(&self) -> Result<String> {
        if self.bases.len() > 1 {
            let (resp, _) = self.send(&|base| {
                self.authorized(self.agent.get(format!("{base}/v1/status")))
                    .call()
            })?;
            drop(resp);
        }
        Ok(self.current())
    }
}

/// How long the CLI looks for a leader among replicas. An election after the leader died
/// takes the lease's life (3 s) and the new leader's load of the store and wait for its
/// agents (up to 3 s). When an etcd member dies, etcd may have to elect a leader of its own
/// first; a replica that could not keep its lease meanwhile stands down and starts again, and
/// its old lease lives on for its life after etcd's new leader takes over. On a loaded
/// machine of two cores that chain once took more than 15 s.
const FAILOVER_PATIENCE: Duration = Duration::from_secs(30);

/// A WebSocket to the controller.
pub type WebSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

impl Client {
    /// Opens a WebSocket on `path` (the exec session), inside TLS with the controller's CA;
    /// an answer other than the upgrade is its error line.
    pub async fn websocket(&self, path: &str) -> Result<WebSocket> {
        use rustls::pki_types::pem::PemObject;
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let ca = self.ca.as_ref().ok_or_else(|| {
            anyhow!("no CA certificate for the controller: give it with --ca or VANE_CA")
        })?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).map_err(|e| {
            anyhow!(
                "cannot read the controller's CA certificate {}: {e}",
                ca.display()
            )
        })? {
            let cert =
                cert.map_err(|e| anyhow!("{} is not a PEM certificate: {e}", ca.display()))?;
            roots
                .add(cert)
                .map_err(|e| anyhow!("{} is not a usable CA certificate: {e}", ca.display()))?;
        }
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        // The upgrade is HTTP/1.1's.
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let base = self.find_leader()?;
        let rest = base.split_once("://").map_or(base.as_str(), |(_, r)| r);
        let url = format!("wss://{rest}{path}");
        let mut req = url
            .as_str()
            .into_client_request()
            .map_err(|e| anyhow!("bad controller URL {url}: {e}"))?;
        if let Some(a) = &self.auth {
            req.headers_mut().insert(
                "authorization",
                a.parse()
                    .map_err(|_| anyhow!("the credential cannot go in a header"))?,
            );
        }
        let connector = tokio_tungstenite::Connector::Rustls(Arc::new(tls));
        match tokio_tungstenite::connect_async_tls_with_config(req, None, true, Some(connector))
            .await
        {
            Ok((ws, _)) => Ok(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let status = resp.status();
                let text = resp
                    .body()
                    .as_deref()
                    .map(String::from_utf8_lossy)
                    .unwrap_or_default()
                    .to_string();
                match serde_json::from_str::<ErrorBody>(&text) {
                    Ok(e) => bail!("{}", e.error),
                    Err(_) => bail!("controller answered {status}: {}", text.trim()),
                }
            }
            Err(e) => bail!(
                "cannot reach the controller at {}: {e} (start a lab with `vane lab up`, or set --controller / VANE_CONTROLLER)",
                self.base
            ),
        }
    }

    /// A request whose body is a stream (`content_type`), answered with JSON.
    pub fn post_stream<T: DeserializeOwned>(
        &self,
        path: &str,
        content_type: &str,
        body: impl Read + 'static,
    ) -> Result<T> {
        let base = self.find_leader()?;
        let resp = self
            .authorized(self.agent.post(format!("{base}{path}")))
            .header("Content-Type", content_type)
            .send(ureq::SendBody::from_owned_reader(body))
            .map_err(|e| self.unreachable(e))?;
        read_json(self.check(resp)?)
    }
}

/// Parses an answer as it arrives, whatever its size (a snapshot's is its images).
fn read_json<T: DeserializeOwned>(resp: Resp) -> Result<T> {
    let reader = std::io::BufReader::new(resp.into_body().into_reader());
    serde_json::from_reader(reader).map_err(|e| {
        if e.is_io() {
            anyhow!("reading the controller's answer: {e}")
        } else {
            anyhow!("unexpected answer from the controller: {e}")
        }
    })
}
