//! The controller's TLS: a CA of the cluster's own, made on first start (`ca.crt`,
//! `ca.key` 0600 in the data directory), and a server certificate it signs at every start
//! for the address the controller listens on. Agents pin the CA by the SHA-256 of its
//! certificate, which join tokens carry; the CLI trusts it from `ca.crt`. No listener
//! speaks plain HTTP.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};

use vane_proto::trust::Pin;

pub const CA_CERT_FILE: &str = "ca.crt";
pub(crate) const CA_KEY_FILE: &str = "ca.key";

/// The cluster's CA, and what the API serves with.
pub struct Tls {
    /// The SHA-256 of the CA certificate (DER).
    pub pin: Pin,
    pub server: Arc<rustls::ServerConfig>,
}

fn ca_params() -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "vane cluster CA");
    params.distinguished_name = name;
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

/// The DER of the first certificate in a PEM text.
fn pem_to_der(pem: &str) -> anyhow::Result<Vec<u8>> {
    use base64::Engine;
    let body: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE-----"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .context("not a PEM certificate")
}

impl Tls {
    /// Loads the cluster's CA from `data_dir`, or makes it, and signs a server certificate
    /// for `listen` (and 127.0.0.1 and localhost, for the machine itself).
    pub fn load_or_create(data_dir: &Path, listen: SocketAddr) -> anyhow::Result<Tls> {
        let (cert_path, key_path) = (data_dir.join(CA_CERT_FILE), data_dir.join(CA_KEY_FILE));
        if !key_path.exists() {
            let key = KeyPair::generate()?;
            let cert = ca_params()?.self_signed(&key)?;
            crate::secrets::write_new(&key_path, 0o600, key.serialize_pem().as_bytes())?;
            let _ = std::fs::remove_file(&cert_path);
            crate::secrets::write_new(&cert_path, 0o644, cert.pem().as_bytes())?;
        }
        let key_pem = std::fs::read_to_string(&key_path)
            .with_context(|| format!("read {}", key_path.display()))?;
        let ca_key = KeyPair::from_pem(&key_pem)
            .with_context(|| format!("{}: not a key", key_path.display()))?;
        let ca_pem = std::fs::read_to_string(&cert_path)
            .with_context(|| format!("read {}", cert_path.display()))?;
        let ca_der = pem_to_der(&ca_pem).with_context(|| format!("{}", cert_path.display()))?;
        let issuer = Issuer::new(ca_params()?, ca_key);

        let mut names = vec![
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            SanType::DnsName("localhost".try_into()?),
        ];
        if !listen.ip().is_unspecified() && !listen.ip().is_loopback() {
            names.push(SanType::IpAddress(listen.ip()));
        }
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = names;
        params
            .distinguished_name
            .push(DnType::CommonName, "vane controller");
        let leaf_key = KeyPair::generate()?;
        let leaf = params.signed_by(&leaf_key, &issuer)?;

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone(), CertificateDer::from(ca_der.clone())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
            )?;
        // HTTP/1.1 alone: the agents' streams are WebSocket upgrades.
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Tls {
            pin: Sha256::digest(&ca_der).into(),
            server: Arc::new(server),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let listen: SocketAddr = "198.18.0.254:7946".parse().unwrap();
        let a = Tls::load_or_create(dir.path(), listen).unwrap();
        let b = Tls::load_or_create(dir.path(), listen).unwrap();
        assert_eq!(a.pin, b.pin);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(
            Tls::load_or_create(other.path(), listen).unwrap().pin,
            a.pin
        );
    }
}
