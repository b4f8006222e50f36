//! The copy of the vane binary that instances run as their init (and that enters them).
//!
//! An instance's init maps the binary it was started from for as long as it runs, and
//! checkpointing needs that file at the same path inside the instance's mount namespace.
//! The binary the agent was started from may not be there: instances get a private /tmp,
//! and a build tree under /tmp disappears behind it. So the agent runs its helpers from a
//! copy under /var/lib/vane/bin/DIGEST/vane, one directory per content (the file keeps its
//! name, so instances' processes are still called `vane`): several versions coexist while
//! instances started by an older agent still run.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

pub(crate) const DIR: &str = "/var/lib/vane/bin";
/// Copies unused for this long are removed when an agent installs its own.
const UNUSED_FOR: Duration = Duration::from_secs(600);

/// The path of this binary's copy, made if missing; old copies no process runs are removed.
pub fn install(exe: &Path) -> io::Result<PathBuf> {
    // Streamed: the binary is tens of MiB, and reading it whole made that the agent's peak
    // memory use.
    let mut hasher = Sha256::new();
    io::copy(&mut std::fs::File::open(exe)?, &mut hasher)?;
    let digest = hasher.finalize();
    let dir = Path::new(DIR).join(vane_proto::hex::encode(&digest[..8]));
    let path = dir.join("vane");
    if !path.exists() {
        std::fs::create_dir_all(&dir)?;
        let tmp = dir.join(format!(".vane.{}", std::process::id()));
        std::fs::copy(exe, &tmp)?;
        std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        std::fs::rename(&tmp, &path)?;
    }
    prune(&path);
    Ok(path)
}

/// Removes copies that no running process executes and that were not made lately.
fn prune(keep: &Path) {
    let running: Vec<PathBuf> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path().join("exe")).ok())
        .collect();
    for entry in std::fs::read_dir(DIR).into_iter().flatten().flatten() {
        let copy = entry.path().join("vane");
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > UNUSED_FOR);
        if copy != keep && old && !running.contains(&copy) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
