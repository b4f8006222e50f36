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

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{setgroups, sethostname, setresgid, setresuid, setsid, Gid, Pid, Uid};
use serde::{Deserialize, Serialize};

use vane_proto::api::ExitStatus;

use crate::cgroup;
use crate::sandbox::Confinement;

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

/// `vane __init`: PID 1 of an instance, already inside all its namespaces; reads its spec
/// from standard input.
///
/// Init starts outside the instance's root (its binary needs the host's libraries), moves
/// in, then starts again from the binary as the instance sees it (vane's binaries are bound
/// in), `pivoted` holding its spec: a checkpoint finds init's binary in the instance's own
/// mounts. Where that binary cannot start (a root without the C library), it goes on as it
/// is, and such an instance cannot be checkpointed.
pub fn init_main(pivoted: Option<&str>) -> i32 {
    let spec = match pivoted {
        Some(json) => serde_json::from_str::<LaunchSpec>(json).map_err(io::Error::other),
        None => {
            // A session whose leader is inside the instance: CRIU dumps only trees whose
            // session leader is in their PID namespace.
            let _ = setsid();
            close_inherited();
            let exe = std::env::current_exe();
            let mut json = String::new();
            io::stdin()
                .read_to_string(&mut json)
                .and_then(|_| enter_root())
                .and_then(|_| {
                    // Checkpointing needs init to hold nothing from outside the instance:
                    // standard input and error from the instance's own /dev.
                    let null = File::open("/dev/null")?;
                    for fd in [0, 2] {
                        nix::unistd::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), fd)?;
                    }
                    if let Ok(exe) = exe {
                        // Returns only if it could not start.
                        let _ = Command::new(exe)
                            .arg0("vane")
                            .arg("__init")
                            .arg("--pivoted")
                            .arg(&json)
                            .exec();
                    }
                    serde_json::from_str::<LaunchSpec>(&json).map_err(io::Error::other)
                })
        }
    };
    let spec = spec.and_then(|spec| prepare_inside(&spec).map(|_| spec));
    let spec = match spec {
        Ok(s) => s,
        Err(e) => {
            println!("error: setting up the instance: {e}");
            return 1;
        }
    };
    let dir = Path::new(STATE_MOUNT);
    let _ = std::env::set_current_dir("/");
    if let Err(e) = crate::sandbox::confine(&spec.confinement) {
        println!("error: confining the instance: {e}");
        return 1;
    }
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

/// Files of /proc that tell about the host's kernel and hardware: hidden (bound to
/// /dev/null, or an empty read-only directory), as OCI runtimes do.
const PROC_MASKED: &[&str] = &[
    "kcore",
    "keys",
    "latency_stats",
    "timer_list",
    "timer_stats",
    "sched_debug",
    "acpi",
    "asound",
    "scsi",
];
/// Parts of /proc that reach host-wide kernel settings: read-only.
const PROC_READONLY: &[&str] = &["bus", "fs", "irq", "sys", "sysrq-trigger"];

/// What init sets up inside the instance's own namespaces: its /proc (with the host-wide
/// parts masked or read-only when confined), its POSIX message queues, its hostname.
fn prepare_inside(spec: &LaunchSpec) -> io::Result<()> {
    mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| errno("mount /proc", e))?;
    if !spec.confinement.privileged() {
        for name in PROC_MASKED {
            let path = Path::new("/proc").join(name);
            let masked = match std::fs::metadata(&path) {
                Ok(m) if m.is_dir() => mount(
                    Some("tmpfs"),
                    &path,
                    Some("tmpfs"),
                    MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                    Some("size=0"),
                ),
                Ok(_) => bind(Path::new("/dev/null"), &path, false),
                Err(_) => continue,
            };
            masked.map_err(|e| errno(&format!("mask {}", path.display()), e))?;
        }
        for name in PROC_READONLY {
            let path = Path::new("/proc").join(name);
            if path.exists() {
                read_only_bind(&path, &path)
                    .map_err(|e| errno(&format!("{} read-only", path.display()), e))?;
            }
        }
    }
    if Path::new("/dev/mqueue").is_dir() {
        mount(
            Some("mqueue"),
            "/dev/mqueue",
            Some("mqueue"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .map_err(|e| errno("mount /dev/mqueue", e))?;
    }
    sethostname(&spec.hostname).map_err(|e| errno("set hostname", e))
}

/// Makes every mount of this (new) mount namespace private: nothing mounted here reaches
/// the host's.
fn make_mounts_private() -> io::Result<()> {
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| errno("make mounts private", e))
}

