//! Control groups of instances, on pure cgroup v2 and on the hybrid layout where the
//! controllers are mounted as v1 hierarchies (/sys/fs/cgroup/memory, .../pids, ...).
//!
//! Each instance gets `vane/<id>` in every hierarchy it uses; its processes join all of
//! them before they enter the instance's namespaces, so every descendant inherits them.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

const ROOT: &str = "/sys/fs/cgroup";
/// v1 controllers an instance is placed in, when the host mounts them.
const V1_CONTROLLERS: &[&str] = &["memory", "pids", "cpu,cpuacct", "cpu", "cpuacct", "freezer"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// One unified hierarchy at this path.
    V2(PathBuf),
    /// One directory per mounted v1 controller.
    V1(Vec<PathBuf>),
}

impl Layout {
    pub fn detect() -> Layout {
        Self::detect_at(Path::new(ROOT))
    }

    fn detect_at(root: &Path) -> Layout {
        if root.join("cgroup.controllers").exists() {
            return Layout::V2(root.to_path_buf());
        }
        let mut dirs: Vec<PathBuf> = Vec::new();
        for c in V1_CONTROLLERS {
            let p = root.join(c);
            // "cpu" and "cpuacct" are often links to "cpu,cpuacct": keep one of them.
            let real = fs::canonicalize(&p).unwrap_or(p.clone());
            if p.is_dir()
                && !dirs
                    .iter()
                    .any(|d| fs::canonicalize(d).ok() == Some(real.clone()))
            {
                dirs.push(p);
            }
        }
        Layout::V1(dirs)
    }

    /// The directories of instance `id`, one per hierarchy.
    pub fn paths(&self, id: &str) -> Vec<PathBuf> {
        match self {
            Layout::V2(root) => vec![root.join("vane").join(id)],
            Layout::V1(dirs) => dirs.iter().map(|d| d.join("vane").join(id)).collect(),
        }
    }

    /// Creates the cgroups of instance `id`.
    pub fn create(&self, id: &str) -> io::Result<Vec<PathBuf>> {
        if let Layout::V2(root) = self {
            // Delegate the controllers down to vane/ so that later limits can be set; the
            // root cgroup may hold processes and enable controllers at the same time.
            let _ = fs::write(root.join("cgroup.subtree_control"), "+memory +pids +cpu");
            let _ = fs::create_dir_all(root.join("vane"));
            let _ = fs::write(
                root.join("vane").join("cgroup.subtree_control"),
                "+memory +pids +cpu",
            );
        }
        let paths = self.paths(id);
        for p in &paths {
            fs::create_dir_all(p).map_err(|e| {
                io::Error::new(e.kind(), format!("create cgroup {}: {e}", p.display()))
            })?;
        }
        Ok(paths)
    }
}

/// Moves process `pid` (0: the caller) into each cgroup of `paths`.
pub fn join(paths: &[PathBuf], pid: u32) -> io::Result<()> {
    for p in paths {
        fs::write(p.join("cgroup.procs"), pid.to_string())
            .map_err(|e| io::Error::new(e.kind(), format!("join cgroup {}: {e}", p.display())))?;
    }
    Ok(())
}

/// Kills every process in the cgroups of `paths` (what is left of an instance whose init is
/// unknown, for example after an interrupted create).
pub fn kill_all(paths: &[PathBuf]) {
    for p in paths {
        for pid in fs::read_to_string(p.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse::<i32>().ok())
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Removes the cgroups in `paths`. Their processes must be gone; a cgroup that is still
/// busy is left and reported.
pub fn remove(paths: &[PathBuf]) -> io::Result<()> {
    let mut result = Ok(());
    for p in paths {
        // The kernel may need a moment after the last process died before rmdir succeeds.
        let mut last = Ok(());
        for _ in 0..50 {
            last = match fs::remove_dir(p) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                other => other,
            };
            if last.is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        if let Err(e) = last {
            result = Err(io::Error::new(
                e.kind(),
                format!("remove cgroup {}: {e}", p.display()),
            ));
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_layouts() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("memory")).unwrap();
        fs::create_dir(dir.path().join("pids")).unwrap();
        let l = Layout::detect_at(dir.path());
        assert_eq!(
            l.paths("abc"),
            vec![
                dir.path().join("memory/vane/abc"),
                dir.path().join("pids/vane/abc")
            ]
        );
        fs::write(dir.path().join("cgroup.controllers"), "memory pids").unwrap();
        assert_eq!(
            Layout::detect_at(dir.path()).paths("abc"),
            vec![dir.path().join("vane/abc")]
        );
    }
}
