//! Starting processes inside an instance. These run as short-lived helper processes of the
//! `vane` binary (`vane __launch`, `vane __init`, `vane __exec`), never inside the agent:
//! changing mount and PID namespaces needs a single-threaded process, and an instance must
//! not be a child of the agent, so that it outlives the agent.
//!
//! ```text
//! agent ──spawn──> __launch: join cgroups and the net namespace; in a mount namespace of
//!                  its own, as the host's root, build the instance's root (read-only host
//!                  root, fresh /proc /sys /dev, private /tmp /run, state directory, hosts,
//!                  volumes, path rules, vane's state hidden) and pivot into it; enter the
//!                  instance's user namespace; unshare mount/UTS/IPC/PID/cgroup
//!                      └─spawn──> __init (PID 1 of the instance): its /proc (host-wide parts
//!                                 masked), hostname; bounding set and seccomp filter;
//!                                 spawns the program, reaps, forwards signals, records the
//!                                 exit status
//! ```
//! `__launch` prints the pids and exits, so `__init` is adopted by the host's init and keeps
//! running whatever happens to the agent.
//!
//! This file holds the specs and file names the agent shares with these helpers, and
//! `__launch` itself; the rest lives in:
//! - `root`: the instance's file-system view, built by `__launch` as the host's root;
//! - `init`: the instance's PID 1 (`__init`): moving into that root, its own /proc and
//!   hostname, confinement, and the program it starts, reaps and records;
//! - `exec`: `__exec`, a command run inside a running instance;
//! - `restore`: `__restore`, CRIU run inside the instance's user namespace;
//! - `mounts`: the mount primitives they share (binds, overlays, tmpfs, a minimal /dev).

use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::sched::{setns, unshare, CloneFlags};
use nix::unistd::{setgroups, setresgid, setresuid, setsid, Gid, Uid};
use serde::{Deserialize, Serialize};

use crate::cgroup;
use crate::sandbox::Confinement;

mod exec;
mod init;
mod mounts;
mod restore;
mod root;

pub use exec::{exec_main, Input as ExecInput};
pub use init::init_main;
pub use mounts::minimal_dev;
pub use restore::{restore_main, RestoreGo, RestoreSpec, RESTORE_FILE};
pub use root::ROOT_DIR;

use root::build_root;

/// Everything `__launch` and `__init` need, written by the agent as `launch.json` in the
/// instance's state directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LaunchSpec {
    pub hostname: String,
    pub netns: String,
    pub cmd: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cgroups: Vec<PathBuf>,
    /// The instance's root: a directory seen through a private copy-on-write layer.
    #[serde(default)]
    pub rootfs: Option<PathBuf>,
    /// Host directories bind-mounted at paths inside: (host, inside).
    #[serde(default)]
    pub volumes: Vec<(PathBuf, PathBuf)>,
    /// Path rules, variables expanded: (target inside, source on the host).
    #[serde(default)]
    pub redirects: Vec<(PathBuf, PathBuf)>,
    pub confinement: Confinement,
    /// Directories of the host's that the instance must not see (the agent's state
    /// directory when it lies outside /var/lib/vane).
    #[serde(default)]
    pub hide: Vec<PathBuf>,
}

/// Where `--rootfs` puts its copy-on-write layer, inside the instance's state directory.
pub const ROOTFS_DIR: &str = "rootfs";
/// Where the layers that make room for missing path-rule and volume targets go.
pub const PATHS_DIR: &str = "paths";

/// What `__launch` prints on success.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Launched {
    /// Host pid of the instance's init (PID 1 inside).
    pub init_pid: u32,
    /// Host pid of the program.
    pub pid: u32,
}

pub const LAUNCH_FILE: &str = "launch.json";
/// The part of an instance's directory that it sees (at `STATE_MOUNT`) and writes: its
/// output, its exit status, files of `{state}` path rules. Owned by the instance's root;
/// everything else in the directory is the agent's alone.
pub const SHARED_DIR: &str = "shared";
pub const EXIT_FILE: &str = "exit.json";
pub const LOG_FILE: &str = "output.log";
/// Where the instance's state directory is bound inside it (in its private /tmp).
pub const STATE_MOUNT: &str = "/tmp/.vane";
pub const HOSTS_FILE: &str = "hosts";
pub const HOSTNAME_FILE: &str = "hostname";
/// The instance's resolv.conf (the agent's resolver at 127.0.0.53), bound read-only over
/// its /etc/resolv.conf.
pub const RESOLV_FILE: &str = "resolv.conf";

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The environment of the instance's program and of `vane exec`: the user's variables (later
/// ones win) over a sane default PATH and the instance's HOSTNAME.
pub fn instance_env<'a>(
    hostname: &str,
    user: impl IntoIterator<Item = &'a (String, String)>,
) -> Vec<(String, String)> {
    let mut env = vec![
        ("PATH".to_string(), DEFAULT_PATH.to_string()),
        ("HOSTNAME".to_string(), hostname.to_string()),
        ("HOME".to_string(), "/root".to_string()),
    ];
    for (k, v) in user {
        env.retain(|(key, _)| key != k);
        env.push((k.clone(), v.clone()));
    }
    env
}

