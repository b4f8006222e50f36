//! Starting processes inside an instance. These run as short-lived helper processes of the
//! `vane` binary (`vane __launch`, `vane __init`, `vane __exec`), never inside the agent:
//! changing mount and PID namespaces needs a single-threaded process, and an instance must
//! not be a child of the agent, so that it outlives the agent.
//!
//! ```text
//! agent ──spawn──> __launch: join cgroups, join the net namespace, unshare mount/UTS/IPC/PID
//!                      └─spawn──> __init (PID 1 of the instance): private mounts, /proc,
//!                                 /tmp, hostname, /etc/hosts, root, volumes, path rules;
//!                                 spawns the program, reaps, forwards signals, records the
//!                                 exit status
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
    /// The instance's root: a directory seen through a private copy-on-write layer.
    #[serde(default)]
    pub rootfs: Option<PathBuf>,
    /// Host directories bind-mounted at paths inside: (host, inside).
    #[serde(default)]
    pub volumes: Vec<(PathBuf, PathBuf)>,
    /// Path rules, variables expanded: (target inside, source on the host).
    #[serde(default)]
    pub redirects: Vec<(PathBuf, PathBuf)>,
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
pub const EXIT_FILE: &str = "exit.json";
pub const LOG_FILE: &str = "output.log";
/// Where the instance's state directory is bound inside it (in its private /tmp).
pub const STATE_MOUNT: &str = "/tmp/.vane";
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

/// Closes every descriptor but stdio that init inherited (the agent's own inheritance, say):
/// opened outside the instance's mount namespace, they would keep CRIU from dumping it.
fn close_inherited() {
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect();
    for fd in fds {
        let _ = nix::unistd::close(fd);
    }
}

