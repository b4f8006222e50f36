//! The copy of the vane binary that instances run as their init (and that enters them).
//!
//! An instance's init maps the binary it was started from for as long as it runs, and
//! checkpointing needs that file at the same path inside the instance's mount namespace.
//! The binary the agent was started from may not be there: instances get a private /tmp,
//! and a build tree under /tmp disappears behind it. So the agent runs its helpers from a
//! copy under /var/lib/vane/bin/DIGEST/vane, one directory per content (the file keeps its
//! name, so instances' processes are still called `vane`): several versions coexist while
//! instances started by an older agent still run.
//!
//! Beside the copy lies its runtime (`lib/`: the dynamic loader and the libraries this
//! process maps), through which init runs once inside the instance (`runtime`): a `--rootfs`
//! root has none of the host's libraries, and every file init maps must lie inside the
//! instance's mounts for a checkpoint to find it.

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
        // A link, not a rename: agents started together each make a copy, and a rename
        // would replace the one another's instances already run (CRIU then meets a deleted
        // file it cannot dump). The first copy in stays; the others go.
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
    }
    if !dir.join(RUNTIME).is_dir() {
        copy_runtime(&dir)?;
    }
    prune(&dir);
    Ok(path)
}

/// The copy's runtime directory, beside it.
const RUNTIME: &str = "lib";

/// Copies the dynamic loader and the shared libraries this process maps (the binary's
/// own, as the loader found them on this host) into `DIR/lib`, made whole under a
/// temporary name first.
fn copy_runtime(dir: &Path) -> io::Result<()> {
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let tmp = dir.join(format!(".lib.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    let mut copied = Vec::new();
    for path in maps.lines().filter_map(|l| l.split_whitespace().nth(5)) {
        let path = Path::new(path);
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if path.is_absolute() && is_library(name) && !copied.contains(&name) {
            std::fs::copy(path, tmp.join(name))?;
            copied.push(name);
        }
    }
    if !copied.iter().any(|n| is_loader(n)) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(io::Error::other("this process maps no dynamic loader"));
    }
    match std::fs::rename(&tmp, dir.join(RUNTIME)) {
        // Another agent of this machine (a lab) made it first.
        Err(_) if dir.join(RUNTIME).is_dir() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(())
        }
        r => r,
    }
}

fn is_library(name: &str) -> bool {
    name.ends_with(".so") || name.contains(".so.")
}

fn is_loader(name: &str) -> bool {
    name.starts_with("ld-") && is_library(name)
}

/// How to run the copy `exe` through its runtime: the loader, and the arguments that make
/// it run `exe` with the runtime's libraries under the name `vane`. `None` when the copy
/// has no runtime (an agent that could not make one): run it directly.
pub fn runtime(exe: &Path) -> Option<(PathBuf, Vec<std::ffi::OsString>)> {
    let lib = exe.parent()?.join(RUNTIME);
    let loader = std::fs::read_dir(&lib)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(is_loader)
        })?;
    let args = vec![
        "--argv0".into(),
        "vane".into(),
        "--library-path".into(),
        lib.into_os_string(),
        exe.as_os_str().to_owned(),
    ];
    Some((loader, args))
}

/// Removes copies (with their runtimes) that no running process executes and that were
/// not made lately.
fn prune(keep: &Path) {
    let running: Vec<PathBuf> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path().join("exe")).ok())
        .collect();
    for entry in std::fs::read_dir(DIR).into_iter().flatten().flatten() {
        let copy = entry.path();
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > UNUSED_FOR);
        if copy != keep && old && !running.iter().any(|exe| exe.starts_with(&copy)) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