/// Where the instance's root is staged (bound from the host's) in its private directory.
pub const ROOT_DIR: &str = "root";

/// Builds the instance's root in its mount namespace and moves into it: the host's root
/// (read-only when confined) or a directory under a private copy-on-write layer; fresh
/// /proc, /sys, /dev; private /tmp and /run; the state directory at /tmp/.vane; vane's own
/// state hidden; hosts and hostname files; volumes and path rules (idmapped when confined,
/// so root inside owns what root owns on the host).
fn build_root(dir: &Path, spec: &LaunchSpec, userns: Option<&OwnedFd>) -> io::Result<PathBuf> {
    make_mounts_private()?;
    // Named network namespaces are nsfs bind mounts, which checkpointing cannot handle, and
    // the instance has no business with other namespaces anyway.
    let _ = umount2("/run/netns", MntFlags::MNT_DETACH);
    let confined = !spec.confinement.privileged();
    let owner = spec.confinement.idmap.map_or(0, |m| m.base);
    // Host paths are opened before anything is mounted over them: the shared directory,
    // vane's binaries, the sources of volumes and path rules. They are reached afterwards
    // through /proc/self/fd links, which work whatever the mounts.
    let shared_dir = dir.join(SHARED_DIR);
    let shared = open_path(&shared_dir)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", shared_dir.display())))?;
    let bin = open_path(Path::new(crate::binary::DIR)).ok();
    let mut sources = Vec::new();
    for source in spec
        .volumes
        .iter()
        .map(|(host, _)| host)
        .chain(spec.redirects.iter().map(|(_, source)| source))
    {
        let f = open_path(source)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", source.display())))?;
        // Files of the shared directory are the instance's own ids already.
        let idmap = userns.filter(|_| !source.starts_with(&shared_dir));
        sources.push((source.is_dir(), fd_path(&f), f, idmap));
    }
    let own_root = spec.rootfs.is_some();
    let root = match &spec.rootfs {
        Some(lower) => {
            let layer = dir.join(ROOTFS_DIR);
            let (upper, work, merged, mapped) = (
                layer.join("upper"),
                layer.join("work"),
                layer.join("merged"),
                layer.join("lower"),
            );
            for d in [&upper, &work, &merged, &mapped] {
                std::fs::create_dir_all(d)?;
            }
            if confined {
                std::os::unix::fs::chown(&upper, Some(owner), Some(owner))?;
            }
            // Seen through the instance's id mapping, the directory's files are root's
            // inside as they are outside.
            let lower = match userns {
                Some(ns) => vane_sys::confine::bind_idmapped(lower, &mapped, ns.as_fd())
                    .map(|_| mapped.clone())
                    .unwrap_or_else(|_| lower.clone()),
                None => lower.clone(),
            };
            overlay(&lower, &upper, &work, &merged)
                .map_err(|e| io::Error::other(format!("root {}: {e}", lower.display())))?;
            merged
        }
        None => {
            let stage = dir.join(ROOT_DIR);
            std::fs::create_dir_all(&stage)?;
            // Confined, the host's root file system alone: none of the host's other mounts
            // (its /run, its other disks) is seen, nor hidden below the instance's own
            // (checkpoints could not take those). Privileged, every host mount as it is.
            if confined {
                read_only_bind(Path::new("/"), &stage)
                    .map_err(|e| errno("bind the host's root", e))?;
            } else {
                bind(Path::new("/"), &stage, true).map_err(|e| errno("bind the host's root", e))?;
            }
            stage
        }
    };
    let at = |p: &str| root.join(p.trim_start_matches('/'));
    // The kernel's views are the instance's own; privileged instances keep the host's
    // devices and /run.
    let fresh: &[&str] = if confined {
        &["proc", "sys", "dev", "run", "tmp"]
    } else {
        &["proc", "sys", "tmp"]
    };
    for d in fresh {
        if !own_root {
            let _ = umount2(&at(d), MntFlags::MNT_DETACH);
        }
        std::fs::create_dir_all(at(d))?;
    }
    // A proc of the host's PID namespace, covered by init's own: the kernel lets init mount
    // a proc only where one is fully visible already. Locked below init's, it cannot be
    // uncovered.
    mount(
        Some("proc"),
        &at("/proc"),
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| errno("mount /proc", e))?;
    // A sysfs of the instance's own network namespace, so /sys/class/net shows its devices
    // rather than the host's; read-only, as sysfs also reaches host-wide kernel settings.
    mount(
        Some("sysfs"),
        &at("/sys"),
        Some("sysfs"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| errno("mount /sys", e))?;
    if confined {
        mask_dir(&at("/sys/firmware"))?;
        minimal_dev(&at("/dev"), owner)?;
        private_tmpfs(&at("/run"), owner, "0755").map_err(|e| errno("mount /run", e))?;
    } else if own_root {
        minimal_dev(&at("/dev"), owner)?;
    }
    private_tmpfs(&at("/tmp"), owner, "1777").map_err(|e| errno("mount /tmp", e))?;
    // The state directory, bound at the same place in every instance: init writes there, the
    // program's output goes there, and a checkpoint names it as an external mount, so a
    // restored instance finds its own host's directory there.
    let state_inside = at(STATE_MOUNT);
    std::fs::create_dir_all(&state_inside)?;
    bind(&fd_path(&shared), &state_inside, false)
        .map_err(|e| errno("bind the state directory", e))?;
    if own_root {
        // Init runs from vane's binary: it must be where it was (a checkpoint finds the
        // files of the tree by their paths).
        if let Some(bin) = &bin {
            let inside = at(crate::binary::DIR);
            std::fs::create_dir_all(&inside)?;
            read_only_bind(&fd_path(bin), &inside).map_err(|e| errno("bind vane's binaries", e))?;
        }
    } else if confined {
        hide_vane_state(&at, &spec.hide, bin.as_ref())?;
    }
    // Room for targets that do not exist yet, before anything is bound below them (a layer
    // laid over a directory hides the mounts under it).
    let mut layered: Vec<PathBuf> = Vec::new();
    let targets = spec
        .volumes
        .iter()
        .map(|(host, inside)| (inside, host))
        .chain(spec.redirects.iter().map(|(t, s)| (t, s)));
    let (volume_sources, redirect_sources) = sources.split_at(spec.volumes.len());
    for (n, ((target, _), (dir_wanted, _, _, _))) in targets.zip(&sources).enumerate() {
        make_target(dir, &root, own_root, target, *dir_wanted, n, &mut layered)?;
    }
    for (file, target) in [(HOSTS_FILE, "/etc/hosts"), (HOSTNAME_FILE, "/etc/hostname")] {
        let target = at(target);
        if own_root && at("/etc").is_dir() && !target.exists() {
            let _ = File::create(&target);
        }
        if target.exists() {
            read_only_bind(&dir.join(file), &target)
                .map_err(|e| io::Error::other(format!("bind {}: {e}", target.display())))?;
        }
    }
    for ((_, inside), (_, source, _, idmap)) in spec.volumes.iter().zip(volume_sources) {
        bind_source(
            source,
            &root.join(inside.strip_prefix("/").unwrap_or(inside)),
            *idmap,
            true,
        )
        .map_err(|e| io::Error::other(format!("volume {}: {e}", inside.display())))?;
    }
    for ((target, _), (_, source, _, idmap)) in spec.redirects.iter().zip(redirect_sources) {
        bind_source(
            source,
            &root.join(target.strip_prefix("/").unwrap_or(target)),
            *idmap,
            false,
        )
        .map_err(|e| io::Error::other(format!("redirect {}: {e}", target.display())))?;
    }
    drop(sources);
    Ok(root)
}

/// Moves into the instance's root, the working directory (set by `__launch`), leaving the
/// host's behind: the new root stacked over the old one; detaching the old leaves only the
/// new. Done by init, after it started from vane's binary (a root of the instance's own may
/// lack what the binary needs to start, such as the C library), in the instance's mount
/// namespace, where the host's root is the one mount not locked and may go.
fn enter_root() -> io::Result<()> {
    // The root was built by the host's root, so it is locked here: pivot into a copy.
    vane_sys::confine::restack_cwd()
        .map_err(|e| io::Error::new(e.kind(), format!("copy the root: {e}")))?;
    nix::unistd::pivot_root(".", ".").map_err(|e| errno("pivot_root", e))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| errno("detach the host's root", e))?;
    std::env::set_current_dir("/")
}

