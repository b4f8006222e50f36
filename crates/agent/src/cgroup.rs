//! Control groups of instances, on pure cgroup v2 and on the hybrid layout where the
//! controllers are mounted as v1 hierarchies (/sys/fs/cgroup/memory, .../pids, ...).
//!
//! Each instance gets `vane/<id>` in every hierarchy it uses; its processes join all of
//! them before they enter the instance's namespaces, so every descendant inherits them.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use vane_proto::api::{Limits, Usage};

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

/// Why a limit cannot be set on this host: a one-line message for the user.
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// The first of `paths` holding `file` (on v1, which hierarchy has a controller).
fn with_file(paths: &[PathBuf], file: &str) -> Option<PathBuf> {
    paths.iter().map(|p| p.join(file)).find(|f| f.exists())
}

fn write(path: &Path, value: &str) -> io::Result<()> {
    fs::write(path, value).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("write {value:?} to {}: {e}", path.display()),
        )
    })
}

/// Checks that this host can give `limits` at all, before anything is made.
pub fn check_host(limits: &Limits) -> Result<(), LimitError> {
    if let Some(m) = limits.cpu_millis {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        if m as usize > cpus * 1000 {
            return Err(LimitError::Unavailable(format!(
                "cpu limit {} is more than this host's {cpus} CPUs",
                m as f64 / 1000.0
            )));
        }
    }
    if let Some(bytes) = limits.memory {
        let total = fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map(|kb| kb * 1024);
        if let Some(total) = total {
            if bytes > total {
                return Err(LimitError::Unavailable(format!(
                    "memory limit {} MiB is more than this host's {} MiB of memory",
                    bytes >> 20,
                    total >> 20
                )));
            }
        }
    }
    Ok(())
}

/// Sets `limits` on an instance's cgroups (`paths`, as `Layout::create` made them), before any
/// process joins them. A limit whose controller this host lacks is an error naming it.
pub fn apply_limits(paths: &[PathBuf], limits: &Limits) -> Result<(), LimitError> {
    let missing = |what: &str, controller: &str| {
        LimitError::Unavailable(format!(
            "cannot limit {what}: the {controller} cgroup controller is not available on this host"
        ))
    };
    if let Some(bytes) = limits.memory {
        if let Some(f) = with_file(paths, "memory.max") {
            write(&f, &bytes.to_string())?;
            // Over the limit means out of memory, not swapping.
            if let Some(swap) = with_file(paths, "memory.swap.max") {
                let _ = write(&swap, "0");
            }
        } else if let Some(f) = with_file(paths, "memory.limit_in_bytes") {
            write(&f, &bytes.to_string())?;
            if let Some(sw) = with_file(paths, "memory.memsw.limit_in_bytes") {
                let _ = write(&sw, &bytes.to_string());
            }
            if let Some(sw) = with_file(paths, "memory.swappiness") {
                let _ = write(&sw, "0");
            }
        } else {
            return Err(missing("memory", "memory"));
        }
    }
    if let Some(millis) = limits.cpu_millis {
        const PERIOD: u64 = 100_000;
        let quota = (u64::from(millis) * PERIOD / 1000).max(1000);
        if let Some(f) = with_file(paths, "cpu.max") {
            write(&f, &format!("{quota} {PERIOD}"))?;
        } else if let Some(f) = with_file(paths, "cpu.cfs_quota_us") {
            let dir = f.parent().expect("a cgroup file has a directory");
            write(&dir.join("cpu.cfs_period_us"), &PERIOD.to_string())?;
            write(&f, &quota.to_string())?;
        } else {
            return Err(missing("cpu", "cpu"));
        }
    }
    if let Some(n) = limits.pids {
        let f = with_file(paths, "pids.max").ok_or_else(|| missing("processes", "pids"))?;
        write(&f, &n.to_string())?;
    }
    Ok(())
}

fn read_u64(path: Option<PathBuf>) -> Option<u64> {
    fs::read_to_string(path?).ok()?.trim().parse().ok()
}

