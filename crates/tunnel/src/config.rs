//! What a host is configured with: the cipher it initiates sessions with, its timers and
//! limits, and its static key pair.

use std::fmt;
use std::time::Duration;

use ring::aead::{self, AES_256_GCM, CHACHA20_POLY1305};
use snow::params::DHChoice;
use snow::resolvers::{CryptoResolver, DefaultResolver};

use crate::{TYPE_INITIATION, TYPE_INITIATION_AESGCM};

/// The AEAD of a session's transport (and of its handshake).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cipher {
    ChaChaPoly,
    AesGcm,
}

impl Cipher {
    /// The faster on this CPU: AES-GCM where it has AES and carry-less multiply
    /// instructions, ChaCha20-Poly1305 otherwise.
    pub fn fastest() -> Cipher {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("aes")
                && std::arch::is_x86_feature_detected!("pclmulqdq")
            {
                return Cipher::AesGcm;
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            if std::arch::is_aarch64_feature_detected!("aes")
                && std::arch::is_aarch64_feature_detected!("pmull")
            {
                return Cipher::AesGcm;
            }
        }
        Cipher::ChaChaPoly
    }

    /// A short name, for reports.
    pub fn name(self) -> &'static str {
        match self {
            Cipher::ChaChaPoly => "chacha20-poly1305",
            Cipher::AesGcm => "aes-256-gcm",
        }
    }

    /// The Noise protocol name.
    pub fn noise_pattern(self) -> &'static str {
        match self {
            Cipher::ChaChaPoly => "Noise_IK_25519_ChaChaPoly_BLAKE2s",
            Cipher::AesGcm => "Noise_IK_25519_AESGCM_BLAKE2s",
        }
    }

    /// The type of an initiation for sessions of this cipher.
    pub(crate) fn initiation_type(self) -> u8 {
        match self {
            Cipher::ChaChaPoly => TYPE_INITIATION,
            Cipher::AesGcm => TYPE_INITIATION_AESGCM,
        }
    }

    pub(crate) fn algorithm(self) -> &'static aead::Algorithm {
        match self {
            Cipher::ChaChaPoly => &CHACHA20_POLY1305,
            Cipher::AesGcm => &AES_256_GCM,
        }
    }

    /// Noise's nonce for counter `n`: 32 zero bits, then `n` little-endian for ChaChaPoly,
    /// big-endian for AESGCM.
    pub(crate) fn nonce(self, n: u64) -> aead::Nonce {
        let mut nonce = [0; 12];
        nonce[4..].copy_from_slice(&match self {
            Cipher::ChaChaPoly => n.to_le_bytes(),
            Cipher::AesGcm => n.to_be_bytes(),
        });
        aead::Nonce::assume_unique_for_key(nonce)
    }
}

/// Timers and limits. The defaults are WireGuard's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Start a new handshake when the current session was established this long ago (the
    /// side that initiated it; the responder waits `10 * handshake_retry` longer, so that
    /// both sides do not rekey at once while still covering an initiator that went away).
    pub rekey_after_time: Duration,
    /// Sessions older than this are dropped: never used to send or receive again.
    pub reject_after_time: Duration,
    /// Start a new handshake when the current session has sealed this many messages.
    pub rekey_after_messages: u64,
    /// A session that has sealed this many messages, or a received counter this high, is
    /// refused (the counter must never wrap).
    pub reject_after_messages: u64,
    /// Re-send an unanswered initiation (a fresh one) after this long.
    pub handshake_retry: Duration,
    /// Give up retrying this long after the first initiation; the next seal starts again.
    pub handshake_timeout: Duration,
    /// Drop all sessions of a peer when no data (keepalives do not count) was sealed for it
    /// or opened from it for this long.
    pub idle_timeout: Duration,
    /// The cipher of the sessions this host initiates (a responder takes the initiator's).
    pub cipher: Cipher,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            rekey_after_time: Duration::from_secs(120),
            reject_after_time: Duration::from_secs(180),
            rekey_after_messages: 1 << 60,
            reject_after_messages: u64::MAX - (1 << 13),
            handshake_retry: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(180),
            cipher: Cipher::fastest(),
        }
    }
}

/// A host's static X25519 key pair.
#[derive(Clone, PartialEq, Eq)]
pub struct Keypair {
    /// The private key: keep it on the host.
    pub private: [u8; 32],
    /// The public key: the controller gives it to the other hosts.
    pub public: [u8; 32],
}

impl Keypair {
    /// A new random key pair (from the thread-local CSPRNG, seeded by the OS).
    pub fn generate() -> Keypair {
        Keypair::from_private(rand::random())
    }

    /// The key pair of a stored private key.
    pub fn from_private(private: [u8; 32]) -> Keypair {
        let mut dh = DefaultResolver
            .resolve_dh(&DHChoice::Curve25519)
            .expect("snow's default resolver has X25519");
        dh.set(&private);
        let mut public = [0; 32];
        public.copy_from_slice(dh.pubkey());
        Keypair { private, public }
    }
}

impl fmt::Debug for Keypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keypair")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}
