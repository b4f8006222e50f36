//! The CLI's HTTP client of the controller API: one clear error line for every failure.

use std::io::Read;
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
        .unwrap_or_else(|| format!("http://127.0.0.1:{}", vane_proto::DEFAULT_API_PORT))
}

pub struct Client {
    base: String,
    agent: ureq::Agent,
}

type Resp = ureq::http::Response<ureq::Body>;

impl Client {
    pub fn new(base: &str) -> Client {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(3)))
            .build()
            .into();
        Client {
            base: base.trim_end_matches('/').to_string(),
            agent,
        }
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
        let resp = self
            .agent
            .get(&self.url(path))
            .call()
            .map_err(|e| self.unreachable(e))?;
        read_json(self.check(resp)?)
    }

    pub fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        let resp = self
            .agent
            .post(&self.url(path))
            .send_json(body)
            .map_err(|e| self.unreachable(e))?;
        read_json(self.check(resp)?)
    }

    pub fn delete(&self, path: &str) -> Result<()> {
        let resp = self
            .agent
            .delete(&self.url(path))
            .call()
            .map_err(|e| self.unreachable(e))?;
        self.check(resp).map(|_| ())
    }

    /// A request whose answer is a stream of frames (exec, logs).
    pub fn stream<B: Serialize>(&self, path: &str, body: Option<&B>) -> Result<impl Read> {
        let resp = match body {
            Some(b) => self.agent.post(&self.url(path)).send_json(b),
            None => self.agent.get(&self.url(path)).call(),
        }
        .map_err(|e| self.unreachable(e))?;
        Ok(self.check(resp)?.into_body().into_reader())
    }
}

fn read_json<T: DeserializeOwned>(mut resp: Resp) -> Result<T> {
    let text = resp
        .body_mut()
        .read_to_string()
        .map_err(|e| anyhow!("reading the controller's answer: {e}"))?;
    serde_json::from_str(&text).map_err(|e| anyhow!("unexpected answer from the controller: {e}"))
}
