//! Host enrollment: who may join the cluster as which host.
//!
//! An operator makes a join token (`vane host token`); a new host's agent presents it once
//! with its name and its static public key, and gets a credential of its own in exchange.
//! From then on the agent presents the credential, and the controller only accepts the key
//! it enrolled with, so another machine cannot take over a host's name, and a host that
//! never enrolled gets no place in any view: other switches do not know its key and refuse
//! its handshakes. The store keeps only SHA-256 hashes of tokens and credentials.

use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use vane_proto::hex;
use vane_proto::stream::HostAuth;

/// A join token as stored: its hash and when it stops being accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub hash: String,
    pub expires: u64,
    /// Spent by the first host that joins with it.
    #[serde(default)]
    pub single_use: bool,
}

impl TokenRecord {
    /// What names the token in listings and revocations: the start of its hash (the
    /// secret itself is never shown again).
    pub fn id(&self) -> &str {
        &self.hash[..12.min(self.hash.len())]
    }
}

/// An enrolled host: the key it joined with and the hash of its credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrollment {
    pub host: String,
    pub public_key: String,
    pub credential_hash: String,
}

/// Prefix of join tokens, so that one is recognised when pasted in the wrong place.
const TOKEN_PREFIX: &str = "vanejoin-";

/// A new random secret: a join token or a credential.
pub fn new_secret(prefix: &str) -> String {
    let mut bytes = [0u8; 24];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("{prefix}{}", hex::encode(&bytes))
}

pub fn new_token() -> String {
    new_secret(TOKEN_PREFIX)
}

pub fn hash(secret: &str) -> String {
    hex::encode(&Sha256::digest(secret.as_bytes()))
}

/// Why an agent is refused, as the one line it prints.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("bad join token (unknown or expired): make one with `vane host token`")]
    BadToken,
    #[error("bad credential for host {0:?}")]
    BadCredential(String),
    #[error("host {0:?} is not enrolled: start its agent with --join TOKEN (`vane host token` makes one)")]
    NotEnrolled(String),
    #[error("duplicate host name: {0:?} is already enrolled with another key (remove it with `vane host rm {0}` first)")]
    DuplicateName(String),
    #[error("host {0:?} presented a key other than the one it enrolled with")]
    KeyChanged(String),
    #[error("bad public key: expected 64 hex digits")]
    BadKey,
}

/// What admitting an agent decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// A known host with its credential.
    Known,
    /// A new host (or a known one re-enrolling with the same key): store this enrollment and
    /// give the agent `credential`.
    Enrolled {
        enrollment: Enrollment,
        credential: String,
    },
}

/// Decides whether the agent of `name` with `public_key` and `auth` may join. `enrolled` is
/// the host's enrollment if it has one; `token_expiry` looks a token hash up.
pub fn admit(
    name: &str,
    public_key: &str,
    auth: &HostAuth,
    enrolled: Option<&Enrollment>,
    token_valid: impl Fn(&str) -> bool,
) -> Result<Admission, Refusal> {
    if hex::decode::<32>(public_key).is_none() {
        return Err(Refusal::BadKey);
    }
    match (auth, enrolled) {
        (HostAuth::Credential(c), Some(e)) => {
            if hash(c) != e.credential_hash {
                Err(Refusal::BadCredential(name.into()))
            } else if e.public_key != public_key {
                Err(Refusal::KeyChanged(name.into()))
            } else {
                Ok(Admission::Known)
            }
        }
        (HostAuth::Credential(_), None) => Err(Refusal::NotEnrolled(name.into())),
        (HostAuth::Token(t), enrolled) => {
            // The secret alone: a token as printed also carries the CA's pin.
            let secret = vane_proto::trust::split_join_token(t).map_or(t.as_str(), |(s, _)| s);
            if !token_valid(&hash(secret)) {
                return Err(Refusal::BadToken);
            }
            if enrolled.is_some_and(|e| e.public_key != public_key) {
                return Err(Refusal::DuplicateName(name.into()));
            }
            let credential = new_secret("vanecred-");
            Ok(Admission::Enrolled {
                enrollment: Enrollment {
                    host: name.into(),
                    public_key: public_key.into(),
                    credential_hash: hash(&credential),
                },
                credential,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "0101010101010101010101010101010101010101010101010101010101010101";
    const OTHER: &str = "0202020202020202020202020202020202020202020202020202020202020202";

    fn enroll(token_ok: bool) -> Result<Admission, Refusal> {
        admit("h1", KEY, &HostAuth::Token("t".into()), None, |_| token_ok)
    }

    #[test]
    fn a_token_enrolls_and_the_credential_then_admits() {
        let Ok(Admission::Enrolled {
            enrollment,
            credential,
        }) = enroll(true)
        else {
            panic!("token refused")
        };
        let cred = HostAuth::Credential(credential);
        assert_eq!(
            admit("h1", KEY, &cred, Some(&enrollment), |_| false),
            Ok(Admission::Known)
        );
        assert_eq!(
            admit("h1", OTHER, &cred, Some(&enrollment), |_| false),
            Err(Refusal::KeyChanged("h1".into()))
        );
        let forged = HostAuth::Credential("vanecred-00".into());
        assert_eq!(
            admit("h1", KEY, &forged, Some(&enrollment), |_| true),
            Err(Refusal::BadCredential("h1".into()))
        );
        // Another machine with a valid token cannot take the name.
        assert_eq!(
            admit(
                "h1",
                OTHER,
                &HostAuth::Token("t".into()),
                Some(&enrollment),
                |_| true
            ),
            Err(Refusal::DuplicateName("h1".into()))
        );
    }

    #[test]
    fn bad_tokens_keys_and_unknown_hosts_are_refused() {
        assert_eq!(enroll(false), Err(Refusal::BadToken));
        assert_eq!(
            admit("h1", "zz", &HostAuth::Token("t".into()), None, |_| true),
            Err(Refusal::BadKey)
        );
        assert_eq!(
            admit("h9", KEY, &HostAuth::Credential("c".into()), None, |_| true),
            Err(Refusal::NotEnrolled("h9".into()))
        );
    }

    #[test]
    fn secrets_are_random_and_hashes_stable() {
        assert_ne!(new_token(), new_token());
        assert!(new_token().starts_with(TOKEN_PREFIX));
        assert_eq!(hash("x"), hash("x"));
        assert_eq!(hash("x").len(), 64);
    }
}
