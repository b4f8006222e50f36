//! Who may use the API. An admin credential is made with the controller's data directory
//! (`admin.token`, 0600): whoever can read that file is the cluster's administrator. Every
//! request but an agent's stream must carry it (`Authorization: Bearer`), inside TLS. The
//! controller keeps its hash, and compares hashes.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::enroll::{hash, new_secret};
use crate::state::ApiError;

/// Who is asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Admin,
    /// A tenant credential's holder: sees and changes only that tenant's nets, instances,
    /// templates and policies.
    Tenant(String),
}

impl Caller {
    /// Only the administrator may (hosts, join tokens, credentials).
    pub fn admin_only(&self, what: &str) -> Result<(), ApiError> {
        match self {
            Caller::Admin => Ok(()),
            Caller::Tenant(t) => Err(ApiError::Forbidden(format!(
                "{what} is for the administrator, not for tenant {t:?}"
            ))),
        }
    }

    /// Whether the caller may see and change what belongs to `tenant`.
    pub fn may(&self, tenant: &str) -> bool {
        match self {
            Caller::Admin => true,
            Caller::Tenant(t) => t == tenant,
        }
    }

    /// `may`, as an answer naming `what` is refused.
    pub fn check(&self, tenant: &str, what: &str) -> Result<(), ApiError> {
        if self.may(tenant) {
            return Ok(());
        }
        Err(ApiError::Forbidden(format!(
            "{what} belongs to another tenant"
        )))
    }
}

/// A tenant credential as stored: its hash, never the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialRecord {
    pub hash: String,
    pub tenant: String,
    pub expires: Option<u64>,
}

impl CredentialRecord {
    pub fn id(&self) -> &str {
        &self.hash[..12.min(self.hash.len())]
    }

    pub fn info(&self) -> vane_proto::api::CredentialInfo {
        vane_proto::api::CredentialInfo {
            id: self.id().to_string(),
            tenant: self.tenant.clone(),
            expires: self.expires,
        }
    }
}

/// A new tenant credential: the secret (shown once) and what is stored of it.
pub fn new_tenant_credential(tenant: &str, expires: Option<u64>) -> (String, CredentialRecord) {
    let secret = new_secret("vanetenant-");
    let record = CredentialRecord {
        hash: hash(&secret),
        tenant: tenant.to_string(),
        expires,
    };
    (secret, record)
}

pub const ADMIN_TOKEN_FILE: &str = "admin.token";

pub struct Credentials {
    admin_hash: String,
}

impl Credentials {
    /// Reads the admin credential from `data_dir`, or makes it.
    pub fn load_or_create(data_dir: &Path) -> anyhow::Result<Credentials> {
        let path = data_dir.join(ADMIN_TOKEN_FILE);
        let bytes = crate::secrets::read_or_create(&path, || {
            format!("{}\n", new_secret("vaneadmin-")).into_bytes()
        })?;
        let token = String::from_utf8_lossy(&bytes).trim().to_string();
        anyhow::ensure!(!token.is_empty(), "{}: empty credential", path.display());
        Ok(Credentials {
            admin_hash: hash(&token),
        })
    }

    /// Whether `token` is the admin credential. Hashes are compared, every byte of them,
    /// so the time says nothing of the credential.
    pub fn is_admin(&self, token: &str) -> bool {
        let given = hash(token);
        given.len() == self.admin_hash.len()
            && given
                .bytes()
                .zip(self.admin_hash.bytes())
                .fold(0u8, |d, (a, b)| d | (a ^ b))
                == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_credential_is_made_once_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let creds = Credentials::load_or_create(dir.path()).unwrap();
        let token = std::fs::read_to_string(dir.path().join(ADMIN_TOKEN_FILE)).unwrap();
        assert!(creds.is_admin(token.trim()));
        assert!(!creds.is_admin(""));
        assert!(!creds.is_admin("vaneadmin-00"));
        let again = Credentials::load_or_create(dir.path()).unwrap();
        assert!(again.is_admin(token.trim()));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(ADMIN_TOKEN_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