/// Binds a volume or path rule's source: through the instance's id mapping where the file
/// system allows it (root inside writes as root on the host), plainly otherwise.
fn bind_source(
    source: &Path,
    target: &Path,
    idmap: Option<&OwnedFd>,
    recursive: bool,
) -> io::Result<()> {
    if let Some(ns) = idmap {
        if vane_sys::confine::bind_idmapped(source, target, ns.as_fd()).is_ok() {
            return Ok(());
        }
    }
    bind(source, target, recursive).map_err(io::Error::from)
}

/// Hides vane's own state (keys, credentials, other instances' directories) under empty
/// read-only directories; only vane's binaries stay, read-only, for the instance's init.
fn hide_vane_state(
    at: &dyn Fn(&str) -> PathBuf,
    extra: &[PathBuf],
    bin: Option<&File>,
) -> io::Result<()> {
    let vane = at(VANE_DIR);
    for hidden in extra.iter().map(|p| at(&p.to_string_lossy())) {
        if !hidden.starts_with(&vane) && hidden.is_dir() {
            mask_dir(&hidden)?;
        }
    }
    if !vane.is_dir() {
        return Ok(());
    }
    mount(
        Some("tmpfs"),
        &vane,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755,size=64k"),
    )
    .map_err(|e| errno(&format!("hide {VANE_DIR}"), e))?;
    if let Some(bin) = bin {
        let inside = vane.join("bin");
        std::fs::create_dir_all(&inside)?;
        read_only_bind(&fd_path(bin), &inside).map_err(|e| errno("bind vane's binaries", e))?;
    }
    mount(
        None::<&str>,
        &vane,
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755,size=64k"),
    )
    .map_err(|e| errno(&format!("hide {VANE_DIR}"), e))
}

