//! Snapshots are authenticated by the cluster that made them. A snapshot leaves the cluster
//! (`vane snapshot` writes it to the user's disk) and may come back (`vane restore`); in
//! between anyone who can write the files could change the images, which an agent restores
//! as code and memory of a new instance, or the instance's record, which says how it is
//! confined. The controller seals both with an HMAC-SHA256 under a key of its own, made
//! with its store (`image.key`, 0600, in the data directory), and refuses to restore what
//! does not carry a valid seal: a snapshot changed on disk, or made by another cluster.

use std::path::Path;

use ring::hmac;

use vane_proto::api::Instance;

pub(crate) const KEY_FILE: &str = "image.key";
/// What the seal is of, so that it can never be taken for a MAC of something else.
const DOMAIN: &[u8] = b"vane snapshot v1\0";

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

    /// Starts the seal of a snapshot of `instance`; its images follow, as they stream.
    pub fn begin(&self, instance: &Instance) -> Sealing {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(DOMAIN);
        let record = serde_json::to_vec(instance).expect("serializes");
        ctx.update(&(record.len() as u64).to_be_bytes());
        ctx.update(&record);
        Sealing(ctx)
    }
}

/// A seal being computed over a snapshot's images.
pub struct Sealing(hmac::Context);

impl Sealing {
    /// The next bytes of the packed images.
    pub fn update(&mut self, images: &[u8]) {
        self.0.update(images);
    }

    /// The seal, in hex.
    pub fn seal(self) -> String {
        vane_proto::hex::encode(self.0.sign().as_ref())
    }

    /// Whether `seal` is this cluster's seal of what was fed (compared in constant time).
    pub fn verify(self, seal: &str) -> bool {
        let Some(tag) = vane_proto::hex::decode::<32>(seal) else {
            return false;
        };
        // Every byte compared, whatever the first difference: the time says nothing.
        let expected = self.0.sign();
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

    /// The seal of `images` under `sealer`, fed in uneven pieces as a stream would be.
    fn seal(sealer: &Sealer, instance: &Instance, images: &[u8]) -> String {
        let mut sealing = sealer.begin(instance);
        for piece in images.chunks(7_777) {
            sealing.update(piece);
        }
        sealing.seal()
    }

    fn verify(sealer: &Sealer, instance: &Instance, images: &[u8], seal: &str) -> bool {
        let mut sealing = sealer.begin(instance);
        for piece in images.chunks(1 << 16) {
            sealing.update(piece);
        }
        sealing.verify(seal)
    }

    #[test]
    fn seals_hold_for_this_cluster_and_this_snapshot_only() {
        let dir = tempfile::tempdir().unwrap();
        let sealer = Sealer::load_or_create(dir.path()).unwrap();
        let images = vec![7u8; 100_000];
        let seal = seal(&sealer, &instance(), &images);
        assert!(verify(&sealer, &instance(), &images, &seal));
        // The same key after a restart.
        let again = Sealer::load_or_create(dir.path()).unwrap();
        assert!(verify(&again, &instance(), &images, &seal));
        // A changed image byte, a missing one, a changed record, another cluster's key, a
        // bad seal.
        let mut changed = images.clone();
        changed[5000] ^= 1;
        assert!(!verify(&sealer, &instance(), &changed, &seal));
        assert!(!verify(&sealer, &instance(), &images[1..], &seal));
        let mut privileged = instance();
        privileged.space.privileged = true;
        assert!(!verify(&sealer, &privileged, &images, &seal));
        let other = tempfile::tempdir().unwrap();
        let foreign = Sealer::load_or_create(other.path()).unwrap();
        assert!(!verify(&foreign, &instance(), &images, &seal));
        assert!(!verify(&sealer, &instance(), &images, "00"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
