//! Checkpoints of running instances with CRIU (>= 4.2): dumping an instance's whole process
//! tree with its established TCP connections into an images directory, packing the images
//! for the trip to another host, preparing an instance's space without starting a program,
//! and restoring a dumped tree into such a space.
//!
//! The instance's network namespace is not dumped: it is marked external
//! (`--external net[INODE]:vane-net`), and on restore the prepared namespace, which holds a
//! new `vane0` with the same address, is handed to CRIU as an inherited descriptor. TCP
//! repair puts the connections back on sockets bound to that address.
//!
//! Blocking: run these off the async runtime.

use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use vane_proto::stream::InstanceSpec;

use crate::cgroup;
use crate::instance::{self, CreateError, Record, Setup};
use crate::netconf;
use crate::sandbox::IdMap;

/// The images of an instance's last dump, in its state directory.
pub const IMAGES_DIR: &str = "images";
/// In an instance's directory while its tree is dumped for a migration (`set_dumped`).
pub const DUMPED_FILE: &str = "dumped";
/// In an instance's directory from its restore here for a migration until a view places
/// it on this host (`Agent::adopt`, `apply_view`).
pub const ARRIVED_FILE: &str = "arrived";
/// The images packed for transfer (a tar of `images/` and `output.log`).
pub const PACK_FILE: &str = "images.tar";
/// The key under which the instance's network namespace travels in the images.
pub(crate) const NET_KEY: &str = "vane-net";
/// The keys of the bind mounts of the instance's hosts and hostname files, which travel as
/// external mounts and are bound from the restoring host's own files.
const HOSTS_KEY: &str = "vane-hosts";
const HOSTNAME_KEY: &str = "vane-hostname";
const STATE_KEY: &str = "vane-state";
/// The mounts of a confined instance that are not dumped but bound from the restoring
/// host's: (key, path inside, name in `__restore`'s staging directory). /dev holds device
/// nodes, which the instance's root could not make again; vane's binaries are the host's.
pub(crate) const CONFINED_EXTERNALS: &[(&str, &str, &str)] = &[
    (STATE_KEY, crate::launch::STATE_MOUNT, "shared"),
    (HOSTS_KEY, "/etc/hosts", "hosts"),
    (HOSTNAME_KEY, "/etc/hostname", "hostname"),
    ("vane-dev", "/dev", "dev"),
    ("vane-bin", crate::binary::DIR, "bin"),
];
/// CRIU does not lock the instance's network itself: the agent holds its switch port
/// (`Switch::hold_port`) for the dump, which costs nothing inside the freeze, where CRIU's
/// nftables lock cost some 5 ms to take and 20 ms to try to lift on the destination.
const NETWORK_LOCK: &str = "skip";
/// The oldest CRIU that dumps TCP sockets on current kernels.
const MIN_VERSION: (u32, u32) = (4, 2);

/// The CRIU binary: `VANE_CRIU` if set, else the one `scripts/install-criu.sh` installs,
/// else the one on the PATH.
fn criu() -> PathBuf {
    if let Some(path) = std::env::var_os("VANE_CRIU") {
        return PathBuf::from(path);
    }
    let local = Path::new("/usr/local/sbin/criu");
    if local.exists() {
        local.to_path_buf()
    } else {
        PathBuf::from("criu")
    }
}

/// CRIU's version if it is usable here (>= 4.2), or why not.
pub fn criu_version() -> Result<String, String> {
    let out = Command::new(criu())
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            format!("criu is not installed on this host ({e}); scripts/install-criu.sh installs it")
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text
        .lines()
        .find_map(|l| l.strip_prefix("Version:"))
        .map(|v| v.trim().to_string())
        .ok_or_else(|| "criu on this host does not say its version".to_string())?;
    if !usable(&version) {
        return Err(format!(
            "criu {version} on this host is too old (>= {}.{} needed; scripts/install-criu.sh installs it)",
            MIN_VERSION.0, MIN_VERSION.1
        ));
    }
    Ok(version)
}