/// Where vane keeps its state on every host (agents, controllers, labs, binaries).
const VANE_DIR: &str = "/var/lib/vane";

/// An empty read-only directory over `path`.
fn mask_dir(path: &Path) -> io::Result<()> {
    if !path.is_dir() {
        return Ok(());
    }
    mount(
        Some("tmpfs"),
        path,
        Some("tmpfs"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("size=0"),
    )
    .map_err(|e| errno(&format!("hide {}", path.display()), e))
}

/// A tmpfs owned by the instance's root (host id `owner`).
fn private_tmpfs(path: &Path, owner: u32, mode: &str) -> Result<(), nix::Error> {
    mount(
        Some("tmpfs"),
        path,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(format!("mode={mode},uid={owner},gid={owner}").as_str()),
    )
}

/// Binds `source` at `target` and makes that binding read-only, keeping its other flags
/// (inside a user namespace, dropping nosuid or nodev from a mount is refused).
fn read_only_bind(source: &Path, target: &Path) -> Result<(), nix::Error> {
    use nix::sys::statvfs::{statvfs, FsFlags};
    bind(source, target, false)?;
    let have = statvfs(target)?.flags();
    let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY;
    for (st, ms) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if have.contains(st) {
            flags |= ms;
        }
    }
    mount(None::<&str>, target, None::<&str>, flags, None::<&str>)
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
/// changing the host: inside a root of its own or the private /tmp and /run it is simply
/// created; elsewhere the nearest existing directory above it gets a private copy-on-write
/// layer (in the instance's directory `dir`) and the missing part is created in that layer.
fn make_target(
    dir: &Path,
    root: &Path,
    own_root: bool,
    target: &Path,
    dir_wanted: bool,
    n: usize,
    layered: &mut Vec<PathBuf>,
) -> io::Result<()> {
    let at = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    let seen = at(target);
    if seen.exists() {
        return Ok(());
    }
    let private = own_root
        || target.starts_with("/tmp")
        || target.starts_with("/run")
        || layered.iter().any(|l| target.starts_with(l));
    if !private {
        let ancestor = target
            .ancestors()
            .skip(1)
            .find(|a| at(a).is_dir())
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
        overlay(&at(ancestor), &upper, &work, &at(ancestor))
            .map_err(|e| io::Error::other(format!("layer over {}: {e}", ancestor.display())))?;
        layered.push(ancestor.to_path_buf());
    }
    if dir_wanted {
        std::fs::create_dir_all(&seen)
    } else {
        if let Some(parent) = seen.parent() {
            std::fs::create_dir_all(parent)?;
        }
        File::create(&seen).map(|_| ())
    }
    .map_err(|e| io::Error::new(e.kind(), format!("create {}: {e}", target.display())))
}

/// A minimal /dev: `dev_tree`, with a pseudo-terminal instance of the instance's own and
/// shared memory owned by its root (host id `owner`); its message queues are mounted by init,
/// in the instance's IPC namespace.
pub fn minimal_dev(dev: &Path, owner: u32) -> io::Result<()> {
    dev_tree(dev)?;
    private_tmpfs(&dev.join("shm"), owner, "1777").map_err(|e| errno("mount /dev/shm", e))?;
    mount(
        Some("devpts"),
        &dev.join("pts"),
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )
    .map_err(|e| errno("mount /dev/pts", e))
}

/// A tmpfs at `dev` with the harmless character devices (made here by the host's root: the
/// instance's cannot make device nodes), mount points for pseudo-terminals, shared memory
/// and message queues, and the usual links.
fn dev_tree(dev: &Path) -> io::Result<()> {
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};
    std::fs::create_dir_all(dev)?;
    mount(
        Some("tmpfs"),
        dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=755,size=64k"),
    )
    .map_err(|e| errno("mount /dev", e))?;
    for (name, major, minor) in DEVICES {
        mknod(
            &dev.join(name),
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(*major, *minor),
        )
        .map_err(|e| errno(&format!("make /dev/{name}"), e))?;
        // The umask took bits away.
        std::fs::set_permissions(
            dev.join(name),
            std::os::unix::fs::PermissionsExt::from_mode(0o666),
        )?;
    }
    for d in ["shm", "pts", "mqueue"] {
        std::fs::create_dir_all(dev.join(d))?;
    }
    for (link, to) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(to, dev.join(link))?;
    }
    Ok(())
}