fn read_spec(dir: &Path) -> io::Result<LaunchSpec> {
    let bytes = std::fs::read(dir.join(LAUNCH_FILE))?;
    serde_json::from_slice(&bytes).map_err(io::Error::other)
}

fn errno(what: &str, e: nix::Error) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

/// `vane __launch DIR`. Prints `Launched` as JSON on success, or one error line on stderr.
pub fn launch_main(dir: &Path) -> i32 {
    match launch(dir) {
        Ok(l) => {
            println!("{}", serde_json::to_string(&l).expect("serializes"));
            0
        }
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}

/// Sets up the instance's view of the file system as the host's root (in a mount namespace
/// of its own), then enters the instance's user namespace and makes the namespaces it owns,
/// and starts init there. Mounts made before entering the user namespace are locked in the
/// instance: root inside can neither unmount them nor make them writable.
fn launch(dir: &Path) -> io::Result<Launched> {
    let spec = read_spec(dir)?;
    cgroup::join(&spec.cgroups, std::process::id())?;
    let ns = File::open(crate::netconf::netns_path(&spec.netns))?;
    setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|e| errno("join net namespace", e))?;
    // The agent made the instance's user namespace with its network namespace.
    let userns = if spec.confinement.privileged() {
        None
    } else {
        Some(
            vane_sys::confine::owning_userns(&ns)
                .map_err(|e| io::Error::new(e.kind(), format!("user namespace: {e}")))?,
        )
    };
    drop(ns);
    unshare(CloneFlags::CLONE_NEWNS).map_err(|e| errno("create mount namespace", e))?;
    // Init mounts its own /proc: keep a handle on the host's, where init's pid means init.
    let host_proc = File::open("/proc")?;
    let root = build_root(dir, &spec, userns.as_ref())?;
    // Init starts in the instance's root: the path leads through the agent's directory,
    // which the instance's root may not enter, and the namespaces made below move the
    // working directory along to their copy of the mount.
    std::env::set_current_dir(&root)?;
    let mut flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWPID;
    if let Some(userns) = &userns {
        enter_userns(userns)?;
        flags |= CloneFlags::CLONE_NEWCGROUP;
    }
    unshare(flags).map_err(|e| errno("create namespaces", e))?;
    // A session of its own: signals for the agent's terminal never reach instances.
    let _ = setsid();
    // The first child after unsharing the PID namespace is its PID 1.
    let mut init = Command::new(std::env::current_exe()?)
        .arg0("vane")
        .arg("__init")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let init_pid = init.id();
    // Init reads its spec from the pipe: the agent's directory is out of its sight.
    if let Some(mut stdin) = init.stdin.take() {
        let _ = stdin.write_all(&serde_json::to_vec(&spec).expect("serializes"));
    }
    let mut line = String::new();
    BufReader::new(init.stdout.take().expect("piped")).read_line(&mut line)?;
    let line = line.trim();
    if let Some(msg) = line.strip_prefix("error: ") {
        let _ = init.wait();
        return Err(io::Error::other(msg.to_string()));
    }
    if line != "ok" {
        let _ = init.kill();
        let _ = init.wait();
        return Err(io::Error::other("instance init failed to start"));
    }
    let children =
        vane_sys::fs::read_at(&host_proc, &format!("{init_pid}/task/{init_pid}/children"))
            .unwrap_or_default();
    let pid = children
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(init_pid);
    // Do not wait for init: it must outlive us, and the host's init adopts it.
    std::mem::forget(init);
    Ok(Launched { init_pid, pid })
}

/// Joins the user namespace `userns` as its root: every capability there, none outside.
fn enter_userns(userns: &OwnedFd) -> io::Result<()> {
    setns(userns, CloneFlags::CLONE_NEWUSER).map_err(|e| errno("join user namespace", e))?;
    let root_gid = Gid::from_raw(0);
    let root_uid = Uid::from_raw(0);
    setresgid(root_gid, root_gid, root_gid).map_err(|e| errno("become root inside", e))?;
    setgroups(&[]).map_err(|e| errno("become root inside", e))?;
    setresuid(root_uid, root_uid, root_uid).map_err(|e| errno("become root inside", e))
}