/// Whether CRIU `version` ("4.2.1", "4.10") is at least `MIN_VERSION`.
fn usable(version: &str) -> bool {
    let mut parts = version
        .split('.')
        .map(|p| p.trim().parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= MIN_VERSION
}

/// Runs a CRIU command to its end; when it fails, says so with the end of its log.
fn run_criu(cmd: &mut Command, what: &str, log: &Path) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running criu: {e}"))?;
    if !out.status.success() {
        return Err(format!("criu {what} failed: {}", last_lines(log, 2)));
    }
    Ok(())
}

fn last_lines(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    // Harmless here: no CAP_SYS_RESOURCE to raise the descriptor limit; no dump lock to lift
    // in a namespace prepared for the restore.
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Error"))
        .filter(|l| !l.contains("RLIMIT_NOFILE") && !l.contains("Could not process rule"))
        .collect();
    if errors.is_empty() {
        let lines: Vec<&str> = text.lines().collect();
        return lines[lines.len().saturating_sub(n)..].join(" | ");
    }
    // The first errors say what went wrong, the last ones only that it failed.
    errors[..errors.len().min(n)].join(" | ")
}

/// Whether the instance can be checkpointed and restored elsewhere, or why not: asked
/// before anything is frozen, because a restore that cannot be done would leave the
/// instance nowhere (its source's restore fails the same way). CRIU restores a confined
/// instance inside its user namespace, where it cannot mount the overlay of a `--rootfs`
/// root, and where it fails to bind the files of path rules again (`Can't bind-mount`);
/// host directories shared as volumes stay on their host.
pub fn portable(record: &Record) -> Result<(), String> {
    let name = &record.spec.name;
    let space = &record.spec.space;
    let why = if space.rootfs.is_some() {
        "its --rootfs root is an overlay, which restores cannot mount yet".to_string()
    } else if let Some((host, inside)) = space.volumes.first() {
        format!(
            "its volume {host}:{inside} is a directory of this host, which would not come along"
        )
    } else if !space.redirects.is_empty() {
        let targets: Vec<&str> = space.redirects.iter().map(|(t, _)| t.as_str()).collect();
        format!(
            "its path rules ({}) are bind mounts that restores cannot make again yet",
            targets.join(", ")
        )
    } else {
        return Ok(());
    };
    Err(format!("instance {name} cannot be checkpointed: {why}"))
}

/// Dumps the process tree of the instance into `DIR/images` and packs it with the
/// program's log into `DIR/images.tar`. Without `leave_running` the tree is gone
/// afterwards. Returns the size of the pack.
pub fn dump(dir: &Path, record: &Record, leave_running: bool) -> Result<u64, String> {
    let mut cmd = dump_command(dir, record)?;
    if leave_running {
        cmd.arg("--leave-running");
    }
    run_criu(&mut cmd, "dump", &dir.join(IMAGES_DIR).join("dump.log"))?;
    pack(dir, record.confinement().idmap)
}

/// A lazy dump (post-copy migration): everything but the tree's memory is in
/// `DIR/images` (and packed); CRIU stays on as the page server of the frozen tree, on
/// `pages`, its end of a socket pair, until the destination has every page. Then it ends
/// the tree and exits 0; if the pages cannot all be served, it resumes the tree and exits
/// non-zero.
pub struct LazyDump {
    pub criu: std::process::Child,
    pub pages: std::os::unix::net::UnixStream,
    pub bytes: u64,
}

/// The descriptor numbers a lazy CRIU finds its page connection and status pipe at.
const PAGES_FD: i32 = 5;
const STATUS_FD: i32 = 6;
/// Where a lazy restore inside a user namespace finds `/dev/userfaultfd` (our patch of
/// CRIU, `scripts/criu-userfaultfd.patch`).
pub(crate) const UFFD_DEV_FD: i32 = 7;
/// CRIU's page server moves pages through pipes of up to 819 pages (3.2 MiB), more than
/// Linux lets a process without CAP_SYS_RESOURCE make unless `fs.pipe-max-size` allows it.
const PIPE_MAX_SIZE: u64 = 4 << 20;