/// The value of `key` in a flat keyed file such as memory.events or cpu.stat.
fn keyed(path: Option<PathBuf>, key: &str) -> Option<u64> {
    fs::read_to_string(path?).ok()?.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

/// How many times the kernel killed a process of the cgroups for their memory limit.
pub fn oom_kills(paths: &[PathBuf]) -> u64 {
    keyed(with_file(paths, "memory.events"), "oom_kill")
        .or_else(|| keyed(with_file(paths, "memory.oom_control"), "oom_kill"))
        .unwrap_or(0)
}

/// What the cgroups of an instance account now.
pub fn usage(paths: &[PathBuf]) -> Usage {
    let cpu_usec = keyed(with_file(paths, "cpu.stat"), "usage_usec")
        .or_else(|| read_u64(with_file(paths, "cpuacct.usage")).map(|ns| ns / 1000))
        .unwrap_or(0);
    let memory = read_u64(with_file(paths, "memory.current"))
        .or_else(|| read_u64(with_file(paths, "memory.usage_in_bytes")))
        .unwrap_or(0);
    let pids = read_u64(with_file(paths, "pids.current")).unwrap_or_else(|| {
        with_file(paths, "cgroup.procs")
            .and_then(|f| fs::read_to_string(f).ok())
            .map_or(0, |s| s.lines().count() as u64)
    });
    Usage {
        cpu_usec,
        memory,
        pids,
        oom_kills: oom_kills(paths),
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

/// The processes in the instance's cgroups (every one is in each of them).
pub fn procs(paths: &[PathBuf]) -> Vec<u32> {
    with_file(paths, "cgroup.procs")
        .and_then(|f| fs::read_to_string(f).ok())
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
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

    #[test]
    fn limits_on_v1_and_v2_files() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            memory: Some(64 << 20),
            cpu_millis: Some(500),
            pids: Some(20),
            bandwidth: None,
        };
        // v2: one directory with every controller's files.
        let v2 = dir.path().join("v2");
        fs::create_dir(&v2).unwrap();
        for f in ["memory.max", "memory.swap.max", "cpu.max", "pids.max"] {
            fs::write(v2.join(f), "max").unwrap();
        }
        apply_limits(std::slice::from_ref(&v2), &limits).unwrap();
        assert_eq!(
            fs::read_to_string(v2.join("memory.max")).unwrap(),
            "67108864"
        );
        assert_eq!(fs::read_to_string(v2.join("memory.swap.max")).unwrap(), "0");
        assert_eq!(
            fs::read_to_string(v2.join("cpu.max")).unwrap(),
            "50000 100000"
        );
        assert_eq!(fs::read_to_string(v2.join("pids.max")).unwrap(), "20");
        fs::write(
            v2.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        )
        .unwrap();
        fs::write(v2.join("cpu.stat"), "usage_usec 1500\nuser_usec 1000\n").unwrap();
        fs::write(v2.join("memory.current"), "4096\n").unwrap();
        fs::write(v2.join("pids.current"), "3\n").unwrap();
        assert_eq!(
            usage(std::slice::from_ref(&v2)),
            Usage {
                cpu_usec: 1500,
                memory: 4096,
                pids: 3,
                oom_kills: 1
            }
        );
        // v1: one directory per controller.
        let (mem, cpu, pids) = (
            dir.path().join("m"),
            dir.path().join("c"),
            dir.path().join("p"),
        );
        for (d, files) in [
            (&mem, &["memory.limit_in_bytes", "memory.oom_control"][..]),
            (
                &cpu,
                &["cpu.cfs_quota_us", "cpu.cfs_period_us", "cpuacct.usage"][..],
            ),
            (&pids, &["pids.max", "pids.current"][..]),
        ] {
            fs::create_dir(d).unwrap();
            for f in files {
                fs::write(d.join(f), "0").unwrap();
            }
        }
        let paths = vec![mem.clone(), pids.clone(), cpu.clone()];
        apply_limits(&paths, &limits).unwrap();
        assert_eq!(
            fs::read_to_string(mem.join("memory.limit_in_bytes")).unwrap(),
            "67108864"
        );
        assert_eq!(
            fs::read_to_string(cpu.join("cpu.cfs_quota_us")).unwrap(),
            "50000"
        );
        assert_eq!(
            fs::read_to_string(cpu.join("cpu.cfs_period_us")).unwrap(),
            "100000"
        );
        assert_eq!(fs::read_to_string(pids.join("pids.max")).unwrap(), "20");
        fs::write(
            mem.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .unwrap();
        fs::write(cpu.join("cpuacct.usage"), "2000000\n").unwrap();
        assert_eq!(oom_kills(&paths), 2);
        assert_eq!(usage(&paths).cpu_usec, 2000);
        // A missing controller is named.
        let e = apply_limits(
            std::slice::from_ref(&mem),
            &Limits {
                pids: Some(5),
                ..Limits::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("pids cgroup controller is not available"), "{e}");
    }
}
