//! Starting processes inside an instance. These run as short-lived helper processes of the
//! `vane` binary (`vane __launch`, `vane __init`, `vane __exec`), never inside the agent:
//! changing mount and PID namespaces needs a single-threaded process, and an instance must
//! not be a child of the agent, so that it outlives the agent.
//!
//! ```text
//! agent ──spawn──> __launch: join cgroups, join the net namespace, unshare mount/UTS/IPC/PID
//!                      └─spawn──> __init (PID 1 of the instance): private mounts, /proc,
//!                                 hostname, /etc/hosts; spawns the program, reaps,
//!                                 forwards signals, records the exit status
//! ```
//! `__launch` prints the pids and exits, so `__init` is adopted by the host's init and keeps
//! running whatever happens to the agent.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{sethostname, setsid, Pid};
use serde::{Deserialize, Serialize};

use vane_proto::api::ExitStatus;

use crate::cgroup;

/// Everything `__launch` and `__init` need, written by the agent as `launch.json` in the
/// instance's state directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LaunchSpec {
    pub hostname: String,
    pub netns: String,
    pub cmd: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cgroups: Vec<PathBuf>,
}

/// What `__launch` prints on success.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Launched {
    /// Host pid of the instance's init (PID 1 inside).
    pub init_pid: u32,
    /// Host pid of the program.
    pub pid: u32,
}

pub const LAUNCH_FILE: &str = "launch.json";
pub const EXIT_FILE: &str = "exit.json";
pub const LOG_FILE: &str = "output.log";
pub const HOSTS_FILE: &str = "hosts";
pub const HOSTNAME_FILE: &str = "hostname";

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

fn launch(dir: &Path) -> io::Result<Launched> {
    let spec = read_spec(dir)?;
    cgroup::join(&spec.cgroups, std::process::id())?;
    let ns = File::open(crate::netconf::netns_path(&spec.netns))?;
    setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|e| errno("join net namespace", e))?;
    drop(ns);
    unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWPID,
    )
    .map_err(|e| errno("create namespaces", e))?;
    // A session of its own: signals for the agent's terminal never reach instances.
    let _ = setsid();
    let exe = std::env::current_exe()?;
    // Init mounts its own /proc over ours (we share its mount namespace): keep a handle on
    // the host's, where init's pid means init.
    let host_proc = File::open("/proc")?;
    // The first child after unsharing the PID namespace is its PID 1.
    let mut init = Command::new(exe)
        .arg("__init")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let init_pid = init.id();
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

/// Signals that init forwards to the program.
const FORWARDED: &[Signal] = &[
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// `vane __init DIR`: PID 1 of an instance.
pub fn init_main(dir: &Path) -> i32 {
    let spec = match read_spec(dir).and_then(|s| prepare_space(dir, &s).map(|_| s)) {
        Ok(s) => s,
        Err(e) => {
            println!("error: setting up the instance: {e}");
            return 1;
        }
    };
    let child = match spawn_program(dir, &spec) {
        Ok(c) => c,
        Err(msg) => {
            record_exit(dir, Some(127), None);
            println!("error: {msg}");
            return 127;
        }
    };
    // Blocked signals are queued for PID 1 even without handlers; sigwait picks them up.
    // Blocked only now: the program would inherit the mask (std does not reset it).
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    for s in FORWARDED {
        set.add(*s);
    }
    if let Err(e) = set.thread_block() {
        println!("error: blocking signals: {e}");
        return 1;
    }
    println!("ok");
    let _ = io::stdout().flush();
    // Let go of the launcher's pipe: the launcher waits for its end, and checkpointing
    // needs init to hold nothing from outside the instance.
    if let Ok(null) = File::open("/dev/null") {
        let _ = nix::unistd::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), 1);
    }
    let program = Pid::from_raw(child.id() as i32);
    // The std handle would reap only its own child; PID 1 must reap every orphan.
    std::mem::forget(child);
    // A SIGCHLD that came before the mask was set is gone: reap once before waiting.
    let mut sig = Signal::SIGCHLD;
    loop {
        if sig != Signal::SIGCHLD {
            let _ = kill(program, sig);
            sig = set.wait().unwrap_or(Signal::SIGCHLD);
            continue;
        }
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid == program => {
                    record_exit(dir, Some(code), None);
                    return code;
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) if pid == program => {
                    record_exit(dir, None, Some(sig as i32));
                    return 128 + sig as i32;
                }
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue,
            }
        }
        sig = set.wait().unwrap_or(Signal::SIGCHLD);
    }
}

