//! `vane __restore`: lays out what CRIU reads (root, /dev, images, state directory) as the
//! host's root, then runs CRIU inside the instance's user namespace, so that the restored
//! tree lands there with this host's id range.

use std::fs::File;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::unistd::sethostname;
use serde::{Deserialize, Serialize};

use super::mounts::{bind, dev_tree, make_mounts_private, read_only_bind};
use super::{enter_userns, errno, HOSTNAME_FILE, HOSTS_FILE, RESOLV_FILE, SHARED_DIR};
use crate::cgroup;

/// What `vane __restore` needs: written by the agent as `restore.json` in the instance's
/// directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestoreSpec {
    pub criu: PathBuf,
    pub netns: String,
    pub cgroups: Vec<PathBuf>,
    pub hostname: String,
    /// The directory of a `--rootfs` instance's root: the root is staged as at its launch
    /// (`root::rootfs_overlay`), over the copy-on-write layer that came with the images.
    #[serde(default)]
    pub rootfs: Option<PathBuf>,
    /// The instance's root, host id (the owner of its copy-on-write layer).
    #[serde(default)]
    pub owner: u32,
    /// The directories of this host bound for the instance's shared volumes, in order
    /// (`checkpoint::volume_key`).
    #[serde(default)]
    pub volumes: Vec<PathBuf>,
    /// The sources of the instance's path rules, in order (`checkpoint::redirect_key`): in
    /// its state directory here.
    #[serde(default)]
    pub redirects: Vec<PathBuf>,
    /// Nothing of the instance runs yet (a space prepared for it): where this host has no
    /// probe of the kernel's features as CRIU sees them from a user namespace, one may be
    /// made in the instance's and kept for every confined restore ([`USERNS_KDAT`]).
    #[serde(default)]
    pub may_probe: bool,
}

/// What the agent tells a waiting `vane __restore` once the images are in place: one line
/// of JSON on its standard input.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestoreGo {
    /// Close the dumped connections rather than restore them (clones).
    pub tcp_close: bool,
    /// The images are of a lazy dump, whose `criu lazy-pages` daemon the agent started:
    /// restore with `--lazy-pages`, /dev/userfaultfd at descriptor 7.
    pub lazy: bool,
}

pub const RESTORE_FILE: &str = "restore.json";
/// CRIU's probe of the kernel's features as seen from an instance's user namespace, which
/// it otherwise makes at every start of a restore there (some 10 ms, inside the freeze):
/// on the tmpfs that `scripts/install-criu.sh` mounts for CRIU's own cache, the host's
/// root's alone, so gone at a reboot as a probe of the kernel must be. Only this helper
/// writes it, from a probe run before anything of an instance runs in its namespace.
const USERNS_KDAT: &str = "/run/criu/vane-userns.kdat";
/// The name CRIU gives its cache in `$XDG_RUNTIME_DIR` when it runs `--unprivileged`.
const KDAT_NAME: &str = "criu.kdat";
/// Where `__restore` lays out what CRIU reads, on a tmpfs of its private mount namespace:
/// CRIU runs as the instance's root, which cannot enter the agent's directory.
const RESTORE_STAGE: &str = "/var/lib/vane/restore";

