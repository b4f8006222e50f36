//! The mount primitives the launcher, init and restore share: private mount propagation,
//! binds (plain, read-only), overlays, tmpfs owned by the instance's root, paths held by
//! descriptor, and a minimal /dev.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};

use super::errno;

/// Makes every mount of this (new) mount namespace private: nothing mounted here reaches
/// the host's.
pub(super) fn make_mounts_private() -> io::Result<()> {
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| errno("make mounts private", e))
}

/// A tmpfs owned by the instance's root (host id `owner`).
pub(super) fn private_tmpfs(path: &Path, owner: u32, mode: &str) -> Result<(), nix::Error> {
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
pub(super) fn read_only_bind(source: &Path, target: &Path) -> Result<(), nix::Error> {
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
pub(super) fn open_path(p: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(p)
}

/// The /proc link that reaches the file `f` holds, for this process.
pub(super) fn fd_path(f: &File) -> PathBuf {
    PathBuf::from(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(f)
    ))
}

pub(super) fn overlay(
    lower: &Path,
    upper: &Path,
    work: &Path,
    at: &Path,
) -> Result<(), nix::Error> {
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

pub(super) fn bind(source: &Path, target: &Path, recursive: bool) -> Result<(), nix::Error> {
    let flags = if recursive {
        MsFlags::MS_BIND | MsFlags::MS_REC
    } else {
        MsFlags::MS_BIND
    };
    mount(Some(source), target, None::<&str>, flags, None::<&str>)
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
pub(super) fn dev_tree(dev: &Path) -> io::Result<()> {
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