/// Starts a lazy dump of the instance and waits until its images are written and its page
/// server is up. Fails (with the tree left running) where CRIU or the host cannot.
pub fn dump_lazy(dir: &Path, record: &Record) -> Result<LazyDump, String> {
    allow_large_pipes()?;
    let mut cmd = dump_command(dir, record)?;
    let (pages, theirs) = std::os::unix::net::UnixStream::pair()
        .map_err(|e| format!("a socket pair for the pages: {e}"))?;
    cmd.arg("--lazy-pages");
    let criu = serve_pages(
        cmd,
        &theirs,
        "criu dump",
        &dir.join(IMAGES_DIR).join("dump.log"),
    )?;
    let bytes = pack(dir, record.confinement().idmap)?;
    Ok(LazyDump { criu, pages, bytes })
}

/// Starts `cmd`, a CRIU that talks the page-server protocol on `pages` (its end of a socket
/// pair, `--ps-socket`), and waits until it says on its status pipe that it is ready;
/// else says why not with the end of its log (`what` names it).
fn serve_pages(
    mut cmd: Command,
    pages: &std::os::unix::net::UnixStream,
    what: &str,
    log: &Path,
) -> Result<std::process::Child, String> {
    let (status_read, status_write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("a pipe: {e}"))?;
    cmd.arg("--ps-socket")
        .arg(PAGES_FD.to_string())
        .arg("--status-fd")
        .arg(STATUS_FD.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    vane_sys::spawn::with_fds(
        &mut cmd,
        &[
            (std::os::fd::AsFd::as_fd(pages), PAGES_FD),
            (std::os::fd::AsFd::as_fd(&status_write), STATUS_FD),
        ],
    );
    let mut criu = cmd.spawn().map_err(|e| format!("running {what}: {e}"))?;
    drop(status_write);
    // One byte when it is ready; the end of the pipe when it ended first.
    let mut byte = [0u8; 1];
    let ready = matches!(
        std::io::Read::read(&mut std::fs::File::from(status_read), &mut byte),
        Ok(1)
    );
    if !ready {
        let _ = criu.wait();
        return Err(format!("{what} failed: {}", last_lines(log, 2)));
    }
    Ok(criu)
}

/// Raises `fs.pipe-max-size` to what CRIU's page server needs, if it is lower.
fn allow_large_pipes() -> Result<(), String> {
    let path = "/proc/sys/fs/pipe-max-size";
    let now: u64 = std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if now >= PIPE_MAX_SIZE {
        return Ok(());
    }
    std::fs::write(path, PIPE_MAX_SIZE.to_string())
        .map_err(|e| format!("cannot raise {path} to {PIPE_MAX_SIZE} for lazy pages: {e}"))
}

/// `criu dump` of the instance into a fresh `DIR/images`, as every dump runs it.
fn dump_command(dir: &Path, record: &Record) -> Result<Command, String> {
    let images = dir.join(IMAGES_DIR);
    let _ = std::fs::remove_dir_all(&images);
    std::fs::create_dir_all(&images).map_err(|e| format!("{}: {e}", images.display()))?;
    let ns = netconf::netns_path(&record.netns);
    let inode = std::fs::metadata(&ns)
        .map_err(|e| format!("{}: {e}", ns.display()))?
        .ino();
    let mut cmd = Command::new(criu());
    cmd.arg("dump")
        .arg("-t")
        .arg(record.init_pid.to_string())
        .arg("-D")
        .arg(&images)
        .arg("-o")
        .arg("dump.log")
        .arg("--tcp-established")
        .arg("--file-locks")
        .arg("--network-lock")
        .arg(NETWORK_LOCK)
        // Restores join the cgroups that the agent made (`--manage-cgroups=ignore`), so the
        // dump need not read them either (some 30 ms on cgroup v1).
        .arg("--manage-cgroups=ignore")
        .arg("--external")
        .arg(format!("net[{inode}]:{NET_KEY}"));
    if record.confinement().privileged() {
        for (key, inside) in [
            (HOSTS_KEY, "/etc/hosts"),
            (HOSTNAME_KEY, "/etc/hostname"),
            (STATE_KEY, crate::launch::STATE_MOUNT),
        ] {
            cmd.arg("--external").arg(format!("mnt[{inside}]:{key}"));
        }
    } else {
        for (key, inside, _) in CONFINED_EXTERNALS {
            cmd.arg("--external").arg(format!("mnt[{inside}]:{key}"));
        }
    }
    Ok(cmd)
}

/// Packs `DIR/images` and the instance's shared directory (its log, exit status and the
/// files of its `{state}` paths) into `DIR/images.tar`, with the host ids the instance's
/// ids were (`ids`: its range here; `None` for a privileged instance); returns its size.
pub fn pack(dir: &Path, ids: Option<IdMap>) -> Result<u64, String> {
    let ids_text = match ids {
        Some(m) => format!("{} {}\n", m.base, m.count),
        None => "host\n".to_string(),
    };
    std::fs::write(dir.join(IDS_FILE), ids_text).map_err(|e| format!("packing images: {e}"))?;
    run_tar(
        Command::new("tar")
            .arg("-C")
            .arg(dir)
            .arg("--numeric-owner")
            .arg("-cf")
            .arg(dir.join(PACK_FILE))
            .arg(IMAGES_DIR)
            .arg(crate::launch::SHARED_DIR)
            .arg(IDS_FILE),
        "packing images",
    )?;
    let _ = std::fs::remove_file(dir.join(IDS_FILE));
    std::fs::metadata(dir.join(PACK_FILE))
        .map(|m| m.len())
        .map_err(|e| format!("packing images: {e}"))
}

/// In a pack: the host ids the instance's ids were where it was packed.
const IDS_FILE: &str = "ids";

/// Unpacks `DIR/images.tar` (received from another host, or a snapshot) into `DIR`. The
/// shared directory's files become the instance's here: each file's owner and group move
/// from the packing host's range of ids to `owner` (this host's range for the instance),
/// at the same place in it, so that a file its program's user wrote stays that user's.
/// Ids from outside the packed range (or a pack that does not say it) become the
/// instance's root. GNU tar makes the links of a pack last, so none is followed while it
/// extracts.
pub fn unpack(dir: &Path, owner: Option<IdMap>) -> Result<(), String> {
    let _ = std::fs::remove_dir_all(dir.join(IMAGES_DIR));
    run_tar(
        Command::new("tar")
            .arg("-C")
            .arg(dir)
            .arg("--same-owner")
            .arg("--numeric-owner")
            .arg("-xf")
            .arg(dir.join(PACK_FILE)),
        "unpacking images",
    )?;
    let packed = std::fs::read_to_string(dir.join(IDS_FILE)).unwrap_or_default();
    let _ = std::fs::remove_file(dir.join(IDS_FILE));
    let from = {
        let mut words = packed.split_whitespace().map(|w| w.parse::<u32>().ok());
        match (words.next().flatten(), words.next().flatten()) {
            (Some(base), Some(count)) => Some(IdMap { base, count }),
            _ => None,
        }
    };
    if let Some(owner) = owner {
        let shared = dir.join(crate::launch::SHARED_DIR);
        shift_ids(&shared, from, owner)
            .map_err(|e| format!("unpacking images: {}: {e}", shared.display()))?;
    }
    Ok(())
}

/// Moves the owners of the tree at `path` (links not followed) from range `from` to `to`.
fn shift_ids(path: &Path, from: Option<IdMap>, to: IdMap) -> io::Result<()> {
    let shift = |id: u32| match from {
        Some(f) if id >= f.base && id - f.base < f.count.min(to.count) => to.base + (id - f.base),
        _ => to.base,
    };
    let meta = std::fs::symlink_metadata(path)?;
    std::os::unix::fs::lchown(path, Some(shift(meta.uid())), Some(shift(meta.gid())))?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path)? {
            shift_ids(&entry?.path(), from, to)?;
        }
    }
    Ok(())
}