/// Mounts of the instance: nothing propagates back to the host; /proc shows only the
/// instance's processes, /sys only its network devices; its own hostname and /etc/hosts.
fn prepare_space(dir: &Path, spec: &LaunchSpec) -> io::Result<()> {
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| errno("make mounts private", e))?;
    // Named network namespaces are nsfs bind mounts, which checkpointing cannot handle, and
    // the instance has no business with other namespaces anyway.
    let _ = umount2("/run/netns", MntFlags::MNT_DETACH);
    mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| errno("mount /proc", e))?;
    // A sysfs of the instance's own network namespace, so /sys/class/net shows its devices
    // rather than the host's; read-only, as sysfs also reaches host-wide kernel settings.
    let _ = umount2("/sys", MntFlags::MNT_DETACH);
    mount(
        Some("sysfs"),
        "/sys",
        Some("sysfs"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| errno("mount /sys", e))?;
    sethostname(&spec.hostname).map_err(|e| errno("set hostname", e))?;
    for (file, target) in [(HOSTS_FILE, "/etc/hosts"), (HOSTNAME_FILE, "/etc/hostname")] {
        if Path::new(target).exists() {
            mount(
                Some(&dir.join(file)),
                target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| errno(&format!("bind {target}"), e))?;
        }
    }
    Ok(())
}

fn spawn_program(dir: &Path, spec: &LaunchSpec) -> Result<std::process::Child, String> {
    // Opened here, inside the instance's mount namespace, so that the program holds no file
    // of the host's mount namespace (checkpoint/restore requires it).
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(LOG_FILE))
        .map_err(|e| format!("open log: {e}"))?;
    let log2 = log.try_clone().map_err(|e| format!("open log: {e}"))?;
    let program = &spec.cmd[0];
    Command::new(program)
        .args(&spec.cmd[1..])
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => format!("program not found: {program}"),
            io::ErrorKind::PermissionDenied => format!("program not executable: {program}"),
            _ => format!("cannot start {program}: {e}"),
        })
}

fn record_exit(dir: &Path, code: Option<i32>, signal: Option<i32>) {
    let status = ExitStatus {
        code,
        signal,
        at: crate::now(),
    };
    let tmp = dir.join(".exit.json.tmp");
    if std::fs::write(&tmp, serde_json::to_vec(&status).expect("serializes")).is_ok() {
        let _ = std::fs::rename(tmp, dir.join(EXIT_FILE));
    }
}

/// `vane __exec PID CGROUPS -- CMD...`: runs CMD inside the namespaces and cgroups of the
/// instance whose init is PID, with `env`, and exits with CMD's exit code.
pub fn exec_main(
    init_pid: u32,
    cgroups: &[PathBuf],
    env: &[(String, String)],
    cmd: &[String],
) -> i32 {
    match exec(init_pid, cgroups, env, cmd) {
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
    env: &[(String, String)],
    cmd: &[String],
) -> io::Result<i32> {
    cgroup::join(cgroups, std::process::id())?;
    // Open every namespace before joining any: after joining the mount namespace,
    // /proc is the instance's and the init pid means something else there.
    let kinds = [
        ("ipc", CloneFlags::CLONE_NEWIPC),
        ("uts", CloneFlags::CLONE_NEWUTS),
        ("net", CloneFlags::CLONE_NEWNET),
        ("pid", CloneFlags::CLONE_NEWPID),
        ("mnt", CloneFlags::CLONE_NEWNS),
    ];
    let mut files = Vec::new();
    for (name, flag) in kinds {
        let f = File::open(format!("/proc/{init_pid}/ns/{name}"))
            .map_err(|e| io::Error::new(e.kind(), format!("instance is gone: {e}")))?;
        files.push((f, flag, name));
    }
    for (f, flag, name) in &files {
        setns(f, *flag).map_err(|e| errno(&format!("join {name} namespace"), e))?;
    }
    drop(files);
    std::env::set_current_dir("/")?;
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