/// `vane __init DIR`: PID 1 of an instance.
pub fn init_main(dir: &Path) -> i32 {
    // A session whose leader is inside the instance: CRIU dumps only trees whose session
    // leader is in their PID namespace.
    let _ = setsid();
    close_inherited();
    // With a root of its own, the state directory is outside the instance's view: init
    // reaches it through a descriptor opened before (its /proc/self/fd link).
    let (spec, state) = match read_spec(dir).and_then(|s| prepare_space(dir, &s).map(|d| (s, d))) {
        Ok(s) => s,
        Err(e) => {
            println!("error: setting up the instance: {e}");
            return 1;
        }
    };
    let dir = state.as_path();
    // Not the agent's directory, which may lie under a path the instance hides (its /tmp):
    // CRIU could not find it again.
    let _ = std::env::set_current_dir("/");
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
/// instance's processes, /sys only its network devices; its own /tmp, hostname and
/// /etc/hosts; with a root directory, that directory under a private copy-on-write layer;
/// volumes and path rules. Returns the path at which init reaches the state directory
/// afterwards.
fn prepare_space(dir: &Path, spec: &LaunchSpec) -> io::Result<PathBuf> {
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
    // Host paths are opened before anything is mounted over them (the private /tmp hides
    // the host's): the state directory and the sources of volumes and path rules. They are
    // then reached through /proc/self/fd links, which work whatever the mounts.
    let state =
        File::open(dir).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
    let state_at = fd_path(&state);
    let mut sources = Vec::new();
    for source in spec
        .volumes
        .iter()
        .map(|(host, _)| host)
        .chain(spec.redirects.iter().map(|(_, source)| source))
    {
        let f = open_path(source)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", source.display())))?;
        sources.push((source.is_dir(), fd_path(&f), f));
    }
    let root = match &spec.rootfs {
        Some(lower) => {
            let layer = dir.join(ROOTFS_DIR);
            let (upper, work, merged) = (
                layer.join("upper"),
                layer.join("work"),
                layer.join("merged"),
            );
            for d in [&upper, &work, &merged] {
                std::fs::create_dir_all(d)?;
            }
            overlay(lower, &upper, &work, &merged)
                .map_err(|e| io::Error::other(format!("root {}: {e}", lower.display())))?;
            merged
        }
        None => PathBuf::from("/"),
    };
    let own_root = spec.rootfs.is_some();
    let at = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    if own_root {
        std::fs::create_dir_all(at(Path::new("/proc")))?;
        std::fs::create_dir_all(at(Path::new("/sys")))?;
    }
    mount(
        Some("proc"),
        &at(Path::new("/proc")),
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| errno("mount /proc", e))?;
    // A sysfs of the instance's own network namespace, so /sys/class/net shows its devices
    // rather than the host's; read-only, as sysfs also reaches host-wide kernel settings.
    if !own_root {
        let _ = umount2("/sys", MntFlags::MNT_DETACH);
    }
    mount(
        Some("sysfs"),
        &at(Path::new("/sys")),
        Some("sysfs"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| errno("mount /sys", e))?;
    if own_root {
        minimal_dev(&at(Path::new("/dev")))?;
    }
    let tmp = at(Path::new("/tmp"));
    std::fs::create_dir_all(&tmp)?;
    mount(
        Some("tmpfs"),
        &tmp,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )
    .map_err(|e| errno("mount /tmp", e))?;
    // The state directory, bound at the same place in every instance: init writes there, the
    // program's output goes there, and a checkpoint names it as an external mount, so a
    // restored instance finds its own host's directory there.
    let state_inside = tmp.join(STATE_MOUNT.trim_start_matches("/tmp/"));
    std::fs::create_dir_all(&state_inside)?;
    bind(&state_at, &state_inside, false).map_err(|e| errno("bind the state directory", e))?;
    sethostname(&spec.hostname).map_err(|e| errno("set hostname", e))?;
    // Room for targets that do not exist yet, before anything is bound below them (a layer
    // laid over a directory hides the mounts under it).
    let mut layered: Vec<PathBuf> = Vec::new();
    let targets = spec
        .volumes
        .iter()
        .map(|(host, inside)| (inside, host))
        .chain(spec.redirects.iter().map(|(t, s)| (t, s)));
    let (volume_sources, redirect_sources) = sources.split_at(spec.volumes.len());
    for (n, ((target, _), (dir_wanted, _, _))) in targets.zip(&sources).enumerate() {
        make_target(
            &state_at,
            &root,
            own_root,
            target,
            *dir_wanted,
            n,
            &mut layered,
        )?;
    }
    let etc = at(Path::new("/etc"));
    for (file, target) in [(HOSTS_FILE, "/etc/hosts"), (HOSTNAME_FILE, "/etc/hostname")] {
        let target = at(Path::new(target));
        if own_root && etc.is_dir() && !target.exists() {
            let _ = File::create(&target);
        }
        if target.exists() {
            bind(&state_at.join(file), &target, false)
                .map_err(|e| io::Error::other(format!("bind {}: {e}", target.display())))?;
        }
    }
    for ((_, inside), (_, source, _)) in spec.volumes.iter().zip(volume_sources) {
        bind(source, &at(inside), true)
            .map_err(|e| io::Error::other(format!("volume {}: {e}", inside.display())))?;
    }
    for ((target, _), (_, source, _)) in spec.redirects.iter().zip(redirect_sources) {
        bind(source, &at(target), false)
            .map_err(|e| io::Error::other(format!("redirect {}: {e}", target.display())))?;
    }
    drop(sources);
    if own_root {
        std::env::set_current_dir(&root)?;
        // The new root stacked over the old one; detaching the old leaves only the new.
        nix::unistd::pivot_root(".", ".").map_err(|e| errno("pivot_root", e))?;
        umount2(".", MntFlags::MNT_DETACH).map_err(|e| errno("detach the host's root", e))?;
        std::env::set_current_dir("/")?;
    }
    // Init keeps no descriptor from outside the instance (checkpointing wants none).
    drop(state);
    Ok(PathBuf::from(STATE_MOUNT))
}

/// Opens a path without reading it (`O_PATH`), for mounting it later by its descriptor.
fn open_path(p: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(p)
}

/// The /proc link that reaches the file `f` holds, for this process.
fn fd_path(f: &File) -> PathBuf {
    PathBuf::from(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(f)
    ))
}

fn overlay(lower: &Path, upper: &Path, work: &Path, at: &Path) -> Result<(), nix::Error> {
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    mount(
        Some("overlay"),
        at,
        Some("overlay"),
        MsFlags::empty(),
        Some(opts.as_str()),
    )
}

fn bind(source: &Path, target: &Path, recursive: bool) -> Result<(), nix::Error> {
    let flags = if recursive {
        MsFlags::MS_BIND | MsFlags::MS_REC
    } else {
        MsFlags::MS_BIND
    };
    mount(Some(source), target, None::<&str>, flags, None::<&str>)
}

/// Makes `target` (a path inside the instance) exist, as a directory or an empty file, without
/// changing the host: inside a root of its own or the private /tmp it is simply created;
/// elsewhere the nearest existing directory above it gets a private copy-on-write layer
/// (in the state directory) and the missing part is created in that layer.
fn make_target(
    dir: &Path,
    root: &Path,
    own_root: bool,
    target: &Path,
    dir_wanted: bool,
    n: usize,
    layered: &mut Vec<PathBuf>,
) -> io::Result<()> {
    let at = root.join(target.strip_prefix("/").unwrap_or(target));
    if at.exists() {
        return Ok(());
    }
    let private =
        own_root || target.starts_with("/tmp") || layered.iter().any(|l| target.starts_with(l));
    if !private {
        let ancestor = target
            .ancestors()
            .skip(1)
            .find(|a| a.is_dir())
            .unwrap_or(Path::new("/"));
        if ancestor == Path::new("/") {
            return Err(io::Error::other(format!(
                "cannot make {}: its top directory does not exist",
                target.display()
            )));
        }
        let layer = dir.join(PATHS_DIR).join(n.to_string());
        let (upper, work) = (layer.join("upper"), layer.join("work"));
        std::fs::create_dir_all(&upper)?;
        std::fs::create_dir_all(&work)?;
        overlay(ancestor, &upper, &work, ancestor)
            .map_err(|e| io::Error::other(format!("layer over {}: {e}", ancestor.display())))?;
        layered.push(ancestor.to_path_buf());
    }
    if dir_wanted {
        std::fs::create_dir_all(&at)
    } else {
        if let Some(parent) = at.parent() {
            std::fs::create_dir_all(parent)?;
        }
        File::create(&at).map(|_| ())
    }
    .map_err(|e| io::Error::new(e.kind(), format!("create {}: {e}", target.display())))
}

/// A /dev for a root of its own: a tmpfs with the host's harmless character devices bound in.
fn minimal_dev(dev: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dev)?;
    mount(
        Some("tmpfs"),
        dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=755"),
    )
    .map_err(|e| errno("mount /dev", e))?;
    for name in ["null", "zero", "full", "random", "urandom", "tty"] {
        let target = dev.join(name);
        File::create(&target)?;
        bind(&Path::new("/dev").join(name), &target, false)
            .map_err(|e| errno(&format!("bind /dev/{name}"), e))?;
    }
    std::fs::create_dir_all(dev.join("shm"))?;
    let _ = mount(
        Some("tmpfs"),
        &dev.join("shm"),
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    );
    for (link, to) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(to, dev.join(link))?;
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
        oom: false,
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
