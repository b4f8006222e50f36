//! The instance's PID 1 (`vane __init`): moves into the root `__launch` built, mounts its
//! own /proc (host-wide parts masked) and message queues, names the host, confines itself,
//! starts the program, then reaps orphans, forwards signals and records the program's exit.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{sethostname, setsid, Pid};

use vane_proto::api::ExitStatus;

use super::mounts::{bind, read_only_bind};
use super::{errno, LaunchSpec, EXIT_FILE, LOG_FILE, STATE_MOUNT};

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
        Some(json) => {
            // Run through the copy's loader (`binary::runtime`), whose file name the kernel
            // gave the process: PID 1 is called `vane` in `ps` all the same.
            let _ = nix::sys::prctl::set_name(c"vane");
            serde_json::from_str::<LaunchSpec>(json).map_err(io::Error::other)
        }
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
                        // Through the copy's own runtime: the instance's root may have no
                        // libraries, and everything init maps must lie in its mounts.
                        let mut cmd = match crate::binary::runtime(&exe) {
                            Some((loader, args)) => {
                                let mut cmd = Command::new(loader);
                                cmd.args(args);
                                cmd
                            }
                            None => Command::new(exe),
                        };
                        // Returns only if it could not start.
                        let _ = cmd
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
