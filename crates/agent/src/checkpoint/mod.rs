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
//!
//! This file finds CRIU and dumps (whole, or lazily with a page server); `pack` packs the
//! images for the trip and unpacks them on arrival; `restore` prepares a space and restores
//! a dumped tree into it.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::instance::Record;
use crate::netconf;

mod pack;
mod restore;

pub use pack::{pack, pack_bound, pack_to_pipe, unpack, Unpacker};
pub use restore::{prepare, restore, Prepared};

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
/// The keys of the bind mounts of the instance's hosts, hostname and resolv.conf files, which travel as
/// external mounts and are bound from the restoring host's own files.
const HOSTS_KEY: &str = "vane-hosts";
const HOSTNAME_KEY: &str = "vane-hostname";
const STATE_KEY: &str = "vane-state";
const RESOLV_KEY: &str = "vane-resolv";
/// The mounts of a confined instance that are not dumped but bound from the restoring
/// host's: (key, path inside, name in `__restore`'s staging directory). /dev holds device
/// nodes, which the instance's root could not make again; vane's binaries are the host's.
pub(crate) const CONFINED_EXTERNALS: &[(&str, &str, &str)] = &[
    (STATE_KEY, crate::launch::STATE_MOUNT, "shared"),
    (HOSTS_KEY, "/etc/hosts", "hosts"),
    (HOSTNAME_KEY, "/etc/hostname", "hostname"),
    (RESOLV_KEY, "/etc/resolv.conf", crate::launch::RESOLV_FILE),
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
/// instance nowhere (its source's restore fails the same way). What stays on its host does
/// not come along: a volume not marked shared, a path rule's source outside the instance's
/// state directory. Layers laid over the host's root for targets cannot be made again in
/// the instance's user namespace; nor, yet, a privileged instance's `--rootfs` root.
pub fn portable(record: &Record, dir: &Path) -> Result<(), String> {
    let name = &record.spec.name;
    let space = &record.spec.space;
    let why = if space.rootfs.is_some() && record.confinement().privileged() {
        "a privileged instance's --rootfs root cannot be staged for its restore yet".to_string()
    } else if let Some(v) = space.volumes.iter().find(|v| !v.shared) {
        format!(
            "its volume {v} is a directory of this host, which would not come along \
             (mark it :shared if every host has it)"
        )
    } else if layered(dir) {
        "a volume or path rule of it laid a layer over a directory of the host's root, which \
         restores cannot make again yet"
            .to_string()
    } else if let Some((target, source)) = space
        .redirects
        .iter()
        .find(|(_, source)| !Path::new(source).starts_with(dir.join(crate::launch::SHARED_DIR)))
    {
        format!(
            "its path rule {target}={source} takes a file of this host, which would not come \
             along (sources under {{state}} move with the instance)"
        )
    } else {
        return Ok(());
    };
    Err(format!("instance {name} cannot be checkpointed: {why}"))
}

/// Dumps the process tree of the instance into `DIR/images` and packs it with the
/// program's log into `DIR/images.tar`, unless the pack is made as it goes (`stream`).
/// Without `leave_running` the tree is gone afterwards. Returns the size of the pack (its
/// bound, for a pack yet to be made).
pub fn dump(dir: &Path, record: &Record, leave_running: bool, stream: bool) -> Result<u64, String> {
    let mut cmd = dump_command(dir, record)?;
    if leave_running {
        cmd.arg("--leave-running");
    }
    run_criu(&mut cmd, "dump", &dir.join(IMAGES_DIR).join("dump.log"))?;
    packed(dir, record, stream)
}

/// After a dump: the images packed, or the bound of their pack (`stream`).
fn packed(dir: &Path, record: &Record, stream: bool) -> Result<u64, String> {
    let _ = std::fs::remove_file(dir.join(PACK_FILE));
    match stream {
        true => Ok(pack_bound(dir)),
        false => pack(dir, record.confinement().idmap),
    }
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

/// What each end of a socket pair that carries pages may have on the way: more than CRIU's
/// largest request (4 MiB) with the next ones behind it, so that neither the page server
/// nor the relay waits on the other (the default, some 200 KiB, made them take turns).
const PAGE_SOCKET_BUFFER: usize = 8 << 20;

/// A socket pair for pages: between CRIU and the agent's relay, on either host.
pub(crate) fn page_socket_pair() -> Result<
    (
        std::os::unix::net::UnixStream,
        std::os::unix::net::UnixStream,
    ),
    String,
> {
    let (a, b) = std::os::unix::net::UnixStream::pair()
        .map_err(|e| format!("a socket pair for the pages: {e}"))?;
    for end in [&a, &b] {
        // Past `net.core.wmem_max` as root (SO_SNDBUFFORCE); a smaller buffer only costs
        // speed.
        let set = |opt| {
            vane_sys::socket::set_int_option(end, nix::libc::SOL_SOCKET, opt, PAGE_SOCKET_BUFFER)
        };
        if set(nix::libc::SO_SNDBUFFORCE).is_err() {
            let _ = set(nix::libc::SO_SNDBUF);
        }
    }
    Ok((a, b))
}

/// Starts a lazy dump of the instance and waits until its images are written (and packed,
/// unless the pack is made as it goes: `stream`) and its page server is up. Fails (with the
/// tree left running) where CRIU or the host cannot.
pub fn dump_lazy(dir: &Path, record: &Record, stream: bool) -> Result<LazyDump, String> {
    allow_large_pipes()?;
    let mut cmd = dump_command(dir, record)?;
    let (pages, theirs) = page_socket_pair()?;
    cmd.arg("--lazy-pages");
    let criu = serve_pages(
        cmd,
        &theirs,
        "criu dump",
        &dir.join(IMAGES_DIR).join("dump.log"),
    )?;
    let bytes = packed(dir, record, stream)?;
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

/// Whether the launch laid a copy-on-write layer over a directory of the host's root to
/// make room for a volume's or path rule's target (`launch::PATHS_DIR`).
fn layered(dir: &Path) -> bool {
    std::fs::read_dir(dir.join(crate::launch::PATHS_DIR))
        .is_ok_and(|mut entries| entries.next().is_some())
}

/// The key under which shared volume `n` (counted among the instance's shared volumes, in
/// its spec's order) travels in the images as an external mount.
pub(crate) fn volume_key(n: usize) -> String {
    format!("vane-vol-{n}")
}

/// The key under which path rule `n` (in its spec's order) travels in the images as an
/// external mount: CRIU cannot bind a file of the state directory again by itself.
pub(crate) fn redirect_key(n: usize) -> String {
    format!("vane-path-{n}")
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
    // Shared volumes stay out of the images: each restore binds its own host's directory.
    for (n, v) in record
        .spec
        .space
        .volumes
        .iter()
        .filter(|v| v.shared)
        .enumerate()
    {
        cmd.arg("--external")
            .arg(format!("mnt[{}]:{}", v.inside, volume_key(n)));
    }
    // Path rules too: each restore binds the source from the instance's state directory
    // there, which came with the images.
    for (n, (target, _)) in record.spec.space.redirects.iter().enumerate() {
        cmd.arg("--external")
            .arg(format!("mnt[{target}]:{}", redirect_key(n)));
    }
    if record.confinement().privileged() {
        for (key, inside) in [
            (HOSTS_KEY, "/etc/hosts"),
            (HOSTNAME_KEY, "/etc/hostname"),
            (RESOLV_KEY, "/etc/resolv.conf"),
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