/// `vane __restore DIR`: restores the tree dumped in DIR/images into the instance's prepared
/// space, running CRIU inside the instance's user namespace (its root, no more) so that the
/// tree lands in that namespace with this host's id range, whatever the images held.
/// Started with the space, it lays out first what does not depend on the images, then
/// waits for a [`RestoreGo`] line on its standard input (its end without one: the restore
/// is off, and it exits). Execs CRIU; prints one error line when it cannot get that far.
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
    for f in [HOSTS_FILE, HOSTNAME_FILE, RESOLV_FILE] {
        File::create(at(f))?;
        // (An instance made before resolv.conf files has none, nor its images the mount.)
        if f == RESOLV_FILE && !dir.join(f).exists() {
            continue;
        }
        read_only_bind(&dir.join(f), &at(f)).map_err(|e| errno(&format!("stage {f}"), e))?;
    }
    if spec.rootfs.is_none() {
        read_only_bind(Path::new("/"), &at("root")).map_err(|e| errno("stage the root", e))?
    }
    dev_tree(&at("dev"))?;
    stage_kdat(&spec, &userns, &at("kdat"));
    if Path::new(crate::binary::DIR).is_dir() {
        read_only_bind(Path::new(crate::binary::DIR), &at("bin"))
            .map_err(|e| errno("stage vane's binaries", e))?;
    }
    // Shared volumes, as the launch binds them: through the instance's id mapping.
    let mut externals = Vec::new();
    for (n, host) in spec.volumes.iter().enumerate() {
        let key = crate::checkpoint::volume_key(n);
        std::fs::create_dir(at(&key))?;
        super::root::bind_source(host, &at(&key), Some(&userns), true).map_err(|e| {
            io::Error::new(e.kind(), format!("stage volume {}: {e}", host.display()))
        })?;
        externals.push(key);
    }
    // What comes with the images waits for them.
    let mut line = String::new();
    if io::stdin().read_line(&mut line)? == 0 {
        return Err(io::Error::other("no restore: the agent called it off"));
    }
    let go: RestoreGo = serde_json::from_str(&line).map_err(io::Error::other)?;
    if let Some(lower) = &spec.rootfs {
        super::root::rootfs_overlay(dir, lower, Some(&userns), Some(spec.owner), &at("root"))
            .map_err(|e| io::Error::new(e.kind(), format!("stage the root: {e}")))?
    }
    bind(
        &dir.join(crate::checkpoint::IMAGES_DIR),
        &at("images"),
        false,
    )
    .map_err(|e| errno("stage the images", e))?;
    bind(&dir.join(SHARED_DIR), &at("shared"), false)
        .map_err(|e| errno("stage the state directory", e))?;
    // Path rules' sources, bound plainly as the launch binds the state directory's files.
    for (n, source) in spec.redirects.iter().enumerate() {
        let key = crate::checkpoint::redirect_key(n);
        if source.is_dir() {
            std::fs::create_dir(at(&key))?;
        } else {
            File::create(at(&key))?;
        }
        bind(source, &at(&key), false).map_err(|e| {
            io::Error::other(format!("stage path rule source {}: {e}", source.display()))
        })?;
        externals.push(key);
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
    cmd.env("XDG_RUNTIME_DIR", at("kdat"));
    cmd.arg("restore")
        .arg("-D")
        .arg(s("images"))
        .arg("-o")
        .arg("restore.log")
        .arg(if go.tcp_close {
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
    for key in &externals {
        cmd.arg("--external").arg(ext(key, key));
    }
    if go.lazy {
        cmd.arg("--lazy-pages").env(
            "CRIU_USERFAULTFD_DEV",
            crate::checkpoint::UFFD_DEV_FD.to_string(),
        );
    } else {
        // Nobody is to make userfaultfds of the device: not CRIU, not the tree.
        let _ = nix::unistd::close(crate::checkpoint::UFFD_DEV_FD);
    }
    Err(cmd.exec())
}

/// Lays out `kdat`, the instance's root's directory on the stage where its CRIU finds
/// ([`USERNS_KDAT`]) and leaves its probe of the kernel's features (`$XDG_RUNTIME_DIR`).
/// Where the host has none yet and `spec.may_probe`, probes now, before the freeze, in the
/// instance's user namespace, where nothing else runs, and keeps the result. Best effort:
/// without it CRIU probes for itself.
fn stage_kdat(spec: &RestoreSpec, userns: &std::os::fd::OwnedFd, kdat: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let owner = Some(nix::unistd::Uid::from_raw(spec.owner));
    let group = Some(nix::unistd::Gid::from_raw(spec.owner));
    let made = std::fs::create_dir(kdat)
        .and_then(|()| std::fs::set_permissions(kdat, std::fs::Permissions::from_mode(0o700)))
        .and_then(|()| nix::unistd::chown(kdat, owner, group).map_err(io::Error::from));
    if made.is_err() {
        return;
    }
    let cached = kdat.join(KDAT_NAME);
    if let Ok(probe) = std::fs::read(USERNS_KDAT) {
        let _ = std::fs::write(&cached, probe)
            .and_then(|()| nix::unistd::chown(&cached, owner, group).map_err(io::Error::from));
        return;
    }
    // Kept on a tmpfs only: a probe must not outlive the kernel it probed.
    let on_tmpfs = Path::new(USERNS_KDAT).parent().is_some_and(|dir| {
        nix::sys::statfs::statfs(dir)
            .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
    });
    if !spec.may_probe || !on_tmpfs {
        return;
    }
    // `criu check` probes first (and leaves its cache), whatever it is asked to check then.
    let mut probe = Command::new(&spec.criu);
    probe
        .args(["check", "--unprivileged", "--feature", "uffd-noncoop"])
        .env("XDG_RUNTIME_DIR", kdat)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    vane_sys::spawn::as_root_of(&mut probe, std::os::fd::AsFd::as_fd(userns));
    if probe.status().is_err() {
        return;
    }
    // What the probe left, read without following a link (nothing but that CRIU could
    // have written there, but the host's root reads it), kept only whole: written aside,
    // then renamed over.
    let Ok(made) = read_probe(&cached) else {
        return;
    };
    let aside = format!("{USERNS_KDAT}.{}", std::process::id());
    let kept = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&aside)
        .and_then(|mut f| io::Write::write_all(&mut f, &made))
        .and_then(|()| std::fs::rename(&aside, USERNS_KDAT));
    if kept.is_err() {
        let _ = std::fs::remove_file(&aside);
    }
}

/// The most a probe of CRIU's may be (its cache is under 1 KiB).
const KDAT_MAX: u64 = 64 << 10;

/// Reads a probe CRIU left: a regular file, not a link, of at most [`KDAT_MAX`] bytes.
fn read_probe(path: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() || meta.len() > KDAT_MAX {
        return Err(io::Error::other("not a probe"));
    }
    let mut made = Vec::new();
    file.take(KDAT_MAX).read_to_end(&mut made)?;
    Ok(made)
}
