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
    pub fn resolve(url: &str, ca: Option<PathBuf>, token: Option<String>) -> Access {
        let url = match url.strip_prefix("http://") {
            Some(rest) => format!("https://{rest}"),
            None => url.to_string(),
        };
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
    let wanted = authority(url);
    for entry in std::fs::read_dir(LABS_DIR).into_iter().flatten().flatten() {
        let file = entry.path().join("lab.json");
        let Ok(bytes) = std::fs::read(&file) else {
            continue;
        };
        let lab: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        if lab["controller"].as_str().map(authority) == Some(wanted.clone()) {
            return Some(entry.path().join("controller"));
        }
    }
    let local = wanted.starts_with("127.0.0.1:") || wanted.starts_with("localhost:");
    (local && Path::new(DEFAULT_DATA_DIR).is_dir()).then(|| PathBuf::from(DEFAULT_DATA_DIR))
}

pub struct Client {
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
        Ok(Client {
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

    fn get_req(&self, path: &str) -> ureq::RequestBuilder<ureq::typestate::WithoutBody> {
        self.authorized(self.agent.get(&self.url(path)))
    }

    fn post_req(&self, path: &str) -> ureq::RequestBuilder<ureq::typestate::WithBody> {
        self.authorized(self.agent.post(&self.url(path)))
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    fn unreachable(&self, e: ureq::Error) -> anyhow::Error {
        anyhow!(
            "cannot reach the controller at {}: {e} (start a lab with `vane lab up`, or set --controller / VANE_CONTROLLER)",
            self.base
        )
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
        let resp = self.get_req(path).call().map_err(|e| self.unreachable(e))?;
        read_json(self.check(resp)?)
    }

    pub fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        let resp = self
            .post_req(path)
            .send_json(body)
            .map_err(|e| self.unreachable(e))?;
        read_json(self.check(resp)?)
    }

    pub fn delete(&self, path: &str) -> Result<()> {
        let req = self.authorized(self.agent.delete(&self.url(path)));
        let resp = req.call().map_err(|e| self.unreachable(e))?;
        self.check(resp).map(|_| ())
    }

    /// A request whose answer is a stream of frames (exec, logs).
    pub fn stream<B: Serialize>(&self, path: &str, body: Option<&B>) -> Result<impl Read> {
        let resp = match body {
            Some(b) => self.post_req(path).send_json(b),
            None => self.get_req(path).call(),
        }
        .map_err(|e| self.unreachable(e))?;
        Ok(self.check(resp)?.into_body().into_reader())
    }
}

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
        let rest = self
            .base
            .split_once("://")
            .map_or(self.base.as_str(), |(_, r)| r);
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
        let resp = self
            .post_req(path)
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