/// Runs a tar command to its end; when it fails, says what it was `doing` and tar's error.
fn run_tar(cmd: &mut Command, doing: &str) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running tar: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{doing}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// An instance's space made ready for a restore: what `instance::create` makes before it
/// starts the program.
pub struct Prepared {
    pub tun: std::os::fd::OwnedFd,
    pub record: Record,
}

/// Makes the instance's state directory, network namespace with its `vane0` and address,
/// rules and cgroups, without starting anything. Undoes it all on failure.
pub fn prepare(
    dir: &Path,
    key: &str,
    spec: &InstanceSpec,
    setup: &Setup,
) -> Result<Prepared, String> {
    criu_version()?;
    if dir.join(instance::RECORD_FILE).exists() {
        return Err(format!("instance {} already exists on this host", spec.id));
    }
    if dir.exists() {
        return Err(format!("instance {} already exists on this host", spec.id));
    }
    let result = instance::make_space(dir, key, spec, setup);
    if result.is_err() {
        instance::teardown(dir, key, &setup.layout);
    }
    result
        .map(|(record, tun)| Prepared { tun, record })
        .map_err(|e| match e {
            CreateError::Input(m) | CreateError::Host(m) => m,
        })
}

/// Restores the tree dumped in `DIR/images` into the instance's namespace (prepared, or
/// the one it was dumped from), detached. Fills in and writes the record's pids. The port
/// of a tree restored where it was dumped is still on hold: the caller lifts it.
/// `tcp_close`: restore the connections closed (a clone). The restored tree takes the
/// record's hostname.
/// `pages`: the images are of a lazy dump, whose page server is at the other end of this
/// socket: the tree is restored without its memory, which a `criu lazy-pages` daemon (in
/// the instance's user namespace for a confined one) fetches on demand and in the
/// background until it has all.
pub fn restore(
    dir: &Path,
    exe: &Path,
    record: &mut Record,
    tcp_close: bool,
    pages: Option<std::os::unix::net::UnixStream>,
) -> Result<(), String> {
    let images = dir.join(IMAGES_DIR);
    let pidfile = images.join("restored.pid");
    let _ = std::fs::remove_file(&pidfile);
    let confinement = record.confinement();
    match confinement.idmap {
        Some(idmap) => {
            if let Some(pages) = &pages {
                start_lazy_daemon(&images, pages)?;
            }
            restore_confined(dir, exe, record, idmap.base, tcp_close, pages.is_some())?
        }
        None => {
            if let Some(pages) = &pages {
                start_lazy_daemon(&images, pages)?;
            }
            restore_privileged(dir, record, tcp_close, pages.is_some())?
        }
    }
    let init_pid: u32 = std::fs::read_to_string(&pidfile)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| "criu restore wrote no pid".to_string())?;
    record.init_pid = init_pid;
    record.init_start = vane_sys::pidfd::start_time(init_pid).unwrap_or(0);
    if let Err(e) = check_confined(record) {
        cgroup::kill_all(&record.cgroups);
        return Err(e);
    }
    let children = std::fs::read_to_string(format!("/proc/{init_pid}/task/{init_pid}/children"))
        .unwrap_or_default();
    record.pid = children
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(init_pid);
    instance::write_record(dir, record).map_err(|e| format!("writing the record: {e}"))
}

