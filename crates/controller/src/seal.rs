//! Snapshots are authenticated by the cluster that made them. A snapshot leaves the cluster
//! (`vane snapshot` writes it to the user's disk) and may come back (`vane restore`); in
//! between anyone who can write the files could change the images, which an agent restores
//! as code and memory of a new instance, or the instance's record, which says how it is
//! confined. The controller seals both with an HMAC-SHA256 under a key of its own, made
//! with its store (`image.key`, 0600, in the data directory), and refuses to restore what
//! does not carry a valid seal: a snapshot changed on disk, or made by another cluster.

use std::path::Path;

use base64::Engine;
use ring::hmac;

use vane_proto::api::Instance;

const KEY_FILE: &str = "image.key";
/// What the seal is of, so that it can never be taken for a MAC of something else.
const DOMAIN: &[u8] = b"vane snapshot v1\0";
/// Base64 is decoded in pieces this long (a multiple of 4 characters).
const PIECE: usize = 4 << 20;

pub struct Sealer {
    key: hmac::Key,
}

impl Sealer {
    /// The controller's key, made (random, 0600) when the data directory has none.
    pub fn load_or_create(data_dir: &Path) -> anyhow::Result<Sealer> {
        let path = data_dir.join(KEY_FILE);
        let bytes = crate::secrets::read_or_create(&path, || {
            let mut key = [0u8; 32];
            rand::Rng::fill(&mut rand::thread_rng(), &mut key);
            key.to_vec()
        })?;
        anyhow::ensure!(bytes.len() == 32, "{}: not a 32-byte key", path.display());
        Ok(Sealer {
            key: hmac::Key::new(hmac::HMAC_SHA256, &bytes),
        })
    }

    fn context(&self, instance: &Instance, images: &str) -> Result<hmac::Context, String> {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(DOMAIN);
        let record = serde_json::to_vec(instance).expect("serializes");
        ctx.update(&(record.len() as u64).to_be_bytes());
        ctx.update(&record);
        // The images as bytes, whatever the base64 around them looked like.
        for piece in images.as_bytes().chunks(PIECE) {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(piece)
                .map_err(|e| format!("the snapshot's images are not base64: {e}"))?;
            ctx.update(&raw);
        }
        Ok(ctx)
    }

    /// The seal of a snapshot: its record and its packed images (base64), in hex.
    pub fn seal(&self, instance: &Instance, images: &str) -> Result<String, String> {
        let tag = self.context(instance, images)?.sign();
        Ok(tag.as_ref().iter().map(|b| format!("{b:02x}")).collect())
    }

    /// Whether `seal` is this cluster's seal of the snapshot (compared in constant time).
    pub fn verify(&self, instance: &Instance, images: &str, seal: &str) -> bool {
        let Some(tag) = vane_proto::hex::decode::<32>(seal) else {
            return false;
        };
        let Ok(ctx) = self.context(instance, images) else {
            return false;
        };
        // Every byte compared, whatever the first difference: the time says nothing.
        let expected = ctx.sign();
        expected
            .as_ref()
            .iter()
            .zip(tag)
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance() -> Instance {
        serde_json::from_value(serde_json::json!({
            "id": "a-1", "name": "a", "net": "red", "ip": "10.0.0.1", "hostname": "a",
            "host": "h1", "cmd": ["sleep", "1"], "env": [], "state": "running",
            "pid": 7, "exit": null, "created": 1
        }))
        .unwrap()
    }

    #[test]
    fn seals_hold_for_this_cluster_and_this_snapshot_only() {
        let dir = tempfile::tempdir().unwrap();
        let sealer = Sealer::load_or_create(dir.path()).unwrap();
        let images = base64::engine::general_purpose::STANDARD.encode(vec![7u8; 100_000]);
        let seal = sealer.seal(&instance(), &images).unwrap();
        assert!(sealer.verify(&instance(), &images, &seal));
        // The same key after a restart.
        let again = Sealer::load_or_create(dir.path()).unwrap();
        assert!(again.verify(&instance(), &images, &seal));
        // A changed image byte, a changed record, another cluster's key, a bad seal.
        let mut bytes = vec![7u8; 100_000];
        bytes[5000] ^= 1;
        let changed = base64::engine::general_purpose::STANDARD.encode(bytes);
        assert!(!sealer.verify(&instance(), &changed, &seal));
        let mut privileged = instance();
        privileged.space.privileged = true;
        assert!(!sealer.verify(&privileged, &images, &seal));
        let other = tempfile::tempdir().unwrap();
        let foreign = Sealer::load_or_create(other.path()).unwrap();
        assert!(!foreign.verify(&instance(), &images, &seal));
        assert!(!sealer.verify(&instance(), &images, "00"));
        assert!(!sealer.verify(&instance(), "not base64!", &seal));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
