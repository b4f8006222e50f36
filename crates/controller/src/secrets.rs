//! Files only the controller's user reads: its CA key, its admin credential, its snapshot
//! key. Made once, never overwritten, never followed through a link.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::Context;

/// Creates `path` with `bytes` and `mode`; fails if it exists (or is a link).
pub fn write_new(path: &Path, mode: u32, bytes: &[u8]) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("write {}", path.display()))
}

/// The contents of the 0600 file `path`, made with `make()` if it does not exist.
pub fn read_or_create(path: &Path, make: impl FnOnce() -> Vec<u8>) -> anyhow::Result<Vec<u8>> {
    match std::fs::read(path) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let bytes = make();
            write_new(path, 0o600, &bytes)?;
            Ok(bytes)
        }
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}
