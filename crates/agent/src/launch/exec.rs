//! `vane __exec`: a command run inside a running instance, in its namespaces and cgroups
//! and confined as the instance is.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use nix::sched::{setns, CloneFlags};

use super::{enter_userns, errno};
use crate::cgroup;
use crate::sandbox::Confinement;

/// `vane __exec`: runs CMD inside the namespaces and cgroups of the instance whose init is
/// `init_pid`, confined as the instance is, with `env`, and exits with CMD's exit code.
pub fn exec_main(
    init_pid: u32,
    cgroups: &[PathBuf],
    confinement: &Confinement,
    env: &[(String, String)],
    cmd: &[String],
) -> i32 {
    match exec(init_pid, cgroups, confinement, env, cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vane: exec: {e}");
            if e.kind() == io::ErrorKind::NotFound {
                127
            } else {
                126
            }
        }
    }
}

fn exec(
    init_pid: u32,
    cgroups: &[PathBuf],
    confinement: &Confinement,
    env: &[(String, String)],
    cmd: &[String],
) -> io::Result<i32> {
    cgroup::join(cgroups, std::process::id())?;
    let open = |name: &str| {
        File::open(format!("/proc/{init_pid}/ns/{name}"))
            .map_err(|e| io::Error::new(e.kind(), format!("instance is gone: {e}")))
    };
    // Every namespace is opened before any is joined: after joining the mount namespace,
    // /proc is the instance's and the init pid means something else there. The network
    // namespace belongs to the host's user namespace: joined first, while this process is
    // still root there; then the instance's user namespace, which owns the others.
    let net = open("net")?;
    let user = if confinement.privileged() {
        None
    } else {
        Some(OwnedFd::from(open("user")?))
    };
    let mut kinds = vec![
        ("ipc", CloneFlags::CLONE_NEWIPC),
        ("uts", CloneFlags::CLONE_NEWUTS),
        ("pid", CloneFlags::CLONE_NEWPID),
    ];
    if user.is_some() {
        kinds.push(("cgroup", CloneFlags::CLONE_NEWCGROUP));
    }
    kinds.push(("mnt", CloneFlags::CLONE_NEWNS));
    let mut files = Vec::new();
    for (name, flag) in kinds {
        files.push((open(name)?, flag, name));
    }
    setns(&net, CloneFlags::CLONE_NEWNET).map_err(|e| errno("join net namespace", e))?;
    if let Some(user) = &user {
        enter_userns(user)?;
    }
    for (f, flag, name) in &files {
        setns(f, *flag).map_err(|e| errno(&format!("join {name} namespace"), e))?;
    }
    drop(files);
    std::env::set_current_dir("/")?;
    crate::sandbox::confine(confinement)?;
    let program = &cmd[0];
    // Spawned after joining: the child is the one in the instance's PID namespace.
    let status = Command::new(program)
        .args(&cmd[1..])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .status()
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => io::Error::new(
                io::ErrorKind::NotFound,
                format!("program not found: {program}"),
            ),
            _ => io::Error::new(e.kind(), format!("cannot start {program}: {e}")),
        })?;
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}