/// The devices of a minimal /dev: (name, major, minor).
const DEVICES: &[(&str, u64, u64)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

fn spawn_program(dir: &Path, spec: &LaunchSpec) -> Result<std::process::Child, String> {
    // Opened here, inside the instance's mount namespace, so that the program holds no file
    // of the host's mount namespace (checkpoint/restore requires it).
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(dir.join(LOG_FILE))
        .map_err(|e| format!("open log: {e}"))?;
    let log2 = log.try_clone().map_err(|e| format!("open log: {e}"))?;
    let program = &spec.cmd[0];
    Command::new(program)
        .args(&spec.cmd[1..])
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
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

/// What `vane __restore` needs: written by the agent as `restore.json` in the instance's
/// directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestoreSpec {
    pub criu: PathBuf,
    pub netns: String,
    pub cgroups: Vec<PathBuf>,
    pub hostname: String,
    /// Close the dumped connections rather than restore them (clones).
    pub tcp_close: bool,
    /// The images are of a lazy dump, whose `criu lazy-pages` daemon the agent started:
    /// restore with `--lazy-pages`, /dev/userfaultfd at descriptor 7.
    #[serde(default)]
    pub lazy: bool,
}

pub const RESTORE_FILE: &str = "restore.json";
/// Where `__restore` lays out what CRIU reads, on a tmpfs of its private mount namespace:
/// CRIU runs as the instance's root, which cannot enter the agent's directory.
const RESTORE_STAGE: &str = "/var/lib/vane/restore";

/// `vane __restore DIR`: restores the tree dumped in DIR/images into the instance's prepared
/// space, running CRIU inside the instance's user namespace (its root, no more) so that the
/// tree lands in that namespace with this host's id range, whatever the images held.
/// Execs CRIU; prints one error line when it cannot get that far.
pub fn restore_main(dir: &Path) -> i32 {
    let err = match restore(dir) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    eprintln!("{err}");
    1
}

fn restore(dir: &Path) -> io::Result<std::convert::Infallible> {
    let spec: RestoreSpec = serde_json::from_slice(&std::fs::read(dir.join(RESTORE_FILE))?)
        .map_err(io::Error::other)?;
    cgroup::join(&spec.cgroups, std::process::id())?;
    let net = File::open(crate::netconf::netns_path(&spec.netns))?;
    let userns = vane_sys::confine::owning_userns(&net)
        .map_err(|e| io::Error::new(e.kind(), format!("user namespace: {e}")))?;
    // As the host's root, in a mount namespace of this process's: what CRIU will bind into
    // the instance, at paths the instance's root can reach. The root and /dev are made here
    // read-only or by root, so the instance gets them locked.
    unshare(CloneFlags::CLONE_NEWNS).map_err(|e| errno("create mount namespace", e))?;
    make_mounts_private()?;
    let stage = Path::new(RESTORE_STAGE);
    std::fs::create_dir_all(stage)?;
    mount(
        Some("tmpfs"),
        stage,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777,size=1m"),
    )
    .map_err(|e| errno("stage the restore", e))?;
    let at = |name: &str| stage.join(name);
    for d in ["root", "dev", "images", "shared", "bin"] {
        std::fs::create_dir(at(d))?;
    }
    for f in [HOSTS_FILE, HOSTNAME_FILE] {
        File::create(at(f))?;
        read_only_bind(&dir.join(f), &at(f)).map_err(|e| errno(&format!("stage {f}"), e))?;
    }
    read_only_bind(Path::new("/"), &at("root")).map_err(|e| errno("stage the root", e))?;
    dev_tree(&at("dev"))?;
    bind(
        &dir.join(crate::checkpoint::IMAGES_DIR),
        &at("images"),
        false,
    )
    .map_err(|e| errno("stage the images", e))?;
    bind(&dir.join(SHARED_DIR), &at("shared"), false)
        .map_err(|e| errno("stage the state directory", e))?;
    if Path::new(crate::binary::DIR).is_dir() {
        read_only_bind(Path::new(crate::binary::DIR), &at("bin"))
            .map_err(|e| errno("stage vane's binaries", e))?;
    }
    // The instance's network namespace goes to CRIU as descriptor 3 (`--inherit-fd`).
    nix::unistd::dup2(std::os::fd::AsRawFd::as_raw_fd(&net), 3)
        .and_then(|_| {
            // dup2 onto itself keeps close-on-exec.
            nix::fcntl::fcntl(
                3,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
            )
        })
        .map_err(|e| errno("hand over the network namespace", e))?;
    enter_userns(&userns)?;
    // The tree inherits CRIU's UTS and cgroup namespaces (see `images`): fresh ones, named
    // here.
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWCGROUP)
        .map_err(|e| errno("create namespaces", e))?;
    sethostname(&spec.hostname).map_err(|e| errno("set hostname", e))?;
    let s = |name: &str| at(name).into_os_string();
    let ext = |key: &str, name: &str| {
        let mut a = std::ffi::OsString::from(format!("mnt[{key}]:"));
        a.push(s(name));
        a
    };
    let mut cmd = Command::new(&spec.criu);
    cmd.arg("restore")
        .arg("-D")
        .arg(s("images"))
        .arg("-o")
        .arg("restore.log")
        .arg(if spec.tcp_close {
            "--tcp-close"
        } else {
            "--tcp-established"
        })
        .args([
            "--file-locks",
            "-d",
            "--unprivileged",
            "--manage-cgroups=ignore",
        ])
        .arg("--root")
        .arg(s("root"))
        .arg("--pidfile")
        .arg(at("images").join("restored.pid"))
        .arg("--inherit-fd")
        .arg(format!("fd[3]:{}", crate::checkpoint::NET_KEY));
    for (key, _, name) in crate::checkpoint::CONFINED_EXTERNALS {
        cmd.arg("--external").arg(ext(key, name));
    }
    if spec.lazy {
        cmd.arg("--lazy-pages").env(
            "CRIU_USERFAULTFD_DEV",
            crate::checkpoint::UFFD_DEV_FD.to_string(),
        );
    }
    Err(cmd.exec())
}
