//! The host's identity on disk: its static key for tunnels, its key for WireGuard
//! clients (a key of its own: a key is used with one protocol only), and the credential the
//! controller gave it when it enrolled, in `STATE/host.json` (mode 0600). Kept across agent
//! restarts so that the host stays the same host: peers keep accepting its handshakes and
//! the controller keeps accepting its credential.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use vane_proto::hex;
use vane_tunnel::Keypair;

const FILE: &str = "host.json";

#[derive(Serialize, Deserialize)]
struct OnDisk {
    private_key: String,
    credential: Option<String>,
    /// The pin of the controller's CA (hex), from the join token.
    #[serde(default)]
    ca_pin: Option<String>,
    /// The X25519 private key WireGuard clients of this host's gateways handshake with
    /// (hex); made when an identity without one is loaded.
    #[serde(default)]
    gateway_key: Option<String>,
}

pub struct Identity {
    pub keypair: Keypair,
    pub credential: Option<String>,
    /// The controller's CA, pinned when the host joined.
    pub ca_pin: Option<vane_proto::trust::Pin>,
    /// The private key of the host's WireGuard gateways.
    pub gateway_key: [u8; 32],
    path: PathBuf,
}

fn random_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    rand::Rng::fill(&mut rand::thread_rng(), &mut key);
    key
}

impl Identity {
    /// Loads the identity from `state_dir`, or makes a new key if there is none yet.
    pub fn load_or_create(state_dir: &Path) -> anyhow::Result<Identity> {
        let path = state_dir.join(FILE);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let disk: OnDisk = serde_json::from_slice(&bytes)
                    .with_context(|| format!("read host identity {}", path.display()))?;
                let private = hex::decode::<32>(&disk.private_key).with_context(|| {
                    format!("host identity {}: bad private key", path.display())
                })?;
                let gateway_key = disk.gateway_key.as_deref().and_then(hex::decode::<32>);
                let id = Identity {
                    keypair: Keypair::from_private(private),
                    credential: disk.credential,
                    ca_pin: disk.ca_pin.as_deref().and_then(hex::decode::<32>),
                    gateway_key: gateway_key.unwrap_or_else(random_key),
                    path,
                };
                if gateway_key.is_none() {
                    id.save()?;
                }
                Ok(id)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id = Identity {
                    keypair: Keypair::generate(),
                    credential: None,
                    ca_pin: None,
                    gateway_key: random_key(),
                    path,
                };
                id.save()?;
                Ok(id)
            }
            Err(e) => Err(e).with_context(|| format!("read host identity {}", path.display())),
        }
    }

    pub fn public_key_hex(&self) -> String {
        hex::encode(&self.keypair.public)
    }

    /// Records the credential of a new enrollment.
    pub fn set_credential(&mut self, credential: String) -> anyhow::Result<()> {
        self.credential = Some(credential);
        self.save()
    }

    /// Pins the controller's CA (from a join token).
    pub fn set_ca_pin(&mut self, pin: vane_proto::trust::Pin) -> anyhow::Result<()> {
        self.ca_pin = Some(pin);
        self.save()
    }

    /// Writes the file whole under a temporary name, then renames it: a crash leaves the
    /// old identity or the new one, never half of one.
    fn save(&self) -> anyhow::Result<()> {
        let disk = OnDisk {
            private_key: hex::encode(&self.keypair.private),
            credential: self.credential.clone(),
            ca_pin: self.ca_pin.map(|p| hex::encode(&p)),
            gateway_key: Some(hex::encode(&self.gateway_key)),
        };
        let tmp = self.path.with_extension("json.tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("write {}", tmp.display()))?;
        f.write_all(&serde_json::to_vec_pretty(&disk).expect("serializes"))?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)
            .with_context(|| format!("write {}", self.path.display()))?;
        Ok(())
    }
}