/// Restores a confined instance: CRIU runs in its user namespace (`vane __restore`), with
/// the images' own user namespace taken out of them, so the tree is the instance's root's
/// here (host id `owner` up) whatever the images say.
fn restore_confined(
    dir: &Path,
    exe: &Path,
    record: &Record,
    owner: u32,
    tcp_close: bool,
    lazy: bool,
) -> Result<(), String> {
    let images = dir.join(IMAGES_DIR);
    crate::images::inherit_namespaces(&images)?;
    crate::images::forget_thread_cgroups(&images)?;
    // CRIU, as the instance's root, reads the images and writes its log and pid file there.
    chown_tree(&images, owner).map_err(|e| format!("{}: {e}", images.display()))?;
    let spec = crate::launch::RestoreSpec {
        criu: criu(),
        netns: record.netns.clone(),
        cgroups: record.cgroups.clone(),
        hostname: record.spec.hostname.clone(),
        tcp_close,
        lazy,
    };
    instance::write_private(
        &dir.join(crate::launch::RESTORE_FILE),
        &serde_json::to_vec(&spec).expect("serializes"),
    )
    .map_err(|e| format!("writing the restore spec: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.arg("__restore").arg(dir).stdin(Stdio::null());
    // A lazy restore: /dev/userfaultfd, which CRIU in a user namespace makes its
    // userfaultfd from (the system call is refused there).
    let uffd = match lazy {
        true => Some(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(nix::libc::O_CLOEXEC)
                .open("/dev/userfaultfd")
                .map_err(|e| format!("lazy pages need /dev/userfaultfd (Linux >= 6.1): {e}"))?,
        ),
        false => None,
    };
    if let Some(uffd) = &uffd {
        vane_sys::spawn::with_fds(&mut cmd, &[(std::os::fd::AsFd::as_fd(uffd), UFFD_DEV_FD)]);
    }
    let out = cmd.output().map_err(|e| format!("running criu: {e}"))?;
    drop(uffd);
    if !out.status.success() {
        let log = images.join("restore.log");
        let why = if log.exists() {
            last_lines(&log, 2)
        } else {
            String::from_utf8_lossy(&out.stderr).trim().to_string()
        };
        return Err(format!("criu restore failed: {why}"));
    }
    Ok(())
}

fn chown_tree(path: &Path, owner: u32) -> io::Result<()> {
    std::os::unix::fs::lchown(path, Some(owner), Some(owner))?;
    if std::fs::symlink_metadata(path)?.is_dir() {
        for e in std::fs::read_dir(path)? {
            chown_tree(&e?.path(), owner)?;
        }
    }
    Ok(())
}

/// Starts `criu lazy-pages` on the images at `images`, its page server at the other end of
/// `pages`, and waits until it listens for the restore. The daemon runs as the host's root
/// (outside the instance's cgroups, whose limits and kills it must not share) and on by
/// itself until it has every page; it logs to `lazy.log` beside the images. It reads only
/// what describes the tree's memory, and writes pages into the descriptors the restored
/// tasks hand it; its socket is open to the restore, which runs as the instance's root.
fn start_lazy_daemon(images: &Path, pages: &std::os::unix::net::UnixStream) -> Result<(), String> {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("umask 0; exec \"$@\"")
        .arg("sh")
        .arg(criu())
        .arg("lazy-pages")
        .arg("-D")
        .arg(images)
        .arg("-o")
        .arg("lazy.log")
        .arg("--page-server");
    let mut daemon = serve_pages(cmd, pages, "criu lazy-pages", &images.join("lazy.log"))?;
    // Reaped when it ends (its outcome is the source's to report: its page server ends
    // with it).
    std::thread::spawn(move || daemon.wait());
    Ok(())
}

/// Restores a privileged instance as the host's root, as CRIU dumped it.
fn restore_privileged(
    dir: &Path,
    record: &Record,
    tcp_close: bool,
    lazy: bool,
) -> Result<(), String> {
    let images = dir.join(IMAGES_DIR);
    let ns = netconf::netns_path(&record.netns);
    let cgroups: Vec<String> = record
        .cgroups
        .iter()
        .map(|c| c.to_string_lossy().into_owned())
        .collect();
    // The shell joins the instance's cgroups (CRIU leaves cgroups alone: the source's may
    // still exist on a shared kernel) and opens the namespace as descriptor 3 for criu,
    // which gives it to the restored tree in place of the original. The state directory and
    // the hosts and hostname files are bound from this host's.
    let tcp = match (tcp_close, lazy) {
        (true, _) => "--tcp-close",
        (false, false) => "--tcp-established",
        (false, true) => "--tcp-established --lazy-pages",
    };
    let script = format!(
        "IFS=:; for c in $VANE_CGROUPS; do echo $$ > \"$c/cgroup.procs\" || exit 1; done; \
         exec \"$0\" restore -D \"$1\" -o restore.log {tcp} --file-locks --root / -d \
         --manage-cgroups=ignore --pidfile \"$2\" --inherit-fd 'fd[3]:{NET_KEY}' \
         --external \"mnt[{STATE_KEY}]:$4\" --external \"mnt[{HOSTS_KEY}]:$5\" \
         --external \"mnt[{HOSTNAME_KEY}]:$6\" 3<\"$3\""
    );
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(script)
        .arg(criu())
        .arg(&images)
        .arg(images.join("restored.pid"))
        .arg(&ns)
        .arg(dir.join(crate::launch::SHARED_DIR))
        .arg(dir.join(crate::launch::HOSTS_FILE))
        .arg(dir.join(crate::launch::HOSTNAME_FILE))
        .env("VANE_CGROUPS", cgroups.join(":"));
    run_criu(&mut cmd, "restore", &images.join("restore.log"))?;
    // The images hold the original's hostname; a clone has its own.
    let init_pid = std::fs::read_to_string(images.join("restored.pid")).unwrap_or_default();
    let named = Command::new("nsenter")
        .arg("-t")
        .arg(init_pid.trim())
        .arg("-u")
        .arg("hostname")
        .arg(&record.spec.hostname)
        .stdin(Stdio::null())
        .output();
    if !named.is_ok_and(|o| o.status.success()) {
        tracing::warn!(instance = %record.spec.name, "cannot set the restored instance's hostname");
    }
    Ok(())
}

/// Checks that every process of a restored confined instance is confined as the agent
/// decided: its user namespace's mapping, its bounding set within the instance's
/// capabilities, its seccomp filter. Images are the instance's word; a tree that claims
/// more is not let run.
fn check_confined(record: &Record) -> Result<(), String> {
    let confinement = record.confinement();
    let Some(idmap) = confinement.idmap else {
        return Ok(());
    };
    let want_map = idmap.map_line();
    let pids = cgroup::procs(&record.cgroups);
    if pids.is_empty() {
        return Err("the restored instance has no process".into());
    }
    for pid in pids {
        let map = std::fs::read_to_string(format!("/proc/{pid}/uid_map")).unwrap_or_default();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
        };
        let bounding = field("CapBnd:").and_then(|v| u64::from_str_radix(&v, 16).ok());
        let seccomp = field("Seccomp:");
        let mapped = map.split_whitespace().collect::<Vec<_>>()
            == want_map.split_whitespace().collect::<Vec<_>>();
        let bounded = bounding.is_some_and(|b| b & !confinement.caps == 0);
        if !mapped || !bounded || seccomp.as_deref() != Some("2") {
            return Err(format!(
                "the restored instance is not confined as this host requires (process {pid}); \
                 it was stopped"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::usable;

    #[test]
    fn criu_from_4_2_is_usable() {
        for v in ["4.2", "4.2.1", "4.10", "5.0"] {
            assert!(usable(v), "{v}");
        }
        for v in ["3.17", "4.1.1", "4", "", "x"] {
            assert!(!usable(v), "{v}");
        }
    }
}
